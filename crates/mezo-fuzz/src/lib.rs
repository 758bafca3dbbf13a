//! Fuzz harnesses for everything mezo parses from outside the process: model `config.json`,
//! tokenizer files, safetensors and torch `.bin` checkpoints, every task's dataset files,
//! snapshot files and step-log records.
//!
//! Each harness feeds bytes to the real entry point (through a file where the real code reads a
//! file) and checks what must hold for any input: no panic, no abort, and for inputs that parse,
//! the parser's own promises (a log record re-encodes to the same bytes, a snapshot's values
//! have the indexed length, …). An error is a fine outcome; a crash is a bug.
//!
//! `fuzz/` holds the cargo-fuzz targets (nightly, libFuzzer + AddressSanitizer), one per
//! harness; `corpus/<target>/` the minimised corpora they grew and `regressions/<target>/`
//! every input that once crashed. `tests/corpora.rs` replays both on stable in CI.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Every harness by target name, as the fuzz targets and the corpus replay know them.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("config_json", config_json),
    ("tokenizer", tokenizer),
    ("safetensors", safetensors),
    ("torch_bin", torch_bin),
    ("dataset", dataset),
    ("snapshot", snapshot),
    ("log_record", log_record),
];

/// A fresh, empty scratch directory for one input (one per process, reused: fuzzing runs one
/// input at a time).
fn scratch() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("mezo-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    });
    let dir = base.join("input");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch input directory");
    dir
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    let mut f = std::fs::File::create(dir.join(name)).expect("scratch file");
    f.write_all(data).expect("scratch write");
}

/// `config.json` of a model folder: parsed and validated. A config that parses must describe a
/// model whose LoRA matrices can be laid out.
pub fn config_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = mezo_model::ModelConfig::from_json(text, Path::new("config.json")) {
        match &c {
            mezo_model::ModelConfig::Opt(o) => {
                assert!(o.hidden_size > 0 && o.num_attention_heads > 0, "accepted {o:?}");
                assert_eq!(o.head_dim() * o.num_attention_heads, o.hidden_size, "accepted {o:?}");
            }
            mezo_model::ModelConfig::Llama(l) => {
                assert!(l.hidden_size > 0 && l.head_dim > 0 && l.head_dim % 2 == 0, "accepted {l:?}");
                assert_eq!(l.num_attention_heads % l.num_key_value_heads, 0, "accepted {l:?}");
                assert_eq!(l.layer_windows.len() as i64, l.num_hidden_layers, "accepted {l:?}");
            }
        }
        let lora = mezo_model::LoraConfig { r: 2, alpha: 4.0, targets: vec![mezo_model::Target::Q] };
        for t in lora.tensors(&c).expect("every architecture has q_proj") {
            assert!(t.numel() > 0, "{t:?}");
        }
    }
}

/// Tokenizer files: the first byte picks the form (`tokenizer.json`, or `vocab.json` +
/// `merges.txt` split at the first 0xFF), an optional `tokenizer_config.json` follows a 0xFE.
/// A tokenizer that loads must encode text to ids of its own vocabulary (ids may be sparse, so
/// the bound is its largest id, which models are checked against: `TextTokenizer::check_fits`).
pub fn tokenizer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (files, config) = match rest.iter().position(|&b| b == 0xFE) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let dir = scratch();
    if mode % 2 == 0 {
        write(&dir, "tokenizer.json", files);
    } else {
        let i = files.iter().position(|&b| b == 0xFF).unwrap_or(files.len());
        write(&dir, "vocab.json", &files[..i]);
        write(&dir, "merges.txt", files.get(i + 1..).unwrap_or(&[]));
    }
    if let Some(c) = config {
        write(&dir, "tokenizer_config.json", c);
    }
    if let Ok(t) = mezo_model::TextTokenizer::from_dir(&dir) {
        for text in ["hello world", " It was great", "ünïcödé \n\t 😀", ""] {
            if let Ok(ids) = t.encode(text) {
                let max = t.max_id();
                assert!(
                    ids.iter().all(|&i| (0..=max).contains(&i)),
                    "{text:?} -> {ids:?} (largest id {max})"
                );
                // A model with room for every id takes this tokenizer; one with less does not.
                assert!(t.check_fits(max + 1).is_ok() && t.check_fits(max).is_err());
            }
        }
    }
}

/// Loads a checkpoint folder holding `file` = `data`; every tensor that loads must have the
/// bytes its shape and dtype imply.
fn checkpoint(file: &str, data: &[u8]) {
    let dir = scratch();
    write(&dir, file, data);
    if let Ok(mut ckpt) = mezo_model::checkpoint::Checkpoint::load(&dir) {
        for (name, shape) in ckpt.shapes().unwrap_or_default() {
            assert!(shape.iter().all(|&d| d >= 0), "{name}: {shape:?}");
            // Safetensors tensors are read when taken: the bytes must be there then. A dtype the
            // model cannot use (integers) is refused by name.
            match ckpt.take(&name, &shape) {
                Ok(t) => assert_eq!(t.size(), shape, "{name}"),
                Err(e) => assert!(e.to_string().contains(&name), "{name}: {e}"),
            }
        }
    }
}

/// `model.safetensors`.
pub fn safetensors(data: &[u8]) {
    checkpoint("model.safetensors", data)
}

/// `pytorch_model.bin` (a torch.save zip with a pickle mezo interprets, never executes).
pub fn torch_bin(data: &[u8]) {
    checkpoint("pytorch_model.bin", data)
}

/// A task's JSONL file through `Task::load`, the loader every run reads its data with. The
/// first byte picks the task, `TASK_NAMES[b % 12]`, and SST-2's template by `b / 12` (even
/// `mezo`, odd `classify`). For `custom` the user template follows, up to the first 0x00, as
/// 0xFF-separated parts: prompt, candidates field, label field, answer field, then the fixed
/// candidates (what `--prompt`, `--candidates-field`, `--label-field`, `--answer-field` and
/// `--candidate` give). The rest is the file.
///
/// A template `Task::new` refuses is a configuration error. A file that loads gives one example
/// per non-blank line, each one the model can score ([`check_example`]). A file that does not
/// is refused at a line that has text, named with the file and its number: that line alone fails
/// the same way, and the lines before it load.
pub fn dataset(data: &[u8]) {
    use mezo_data::{DataError, Task};
    let Some(DatasetInput { name, template, user, file }) = DatasetInput::split(data) else { return };
    let task = match Task::new(name, template, user) {
        Ok(t) => t,
        Err(e) => {
            assert!(name == "custom" && matches!(e, DataError::Config(_)), "{name}: {e}");
            return;
        }
    };
    let dir = scratch();
    let path = dir.join("train.jsonl");
    write(&dir, "train.jsonl", file);
    let lines: Vec<&[u8]> = file.split(|&b| b == b'\n').collect();
    let blank = |l: &[u8]| std::str::from_utf8(l).is_ok_and(|t| t.trim().is_empty());
    let texts = lines.iter().filter(|l| !blank(l)).count();
    match task.load(&path) {
        Ok(examples) => {
            assert_eq!(examples.len(), texts, "one example per non-blank line");
            for ex in &examples {
                check_example(&task, ex);
            }
        }
        Err(DataError::Empty { path: p }) => {
            assert_eq!((p, texts), (path, 0));
        }
        Err(e @ DataError::Line { .. }) => {
            let shown = e.to_string();
            let DataError::Line { path: p, line, message } = e else { unreachable!() };
            assert_eq!(p, path);
            assert!(shown.starts_with(&format!("{}:{line}: ", path.display())), "{shown}");
            assert!((1..=lines.len()).contains(&line) && !blank(lines[line - 1]), "{shown}");
            assert!(!message.is_empty());
            // The named line alone fails with the same message, now as line 1.
            write(&dir, "line.jsonl", lines[line - 1]);
            match task.load(&dir.join("line.jsonl")) {
                Err(DataError::Line { line: 1, message: m, .. }) => assert_eq!(m, message),
                other => panic!("{shown}, but the line alone gives {other:?}"),
            }
            // Every line before it loads.
            let before: usize = lines[..line - 1].iter().map(|l| l.len() + 1).sum();
            write(&dir, "before.jsonl", &file[..before]);
            match task.load(&dir.join("before.jsonl")) {
                Ok(ex) => assert_eq!(ex.len(), lines[..line - 1].iter().filter(|l| !blank(l)).count()),
                Err(DataError::Empty { .. }) => {}
                Err(other) => panic!("{shown}, but a line before it fails: {other}"),
            }
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}

/// The parts of a [`dataset`] input.
pub struct DatasetInput<'a> {
    pub name: &'static str,
    pub template: &'static str,
    pub user: Option<mezo_data::UserTemplate>,
    pub file: &'a [u8],
}

impl<'a> DatasetInput<'a> {
    /// `None` for an empty input or a template part that is not UTF-8.
    pub fn split(data: &'a [u8]) -> Option<Self> {
        use mezo_data::TASK_NAMES;
        let (&pick, rest) = data.split_first()?;
        let name = TASK_NAMES[pick as usize % TASK_NAMES.len()];
        let classify = name == "sst2" && (pick as usize / TASK_NAMES.len()) % 2 == 1;
        let template = if classify { "classify" } else { "mezo" };
        if name != "custom" {
            return Some(DatasetInput { name, template, user: None, file: rest });
        }
        let i = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let user = user_template(&rest[..i])?;
        Some(DatasetInput { name, template, user: Some(user), file: rest.get(i + 1..).unwrap_or(&[]) })
    }
}

/// A user template from the `custom` harness's header (`None` where a part is not UTF-8, which
/// neither a command line nor a run spec can carry).
fn user_template(header: &[u8]) -> Option<mezo_data::UserTemplate> {
    let parts: Vec<String> = header
        .split(|&b| b == 0xFF)
        .map(|p| std::str::from_utf8(p).map(String::from))
        .collect::<Result<_, _>>()
        .ok()?;
    let part = |i: usize| parts.get(i).cloned().unwrap_or_default();
    Some(mezo_data::UserTemplate {
        prompt: part(0),
        candidates_field: part(1),
        label_field: part(2),
        answer_field: part(3),
        candidates: parts.get(4..).unwrap_or(&[]).to_vec(),
    })
}

/// What a loaded example promises the trainer and the evaluator: a prompt without trailing
/// spaces (MeZO's convention; a candidate brings its own); for a candidate task at least two
/// candidates, each with text to score, and gold indices among them, ascending and distinct;
/// for a generation task references and a newline-ended target. Its scoring rows (here with one
/// token per character) begin with the prompt's tokens and score at least one token each.
pub fn check_example(task: &mezo_data::Task, ex: &mezo_data::TaskExample) {
    assert!(!ex.prompt.ends_with(' '), "{ex:?}");
    if task.is_generation() {
        assert!(ex.candidates.is_empty() && ex.gold.is_empty() && !ex.answers.is_empty(), "{ex:?}");
        assert!(ex.target().ends_with('\n'), "{ex:?}");
    } else {
        assert!(ex.candidates.len() >= 2 && ex.answers.is_empty(), "{ex:?}");
        assert!(!ex.gold.is_empty() && ex.gold.iter().all(|&g| g < ex.candidates.len()), "{ex:?}");
        assert!(ex.gold.windows(2).all(|w| w[0] < w[1]), "{ex:?}");
        assert_eq!(ex.target(), ex.candidates[ex.label()]);
    }
    let mut chars = |s: &str| Ok::<_, ()>(s.chars().map(|c| c as i64).collect::<Vec<_>>());
    let prompt = chars(&ex.prompt).unwrap();
    let rows = mezo_data::task_rows(ex, &mut chars).unwrap();
    assert_eq!(rows.len(), ex.candidates.len().max(1));
    for r in &rows {
        assert_eq!((r.answer_start, &r.tokens[..r.answer_start]), (prompt.len(), &prompt[..]), "{ex:?}");
        assert!(r.tokens.len() > r.answer_start, "an answer with nothing to score: {ex:?}");
    }
}

/// A snapshot: its index entry (JSON, up to the first 0x00) and its file's bytes (the rest),
/// through the checks recovery makes before it trusts the bytes as a run's LoRA values.
pub fn snapshot(data: &[u8]) {
    let i = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (entry, file) = (&data[..i], data.get(i + 1..).unwrap_or(&[]));
    let Ok(e) = mezo_store::IndexEntry::parse(7, entry) else { return };
    assert_eq!(e.file_name, "step-00000000000000000007.snap");
    if e.check(file).is_err() {
        return;
    }
    for expected in [file.len() / 4, file.len() / 4 + 1] {
        match mezo_train::trainer::flat_values_from_bytes(file, expected) {
            Ok(v) => assert!(v.len() == expected && file.len() == 4 * expected),
            Err(_) => assert!(file.len() != 4 * expected),
        }
    }
}

/// A step-log record: one that decodes re-encodes to exactly its bytes (one encoding per
/// record, so replay reads back what was written, bit for bit).
pub fn log_record(data: &[u8]) {
    if let Ok(rec) = mezo_store::StepRecord::decode(data) {
        assert_eq!(rec.encode(), data, "{rec:?}");
    }
}
