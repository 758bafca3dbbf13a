//! `mezo eval` against HF transformers on tiny random OPT checkpoints that `transformers`
//! itself created and saved: both OPT variants, every weight format, both tokenizer forms.
//! Every candidate score within 1e-4 of HF's in fp32, every prediction equal.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

const CASES: [&str; 6] = [
    "pre_safetensors",
    "pre_safetensors_sharded",
    "pre_bin",
    "pre_bin_sharded",
    "post_safetensors",
    "post_bin",
];
const LIMIT: &str = "24";

fn make_fixtures(dir: &Path, extra: &[&str]) {
    let _ = std::fs::remove_dir_all(dir);
    let data = shared_data();
    let script = repo_root().join("tests/py/make_parity_fixtures.py");
    let mut args = vec![
        script.to_str().unwrap().to_string(),
        dir.to_str().unwrap().to_string(),
        data.join("sst2/validation.jsonl").to_str().unwrap().to_string(),
        data.join("gpt2-bpe").to_str().unwrap().to_string(),
        "--limit".into(),
        LIMIT.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_python(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Fixtures are made once per test binary: creating them imports torch (seconds). HF's scores
/// come in fp32, fp16 and bf16 on the CPU.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmp_dir("parity-fixtures");
        make_fixtures(&dir, &["--dtypes", "fp32,fp16,bf16"]);
        dir
    })
}

fn validation() -> String {
    shared_data().join("sst2/validation.jsonl").to_string_lossy().into_owned()
}

#[test]
fn scores_match_hf_for_every_variant_format_and_template() {
    let dir = fixtures();
    for case in CASES {
        for template in ["mezo", "classify"] {
            let model = dir.join(case);
            // A batch size that does not divide the example count: uneven, length-sorted batches.
            let out = mezo_ok(&[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--task",
                "sst2",
                "--data",
                &validation(),
                "--limit",
                LIMIT,
                "--template",
                template,
                "--batch-size",
                "5",
                "--json",
            ]);
            let ours: Value = serde_json::from_str(&out).expect("one JSON object on stdout");
            let hf: Value = serde_json::from_str(
                &std::fs::read_to_string(model.join(format!("hf_{template}_fp32.json"))).unwrap(),
            )
            .unwrap();
            compare(&format!("{case}/{template}"), &ours, &hf, 1e-4);
        }
    }
}

fn our_scores(model: &Path, template: &str, device: &str, dtype: &str) -> Value {
    let out = mezo_ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &validation(),
        "--limit",
        LIMIT,
        "--template",
        template,
        "--device",
        device,
        "--dtype",
        dtype,
        "--batch-size",
        "7",
        "--json",
    ]);
    serde_json::from_str(&out).expect("one JSON object on stdout")
}

#[test]
fn half_precision_on_cpu_matches_hf() {
    let dir = fixtures();
    for case in ["pre_safetensors", "post_bin"] {
        for dtype in ["bf16", "fp16"] {
            let model = dir.join(case);
            let ours = our_scores(&model, "mezo", "cpu", dtype);
            let hf = read_json(&model.join(format!("hf_mezo_{dtype}.json")));
            let hf32 = read_json(&model.join("hf_mezo_fp32.json"));
            compare_half(&format!("{case}/{dtype}/cpu"), &ours, &hf, &hf32);
        }
    }
}

/// On a CUDA machine: `cargo test --release -- --ignored` (or the carried test binary with
/// MEZO_BIN, MEZO_REPO_ROOT and MEZO_SHARED_DATA set).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_hf_fp32_and_bf16() {
    let dir = tmp_dir("parity-fixtures-cuda");
    make_fixtures(
        &dir,
        &["--device", "cuda", "--dtypes", "fp32,bf16", "--cases", "pre_safetensors,post_bin"],
    );
    for case in ["pre_safetensors", "post_bin"] {
        for template in ["mezo", "classify"] {
            let model = dir.join(case);
            let hf32 = read_json(&model.join(format!("hf_{template}_fp32.json")));
            let ours = our_scores(&model, template, "cuda", "fp32");
            compare(&format!("{case}/{template}/cuda/fp32"), &ours, &hf32, 1e-4);
            let ours = our_scores(&model, template, "cuda", "bf16");
            let hf = read_json(&model.join(format!("hf_{template}_bf16.json")));
            compare_half(&format!("{case}/{template}/cuda/bf16"), &ours, &hf, &hf32);
        }
    }
}

#[test]
fn human_summary_without_json() {
    let model = fixtures().join("pre_safetensors");
    let out = mezo_ok(&["eval", "--model", model.to_str().unwrap(), "--data", &validation(), "--limit", "4"]);
    assert!(out.contains("accuracy") && out.contains("4 examples"), "{out}");
}

fn eval_err(model: &Path) -> String {
    mezo_err(&["eval", "--model", model.to_str().unwrap(), "--data", &validation(), "--limit", "2"])
}

/// A scratch copy of a fixture to break.
fn scratch(case: &str, name: &str) -> PathBuf {
    let dst = tmp_dir("broken").join(name);
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&fixtures().join(case), &dst);
    dst
}

fn edit_config(dir: &Path, key: &str, value: Value) {
    let p = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&p, cfg.to_string()).unwrap();
}

fn truncate(path: &Path, keep: usize) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..keep.min(bytes.len())]).unwrap();
}

#[test]
fn bad_checkpoints_are_named() {
    // Missing config.json.
    let d = scratch("pre_safetensors", "no_config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    let e = eval_err(&d);
    assert!(e.contains("config.json") && e.contains("No such file"), "{e}");

    // Unsupported model_type: the message names the file and the accepted types.
    let d = scratch("pre_safetensors", "gpt_neox");
    edit_config(&d, "model_type", "gpt_neox".into());
    let e = eval_err(&d);
    assert!(
        e.contains("model_type `gpt_neox` is not supported")
            && e.contains("config.json")
            && e.contains("opt, llama, qwen2, mistral"),
        "{e}"
    );

    // A shape that disagrees with config.json.
    let d = scratch("pre_safetensors", "shape");
    edit_config(&d, "ffn_dim", 65.into());
    let e = eval_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("model.decoder.layers.0.fc1.weight")
            && e.contains("[65, 32]")
            && e.contains("[64, 32]"),
        "{e}"
    );

    // A tensor the config requires is absent.
    let e = eval_err(&fixtures().join("bad_missing_tensor"));
    assert!(e.contains("model.decoder.layers.1.fc2.weight") && e.contains("model.safetensors"), "{e}");

    // No weights at all.
    let d = scratch("pre_safetensors", "no_weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = eval_err(&d);
    assert!(e.contains("no weights found") && e.contains("no_weights"), "{e}");

    // Corrupt safetensors (truncated).
    let d = scratch("pre_safetensors", "corrupt_st");
    truncate(&d.join("model.safetensors"), 1000);
    let e = eval_err(&d);
    assert!(e.contains("model.safetensors") && e.contains("corrupt"), "{e}");

    // Corrupt .bin (truncated zip).
    let d = scratch("pre_bin", "corrupt_bin");
    truncate(&d.join("pytorch_model.bin"), 5000);
    let e = eval_err(&d);
    assert!(e.contains("pytorch_model.bin") && e.contains("corrupt"), "{e}");

    // A shard named by the index is missing.
    let d = scratch("pre_safetensors_sharded", "missing_shard");
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = eval_err(&d);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");

    // No tokenizer files.
    let d = scratch("pre_safetensors", "no_tokenizer");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::remove_file(d.join(f)).unwrap();
    }
    let e = eval_err(&d);
    assert!(e.contains("no tokenizer found") && e.contains("vocab.json"), "{e}");

    // A corrupt tokenizer.json.
    let d = scratch("post_safetensors", "bad_tokenizer_json");
    truncate(&d.join("tokenizer.json"), 100);
    let e = eval_err(&d);
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn bad_arguments_are_named() {
    let model = fixtures().join("pre_safetensors");
    let m = model.to_str().unwrap();
    let v = validation();
    let e = mezo_err(&["eval", "--model", m, "--data", &v, "--dtype", "fp8"]);
    assert!(e.contains("dtype `fp8`") && e.contains("fp32, fp16 or bf16"), "{e}");
    let e = mezo_err(&["eval", "--model", m, "--data", &v, "--device", "tpu"]);
    assert!(e.contains("device `tpu`"), "{e}");
    let e = mezo_err(&["eval", "--model", m, "--data", &v, "--template", "nope"]);
    assert!(e.contains("template `nope`"), "{e}");
    let e = mezo_err(&["eval", "--model", m, "--data", "/nonexistent/data.jsonl"]);
    assert!(e.contains("/nonexistent/data.jsonl"), "{e}");
    let e = mezo_err(&["eval", "--model", m, "--data", &v, "--task", "mnli"]);
    assert!(e.contains("task `mnli`") && e.contains("sst2, rte"), "{e}");
    // A known task on another task's file: the first line and the field it lacks.
    let e = mezo_err(&["eval", "--model", m, "--data", &v, "--task", "rte"]);
    assert!(e.contains("validation.jsonl:1") && e.contains("`premise`"), "{e}");
    let e = mezo_err(&["eval", "--model", "/nonexistent/model", "--data", &v]);
    assert!(e.contains("/nonexistent/model"), "{e}");
}
