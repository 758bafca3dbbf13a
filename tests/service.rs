//! The service end to end: a real coordinator and real workers as processes on loopback, the
//! bundled small model on the CPU. Workers and the coordinator are killed with SIGKILL mid-run;
//! the runs must finish with the same adapter, bit for bit, as an uninterrupted run.

mod cluster;
mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cluster::*;
use common::*;
use serde_json::Value;

const STEPS: &str = "40";

/// The cluster of one test of this suite.
fn cluster(name: &str, workers: usize) -> Cluster {
    Cluster::new("service", name, workers)
}

/// Starts a run with [`run_spec`] and `extra` flags.
fn start(c: &Cluster, run_id: &str, extra: &[&str]) {
    let mut args = run_spec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.start_run_args(run_id, &args);
}

/// The flags of the runs these tests compare (`mezo train`'s).
fn run_spec() -> Vec<String> {
    let a = repo_root().join("crates/mezo-cli/assets");
    let (model, data) = (a.join("opt-mini"), a.join("sst2"));
    #[rustfmt::skip]
    let v = [
        "--model", model.to_str().unwrap(), "--data-dir", data.to_str().unwrap(),
        "--steps", STEPS, "--n-train", "64", "--n-dev", "16", "--test-limit", "16", "--eval-every", "0",
        "--lr", "1e-3", "--directions", "3", "--batch-size", "8",
    ];
    v.iter().map(|s| s.to_string()).collect()
}

/// The adapter of an uninterrupted run on two workers.
fn reference() -> &'static Vec<u8> {
    static R: OnceLock<Vec<u8>> = OnceLock::new();
    R.get_or_init(|| {
        let c = cluster("reference", 2);
        start(&c, "r", &[]);
        let v = c.wait_done("r", Duration::from_secs(300));
        assert_eq!(v["status"], "completed", "{v}");
        c.export("r")
    })
}

#[test]
fn a_killed_worker_loses_nothing_and_a_new_one_joins() {
    let expected = reference().clone();
    let mut c = cluster("worker-kill", 3);
    start(&c, "r", &[]);
    c.wait_steps("r", 10, Duration::from_secs(120));
    c.workers[0].kill9();
    c.wait_steps("r", 20, Duration::from_secs(120));
    let late = c.add_worker();
    let v = c.wait_done("r", Duration::from_secs(300));
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["steps_done"], 40, "no step lost");
    assert_eq!(
        c.export("r"),
        expected,
        "a step was lost or applied twice: the adapter differs from the uninterrupted run's"
    );
    assert!(
        c.workers[late].log().contains("replica of run r"),
        "the late worker took no task:\n{}",
        c.workers[late].log()
    );
    for w in &c.workers {
        assert!(!w.log().contains("panicked"), "{}", w.log());
    }
}

#[test]
fn coordinator_killed_five_times_resumes_bit_identical() {
    let expected = reference().clone();
    let mut c = cluster("coordinator-kill", 2);
    start(&c, "r", &[]);
    let mut at = 0;
    for (i, gap) in [4u64, 7, 3, 6, 5].into_iter().enumerate() {
        at += gap;
        let v = c.wait_steps("r", at, Duration::from_secs(120));
        assert_ne!(v["status"], "completed", "the run finished before kill {i}");
        c.coordinator.as_mut().unwrap().kill9();
        c.start_coordinator();
    }
    let v = c.wait_done("r", Duration::from_secs(300));
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(c.export("r"), expected, "the resumed run's adapter differs from the uninterrupted run's");
    // An ended run has no actor after a restart: its export is rebuilt from the store.
    c.coordinator.as_mut().unwrap().kill9();
    c.start_coordinator();
    assert_eq!(c.export("r"), expected, "the ended run's export differs after a coordinator restart");
    let stop = mezo_ok(&["run", "stop", "r", "--coordinator", &c.url()]);
    assert_eq!(stop.trim(), "run r: already completed, nothing to stop");
    let logs: String = std::fs::read_dir(&c.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.matches("resumed 1 run(s)").count() >= 5, "each restart resumes the run:\n{logs}");
    // Restarts after step 5 start from a snapshot and replay only the log after it.
    assert!(logs.contains("restored the snapshot at step"), "no restart used a snapshot:\n{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// A replica that goes wrong (a fault injected into one worker flips a value of its LoRA state)
/// is caught by the checksum comparison at the next snapshot step and rebuilt before it computes
/// anything with it: the run ends bit-identical to the reference, and the resync is counted.
#[test]
fn a_corrupted_replica_is_caught_and_resynced() {
    let expected = reference().clone();
    let mut c = cluster("resync", 1);
    c.add_worker_env(&[("MEZO_FAULT_CORRUPT_REPLICA_AT", "10")]);
    start(&c, "r", &[]);
    let v = c.wait_done("r", Duration::from_secs(300));
    assert_eq!(v["status"], "completed", "{v}");
    let log = c.workers[1].log();
    assert!(log.contains("fault injection: corrupted the replica"), "the fault was not injected:\n{log}");
    assert!(log.contains("differs from the coordinator's") && log.contains("resyncing"), "{log}");
    let body = http_get(c.metrics_port, "/metrics").1;
    let resyncs: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("mezo_replica_resyncs_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("mezo_replica_resyncs_total");
    assert!(resyncs >= 1.0, "the resync is counted: {body}");
    assert_eq!(c.export("r"), expected, "a corrupted replica's losses reached the run");
}

/// `mezo train --workers 2` is the service in one process: the same spec gives the same adapter,
/// bit for bit, as a coordinator and worker processes.
#[test]
fn train_with_workers_matches_the_fleet() {
    let expected = reference().clone();
    let out = tmp("service", "train-workers");
    let mut args = vec!["train", "--workers", "2", "--json", "--out", out.to_str().unwrap()];
    let spec = run_spec();
    args.extend(spec.iter().map(String::as_str));
    let report: Value = serde_json::from_str(mezo_ok(&args).trim()).unwrap();
    assert_eq!(report["steps"], 40, "{report}");
    assert_eq!(report["workers"], 2, "{report}");
    let test = report["test_accuracy"].as_f64().expect("the test set is evaluated at the end");
    assert!((0.0..=1.0).contains(&test), "{report}");
    assert_eq!(std::fs::read_to_string(out.join("train_log.jsonl")).unwrap().lines().count(), 40);
    assert_eq!(
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        expected,
        "mezo train --workers 2 and the fleet disagree"
    );
}

/// MeZO's prefix mode through the service: the coordinator computes the initial prefix from the
/// base model, ships it to the workers, and (killed before its first snapshot and again after it)
/// recomputes or restores it on restart. The fleet's prefix equals `mezo train --workers 2`'s bit
/// for bit, and the single-process trainer computes the same losses and projected gradients at
/// every step (the same initial prefix and the same updates).
#[test]
fn prefix_runs_match_across_fleet_restarts_and_the_local_trainer() {
    // Half the other tests' steps: enough for a kill before the first snapshot and one after.
    let spec: Vec<String> =
        run_spec().into_iter().map(|a| if a == STEPS { "20".to_string() } else { a }).collect();
    let mut c = cluster("prefix", 2);
    let mut args: Vec<&str> = spec.iter().map(String::as_str).collect();
    args.extend(["--mode", "prefix"]);
    c.start_run_args("p", &args);
    for at in [2u64, 9] {
        let v = c.wait_steps("p", at, Duration::from_secs(120));
        assert_ne!(v["status"], "completed", "the run finished before the kill at step {at}");
        c.coordinator.as_mut().unwrap().kill9();
        c.start_coordinator();
    }
    let v = c.wait_done("p", Duration::from_secs(300));
    assert_eq!(v["status"], "completed", "{v}");
    let fleet = c.export("p");
    c.coordinator.as_mut().unwrap().kill9();
    c.start_coordinator();
    assert_eq!(c.export("p"), fleet, "the ended prefix run's export differs after a coordinator restart");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("export-p/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "PREFIX_TUNING", "{cfg}");

    let run = |name: &str, extra: &[&str]| {
        let out = tmp("service", name);
        let mut args = vec!["train", "--mode", "prefix", "--json", "--out", out.to_str().unwrap()];
        args.extend(extra);
        args.extend(spec.iter().map(String::as_str));
        mezo_ok(&args);
        out
    };
    let served = run("prefix-workers", &["--workers", "2"]);
    assert_eq!(
        std::fs::read(served.join("adapter/adapter_model.safetensors")).unwrap(),
        fleet,
        "mezo train --workers 2 and the restarted fleet disagree on the prefix"
    );
    // The single-process trainer keeps the best prefix by dev accuracy rather than the last, so
    // the comparison is step by step: equal losses and projected gradients at every step.
    let local = run("prefix-local", &[]);
    let steps = |dir: &std::path::Path| -> Vec<(u64, u64)> {
        std::fs::read_to_string(dir.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["loss"].as_f64().unwrap().to_bits(), v["projected_grad"].as_f64().unwrap().to_bits())
            })
            .collect()
    };
    let (s, l) = (steps(&served), steps(&local));
    assert_eq!(s.len(), 20);
    assert_eq!(s, l, "the service's and the single-process trainer's prefix runs differ");
}

#[test]
fn a_python_client_starts_a_run_and_streams_it_to_the_end() {
    let c = cluster("python", 2);
    let a = repo_root().join("crates/mezo-cli/assets");
    let out = run_python(&[
        repo_root().join("tests/py/grpc_client.py").to_str().unwrap(),
        repo_root().join("proto").to_str().unwrap(),
        &format!("127.0.0.1:{}", c.port),
        a.join("opt-mini").to_str().unwrap(),
        a.join("sst2").to_str().unwrap(),
        "12",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "RUN_STATUS_COMPLETED", "{v}");
    assert_eq!(v["steps_seen"], 12, "{v}");
    assert_eq!(v["last_step"], 11, "{v}");
    // A subscriber that stops reading does not hold training back, and still gets the end.
    assert_eq!(v["slow_run_status"], "RUN_STATUS_COMPLETED", "{v}");
    assert_eq!(v["slow_stream_done"], true, "{v}");
    // The live /metrics passes promtool and counts the run's steps.
    let body = http_get(c.metrics_port, "/metrics").1;
    assert!(body.contains("mezo_steps_total 312"), "12 + 300 steps: {body}");
    assert!(body.contains("mezo_workers_connected 2"), "{body}");
    let tokens: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("mezo_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("mezo_tokens_total");
    assert!(tokens > 0.0, "workers' tokens are counted: {body}");
    let f = c.dir.join("metrics.txt");
    std::fs::write(&f, &body).unwrap();
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&f).unwrap())
        .output()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    assert!(check.status.success() && check.stdout.is_empty() && check.stderr.is_empty(), "{check:?}");
}

/// Two runs at once share two workers; a data-parallel run (batch shards across workers) is
/// deterministic too: the same run twice gives the same adapter.
#[test]
fn runs_share_the_fleet_and_data_parallel_is_deterministic() {
    let c = cluster("shared", 2);
    start(&c, "d1", &["--split", "data", "--grad-accum", "2"]);
    start(&c, "d2", &["--split", "data", "--grad-accum", "2"]);
    for r in ["d1", "d2"] {
        let v = c.wait_done(r, Duration::from_secs(300));
        assert_eq!(v["status"], "completed", "{v}");
    }
    assert_eq!(c.export("d1"), c.export("d2"), "the same data-parallel run twice must give the same adapter");
    let list = mezo_ok(&["run", "list", "--coordinator", &c.url()]);
    assert_eq!(list.lines().filter(|l| l.contains("\"completed\"")).count(), 2, "{list}");
    // A spec whose model does not exist is refused at once, naming the file.
    let e = mezo_err(&[
        "run",
        "start",
        "--coordinator",
        &c.url(),
        "--model",
        "/nonexistent/model",
        "--data-dir",
        repo_root().join("crates/mezo-cli/assets/sst2").to_str().unwrap(),
    ]);
    assert!(e.contains("/nonexistent/model"), "{e}");
    // A run that does not exist is a clear NotFound.
    let e = mezo_err(&["run", "get", "nope", "--coordinator", &c.url()]);
    assert!(e.contains("run `nope`") || e.contains("nope"), "{e}");
}

/// Inputs a client controls are bounded: paths outside `--path-root` (by `..` or a symlink), a
/// field out of its range, and an oversized request are all refused with what was wrong.
#[test]
fn out_of_bounds_inputs_are_refused_with_reasons() {
    let assets = repo_root().join("crates/mezo-cli/assets");
    let c = Cluster::with_args("service", "limits", 0, &["--path-root", assets.to_str().unwrap()]);
    let (url, model, data) = (c.url(), assets.join("opt-mini"), assets.join("sst2"));
    let start = |m: &str, d: &str, extra: &[&str]| {
        let mut a = vec!["run", "start", "--coordinator", &url, "--model", m, "--data-dir", d];
        a.extend_from_slice(extra);
        mezo_err(&a)
    };
    // `..` out of the root.
    let escape = assets.join("../../../tests");
    let e = start(escape.to_str().unwrap(), data.to_str().unwrap(), &[]);
    assert!(e.contains("model") && e.contains("outside the allowed roots"), "{e}");
    // A symlink inside the root that leads out of it.
    let link = assets.join(format!("escape-{}", std::process::id()));
    std::os::unix::fs::symlink(repo_root().join("tests"), &link).unwrap();
    let e = start(model.to_str().unwrap(), link.to_str().unwrap(), &[]);
    let _ = std::fs::remove_file(&link);
    assert!(e.contains("data_dir") && e.contains("outside the allowed roots"), "{e}");
    // A field out of range, named with its range.
    let e = start(model.to_str().unwrap(), data.to_str().unwrap(), &["--directions", "5000"]);
    assert!(e.contains("(directions) must be between 1 and 1024, got 5000"), "{e}");
    // A request over the 4 MiB limit is refused before it is buffered whole.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        use mezo_proto::v1 as pb;
        let mut client = pb::mezo_service_client::MezoServiceClient::connect(url.clone()).await.unwrap();
        let spec = pb::RunSpec { template: "x".repeat(5 << 20), ..Default::default() };
        client.start_run(pb::StartRunRequest { spec: Some(spec), run_id: "big".into() }).await.unwrap_err()
    });
    assert!(
        matches!(code.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted),
        "an oversized request: {code:?}"
    );
    // None of the refused requests created a run.
    let list = mezo_ok(&["run", "list", "--coordinator", &url]);
    assert!(list.trim().is_empty(), "{list}");
}

/// Issue #7, item 5: a worker that runs out of memory fails that task with a clear report and
/// keeps serving, and the run continues on the worker that can hold it. The failure is real: the
/// small worker's memory is capped after it has served a small run (its address space with
/// `prlimit --as` on the CPU; on a GPU, another process takes all but 1 GiB of the device), so
/// libtorch's own allocator refuses the big run's activations (a 1-layer model with a
/// 65536-wide MLP: about 2.5 GB for one fc1 output at batch 64).
#[test]
fn a_worker_out_of_memory_fails_the_task_and_keeps_serving() {
    out_of_memory_scenario("cpu", "oom", |pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let vm_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmSize");
        // What it uses now plus 1 GiB: enough to load another run's replica, not enough for the
        // big run's forward.
        let cap = (vm_kb + (1 << 20)) * 1024;
        let out =
            Command::new("prlimit").args(["--pid", &pid.to_string(), &format!("--as={cap}:{cap}")]).output();
        assert!(out.as_ref().is_ok_and(|o| o.status.success()), "prlimit (util-linux) sets the cap: {out:?}");
        None
    });
}

/// The same on a GPU: `cargo test --test service -- --ignored gpu_worker_out_of_memory` on a
/// CUDA machine. The small worker runs on cuda:0; a Python process then holds all of the GPU's
/// free memory but 1 GiB; the other worker runs on the CPU.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_gpu_worker_out_of_memory_fails_the_task_and_keeps_serving() {
    out_of_memory_scenario("cuda:0", "oom-gpu", |_| {
        let dir = tmp("service", "oom-gpu-hog");
        let hog = "import sys, time, torch\n\
                   free, _ = torch.cuda.mem_get_info()\n\
                   x = torch.empty(free - (1 << 30), dtype=torch.uint8, device='cuda')\n\
                   print('holding', x.numel(), 'bytes', flush=True)\n\
                   time.sleep(3600)\n";
        let p = Proc::spawn(std::path::Path::new(&python()), &["-c", hog], dir.join("hog.log"));
        let start = std::time::Instant::now();
        while !p.log().contains("holding") {
            assert!(start.elapsed() < Duration::from_secs(60), "the memory hog did not start:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(p)
    });
}

/// Worker 0 on `small_device` serves a small run, then `cap` limits its memory (returning a
/// process to keep alive while it matters); the big run must complete on worker 1 (CPU), worker 0
/// must report running out of memory and keep serving, and then alone complete a small run.
fn out_of_memory_scenario(small_device: &str, name: &str, cap: impl FnOnce(u32) -> Option<Proc>) {
    let dir = tmp("service", &format!("{name}-model"));
    let model = dir.join("wide-mlp");
    let mini = repo_root().join("crates/mezo-cli/assets/opt-mini");
    let script = "import shutil, sys, torch, transformers as t\n\
         torch.manual_seed(0)\n\
         c = t.OPTConfig(vocab_size=50272, hidden_size=16, num_hidden_layers=1, ffn_dim=65536,\n\
                         num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=16,\n\
                         pad_token_id=1, bos_token_id=50256, eos_token_id=50256)\n\
         t.OPTForCausalLM(c).save_pretrained(sys.argv[1])\n\
         for f in ['vocab.json', 'merges.txt', 'tokenizer_config.json']:\n\
         \x20   shutil.copy(sys.argv[2] + '/' + f, sys.argv[1])\n";
    run_python(&["-c", script, model.to_str().unwrap(), mini.to_str().unwrap()]);
    let data = repo_root().join("crates/mezo-cli/assets/sst2");
    let run = |c: &Cluster, id: &str, batch: &str| {
        #[rustfmt::skip]
        let args = [
            "--model", model.to_str().unwrap(), "--data-dir", data.to_str().unwrap(),
            "--steps", "3", "--n-train", "64", "--n-dev", "8", "--test-limit", "8", "--eval-every", "0",
            "--lr", "1e-3", "--directions", "2", "--batch-size", batch, "--eval-batch-size", "8",
        ];
        c.start_run_args(id, &args);
        c.wait_done(id, Duration::from_secs(300))
    };

    let mut c = cluster(name, 0);
    for (i, device) in [small_device, "cpu"].into_iter().enumerate() {
        let log = c.dir.join(format!("worker-{i}.log"));
        c.workers.push(Proc::spawn(
            &mezo_bin(),
            &["worker", "--coordinator", &c.url(), "--device", device],
            log,
        ));
    }
    let v = run(&c, "warm", "1");
    assert_eq!(v["status"], "completed", "{v}");
    let _held = cap(c.workers[0].child.id());

    let v = run(&c, "big", "64");
    let small = c.workers[0].log();
    assert_eq!(v["status"], "completed", "the run did not continue on the worker with memory: {v}\n{small}");
    assert_eq!(v["steps_done"], 3, "{v}");
    let expected = format!("failed: out of memory on {small_device}:");
    assert!(
        small.contains(&expected) && small.contains("still serving"),
        "the small worker did not report running out of memory:\n{small}"
    );
    assert!(!small.contains("Exception raised from"), "the report carries C++ frames:\n{small}");
    assert!(c.workers[0].child.try_wait().unwrap().is_none(), "the small worker exited:\n{small}");
    let body = http_get(c.metrics_port, "/metrics").1;
    let failed: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("mezo_tasks_failed_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("mezo_tasks_failed_total");
    assert!(failed >= 1.0, "the failures are counted: {body}");
    for line in small.lines().filter(|l| l.contains("out of memory")).take(1) {
        eprintln!("{line}");
    }

    // The small worker still serves: alone, it runs a run that fits.
    c.workers[1].kill9();
    let v = run(&c, "after", "1");
    assert_eq!(v["status"], "completed", "{v}\n{}", c.workers[0].log());
    assert!(c.workers[0].log().contains("replica of run after"), "{}", c.workers[0].log());
}
