//! Replays every corpus input and every saved crash through its harness, on stable: the fuzzers'
//! findings stay fixed, and the harnesses keep compiling and passing on what fuzzing grew.

use std::path::Path;

#[test]
fn every_corpus_and_regression_input_passes_its_harness() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    let mut total = 0;
    for (target, harness) in mezo_fuzz::TARGETS {
        let mut seen = 0;
        for kind in ["corpus", "regressions"] {
            let dir = root.join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                // A file a running fuzzer just minimised away is not a failure.
                let Ok(data) = std::fs::read(&path) else { continue };
                seen += 1;
                if std::panic::catch_unwind(|| harness(&data)).is_err() {
                    failures.push(path.display().to_string());
                }
            }
        }
        assert!(seen > 0, "no corpus for fuzz target {target} under {}", root.display());
        total += seen;
    }
    assert!(failures.is_empty(), "{} of {total} inputs fail: {failures:#?}", failures.len());
    eprintln!("{total} corpus and regression inputs pass");
}

/// The `dataset` seeds (make_seeds.py) are valid files of their tasks, every task among them, so
/// fuzzing starts from inputs that reach each task's renderer.
#[test]
fn dataset_seeds_load_for_every_task() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/dataset");
    let scratch = std::env::temp_dir().join(format!("mezo-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut tasks = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.file_name().unwrap().to_string_lossy().starts_with("seed-") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let input = mezo_fuzz::DatasetInput::split(&data).unwrap();
        let task = mezo_data::Task::new(input.name, input.template, input.user).unwrap();
        let file = scratch.join("seed.jsonl");
        std::fs::write(&file, input.file).unwrap();
        let examples = task.load(&file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for ex in &examples {
            mezo_fuzz::check_example(&task, ex);
        }
        tasks.insert((input.name, input.template, task.is_generation()));
    }
    let names: std::collections::BTreeSet<_> = tasks.iter().map(|t| t.0).collect();
    assert_eq!(names.len(), mezo_data::TASK_NAMES.len(), "seeds cover {names:?}");
    assert!(tasks.contains(&("sst2", "classify", false)) && tasks.contains(&("custom", "mezo", true)));
    std::fs::remove_dir_all(&scratch).unwrap();
}
