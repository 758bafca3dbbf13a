//! `mezo train` and `mezo demo` end to end: determinism, PEFT export read back by Python `peft`,
//! skipped non-finite steps, full-parameter and first-order runs, and the demo's learning claim.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn assets() -> PathBuf {
    repo_root().join("crates/mezo-cli/assets")
}

fn tmp(name: &str) -> PathBuf {
    let base = std::env::var_os("MEZO_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let d = base.join("train").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A short LoRA run on the bundled model; returns the report.
fn train(out: &Path, extra: &[&str]) -> Value {
    let a = assets();
    let mut args = vec![
        "train".to_string(),
        "--model".into(),
        a.join("opt-mini").to_string_lossy().into(),
        "--data-dir".into(),
        a.join("sst2").to_string_lossy().into(),
        "--steps".into(),
        "12".into(),
        "--n-train".into(),
        "64".into(),
        "--n-dev".into(),
        "32".into(),
        "--test-limit".into(),
        "32".into(),
        "--eval-every".into(),
        "6".into(),
        "--lr".into(),
        "1e-3".into(),
        "--directions".into(),
        "2".into(),
        "--out".into(),
        out.to_string_lossy().into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let stdout = mezo_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    serde_json::from_str(stdout.lines().last().unwrap()).expect("a JSON report")
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn same_seed_same_bits_other_seed_other_bits() {
    let (a, b, c) = (tmp("seed-a"), tmp("seed-b"), tmp("seed-c"));
    let ra = train(&a, &["--seed", "3"]);
    train(&b, &["--seed", "3"]);
    train(&c, &["--seed", "4"]);
    let f = "adapter/adapter_model.safetensors";
    assert_eq!(bytes(&a.join(f)), bytes(&b.join(f)), "same seed must give a bit-identical adapter");
    assert_ne!(bytes(&a.join(f)), bytes(&c.join(f)), "another seed must give another adapter");
    for k in ["steps", "final_train_loss", "best_dev_accuracy", "test_accuracy", "seconds"] {
        assert!(ra.get(k).is_some(), "report lacks {k}: {ra}");
    }
    assert_eq!(ra["steps"], 12);
    // The step log has one line a step, with dev accuracy where evaluated.
    let log = std::fs::read_to_string(a.join("train_log.jsonl")).unwrap();
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12);
    assert!(lines[5]["dev_accuracy"].is_number() && lines[4]["dev_accuracy"].is_null());
}

#[test]
fn peft_loads_the_adapter_and_agrees_with_mezo_eval() {
    // A base checkpoint written by transformers itself, and an adapter trained on it by mezo.
    let base = tmp("peft-base");
    let data = shared_data();
    run_python(&[
        repo_root().join("tests/py/make_parity_fixtures.py").to_str().unwrap(),
        base.to_str().unwrap(),
        data.join("sst2/validation.jsonl").to_str().unwrap(),
        data.join("gpt2-bpe").to_str().unwrap(),
        "--limit",
        "2",
        "--cases",
        "pre_safetensors",
    ]);
    let model = base.join("pre_safetensors");
    let out = tmp("peft-run");
    let a = assets();
    mezo_ok(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        a.join("sst2").to_str().unwrap(),
        "--steps",
        "20",
        "--n-train",
        "64",
        "--n-dev",
        "16",
        "--test-limit",
        "8",
        "--eval-every",
        "0",
        "--lr",
        "5e-2",
        "--lora-targets",
        "q_proj,v_proj,fc1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let adapter = out.join("adapter");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    let validation = data.join("sst2/validation.jsonl");
    let ours: Value = serde_json::from_str(&mezo_ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        validation.to_str().unwrap(),
        "--limit",
        "16",
        "--json",
    ]))
    .unwrap();
    let base_scores: Value = serde_json::from_str(&mezo_ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        validation.to_str().unwrap(),
        "--limit",
        "16",
        "--json",
    ]))
    .unwrap();
    let peft_json = out.join("peft.json");
    run_python(&[
        repo_root().join("tests/py/peft_scores.py").to_str().unwrap(),
        model.to_str().unwrap(),
        adapter.to_str().unwrap(),
        validation.to_str().unwrap(),
        "16",
        "mezo",
        peft_json.to_str().unwrap(),
    ]);
    let peft: Value = serde_json::from_str(&std::fs::read_to_string(&peft_json).unwrap()).unwrap();
    let (o, p, b) = (&ours["per_example"], &peft["per_example"], &base_scores["per_example"]);
    let mut worst = 0.0f64;
    let mut moved = 0.0f64;
    for i in 0..16 {
        for c in 0..2 {
            let (x, y, z) = (
                o[i]["scores"][c].as_f64().unwrap(),
                p[i]["scores"][c].as_f64().unwrap(),
                b[i]["scores"][c].as_f64().unwrap(),
            );
            worst = worst.max((x - y).abs());
            moved = moved.max((x - z).abs());
        }
        assert_eq!(o[i]["pred"], p[i]["pred"], "example {i}: prediction differs from PEFT");
    }
    eprintln!("mezo eval --adapter vs PEFT: worst |diff| {worst:.2e}; the adapter moved scores by up to {moved:.2e}");
    assert!(worst <= 1e-4, "scores differ from PEFT's by {worst}");
    assert!(
        moved > 1e-3,
        "the adapter barely changed the model ({moved}): the comparison would prove nothing"
    );
}

/// MeZO's prefix mode end to end on base checkpoints written by transformers (pre- and
/// post-LayerNorm OPT): a full-batch run lowers its training loss, the exported adapter is PEFT's
/// PREFIX_TUNING format, and PEFT's scores with it equal `mezo eval --adapter`'s.
#[test]
fn prefix_runs_learn_and_peft_loads_the_prefix() {
    let base = tmp("prefix-base");
    let data = shared_data();
    run_python(&[
        repo_root().join("tests/py/make_parity_fixtures.py").to_str().unwrap(),
        base.to_str().unwrap(),
        data.join("sst2/validation.jsonl").to_str().unwrap(),
        data.join("gpt2-bpe").to_str().unwrap(),
        "--limit",
        "2",
        "--cases",
        "pre_safetensors,post_bin",
    ]);
    let validation = data.join("sst2/validation.jsonl");
    let scores = |model: &Path, adapter: Option<&Path>| -> Value {
        let mut args =
            vec!["eval", "--model", model.to_str().unwrap(), "--data", validation.to_str().unwrap()];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        args.extend(["--limit", "12", "--json"]);
        serde_json::from_str(&mezo_ok(&args)).unwrap()
    };
    for (case, steps) in [("pre_safetensors", "40"), ("post_bin", "3")] {
        let model = base.join(case);
        let out = tmp(&format!("prefix-{case}"));
        let a = assets();
        // The whole training set in every batch, so the loss of one step compares with another's.
        mezo_ok(&[
            "train",
            "--mode",
            "prefix",
            "--num-prefix",
            "5",
            "--model",
            model.to_str().unwrap(),
            "--data-dir",
            a.join("sst2").to_str().unwrap(),
            "--steps",
            steps,
            "--n-train",
            "16",
            "--batch-size",
            "16",
            "--n-dev",
            "16",
            "--test-limit",
            "8",
            "--eval-every",
            "0",
            "--lr",
            "1e-2",
            "--directions",
            "4",
            "--out",
            out.to_str().unwrap(),
        ]);
        if case == "pre_safetensors" {
            let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
            let l: Vec<f64> = log
                .lines()
                .map(|x| serde_json::from_str::<Value>(x).unwrap()["loss"].as_f64().unwrap())
                .collect();
            let (first, last) = (l[..5].iter().sum::<f64>() / 5.0, l[35..].iter().sum::<f64>() / 5.0);
            eprintln!("prefix run: loss {first:.4} -> {last:.4}");
            assert!(last < first - 0.01, "the prefix run did not lower its loss: {first} -> {last}");
        }
        let adapter = out.join("adapter");
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["peft_type"], "PREFIX_TUNING");
        assert_eq!(cfg["num_virtual_tokens"], 5);
        assert_eq!(cfg["prefix_projection"], false);
        let ours = scores(&model, Some(&adapter));
        let plain = scores(&model, None);
        let peft_json = out.join("peft.json");
        run_python(&[
            repo_root().join("tests/py/peft_scores.py").to_str().unwrap(),
            model.to_str().unwrap(),
            adapter.to_str().unwrap(),
            validation.to_str().unwrap(),
            "12",
            "mezo",
            peft_json.to_str().unwrap(),
        ]);
        let peft: Value = serde_json::from_str(&std::fs::read_to_string(&peft_json).unwrap()).unwrap();
        let (o, p, b) = (&ours["per_example"], &peft["per_example"], &plain["per_example"]);
        let (mut worst, mut moved) = (0.0f64, 0.0f64);
        for i in 0..12 {
            for c in 0..2 {
                let x = o[i]["scores"][c].as_f64().unwrap();
                worst = worst.max((x - p[i]["scores"][c].as_f64().unwrap()).abs());
                moved = moved.max((x - b[i]["scores"][c].as_f64().unwrap()).abs());
            }
            assert_eq!(o[i]["pred"], p[i]["pred"], "{case} example {i}: prediction differs from PEFT");
        }
        eprintln!(
            "{case}: mezo eval --adapter (prefix) vs PEFT: worst |diff| {worst:.2e}; moved {moved:.2e}"
        );
        assert!(worst <= 1e-4, "{case}: scores differ from PEFT's by {worst}");
        assert!(moved > 1e-3, "{case}: the prefix barely changed the model ({moved})");
    }
}

#[test]
fn non_finite_losses_are_skipped_and_counted() {
    let out = tmp("nan");
    // A perturbation this large overflows float32: every loss is NaN or infinite.
    let r = train(&out, &["--eps", "1e38", "--steps", "5", "--eval-every", "0"]);
    assert_eq!(r["skipped_steps"], 5, "{r}");
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"skipped\":true")).count(), 5);
    // Nothing was applied: the adapter is PEFT's initialisation (B = 0), so scores equal the base's.
    assert_eq!(r["test_accuracy"], r["zero_shot_accuracy"]);
}

#[test]
fn full_parameter_and_first_order_runs() {
    let out = tmp("full");
    let r = train(
        &out,
        &["--full", "--full-patterns", "fc1,fc2", "--lr", "1e-4", "--eps", "1e-3", "--steps", "4"],
    );
    assert_eq!(r["steps"], 4);
    // The trained model is a checkpoint `mezo eval` loads.
    let model = out.join("model");
    assert!(model.join("model.safetensors").is_file() && model.join("config.json").is_file());
    let ev: Value = serde_json::from_str(&mezo_ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        assets().join("sst2/validation.jsonl").to_str().unwrap(),
        "--limit",
        "8",
        "--json",
    ]))
    .unwrap();
    assert_eq!(ev["examples"], 8);
    // Adam's extra memory is what --help says: two float32 buffers the size of the trained
    // parameters, first-order (LoRA and full) and zeroth-order alike.
    for (name, extra) in [
        ("fo-lora", vec!["--optimizer", "adam", "--lr", "1e-2"]),
        ("fo-full", vec!["--optimizer", "adam", "--lr", "1e-3", "--full", "--full-patterns", "fc2"]),
        ("zo-adam", vec!["--optimizer", "zo-adam", "--full", "--full-patterns", "fc2", "--eps", "1e-3"]),
        ("zo-momentum", vec!["--optimizer", "zo-momentum"]),
    ] {
        let out = tmp(name);
        let mut args = extra.clone();
        args.extend(["--steps", "4", "--eval-every", "0"]);
        let r = train(&out, &args);
        let params = r["trainable_params"].as_i64().unwrap();
        let buffers = if name == "zo-momentum" { 1 } else { 2 };
        assert_eq!(r["optimizer_state_bytes"].as_i64().unwrap(), buffers * 4 * params, "{name}: {r}");
        let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
        for line in log.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(v["loss"].as_f64().unwrap().is_finite(), "{name}: {line}");
        }
    }
}

#[test]
fn bad_train_arguments_are_named() {
    let a = assets();
    let m = a.join("opt-mini");
    let d = a.join("sst2");
    let base = [
        "train",
        "--model",
        m.to_str().unwrap(),
        "--data-dir",
        d.to_str().unwrap(),
        "--out",
        "/tmp/mezo-never",
    ];
    let with = |extra: &[&str]| mezo_err(&[&base[..], extra].concat());
    assert!(with(&["--steps", "0"]).contains("--steps"));
    let e = with(&["--lr=-1"]);
    assert!(e.contains("--lr (lr) must be a positive finite number, got -1"), "{e}");
    // Upper bounds too, with the range named.
    let e = with(&["--batch-size", "100000"]);
    assert!(e.contains("--batch-size (batch_size) must be between 1 and 4096, got 100000"), "{e}");
    let e = with(&["--directions", "5000"]);
    assert!(e.contains("--directions (directions) must be between 1 and 1024"), "{e}");
    let e = with(&["--lora-r", "4096"]);
    assert!(e.contains("--lora-r (lora.r) must be between 1 and 1024"), "{e}");
    assert!(with(&["--lora-targets", "gate_proj"]).contains("gate_proj"));
    assert!(with(&["--optimizer", "lion"]).contains("--optimizer `lion`"));
    assert!(with(&["--distribution", "cauchy"]).contains("cauchy"));
    assert!(with(&["--n-train", "100000"]).contains("100000 train"));
    let e = with(&["--mode", "prefix", "--num-prefix", "0"]);
    assert!(e.contains("--num-prefix (prefix.num_prefix) must be between 1 and 1024, got 0"), "{e}");
    assert!(with(&["--mode", "prefix", "--full"]).contains("--full and --mode prefix"));
    assert!(with(&["--mode", "bitfit"]).contains("--mode `bitfit`"));
    let e = mezo_err(&[
        "train",
        "--model",
        m.to_str().unwrap(),
        "--data-dir",
        "/nonexistent",
        "--out",
        "/tmp/mezo-never",
    ]);
    assert!(e.contains("/nonexistent/train.jsonl"), "{e}");
}

/// The README's claim: the demo beats zero-shot by at least 10 points, on the CPU, in its
/// default (bounded) number of steps.
#[test]
fn demo_learns_sst2() {
    let out = tmp("demo");
    let stdout = mezo_ok(&["demo", "--json", "--out", out.to_str().unwrap()]);
    let r: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let (zs, test) = (r["zero_shot_accuracy"].as_f64().unwrap(), r["test_accuracy"].as_f64().unwrap());
    eprintln!("demo: zero-shot {zs:.4} -> {test:.4} in {:.0}s", r["seconds"].as_f64().unwrap());
    assert!(test >= zs + 0.10, "demo gained {:.2} points, fewer than 10", 100.0 * (test - zs));
}

/// A run on a model split over devices (`--devices cpu,cpu` runs the split's code path here)
/// writes the unsplit run's adapter bit for bit; bad device lists are named.
#[test]
fn a_run_split_over_devices_equals_the_unsplit_run() {
    let (a, b) = (tmp("split-one"), tmp("split-two"));
    train(&a, &["--seed", "3"]);
    train(&b, &["--seed", "3", "--devices", "cpu,cpu"]);
    let f = "adapter/adapter_model.safetensors";
    assert_eq!(bytes(&a.join(f)), bytes(&b.join(f)), "the split run's adapter differs");
    let (model, data, out) = (assets().join("opt-mini"), assets().join("sst2"), tmp("split-bad"));
    for (list, want) in [
        ("cpu,,cpu", "without empty entries"),
        ("cpu,cuda:64", "CUDA device(s)"),
        // More devices than layers (opt-mini has 4).
        ("cpu,cpu,cpu,cpu,cpu", "5 devices for a model of 4 layers"),
    ] {
        #[rustfmt::skip]
        let e = mezo_err(&[
            "train", "--model", model.to_str().unwrap(), "--data-dir", data.to_str().unwrap(),
            "--devices", list, "--steps", "1", "--out", out.to_str().unwrap(),
        ]);
        assert!(e.contains(want), "--devices {list}: {e}");
    }
}

/// `mezo bench train` with a device list: the placement and each device in its JSON line.
#[test]
fn bench_splits_the_model_over_a_device_list() {
    #[rustfmt::skip]
    let out = mezo_ok(&[
        "bench", "train", "--devices", "cpu,cpu", "--dtype", "fp32", "--shape", "125m", "--mode", "lora",
        "--batch", "2", "--seq", "8", "--iters", "1", "--warmup", "0",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["devices"], serde_json::json!(["cpu", "cpu"]), "{v}");
    // 125m: the embeddings (40M parameters) weigh as much as 5-6 layers of 7M.
    assert_eq!(v["placement"], "cpu: layers 0-2; cpu: layers 3-11", "{v}");
    assert!(v["steps_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let e = mezo_err(&["bench", "train", "--devices", "cpu,cpu", "--peer", "x.py"]);
    assert!(e.contains("--peer runs on one device"), "{e}");
}

/// `mezo bench` on the CPU with small shapes (CI has no GPU; no thresholds): one JSON line per
/// configuration with the fields the GPU tables are made of, and the coordinator benchmark's
/// lines for both durability modes.
#[test]
fn bench_prints_one_json_line_per_configuration() {
    for mode in ["lora", "full"] {
        #[rustfmt::skip]
        let out = mezo_ok(&[
            "bench", "train", "--device", "cpu", "--dtype", "fp32", "--shape", "125m", "--mode", mode,
            "--batch", "2", "--seq", "8", "--iters", "2", "--warmup", "1",
        ]);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["bench"], "train", "{v}");
        assert_eq!(v["mode"], mode, "{v}");
        assert!(v["steps_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["ms_per_step"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    // SST-2's shape: two one-token candidates an example, scored over one shared input row.
    #[rustfmt::skip]
    let out = mezo_ok(&[
        "bench", "train", "--device", "cpu", "--dtype", "fp32", "--shape", "125m", "--mode", "lora",
        "--batch", "2", "--seq", "8", "--iters", "2", "--warmup", "1", "--candidates", "2",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["candidates"], 2, "{v}");
    assert!(v["steps_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let e =
        mezo_err(&["bench", "train", "--device", "cpu", "--batch", "1", "--seq", "4", "--candidates", "1"]);
    assert!(e.contains("--candidates"), "{e}");
    let out = mezo_ok(&[
        "bench", "forward", "--device", "cpu", "--dtype", "fp32", "--batch", "2", "--seq", "8", "--iters",
        "2",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let out = mezo_ok(&["bench", "coordinator", "--iters", "200"]);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6, "{out}");
    for v in &lines {
        assert!(v["steps_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["steps"].as_u64().unwrap() >= 199, "{v}");
    }
    // A train peer that does not exist is named.
    let e = mezo_err(&[
        "bench",
        "train",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--seq",
        "4",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--peer",
        "/nonexistent/peer.py",
    ]);
    assert!(e.contains("/nonexistent/peer.py"), "{e}");
}
