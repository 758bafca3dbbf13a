use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "mezo-store-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn rec(t: u64) -> StepRecord {
    StepRecord {
        step: t,
        seeds: vec![t * 7 + 1, u64::MAX - t],
        grads: vec![t as f64 * 0.1 + 1e-17, -(t as f64) / 3.0],
        lr: 1e-6 * (1.0 + t as f64 / 7.0),
        losses: vec![(0.1 + t as f64 / 9.0, 0.2 / (t as f64 + 1.0)), (f64::NAN, -0.0)],
        skipped: t % 13 == 5,
    }
}

/// Bitwise equality, so NaN fields compare equal.
fn same_bits(a: &StepRecord, b: &StepRecord) -> bool {
    encode_step(a) == encode_step(b)
}

#[test]
fn run_lifecycle() {
    let tmp = TempDir::new("runs");
    let s = Store::open(&tmp.0).unwrap();
    s.create_run("b-run", r#"{"lr":1e-6}"#).unwrap();
    s.create_run("a_run", "{}").unwrap();
    let e = s.create_run("b-run", "{}").unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    assert!(e.to_string().contains("b-run"), "{e}");
    // The refused duplicate did not overwrite the spec.
    assert_eq!(s.run_spec("b-run").unwrap(), r#"{"lr":1e-6}"#);

    assert_eq!(s.status("b-run").unwrap(), (RunStatus::Pending, String::new()));
    s.set_status("b-run", RunStatus::Failed, "worker pool empty").unwrap();
    assert_eq!(s.status("b-run").unwrap(), (RunStatus::Failed, "worker pool empty".into()));
    assert_eq!(
        s.list_runs().unwrap(),
        vec![("a_run".to_string(), RunStatus::Pending), ("b-run".to_string(), RunStatus::Failed)]
    );

    for e in [
        s.run_spec("nope").unwrap_err(),
        s.status("nope").unwrap_err(),
        s.set_status("nope", RunStatus::Running, "").unwrap_err(),
        s.next_step("nope").unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("\"nope\""), "{e}");
    }

    let long = "x".repeat(65);
    for bad in ["../x", "", long.as_str(), "a/b", "a b", "a\0b"] {
        let e = s.create_run(bad, "{}").unwrap_err();
        assert!(matches!(e, StoreError::InvalidArgument { .. }), "{bad:?}: {e}");
        assert!(e.to_string().contains("[A-Za-z0-9_-]"), "{e}");
    }
    s.create_run(&"y".repeat(64), "{}").unwrap();
    assert_eq!(s.list_runs().unwrap().len(), 3);
}

#[test]
fn step_log_round_trip_and_contiguity() {
    let tmp = TempDir::new("steps");
    {
        let s = Store::open(&tmp.0).unwrap();
        s.create_run("r1", "{}").unwrap();
        s.create_run("r2", "{}").unwrap();
        assert_eq!(s.next_step("r1").unwrap(), 0);
        let e = s.append_step("r1", &rec(1)).unwrap_err();
        assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
        assert!(e.to_string().contains("step 1") && e.to_string().contains("empty"), "{e}");
        for t in 0..100 {
            s.append_step("r1", &rec(t)).unwrap();
        }
        s.append_step("r2", &rec(0)).unwrap();
        // Dropped here without any explicit close.
    }
    let s = Store::open(&tmp.0).unwrap();
    assert_eq!(s.next_step("r1").unwrap(), 100);
    assert_eq!(s.next_step("r2").unwrap(), 1);
    let all = s.steps("r1", 0).unwrap();
    assert_eq!(all.len(), 100);
    for (t, r) in all.iter().enumerate() {
        assert!(same_bits(r, &rec(t as u64)), "step {t}: {r:?}");
    }
    assert!(all[5].losses[1].0.is_nan(), "NaN survives the log");

    // A retried write counts once.
    s.append_step("r1", &rec(42)).unwrap();
    s.append_step("r1", &rec(99)).unwrap();
    assert_eq!(s.next_step("r1").unwrap(), 100);

    let mut other = rec(42);
    other.grads[0] += 1e-12;
    let e = s.append_step("r1", &other).unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    let m = e.to_string();
    assert!(m.contains("\"r1\"") && m.contains("step 42") && m.contains("step 99"), "{m}");
    assert!(same_bits(&s.steps("r1", 42).unwrap()[0], &rec(42)), "conflict changed nothing");

    let e = s.append_step("r1", &rec(105)).unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, StoreError::Conflict { .. }), "{m}");
    assert!(m.contains("step 105") && m.contains("step 99") && m.contains("100"), "{m}");

    let tail = s.steps("r1", 95).unwrap();
    assert_eq!(tail.iter().map(|r| r.step).collect::<Vec<_>>(), vec![95, 96, 97, 98, 99]);
    assert!(s.steps("r1", 100).unwrap().is_empty());
    assert_eq!(s.steps("r2", 0).unwrap().len(), 1, "runs do not share a log");
}

#[test]
fn undecodable_log_record_is_data_loss() {
    let tmp = TempDir::new("dataloss");
    let s = Store::open(&tmp.0).unwrap();
    s.create_run("r", "{}").unwrap();
    for t in 0..3 {
        s.append_step("r", &rec(t)).unwrap();
    }
    s.steps.insert(step_key("r", 1), &b"\x01garbage"[..]).unwrap();
    let e = s.steps("r", 0).unwrap_err();
    assert!(matches!(e, StoreError::DataLoss { .. }), "{e}");
    assert!(e.to_string().contains("\"r\"") && e.to_string().contains("step 1"), "{e}");
}

#[test]
fn encoding_rejects_truncation() {
    let full = encode_step(&rec(3));
    for n in 0..full.len() {
        assert!(decode_step(&full[..n]).is_err(), "prefix of {n} bytes decoded");
    }
    let mut long = full.clone();
    long.push(0);
    assert!(decode_step(&long).is_err());
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn snapshots_fall_back_and_prune() {
    let tmp = TempDir::new("snaps");
    let s = Store::open(&tmp.0).unwrap();
    s.create_run("r", "{}").unwrap();
    assert_eq!(s.latest_snapshot("r").unwrap(), (None, vec![]));
    let data = |t: u64| format!("weights at step {t}").into_bytes();
    let mut metas = Vec::new();
    for t in [10, 20, 30] {
        let m = s.write_snapshot("r", t, &data(t)).unwrap();
        assert_eq!(m.bytes, data(t).len() as u64);
        assert_eq!(m.sha256, sha256_hex(&data(t)));
        assert_eq!(m.sha256.len(), 64);
        metas.push(m);
    }
    let dir = tmp.0.canonicalize().unwrap().join("snapshots").join("r");
    assert_eq!(
        files_in(&dir),
        vec![
            "step-00000000000000000010.snap",
            "step-00000000000000000020.snap",
            "step-00000000000000000030.snap"
        ],
        "no temp files left behind"
    );

    let (got, warnings) = s.latest_snapshot("r").unwrap();
    let (meta, bytes) = got.unwrap();
    assert_eq!((meta.step, bytes, warnings.len()), (30, data(30), 0));
    assert_eq!(meta, metas[2]);

    // Flip a byte of the newest: same length, wrong checksum.
    let mut b = fs::read(&metas[2].file).unwrap();
    b[0] ^= 0x01;
    fs::write(&metas[2].file, b).unwrap();
    drop(s);
    let s = Store::open(&tmp.0).unwrap();
    let (got, warnings) = s.latest_snapshot("r").unwrap();
    assert_eq!(got.map(|(m, b)| (m.step, b)), Some((20, data(20))));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains(&metas[2].file.display().to_string()), "{warnings:?}");
    assert!(warnings[0].contains("SHA-256"), "{warnings:?}");

    fs::remove_file(&metas[1].file).unwrap();
    let (got, warnings) = s.latest_snapshot("r").unwrap();
    assert_eq!(got.map(|(m, b)| (m.step, b)), Some((10, data(10))));
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[1].contains(&metas[1].file.display().to_string()), "{warnings:?}");

    // Truncation is caught by the length check.
    fs::write(&metas[0].file, b"weights").unwrap();
    let (got, warnings) = s.latest_snapshot("r").unwrap();
    assert!(got.is_none());
    assert_eq!(warnings.len(), 3);
    assert!(warnings[2].contains("length"), "{warnings:?}");

    // Rewriting a step replaces its snapshot.
    s.write_snapshot("r", 10, &data(10)).unwrap();
    assert_eq!(s.latest_snapshot("r").unwrap().0.unwrap().0.step, 10);
}

#[test]
fn prune_keeps_newest_valid() {
    let tmp = TempDir::new("prune");
    let s = Store::open(&tmp.0).unwrap();
    s.create_run("r", "{}").unwrap();
    s.create_run("other", "{}").unwrap();
    s.write_snapshot("other", 1, b"o").unwrap();
    let mut metas = Vec::new();
    for t in 1..=5u64 {
        metas.push(s.write_snapshot("r", t * 10, &[t as u8; 100]).unwrap());
    }
    // A temp file left by a crashed write.
    let dir = metas[0].file.parent().unwrap().to_path_buf();
    fs::write(dir.join(".step-00000000000000000060.snap.tmp"), b"partial").unwrap();
    // Corrupt step 40: the two newest valid are then 50 and 30.
    fs::write(&metas[3].file, [0u8; 100]).unwrap();

    assert!(matches!(s.prune_snapshots("r", 0), Err(StoreError::InvalidArgument { .. })));
    s.prune_snapshots("r", 2).unwrap();
    assert_eq!(
        files_in(&dir),
        vec![
            "step-00000000000000000030.snap",
            "step-00000000000000000040.snap",
            "step-00000000000000000050.snap"
        ]
    );
    let steps: Vec<u64> =
        s.index_newest_first("r").unwrap().into_iter().map(|(_, e)| e.unwrap().step).collect();
    assert_eq!(steps, vec![50, 40, 30]);
    // The other run's snapshots are untouched.
    assert_eq!(s.latest_snapshot("other").unwrap().0.unwrap().1, b"o");

    // With fewer valid snapshots than `keep`, nothing goes.
    s.prune_snapshots("r", 10).unwrap();
    assert_eq!(files_in(&dir).len(), 3);

    s.prune_snapshots("r", 1).unwrap();
    assert_eq!(files_in(&dir), vec!["step-00000000000000000050.snap"]);
    let (got, warnings) = s.latest_snapshot("r").unwrap();
    assert_eq!((got.unwrap().0.step, warnings.len()), (50, 0));
}

#[test]
fn corrupt_store_is_an_error_naming_the_path() {
    // DIR/db is a plain file.
    let tmp = TempDir::new("corrupt-file");
    fs::write(tmp.0.join("db"), b"not a database").unwrap();
    let e = Store::open(&tmp.0).err().expect("open must fail");
    assert!(matches!(e, StoreError::Db { .. }), "{e}");
    assert!(e.to_string().contains(&tmp.0.join("db").display().to_string()), "{e}");

    // Garbage over every file sled wrote.
    let tmp = TempDir::new("corrupt-garbage");
    {
        let s = Store::open(&tmp.0).unwrap();
        s.create_run("r", "{}").unwrap();
        for t in 0..10 {
            s.append_step("r", &rec(t)).unwrap();
        }
    }
    let mut stack = vec![tmp.0.join("db")];
    let mut n = 0;
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            let len = fs::metadata(&p).unwrap().len().max(64) as usize;
            fs::write(&p, (0..len).map(|i| (i * 131 % 251) as u8).collect::<Vec<_>>()).unwrap();
            n += 1;
        }
    }
    assert!(n > 0);
    match Store::open(&tmp.0) {
        Err(e) => {
            eprintln!("garbage store: {e}");
            assert!(matches!(e, StoreError::Db { .. } | StoreError::DataLoss { .. }), "{e}");
            assert!(e.to_string().contains("db"), "{e}");
        }
        // If sled opens it anyway, the lost run must not come back silently as valid data.
        Ok(s) => assert!(s.steps("r", 0).map(|v| v.len() != 10).unwrap_or(true)),
    }
}

#[test]
fn dev_accuracies_survive_a_reopen_per_run_in_step_order() {
    let tmp = TempDir::new("evals");
    {
        let s = Store::open(&tmp.0).unwrap();
        s.create_run("r1", "{}").unwrap();
        s.create_run("r10", "{}").unwrap();
        for (step, acc) in [(300u64, 0.75), (20, 0.5), (40, 0.625)] {
            s.append_eval("r1", step, acc).unwrap();
        }
        // A run whose id extends r1's keeps its own records.
        s.append_eval("r10", 20, 1.0).unwrap();
        // A re-evaluation of a step replaces the first value.
        s.append_eval("r1", 40, 0.6875).unwrap();
        let e = s.append_eval("r1", 50, 1.5).unwrap_err();
        assert!(matches!(e, StoreError::InvalidArgument { .. }) && e.to_string().contains("1.5"), "{e}");
        let e = s.append_eval("nope", 1, 0.5).unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    }
    let s = Store::open(&tmp.0).unwrap();
    assert_eq!(s.evals("r1").unwrap(), vec![(20, 0.5), (40, 0.6875), (300, 0.75)]);
    assert_eq!(s.evals("r10").unwrap(), vec![(20, 1.0)]);
    s.create_run("r2", "{}").unwrap();
    assert!(s.evals("r2").unwrap().is_empty());
}

#[test]
fn snapshot_index_entries_name_only_their_own_file() {
    let good = IndexEntry { step: 7, file_name: snapshot_file_name(7), bytes: 3, sha256: sha256_hex(b"abc") };
    let v = serde_json::to_vec(&good).unwrap();
    assert_eq!(IndexEntry::parse(7, &v).unwrap(), good);
    assert!(good.check(b"abc").is_ok());
    assert!(good.check(b"abd").unwrap_err().contains("SHA-256"));
    assert!(good.check(b"ab").unwrap_err().contains("length 2"));
    // Another step's key, a path out of the folder, and another name are refused.
    assert!(IndexEntry::parse(8, &v).unwrap_err().contains("key step 8"));
    for name in ["../../etc/passwd", "/etc/passwd", "step-00000000000000000008.snap"] {
        let bad = IndexEntry { file_name: name.into(), ..good.clone() };
        let err = IndexEntry::parse(7, &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(err.contains("expected \"step-00000000000000000007.snap\""), "{err}");
    }
    assert!(IndexEntry::parse(7, b"{not json").is_err());
}
