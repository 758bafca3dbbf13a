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

/// The `dataset` corpus holds a valid line of every task (make_seeds.py wrote a valid file of
/// each; cmin keeps, under hashes, inputs that reach each task's successful render, though not
/// necessarily a whole file that loads), so fuzzing and this replay exercise every task's success
/// path, not only its errors.
#[test]
fn dataset_corpus_has_a_valid_line_of_every_task() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/dataset");
    let scratch = std::env::temp_dir().join(format!("mezo-fuzz-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let file = scratch.join("line.jsonl");
    let mut loaded = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let Ok(data) = std::fs::read(entry.unwrap().path()) else { continue };
        let Some(input) = mezo_fuzz::DatasetInput::split(&data) else { continue };
        let Ok(task) = mezo_data::Task::new(input.name, input.template, input.user) else { continue };
        for line in input.file.split(|&b| b == b'\n') {
            std::fs::write(&file, line).unwrap();
            if let Ok(examples) = task.load(&file) {
                mezo_fuzz::check_example(&task, &examples[0]);
                loaded.insert((input.name, input.template, task.is_generation()));
            }
        }
    }
    std::fs::remove_dir_all(&scratch).unwrap();
    let names: std::collections::BTreeSet<_> = loaded.iter().map(|t| t.0).collect();
    assert_eq!(names.len(), mezo_data::TASK_NAMES.len(), "valid lines only for {names:?}");
    for variant in [("sst2", "classify", false), ("custom", "mezo", false), ("custom", "mezo", true)] {
        assert!(loaded.contains(&variant), "no valid line for {variant:?}: {loaded:?}");
    }
}
