//! Fuzz harnesses for everything mezo parses from outside the process: model `config.json`,
//! tokenizer files, safetensors and torch `.bin` checkpoints, dataset lines, snapshot files and
//! step-log records.
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
                assert!(ids.iter().all(|&i| (0..=max).contains(&i)), "{text:?} -> {ids:?} (largest id {max})");
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
    if let Ok(ckpt) = mezo_model::checkpoint::Checkpoint::load(&dir) {
        for (name, shape) in ckpt.shapes() {
            assert!(shape.iter().all(|&d| d >= 0), "{name}: {shape:?}");
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

/// A dataset file (`train.jsonl`): examples that load have a sentence and a 0/1 label.
pub fn dataset(data: &[u8]) {
    let dir = scratch();
    write(&dir, "train.jsonl", data);
    if let Ok(examples) = mezo_data::load_jsonl(&dir.join("train.jsonl")) {
        assert!(!examples.is_empty());
        assert!(examples.iter().all(|e| e.label <= 1));
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
