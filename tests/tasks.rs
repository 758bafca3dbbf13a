//! Tasks beyond SST-2 end to end on the bundled small OPT: every task's JSONL (written here, in
//! the HF datasets' field names) through `mezo eval`; `mezo train` + `mezo eval` on RTE, SQuAD
//! (generation) and a user-template task; the non-differentiable accuracy objective, in one
//! process and through the service; and the messages for bad task arguments.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn assets() -> PathBuf {
    repo_root().join("crates/mezo-cli/assets")
}

fn model() -> String {
    assets().join("opt-mini").to_string_lossy().into()
}

fn tmp(name: &str) -> PathBuf {
    let base = std::env::var_os("MEZO_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let d = base.join("tasks").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_jsonl(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn json_out(args: &[&str]) -> Value {
    let stdout = mezo_ok(args);
    serde_json::from_str(stdout.lines().last().unwrap()).expect("a JSON object")
}

/// Names and places for small reading-comprehension examples.
const NAMES: [&str; 6] = ["Ann", "Bob", "Cy", "Dee", "Eve", "Gus"];
const PLACES: [&str; 5] = ["Paris", "Rome", "Oslo", "Lima", "Baku"];

fn rte_line(i: usize) -> Value {
    let (n, p) = (NAMES[i % 6], PLACES[i % 5]);
    let (h, label) =
        if i.is_multiple_of(2) { (format!("{n} is in {p}."), 0) } else { (format!("{n} is not in {p}."), 1) };
    json!({"idx": i, "premise": format!("{n} went to {p} last week."), "hypothesis": h, "label": label})
}

fn squad_line(i: usize) -> Value {
    let (n, p) = (NAMES[i % 6], PLACES[(i / 2) % 5]);
    json!({"id": format!("q{i}"), "title": "Trips", "context": format!("{n} lives in {p}."),
           "question": format!("Where does {n} live?"), "answers": {"text": [p], "answer_start": [0]}})
}

/// One small file per task, in the HF datasets' fields; returns (task, file, candidates each).
fn task_files(dir: &Path) -> Vec<(&'static str, PathBuf, Option<usize>)> {
    let files: Vec<(&str, Vec<Value>, Option<usize>)> = vec![
        (
            "sst2",
            vec![json!({"sentence": "a fine film", "label": 1}), json!({"sentence": "dull", "label": 0})],
            Some(2),
        ),
        ("rte", (0..3).map(rte_line).collect(), Some(2)),
        (
            "cb",
            vec![
                json!({"premise": "It rained.", "hypothesis": "It was wet.", "label": 2}),
                json!({"premise": "It is sunny.", "hypothesis": "It rains.", "label": 1}),
            ],
            Some(3),
        ),
        (
            "boolq",
            vec![
                json!({"passage": "Cats are mammals.", "question": "are cats mammals", "label": 1}),
                json!({"passage": "Fish swim.", "question": "do fish fly", "answer": false}),
            ],
            Some(2),
        ),
        (
            "wsc",
            vec![
                json!({"text": "Ann thanked Eve because she helped.", "span1_text": "Eve", "span2_text": "she",
                        "span1_index": 2, "span2_index": 4, "label": 1}),
            ],
            Some(2),
        ),
        (
            "wic",
            vec![
                json!({"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank loan.", "label": 0}),
            ],
            Some(2),
        ),
        (
            "multirc",
            vec![
                json!({"paragraph": "Ann lives in Rome.", "question": "Where does Ann live?", "answer": "Rome",
                        "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1}),
            ],
            Some(2),
        ),
        (
            "copa",
            vec![json!({"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                        "choice2": "He got a hole in his sock.", "question": "cause", "idx": 0, "label": 0})],
            Some(2),
        ),
        (
            "record",
            vec![
                json!({"passage": "Ann met Bob in Rome.\n@highlight\nAnn and Bob met", "query": "@placeholder met Bob.",
                        "entities": ["Ann", "Bob", "Rome"], "answers": ["Ann"]}),
            ],
            Some(3),
        ),
        ("squad", (0..2).map(squad_line).collect(), None),
        (
            "drop",
            vec![
                json!({"passage": "Ann scored 3 goals and Bob 2.", "question": "How many goals did Ann score?",
                        "answers_spans": {"spans": ["3"], "types": ["number"]}}),
            ],
            None,
        ),
    ];
    files
        .into_iter()
        .map(|(task, lines, c)| {
            let p = dir.join(format!("{task}.jsonl"));
            write_jsonl(&p, &lines);
            (task, p, c)
        })
        .collect()
}

#[test]
fn every_task_evaluates_from_its_hf_fields() {
    let dir = tmp("eval-all");
    for (task, file, cands) in task_files(&dir) {
        let f = file.to_string_lossy();
        let r = json_out(&[
            "eval",
            "--model",
            &model(),
            "--task",
            task,
            "--data",
            &f,
            "--max-new-tokens",
            "4",
            "--json",
        ]);
        let n = std::fs::read_to_string(&file).unwrap().lines().count() as u64;
        assert_eq!(r["examples"], n, "{task}: {r}");
        let score = r["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{task}: {r}");
        match cands {
            Some(c) => {
                assert_eq!(r["metric"], "accuracy", "{task}");
                assert_eq!(r["per_example"][0]["scores"].as_array().unwrap().len(), c, "{task}: {r}");
            }
            None => {
                assert_eq!(r["metric"], "f1", "{task}");
                let g = r["generations"].as_array().unwrap();
                assert!(g.iter().all(|x| x["prediction"].is_string() && x["f1"].is_number()), "{task}: {r}");
                assert!(r["exact_match"].is_number(), "{task}: {r}");
            }
        }
    }
}

/// A short LoRA run; returns the report.
fn train(data: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args: Vec<String> = [
        "train",
        "--model",
        &model(),
        "--data-dir",
        &data.to_string_lossy(),
        "--out",
        &out.to_string_lossy(),
        "--json",
        "--lora-r",
        "2",
        "--lora-targets",
        "out_proj,fc2",
        "--seed",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    json_out(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn rte_trains_and_eval_reproduces_the_test_accuracy() {
    let dir = tmp("rte");
    write_jsonl(&dir.join("train.jsonl"), &(0..24).map(rte_line).collect::<Vec<_>>());
    write_jsonl(&dir.join("validation.jsonl"), &(24..32).map(rte_line).collect::<Vec<_>>());
    let out = dir.join("out");
    let r = train(
        &dir,
        &out,
        &[
            "--task",
            "rte",
            "--steps",
            "4",
            "--n-train",
            "16",
            "--n-dev",
            "8",
            "--batch-size",
            "4",
            "--eval-every",
            "2",
        ],
    );
    assert_eq!((r["metric"].as_str(), r["steps"].as_u64()), (Some("accuracy"), Some(4)), "{r}");
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    // The best adapter, scored again by `mezo eval`, gives the run's test accuracy.
    let e = json_out(&[
        "eval",
        "--model",
        &model(),
        "--task",
        "rte",
        "--data",
        &dir.join("validation.jsonl").to_string_lossy(),
        "--adapter",
        &out.join("adapter").to_string_lossy(),
        "--json",
    ]);
    assert_eq!(e["examples"], 8);
    assert!(
        (e["accuracy"].as_f64().unwrap() - r["test_accuracy"].as_f64().unwrap()).abs() < 1e-12,
        "{e} {r}"
    );
}

#[test]
fn squad_trains_on_answers_and_scores_generations() {
    let dir = tmp("squad");
    write_jsonl(&dir.join("train.jsonl"), &(0..16).map(squad_line).collect::<Vec<_>>());
    let valid = dir.join("validation.jsonl");
    write_jsonl(&valid, &(16..20).map(squad_line).collect::<Vec<_>>());
    let out = dir.join("out");
    let common =
        ["--task", "squad", "--n-train", "8", "--n-dev", "4", "--batch-size", "4", "--max-new-tokens", "4"];
    // Teacher-forced answer-ce is the default for a generation task.
    let r = train(&dir, &out, &[&common[..], &["--steps", "3", "--eval-every", "0"]].concat());
    assert_eq!(r["metric"], "f1", "{r}");
    assert!(r["final_train_loss"].as_f64().unwrap() > 0.0, "answer cross-entropy is positive: {r}");
    let adapter = out.join("adapter").to_string_lossy().to_string();
    let e = json_out(&[
        "eval",
        "--model",
        &model(),
        "--task",
        "squad",
        "--data",
        &valid.to_string_lossy(),
        "--adapter",
        &adapter,
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert!((e["f1"].as_f64().unwrap() - r["test_accuracy"].as_f64().unwrap()).abs() < 1e-12, "{e} {r}");
    // References set to the model's own greedy outputs for half the examples: exact match 1/2.
    let gens = e["generations"].as_array().unwrap().clone();
    let lines: Vec<Value> = (16..20)
        .zip(&gens)
        .map(|(i, g)| {
            let mut l = squad_line(i);
            if i.is_multiple_of(2) {
                l["answers"]["text"] = json!([g["prediction"].as_str().unwrap().to_uppercase() + "."]);
            }
            l
        })
        .collect();
    let own = dir.join("own.jsonl");
    write_jsonl(&own, &lines);
    let e2 = json_out(&[
        "eval",
        "--model",
        &model(),
        "--task",
        "squad",
        "--data",
        &own.to_string_lossy(),
        "--adapter",
        &adapter,
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(e2["exact_match"].as_f64().unwrap(), 0.5, "{e2}");
    // The non-differentiable F1 objective trains too: -F1 per forward, in [-1, 0].
    let out2 = dir.join("out-f1");
    let r2 =
        train(&dir, &out2, &[&common[..], &["--steps", "2", "--eval-every", "0", "--loss", "f1"]].concat());
    let log = std::fs::read_to_string(out2.join("train_log.jsonl")).unwrap();
    for l in log.lines() {
        let loss = serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64().unwrap();
        assert!((-1.0..=0.0).contains(&loss), "an F1 objective of {loss}: {l}");
    }
    assert_eq!(r2["metric"], "f1");
}

#[test]
fn user_template_task_with_per_line_candidates() {
    let dir = tmp("custom");
    let line = |i: usize| {
        let (n, p) = (NAMES[i % 6], PLACES[i % 5]);
        let options = vec![PLACES[(i + 1) % 5], p, PLACES[(i + 2) % 5]];
        json!({"story": format!("{n} flew to {p}."), "who": n, "options": options, "gold": p})
    };
    write_jsonl(&dir.join("train.jsonl"), &(0..12).map(line).collect::<Vec<_>>());
    write_jsonl(&dir.join("validation.jsonl"), &(12..16).map(line).collect::<Vec<_>>());
    let tpl = [
        "--task",
        "custom",
        "--prompt",
        "{story}\\n{who} is now in",
        "--candidates-field",
        "options",
        "--label-field",
        "gold",
    ];
    let out = dir.join("out");
    let r = train(
        &dir,
        &out,
        &[
            &tpl[..],
            &["--steps", "3", "--n-train", "8", "--n-dev", "4", "--batch-size", "4", "--eval-every", "0"],
        ]
        .concat(),
    );
    assert_eq!(r["metric"], "accuracy");
    let m = model();
    let data = dir.join("validation.jsonl").to_string_lossy().to_string();
    let ad = out.join("adapter").to_string_lossy().to_string();
    let mut eval: Vec<&str> = vec!["eval", "--model", &m, "--data", &data, "--adapter", &ad, "--json"];
    eval.extend_from_slice(&tpl);
    let e = json_out(&eval);
    assert_eq!(e["per_example"][0]["scores"].as_array().unwrap().len(), 3);
    assert!((e["accuracy"].as_f64().unwrap() - r["test_accuracy"].as_f64().unwrap()).abs() < 1e-12);
}

/// `--loss accuracy`: the objective is minus the batch's accuracy, and training on it directly
/// raises dev accuracy above its starting value (fixed seed: the same run every time).
#[test]
fn accuracy_objective_trains_in_process_and_through_the_service() {
    let sst2 = assets().join("sst2");
    let out = tmp("acc");
    let tpl = [
        "--task",
        "custom",
        "--prompt",
        "{sentence} It was",
        "--candidate",
        " terrible",
        "--candidate",
        " great",
    ];
    let run = [
        "--steps",
        "16",
        "--n-train",
        "64",
        "--n-dev",
        "64",
        "--test-limit",
        "32",
        "--batch-size",
        "16",
        "--loss",
        "accuracy",
        "--lr",
        "3e-2",
        "--eps",
        "1e-1",
        "--eval-every",
        "8",
        "--directions",
        "2",
        "--seed",
        "0",
    ];
    let r = train(&sst2, &out.join("local"), &[&tpl[..], &run[..]].concat());
    assert_eq!(r["metric"], "accuracy");
    let log = std::fs::read_to_string(out.join("local/train_log.jsonl")).unwrap();
    let losses: Vec<f64> =
        log.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64().unwrap()).collect();
    // The mean over 2 directions of (L+ + L-)/2, each L a multiple of 1/16 in [-1, 0].
    assert!(losses.iter().all(|l| (-1.0..=0.0).contains(l) && (l * 64.0).fract() == 0.0), "{losses:?}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&losses[12..]) < mean(&losses[..4]), "the objective did not decrease: {losses:?}");
    assert!(r["best_step"].as_u64().unwrap() > 0, "dev accuracy never rose above its start: {r}");
    // The service's workers compute the same objective (two steps are enough to see it run).
    let w = train(
        &sst2,
        &out.join("service"),
        &[&tpl[..], &run[..], &["--steps", "2", "--workers", "2", "--split", "data"]].concat(),
    );
    assert_eq!(w["metric"], "accuracy");
    let l = w["final_train_loss"].as_f64().unwrap();
    assert!((-1.0..=0.0).contains(&l), "{w}");
}

#[test]
fn bad_task_arguments_are_named() {
    let dir = tmp("bad");
    let files = task_files(&dir);
    let m = model();
    let rte = files[1].1.to_string_lossy().to_string();
    let e = mezo_err(&["eval", "--model", &m, "--task", "mnli", "--data", &rte]);
    assert!(e.contains("mnli") && e.contains("rte"), "{e}");
    let e = mezo_err(&["eval", "--model", &m, "--task", "squad", "--data", &rte]);
    assert!(e.contains("rte.jsonl:1") && e.contains("`title`"), "{e}");
    let e = mezo_err(&["eval", "--model", &m, "--task", "custom", "--data", &rte]);
    assert!(e.contains("--prompt"), "{e}");
    let e = mezo_err(&[
        "eval",
        "--model",
        &m,
        "--task",
        "custom",
        "--prompt",
        "{premise",
        "--candidate",
        "a",
        "--candidate",
        "b",
        "--data",
        &rte,
    ]);
    assert!(e.contains("without its `}`"), "{e}");
    let e = mezo_err(&[
        "eval",
        "--model",
        &m,
        "--task",
        "custom",
        "--prompt",
        "{nope}",
        "--candidate",
        " a",
        "--candidate",
        " b",
        "--data",
        &rte,
    ]);
    assert!(e.contains("rte.jsonl:1") && e.contains("`nope`"), "{e}");
    let d = dir.to_string_lossy().to_string();
    let base = ["train", "--model", &m, "--data-dir", &d, "--out", &d, "--steps", "1"];
    let e = mezo_err(&[&base[..], &["--task", "rte", "--loss", "f1"]].concat());
    assert!(e.contains("--loss f1") && e.contains("scores candidates"), "{e}");
    let e = mezo_err(&[&base[..], &["--task", "squad", "--loss", "accuracy"]].concat());
    assert!(e.contains("answer-ce or f1"), "{e}");
    let e = mezo_err(&[&base[..], &["--task", "rte", "--loss", "accuracy", "--optimizer", "adam"]].concat());
    assert!(e.contains("not differentiable"), "{e}");
    let e = mezo_err(&[&base[..], &["--task", "rte", "--prompt", "{x}"]].concat());
    assert!(e.contains("custom only"), "{e}");
}
