//! The coordinator process: the gRPC services (public `MezoService`, internal `WorkerService`),
//! one driver task per run; worker leases and task dispatch live in the fleet actor ([`crate::fleet`]).
//!
//! A run's driver owns its step loop: plan the step's tasks, wait for their results, aggregate
//! the projected gradients, apply the update to the coordinator's copy of the LoRA state, append
//! the step to the store (flushed before anyone hears of it), then publish it. Workers keep their
//! replicas in step by replaying that log, so after joining no tensor crosses the network.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mezo_core::direction_seed;
use mezo_proto::v1 as pb;
use mezo_store::{RunStatus, StepRecord, Store};
use mezo_train::data::Batcher;
use mezo_train::engine::{projected_grads, LoraState, Trainable};
use mezo_train::spec::{config_from_spec, spec_from_config, Split};
use mezo_train::trainer::{f32_from_le_bytes, lora_init_seed, lora_state_bytes, state_checksum, DataPlan};
use mezo_train::{Engine, TrainConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::dispatch::{aggregate, plan_train, Completion, TaskKind, TaskResult, WorkerId};
use crate::fleet::Fleet;
use crate::metrics::{Metrics, WorkerMemory};

#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    pub lease: Duration,
    /// Default snapshot interval in steps when a run's spec gives none.
    pub snapshot_every: u64,
}

/// What the store keeps as a run's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSpec {
    config: TrainConfig,
    data_parallel: bool,
    snapshot_every: u64,
}

struct Run {
    stored: StoredSpec,
    /// `(version, state bytes)`: the LoRA state after `version` steps (empty for full-parameter).
    state: Mutex<(u64, Vec<u8>)>,
    events: broadcast::Sender<pb::StreamMetricsResponse>,
    history: Mutex<Vec<pb::StreamMetricsResponse>>,
    stop: std::sync::atomic::AtomicBool,
}

pub struct Inner {
    opts: Options,
    store: Store,
    fleet: Fleet,
    runs: Mutex<HashMap<String, Arc<Run>>>,
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

impl Inner {
    pub fn open(opts: Options) -> Result<Arc<Self>, mezo_store::StoreError> {
        let store = Store::open(&opts.data_dir)?;
        let metrics = Arc::new(Metrics::new());
        let inner = Arc::new(Inner {
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

    fn launch(self: &Arc<Self>, run_id: String, stored: StoredSpec) {
        let (events, _) = broadcast::channel(1024);
        let run = Arc::new(Run {
            stored,
            state: Mutex::new((0, Vec::new())),
            events,
            history: Mutex::new(Vec::new()),
            stop: false.into(),
        });
        self.runs.lock().expect("runs").insert(run_id.clone(), run.clone());
        let inner = self.clone();
        tokio::spawn(async move {
            let result = inner.drive(&run_id, &run).await;
            let (status, message) = match result {
                Ok(s) => (s, String::new()),
                Err(e) => (RunStatus::Failed, e),
            };
            if !message.is_empty() {
                eprintln!("run {run_id}: failed: {message}");
            }
            let _ = inner.store.set_status(&run_id, status, &message);
            inner.count_runs();
            inner.fleet.cancel_run(&run_id).await;
            let done = pb::StreamMetricsResponse {
                done: true,
                status: pb_status(status) as i32,
                ..Default::default()
            };
            run.history.lock().expect("history").push(done.clone());
            let _ = run.events.send(done);
        });
    }

    /// Accuracy over a whole eval set, split into one task per live worker (at least one).
    async fn evaluate(
        &self,
        run_id: &str,
        step: u64,
        version: u64,
        kind: TaskKind,
        n: usize,
    ) -> Result<f64, String> {
        let parts = self.fleet.workers().await.map_err(|e| e.to_string())?.max(1);
        let idx: Vec<u32> = (0..n as u32).collect();
        let per = n.div_ceil(parts).max(1);
        let tasks: Vec<(Vec<u64>, Vec<u32>)> = idx.chunks(per).map(|c| (Vec::new(), c.to_vec())).collect();
        let results = self
            .fleet
            .run_step(run_id, step, kind, version, tasks)
            .await
            .map_err(|e| e.message().to_string())?;
        let (mut c, mut t) = (0u64, 0u64);
        for (_, r) in results {
            match r {
                TaskResult::Accuracy { correct, total } => {
                    c += u64::from(correct);
                    t += u64::from(total);
                }
                other => return Err(format!("eval task returned {other:?}")),
            }
        }
        Ok(if t == 0 { 0.0 } else { c as f64 / t as f64 })
    }

    async fn drive(self: &Arc<Self>, run_id: &str, run: &Arc<Run>) -> Result<RunStatus, String> {
        let cfg = run.stored.config.clone();
        let c2 = cfg.clone();
        let plan =
            tokio::task::spawn_blocking(move || DataPlan::new(&c2)).await.map_err(|e| e.to_string())?;
        let plan = plan.map_err(|e| e.to_string())?;
        self.store.set_status(run_id, RunStatus::Running, "").map_err(|e| e.to_string())?;
        self.count_runs();
        // The coordinator's copy of the LoRA state (none for full-parameter runs).
        let mut engine = match cfg.lora_config().map_err(|e| e.to_string())? {
            Some(lc) => {
                let mc = mezo_model::OptConfig::from_dir(&cfg.model).map_err(|e| e.to_string())?;
                let st = LoraState::init(lc, &mc, tch::Device::Cpu, lora_init_seed(cfg.seed))
                    .map_err(|e| e.to_string())?;
                let settings = cfg.step_settings().map_err(|e| e.to_string())?;
                Some(Engine::new(Trainable::Lora(st), settings, tch::Device::Cpu))
            }
            None => None,
        };
        // Recovery: the newest valid snapshot, then the log after it (the log is the source of
        // truth; a snapshot only shortens the replay). Stateful rules keep optimizer state that
        // snapshots do not hold, so they replay the whole log.
        let logged = self.store.steps(run_id, 0).map_err(|e| e.to_string())?;
        let mut from = 0u64;
        if let (Some(Engine { trainable: Trainable::Lora(l), .. }), true) =
            (engine.as_mut(), cfg.optimizer == mezo_train::OptimizerSpec::ZoSgd)
        {
            let (snap, warnings) = self.store.latest_snapshot(run_id).map_err(|e| e.to_string())?;
            for w in warnings {
                eprintln!("run {run_id}: skipped a snapshot: {w}");
            }
            if let Some((meta, bytes)) = snap.filter(|(m, _)| m.step <= logged.len() as u64) {
                let v = f32_from_le_bytes(&bytes);
                if v.len() as i64 == l.flat.numel() as i64 {
                    l.flat = tch::Tensor::from_slice(&v);
                    from = meta.step;
                    eprintln!(
                        "run {run_id}: restored the snapshot at step {from}, replaying {} logged step(s)",
                        logged.len() as u64 - from
                    );
                } else {
                    eprintln!(
                        "run {run_id}: snapshot {} has {} values, the run needs {}; replaying the whole log",
                        meta.file.display(),
                        v.len(),
                        l.flat.numel()
                    );
                }
            }
        }
        let mut batcher =
            Batcher::new(plan.train_lengths.clone(), cfg.batch_size, cfg.seed).map_err(|e| e.to_string())?;
        let evals: HashMap<u64, f64> =
            self.store.evals(run_id).map_err(|e| e.to_string())?.into_iter().collect();
        for rec in &logged {
            let _ = batcher.next_batch();
            if let (Some(e), false, true) = (engine.as_mut(), rec.skipped, rec.step >= from) {
                e.apply_update(None, &rec.seeds, &rec.grads, rec.lr).map_err(|e| e.to_string())?;
            }
            self.publish(run, rec, evals.get(&rec.step).copied());
        }
        let mut step = logged.len() as u64;
        self.set_state(run, step, engine.as_ref());
        let snapshot_every =
            if run.stored.snapshot_every > 0 { run.stored.snapshot_every } else { self.opts.snapshot_every };
        while step < cfg.steps {
            if run.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(RunStatus::Stopped);
            }
            let started = Instant::now();
            let batch: Vec<u32> = batcher.next_batch().into_iter().map(|i| i as u32).collect();
            let seeds: Vec<u64> =
                (0..cfg.directions as u32).map(|i| direction_seed(cfg.seed, step, i)).collect();
            let parts = plan_train(&seeds, &batch, run.stored.data_parallel, cfg.grad_accum.max(2));
            let results = self
                .fleet
                .run_step(run_id, step, TaskKind::Train, step, parts)
                .await
                .map_err(|e| e.message().to_string())?;
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
            if let (Some(e), Some(g)) = (engine.as_mut(), &grads) {
                e.apply_update(None, &agg.seeds, g, lr).map_err(|e| e.to_string())?;
            }
            // Durable before anyone is told.
            self.store.append_step(run_id, &rec).map_err(|e| e.to_string())?;
            step += 1;
            self.set_state(run, step, engine.as_ref());
            if snapshot_every > 0 && step % snapshot_every == 0 {
                let t = Instant::now();
                let bytes = run.state.lock().expect("state").1.clone();
                if !bytes.is_empty() {
                    self.store.write_snapshot(run_id, step, &bytes).map_err(|e| e.to_string())?;
                    let _ = self.store.prune_snapshots(run_id, 3);
                }
                self.metrics.checkpoint_duration.observe(t.elapsed().as_secs_f64());
            }
            let dev = if cfg.eval_every > 0 && (step % cfg.eval_every == 0 || step == cfg.steps) {
                let acc = self.evaluate(run_id, step, step, TaskKind::EvalDev, plan.n_dev).await?;
                // Kept so a client charting the run later (`mezo report`) sees it after a restart.
                self.store.append_eval(run_id, rec.step, acc).map_err(|e| e.to_string())?;
                Some(acc)
            } else {
                None
            };
            self.metrics.steps.inc();
            if rec.skipped {
                self.metrics.skipped_steps.inc();
            }
            self.metrics.step_duration.observe(started.elapsed().as_secs_f64());
            self.publish(run, &rec, dev);
        }
        Ok(RunStatus::Completed)
    }

    fn set_state(&self, run: &Run, version: u64, engine: Option<&Engine>) {
        let bytes = engine.map_or_else(Vec::new, |e| lora_state_bytes(&e.trainable));
        *run.state.lock().expect("state") = (version, bytes);
    }

    fn publish(&self, run: &Run, rec: &StepRecord, dev: Option<f64>) {
        let m = step_message(rec, dev);
        if m.loss.is_finite() {
            self.metrics.train_loss.set(m.loss);
        }
        if m.projected_grad.is_finite() {
            self.metrics.projected_grad.set(m.projected_grad);
        }
        if let Some(d) = dev {
            self.metrics.dev_accuracy.set(d);
        }
        run.history.lock().expect("history").push(m.clone());
        let _ = run.events.send(m);
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
    /// driver): rebuilt from the step log and the recorded dev accuracies, then the final message.
    fn stored_history(&self, run_id: &str) -> Result<Vec<pb::StreamMetricsResponse>, Status> {
        let (status, _) = self.store.status(run_id).map_err(store_status)?;
        let evals: HashMap<u64, f64> = self.store.evals(run_id).map_err(store_status)?.into_iter().collect();
        let mut out: Vec<_> = self
            .store
            .steps(run_id, 0)
            .map_err(store_status)?
            .iter()
            .map(|rec| step_message(rec, evals.get(&rec.step).copied()))
            .collect();
        out.push(pb::StreamMetricsResponse {
            done: true,
            status: pb_status(status) as i32,
            ..Default::default()
        });
        Ok(out)
    }

    fn run(&self, id: &str) -> Result<Arc<Run>, Status> {
        self.runs
            .lock()
            .expect("runs")
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("run `{id}` not found")))
    }
}

/// What clients see of one logged step: the mean of (L+ + L-)/2 over its directions as the loss,
/// and the mean projected gradient (NaN for a skipped step).
fn step_message(rec: &StepRecord, dev: Option<f64>) -> pb::StreamMetricsResponse {
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
        done: false,
        status: pb::RunStatus::Running as i32,
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
        let mut rx = run.events.subscribe();
        let past: Vec<_> = run
            .history
            .lock()
            .expect("history")
            .iter()
            .filter(|m| m.done || m.step >= req.from_step)
            .cloned()
            .collect();
        let (tx, out) = mpsc::channel(256);
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
                    // A slow subscriber misses steps rather than stalling training.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
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
        let run = self.0.run(&id)?;
        run.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (s, _) = self.0.store.status(&id).map_err(store_status)?;
        Ok(Response::new(pb::StopRunResponse { status: pb_status(s) as i32 }))
    }

    async fn export_adapter(
        &self,
        req: Request<pb::ExportAdapterRequest>,
    ) -> Result<Response<pb::ExportAdapterResponse>, Status> {
        let id = req.into_inner().run_id;
        let run = self.0.run(&id)?;
        let cfg = &run.stored.config;
        let Some(config) = cfg.lora_config().map_err(internal)? else {
            return Err(Status::failed_precondition(format!(
                "run `{id}` trains all parameters: it has no adapter"
            )));
        };
        let (step, bytes) = run.state.lock().expect("state").clone();
        let mc = mezo_model::OptConfig::from_dir(&cfg.model).map_err(internal)?;
        let adapter =
            mezo_model::Adapter { config, flat: tch::Tensor::from_slice(&f32_from_le_bytes(&bytes)) };
        let dir = std::env::temp_dir().join(format!("mezo-export-{}-{id}-{step}", std::process::id()));
        adapter.save(&dir, &mc, &cfg.model.to_string_lossy()).map_err(internal)?;
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
        let steps_done = self.0.store.next_step(id).map_err(store_status)?;
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
        let r = req.into_inner();
        let wid = worker_id(&r.worker_id)?;
        let Some(task) = self.0.fleet.parse_task_id(&r.task_id) else {
            // Issued by an earlier incarnation of this coordinator: its step is re-issued anew.
            return Ok(Response::new(pb::SubmitResultResponse { accepted: true }));
        };
        if r.tokens > 0 {
            self.0.metrics.tokens.inc_by(r.tokens);
            self.0.metrics.forward_duration.observe(r.forward_seconds);
        }
        let result = if !r.error.is_empty() {
            TaskResult::Failed(r.error.clone())
        } else if r.total > 0 || (r.loss_plus.is_empty() && r.correct == 0) {
            TaskResult::Accuracy { correct: r.correct, total: r.total }
        } else {
            TaskResult::Losses {
                per_seed: r.loss_plus.iter().copied().zip(r.loss_minus.iter().copied()).collect(),
                weight: r.weight,
            }
        };
        // A replica whose state differs from ours at the task's version gets its result refused
        // and resyncs (counted); the task is queued again.
        let mut accepted = true;
        if !r.state_checksum.is_empty() {
            if let Ok(run) = self.0.run(&r.run_id) {
                let (version, bytes) = run.state.lock().expect("state").clone();
                if version == r.step && !bytes.is_empty() && state_checksum(&bytes) != r.state_checksum {
                    accepted = false;
                }
            }
        }
        let outcome = if accepted {
            self.0.fleet.complete(wid, task, result).await?
        } else {
            self.0.metrics.replica_resyncs.inc();
            self.0.fleet.complete(wid, task, TaskResult::Failed("replica checksum mismatch".into())).await?
        };
        Ok(Response::new(pb::SubmitResultResponse { accepted: accepted && outcome != Completion::Unknown }))
    }

    async fn fetch_snapshot(
        &self,
        req: Request<pb::FetchSnapshotRequest>,
    ) -> Result<Response<pb::FetchSnapshotResponse>, Status> {
        let id = req.into_inner().run_id;
        let run = self.0.run(&id)?;
        let (step, state) = run.state.lock().expect("state").clone();
        let split = if run.stored.data_parallel { Split::Data } else { Split::Direction };
        let (step, state) = if state.is_empty() { (0, Vec::new()) } else { (step, state) };
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

/// Serves both services on `listener` and /metrics on `metrics_listener` until `shutdown`.
pub async fn serve(
    opts: Options,
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
    tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(pb::mezo_service_server::MezoServiceServer::new(MezoSvc(inner.clone())))
        .add_service(pb::worker_service_server::WorkerServiceServer::new(WorkerSvc(inner)))
        // TCP_NODELAY: a step is a few small messages back and forth; Nagle's algorithm with
        // delayed ACKs would add ~40 ms to each.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
