//! Worker leases, task dispatch and exactly-once results.
//!
//! A step of a run becomes tasks: direction-parallel (one task per direction seed, whole batch)
//! or data-parallel (every seed, one shard of the batch per task). Tasks wait in a queue and go to
//! live workers, least loaded first. A worker holds a lease that its heartbeats renew; when the
//! lease runs out the worker is dropped and its unfinished tasks go back to the front of the queue
//! (counted as reassigned). A result is accepted once per task: a late one from a worker that lost
//! the task, or a duplicate, is acknowledged but not counted again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

pub type WorkerId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    Train,
    EvalDev,
    EvalTest,
}

/// What one task asks a worker to do.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub task_id: u64,
    pub run_id: String,
    pub step: u64,
    pub kind: TaskKind,
    pub seeds: Vec<u64>,
    pub examples: Vec<u32>,
    /// Updates the replica must have applied first.
    pub version: u64,
}

/// What a worker reports for a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskResult {
    /// Per seed (in the task's order): `(L+, L-)` as weighted means, and the weight.
    Losses { per_seed: Vec<(f64, f64)>, weight: f64 },
    /// Eval tasks.
    Accuracy { correct: u32, total: u32 },
    /// The task failed on that worker (out of memory, say): it is queued again.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Accepted,
    /// Already done (a retry or a late copy from a worker that lost the lease): not counted again.
    Duplicate,
    /// Not a task this dispatcher issued.
    Unknown,
    /// A failure report: the task went back to the queue.
    Requeued,
}

#[derive(Debug)]
struct Worker {
    lease_until: Instant,
    in_flight: Vec<u64>,
}

#[derive(Debug)]
struct Task {
    spec: TaskSpec,
    owner: Option<WorkerId>,
    result: Option<TaskResult>,
    /// Failures workers reported for this task: after [`MAX_TASK_FAILURES`] it is given up.
    failures: u32,
    /// Workers that reported a failure of this task (out of memory, say): it goes to others
    /// first, so a run continues on the workers that can hold it.
    failed_on: Vec<WorkerId>,
}

/// A task that fails this many times (reported by workers: out of memory, a model a worker cannot
/// load, a bad example) ends its step with the failure instead of circling the fleet forever; the
/// run then fails with the worker's message.
pub const MAX_TASK_FAILURES: u32 = 5;

/// Counters the service exports as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub tasks_assigned: u64,
    pub tasks_reassigned: u64,
    pub tasks_failed: u64,
    pub duplicate_results: u64,
    pub leases_expired: u64,
}

/// The losses of one step, aggregated over its tasks, per direction seed in seed order.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLosses {
    pub seeds: Vec<u64>,
    pub losses: Vec<(f64, f64)>,
}

pub struct Dispatcher {
    lease: Duration,
    next_worker: WorkerId,
    next_task: u64,
    workers: BTreeMap<WorkerId, Worker>,
    tasks: HashMap<u64, Task>,
    queue: VecDeque<u64>,
    /// Tasks of each (run, step, kind), to know when a step is complete.
    groups: HashMap<(String, u64, TaskKind), Vec<u64>>,
    pub counters: Counters,
}

impl Dispatcher {
    pub fn new(lease: Duration) -> Self {
        Dispatcher {
            lease,
            next_worker: 1,
            next_task: 1,
            workers: BTreeMap::new(),
            tasks: HashMap::new(),
            queue: VecDeque::new(),
            groups: HashMap::new(),
            counters: Counters::default(),
        }
    }

    pub fn register(&mut self, now: Instant) -> WorkerId {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.insert(id, Worker { lease_until: now + self.lease, in_flight: Vec::new() });
        id
    }

    /// Renews a lease; false when the worker is unknown (expired: it must register again).
    pub fn heartbeat(&mut self, id: WorkerId, now: Instant) -> bool {
        match self.workers.get_mut(&id) {
            Some(w) => {
                w.lease_until = now + self.lease;
                true
            }
            None => false,
        }
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Drops workers whose lease has run out and requeues their unfinished tasks (first in line).
    pub fn expire(&mut self, now: Instant) -> Vec<WorkerId> {
        let dead: Vec<WorkerId> =
            self.workers.iter().filter(|(_, w)| w.lease_until <= now).map(|(&id, _)| id).collect();
        for id in &dead {
            let w = self.workers.remove(id).expect("listed above");
            self.counters.leases_expired += 1;
            for t in w.in_flight.into_iter().rev() {
                if let Some(task) = self.tasks.get_mut(&t) {
                    if task.result.is_none() {
                        task.owner = None;
                        self.queue.push_front(t);
                        self.counters.tasks_reassigned += 1;
                    }
                }
            }
        }
        dead
    }

    /// Queues the tasks of one step of a run (of one kind), returning their ids.
    pub fn submit_step(
        &mut self,
        run_id: &str,
        step: u64,
        kind: TaskKind,
        version: u64,
        parts: Vec<(Vec<u64>, Vec<u32>)>,
    ) -> Vec<u64> {
        let mut ids = Vec::with_capacity(parts.len());
        for (seeds, examples) in parts {
            let task_id = self.next_task;
            self.next_task += 1;
            let spec = TaskSpec { task_id, run_id: run_id.into(), step, kind, seeds, examples, version };
            self.tasks.insert(
                task_id,
                Task { spec, owner: None, result: None, failures: 0, failed_on: Vec::new() },
            );
            self.queue.push_back(task_id);
            ids.push(task_id);
        }
        self.groups.insert((run_id.into(), step, kind), ids.clone());
        ids
    }

    /// Hands queued tasks to live workers, least loaded first, at most `per_worker` in flight each.
    /// A task waits for a live worker that has not failed it (out of memory there, say) rather
    /// than going back to one that has, which could spend all its attempts on one small worker
    /// while a big one is busy; only when every live worker has failed it is it retried on them.
    pub fn assign(&mut self, now: Instant, per_worker: usize) -> Vec<(WorkerId, TaskSpec)> {
        let mut out = Vec::new();
        let mut waiting = VecDeque::new();
        while let Some(t) = self.queue.pop_front() {
            let task = self.tasks.get(&t).expect("queued tasks exist");
            if task.result.is_some() {
                continue;
            }
            let live = |w: &Worker| w.lease_until > now;
            let fresh_alive = self.workers.iter().any(|(id, w)| live(w) && !task.failed_on.contains(id));
            let choice = self
                .workers
                .iter()
                .filter(|(id, w)| {
                    live(w) && w.in_flight.len() < per_worker && !(fresh_alive && task.failed_on.contains(id))
                })
                .min_by_key(|(id, w)| (w.in_flight.len(), **id))
                .map(|(&id, _)| id);
            let Some(wid) = choice else {
                waiting.push_back(t);
                if !self.workers.values().any(|w| live(w) && w.in_flight.len() < per_worker) {
                    break; // nobody has room: the rest of the queue waits too
                }
                continue;
            };
            let task = self.tasks.get_mut(&t).expect("queued tasks exist");
            task.owner = Some(wid);
            self.workers.get_mut(&wid).expect("chosen above").in_flight.push(t);
            self.counters.tasks_assigned += 1;
            out.push((wid, task.spec.clone()));
        }
        waiting.append(&mut self.queue);
        self.queue = waiting;
        out
    }

    /// Records a worker's result for a task; see [`Completion`].
    /// Puts a task its worker never got (its stream was closed or full) back in the queue, without
    /// counting it as a failure of the task.
    pub fn unassign(&mut self, worker: WorkerId, task_id: u64) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.in_flight.retain(|&t| t != task_id);
        }
        if let Some(task) = self.tasks.get_mut(&task_id) {
            if task.owner == Some(worker) && task.result.is_none() {
                task.owner = None;
                self.queue.push_front(task_id);
            }
        }
    }

    pub fn complete(&mut self, worker: WorkerId, task_id: u64, result: TaskResult) -> Completion {
        let Some(task) = self.tasks.get_mut(&task_id) else { return Completion::Unknown };
        if let Some(w) = self.workers.get_mut(&worker) {
            w.in_flight.retain(|&t| t != task_id);
        }
        if task.result.is_some() {
            self.counters.duplicate_results += 1;
            return Completion::Duplicate;
        }
        if let TaskResult::Failed(msg) = result {
            self.counters.tasks_failed += 1;
            // Only the current owner's failure counts: a stale worker's report changes nothing.
            if task.owner == Some(worker) {
                task.owner = None;
                task.failures += 1;
                task.failed_on.push(worker);
                if task.failures >= MAX_TASK_FAILURES {
                    task.result = Some(TaskResult::Failed(format!(
                        "task {task_id} of step {} failed {} times, last on worker {worker}: {msg}",
                        task.spec.step, task.failures
                    )));
                    return Completion::Accepted;
                }
                self.queue.push_back(task_id);
            }
            return Completion::Requeued;
        }
        // A late result from a worker that lost the task is still a correct result for the same
        // (step, seeds, examples, version): take it, and drop the copy in flight elsewhere.
        if let Some(other) = task.owner.filter(|&o| o != worker) {
            if let Some(w) = self.workers.get_mut(&other) {
                w.in_flight.retain(|&t| t != task_id);
            }
        }
        task.result = Some(result);
        task.owner = None;
        self.queue.retain(|&t| t != task_id);
        Completion::Accepted
    }

    /// The results of a step's tasks, in submission order, once all are in (and forgets them).
    pub fn take_step(
        &mut self,
        run_id: &str,
        step: u64,
        kind: TaskKind,
    ) -> Option<Vec<(TaskSpec, TaskResult)>> {
        let key = (run_id.to_string(), step, kind);
        let ids = self.groups.get(&key)?;
        if ids.iter().any(|t| self.tasks.get(t).is_none_or(|x| x.result.is_none())) {
            return None;
        }
        let ids = self.groups.remove(&key).expect("present");
        Some(
            ids.into_iter()
                .map(|t| {
                    let task = self.tasks.remove(&t).expect("checked");
                    (task.spec, task.result.expect("checked"))
                })
                .collect(),
        )
    }

    /// Forgets every task of a run (a stopped run).
    pub fn cancel_run(&mut self, run_id: &str) {
        let ids: Vec<u64> =
            self.tasks.iter().filter(|(_, t)| t.spec.run_id == run_id).map(|(&i, _)| i).collect();
        for i in &ids {
            self.tasks.remove(i);
        }
        self.queue.retain(|t| !ids.contains(t));
        for w in self.workers.values_mut() {
            w.in_flight.retain(|t| !ids.contains(t));
        }
        self.groups.retain(|(r, _, _), _| r != run_id);
    }

    /// The (run, step, kind) a task belongs to.
    pub fn task_group(&self, task_id: u64) -> Option<(String, u64, TaskKind)> {
        self.tasks.get(&task_id).map(|t| (t.spec.run_id.clone(), t.spec.step, t.spec.kind))
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// Splits a step into tasks: direction-parallel gives one task per seed over the whole batch;
/// data-parallel gives every seed over each of `shards` slices of the batch.
pub fn plan_train(
    seeds: &[u64],
    batch: &[u32],
    data_parallel: bool,
    shards: usize,
) -> Vec<(Vec<u64>, Vec<u32>)> {
    if data_parallel {
        let shards = shards.clamp(1, batch.len().max(1));
        let per = batch.len().div_ceil(shards);
        batch.chunks(per.max(1)).map(|c| (seeds.to_vec(), c.to_vec())).collect()
    } else {
        seeds.iter().map(|&s| (vec![s], batch.to_vec())).collect()
    }
}

/// Combines a step's task results into `(L+, L-)` per seed: each seed's losses are the
/// weight-averaged losses of the shards that evaluated it. Errors when a result is malformed.
pub fn aggregate(results: &[(TaskSpec, TaskResult)]) -> Result<StepLosses, String> {
    let mut order: Vec<u64> = Vec::new();
    let mut acc: HashMap<u64, (f64, f64, f64)> = HashMap::new();
    for (spec, result) in results {
        let TaskResult::Losses { per_seed, weight } = result else {
            return Err(match result {
                TaskResult::Failed(msg) => msg.clone(),
                _ => format!("task {} of step {}: not a loss result", spec.task_id, spec.step),
            });
        };
        if per_seed.len() != spec.seeds.len() || weight.is_nan() || *weight <= 0.0 {
            return Err(format!(
                "task {} of step {}: {} losses for {} seeds, weight {weight}",
                spec.task_id,
                spec.step,
                per_seed.len(),
                spec.seeds.len()
            ));
        }
        for (&seed, &(lp, lm)) in spec.seeds.iter().zip(per_seed) {
            let e = acc.entry(seed).or_insert_with(|| {
                order.push(seed);
                (0.0, 0.0, 0.0)
            });
            e.0 += lp * weight;
            e.1 += lm * weight;
            e.2 += weight;
        }
    }
    let losses = order.iter().map(|s| acc[s]).map(|(p, m, w)| (p / w, m / w)).collect();
    Ok(StepLosses { seeds: order, losses })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn losses(l: f64) -> TaskResult {
        TaskResult::Losses { per_seed: vec![(l, l - 1.0)], weight: 1.0 }
    }

    /// A task every worker fails ends its step with the failure (the run fails with the message)
    /// after MAX_TASK_FAILURES reports, instead of being requeued forever.
    #[test]
    fn a_task_that_keeps_failing_is_given_up_with_its_message() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(ms(1000));
        let w = d.register(t0);
        d.submit_step("r", 3, TaskKind::Train, 3, plan_train(&[9], &[0, 1], false, 1));
        for i in 1..=MAX_TASK_FAILURES {
            let got = d.assign(t0, 1);
            assert_eq!(got.len(), 1, "attempt {i} is assigned");
            let c = d.complete(w, got[0].1.task_id, TaskResult::Failed("CUDA out of memory".into()));
            assert_eq!(c, if i < MAX_TASK_FAILURES { Completion::Requeued } else { Completion::Accepted });
        }
        assert!(d.assign(t0, 1).is_empty(), "not requeued again");
        let results = d.take_step("r", 3, TaskKind::Train).expect("the step ends");
        let e = aggregate(&results).unwrap_err();
        assert!(
            e.contains("failed 5 times") && e.contains("CUDA out of memory") && e.contains("step 3"),
            "{e}"
        );
        // A task its worker never received is requeued without counting as a failure.
        d.submit_step("r", 4, TaskKind::Train, 4, plan_train(&[9], &[0, 1], false, 1));
        for _ in 0..2 * MAX_TASK_FAILURES {
            let got = d.assign(t0, 1);
            d.unassign(w, got[0].1.task_id);
        }
        assert_eq!(d.queued(), 1);
        assert_eq!(d.counters.tasks_failed, u64::from(MAX_TASK_FAILURES));
    }

    /// A task that failed on one worker (out of its memory) goes to another next, even when the
    /// failing worker is the less loaded one: the run continues on the workers that can hold it.
    #[test]
    fn a_failed_task_goes_to_a_worker_that_has_not_failed_it() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(ms(1000));
        let (small, big) = (d.register(t0), d.register(t0));
        d.submit_step("r", 0, TaskKind::Train, 0, plan_train(&[1, 2], &[0, 1], false, 1));
        let got = d.assign(t0, 1);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![small, big]);
        let failed = got[0].1.task_id;
        assert_eq!(
            d.complete(small, failed, TaskResult::Failed("out of memory".into())),
            Completion::Requeued
        );
        // `small` is idle and `big` busy, so least-loaded would pick `small` again: nothing is
        // assigned until `big` has room, and then it goes to `big`.
        assert!(d.assign(t0, 1).iter().all(|(w, _)| *w == big), "went back to the worker that failed it");
        let other = got[1].1.task_id;
        assert_eq!(d.complete(big, other, losses(0.5)), Completion::Accepted);
        let again = d.assign(t0, 1);
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].0, again[0].1.task_id), (big, failed));
        // With only the failing worker left alive, it is tried again (it may have memory now).
        let t1 = t0 + ms(2000);
        d.heartbeat(small, t1);
        d.expire(t1);
        d.unassign(big, failed);
        let last = d.assign(t1, 1);
        assert_eq!((last[0].0, last[0].1.task_id), (small, failed));
    }

    #[test]
    fn tasks_spread_over_workers_least_loaded_first() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(ms(1000));
        let (a, b, c) = (d.register(t0), d.register(t0), d.register(t0));
        d.submit_step("r", 0, TaskKind::Train, 0, plan_train(&[1, 2, 3, 4, 5, 6], &[0, 1], false, 1));
        let got = d.assign(t0, 8);
        assert_eq!(got.len(), 6);
        for w in [a, b, c] {
            assert_eq!(got.iter().filter(|(x, _)| *x == w).count(), 2, "even spread");
        }
        assert_eq!(d.queued(), 0);
        assert!(d.take_step("r", 0, TaskKind::Train).is_none(), "nothing done yet");
    }

    #[test]
    fn a_dead_workers_tasks_go_elsewhere_and_count_once() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(ms(1000));
        let a = d.register(t0);
        let b = d.register(t0);
        let ids = d.submit_step("r", 7, TaskKind::Train, 7, plan_train(&[10, 11], &[0, 1, 2], false, 1));
        let got = d.assign(t0, 1);
        let a_task = got.iter().find(|(w, _)| *w == a).unwrap().1.task_id;
        let b_task = got.iter().find(|(w, _)| *w == b).unwrap().1.task_id;
        // b keeps renewing; a goes silent.
        assert!(d.heartbeat(b, t0 + ms(900)));
        assert_eq!(d.complete(b, b_task, losses(2.0)), Completion::Accepted);
        assert_eq!(d.expire(t0 + ms(1001)), vec![a]);
        assert_eq!(d.counters.tasks_reassigned, 1);
        assert!(!d.heartbeat(a, t0 + ms(1002)), "an expired worker must register again");
        // The orphaned task goes to b.
        let again = d.assign(t0 + ms(1002), 1);
        assert_eq!(again, vec![(b, got.iter().find(|(w, _)| *w == a).unwrap().1.clone())]);
        assert_eq!(d.complete(b, a_task, losses(3.0)), Completion::Accepted);
        // a comes back from the dead with its late result: acknowledged, not counted.
        assert_eq!(d.complete(a, a_task, losses(99.0)), Completion::Duplicate);
        assert_eq!(d.complete(b, b_task, losses(42.0)), Completion::Duplicate);
        let results = d.take_step("r", 7, TaskKind::Train).unwrap();
        assert_eq!(results.iter().map(|(s, _)| s.task_id).collect::<Vec<_>>(), ids);
        let agg = aggregate(&results).unwrap();
        assert_eq!(agg.seeds, vec![10, 11]);
        // The a-task's accepted value is b's 3.0, not the late 99.0.
        // a held seed 10's task (least loaded, lowest id first): b's 3.0 was accepted for it,
        // not a's late 99.0.
        assert_eq!(got.iter().find(|(w, _)| *w == a).unwrap().1.seeds, vec![10]);
        assert_eq!(agg.losses, vec![(3.0, 2.0), (2.0, 1.0)]);
        assert_eq!(d.counters.duplicate_results, 2);
        assert!(d.take_step("r", 7, TaskKind::Train).is_none(), "results are handed out once");
    }

    #[test]
    fn a_late_result_from_the_old_owner_completes_the_task() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(ms(100));
        let a = d.register(t0);
        let ids = d.submit_step("r", 0, TaskKind::Train, 0, vec![(vec![1], vec![0])]);
        d.assign(t0, 1);
        d.expire(t0 + ms(150));
        let b = d.register(t0 + ms(150));
        assert_eq!(d.assign(t0 + ms(150), 1)[0].0, b);
        // a's result arrives first: accepted; b's copy then counts as a duplicate.
        assert_eq!(d.complete(a, ids[0], losses(1.0)), Completion::Accepted);
        assert_eq!(d.complete(b, ids[0], losses(1.0)), Completion::Duplicate);
        assert!(d.assign(t0 + ms(151), 1).is_empty(), "nothing left to hand out");
        assert!(d.take_step("r", 0, TaskKind::Train).is_some());
    }

    #[test]
    fn failures_requeue_and_stale_reports_do_not() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(ms(1000));
        let a = d.register(t0);
        let b = d.register(t0);
        let ids = d.submit_step("r", 0, TaskKind::Train, 0, vec![(vec![1], vec![0])]);
        assert_eq!(d.assign(t0, 1)[0].0, a);
        assert_eq!(
            d.complete(a, ids[0], TaskResult::Failed("CUDA out of memory".into())),
            Completion::Requeued
        );
        let again = d.assign(t0, 1);
        assert_eq!(again.len(), 1);
        let owner = again[0].0;
        // A failure report from the worker that no longer owns it changes nothing.
        let other = if owner == a { b } else { a };
        assert_eq!(d.complete(other, ids[0], TaskResult::Failed("late".into())), Completion::Requeued);
        assert!(d.assign(t0, 1).is_empty());
        assert_eq!(d.complete(owner, ids[0], losses(1.0)), Completion::Accepted);
        assert_eq!(d.counters.tasks_failed, 2);
        assert_eq!(d.complete(owner, 12345, losses(1.0)), Completion::Unknown);
    }

    #[test]
    fn no_workers_no_assignment_and_cancel_forgets() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(ms(10));
        d.submit_step("r", 0, TaskKind::Train, 0, vec![(vec![1], vec![0])]);
        assert!(d.assign(t0, 4).is_empty());
        assert_eq!(d.queued(), 1);
        d.cancel_run("r");
        assert_eq!(d.queued(), 0);
        assert!(d.take_step("r", 0, TaskKind::Train).is_none());
    }

    #[test]
    fn data_parallel_losses_are_weighted_means() {
        let parts = plan_train(&[5, 6], &[0, 1, 2, 3, 4], true, 2);
        assert_eq!(parts, vec![(vec![5, 6], vec![0, 1, 2]), (vec![5, 6], vec![3, 4])]);
        let spec = |i: u64, ex: Vec<u32>| TaskSpec {
            task_id: i,
            run_id: "r".into(),
            step: 0,
            kind: TaskKind::Train,
            seeds: vec![5, 6],
            examples: ex,
            version: 0,
        };
        let results = vec![
            (
                spec(1, vec![0, 1, 2]),
                TaskResult::Losses { per_seed: vec![(1.0, 2.0), (3.0, 4.0)], weight: 3.0 },
            ),
            (spec(2, vec![3, 4]), TaskResult::Losses { per_seed: vec![(2.0, 4.0), (0.0, 1.0)], weight: 2.0 }),
        ];
        let agg = aggregate(&results).unwrap();
        assert_eq!(agg.seeds, vec![5, 6]);
        assert_eq!(agg.losses, vec![((3.0 + 4.0) / 5.0, (6.0 + 8.0) / 5.0), (9.0 / 5.0, 14.0 / 5.0)]);
        let bad = vec![(spec(3, vec![0]), TaskResult::Losses { per_seed: vec![(1.0, 1.0)], weight: 1.0 })];
        assert!(aggregate(&bad).unwrap_err().contains("1 losses for 2 seeds"));
    }
}
