//! The step's forward passes as CUDA graphs ([`mezo_core::graph`]), one per batch shape: the
//! first time a shape comes back it is captured (after a warm-up run), and from then on each
//! forward is a copy of the batch into the graph's input tensors and one replay, instead of
//! hundreds of kernel launches from the host. Replays run the captured kernels, so their results
//! are those of the eager forward on the same device.
//!
//! Set `MEZO_CUDA_GRAPHS=0` to run every forward eagerly. A shape whose capture fails (an
//! operation libtorch cannot capture) is run eagerly from then on, with one warning.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};

use mezo_core::graph::{self, Graph, Pool};
use tch::{Device, Tensor};

use crate::engine::Prepared;
use crate::error::Result;

/// Cleared by [`disable_in_this_process`].
static ALLOWED: AtomicBool = AtomicBool::new(true);

/// Turns CUDA graphs off for every engine this process makes from now on. For a process that runs
/// several engines on their own threads (`mezo train --workers N`, which serves N workers in one
/// process): graphs assume one thread drives the GPU, and a capture on one thread while another
/// thread ran its own forwards on the same GPU gave losses that differed from the eager ones (seen
/// in a test on an H200). One engine per process, as a fleet's workers run, keeps them.
pub fn disable_in_this_process() {
    ALLOWED.store(false, Ordering::SeqCst);
}

/// Graphs kept at once (least recently used dropped first). They share one memory pool, so
/// more graphs cost little memory; the bound is for the pathological many-shapes run.
const MAX_GRAPHS: usize = 16;

/// Shapes remembered as seen once, at most.
const MAX_SEEN: usize = 4096;

/// What a graph was captured for: the computation (`tag`), every input's shape, and the
/// addresses of the tensors it reads in place (weights, the trainable state), so a graph is
/// never replayed over memory that moved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub tag: &'static str,
    pub shapes: Vec<i64>,
    pub anchors: Vec<usize>,
}

struct Entry {
    key: Key,
    graph: Graph,
    /// The graph's own copies of the micro-batches and extra inputs, refilled before each replay.
    micro: Vec<Prepared>,
    /// The ids of the batches `micro` holds now ([`Prepared::id`]): the same batches again need
    /// no refill (a step's directions replay one batch; the bench replays one batch throughout).
    filled_from: Vec<u64>,
    extra: Vec<Tensor>,
    out: Tensor,
}

pub(crate) struct StepGraphs {
    device: Device,
    enabled: bool,
    pool: Option<Pool>,
    entries: VecDeque<Entry>,
    /// Shapes seen once (captured at their second sighting: a one-off shape never pays for a
    /// capture) and shapes that failed to capture (run eagerly).
    seen: HashMap<Key, u32>,
    failed: Vec<Key>,
}

impl StepGraphs {
    pub fn new(device: Device) -> Self {
        let wanted =
            ALLOWED.load(Ordering::SeqCst) && std::env::var("MEZO_CUDA_GRAPHS").map_or(true, |v| v != "0");
        StepGraphs {
            device,
            enabled: wanted && graph::supported(device),
            pool: None,
            entries: VecDeque::new(),
            seen: HashMap::new(),
            failed: Vec::new(),
        }
    }

    /// Whether forwards on this device go through graphs.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on && graph::supported(self.device);
        if !self.enabled {
            self.entries.clear();
        }
    }

    /// `body(micro, extra)`, replayed from a graph when this shape has one. `body` must be a pure
    /// function of its arguments and of the tensors named by `anchors` (read in place), with no
    /// host synchronisation, and must not write to anything but its result (the capture runs it
    /// once eagerly first). The result is the graph's output tensor: read it before the next
    /// call, which may overwrite it (the tensor `body` returns lives on: a later capture never
    /// reuses its memory).
    pub fn run(
        &mut self,
        tag: &'static str,
        micro: &[Prepared],
        extra: &[Tensor],
        anchors: Vec<usize>,
        mut body: impl FnMut(&[Prepared], &[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Some(mut shapes) = self.enabled.then(|| signature(micro)).flatten() else {
            return body(micro, extra);
        };
        for t in extra {
            shapes.push(-1);
            shapes.extend(t.size());
        }
        let key = Key { tag, shapes, anchors };
        if let Some(pos) = self.entries.iter().position(|e| e.key == key) {
            let mut e = self.entries.remove(pos).expect("found above");
            let ids: Vec<u64> = micro.iter().map(Prepared::id).collect();
            if e.filled_from != ids {
                for (dst, src) in e.micro.iter().zip(micro) {
                    dst.copy_inputs_from(src);
                }
                e.filled_from = ids;
            }
            for (dst, src) in e.extra.iter().zip(extra) {
                dst.shallow_clone().copy_(src);
            }
            e.graph.replay()?;
            let out = e.out.shallow_clone();
            self.entries.push_back(e);
            return Ok(out);
        }
        if self.failed.contains(&key) {
            return body(micro, extra);
        }
        // Bounded like the graphs: a run of ever new shapes forgets the ones it saw once.
        if self.seen.len() >= MAX_SEEN {
            self.seen.clear();
        }
        let seen = self.seen.entry(key.clone()).or_insert(0);
        *seen += 1;
        if *seen < 2 {
            return body(micro, extra);
        }
        self.seen.remove(&key);
        let static_micro: Vec<Prepared> = micro.iter().map(Prepared::deep_copy).collect();
        let static_extra: Vec<Tensor> = extra.iter().map(Tensor::copy).collect();
        if self.pool.is_none() {
            self.pool = Pool::new().ok();
        }
        match Graph::capture(self.device, self.pool, || body(&static_micro, &static_extra)) {
            Ok((graph, out)) => {
                graph.replay()?;
                let result = out.shallow_clone();
                if self.entries.len() == MAX_GRAPHS {
                    self.entries.pop_front();
                }
                let filled_from = micro.iter().map(Prepared::id).collect();
                self.entries.push_back(Entry {
                    key,
                    graph,
                    micro: static_micro,
                    extra: static_extra,
                    out,
                    filled_from,
                });
                Ok(result)
            }
            Err(e) => {
                eprintln!("warning: CUDA graph capture of the {tag} forward failed, running it eagerly: {e}");
                self.failed.push(key);
                body(micro, extra)
            }
        }
    }
}

/// Every tensor shape of the micro-batches, or `None` when one cannot be captured (the F1
/// objective decodes on the host).
fn signature(micro: &[Prepared]) -> Option<Vec<i64>> {
    let mut out = Vec::new();
    for p in micro {
        out.push(-2);
        out.extend(p.graph_shapes()?);
    }
    Some(out)
}
