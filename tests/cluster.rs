//! A coordinator and workers as real processes on loopback, for the end-to-end tests (the
//! service itself, dashboards, deployment files, clients).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// A port nothing listens on, for a server a test starts. Picked below Linux's ephemeral range
/// (32768-60999), where outgoing connections take their source ports: a port the kernel hands
/// out for a bind to port 0 and that the test then releases can be taken by any client
/// connection of the tests running beside it before the server binds it (CI saw "Address already
/// in use"). Each process walks its own stretch of 20000-31999 (by pid), never reusing a port,
/// and skips ports in use.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id().wrapping_mul(7919)) % 12_000;
    loop {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(k < 12_000, "no free port left in 20000-31999");
        let port = 20_000 + ((start + k) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A fresh folder for one test (`$MEZO_TEST_TMPDIR` or cargo's target tmp dir).
pub fn tmp(suite: &str, name: &str) -> PathBuf {
    let base = std::env::var_os("MEZO_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let d = base.join(suite).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A child process killed (SIGKILL) when dropped, with its stdout and stderr in a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(program: &std::path::Path, args: &[&str], log: PathBuf) -> Proc {
        Proc::spawn_env(program, args, &[], log)
    }
    /// With extra environment variables (the fault-injection hooks).
    pub fn spawn_env(program: &std::path::Path, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", program.display()));
        Proc { child, log }
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    /// Extra flags for `mezo coordinator` (kept across restarts).
    pub coordinator_args: Vec<String>,
    pub dir: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
    pub coordinator: Option<Proc>,
    pub workers: Vec<Proc>,
}

impl Cluster {
    pub fn new(suite: &str, name: &str, workers: usize) -> Cluster {
        Cluster::with_args(suite, name, workers, &[])
    }
    /// A cluster whose coordinator gets `args` besides the usual flags.
    pub fn with_args(suite: &str, name: &str, workers: usize, args: &[&str]) -> Cluster {
        let mut c = Cluster {
            coordinator_args: args.iter().map(|s| s.to_string()).collect(),
            dir: tmp(suite, name),
            port: free_port(),
            metrics_port: free_port(),
            coordinator: None,
            workers: vec![],
        };
        c.start_coordinator();
        for _ in 0..workers {
            c.add_worker();
        }
        c
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// Starts (or restarts, on the same store and ports) the coordinator and waits until it listens.
    pub fn start_coordinator(&mut self) {
        self.coordinator = None;
        let n = std::fs::read_dir(&self.dir).unwrap().count();
        let store = self.dir.join("store");
        self.coordinator = Some(Proc::spawn(
            &mezo_bin(),
            &[
                "coordinator",
                "--listen",
                &self.addr(),
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
                "--data-dir",
                store.to_str().unwrap(),
                "--lease-ms",
                "1500",
                "--snapshot-every",
                "5",
            ]
            .into_iter()
            .chain(self.coordinator_args.iter().map(String::as_str))
            .collect::<Vec<_>>(),
            self.dir.join(format!("coordinator-{n}.log")),
        ));
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the coordinator did not listen:\n{}",
                self.coordinator.as_ref().unwrap().log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// Starts a worker; its index in `workers`.
    pub fn add_worker(&mut self) -> usize {
        self.add_worker_env(&[])
    }
    pub fn add_worker_env(&mut self, env: &[(&str, &str)]) -> usize {
        let i = self.workers.len();
        let log = self.dir.join(format!("worker-{i}.log"));
        self.workers.push(Proc::spawn_env(&mezo_bin(), &["worker", "--coordinator", &self.url()], env, log));
        i
    }
    /// `mezo run start` on the bundled small model and SST-2 sample with a small dev set.
    pub fn start_run(&self, run_id: &str, steps: u64, extra: &[&str]) {
        let a = repo_root().join("crates/mezo-cli/assets");
        let (model, data, steps) = (a.join("opt-mini"), a.join("sst2"), steps.to_string());
        #[rustfmt::skip]
        let mut args = vec![
            "--model", model.to_str().unwrap(), "--data-dir", data.to_str().unwrap(),
            "--steps", &steps, "--n-train", "64", "--n-dev", "16", "--test-limit", "16",
            "--lr", "1e-3", "--directions", "2", "--batch-size", "8",
        ];
        args.extend_from_slice(extra);
        self.start_run_args(run_id, &args);
    }
    /// `mezo run start --run-id RUN_ID ARGS` (ARGS: `mezo train`'s flags).
    pub fn start_run_args(&self, run_id: &str, args: &[&str]) {
        let url = self.url();
        let mut all = vec!["run", "start", "--coordinator", &url, "--run-id", run_id];
        all.extend_from_slice(args);
        assert_eq!(mezo_ok(&all).trim(), run_id);
    }
    /// `mezo run export`: the adapter's safetensors bytes.
    pub fn export(&self, run_id: &str) -> Vec<u8> {
        let out = self.dir.join(format!("export-{run_id}"));
        mezo_ok(&["run", "export", run_id, "--coordinator", &self.url(), "--out", out.to_str().unwrap()]);
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    }
    pub fn get(&self, run_id: &str) -> Option<Value> {
        let out = mezo(&["run", "get", run_id, "--coordinator", &self.url()]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }
    /// Waits until the run has applied `at_least` steps or ended.
    pub fn wait_steps(&self, run_id: &str, at_least: u64, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.get(run_id) {
                if v["steps_done"].as_u64().unwrap() >= at_least
                    || v["status"] != "running" && v["status"] != "pending"
                {
                    return v;
                }
            }
            assert!(start.elapsed() < limit, "run {run_id} did not reach step {at_least} in {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    pub fn wait_done(&self, run_id: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.get(run_id) {
                if v["status"] != "running" && v["status"] != "pending" {
                    return v;
                }
            }
            assert!(start.elapsed() < limit, "run {run_id} did not end in {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// GET on loopback; `(status line, body)`. HTTP/1.0, so servers answer with a plain body that
/// ends at close (Go's net/http would chunk an HTTP/1.1 reply).
pub fn http_get(port: u16, path_and_query: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters pass).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
