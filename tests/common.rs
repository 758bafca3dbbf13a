//! Helpers shared by the end-to-end tests: paths, the `mezo` binary, the Python venv.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

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

/// A scratch directory for test outputs: `$MEZO_TEST_TMPDIR/name`, else under cargo's target tmp.
pub fn tmp_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("MEZO_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    base.join(name)
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `mezo eval --json` output against HF's scores of the same examples: every score within
/// `tol`, every prediction and the accuracy equal.
pub fn compare(case: &str, ours: &Value, hf: &Value, tol: f64) {
    let (o, h) = (ours["per_example"].as_array().unwrap(), hf["per_example"].as_array().unwrap());
    assert_eq!(o.len(), h.len(), "{case}: example count");
    assert_eq!(ours["examples"], hf["examples"], "{case}");
    let mut worst = 0.0f64;
    for (a, b) in o.iter().zip(h) {
        assert_eq!(a["idx"], b["idx"], "{case}");
        assert_eq!(a["label"], b["label"], "{case}");
        let (sa, sb) = (a["scores"].as_array().unwrap(), b["scores"].as_array().unwrap());
        assert_eq!(sa.len(), 2);
        for (x, y) in sa.iter().zip(sb) {
            let d = (x.as_f64().unwrap() - y.as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d <= tol, "{case} idx {}: score {x} vs HF {y} (|diff| {d:e} > {tol:e})", a["idx"]);
        }
        assert_eq!(a["pred"], b["pred"], "{case} idx {}: prediction differs from HF", a["idx"]);
    }
    let acc = (ours["accuracy"].as_f64().unwrap() - hf["accuracy"].as_f64().unwrap()).abs();
    assert!(acc < 1e-12, "{case}: accuracy differs");
    eprintln!("{case}: {} examples, worst |score diff| {worst:.2e}", o.len());
}

pub fn scores(v: &Value) -> Vec<Vec<f64>> {
    v["per_example"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect())
        .collect()
}

/// Half-precision parity. Our half-precision scores and HF's are two roundings of the same fp32
/// computation by different kernels; each lies within HF's own rounding distance `d` (the
/// largest |HF half - HF fp32| over all scores) of fp32, so they must agree within `2d`.
/// Predictions must agree wherever HF's candidate gap exceeds that bound (closer calls are
/// decided by rounding, in HF as in us).
pub fn compare_half(case: &str, ours: &Value, hf_half: &Value, hf_fp32: &Value) {
    let (o, h, f) = (scores(ours), scores(hf_half), scores(hf_fp32));
    let d = h.iter().flatten().zip(f.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let tol = 2.0 * d;
    let mut worst = 0.0f64;
    let mut decided = 0;
    for (i, (os, hs)) in o.iter().zip(&h).enumerate() {
        for (a, b) in os.iter().zip(hs) {
            worst = worst.max((a - b).abs());
        }
        let gap = (hs[0] - hs[1]).abs();
        if gap > 2.0 * tol {
            decided += 1;
            let (po, ph) = (os[1] > os[0], hs[1] > hs[0]);
            assert_eq!(po, ph, "{case} example {i}: prediction differs (HF gap {gap:.3e})");
        }
    }
    eprintln!("{case}: HF half vs fp32 d = {d:.3e}; ours vs HF half worst {worst:.3e} (bound {tol:.3e}); {decided}/{} predictions compared", o.len());
    assert!(d < 0.5, "{case}: HF's own half-precision error {d} is implausibly large");
    assert!(worst <= tol, "{case}: |ours - HF| = {worst:.3e} exceeds 2d = {tol:.3e}");
}
