//! Helpers shared by the end-to-end tests: paths, the `mezo` binary, the Python venv.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The checkout: `$MEZO_REPO_ROOT` where the test binary runs away from where it was built
/// (the GPU machine).
pub fn repo_root() -> PathBuf {
    std::env::var_os("MEZO_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .canonicalize()
        .unwrap()
}

/// The `mezo` binary under test: `$MEZO_BIN`, else the one cargo built beside this test.
pub fn mezo_bin() -> PathBuf {
    std::env::var_os("MEZO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mezo")))
}

/// `../shared/data` beside the checkout (SST-2, GPT-2 BPE files), or `$MEZO_SHARED_DATA`.
pub fn shared_data() -> PathBuf {
    let dir = std::env::var_os("MEZO_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data"));
    assert!(
        dir.join("gpt2-bpe/vocab.json").is_file(),
        "test data not found at {} (set MEZO_SHARED_DATA to the folder holding gpt2-bpe/ and sst2/)",
        dir.display()
    );
    dir
}

/// The Python that has torch and transformers: `$MEZO_PYTHON`, else `python3` on PATH
/// (scripts/test.sh puts the project's venv first).
pub fn python() -> String {
    std::env::var("MEZO_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn run_python(args: &[&str]) -> Output {
    let out = Command::new(python()).args(args).output().expect("python3 runs");
    assert!(out.status.success(), "python {:?} failed:\n{}", args, String::from_utf8_lossy(&out.stderr));
    out
}

pub fn mezo(args: &[&str]) -> Output {
    Command::new(mezo_bin()).args(args).output().expect("mezo runs")
}

/// Runs `mezo` and expects success, returning stdout.
pub fn mezo_ok(args: &[&str]) -> String {
    let out = mezo(args);
    assert!(out.status.success(), "mezo {:?} failed:\n{}", args, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `mezo` and expects failure, returning stderr.
pub fn mezo_err(args: &[&str]) -> String {
    let out = mezo(args);
    assert!(!out.status.success(), "mezo {:?} should have failed", args);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains("panicked"), "mezo {:?} panicked:\n{err}", args);
    err
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
