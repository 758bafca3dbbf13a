//! The coordinator process: the gRPC services (public `MezoService`, internal `WorkerService`),
//! one actor per run; worker leases and task dispatch live in the fleet actor ([`crate::fleet`]).
//!
//! A run's actor is the one task that owns the run's trainable state, its seed schedule and its
//! metric history. Its step loop: plan the step's tasks, wait for their results, aggregate the
//! projected gradients, apply the update to its copy of the LoRA or prefix state, log the step to the store,
//! and publish it once the store has made it durable. While it waits it keeps answering commands
//! (subscriptions, stop); the state it has made durable is published on a watch channel that
//! the gRPC handlers read. Workers keep their replicas in step by replaying the logged updates
//! (each task carries the previous one), so after joining no tensor crosses the network.
//!
//! Durability is pipelined: step t's flush runs while the workers compute step t+1, and step t is
//! published (to clients, metrics, exports and snapshots) only once it is durable; step t+1 is
//! logged only after that. A crash can lose only a step nobody outside has heard of; workers that
//! already applied it are caches: the restarted coordinator recomputes the step, and a replica that
//! ran ahead (its version, or the `previous` update its task carries, differs) rebuilds itself.
//! `Options::strict_durability` waits for each flush before the next step instead.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mezo_core::direction_seed;
use mezo_proto::v1 as pb;
use mezo_store::{RunStatus, StepRecord, Store};
use mezo_train::data::Batcher;
use mezo_train::engine::projected_grads;
use mezo_train::spec::{config_from_spec, spec_from_config, Split};
use mezo_train::trainer::{
    coordinator_state, f32_from_le_bytes, flat_state_bytes, flat_values_from_bytes, save_adapter,
    state_checksum, DataPlan,
};
use mezo_train::{Engine, TrainConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::auth::{Role, Security};
use crate::commit::Committer;
use crate::dispatch::{aggregate, plan_train, TaskKind, TaskResult, WorkerId};
use crate::fleet::{Fleet, StepContext};
use crate::metrics::{Metrics, WorkerMemory};

#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    pub lease: Duration,
    /// Default snapshot interval in steps when a run's spec gives none.
    pub snapshot_every: u64,
    /// Wait for each step's flush before dispatching the next one (instead of overlapping the
    /// flush with the next step's forwards). Slower on disks with slow fsync; no safer in outcome.
    pub strict_durability: bool,
    /// Folders a run's model and data must resolve inside (empty: anywhere). See [`crate::paths`].
    pub path_roots: Vec<PathBuf>,
}

/// What the store keeps as a run's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSpec {
    config: TrainConfig,
    data_parallel: bool,
    snapshot_every: u64,
}

/// What a run's actor has made durable, for the handlers (snapshots, exports) to read.
#[derive(Debug, Clone, Default)]
struct Published {
    /// False until the actor has recovered the run (snapshot, log replay): a worker asking for a
    /// snapshot before then waits rather than getting a state that is not the run's.
    ready: bool,
    /// Durable steps, and the LoRA or prefix state after them (empty for full-parameter runs).
    version: u64,
    bytes: Arc<Vec<u8>>,
}

type Subscription = (Vec<pb::StreamMetricsResponse>, broadcast::Receiver<pb::StreamMetricsResponse>);

enum RunCmd {
    /// The published messages from `from_step` on, and a receiver for the ones to come (taken
    /// together by the actor, so none is missed or repeated).
    Subscribe { from_step: u64, reply: oneshot::Sender<Subscription> },
    /// End the run after its current step.
    Stop,
}

/// The handlers' side of a run: its spec, what its actor published, and the actor's mailbox.
struct RunHandle {
    stored: StoredSpec,
    state: watch::Receiver<Published>,
    cmds: mpsc::Sender<RunCmd>,
}

pub struct Inner {
    opts: Options,
    /// `opts.path_roots`, canonical.
    path_roots: Vec<PathBuf>,
    store: Arc<Store>,
    /// Makes logged steps durable in batches (group commit).
    commit: Committer,
    fleet: Fleet,
    runs: Mutex<HashMap<String, Arc<RunHandle>>>,
    pub metrics: Arc<Metrics>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn store_status(e: mezo_store::StoreError) -> Status {
    use mezo_store::StoreError as E;
    match e {
        E::NotFound { .. } => Status::not_found(e.to_string()),
        E::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        E::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        E::DataLoss { .. } => Status::data_loss(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn pb_status(s: RunStatus) -> pb::RunStatus {
    match s {
        RunStatus::Pending => pb::RunStatus::Pending,
        RunStatus::Running => pb::RunStatus::Running,
        RunStatus::Completed => pb::RunStatus::Completed,
        RunStatus::Failed => pb::RunStatus::Failed,
        RunStatus::Stopped => pb::RunStatus::Stopped,
    }
}

/// The checksum the tasks of `step` carry: the state's at version `step - 1`, when that version
/// was a snapshot version (computed with its update); empty otherwise.
fn check_for(verify: &mut Option<(u64, String)>, step: u64) -> String {
    match verify.take() {
        Some((version, c)) if version + 1 == step => c,
        other => {
            *verify = other.filter(|(version, _)| *version >= step);
            String::new()
        }
    }
}
/// `MEZO_COORDINATOR_TRACE=1`: each step's timeline on stderr (when its results were all in,
/// logged, the next step sent, the own update done; each publication and snapshot write), in ms
/// since the step was sent. For finding what keeps workers waiting between steps.
fn trace_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MEZO_COORDINATOR_TRACE").is_some_and(|v| v != "0"))
}

/// Milliseconds since the process's first trace line (each line starts with it).
fn trace_clock() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e3
}
/// Starts CPU-heavy work (the coordinator's own copy of the state, updated each step) on a thread
/// of its own at a lower CPU priority, which the threads it fans out to inherit (Linux: nice is
/// per thread). On a host shared with workers, and with this coordinator's runtime, the short
/// jobs that keep the GPUs fed (dispatching tasks, taking results) then run first. Its result
/// comes through the receiver; a panic in `f` drops the sender (a receive error).
fn background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<tokio::sync::oneshot::Receiver<T>, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("mezo-update".into())
        .spawn(move || {
            #[cfg(target_os = "linux")]
            // SAFETY: plain system call on the calling thread (who = 0); a failure leaves the
            // priority as it was, which is harmless.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
            let _ = tx.send(f());
        })
        .map_err(|e| format!("starting the update thread: {e}"))?;
    Ok(rx)
}

/// What an own update gives back: the engine, and the state's bytes after the update with their
/// checksum where one is due, or the error; and when it finished, from the step's dispatch.
type OwnDone = (Engine, Result<(Vec<u8>, Option<String>), String>, Duration);

/// The coordinator's own copy of a run's trainable state (LoRA or prefix) and the update running
/// on it. Step s's update runs while step s+1's tasks compute, and is awaited only when the state
/// after it is needed: before step s+1's update starts, before an evaluation, or for the checksum
/// that step s+2's tasks carry when s+1 is a snapshot version. So a slow update (a busy host)
/// delays no dispatch unless it takes longer than a whole step.
struct OwnState {
    /// None while an update runs on it, and for full-parameter runs (no state kept).
    engine: Option<Engine>,
    running: Option<OwnUpdate>,
    /// The checksum of the state at a snapshot version, for the tasks of the step after it.
    verify: Option<(u64, String)>,
}

struct OwnUpdate {
    /// The step's entry, published once the state after it (its bytes) is here.
    pending: Pending,
    done: tokio::sync::oneshot::Receiver<OwnDone>,
    /// For the trace: when the step's results were in and logged, and whether the next step went out.
    t_results: Duration,
    t_logged: Duration,
    next_sent: bool,
}

fn trace_step(id: &str, step: u64, t_results: Duration, t_logged: Duration, next_sent: bool, done: Duration) {
    if trace_on() {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "coordinator trace {:.2}: run {id} step {step}: results {:.2} ms, logged {:.2}, next sent {}, own update done {:.2}",
            trace_clock(),
            ms(t_results),
            ms(t_logged),
            if next_sent { "yes" } else { "no (eval, check or stop)" },
            ms(done)
        );
    }
}

fn step_update(r: &StepRecord) -> pb::StepUpdate {
    pb::StepUpdate {
        step: r.step,
        seeds: r.seeds.clone(),
        grads: r.grads.clone(),
        lr: r.lr,
        skipped: r.skipped,
    }
}

impl Inner {
    pub fn open(opts: Options) -> anyhow::Result<Arc<Self>> {
        let store = Arc::new(Store::open(&opts.data_dir)?);
        let path_roots = crate::paths::canonical_roots(&opts.path_roots).map_err(anyhow::Error::msg)?;
        let metrics = Arc::new(Metrics::new());
        let inner = Arc::new(Inner {
            commit: Committer::start(store.clone()),
            path_roots,
            fleet: Fleet::spawn(opts.lease, metrics.clone()),
            opts,
            store,
            runs: Mutex::new(HashMap::new()),
            metrics,
        });
        Ok(inner)
    }

    /// Resumes every run the store says was pending or running (after a restart).
    pub fn resume_runs(self: &Arc<Self>) -> Result<usize, Status> {
        let mut n = 0;
        for (id, status) in self.store.list_runs().map_err(store_status)? {
            if matches!(status, RunStatus::Pending | RunStatus::Running) {
                let stored: StoredSpec =
                    serde_json::from_str(&self.store.run_spec(&id).map_err(store_status)?)
                        .map_err(internal)?;
                self.launch(id, stored);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Starts a run's actor and registers its handle.
    fn launch(self: &Arc<Self>, run_id: String, stored: StoredSpec) {
        let (cmds_tx, cmds) = mpsc::channel(64);
        let (state_tx, state) = watch::channel(Published::default());
        let (events, _) = broadcast::channel(1024);
        let handle = Arc::new(RunHandle { stored: stored.clone(), state, cmds: cmds_tx });
        self.runs.lock().expect("runs").insert(run_id.clone(), handle);
        let actor = RunActor {
            id: run_id,
            stored,
            inner: self.clone(),
            cmds,
            state: state_tx,
            events,
            history: Vec::new(),
            stop: false,
            pending: VecDeque::new(),
            durable: self.commit.subscribe(),
            snapshot_every: 0,
            snapshot_write: None,
        };
        tokio::spawn(actor.run());
    }

    /// Sets `mezo_runs{status}` from the store (a handful of runs: a scan is cheap, and the
    /// store is the one place every status change goes through).
    fn count_runs(&self) {
        let Ok(runs) = self.store.list_runs() else { return };
        for (name, status) in crate::metrics::RUN_STATUSES.iter().zip([
            RunStatus::Pending,
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Stopped,
        ]) {
            let n = runs.iter().filter(|(_, s)| *s == status).count();
            self.metrics.runs.with_label_values(&[name]).set(n as i64);
        }
    }

    /// The metrics history of a run that ended before this coordinator process started (so has no
    /// actor): rebuilt from the step log and the recorded dev accuracies, then the final message.
    fn stored_history(&self, run_id: &str) -> Result<Vec<pb::StreamMetricsResponse>, Status> {
        let (status, msg) = self.store.status(run_id).map_err(store_status)?;
        let evals: HashMap<u64, f64> = self.store.evals(run_id).map_err(store_status)?.into_iter().collect();
        let mut out: Vec<_> = self
            .store
            .steps(run_id, 0)
            .map_err(store_status)?
            .iter()
            .map(|rec| message(rec, evals.get(&rec.step).copied()))
            .collect();
        out.push(pb::StreamMetricsResponse {
            done: true,
            status: pb_status(status) as i32,
            message: msg,
            ..Default::default()
        });
        Ok(out)
    }

    /// A worker's result: counted in the metrics and handed to the fleet actor. False for a task
    /// this coordinator does not know (issued by an earlier incarnation, or garbage).
    async fn take_result(&self, r: pb::SubmitResultRequest) -> Result<bool, Status> {
        let wid = worker_id(&r.worker_id)?;
        let Some(task) = self.fleet.parse_task_id(&r.task_id) else {
            // Issued by an earlier incarnation of this coordinator: its step is re-issued anew.
            return Ok(false);
        };
        if r.tokens > 0 {
            self.metrics.tokens.inc_by(r.tokens);
            self.metrics.forward_duration.observe(r.forward_seconds);
        }
        if r.resynced {
            self.metrics.replica_resyncs.inc();
        }
        let result = if !r.error.is_empty() {
            TaskResult::Failed(r.error)
        } else if r.total > 0 || (r.loss_plus.is_empty() && r.correct == 0) {
            TaskResult::Accuracy { correct: r.correct, total: r.total, score: r.score }
        } else {
            TaskResult::Losses {
                per_seed: r.loss_plus.iter().copied().zip(r.loss_minus.iter().copied()).collect(),
                weight: r.weight,
            }
        };
        self.fleet.complete(wid, task, result).await?;
        Ok(true)
    }

    fn run(&self, id: &str) -> Result<Arc<RunHandle>, Status> {
        self.runs
            .lock()
            .expect("runs")
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("run `{id}` not found")))
    }
}

/// Steps logged but not yet known durable, at most: a crash loses at most this many steps (none
/// that anyone outside heard of), which the restarted coordinator recomputes.
const MAX_UNDURABLE: usize = 16;

/// A step's tasks out on the fleet. Dropping it (a failed run) stops waiting for them; the
/// run's end cancels them in the fleet.
struct InFlight(tokio::task::JoinHandle<Result<crate::fleet::StepResults, Status>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A logged step waiting for the committer: published once it is durable.
struct Pending {
    /// Its sequence number in the committer.
    seq: u64,
    rec: StepRecord,
    version: u64,
    bytes: Arc<Vec<u8>>,
    dev: Option<f64>,
    duration: Duration,
}

/// The task that owns one run (see the module docs).
struct RunActor {
    id: String,
    stored: StoredSpec,
    inner: Arc<Inner>,
    cmds: mpsc::Receiver<RunCmd>,
    state: watch::Sender<Published>,
    events: broadcast::Sender<pb::StreamMetricsResponse>,
    history: Vec<pb::StreamMetricsResponse>,
    stop: bool,
    /// Logged steps waiting for the committer, oldest first; published the moment they are durable.
    pending: VecDeque<Pending>,
    durable: watch::Receiver<crate::commit::Durable>,
    snapshot_every: u64,
    /// The snapshot being written, off the actor (see `publish`).
    snapshot_write: Option<tokio::task::JoinHandle<()>>,
}

impl RunActor {
    async fn run(mut self) {
        let result = self.drive().await;
        // The last snapshot lands before the run reports its end.
        if let Some(h) = self.snapshot_write.take() {
            let _ = h.await;
        }
        let (status, message, test) = match result {
            Ok((s, test)) => (s, String::new(), test),
            Err(e) => (RunStatus::Failed, e, None),
        };
        if !message.is_empty() {
            eprintln!("run {}: failed: {message}", self.id);
        }
        let _ = self.inner.store.set_status(&self.id, status, &message);
        self.inner.count_runs();
        self.inner.fleet.cancel_run(&self.id).await;
        // A run that failed before it was ready must not keep snapshot fetchers waiting.
        self.state.send_modify(|p| p.ready = true);
        self.send(pb::StreamMetricsResponse {
            done: true,
            status: pb_status(status) as i32,
            test_accuracy: test,
            message,
            ..Default::default()
        });
        // Finished runs still answer subscribers (their history) for as long as the process lives.
        while let Some(cmd) = self.cmds.recv().await {
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: RunCmd) {
        match cmd {
            RunCmd::Subscribe { from_step, reply } => {
                let past = self.history.iter().filter(|m| m.done || m.step >= from_step).cloned().collect();
                let _ = reply.send((past, self.events.subscribe()));
            }
            RunCmd::Stop => self.stop = true,
        }
    }

    /// Awaits `fut` while answering commands and publishing steps as they become durable.
    async fn serving<F: Future>(&mut self, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                Some(cmd) = self.cmds.recv() => self.handle(cmd),
                Ok(()) = self.durable.changed(), if !self.pending.is_empty() => self.publish_ready(),
            }
        }
    }

    /// Publishes, in order, the pending steps the committer has made durable (no waiting).
    fn publish_ready(&mut self) {
        let upto = self.durable.borrow_and_update().upto;
        while self.pending.front().is_some_and(|p| p.seq <= upto) {
            let p = self.pending.pop_front().expect("front exists");
            self.publish(p);
        }
    }

    fn send(&mut self, m: pb::StreamMetricsResponse) {
        self.history.push(m.clone());
        // No receiver is fine; a slow one misses messages rather than stalling the run.
        let _ = self.events.send(m);
    }

    /// The task's metric (accuracy, or F1 for generation tasks) over a whole eval set at
    /// `version`, split into one task per live worker.
    async fn evaluate(
        &mut self,
        step: u64,
        version: u64,
        kind: TaskKind,
        n: usize,
        context: StepContext,
    ) -> Result<f64, String> {
        let fleet = self.inner.fleet.clone();
        let parts = self.serving(fleet.workers()).await.map_err(|e| e.to_string())?.max(1);
        let idx: Vec<u32> = (0..n as u32).collect();
        let per = n.div_ceil(parts).max(1);
        let tasks: Vec<(Vec<u64>, Vec<u32>)> = idx.chunks(per).map(|c| (Vec::new(), c.to_vec())).collect();
        let id = self.id.clone();
        let results = self
            .serving(async move { fleet.run_step(&id, step, kind, version, context, tasks).await })
            .await
            .map_err(|e| e.message().to_string())?;
        let (mut c, mut t) = (0f64, 0u64);
        for (_, r) in results {
            match r {
                TaskResult::Accuracy { score, total, .. } => {
                    c += score;
                    t += u64::from(total);
                }
                other => return Err(format!("eval task returned {other:?}")),
            }
        }
        Ok(if t == 0 { 0.0 } else { c / t as f64 })
    }

    /// Sends step `step`'s tasks (the batcher's next batch, the step's direction seeds) to the
    /// fleet; its results come from the returned task.
    fn dispatch_step(
        &self,
        cfg: &TrainConfig,
        step: u64,
        batcher: &mut Batcher,
        previous: Option<pb::StepUpdate>,
        expected_checksum: String,
    ) -> InFlight {
        let batch: Vec<u32> = batcher.next_batch().into_iter().map(|i| i as u32).collect();
        let seeds: Vec<u64> = (0..cfg.directions as u32).map(|i| direction_seed(cfg.seed, step, i)).collect();
        let parts = plan_train(&seeds, &batch, self.stored.data_parallel, cfg.grad_accum.max(2));
        // Direction-parallel tasks each read the whole batch, so the next step's batch is what
        // every worker will read next (data-parallel shards are not known to a worker ahead).
        let next_examples = if self.stored.data_parallel || step + 1 >= cfg.steps {
            Vec::new()
        } else {
            batcher.peek().iter().map(|&i| i as u32).collect()
        };
        let context = StepContext { previous, expected_checksum, next_examples };
        let (fleet, id) = (self.inner.fleet.clone(), self.id.clone());
        InFlight(tokio::spawn(async move {
            fleet.run_step(&id, step, TaskKind::Train, step, context, parts).await
        }))
    }

    /// Trains the run to its end (or a stop); the test accuracy when it completed.
    async fn drive(&mut self) -> Result<(RunStatus, Option<f64>), String> {
        let cfg = self.stored.config.clone();
        let c2 = cfg.clone();
        let plan = self
            .serving(tokio::task::spawn_blocking(move || DataPlan::new(&c2)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        // The coordinator's copy of the LoRA or prefix state (none for full-parameter runs). A
        // prefix's initial values come from the base model's activations: computed here once
        // (recomputed, with the same bits, after a restart) and shipped to the workers in their
        // snapshots, like every later state.
        let c3 = cfg.clone();
        let initial = self
            .serving(tokio::task::spawn_blocking(move || coordinator_state(&c3)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let store = &self.inner.store;
        store.set_status(&self.id, RunStatus::Running, "").map_err(|e| e.to_string())?;
        self.inner.count_runs();
        let (engine, logged) = recover_state(store, &self.id, &cfg, initial)?;
        let mut batcher =
            Batcher::new(plan.train_lengths.clone(), cfg.batch_size, cfg.seed).map_err(|e| e.to_string())?;
        let evals: HashMap<u64, f64> =
            store.evals(&self.id).map_err(|e| e.to_string())?.into_iter().collect();
        for rec in &logged {
            let _ = batcher.next_batch();
            self.send(message(rec, evals.get(&rec.step).copied()));
        }
        let mut step = logged.len() as u64;
        let mut last = logged.last().cloned();
        let bytes = Arc::new(engine.as_ref().map_or_else(Vec::new, |e| flat_state_bytes(&e.trainable)));
        self.state.send_replace(Published { ready: true, version: step, bytes: bytes.clone() });
        let snapshot_every = if self.stored.snapshot_every > 0 {
            self.stored.snapshot_every
        } else {
            self.inner.opts.snapshot_every
        };
        self.snapshot_every = snapshot_every;
        let mut own = OwnState { engine, running: None, verify: None };
        // The next step, dispatched before this one's bookkeeping (see below).
        let mut next: Option<(Instant, InFlight)> = None;
        // A step in flight always completes and is logged, as a step that was waited for does.
        while step < cfg.steps && (next.is_some() || !self.stop) {
            let (started, mut in_flight) = match next.take() {
                Some(n) => n,
                None => {
                    // Not pipelined (the first step, or after an evaluation or a stop): the state
                    // before this step, and its checksum, are complete first.
                    self.settle_own(&mut own).await?;
                    let checksum = check_for(&mut own.verify, step);
                    let previous = last.as_ref().map(step_update);
                    (Instant::now(), self.dispatch_step(&cfg, step, &mut batcher, previous, checksum))
                }
            };
            let results = self
                .serving(&mut in_flight.0)
                .await
                .map_err(|e| format!("step {step}'s dispatch: {e}"))?
                .map_err(|e| e.message().to_string())?;
            let t_results = started.elapsed();
            let agg = aggregate(&results)?;
            let lr = cfg.schedule.lr(cfg.lr, step, cfg.steps);
            let grads = projected_grads(&agg.losses, cfg.eps);
            let rec = StepRecord {
                step,
                seeds: agg.seeds.clone(),
                grads: grads.clone().unwrap_or_default(),
                lr,
                losses: agg.losses.clone(),
                skipped: grads.is_none(),
            };
            self.inner.store.log_step(&self.id, &rec).map_err(|e| e.to_string())?;
            let seq = self.inner.commit.logged();
            let t_logged = started.elapsed();
            step += 1;
            // The next step needs only this step's logged scalars (the workers replay them), so
            // it goes out now and the coordinator's own copy of the state catches up while the
            // workers compute. Not before an evaluation, which reads this state, nor after a stop.
            let eval_due = cfg.eval_every > 0 && (step % cfg.eval_every == 0 || step == cfg.steps);
            if step < cfg.steps && !eval_due && !self.stop {
                // At snapshot versions the workers check their replicas against this state: the
                // checksum of version step - 1 comes from the update before this step's, and goes
                // out with this dispatch (a replica checks it before applying this step's update).
                let version = step - 1;
                if own.running.is_some() && snapshot_every > 0 && version.is_multiple_of(snapshot_every) {
                    self.settle_own(&mut own).await?;
                }
                let previous = Some(step_update(&rec));
                let checksum = check_for(&mut own.verify, step);
                next =
                    Some((Instant::now(), self.dispatch_step(&cfg, step, &mut batcher, previous, checksum)));
            }
            // Updates apply in order to the one engine: the previous one ends before this one starts.
            self.settle_own(&mut own).await?;
            let context = StepContext { previous: Some(step_update(&rec)), ..Default::default() };
            last = Some(rec.clone());
            let mut p = Pending {
                seq,
                rec,
                version: step,
                bytes: Arc::new(Vec::new()),
                dev: None,
                duration: Duration::ZERO,
            };
            // The update and the state's bytes are CPU work (a fused pass on every core, ~10 ms
            // for 1.3B's LoRA with 8 directions): off the runtime's threads, at a lower priority
            // (see `background`), and not awaited here (see `OwnState`). Run inline, they held up
            // the tasks of the next step just spawned above (a task woken by this thread waits in
            // its unstealable LIFO slot until this thread yields), and every worker sat idle for
            // them at each step's start; awaited here, an update longer than the next step's
            // forwards (a busy host) still did.
            let next_sent = next.is_some();
            if let Some(mut e) = own.engine.take() {
                let verify_due = snapshot_every > 0 && step.is_multiple_of(snapshot_every);
                let (seeds, g) = (agg.seeds.clone(), grads.clone());
                let done = background(move || {
                    let applied = match &g {
                        Some(g) => e.apply_update(None, &seeds, g, lr).map_err(|e| e.to_string()),
                        None => Ok(()),
                    };
                    let bytes = flat_state_bytes(&e.trainable);
                    let checksum = (verify_due && !bytes.is_empty()).then(|| state_checksum(&bytes));
                    (e, applied.map(|()| (bytes, checksum)), started.elapsed())
                })?;
                own.running = Some(OwnUpdate { pending: p, done, t_results, t_logged, next_sent });
                if next.is_some() {
                    let keep = if self.inner.opts.strict_durability { 0 } else { MAX_UNDURABLE };
                    self.publish_durable(keep).await?;
                    continue;
                }
                // An evaluation, the last step or a stop: nothing to overlap.
                p = self.finish_own(&mut own).await?.expect("an update was running");
            } else {
                p.duration = started.elapsed();
                trace_step(&self.id, p.rec.step, t_results, t_logged, next_sent, p.duration);
            }
            if eval_due {
                let acc = self.evaluate(step, step, TaskKind::EvalDev, plan.n_dev, context).await?;
                // Kept so a client charting the run later (`mezo report`) sees it after a restart.
                self.inner.store.append_eval(&self.id, p.rec.step, acc).map_err(|e| e.to_string())?;
                p.dev = Some(acc);
            }
            self.pending.push_back(p);
            let keep = if self.inner.opts.strict_durability { 0 } else { MAX_UNDURABLE };
            self.publish_durable(keep).await?;
        }
        self.settle_own(&mut own).await?;
        self.publish_durable(0).await?;
        if self.stop && step < cfg.steps {
            return Ok((RunStatus::Stopped, None));
        }
        // The test set once, with the final state (every run ends where `mezo train` ends).
        let test = if plan.n_test > 0 {
            let context = StepContext { previous: last.as_ref().map(step_update), ..Default::default() };
            Some(self.evaluate(step, step, TaskKind::EvalTest, plan.n_test, context).await?)
        } else {
            None
        };
        Ok((RunStatus::Completed, test))
    }

    /// Waits for the own update in flight, if any (see [`OwnState`]): the engine comes back, the
    /// checksum it computed is kept for the next dispatch, and the step's entry, now with the
    /// state's bytes, is returned for publishing.
    async fn finish_own(&mut self, own: &mut OwnState) -> Result<Option<Pending>, String> {
        let Some(u) = own.running.take() else { return Ok(None) };
        let step = u.pending.rec.step;
        let (e, done, took) = self
            .serving(u.done)
            .await
            .map_err(|_| format!("step {step}'s update: the update thread panicked"))?;
        own.engine = Some(e);
        let (bytes, checksum) = done.map_err(|e| format!("step {step}'s update: {e}"))?;
        own.verify = checksum.map(|c| (u.pending.version, c));
        trace_step(&self.id, step, u.t_results, u.t_logged, u.next_sent, took);
        Ok(Some(Pending { bytes: Arc::new(bytes), duration: took, ..u.pending }))
    }

    /// [`Self::finish_own`], its step's entry queued for publishing.
    async fn settle_own(&mut self, own: &mut OwnState) -> Result<(), String> {
        if let Some(p) = self.finish_own(own).await? {
            self.pending.push_back(p);
        }
        Ok(())
    }

    /// Publishes the pending steps that are durable, in order, waiting for the oldest ones while
    /// more than `keep` remain.
    async fn publish_durable(&mut self, keep: usize) -> Result<(), String> {
        while let Some(seq) = self.pending.front().map(|p| p.seq) {
            if !self.inner.commit.is_durable(seq)? {
                if self.pending.len() <= keep {
                    break;
                }
                let inner = self.inner.clone();
                self.serving(async move { inner.commit.wait(seq).await }).await?;
            }
            // `serving` may have published it meanwhile.
            if self.pending.front().is_some_and(|p| p.seq == seq) {
                let p = self.pending.pop_front().expect("front exists");
                self.publish(p);
            }
        }
        Ok(())
    }

    /// Tells everyone about a durable step: the published state, a snapshot when one is due,
    /// metrics, subscribers.
    fn publish(&mut self, p: Pending) {
        self.state.send_replace(Published { ready: true, version: p.version, bytes: p.bytes.clone() });
        let m = &self.inner.metrics;
        let every = self.snapshot_every;
        let due = every > 0 && p.version.is_multiple_of(every) && !p.bytes.is_empty();
        let busy = self.snapshot_write.as_ref().is_some_and(|h| !h.is_finished());
        if due && busy {
            // Still writing the one before (a disk far slower than the run): skip this one.
            eprintln!(
                "run {}: the snapshot at step {} is skipped, the previous one is still being written",
                self.id, p.version
            );
        } else if due {
            // A snapshot only shortens a replay (the log is the truth): a failed one is reported
            // and the run goes on; recovery falls back to an older snapshot or the whole log.
            // Written off the actor: an fsync of the state (tens of ms, once 400 ms on the device
            // machine's disk) stalled the next step's dispatch while every worker waited.
            let (inner, id, version, bytes) =
                (self.inner.clone(), self.id.clone(), p.version, p.bytes.clone());
            self.snapshot_write = Some(tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                match inner.store.write_snapshot(&id, version, &bytes) {
                    Ok(_) => {
                        let _ = inner.store.prune_snapshots(&id, 3);
                    }
                    Err(e) => eprintln!("run {id}: writing the snapshot at step {version}: {e}"),
                }
                inner.metrics.checkpoint_duration.observe(t.elapsed().as_secs_f64());
                if trace_on() {
                    eprintln!(
                        "coordinator trace {:.2}: run {id} snapshot at step {version} written in {:.2} ms",
                        trace_clock(),
                        t.elapsed().as_secs_f64() * 1e3
                    );
                }
            }));
        }
        if trace_on() {
            eprintln!(
                "coordinator trace {:.2}: run {} step {} published",
                trace_clock(),
                self.id,
                p.rec.step
            );
        }
        m.steps.inc();
        if p.rec.skipped {
            m.skipped_steps.inc();
        }
        m.step_duration.observe(p.duration.as_secs_f64());
        let msg = message(&p.rec, p.dev);
        if msg.loss.is_finite() {
            m.train_loss.set(msg.loss);
        }
        if msg.projected_grad.is_finite() {
            m.projected_grad.set(msg.projected_grad);
        }
        if let Some(d) = p.dev {
            m.dev_accuracy.set(d);
        }
        self.send(msg);
    }
}

/// A run's trainable state (LoRA or prefix; None for full-parameter runs) rebuilt from the store:
/// the initial state, then the newest valid snapshot, then the log after it (the log is the
/// source of truth; a snapshot only shortens the replay). Stateful rules keep optimizer state
/// that snapshots do not hold, so they replay the whole log. Also returns the whole log.
fn recover_state(
    store: &Store,
    id: &str,
    cfg: &TrainConfig,
    initial: Option<mezo_train::Trainable>,
) -> Result<(Option<Engine>, Vec<StepRecord>), String> {
    let settings = cfg.step_settings().map_err(|e| e.to_string())?;
    let mut engine = initial.map(|t| Engine::new(t, settings, tch::Device::Cpu));
    let logged = store.steps(id, 0).map_err(|e| e.to_string())?;
    let mut from = 0u64;
    if let (Some(l), true) = (
        engine.as_mut().and_then(|e| e.trainable.flat_state_mut()),
        cfg.optimizer == mezo_train::OptimizerSpec::ZoSgd,
    ) {
        let (snap, warnings) = store.latest_snapshot(id).map_err(|e| e.to_string())?;
        for w in warnings {
            eprintln!("run {id}: skipped a snapshot: {w}");
        }
        if let Some((meta, bytes)) = snap.filter(|(m, _)| m.step <= logged.len() as u64) {
            match flat_values_from_bytes(&bytes, l.flat.numel()) {
                Ok(v) => {
                    l.flat = tch::Tensor::from_slice(&v);
                    from = meta.step;
                    eprintln!(
                        "run {id}: restored the snapshot at step {from}, replaying {} logged step(s)",
                        logged.len() as u64 - from
                    );
                }
                Err(why) => eprintln!(
                    "run {id}: snapshot {} does not fit the run ({why}); replaying the whole log",
                    meta.file.display()
                ),
            }
        }
    }
    if let Some(e) = engine.as_mut() {
        for rec in logged.iter().filter(|r| !r.skipped && r.step >= from) {
            e.apply_update(None, &rec.seeds, &rec.grads, rec.lr).map_err(|e| e.to_string())?;
        }
    }
    Ok((engine, logged))
}

/// A step as subscribers see it: the mean loss over directions and the mean projected gradient.
fn message(rec: &StepRecord, dev: Option<f64>) -> pb::StreamMetricsResponse {
    let n = rec.losses.len().max(1) as f64;
    let loss = rec.losses.iter().map(|(a, b)| (a + b) / 2.0).sum::<f64>() / n;
    let g =
        if rec.grads.is_empty() { f64::NAN } else { rec.grads.iter().sum::<f64>() / rec.grads.len() as f64 };
    pb::StreamMetricsResponse {
        step: rec.step,
        loss,
        projected_grad: g,
        lr: rec.lr,
        skipped: rec.skipped,
        dev_accuracy: dev,
        status: pb::RunStatus::Running as i32,
        ..Default::default()
    }
}

/// The public service.
#[derive(Clone)]
pub struct MezoSvc(pub Arc<Inner>);

type MetricsStream = Pin<Box<dyn Stream<Item = Result<pb::StreamMetricsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::mezo_service_server::MezoService for MezoSvc {
    async fn start_run(
        &self,
        req: Request<pb::StartRunRequest>,
    ) -> Result<Response<pb::StartRunResponse>, Status> {
        let req = req.into_inner();
        let spec = req.spec.ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let run_id = if req.run_id.is_empty() {
            format!(
                "run-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis()
            )
        } else {
            req.run_id
        };
        let (config, split, snapshot_every) =
            config_from_spec(&spec, self.0.opts.data_dir.join("runs").join(&run_id))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let roots = &self.0.path_roots;
        crate::paths::confine("model", &config.model, roots).map_err(Status::invalid_argument)?;
        crate::paths::confine("data_dir", &config.data_dir, roots).map_err(Status::invalid_argument)?;
        // Bad paths or data (no model, no train.jsonl, too few examples) are the client's error,
        // reported now rather than as a failed run later.
        let check = config.clone();
        tokio::task::spawn_blocking(move || DataPlan::new(&check))
            .await
            .map_err(internal)?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let stored = StoredSpec { config, data_parallel: split == Split::Data, snapshot_every };
        self.0
            .store
            .create_run(&run_id, &serde_json::to_string(&stored).map_err(internal)?)
            .map_err(store_status)?;
        self.0.count_runs();
        self.0.launch(run_id.clone(), stored);
        Ok(Response::new(pb::StartRunResponse { run_id }))
    }

    type StreamMetricsStream = MetricsStream;

    async fn stream_metrics(
        &self,
        req: Request<pb::StreamMetricsRequest>,
    ) -> Result<Response<MetricsStream>, Status> {
        let req = req.into_inner();
        let run = match self.0.run(&req.run_id) {
            Ok(run) => run,
            // Not driven by this process: a run that ended before a restart. Its history comes
            // from the store (NotFound there too for a run that never existed).
            Err(not_here) => {
                let past = match self.0.stored_history(&req.run_id) {
                    Ok(p) => p,
                    Err(e) if e.code() == tonic::Code::NotFound => return Err(not_here),
                    Err(e) => return Err(e),
                };
                let out = past.into_iter().filter(|m| m.done || m.step >= req.from_step).map(Ok);
                return Ok(Response::new(Box::pin(tokio_stream::iter(out.collect::<Vec<_>>()))));
            }
        };
        let (reply, rx) = oneshot::channel();
        run.cmds
            .send(RunCmd::Subscribe { from_step: req.from_step, reply })
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        let (past, mut rx) = rx.await.map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        let (tx, out) = mpsc::channel(256);
        let dropped = self.0.metrics.stream_dropped.clone();
        tokio::spawn(async move {
            let mut last = None;
            for m in past {
                let done = m.done;
                last = Some(m.step);
                if tx.send(Ok(m)).await.is_err() || done {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(m) => {
                        if !m.done && last.is_some_and(|l| m.step <= l) {
                            continue;
                        }
                        let done = m.done;
                        if tx.send(Ok(m)).await.is_err() || done {
                            return;
                        }
                    }
                    // A slow subscriber misses steps rather than stalling training (counted).
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        dropped.inc_by(n);
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::GetRunResponse>, Status> {
        Ok(Response::new(self.describe(&req.into_inner().run_id)?))
    }

    async fn list_runs(
        &self,
        _: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let ids = self.0.store.list_runs().map_err(store_status)?;
        let runs = ids.iter().map(|(id, _)| self.describe(id)).collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }

    async fn stop_run(
        &self,
        req: Request<pb::StopRunRequest>,
    ) -> Result<Response<pb::StopRunResponse>, Status> {
        let id = req.into_inner().run_id;
        match self.0.run(&id) {
            Ok(run) => run
                .cmds
                .send(RunCmd::Stop)
                .await
                .map_err(|_| Status::unavailable("the coordinator is shutting down"))?,
            // A run that ended before this process started: nothing to stop; its status says how
            // it ended (NotFound for a run that never existed).
            Err(not_here) => {
                if let Err(mezo_store::StoreError::NotFound { .. }) = self.0.store.status(&id) {
                    return Err(not_here);
                }
            }
        }
        let (s, _) = self.0.store.status(&id).map_err(store_status)?;
        Ok(Response::new(pb::StopRunResponse { status: pb_status(s) as i32 }))
    }

    async fn export_adapter(
        &self,
        req: Request<pb::ExportAdapterRequest>,
    ) -> Result<Response<pb::ExportAdapterResponse>, Status> {
        let id = req.into_inner().run_id;
        let live = self.0.run(&id);
        let cfg = match &live {
            Ok(run) => run.stored.config.clone(),
            // A run that ended before this process started (no actor): its spec is in the store.
            Err(not_here) => {
                let spec = match self.0.store.run_spec(&id) {
                    Ok(s) => s,
                    Err(mezo_store::StoreError::NotFound { .. }) => return Err(not_here.clone()),
                    Err(e) => return Err(store_status(e)),
                };
                serde_json::from_str::<StoredSpec>(&spec).map_err(internal)?.config
            }
        };
        if matches!(cfg.mode, mezo_train::ModeSpec::Full { .. }) {
            return Err(Status::failed_precondition(format!(
                "run `{id}` trains all parameters: it has no adapter"
            )));
        }
        let (step, bytes) = match &live {
            Ok(run) => {
                let p = run.state.borrow();
                (p.version, p.bytes.clone())
            }
            // Rebuilt from the store as a resumed run would be: the last snapshot and the log.
            Err(_) => {
                let (inner, id2, c2) = (self.0.clone(), id.clone(), cfg.clone());
                tokio::task::spawn_blocking(move || {
                    let initial = coordinator_state(&c2).map_err(|e| e.to_string())?;
                    let (engine, logged) = recover_state(&inner.store, &id2, &c2, initial)?;
                    let bytes = engine.as_ref().map_or_else(Vec::new, |e| flat_state_bytes(&e.trainable));
                    Ok::<_, String>((logged.len() as u64, Arc::new(bytes)))
                })
                .await
                .map_err(internal)?
                .map_err(|e| Status::internal(format!("rebuilding run `{id}`'s state from the store: {e}")))?
            }
        };
        let cfg = &cfg;
        let mc = mezo_model::ModelConfig::from_dir(&cfg.model).map_err(internal)?;
        let flat = tch::Tensor::from_slice(&f32_from_le_bytes(&bytes));
        let dir = std::env::temp_dir().join(format!("mezo-export-{}-{id}-{step}", std::process::id()));
        save_adapter(cfg, &mc, flat, &dir).map_err(internal)?;
        let read = |f: &str| std::fs::read(dir.join(f)).map_err(internal);
        let resp = pb::ExportAdapterResponse {
            adapter_config_json: String::from_utf8(read("adapter_config.json")?).map_err(internal)?,
            adapter_model_safetensors: read("adapter_model.safetensors")?,
            step,
        };
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Response::new(resp))
    }
}

impl MezoSvc {
    fn describe(&self, id: &str) -> Result<pb::GetRunResponse, Status> {
        let stored: StoredSpec =
            serde_json::from_str(&self.0.store.run_spec(id).map_err(store_status)?).map_err(internal)?;
        let (status, message) = self.0.store.status(id).map_err(store_status)?;
        // Steps a client may hear of: the durable ones the run's actor published (the store's log
        // can run a few steps ahead while the committer flushes).
        let published = self.0.run(id).ok().and_then(|h| {
            let p = h.state.borrow();
            p.ready.then_some(p.version)
        });
        let steps_done = match published {
            Some(v) => v,
            None => self.0.store.next_step(id).map_err(store_status)?,
        };
        let split = if stored.data_parallel { Split::Data } else { Split::Direction };
        Ok(pb::GetRunResponse {
            run_id: id.into(),
            spec: Some(spec_from_config(&stored.config, split, stored.snapshot_every)),
            status: pb_status(status) as i32,
            steps_done,
            message,
        })
    }
}

/// The internal service workers talk to.
#[derive(Clone)]
pub struct WorkerSvc(pub Arc<Inner>);

type TaskStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;

fn worker_id(s: &str) -> Result<WorkerId, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("worker_id `{s}` is not one this coordinator issued")))
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerSvc {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let id = self.0.fleet.register().await?;
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id.to_string(),
            lease_ms: self.0.opts.lease.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let id = worker_id(&req.worker_id)?;
        let memory = req.memory.and_then(|m| WorkerMemory::new(&m.device, m.used_bytes, m.total_bytes));
        let known = self.0.fleet.heartbeat(id, memory).await?;
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }

    type TasksStream = TaskStream;

    async fn tasks(&self, req: Request<pb::TasksRequest>) -> Result<Response<TaskStream>, Status> {
        let id = worker_id(&req.into_inner().worker_id)?;
        let (tx, rx) = mpsc::channel(16);
        self.0.fleet.open_stream(id, tx).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_result(
        &self,
        req: Request<pb::SubmitResultRequest>,
    ) -> Result<Response<pb::SubmitResultResponse>, Status> {
        let accepted = self.0.take_result(req.into_inner()).await?;
        Ok(Response::new(pb::SubmitResultResponse { accepted }))
    }

    async fn submit_results(
        &self,
        req: Request<tonic::Streaming<pb::SubmitResultRequest>>,
    ) -> Result<Response<pb::SubmitResultsResponse>, Status> {
        let mut stream = req.into_inner();
        let (mut received, mut accepted) = (0, 0);
        while let Some(r) = stream.message().await? {
            received += 1;
            accepted += u64::from(self.0.take_result(r).await?);
        }
        Ok(Response::new(pb::SubmitResultsResponse { received, accepted }))
    }

    async fn fetch_snapshot(
        &self,
        req: Request<pb::FetchSnapshotRequest>,
    ) -> Result<Response<pb::FetchSnapshotResponse>, Status> {
        let id = req.into_inner().run_id;
        let run = self.0.run(&id)?;
        // A run still recovering (replaying its log after a restart) has no state to give yet.
        let mut rx = run.state.clone();
        let ready = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|p| p.ready)).await;
        if !matches!(ready, Ok(Ok(_))) {
            return Err(Status::unavailable(format!("run `{id}` is still recovering; try again")));
        }
        // Full-parameter runs hold no state: the base checkpoint is step 0, and the replica
        // replays the whole log.
        let (step, state) = {
            let p = run.state.borrow();
            if p.bytes.is_empty() {
                (0, Vec::new())
            } else {
                (p.version, p.bytes.to_vec())
            }
        };
        let split = if run.stored.data_parallel { Split::Data } else { Split::Direction };
        Ok(Response::new(pb::FetchSnapshotResponse {
            spec: Some(spec_from_config(&run.stored.config, split, run.stored.snapshot_every)),
            step,
            checksum: state_checksum(&state),
            state,
        }))
    }

    async fn fetch_log(
        &self,
        req: Request<pb::FetchLogRequest>,
    ) -> Result<Response<pb::FetchLogResponse>, Status> {
        let r = req.into_inner();
        let updates = self
            .0
            .store
            .steps(&r.run_id, r.from_step)
            .map_err(store_status)?
            .into_iter()
            .map(|s| pb::StepUpdate {
                step: s.step,
                seeds: s.seeds,
                grads: s.grads,
                lr: s.lr,
                skipped: s.skipped,
            })
            .collect();
        Ok(Response::new(pb::FetchLogResponse { updates }))
    }
}

/// The largest request either service decodes.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// The largest reply either service sends (snapshots, exported adapters).
pub const MAX_REPLY_BYTES: usize = mezo_proto::connect::MAX_REPLY_BYTES;

/// Serves both services on `listener` and /metrics on `metrics_listener` until `shutdown`,
/// admitting every caller (see [`serve_secured`]).
pub async fn serve(
    opts: Options,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_secured(opts, Security::default(), listener, metrics_listener, shutdown).await
}

/// Serves both services on `listener` (TLS and the callers' credentials as `security` says) and
/// /metrics on `metrics_listener` (plaintext, no credentials: Prometheus scrapes it, so it belongs
/// on an internal port) until `shutdown`.
pub async fn serve_secured(
    opts: Options,
    security: Security,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let inner = Inner::open(opts)?;
    let resumed = inner.resume_runs().map_err(|s| anyhow::anyhow!(s.message().to_string()))?;
    if resumed > 0 {
        eprintln!("coordinator: resumed {resumed} run(s) from the store");
    }
    inner.count_runs();
    if let Some(l) = metrics_listener {
        let m = inner.metrics.clone();
        tokio::spawn(async move {
            let _ = crate::metrics::serve(l, m, std::future::pending()).await;
        });
    }
    // Both reflection versions: grpcurl and current tools ask v1 first; older clients (grpcurl
    // before 1.9, Python's grpcio-reflection, Postman) speak only v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Every service sits behind the guard of its role; reflection is the clients' (it is how
    // their tools find the API; nobody unauthenticated needs to learn even its shape).
    let client = security.guard(Role::Client, Some(inner.metrics.clone()));
    let worker = security.guard(Role::Worker, Some(inner.metrics.clone()));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = security.tls.clone() {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(InterceptedService::new(reflection, client.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, client.clone()))
        // Message size limits, explicit: requests are small (a run spec, a result of a few
        // scalars), so 4 MiB in bounds what a client can make the coordinator buffer; replies may
        // carry a LoRA state or an adapter (26 MB for OPT-13B at r=8), so up to 1 GiB out.
        .add_service(InterceptedService::new(
            pb::mezo_service_server::MezoServiceServer::new(MezoSvc(inner.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REPLY_BYTES),
            client,
        ))
        .add_service(InterceptedService::new(
            pb::worker_service_server::WorkerServiceServer::new(WorkerSvc(inner))
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REPLY_BYTES),
            worker,
        ))
        // TCP_NODELAY: a step is a few small messages back and forth; Nagle's algorithm with
        // delayed ACKs would add ~40 ms to each.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_for;

    /// A snapshot version's checksum goes with the next step's tasks only, is kept while that
    /// step is still to come (an evaluation can put a non-pipelined dispatch in between), and is
    /// dropped once it is past.
    #[test]
    fn a_checksum_rides_on_the_step_after_its_version() {
        let mut v = Some((50, "c50".to_string()));
        assert_eq!(check_for(&mut v, 50), "", "not with the version's own step");
        assert_eq!(check_for(&mut v, 51), "c50");
        assert_eq!(v, None, "used once");
        let mut v = Some((50, "c50".to_string()));
        assert_eq!(check_for(&mut v, 53), "", "too late for it");
        assert_eq!(v, None, "a checksum past its step is dropped");
        let mut v = None;
        assert_eq!(check_for(&mut v, 7), "");
    }
}
