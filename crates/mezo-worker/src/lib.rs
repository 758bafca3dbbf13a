//! A worker process: registers with the coordinator, renews its lease, and serves the tasks the
//! coordinator streams to it. Tensors live on one OS thread (the engine thread), which keeps a
//! replica per run: built from the coordinator's snapshot, then kept in step by replaying logged
//! updates (seed + scalar), so no tensor crosses the network after a worker joins.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use mezo_proto::connect::{refused_by_tls, status_chain, transport_hint, AuthChannel, ConnectError, Target};
use mezo_proto::v1 as pb;
use mezo_proto::v1::worker_service_client::WorkerServiceClient;
use mezo_train::spec::config_from_spec;
use mezo_train::trainer::{state_checksum, EvalSet};
use mezo_train::Session;
use tokio::sync::{mpsc, oneshot};

pub mod memory;

#[derive(Debug, Clone)]
pub struct Options {
    /// The coordinator (e.g. http://127.0.0.1:50051) and this worker's credentials.
    pub coordinator: Target,
    /// cpu, cuda, cuda:N, or a list (cuda:0,cuda:1) to split the model over those devices
    pub device: String,
}

type Client = WorkerServiceClient<AuthChannel>;

async fn connect(target: &Target) -> Result<Client> {
    let mut last = None;
    // The coordinator may still be starting: retry for a while before giving up. A bad URL or
    // credential file is not going to fix itself: those end the worker at once.
    for _ in 0..100 {
        match target.worker().await {
            Ok(c) => return Ok(c.max_decoding_message_size(256 << 20)),
            Err(e @ ConnectError::Unreachable { .. }) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last.map_or_else(|| anyhow!("cannot reach the coordinator at {}", target.url), Into::into))
}

/// Refusals that retrying cannot cure: this worker's credentials are wrong for the coordinator.
fn refused(e: &tonic::Status, url: &str) -> Option<anyhow::Error> {
    if refused_by_tls(e) {
        return Some(anyhow!(
            "the coordinator at {url} refused this worker's TLS connection: {}{}",
            status_chain(e),
            transport_hint(url, e)
        ));
    }
    matches!(e.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied).then(|| {
        anyhow!(
            "the coordinator at {url} refused this worker ({:?}): {} (a worker sends --token-file or \
             $MEZO_TOKEN, and --tls-cert/--tls-key where the coordinator requires mutual TLS)",
            e.code(),
            e.message()
        )
    })
}

/// Runs until the coordinator goes away for good or `shutdown` resolves.
pub async fn run(opts: Options, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    tokio::pin!(shutdown);
    let mut client = connect(&opts.coordinator).await?;
    let (jobs, engine_rx) = mpsc::channel::<(pb::Task, oneshot::Sender<pb::SubmitResultRequest>)>(4);
    let handle = tokio::runtime::Handle::current();
    let engine_client = client.clone();
    let device = opts.device.clone();
    let probe = std::sync::Arc::new(memory::MemoryProbe::new(&opts.device));
    std::thread::Builder::new()
        .name("mezo-engine".into())
        .spawn(move || engine_thread(engine_rx, engine_client, handle, device))
        .context("starting the engine thread")?;
    loop {
        // A coordinator that restarts (or is killed again) mid-handshake is not a reason to quit:
        // keep trying until it answers.
        let reg = match client
            .register(pb::RegisterRequest { device: opts.device.clone(), hostname: hostname() })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => {
                if let Some(fatal) = refused(&e, &opts.coordinator.url) {
                    return Err(fatal);
                }
                eprintln!(
                    "worker: registering with {} failed ({}); retrying",
                    opts.coordinator.url,
                    status_chain(&e)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                client = connect(&opts.coordinator).await?;
                continue;
            }
        };
        let id = reg.worker_id.clone();
        eprintln!("worker {id}: registered with {} ({})", opts.coordinator.url, opts.device);
        let (lost_tx, mut lost_rx) = oneshot::channel::<()>();
        let mut hb = client.clone();
        let hb_id = id.clone();
        let hb_probe = probe.clone();
        let period = Duration::from_millis(u64::from(reg.lease_ms / 3).max(50));
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let memory = hb_probe.report();
                match hb.heartbeat(pb::HeartbeatRequest { worker_id: hb_id.clone(), memory }).await {
                    Ok(r) if r.get_ref().known => {}
                    // Unknown (our lease ran out) or unreachable: register again.
                    _ => {
                        let _ = lost_tx.send(());
                        return;
                    }
                }
            }
        });
        let mut stream = match client.tasks(pb::TasksRequest { worker_id: id.clone() }).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                eprintln!("worker {id}: opening the task stream failed ({}); registering again", e.message());
                heartbeat.abort();
                tokio::time::sleep(Duration::from_millis(200)).await;
                client = connect(&opts.coordinator).await?;
                continue;
            }
        };
        // Results go back over one long-lived stream: no per-result request overhead.
        let (results, results_rx) = mpsc::channel::<pb::SubmitResultRequest>(64);
        let mut rc = client.clone();
        let mut submitter = tokio::spawn(async move {
            rc.submit_results(tokio_stream::wrappers::ReceiverStream::new(results_rx)).await
        });
        loop {
            tokio::select! {
                _ = &mut shutdown => { heartbeat.abort(); submitter.abort(); return Ok(()); }
                _ = &mut lost_rx => break,
                // The result stream ended early: the coordinator went away.
                _ = &mut submitter => break,
                msg = stream.message() => {
                    let Some(task) = msg.ok().flatten() else { break };
                    // Straight to the engine thread, which queues it behind the task it runs (the
                    // coordinator sends a worker its next task early); the result goes back when
                    // it is done. A queued task also tells the engine not to prepare ahead now.
                    let (tx, rx) = oneshot::channel();
                    jobs.send((task, tx)).await.map_err(|_| anyhow!("the engine thread stopped"))?;
                    let (results, id) = (results.clone(), id.clone());
                    tokio::spawn(async move {
                        if let Ok(mut result) = rx.await {
                            result.worker_id = id;
                            let _ = results.send(result).await;
                        }
                    });
                }
            }
        }
        submitter.abort();
        heartbeat.abort();
        eprintln!("worker {id}: lost the coordinator; reconnecting");
        client = connect(&opts.coordinator).await?;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

struct Replica {
    session: Session,
    version: u64,
    /// The update that brought the replica to `version` (None at a snapshot): compared with the
    /// `previous` update a task carries, so a step the coordinator recomputed after a restart
    /// (different from what this replica applied) is noticed.
    last: Option<pb::StepUpdate>,
    /// The version whose state matched the coordinator's checksum ([`verify_replica`]): the
    /// step's other tasks carry the same checksum and skip recomputing it (hashing a 1.3B
    /// model's LoRA state takes ~10 ms).
    verified: Option<u64>,
}

impl Replica {
    /// Applies the logged update of step `version` (nothing for a skipped step) and moves on.
    fn apply(&mut self, u: pb::StepUpdate) -> Result<()> {
        if !u.skipped {
            self.session.apply_logged(&u.seeds, &u.grads, u.lr)?;
        }
        self.version += 1;
        self.last = Some(u);
        Ok(())
    }
}

/// Test hook (fault injection): `MEZO_FAULT_CORRUPT_REPLICA_AT=N` flips one value of this
/// worker's LoRA replica at its first checksum check of a replica at version N or later, once, so
/// the tests can watch the check catch it. Unset in normal use.
fn corrupt_at() -> Option<u64> {
    std::env::var("MEZO_FAULT_CORRUPT_REPLICA_AT").ok()?.parse().ok()
}

/// The thread that owns every tensor: replicas, forwards, replays.
fn engine_thread(
    mut jobs: mpsc::Receiver<(pb::Task, oneshot::Sender<pb::SubmitResultRequest>)>,
    client: Client,
    rt: tokio::runtime::Handle,
    device: String,
) {
    let mut replicas: HashMap<String, Replica> = HashMap::new();
    let mut corrupt = corrupt_at();
    quiet_caught_panics();
    let trace = std::env::var_os("MEZO_WORKER_TRACE").is_some_and(|v| v != "0");
    let mut last_end = std::time::Instant::now();
    let mut waiting = None;
    loop {
        let Some((task, reply)) = waiting.take().or_else(|| jobs.blocking_recv()) else { break };
        let begun = std::time::Instant::now();
        let mut r = pb::SubmitResultRequest {
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            step: task.step,
            ..Default::default()
        };
        // libtorch reports an allocation failure (out of memory on the GPU, or the CPU allocator
        // refusing) as an error that tch's tensor operators turn into a panic: catch it here, so
        // the task fails with a clear report and this worker keeps serving.
        SERVING.set(true);
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_task(&task, &mut replicas, &client, &rt, &device, &mut corrupt, &mut r.resynced)
        }))
        .unwrap_or_else(|payload| Err(anyhow!("{}", panic_text(payload.as_ref()))));
        SERVING.set(false);
        if trace {
            // Where a task's time on this worker goes (see README, "Tracing a worker"): idle
            // before it, then the whole task, then the forward alone (batch preparation included).
            let forward = match &served {
                Ok(Outcome::Losses { seconds, .. }) => format!("{:.2}", seconds * 1e3),
                _ => "-".into(),
            };
            eprintln!(
                "worker trace: run {} step {} task {}: idle {:.2} ms, task {:.2} ms, forward {forward} ms",
                task.run_id,
                task.step,
                task.task_id,
                (begun - last_end).as_secs_f64() * 1e3,
                begun.elapsed().as_secs_f64() * 1e3,
            );
        }
        match served {
            Ok(Outcome::Losses { per_seed, weight, tokens, seconds }) => {
                r.loss_plus = per_seed.iter().map(|p| p.0).collect();
                r.loss_minus = per_seed.iter().map(|p| p.1).collect();
                r.weight = weight;
                r.tokens = tokens;
                r.forward_seconds = seconds;
            }
            Ok(Outcome::Accuracy { score, correct, total }) => {
                r.correct = correct as u32;
                r.total = total as u32;
                r.score = score;
            }
            Err(e) => {
                // Report and keep serving: the task goes to another worker (an out-of-memory
                // error, say, need not end this worker). The replica may be suspect (a panic can
                // leave it half-updated): rebuild it, which also frees its memory.
                replicas.remove(&task.run_id);
                r.error = describe_failure(&format!("{e:#}"), &device);
                eprintln!(
                    "worker: task {} (run {}, step {}) failed: {}; still serving",
                    task.task_id, task.run_id, task.step, r.error
                );
            }
        }
        let _ = reply.send(r);
        last_end = std::time::Instant::now();
        // Nothing waiting: the step's other tasks are elsewhere or done, and the next step's
        // come once the coordinator has every result. Prepare that step's batch now, while the
        // GPU would idle anyway (a hint from the coordinator; a failure here is the next task's
        // to report).
        match jobs.try_recv() {
            Ok(job) => waiting = Some(job),
            Err(mpsc::error::TryRecvError::Empty) if !task.next_examples.is_empty() => {
                if let Some(rep) = replicas.get(&task.run_id) {
                    let idx: Vec<usize> = task.next_examples.iter().map(|&i| i as usize).collect();
                    let started = std::time::Instant::now();
                    SERVING.set(true); // a panic here is caught, not a crash: keep it quiet
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rep.session.prefetch(&idx)));
                    SERVING.set(false);
                    if trace {
                        eprintln!(
                            "worker trace: run {} step {}: next batch prepared in {:.2} ms",
                            task.run_id,
                            task.step + 1,
                            started.elapsed().as_secs_f64() * 1e3
                        );
                    }
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => {}
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        }
    }
}

thread_local! {
    /// True while this thread serves a task inside `catch_unwind`: a panic there is caught and
    /// reported as the task's failure, so the panic hook need not print it (with libtorch's C++
    /// frames) as if the worker had crashed.
    static SERVING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays quiet for panics caught as task failures and prints
/// every other panic as before.
fn quiet_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !SERVING.get() {
                default(info);
            }
        }));
    });
}

/// The message of a caught panic (tch panics with the libtorch error's text).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the engine panicked (no message)".into())
}

/// A task failure as the coordinator and the user see it: an allocation failure says so first,
/// with the device, and keeps libtorch's own words (how much it tried to allocate) after it.
fn describe_failure(message: &str, device: &str) -> String {
    // A panic from tch reads `called `Result::unwrap()` on an `Err` value: Torch("<libtorch's
    // message>\nException raised from <C++ frames>…")`, newlines escaped: keep libtorch's first
    // line, not the C++ frames.
    let text = match message.split_once("Torch(\"") {
        Some((_, rest)) => {
            let first = rest.split('\n').next().unwrap_or(rest);
            first.split("\\n").next().unwrap_or(first).trim_end_matches("\")").trim().to_string()
        }
        None => message.to_string(),
    };
    let lower = text.to_ascii_lowercase();
    if ["out of memory", "not enough memory", "can't allocate memory"].iter().any(|k| lower.contains(k)) {
        format!("out of memory on {device}: {text}")
    } else {
        text
    }
}

enum Outcome {
    Losses { per_seed: Vec<(f64, f64)>, weight: f64, tokens: u64, seconds: f64 },
    Accuracy { score: f64, correct: usize, total: usize },
}

fn serve_task(
    task: &pb::Task,
    replicas: &mut HashMap<String, Replica>,
    client: &Client,
    rt: &tokio::runtime::Handle,
    device: &str,
    corrupt: &mut Option<u64>,
    resynced: &mut bool,
) -> Result<Outcome> {
    prepare_replica(task, replicas, client, rt, device, corrupt, resynced)?;
    let rep = replicas.get_mut(&task.run_id).expect("prepared");
    let idx: Vec<usize> = task.examples.iter().map(|&i| i as usize).collect();
    match pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Train) {
        pb::TaskKind::Unspecified | pb::TaskKind::Train => {
            let started = std::time::Instant::now();
            let (per_seed, weight, tokens) = rep.session.train_losses(&task.seeds, &idx)?;
            let seconds = started.elapsed().as_secs_f64();
            Ok(Outcome::Losses { per_seed, weight, tokens, seconds })
        }
        pb::TaskKind::EvalDev => {
            let (score, correct, total) = rep.session.eval_subset(EvalSet::Dev, &idx)?;
            Ok(Outcome::Accuracy { score, correct, total })
        }
        pb::TaskKind::EvalTest => {
            let (score, correct, total) = rep.session.eval_subset(EvalSet::Test, &idx)?;
            Ok(Outcome::Accuracy { score, correct, total })
        }
    }
}

/// The snapshot-step check of a replica against the coordinator's state: a task that carries a
/// checksum names the state at `version - 1`, which a replica one step behind still holds (it
/// checks before applying the task's `previous` update, so a bad replica never computes the
/// task). The coordinator has that checksum when it sends the task, so the check costs the run
/// no wait. A replica already at `version` checked it in an earlier task of the step (or came
/// from a snapshot, itself checked). True when the replica differs.
fn verify_replica(task: &pb::Task, rep: &mut Replica, corrupt: &mut Option<u64>) -> bool {
    let due = !task.expected_checksum.is_empty() && rep.version + 1 == task.version;
    if !due || rep.verified == Some(rep.version) {
        return false;
    }
    if corrupt.is_some_and(|v| rep.version >= v) {
        *corrupt = None;
        let mut bytes = rep.session.state_bytes();
        if let Some(b) = bytes.first_mut() {
            *b ^= 0x40;
            if rep.session.set_state_bytes(&bytes).is_ok() {
                eprintln!(
                    "worker: fault injection: corrupted the replica of run {} at version {}",
                    task.run_id, rep.version
                );
            }
        }
    }
    if state_checksum(&rep.session.state_bytes()) != task.expected_checksum {
        return true;
    }
    rep.verified = Some(rep.version);
    false
}

/// Brings the run's replica to the task's version: keeps it when it is there (and the last update
/// it applied is the one the task names), applies the task's `previous` update when it is one step
/// behind, and otherwise rebuilds it from the coordinator's snapshot and log.
fn prepare_replica(
    task: &pb::Task,
    replicas: &mut HashMap<String, Replica>,
    client: &Client,
    rt: &tokio::runtime::Handle,
    device: &str,
    corrupt: &mut Option<u64>,
    resynced: &mut bool,
) -> Result<()> {
    if let Some(rep) = replicas.get_mut(&task.run_id) {
        if verify_replica(task, rep, corrupt) {
            // Rebuilt below from the coordinator's snapshot and log (the coordinator's own
            // data: nothing to check it against at the task's version).
            eprintln!(
                "worker: replica of run {} differs from the coordinator's at step {}; resyncing",
                task.run_id, rep.version
            );
            replicas.remove(&task.run_id);
            *resynced = true;
        }
    }
    let prev = task.previous.as_ref();
    let stale = replicas.get(&task.run_id).is_some_and(|r| {
        r.version > task.version
            || (r.version == task.version && r.last.is_some() && prev.is_some() && r.last.as_ref() != prev)
    });
    if stale {
        replicas.remove(&task.run_id);
    }
    if !replicas.contains_key(&task.run_id) {
        let snap = rt
            .block_on(client.clone().fetch_snapshot(pb::FetchSnapshotRequest { run_id: task.run_id.clone() }))
            .context("fetching the run's snapshot")?
            .into_inner();
        let spec = snap.spec.ok_or_else(|| anyhow!("snapshot without a spec"))?;
        let out = std::env::temp_dir().join(format!("mezo-worker-{}", std::process::id()));
        let (mut cfg, _, _) = config_from_spec(&spec, out)?;
        cfg.device = device.to_string();
        let mut session = Session::new(cfg).context("loading the run's model and data")?;
        session.set_state_bytes(&snap.state)?;
        if !snap.state.is_empty() && state_checksum(&session.state_bytes()) != snap.checksum {
            return Err(anyhow!("snapshot of run {} arrived corrupt (checksum mismatch)", task.run_id));
        }
        eprintln!("worker: replica of run {} from the snapshot at step {}", task.run_id, snap.step);
        replicas
            .insert(task.run_id.clone(), Replica { session, version: snap.step, last: None, verified: None });
    }
    let rep = replicas.get_mut(&task.run_id).expect("inserted above");
    // The common case: one step behind, and the task carries that step's update.
    if let Some(u) = prev.filter(|u| rep.version + 1 == task.version && u.step == rep.version) {
        rep.apply(u.clone())?;
    }
    if rep.version < task.version {
        let log = rt
            .block_on(
                client
                    .clone()
                    .fetch_log(pb::FetchLogRequest { run_id: task.run_id.clone(), from_step: rep.version }),
            )
            .context("fetching the log")?
            .into_inner();
        for u in log.updates.into_iter().take_while(|u| u.step < task.version) {
            if u.step != rep.version {
                return Err(anyhow!(
                    "log of run {} jumps from step {} to {}",
                    task.run_id,
                    rep.version,
                    u.step
                ));
            }
            rep.apply(u)?;
        }
        if rep.version != task.version {
            return Err(anyhow!(
                "log of run {} ends at step {}, task needs {}",
                task.run_id,
                rep.version,
                task.version
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::describe_failure;

    #[test]
    fn allocation_failures_are_reported_as_out_of_memory_without_cpp_frames() {
        let cuda = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to \
                    allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB\\nException raised \
                    from malloc at /pytorch/c10/cuda/CUDACachingAllocator.cpp:1:\\nframe #0: ...\")";
        assert_eq!(
            describe_failure(cuda, "cuda:0"),
            "out of memory on cuda:0: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total \
             capacity of 79.19 GiB"
        );
        let cpu = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:117] \
                   data. DefaultCPUAllocator: not enough memory: you tried to allocate 4294967296 bytes.\")";
        assert!(describe_failure(cpu, "cpu").starts_with("out of memory on cpu: [enforce fail"));
        assert!(describe_failure(cpu, "cpu").ends_with("4294967296 bytes."));
        assert_eq!(
            describe_failure("loading the run's model: no config.json", "cpu"),
            "loading the run's model: no config.json"
        );
    }
}
