//! User tasks: JSONL with the user's own fields, rendered by a template from the run spec.
//!
//! A template is text with `{field}` placeholders (`{a.b}` reaches into an object; `{{` and `}}`
//! are literal braces; `\n`, `\t` and `\\` are escapes, so a shell argument can hold a newline).
//! A task is a classification task with fixed `candidates` (appended to the prompt verbatim:
//! start them with a space where a space belongs) or with a `candidates_field` (a list per line,
//! each candidate after a space unless the prompt ends in whitespace); the gold is the
//! `label_field` (default `label`): a candidate index or a candidate's text. Or it is a
//! generation task with an `answer_field` (a string or a list of references).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tasks::{label, strings, TaskExample};
use crate::DataError;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UserTemplate {
    pub prompt: String,
    #[serde(default)]
    pub candidates: Vec<String>,
    #[serde(default)]
    pub candidates_field: String,
    #[serde(default)]
    pub label_field: String,
    #[serde(default)]
    pub answer_field: String,
}

/// A parsed template: literal text and field paths.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(String),
}

fn parse(template: &str, what: &str) -> Result<Vec<Piece>, DataError> {
    let bad = |m: String| DataError::Config(format!("{what} {template:?}: {m}"));
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => text.push('\n'),
                Some('t') => text.push('\t'),
                Some('\\') => text.push('\\'),
                Some(other) => {
                    text.push('\\');
                    text.push(other);
                }
                None => text.push('\\'),
            },
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) if ch.is_alphanumeric() || ch == '_' || ch == '.' || ch == '-' => {
                            name.push(ch)
                        }
                        Some(ch) => {
                            return Err(bad(format!(
                                "`{ch}` inside a placeholder (write {{field}}, or {{{{ for a literal brace)"
                            )))
                        }
                        None => {
                            return Err(bad("a `{` without its `}` (write {{ for a literal brace)".into()))
                        }
                    }
                }
                if name.is_empty() {
                    return Err(bad("an empty placeholder {}".into()));
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Field(name));
            }
            '}' => return Err(bad("a `}` without its `{` (write }} for a literal brace)".into())),
            _ => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn lookup<'a>(o: &'a Map<String, Value>, path: &str) -> Result<&'a Value, String> {
    let mut parts = path.split('.');
    let first = parts.next().expect("split yields one part");
    let mut v = o.get(first).ok_or_else(|| format!("missing field `{path}`"))?;
    for p in parts {
        v = v.get(p).ok_or_else(|| format!("missing field `{path}`"))?;
    }
    Ok(v)
}

fn fill(pieces: &[Piece], o: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Field(f) => match lookup(o, f)? {
                Value::String(s) => out.push_str(s),
                v @ (Value::Number(_) | Value::Bool(_)) => out.push_str(&v.to_string()),
                v => {
                    return Err(format!(
                        "field `{f}` is {v}; a placeholder takes a string, number or boolean"
                    ))
                }
            },
        }
    }
    Ok(out)
}

impl UserTemplate {
    pub fn is_generation(&self) -> bool {
        !self.answer_field.is_empty()
    }

    /// Checks the template's syntax and that it names exactly one kind of answer.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: &str| Err(DataError::Config(m.into()));
        if self.prompt.trim().is_empty() {
            return bad("the user template's prompt (--prompt) is empty");
        }
        parse(&self.prompt, "--prompt")?;
        for c in &self.candidates {
            parse(c, "--candidate")?;
        }
        let kinds = [!self.candidates.is_empty(), !self.candidates_field.is_empty(), self.is_generation()];
        match kinds.iter().filter(|&&k| k).count() {
            1 => {}
            0 => {
                return bad(
                    "the user template needs its answers: --candidate (repeated), --candidates-field, \
                            or --answer-field for generation",
                )
            }
            _ => {
                return bad(
                    "give only one of --candidate, --candidates-field and --answer-field (a task either \
                            scores candidates or generates)",
                )
            }
        }
        if self.candidates.len() == 1 {
            return bad("one --candidate is no choice: give at least two");
        }
        if let Some(i) = self.candidates.iter().position(String::is_empty) {
            return Err(DataError::Config(format!(
                "--candidate number {} is empty: a candidate needs text for the model to score",
                i + 1
            )));
        }
        if self.is_generation() && !self.label_field.is_empty() {
            return bad(
                "--label-field is for candidate tasks; a generation task's references are --answer-field",
            );
        }
        Ok(())
    }

    fn label_field(&self) -> &str {
        if self.label_field.is_empty() {
            "label"
        } else {
            &self.label_field
        }
    }

    /// One JSON object as an example (the template was validated); the error names the field.
    pub fn render(&self, o: &Map<String, Value>) -> Result<TaskExample, String> {
        let pieces = parse(&self.prompt, "--prompt").map_err(|e| e.to_string())?;
        // MeZO strips the prompt's trailing spaces; a candidate brings its own.
        let prompt = fill(&pieces, o)?.trim_end_matches(' ').to_string();
        let words = prompt.split_whitespace().count();
        let sep = if prompt.ends_with(char::is_whitespace) || prompt.is_empty() { "" } else { " " };
        if self.is_generation() {
            let answers = strings(o, &self.answer_field)?;
            if answers.is_empty() {
                return Err(format!("field `{}` has no reference answer", self.answer_field));
            }
            return Ok(TaskExample { idx: 0, prompt, candidates: vec![], gold: vec![], answers, words });
        }
        let candidates: Vec<String> = if self.candidates.is_empty() {
            let c = strings(o, &self.candidates_field)?;
            if c.len() < 2 {
                return Err(format!(
                    "field `{}` has {} candidate(s), at least 2 needed",
                    self.candidates_field,
                    c.len()
                ));
            }
            let c: Vec<String> = c.iter().map(|c| format!("{sep}{c}")).collect();
            if let Some(i) = c.iter().position(String::is_empty) {
                return Err(format!(
                    "field `{}` holds an empty candidate (number {}) after a prompt that ends in \
                     whitespace: nothing for the model to score",
                    self.candidates_field,
                    i + 1
                ));
            }
            c
        } else {
            let mut c = Vec::with_capacity(self.candidates.len());
            for t in &self.candidates {
                let text = fill(&parse(t, "--candidate").map_err(|e| e.to_string())?, o)?;
                if text.is_empty() {
                    return Err(format!(
                        "--candidate {t:?} is empty for this line (its fields are empty): nothing for \
                         the model to score"
                    ));
                }
                c.push(text);
            }
            c
        };
        let f = self.label_field();
        let gold = match o.get(f) {
            Some(Value::String(s)) => {
                let i = candidates.iter().position(|c| c.trim() == s.trim()).ok_or_else(|| {
                    format!("field `{f}` is {s:?}, which is none of the candidates {candidates:?}")
                })?;
                vec![i]
            }
            _ => vec![label(o, f, candidates.len())?],
        };
        Ok(TaskExample { idx: 0, prompt, candidates, gold, answers: vec![], words })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        let Value::Object(o) = v else { panic!() };
        o
    }

    #[test]
    fn renders_fields_with_escapes() {
        let t = UserTemplate {
            prompt: "Review: {text}\\nScore {meta.stars} {{x}}:".into(),
            candidates: vec![" bad".into(), " good".into()],
            ..Default::default()
        };
        t.validate().unwrap();
        let e = t.render(&obj(json!({"text": "fine", "meta": {"stars": 4}, "label": " good"}))).unwrap();
        assert_eq!(e.prompt, "Review: fine\nScore 4 {x}:");
        assert_eq!((e.gold.clone(), e.target()), (vec![1], " good".to_string()));
        let e = t.render(&obj(json!({"text": "fine", "meta": {"stars": 4}, "label": 0}))).unwrap();
        assert_eq!(e.label(), 0);
        let err = t.render(&obj(json!({"text": "x", "label": 0}))).unwrap_err();
        assert!(err.contains("`meta.stars`"), "{err}");
        let err = t.render(&obj(json!({"text": "x", "meta": {"stars": 1}, "label": "meh"}))).unwrap_err();
        assert!(err.contains("none of the candidates"), "{err}");
        let err = t.render(&obj(json!({"text": ["x"], "meta": {"stars": 1}, "label": 0}))).unwrap_err();
        assert!(err.contains("`text`"), "{err}");
    }

    #[test]
    fn candidates_field_and_generation() {
        let t = UserTemplate {
            prompt: "Q: {q} A:".into(),
            candidates_field: "options".into(),
            label_field: "answer_idx".into(),
            ..Default::default()
        };
        t.validate().unwrap();
        let e = t.render(&obj(json!({"q": "2+2?", "options": ["3", "4", "5"], "answer_idx": 1}))).unwrap();
        assert_eq!(e.candidates, vec![" 3".to_string(), " 4".into(), " 5".into()]);
        assert_eq!(e.label(), 1);
        let g =
            UserTemplate { prompt: "Q: {q}\\nA:".into(), answer_field: "refs".into(), ..Default::default() };
        g.validate().unwrap();
        let e = g.render(&obj(json!({"q": "capital of France?", "refs": ["Paris", "paris"]}))).unwrap();
        assert_eq!((e.prompt.as_str(), e.target().as_str()), ("Q: capital of France?\nA:", " Paris\n"));
    }

    #[test]
    fn bad_templates_are_explained() {
        let v = |t: UserTemplate| t.validate().unwrap_err().to_string();
        let two = vec![" a".to_string(), " b".into()];
        assert!(v(UserTemplate { prompt: "{x".into(), candidates: two.clone(), ..Default::default() })
            .contains("without its `}`"));
        assert!(v(UserTemplate { prompt: "x}".into(), candidates: two.clone(), ..Default::default() })
            .contains("without its `{`"));
        assert!(v(UserTemplate { prompt: "{}".into(), candidates: two.clone(), ..Default::default() })
            .contains("empty placeholder"));
        assert!(v(UserTemplate { prompt: "{x}".into(), ..Default::default() }).contains("--answer-field"));
        assert!(v(UserTemplate {
            prompt: "{x}".into(),
            candidates: two,
            answer_field: "a".into(),
            ..Default::default()
        })
        .contains("only one"));
        assert!(v(UserTemplate { prompt: " ".into(), answer_field: "a".into(), ..Default::default() })
            .contains("empty"));
        // Found by fuzzing (regressions/dataset/empty-fixed-candidate-unscorable): an empty
        // candidate has no token to score; it is refused up front, or at the line that empties it.
        let c = vec![" a".to_string(), String::new()];
        assert!(v(UserTemplate { prompt: "{x}".into(), candidates: c, ..Default::default() })
            .contains("--candidate number 2 is empty"));
        let t = UserTemplate {
            prompt: "{x}".into(),
            candidates: vec![" a".into(), "{y}".into()],
            ..Default::default()
        };
        t.validate().unwrap();
        let err = t.render(&obj(json!({"x": "p", "y": "", "label": 0}))).unwrap_err();
        assert!(err.contains("\"{y}\" is empty"), "{err}");
        let t = UserTemplate { prompt: "{x}\\n".into(), candidates_field: "c".into(), ..Default::default() };
        let err = t.render(&obj(json!({"x": "p", "c": ["a", ""], "label": 0}))).unwrap_err();
        assert!(err.contains("field `c`") && err.contains("number 2"), "{err}");
    }
}
