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
