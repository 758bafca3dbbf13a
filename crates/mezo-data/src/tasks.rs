//! The task registry: each task's JSONL fields (as the HF datasets name them), MeZO's prompt
//! template and candidate set (princeton-nlp/MeZO, `large_models/templates.py` and `tasks.py`),
//! and its metric. A user task renders its own fields through a template given in the run spec
//! (see [`crate::user`]).
//!
//! Prompts follow MeZO's tokenisation convention: the prompt keeps no trailing spaces (MeZO
//! strips them) and a candidate carries its own leading space, so `prompt + candidate` is the
//! verbalised example and the candidate's tokens are those after the prompt's.

use std::io::BufRead;
use std::path::Path;

use serde_json::{Map, Value};

use crate::user::UserTemplate;
use crate::{DataError, Template};

/// The tasks this crate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskName {
    Sst2,
    Rte,
    Cb,
    Boolq,
    Wsc,
    Wic,
    Multirc,
    Copa,
    Record,
    Squad,
    Drop,
    /// The user's fields through the run's template.
    Custom,
}

/// Every task name `--task` accepts, in the README's order.
pub const TASK_NAMES: [&str; 12] =
    ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop", "custom"];

impl TaskName {
    pub fn parse(s: &str) -> Result<Self, DataError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sst2" | "sst-2" => TaskName::Sst2,
            "rte" => TaskName::Rte,
            "cb" => TaskName::Cb,
            "boolq" => TaskName::Boolq,
            "wsc" => TaskName::Wsc,
            "wic" => TaskName::Wic,
            "multirc" => TaskName::Multirc,
            "copa" => TaskName::Copa,
            "record" => TaskName::Record,
            "squad" => TaskName::Squad,
            "drop" => TaskName::Drop,
            "custom" => TaskName::Custom,
            _ => {
                return Err(DataError::InvalidArgument {
                    what: "task",
                    value: s.into(),
                    expected: TASK_NAMES.join(", "),
                })
            }
        })
    }

    /// The JSONL fields a line must carry (HF datasets' names), for messages and docs.
    pub fn fields(self) -> &'static str {
        match self {
            TaskName::Sst2 => "sentence, label (glue/sst2)",
            TaskName::Rte => "premise, hypothesis, label (super_glue/rte)",
            TaskName::Cb => "premise, hypothesis, label (super_glue/cb)",
            TaskName::Boolq => "passage, question, and label (super_glue/boolq) or answer (boolq)",
            TaskName::Wsc => "text, span1_text, span2_text, label (super_glue/wsc.fixed)",
            TaskName::Wic => "word, sentence1, sentence2, label (super_glue/wic)",
            TaskName::Multirc => "paragraph, question, answer, label (super_glue/multirc)",
            TaskName::Copa => "premise, choice1, choice2, question, label (super_glue/copa)",
            TaskName::Record => "passage, query, entities, answers (super_glue/record)",
            TaskName::Squad => "title, context, question, answers.text (squad)",
            TaskName::Drop => "passage, question, answers_spans.spans (drop)",
            TaskName::Custom => "the fields the user template names",
        }
    }
}

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// The best-scoring candidate is (one of) the gold.
    Accuracy,
    /// Greedy generation scored by SQuAD token F1 (exact match reported beside it).
    F1,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
        }
    }
}

/// One example rendered for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskExample {
    /// The `idx` field when it is an integer, else the line's position among the examples.
    pub idx: i64,
    pub prompt: String,
    /// Candidate continuations of `prompt` (empty for generation tasks).
    pub candidates: Vec<String>,
    /// The correct candidates (ReCoRD may have several); the first is the training target.
    pub gold: Vec<usize>,
    /// Reference answers of a generation task; the first is the training target.
    pub answers: Vec<String>,
    /// Words of the example's own text (for `--min-words`).
    pub words: usize,
}

impl TaskExample {
    /// The training label of a candidate task.
    pub fn label(&self) -> usize {
        self.gold[0]
    }

    /// The continuation the model is trained to produce: the gold candidate, or for generation
    /// the first answer after a space and followed by the newline that ends generation (MeZO's
    /// `"Answer: {answer}\n"`).
    pub fn target(&self) -> String {
        if self.candidates.is_empty() {
            let sep =
                if self.prompt.ends_with(char::is_whitespace) || self.prompt.is_empty() { "" } else { " " };
            format!("{sep}{}\n", self.answers.first().map_or("", String::as_str))
        } else {
            self.candidates[self.gold[0]].clone()
        }
    }
}

/// A task as a run uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: TaskName,
    /// SST-2's prompt variant.
    pub sst2: Template,
    pub user: Option<UserTemplate>,
}

impl Task {
    /// `template` picks SST-2's variant (`mezo` or `classify`); other tasks take `mezo` only.
    /// `user` is required for (and only for) `custom`.
    pub fn new(name: &str, template: &str, user: Option<UserTemplate>) -> Result<Self, DataError> {
        let name = TaskName::parse(name)?;
        let sst2 = if name == TaskName::Sst2 {
            Template::parse(template)?
        } else if template == "mezo" || template.is_empty() {
            Template::Mezo
        } else {
            return Err(DataError::InvalidArgument {
                what: "template",
                value: template.into(),
                expected: "mezo (only SST-2 has a second template, classify; a user task gives its own \
                           with --prompt)"
                    .into(),
            });
        };
        match (name, &user) {
            (TaskName::Custom, None) => {
                return Err(DataError::Config(
                    "task custom needs a user template: --prompt (and --candidate, --candidates-field or \
                     --answer-field)"
                        .into(),
                ))
            }
            (TaskName::Custom, Some(u)) => u.validate()?,
            (_, Some(_)) => {
                return Err(DataError::Config(
                    "a user template (--prompt, --candidate, ...) is for --task custom only".into(),
                ))
            }
            _ => {}
        }
        Ok(Task { name, sst2, user })
    }

    pub fn is_generation(&self) -> bool {
        match self.name {
            TaskName::Squad | TaskName::Drop => true,
            TaskName::Custom => self.user.as_ref().is_some_and(UserTemplate::is_generation),
            _ => false,
        }
    }

    pub fn metric(&self) -> Metric {
        if self.is_generation() {
            Metric::F1
        } else {
            Metric::Accuracy
        }
    }

    /// Reads a JSONL file of this task; a bad line fails with its file, line and field.
    pub fn load(&self, path: &Path) -> Result<Vec<TaskExample>, DataError> {
        let file =
            std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
        let mut out = Vec::new();
        // Lines as bytes, so a line that is not UTF-8 is reported with its number (`lines()`
        // would fail with the file alone).
        for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
            let line = line.map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
            let err = |message: String| DataError::Line { path: path.to_path_buf(), line: i + 1, message };
            let line = std::str::from_utf8(&line).map_err(|e| err(format!("not UTF-8 text: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: Value =
                serde_json::from_str(line).map_err(|e| err(format!("not a JSON object: {e}")))?;
            let Value::Object(obj) = value else {
                return Err(err("not a JSON object".into()));
            };
            let mut ex = self.render(&obj).map_err(err)?;
            ex.idx = obj.get("idx").and_then(Value::as_i64).unwrap_or(out.len() as i64);
            out.push(ex);
        }
        if out.is_empty() {
            return Err(DataError::Empty { path: path.to_path_buf() });
        }
        Ok(out)
    }

    /// One JSON object as an example; the error names the field.
    pub fn render(&self, o: &Map<String, Value>) -> Result<TaskExample, String> {
        let yes_no = || vec!["Yes".to_string(), "No".to_string()];
        let no_yes = || vec!["No".to_string(), "Yes".to_string()];
        let (prompt, candidates, gold, answers, words) = match self.name {
            TaskName::Sst2 => {
                let s = string(o, "sentence")?;
                let t = self.sst2;
                let c = t.candidates().iter().map(|c| c.to_string()).collect();
                (t.prompt(s.trim()), c, vec![label(o, "label", 2)?], vec![], words(s))
            }
            TaskName::Rte => {
                let (p, h) = (string(o, "premise")?, string(o, "hypothesis")?);
                let prompt = format!("{p}\nDoes this mean that \"{h}\" is true? Yes or No?\n");
                // super_glue/rte: 0 entailment ("Yes"), 1 not_entailment ("No").
                (prompt, yes_no(), vec![label(o, "label", 2)?], vec![], words(p) + words(h))
            }
            TaskName::Cb => {
                let (p, h) = (string(o, "premise")?, string(o, "hypothesis")?);
                let prompt = format!("Suppose {p} Can we infer that \"{h}\"? Yes, No, or Maybe?\n");
                // 0 entailment, 1 contradiction, 2 neutral.
                let c = vec!["Yes".into(), "No".into(), "Maybe".into()];
                (prompt, c, vec![label(o, "label", 3)?], vec![], words(p) + words(h))
            }
            TaskName::Boolq => {
                let (passage, q) = (string(o, "passage")?, string(o, "question")?);
                let mut q = q.clone();
                if !q.ends_with('?') {
                    q.push('?');
                }
                let q = capitalize_first(&q);
                // MeZO's default BoolQ template (V3): "Yes" for true answers.
                let truth = match (o.get("answer"), o.get("label")) {
                    (Some(Value::Bool(b)), _) => *b,
                    (Some(other), _) => {
                        return Err(format!("field `answer` is {other}, expected true or false"))
                    }
                    (None, Some(_)) => label(o, "label", 2)? == 1,
                    (None, None) => {
                        return Err("missing field `label` (super_glue) or `answer` (boolq)".into())
                    }
                };
                let prompt = format!("{passage} {q}\n");
                (prompt, yes_no(), vec![usize::from(!truth)], vec![], words(passage) + words(&q))
            }
            TaskName::Wsc => {
                let (t, s1, s2) = (string(o, "text")?, string(o, "span1_text")?, string(o, "span2_text")?);
                let prompt = format!(
                    "{t}\nIn the previous sentence, does the pronoun \"{}\" refer to {s1}? Yes or No?\n",
                    s2.to_lowercase()
                );
                (prompt, no_yes(), vec![label(o, "label", 2)?], vec![], words(t))
            }
            TaskName::Wic => {
                let (w, s1, s2) = (string(o, "word")?, string(o, "sentence1")?, string(o, "sentence2")?);
                let prompt = format!(
                    "Does the word \"{w}\" have the same meaning in these two sentences? Yes, No?\n{s1}\n{s2}\n"
                );
                (prompt, no_yes(), vec![label(o, "label", 2)?], vec![], words(s1) + words(s2))
            }
            TaskName::Multirc => {
                let (p, q, a) = (string(o, "paragraph")?, string(o, "question")?, string(o, "answer")?);
                let prompt =
                    format!("{p}\nQuestion: {q}\nI found this answer \"{a}\". Is that correct? Yes or No?\n");
                (prompt, no_yes(), vec![label(o, "label", 2)?], vec![], words(p) + words(q))
            }
            TaskName::Copa => {
                let premise = string(o, "premise")?;
                let conj = match string(o, "question")?.as_str() {
                    "cause" => "because",
                    "effect" => "so",
                    other => {
                        return Err(format!(
                            "field `question` is {other:?}, expected \"cause\" or \"effect\""
                        ))
                    }
                };
                let p = premise.trim_end();
                let p = p.strip_suffix('.').unwrap_or(p);
                let c = vec![
                    format!(" {}", copa_choice(string(o, "choice1")?)),
                    format!(" {}", copa_choice(string(o, "choice2")?)),
                ];
                (format!("{p} {conj}"), c, vec![label(o, "label", 2)?], vec![], words(premise))
            }
            TaskName::Record => {
                let (passage, query) = (string(o, "passage")?, string(o, "query")?);
                let entities = strings(o, "entities")?;
                let answers = strings(o, "answers")?;
                if entities.is_empty() {
                    return Err("field `entities` is empty: ReCoRD scores the passage's entities".into());
                }
                let gold: Vec<usize> = entities
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| answers.contains(e))
                    .map(|(i, _)| i)
                    .collect();
                if gold.is_empty() {
                    return Err("none of `answers` is among `entities` (an unlabelled test split?)".into());
                }
                // MeZO's ReCoRDTemplateGPT3: highlights as a list, the query completed by each entity.
                let prompt = format!("{}\n-", passage.replace("@highlight\n", "- "));
                let c = entities.iter().map(|e| format!(" {}", query.replace("@placeholder", e))).collect();
                (prompt, c, gold, vec![], words(passage))
            }
            TaskName::Squad => {
                let (title, ctx, q) = (string(o, "title")?, string(o, "context")?, string(o, "question")?);
                let answers = nested_strings(o, "answers", "text")?;
                let prompt = format!("Title: {title}\nContext: {ctx}\nQuestion: {}\nAnswer:", q.trim());
                (prompt, vec![], vec![], answers, words(ctx))
            }
            TaskName::Drop => {
                let (passage, q) = (string(o, "passage")?, string(o, "question")?);
                let answers = nested_strings(o, "answers_spans", "spans")?;
                let prompt = format!("Passage: {passage}\nQuestion: {}\nAnswer:", q.trim());
                (prompt, vec![], vec![], answers, words(passage))
            }
            TaskName::Custom => {
                let u = self.user.as_ref().expect("custom tasks carry a template (checked in Task::new)");
                return u.render(o);
            }
        };
        Ok(TaskExample { idx: 0, prompt, candidates, gold, answers, words })
    }
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn capitalize_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// MeZO's COPA capitalisation: the choice's first word lower-cased unless it is "I".
fn copa_choice(c: &str) -> String {
    let mut words: Vec<String> = c.split(' ').map(String::from).collect();
    if words[0] != "I" {
        words[0] = words[0].to_lowercase();
    }
    words.join(" ")
}

pub(crate) fn string<'a>(o: &'a Map<String, Value>, f: &str) -> Result<&'a String, String> {
    match o.get(f) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("field `{f}` is {other}, expected a string")),
        None => Err(format!("missing field `{f}`")),
    }
}

/// An integer class label in `0..n`.
pub(crate) fn label(o: &Map<String, Value>, f: &str, n: usize) -> Result<usize, String> {
    let v = o.get(f).ok_or_else(|| format!("missing field `{f}`"))?;
    match v.as_u64() {
        Some(l) if (l as usize) < n => Ok(l as usize),
        _ => Err(format!(
            "field `{f}` is {v}, expected an integer from 0 to {}{}",
            n - 1,
            if v.as_i64() == Some(-1) { " (-1 marks an unlabelled test split)" } else { "" }
        )),
    }
}

/// A list of strings (or one string).
pub(crate) fn strings(o: &Map<String, Value>, f: &str) -> Result<Vec<String>, String> {
    match o.get(f) {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("field `{f}` holds {other}, expected strings")),
            })
            .collect(),
        Some(other) => Err(format!("field `{f}` is {other}, expected a list of strings")),
        None => Err(format!("missing field `{f}`")),
    }
}

/// Reference answers under `f.sub` (HF's `{"text": [...]}` form) or directly in `f`; at least one.
fn nested_strings(o: &Map<String, Value>, f: &str, sub: &str) -> Result<Vec<String>, String> {
    let v = match o.get(f) {
        Some(Value::Object(inner)) => {
            strings(inner, sub).map_err(|e| e.replace(&format!("`{sub}`"), &format!("`{f}.{sub}`")))?
        }
        Some(_) => strings(o, f)?,
        None => return Err(format!("missing field `{f}`")),
    };
    if v.is_empty() {
        return Err(format!(
            "field `{f}` has no answer (an unanswerable question cannot be a training target)"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(task: &str, v: Value) -> Result<TaskExample, String> {
        let Value::Object(o) = v else { panic!() };
        Task::new(task, "mezo", None).unwrap().render(&o)
    }

    /// Each task's prompt and candidates, checked against MeZO's templates (verbalize(c) is
    /// prompt + candidate once MeZO's space stripping is applied).
    #[test]
    fn templates_match_mezo() {
        let e = render("sst2", json!({"sentence": "a gem ", "label": 1})).unwrap();
        assert_eq!((e.prompt.as_str(), e.target().as_str()), ("a gem It was", " great"));

        let e = render("rte", json!({"premise": "P.", "hypothesis": "H", "label": 1})).unwrap();
        assert_eq!(e.prompt, "P.\nDoes this mean that \"H\" is true? Yes or No?\n");
        assert_eq!((e.candidates.clone(), e.label()), (vec!["Yes".to_string(), "No".into()], 1));

        let e = render("cb", json!({"premise": "P.", "hypothesis": "H", "label": 2})).unwrap();
        assert_eq!(e.prompt, "Suppose P. Can we infer that \"H\"? Yes, No, or Maybe?\n");
        assert_eq!(e.target(), "Maybe");

        let e = render("boolq", json!({"passage": "Text.", "question": "is it", "label": 1})).unwrap();
        assert_eq!((e.prompt.as_str(), e.target().as_str()), ("Text. Is it?\n", "Yes"));
        let e = render("boolq", json!({"passage": "Text.", "question": "is it?", "answer": false})).unwrap();
        assert_eq!(e.target(), "No");

        let e = render(
            "wsc",
            json!({"text": "Mark told Pete he won.", "span1_text": "Mark", "span2_text": "He", "label": 1}),
        )
        .unwrap();
        assert_eq!(
            e.prompt,
            "Mark told Pete he won.\nIn the previous sentence, does the pronoun \"he\" refer to Mark? Yes or No?\n"
        );
        assert_eq!(e.target(), "Yes");

        let e = render("wic", json!({"word": "bank", "sentence1": "S1.", "sentence2": "S2.", "label": 0}))
            .unwrap();
        assert_eq!(
            e.prompt,
            "Does the word \"bank\" have the same meaning in these two sentences? Yes, No?\nS1.\nS2.\n"
        );
        assert_eq!(e.target(), "No");

        let e = render("multirc", json!({"paragraph": "P.", "question": "Q?", "answer": "A", "label": 1}))
            .unwrap();
        assert_eq!(e.prompt, "P.\nQuestion: Q?\nI found this answer \"A\". Is that correct? Yes or No?\n");

        let e = render(
            "copa",
            json!({"premise": "The man broke his toe.", "choice1": "He dropped a hammer.",
                   "choice2": "I was there.", "question": "cause", "label": 0}),
        )
        .unwrap();
        assert_eq!(e.prompt, "The man broke his toe because");
        assert_eq!(e.candidates, vec![" he dropped a hammer.".to_string(), " I was there.".into()]);
        let e = render(
            "copa",
            json!({"premise": "It rained.", "choice1": "A", "choice2": "B", "question": "effect", "label": 1}),
        )
        .unwrap();
        assert_eq!((e.prompt.as_str(), e.target().as_str()), ("It rained so", " b"));

        let e = render(
            "record",
            json!({"passage": "Story.\n@highlight\nOne\n@highlight\nTwo", "query": "@placeholder won.",
                   "entities": ["Ann", "Bob", "Cy"], "answers": ["Bob", "Cy"]}),
        )
        .unwrap();
        assert_eq!(e.prompt, "Story.\n- One\n- Two\n-");
        assert_eq!(e.candidates[1], " Bob won.");
        assert_eq!(e.gold, vec![1, 2]);

        let e = render(
            "squad",
            json!({"title": "T", "context": "C.", "question": " Who? ",
                   "answers": {"text": ["Ann", "Ann B"], "answer_start": [0, 0]}}),
        )
        .unwrap();
        assert_eq!(e.prompt, "Title: T\nContext: C.\nQuestion: Who?\nAnswer:");
        assert_eq!((e.answers.len(), e.target().as_str()), (2, " Ann\n"));
        assert!(e.candidates.is_empty());

        let e = render(
            "drop",
            json!({"passage": "P.", "question": "How many?", "answers_spans": {"spans": ["3"], "types": ["number"]}}),
        )
        .unwrap();
        assert_eq!(
            (e.prompt.as_str(), e.target().as_str()),
            ("Passage: P.\nQuestion: How many?\nAnswer:", " 3\n")
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let e = render("rte", json!({"premise": "P", "label": 0})).unwrap_err();
        assert!(e.contains("`hypothesis`"), "{e}");
        let e = render("rte", json!({"premise": "P", "hypothesis": "H", "label": -1})).unwrap_err();
        assert!(e.contains("`label`") && e.contains("unlabelled"), "{e}");
        let e = render("cb", json!({"premise": "P", "hypothesis": "H", "label": 3})).unwrap_err();
        assert!(e.contains("0 to 2"), "{e}");
        let e = render(
            "copa",
            json!({"premise": "P", "choice1": "a", "choice2": "b", "question": "why", "label": 0}),
        )
        .unwrap_err();
        assert!(e.contains("`question`"), "{e}");
        let e = render("record", json!({"passage": "P", "query": "q", "entities": ["A"], "answers": []}))
            .unwrap_err();
        assert!(e.contains("answers"), "{e}");
        let e =
            render("squad", json!({"title": "T", "context": "C", "question": "Q", "answers": {"text": []}}))
                .unwrap_err();
        assert!(e.contains("no answer"), "{e}");
        let e =
            render("squad", json!({"title": "T", "context": "C", "question": "Q", "answers": {"txt": []}}))
                .unwrap_err();
        assert!(e.contains("`answers.text`"), "{e}");
        let e = render("boolq", json!({"passage": "P", "question": "Q"})).unwrap_err();
        assert!(e.contains("`answer`"), "{e}");
        assert!(Task::new("mnli", "mezo", None).unwrap_err().to_string().contains("sst2, rte"));
        assert!(Task::new("rte", "classify", None).is_err());
        assert!(Task::new("custom", "mezo", None).unwrap_err().to_string().contains("--prompt"));
    }

    #[test]
    fn load_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("mezo-tasks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("cb.jsonl");
        std::fs::write(
            &p,
            "{\"idx\": 5, \"premise\": \"P\", \"hypothesis\": \"H\", \"label\": 0}\n\n{\"premise\": \"P\", \"label\": 1}\n",
        )
        .unwrap();
        let e = Task::new("cb", "mezo", None).unwrap().load(&p).unwrap_err().to_string();
        assert!(e.contains("cb.jsonl:3") && e.contains("`hypothesis`"), "{e}");
        std::fs::write(&p, "{\"idx\": 5, \"premise\": \"P\", \"hypothesis\": \"H\", \"label\": 0}\n[1]\n")
            .unwrap();
        let e = Task::new("cb", "mezo", None).unwrap().load(&p).unwrap_err().to_string();
        assert!(e.contains("cb.jsonl:2") && e.contains("not a JSON object"), "{e}");
        std::fs::write(&p, "{\"idx\": 5, \"premise\": \"P\", \"hypothesis\": \"H\", \"label\": 0}\n")
            .unwrap();
        assert_eq!(Task::new("cb", "mezo", None).unwrap().load(&p).unwrap()[0].idx, 5);
    }

    /// SST-2 lines (the checks of the old SST-2-only loader, now through `Task::load`): `idx`
    /// kept or numbered among the examples, blank lines skipped, and each bad line named with its
    /// file, line and field.
    #[test]
    fn sst2_lines_load_and_bad_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("mezo-tasks-sst2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        let sst2 = Task::new("sst2", "mezo", None).unwrap();
        let load = |text: &[u8]| {
            std::fs::write(&p, text).unwrap();
            sst2.load(&p)
        };
        let ex = load(b"{\"idx\": 7, \"sentence\": \"fine\", \"label\": 1}\r\n\n{\"sentence\": \"bad\", \"label\": 0}\n")
            .unwrap();
        assert_eq!((ex.len(), ex[0].idx, ex[1].idx), (2, 7, 1));
        assert_eq!((ex[0].prompt.as_str(), ex[0].label(), ex[1].label()), ("fine It was", 1, 0));
        let e =
            load(b"{\"sentence\": \"x\", \"label\": 0}\n{\"sentence\": \"x\"}\n").unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("`label`"), "{e}");
        let e = load(b"{\"sentence\": \"x\", \"label\": 3}\n").unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("`label`") && e.contains("0 to 1"), "{e}");
        let e = load(b"sentence,label\n").unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("not a JSON object"), "{e}");
        let e = load(b"{\"sentence\": \"x\", \"label\": 0}\n{\"sentence\": \"\xff\", \"label\": 0}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("not UTF-8"), "{e}");
        assert!(load(b"\n \n").unwrap_err().to_string().contains("no examples"));
        let e = sst2.load(Path::new("/nonexistent/x.jsonl")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    }
}
