//! The fleet actor: the one task that owns the [`Dispatcher`] (worker leases, the task queue) and
//! the workers' task streams. Everyone else holds a [`Fleet`] handle and talks to it over a
//! bounded channel with oneshot replies (the actor shape of "Actors with Tokio"); a run driver
//! submits a step and is answered once every one of its tasks has a result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mezo_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::dispatch::{Completion, Dispatcher, TaskKind, TaskResult, TaskSpec, WorkerId};
use crate::metrics::{Metrics, WorkerMemory};

/// Tasks a worker holds at once: the one it computes and the next, which waits in its stream so
/// that the worker starts it the moment it finishes the first, instead of idling for a round
/// trip (result to the coordinator, next task back). A worker's tasks run one after the other on
/// its GPU, so more would only keep work from a worker that frees up sooner.
pub const TASKS_IN_FLIGHT_PER_WORKER: usize = 2;

type Group = (String, u64, TaskKind);
pub(crate) type StepResults = Vec<(TaskSpec, TaskResult)>;

/// What every task of a step carries besides its seeds and examples (see `Task` in worker.proto).
#[derive(Debug, Clone, Default)]
pub struct StepContext {
    /// The logged update of step `version - 1`: a replica one step behind applies it at once.
    pub previous: Option<pb::StepUpdate>,
    /// The coordinator's state checksum at `version`, at snapshot steps (empty otherwise).
    pub expected_checksum: String,
    /// The next training step's examples, for workers to prepare ahead (empty: unknown).
    pub next_examples: Vec<u32>,
}

enum Cmd {
    Register {
        reply: oneshot::Sender<WorkerId>,
    },
    Heartbeat {
        id: WorkerId,
        memory: Option<WorkerMemory>,
        reply: oneshot::Sender<bool>,
    },
    OpenStream {
        id: WorkerId,
        tx: mpsc::Sender<Result<pb::Task, Status>>,
    },
    Submit {
        group: Group,
        version: u64,
        context: StepContext,
        parts: Vec<(Vec<u64>, Vec<u32>)>,
        done: oneshot::Sender<StepResults>,
    },
    Complete {
        worker: WorkerId,
        task: u64,
        result: TaskResult,
    },
    Workers {
        reply: oneshot::Sender<usize>,
    },
    CancelRun {
        run: String,
    },
}

/// A cheap, cloneable handle to the fleet actor.
#[derive(Clone)]
pub struct Fleet {
    tx: mpsc::Sender<Cmd>,
    /// This coordinator process's incarnation, part of every task id it hands out: task numbers
    /// restart at 1 after a restart, and a result a worker computed for the previous incarnation
    /// must never be taken for a new task that happens to reuse its number.
    incarnation: u64,
}

/// The actor is gone only when the process is shutting down.
fn gone<T>(_: T) -> Status {
    Status::unavailable("the coordinator is shutting down")
}

impl Fleet {
    /// Starts the actor; `lease` is how long a worker's heartbeat keeps its tasks.
    pub fn spawn(lease: Duration, metrics: Arc<Metrics>) -> Fleet {
        let (tx, rx) = mpsc::channel(1024);
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let actor = Actor {
            dispatch: Dispatcher::new(lease),
            streams: HashMap::new(),
            memory: HashMap::new(),
            waiters: HashMap::new(),
            contexts: HashMap::new(),
            metrics,
            incarnation,
        };
        tokio::spawn(actor.run(rx));
        Fleet { tx, incarnation }
    }

    /// The task number in a task id this incarnation issued; `None` for any other id (a stale
    /// result from before a restart, or garbage), which is acknowledged and ignored.
    pub fn parse_task_id(&self, id: &str) -> Option<u64> {
        let (inc, n) = id.split_once('-')?;
        (u64::from_str_radix(inc, 16).ok()? == self.incarnation).then_some(())?;
        n.parse().ok()
    }

    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(cmd(reply)).await.map_err(gone)?;
        rx.await.map_err(gone)
    }

    pub async fn register(&self) -> Result<WorkerId, Status> {
        self.ask(|reply| Cmd::Register { reply }).await
    }

    /// Renews `id`'s lease and records its memory report, if it sent one.
    pub async fn heartbeat(&self, id: WorkerId, memory: Option<WorkerMemory>) -> Result<bool, Status> {
        self.ask(|reply| Cmd::Heartbeat { id, memory, reply }).await
    }

    pub async fn open_stream(
        &self,
        id: WorkerId,
        tx: mpsc::Sender<Result<pb::Task, Status>>,
    ) -> Result<(), Status> {
        self.tx.send(Cmd::OpenStream { id, tx }).await.map_err(gone)
    }

    /// Queues a step's tasks and waits for all their results. `Err` when the run was cancelled.
    pub async fn run_step(
        &self,
        run: &str,
        step: u64,
        kind: TaskKind,
        version: u64,
        context: StepContext,
        parts: Vec<(Vec<u64>, Vec<u32>)>,
    ) -> Result<StepResults, Status> {
        let (done, rx) = oneshot::channel();
        let group = (run.to_string(), step, kind);
        self.tx.send(Cmd::Submit { group, version, context, parts, done }).await.map_err(gone)?;
        rx.await.map_err(|_| Status::cancelled(format!("run `{run}` was cancelled")))
    }

    /// Hands a result to the actor (no reply: a late, duplicate or unknown result is counted
    /// there, and the worker has nothing to do about it).
    pub async fn complete(&self, worker: WorkerId, task: u64, result: TaskResult) -> Result<(), Status> {
        self.tx.send(Cmd::Complete { worker, task, result }).await.map_err(gone)
    }

    pub async fn workers(&self) -> Result<usize, Status> {
        self.ask(|reply| Cmd::Workers { reply }).await
    }

    pub async fn cancel_run(&self, run: &str) {
        let _ = self.tx.send(Cmd::CancelRun { run: run.to_string() }).await;
    }
}

struct Actor {
    dispatch: Dispatcher,
    streams: HashMap<WorkerId, mpsc::Sender<Result<pb::Task, Status>>>,
    /// Each live worker's latest memory report; kept here so a worker whose lease runs out
    /// leaves the memory gauges with it.
    memory: HashMap<WorkerId, WorkerMemory>,
    waiters: HashMap<Group, oneshot::Sender<StepResults>>,
    contexts: HashMap<Group, StepContext>,
    metrics: Arc<Metrics>,
    incarnation: u64,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                _ = tick.tick() => {
                    let dead = self.dispatch.expire(Instant::now());
                    for id in dead {
                        self.streams.remove(&id);
                        self.memory.remove(&id);
                    }
                }
            }
            self.pump();
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Register { reply } => {
                let _ = reply.send(self.dispatch.register(Instant::now()));
            }
            Cmd::Heartbeat { id, memory, reply } => {
                let known = self.dispatch.heartbeat(id, Instant::now());
                if let (true, Some(m)) = (known, memory) {
                    self.memory.insert(id, m);
                }
                let _ = reply.send(known);
            }
            Cmd::OpenStream { id, tx } => {
                self.streams.insert(id, tx);
            }
            Cmd::Submit { group, version, context, parts, done } => {
                let (run, step, kind) = group.clone();
                self.dispatch.submit_step(&run, step, kind, version, parts);
                self.contexts.insert(group.clone(), context);
                self.waiters.insert(group, done);
            }
            Cmd::Complete { worker, task, result } => {
                let group = self.dispatch.task_group(task);
                let outcome = self.dispatch.complete(worker, task, result);
                if let (Completion::Accepted, Some(g)) = (outcome, group) {
                    if let Some(results) = self.dispatch.take_step(&g.0, g.1, g.2) {
                        self.contexts.remove(&g);
                        if let Some(w) = self.waiters.remove(&g) {
                            let _ = w.send(results);
                        }
                    }
                }
            }
            Cmd::Workers { reply } => {
                let _ = reply.send(self.dispatch.workers());
            }
            Cmd::CancelRun { run } => {
                self.dispatch.cancel_run(&run);
                self.waiters.retain(|(r, _, _), _| *r != run);
                self.contexts.retain(|(r, _, _), _| *r != run);
            }
        }
    }

    /// Hands queued tasks to workers' streams, up to [`TASKS_IN_FLIGHT_PER_WORKER`] each; a closed or full stream fails the task back
    /// to the queue (the worker's lease runs out on its own if it is really gone).
    fn pump(&mut self) {
        let assigned = self.dispatch.assign(Instant::now(), TASKS_IN_FLIGHT_PER_WORKER);
        for (wid, t) in assigned {
            let context = self.contexts.get(&(t.run_id.clone(), t.step, t.kind)).cloned().unwrap_or_default();
            let task = pb::Task {
                task_id: format!("{:x}-{}", self.incarnation, t.task_id),
                run_id: t.run_id.clone(),
                step: t.step,
                seeds: t.seeds.clone(),
                eps: 0.0,
                examples: t.examples.clone(),
                version: t.version,
                kind: match t.kind {
                    TaskKind::Train => pb::TaskKind::Train,
                    TaskKind::EvalDev => pb::TaskKind::EvalDev,
                    TaskKind::EvalTest => pb::TaskKind::EvalTest,
                } as i32,
                previous: context.previous,
                expected_checksum: context.expected_checksum,
                next_examples: context.next_examples,
            };
            if !self.streams.get(&wid).is_some_and(|s| s.try_send(Ok(task)).is_ok()) {
                self.dispatch.unassign(wid, t.task_id);
            }
        }
        let c = self.dispatch.counters;
        let m = &self.metrics;
        m.workers.set(self.dispatch.workers() as i64);
        m.set_worker_memory(self.memory.values());
        m.tasks_reassigned.inc_by(c.tasks_reassigned.saturating_sub(m.tasks_reassigned.get()));
        m.leases_expired.inc_by(c.leases_expired.saturating_sub(m.leases_expired.get()));
        m.tasks_failed.inc_by(c.tasks_failed.saturating_sub(m.tasks_failed.get()));
        m.duplicate_results.inc_by(c.duplicate_results.saturating_sub(m.duplicate_results.get()));
    }
}
