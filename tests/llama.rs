//! The Llama family (Llama 2/3, Qwen2/2.5, Mistral) against HF transformers and PEFT, on tiny
//! random checkpoints that transformers itself created and saved (tests/py/make_llama_fixtures.py):
//! `mezo eval` within 1e-4 of HF in fp32 with equal predictions for every case (grouped-query
//! attention, tied and untied heads, Qwen2's biases, sliding windows, each RoPE scaling, both
//! config formats), bf16 within twice HF's own rounding, a LoRA adapter trained by `mezo train`
//! scored by PEFT as by `mezo eval --adapter`, and a full-parameter run's checkpoint loaded by
//! HF with the scores `mezo eval` gives it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

const CASES: [&str; 6] = [
    "llama_gqa",
    "llama3_tied",
    "llama_linear_old_format",
    "llama_dynamic",
    "qwen2_tied_window",
    "mistral_window",
];
const BF16_CASES: &str = "llama3_tied,mistral_window";
const LIMIT: &str = "16";

/// Made once per test binary (transformers' import and six tiny models: about a minute on 2
/// cores).
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmp_dir("llama-fixtures");
        let _ = std::fs::remove_dir_all(&dir);
        let data = shared_data();
        run_python(&[
            repo_root().join("tests/py/make_llama_fixtures.py").to_str().unwrap(),
            dir.to_str().unwrap(),
            data.join("sst2/validation.jsonl").to_str().unwrap(),
            data.join("gpt2-bpe").to_str().unwrap(),
            "--limit",
            LIMIT,
            "--bf16-cases",
            BF16_CASES,
        ]);
        dir
    })
}

fn validation() -> String {
    shared_data().join("sst2/validation.jsonl").to_string_lossy().into_owned()
}

fn assets() -> PathBuf {
    repo_root().join("crates/mezo-cli/assets")
}

fn eval_json(model: &Path, extra: &[&str]) -> Value {
    let v = validation();
    let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--data", &v, "--limit", LIMIT, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&mezo_ok(&args)).expect("one JSON object on stdout")
}

#[test]
fn scores_match_hf_for_every_llama_family_case() {
    let dir = fixtures();
    for case in CASES {
        for template in ["mezo", "classify"] {
            let model = dir.join(case);
            // Uneven, length-sorted batches: right padding, windows and dynamic RoPE per row.
            let ours = eval_json(&model, &["--template", template, "--batch-size", "5"]);
            let hf = read_json(&model.join(format!("hf_{template}_fp32.json")));
            compare(&format!("{case}/{template}"), &ours, &hf, 1e-4);
        }
    }
}

#[test]
fn bf16_on_cpu_matches_hf() {
    let dir = fixtures();
    for case in BF16_CASES.split(',') {
        let model = dir.join(case);
        let ours = eval_json(&model, &["--dtype", "bf16", "--batch-size", "7"]);
        let hf = read_json(&model.join("hf_mezo_bf16.json"));
        let hf32 = read_json(&model.join("hf_mezo_fp32.json"));
        compare_half(&format!("{case}/bf16/cpu"), &ours, &hf, &hf32);
    }
}

fn train(model: &Path, out: &Path, extra: &[&str]) -> Value {
    let a = assets();
    let mut args: Vec<String> = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        a.join("sst2").to_str().unwrap(),
        "--n-train",
        "32",
        "--n-dev",
        "8",
        "--test-limit",
        "8",
        "--eval-every",
        "0",
        "--batch-size",
        "8",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let stdout = mezo_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    serde_json::from_str(stdout.lines().last().unwrap()).expect("a JSON report")
}

/// HF's (and PEFT's) scores of `model` with `adapter` (or `none`).
fn hf_scores(model: &Path, adapter: &str, out: &Path) -> Value {
    let json = out.join("hf_scores.json");
    run_python(&[
        repo_root().join("tests/py/peft_scores.py").to_str().unwrap(),
        model.to_str().unwrap(),
        adapter,
        &validation(),
        LIMIT,
        "mezo",
        json.to_str().unwrap(),
    ]);
    read_json(&json)
}

fn max_score_diff(a: &Value, b: &Value) -> f64 {
    scores(a).iter().flatten().zip(scores(b).iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// LoRA on a Llama 3 shaped model (one key/value head, head_dim 16, tied head, biases): the
/// adapter has PEFT's module paths and grouped-query shapes, PEFT loads it, and PEFT's scores
/// equal `mezo eval --adapter`'s.
#[test]
fn lora_adapter_loads_in_peft_and_agrees() {
    let model = fixtures().join("llama3_tied");
    let out = tmp_dir("llama-lora");
    let _ = std::fs::remove_dir_all(&out);
    let r = train(
        &model,
        &out,
        &[
            "--steps",
            "12",
            "--lr",
            "5e-2",
            "--directions",
            "2",
            "--lora-targets",
            "q_proj,v_proj,o_proj,down_proj",
        ],
    );
    assert_eq!(r["steps"], 12, "{r}");
    let adapter = out.join("adapter");
    let cfg = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj", "o_proj", "q_proj", "v_proj"]));
    let tensors: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(adapter.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let p = "base_model.model.model.layers.1";
    // q_proj: 32 -> 4 heads x 16; v_proj: 32 -> 1 key/value head x 16; o_proj: 64 -> 32;
    // down_proj: 48 -> 32.
    for (key, shape) in [
        (format!("{p}.self_attn.q_proj.lora_A.weight"), vec![8, 32]),
        (format!("{p}.self_attn.q_proj.lora_B.weight"), vec![64, 8]),
        (format!("{p}.self_attn.v_proj.lora_B.weight"), vec![16, 8]),
        (format!("{p}.self_attn.o_proj.lora_A.weight"), vec![8, 64]),
        (format!("{p}.mlp.down_proj.lora_A.weight"), vec![8, 48]),
    ] {
        let t = tensors.get(&key).unwrap_or_else(|| panic!("{key} missing from the adapter"));
        assert_eq!(t.size(), shape, "{key}");
    }
    assert_eq!(tensors.len(), 2 * 4 * 2, "2 layers x 4 modules x (A, B)");
    let ours = eval_json(&model, &["--adapter", adapter.to_str().unwrap()]);
    let base = eval_json(&model, &[]);
    let peft = hf_scores(&model, adapter.to_str().unwrap(), &out);
    compare("llama3_tied + adapter vs PEFT", &ours, &peft, 1e-4);
    let moved = max_score_diff(&ours, &base);
    eprintln!("the adapter moved scores by up to {moved:.2e}");
    assert!(
        moved > 1e-3,
        "the adapter barely changed the model ({moved}): the comparison would prove nothing"
    );
}

/// A full-parameter run on Qwen2 (biases, a tied head, a windowed layer) writes a checkpoint
/// in HF's layout that transformers loads, with the scores `mezo eval` gives it, and that
/// differs from the base.
#[test]
fn full_parameter_run_writes_a_checkpoint_hf_loads() {
    let base = fixtures().join("qwen2_tied_window");
    let out = tmp_dir("llama-full");
    let _ = std::fs::remove_dir_all(&out);
    let r = train(&base, &out, &["--full", "--steps", "4", "--lr", "1e-3", "--eps", "1e-3"]);
    assert_eq!(r["steps"], 4, "{r}");
    let model = out.join("model");
    let names: Vec<String> = tch::Tensor::read_safetensors(model.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.iter().any(|n| n == "model.layers.0.self_attn.q_proj.bias"), "{names:?}");
    assert!(!names.iter().any(|n| n == "lm_head.weight"), "a tied head is saved once: {names:?}");
    let ours = eval_json(&model, &[]);
    let hf = hf_scores(&model, "none", &out);
    compare("qwen2 full-parameter output vs HF", &ours, &hf, 1e-4);
    let moved = max_score_diff(&ours, &read_json(&base.join("hf_mezo_fp32.json")));
    assert!(moved > 1e-6, "the run left the weights as they were ({moved})");
}

fn scratch(case: &str, name: &str) -> PathBuf {
    let dst = tmp_dir("llama-broken").join(name);
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&fixtures().join(case), &dst);
    dst
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut cfg = read_json(&p);
    edit(&mut cfg);
    std::fs::write(&p, cfg.to_string()).unwrap();
}

#[test]
fn bad_llama_inputs_are_named() {
    let v = validation();
    let eval_err =
        |d: &Path| mezo_err(&["eval", "--model", d.to_str().unwrap(), "--data", &v, "--limit", "2"]);

    let d = scratch("llama_gqa", "yarn");
    edit_config(&d, |c| c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    let e = eval_err(&d);
    assert!(
        e.contains("config.json") && e.contains("rope_parameters") && e.contains("`yarn` is not supported"),
        "{e}"
    );

    let d = scratch("llama_gqa", "kv_heads");
    edit_config(&d, |c| c["num_key_value_heads"] = 3.into());
    let e = eval_err(&d);
    assert!(e.contains("num_key_value_heads") && e.contains("does not divide num_attention_heads 4"), "{e}");

    // Weights that disagree with config.json's grouped-query shapes.
    let d = scratch("llama_gqa", "gqa_shape");
    edit_config(&d, |c| c["num_key_value_heads"] = 4.into());
    let e = eval_err(&d);
    assert!(e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("[16, 32]"), "{e}");

    // A LoRA target the architecture does not have, before any step runs.
    let model = fixtures().join("llama_gqa");
    let a = assets();
    let e = mezo_err(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        a.join("sst2").to_str().unwrap(),
        "--lora-targets",
        "q_proj,fc1",
        "--out",
        tmp_dir("llama-never").to_str().unwrap(),
    ]);
    assert!(e.contains("fc1") && e.contains("llama") && e.contains("gate_proj"), "{e}");

    // An OPT adapter on a Llama model: its modules are named.
    let opt_adapter = tmp_dir("llama-opt-adapter");
    std::fs::create_dir_all(&opt_adapter).unwrap();
    std::fs::write(
        opt_adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["out_proj"]}"#,
    )
    .unwrap();
    let e = mezo_err(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &v,
        "--adapter",
        opt_adapter.to_str().unwrap(),
    ]);
    assert!(e.contains("adapter_config.json") && e.contains("out_proj") && e.contains("o_proj"), "{e}");
}
