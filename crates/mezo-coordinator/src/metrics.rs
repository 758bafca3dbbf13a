//! The coordinator's Prometheus metrics and the tiny HTTP/1.1 responder that serves them on
//! `/metrics`. One GET of a text page needs no HTTP stack: a request head is read (bounded in size
//! and time, so a stuck scraper cannot pin a task), answered, and the connection closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::Role;

/// The run states `mezo_runs` is labelled with; every one is exported (as 0 when empty) so a
/// dashboard never sees a series appear from nothing.
pub const RUN_STATUSES: [&str; 5] = ["pending", "running", "completed", "failed", "stopped"];

/// The device kinds `mezo_worker_memory_bytes` is labelled with. A worker's report with any other
/// device string is ignored, so a misbehaving worker cannot add series.
pub const DEVICE_KINDS: [&str; 2] = ["cpu", "cuda"];

/// The `code` label of `mezo_rpc_rejected_total`: the two statuses a call refused for its
/// credentials gets.
pub const REJECTION_CODES: [&str; 2] = ["unauthenticated", "permission_denied"];

/// One worker's memory report (from its heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerMemory {
    /// An index into [`DEVICE_KINDS`].
    pub device: usize,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

impl WorkerMemory {
    /// `None` for a device kind outside [`DEVICE_KINDS`] or a report of nothing (`total` 0: the
    /// worker could not read its memory).
    pub fn new(device: &str, used_bytes: u64, total_bytes: u64) -> Option<Self> {
        let device = DEVICE_KINDS.iter().position(|&d| d == device)?;
        (total_bytes > 0).then_some(WorkerMemory { device, used_bytes, total_bytes })
    }
}

/// Every metric the coordinator exports, in one registry. Names follow Prometheus conventions:
/// `mezo_` prefix, base units, `_total` on counters, `_seconds`/`_bytes`; labels only from small
/// fixed sets (never a run id, seed or step); every metric has help text.
pub struct Metrics {
    pub registry: Registry,
    /// `mezo_steps_total`
    pub steps: IntCounter,
    /// `mezo_skipped_steps_total`: steps skipped for a NaN/inf loss
    pub skipped_steps: IntCounter,
    /// `mezo_step_duration_seconds`
    pub step_duration: Histogram,
    /// `mezo_forward_duration_seconds`: a task's forward time, reported by its worker
    pub forward_duration: Histogram,
    /// `mezo_train_loss`
    pub train_loss: Gauge,
    /// `mezo_projected_gradient`
    pub projected_grad: Gauge,
    /// `mezo_dev_accuracy`, a ratio 0..1
    pub dev_accuracy: Gauge,
    /// `mezo_workers_connected`
    pub workers: IntGauge,
    /// `mezo_tasks_reassigned_total`
    pub tasks_reassigned: IntCounter,
    /// `mezo_tasks_failed_total`
    pub tasks_failed: IntCounter,
    /// `mezo_duplicate_results_total`
    pub duplicate_results: IntCounter,
    /// `mezo_replica_resyncs_total`
    pub replica_resyncs: IntCounter,
    /// `mezo_stream_messages_dropped_total`: metric messages a slow StreamMetrics subscriber missed
    pub stream_dropped: IntCounter,
    /// `mezo_worker_leases_expired_total`
    pub leases_expired: IntCounter,
    /// `mezo_tokens_total`: tokens through forward passes; `rate()` gives tokens/s
    pub tokens: IntCounter,
    /// `mezo_checkpoint_duration_seconds`
    pub checkpoint_duration: Histogram,
    /// `mezo_runs{status}`, status one of [`RUN_STATUSES`]
    pub runs: IntGaugeVec,
    /// `mezo_build_info{version}` = 1
    pub build_info: IntGaugeVec,
    /// `mezo_worker_memory_bytes{device}`: the most memory in use on any live worker's device of
    /// that kind (the one closest to running out); absent while no worker of that kind reports.
    pub worker_memory: IntGaugeVec,
    /// `mezo_worker_memory_capacity_bytes{device}`: the smallest capacity among those devices.
    pub worker_memory_capacity: IntGaugeVec,
    /// `mezo_rpc_rejected_total{role, code}`: calls refused for their credentials, by the role
    /// the service needs (client, worker) and the status (see [`REJECTION_CODES`]). Never a token
    /// or a peer address: a scanner must not be able to add series.
    pub rpc_rejected: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // Names, help and buckets are fixed literals, so every `expect` here guards a programming bug.
        let registry = Registry::new();
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("counter"));
        let gauge = |name: &str, help: &str| reg(&registry, Gauge::new(name, help).expect("gauge"));
        // 1 ms .. ~65 s in doublings: steps, forwards and checkpoints all fall in this range.
        let histogram = |name: &str, help: &str| {
            let buckets = prometheus::exponential_buckets(0.001, 2.0, 17).expect("buckets");
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            reg(&registry, Histogram::with_opts(opts).expect("histogram"))
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            reg(&registry, IntGaugeVec::new(Opts::new(name, help), &[label]).expect("gauge vec"))
        };

        let runs = gauge_vec("mezo_runs", "Runs by status.", "status");
        for status in RUN_STATUSES {
            runs.with_label_values(&[status]).set(0);
        }
        let build_info = gauge_vec("mezo_build_info", "Always 1; the build's version as a label.", "version");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let worker_memory = gauge_vec(
            "mezo_worker_memory_bytes",
            "Most memory in use on a live worker's device, by device kind (CUDA: the GPU's memory in \
             use; CPU: the worker process's resident set).",
            "device",
        );
        let worker_memory_capacity = gauge_vec(
            "mezo_worker_memory_capacity_bytes",
            "Smallest memory capacity among live workers' devices, by device kind (CUDA: the GPU's \
             memory; CPU: the host's physical memory).",
            "device",
        );
        let rpc_rejected = reg(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "mezo_rpc_rejected_total",
                    "gRPC calls refused for their credentials, by the role the service needs and the \
                     status returned.",
                ),
                &["role", "code"],
            )
            .expect("counter vec"),
        );
        for role in [Role::Client, Role::Worker] {
            for code in REJECTION_CODES {
                rpc_rejected.with_label_values(&[role.name(), code]).reset();
            }
        }
        Self {
            rpc_rejected,
            worker_memory,
            worker_memory_capacity,
            steps: counter("mezo_steps_total", "Optimizer steps applied."),
            skipped_steps: counter(
                "mezo_skipped_steps_total",
                "Steps skipped because a loss was NaN or inf.",
            ),
            step_duration: histogram("mezo_step_duration_seconds", "Wall time of one step."),
            forward_duration: histogram(
                "mezo_forward_duration_seconds",
                "Forward time of one task, as reported by its worker.",
            ),
            train_loss: gauge("mezo_train_loss", "Mean training loss of the latest step."),
            projected_grad: gauge("mezo_projected_gradient", "Projected gradient of the latest step."),
            dev_accuracy: gauge("mezo_dev_accuracy", "Dev-set accuracy at the latest evaluation (0..1)."),
            workers: reg(
                &registry,
                IntGauge::new("mezo_workers_connected", "Workers holding a lease.").expect("gauge"),
            ),
            tasks_reassigned: counter("mezo_tasks_reassigned_total", "Tasks moved off a worker that failed."),
            tasks_failed: counter("mezo_tasks_failed_total", "Tasks a worker reported as failed."),
            duplicate_results: counter("mezo_duplicate_results_total", "Late or duplicate results ignored."),
            replica_resyncs: counter(
                "mezo_replica_resyncs_total",
                "Worker replicas resynchronised after a checksum mismatch.",
            ),
            stream_dropped: counter(
                "mezo_stream_messages_dropped_total",
                "StreamMetrics messages a subscriber missed because it read slower than the run published.",
            ),
            leases_expired: counter("mezo_worker_leases_expired_total", "Worker leases that expired."),
            tokens: counter("mezo_tokens_total", "Tokens processed by forward passes."),
            checkpoint_duration: histogram(
                "mezo_checkpoint_duration_seconds",
                "Wall time of one checkpoint.",
            ),
            runs,
            build_info,
            registry,
        }
    }

    /// Sets the memory gauges from the live workers' latest reports: per device kind the most
    /// memory in use and the smallest capacity. A kind no live worker reports has no series, so a
    /// dashboard shows a gap rather than a stale value from a worker that is gone.
    pub fn set_worker_memory<'a>(&self, reports: impl IntoIterator<Item = &'a WorkerMemory>) {
        let mut per_kind: [Option<(u64, u64)>; DEVICE_KINDS.len()] = [None; DEVICE_KINDS.len()];
        for r in reports {
            let e = per_kind[r.device].get_or_insert((0, u64::MAX));
            *e = (e.0.max(r.used_bytes), e.1.min(r.total_bytes));
        }
        for (kind, v) in DEVICE_KINDS.iter().zip(per_kind) {
            match v {
                Some((used, total)) => {
                    self.worker_memory.with_label_values(&[kind]).set(used as i64);
                    self.worker_memory_capacity.with_label_values(&[kind]).set(total as i64);
                }
                None => {
                    let _ = self.worker_memory.remove_label_values(&[kind]);
                    let _ = self.worker_memory_capacity.remove_label_values(&[kind]);
                }
            }
        }
    }

    /// Counts a call the [`crate::auth::Guard`] refused.
    pub fn count_rejected(&self, role: Role, code: tonic::Code) {
        let code = match code {
            tonic::Code::PermissionDenied => REJECTION_CODES[1],
            _ => REJECTION_CODES[0],
        };
        self.rpc_rejected.with_label_values(&[role.name(), code]).inc();
    }

    /// The registry in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("the text encoder writes UTF-8")
    }
}

fn reg<C: Collector + Clone + 'static>(registry: &Registry, metric: C) -> C {
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves GET /metrics (text/plain; version=0.0.4) and 404 otherwise on `listener` until `shutdown`
/// resolves. Each connection gets one response and is closed.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                // A failed accept (the peer reset first, fd exhaustion) is transient; back off
                // briefly rather than spin, and keep the endpoint up.
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(IO_TIMEOUT, respond(stream, &metrics)).await;
                });
            }
        }
    }
}

async fn respond(stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return write_all(&stream, &response("431 Request Header Fields Too Large", "text/plain", ""))
                .await;
        }
        stream.readable().await?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    let reply = if method == Some(b"GET") && path == Some(b"/metrics") {
        response("200 OK", prometheus::TEXT_FORMAT, &metrics.render())
    } else {
        response("404 Not Found", "text/plain; charset=utf-8", "not found\n")
    };
    write_all(&stream, &reply).await
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    #[rustfmt::skip]
    const NAMES: [&str; 21] = [
        "mezo_steps_total", "mezo_skipped_steps_total", "mezo_step_duration_seconds",
        "mezo_forward_duration_seconds", "mezo_train_loss", "mezo_projected_gradient", "mezo_dev_accuracy",
        "mezo_workers_connected", "mezo_tasks_reassigned_total", "mezo_tasks_failed_total",
        "mezo_duplicate_results_total", "mezo_replica_resyncs_total", "mezo_worker_leases_expired_total",
        "mezo_tokens_total", "mezo_checkpoint_duration_seconds", "mezo_runs", "mezo_build_info",
        "mezo_worker_memory_bytes", "mezo_worker_memory_capacity_bytes", "mezo_stream_messages_dropped_total",
        "mezo_rpc_rejected_total",
    ];

    #[test]
    fn worker_memory_takes_the_fullest_device_per_kind_and_drops_absent_kinds() {
        let m = Metrics::new();
        let gpu = |used, total| WorkerMemory::new("cuda", used, total).unwrap();
        let reports = [gpu(30 << 30, 80 << 30), gpu(70 << 30, 80 << 30), gpu(10 << 30, 40 << 30)];
        m.set_worker_memory(&reports);
        let text = m.render();
        assert!(
            text.contains(&format!("mezo_worker_memory_bytes{{device=\"cuda\"}} {}\n", 70u64 << 30)),
            "{text}"
        );
        assert!(
            text.contains(&format!("mezo_worker_memory_capacity_bytes{{device=\"cuda\"}} {}\n", 40u64 << 30)),
            "{text}"
        );
        assert!(!text.contains("mezo_worker_memory_bytes{device=\"cpu\"}"), "no CPU worker reported: {text}");
        // The workers left: the series go rather than keep a stale value.
        m.set_worker_memory(&[WorkerMemory::new("cpu", 1 << 20, 1 << 30).unwrap()]);
        let text = m.render();
        assert!(!text.contains("mezo_worker_memory_bytes{device=\"cuda\"}"), "{text}");
        assert!(text.contains("mezo_worker_memory_bytes{device=\"cpu\"} 1048576\n"), "{text}");
        // Reports that would add series or say nothing are refused.
        assert_eq!(WorkerMemory::new("cuda:0", 1, 2), None);
        assert_eq!(WorkerMemory::new("tpu", 1, 2), None);
        assert_eq!(WorkerMemory::new("cpu", 0, 0), None);
    }

    #[test]
    fn render_describes_every_metric() {
        let m = Metrics::new();
        m.set_worker_memory(&[WorkerMemory::new("cpu", 1, 2).unwrap()]);
        let text = m.render();
        for name in NAMES {
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "no TYPE for {name}:\n{text}");
        }
        for status in RUN_STATUSES {
            assert!(text.contains(&format!("mezo_runs{{status=\"{status}\"}} 0")), "{text}");
        }
        for role in ["client", "worker"] {
            for code in REJECTION_CODES {
                let series = format!("mezo_rpc_rejected_total{{code=\"{code}\",role=\"{role}\"}} 0\n");
                assert!(text.contains(&series), "{series} missing:\n{text}");
            }
        }
        let version = env!("CARGO_PKG_VERSION");
        assert!(text.contains(&format!("mezo_build_info{{version=\"{version}\"}} 1")), "{text}");
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_metrics_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::clone(&metrics), async {
            let _ = stopped.await;
        }));
        metrics.tokens.inc_by(4242);
        metrics.step_duration.observe(0.25);

        let (ok, missing) =
            tokio::task::spawn_blocking(move || (get(addr, "/metrics"), get(addr, "/other"))).await.unwrap();
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");
        assert!(body.contains("\nmezo_tokens_total 4242\n"), "{body}");
        assert!(body.contains("mezo_step_duration_seconds_count 1\n"), "{body}");
        assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{missing}");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn promtool_accepts_rendered_metrics() {
        let metrics = Metrics::new();
        metrics.steps.inc();
        metrics.train_loss.set(0.693);
        metrics.set_worker_memory(&[WorkerMemory::new("cuda", 5 << 30, 80 << 30).unwrap()]);
        let promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match promtool {
            Ok(child) => child,
            Err(e) => panic!(
                "`promtool` not runnable ({e}); install the Debian package: apt-get install -y prometheus"
            ),
        };
        child.stdin.take().unwrap().write_all(metrics.render().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let report =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
    }
}
