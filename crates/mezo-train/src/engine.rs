//! The MeZO step (see DESIGN.md for the exact definition). A step is split in two halves so the
//! distributed service can put them on different machines:
//! [`Engine::direction_losses`] (forward passes only: `L+` and `L-` for each direction seed) and
//! [`Engine::apply_update`] (regenerates every `z_i` from its seed and applies
//! `θ ← θ − η(ĝ + λθ)` with `ĝ = (1/n) Σ g_i z_i`). Neither holds `z` for the whole model at once
//! in full-parameter mode, and neither builds an autograd graph.

use mezo_core::fused::{self, SgdUpdate};
use mezo_core::HostRng;
use mezo_core::{bits_tensor, z_from_bits, Distribution, GaussTable, StreamKey};
use std::sync::{Arc, Mutex};

use mezo_data::metrics::f1_score;
use mezo_data::ScoringRow;
use mezo_model::generate::{answer_text, greedy};
use mezo_model::prefix::PREFIX_KEY;
use mezo_model::{
    CausalLm, Decoding, LoraBatch, LoraConfig, LoraTensor, Model, ModelConfig, Opt, OptConfig, PrefixBatch,
    PrefixConfig, ScoreBatch, TextTokenizer, Tuning,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::graphs::StepGraphs;
use crate::optim::{self, Rule, Slot};

/// What a forward pass measures: the number the zeroth-order estimator differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Cross-entropy over the candidates' mean log-probabilities (MeZO's
    /// `train_as_classification`, the default for candidate tasks).
    Classification,
    /// Teacher-forced cross-entropy on the gold answer's tokens only (the default for
    /// generation tasks).
    AnswerCe,
    /// Non-differentiable: minus the accuracy of the batch's candidate predictions.
    Accuracy,
    /// Non-differentiable: minus the mean SQuAD F1 of the batch's greedy generations (MeZO's
    /// `--non_diff` objective).
    F1,
}

impl LossKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "classification" => Ok(LossKind::Classification),
            "answer-ce" | "ce" => Ok(LossKind::AnswerCe),
            "accuracy" | "acc" => Ok(LossKind::Accuracy),
            "f1" => Ok(LossKind::F1),
            _ => Err(TrainError::Config(format!(
                "unknown --loss `{s}`: expected classification, answer-ce, accuracy or f1"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LossKind::Classification => "classification",
            LossKind::AnswerCe => "answer-ce",
            LossKind::Accuracy => "accuracy",
            LossKind::F1 => "f1",
        }
    }

    /// Whether autograd can train on it (first-order Adam cannot use accuracy or F1).
    pub fn is_differentiable(self) -> bool {
        matches!(self, LossKind::Classification | LossKind::AnswerCe)
    }
}

/// What the F1 objective needs to generate and score text.
pub struct GenContext {
    pub tokenizer: Arc<TextTokenizer>,
    pub decoding: Decoding,
}

/// One training example as the loss sees it.
pub struct Item<'a> {
    /// Scoring rows: one per candidate, or the teacher-forced gold row of a generation task.
    pub rows: &'a [ScoringRow],
    /// Gold candidates (the first is the target); `[0]` for a generation task's gold row.
    pub gold: &'a [usize],
    /// Prompt tokens and reference answers (used by the F1 objective).
    pub prompt: &'a [i64],
    pub answers: &'a [String],
}

/// The candidate layout of a batch: which scoring rows belong to which example.
struct Candidates {
    /// `[examples * max_candidates]` row index (0 where padded).
    idx: Tensor,
    /// `[examples, max_candidates]`: a real candidate.
    real: Tensor,
    /// `[examples, max_candidates]`: a gold candidate.
    gold: Tensor,
    max: i64,
}

struct Generation {
    prompts: Vec<Vec<i64>>,
    answers: Vec<Vec<String>>,
    ctx: Arc<GenContext>,
}

/// The padded width a batch of rows at most `longest` tokens long gets on CUDA: `longest`
/// rounded up to a multiple of 8, or past 128 tokens of a sixteenth of the next power of two, so
/// padding adds at most 7 tokens or an eighth, and a data set's lengths fall into a handful of
/// widths (8 per doubling of length).
pub fn bucket_width(longest: usize) -> usize {
    let step = (longest.next_power_of_two() / 16).max(8);
    longest.div_ceil(step) * step
}

/// A batch of examples tokenised and placed on the device, ready for the loss.
pub struct Prepared {
    score: Option<ScoreBatch>,
    cands: Option<Candidates>,
    gen: Option<Generation>,
    labels: Tensor,
    examples: i64,
    /// The loss's denominator: examples, or answer tokens (answer-ce).
    pub weight: f64,
    /// Tokens in the input rows of one forward copy (no padding; candidates that share their
    /// inputs count once; prompts for the F1 objective).
    pub tokens: u64,
    kind: LossKind,
    /// Unique for this content: a CUDA graph last filled from the batch with this id still holds
    /// its inputs and skips copying them again (a step's directions, served one task each, read
    /// one batch). Never reused; a batch that changes takes a new one.
    id: u64,
}

/// The next [`Prepared::id`].
fn next_batch_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Prepared {
    /// A batch of candidate examples with one gold candidate each.
    pub fn new(rows: &[&[ScoringRow]], labels: &[usize], kind: LossKind, model: &Model) -> Result<Self> {
        let golds: Vec<[usize; 1]> = labels.iter().map(|&l| [l]).collect();
        let items: Vec<Item> = rows
            .iter()
            .zip(&golds)
            .map(|(r, g)| Item { rows: r, gold: g, prompt: &[], answers: &[] })
            .collect();
        Self::from_items(&items, kind, model, None)
    }

    /// Any batch; `gen` is required by the F1 objective.
    pub fn from_items(
        items: &[Item],
        kind: LossKind,
        model: &Model,
        gen: Option<&Arc<GenContext>>,
    ) -> Result<Self> {
        let dev = model.device();
        let examples = items.len() as i64;
        if items.is_empty() || items.iter().any(|it| it.rows.is_empty() || it.gold.is_empty()) {
            return Err(TrainError::Config(
                "a batch needs examples, each with a candidate and a gold".into(),
            ));
        }
        if let Some(bad) = items.iter().find(|it| it.gold.iter().any(|&g| g >= it.rows.len())) {
            return Err(TrainError::Config(format!(
                "gold candidate {:?} outside the example's {} candidates",
                bad.gold,
                bad.rows.len()
            )));
        }
        let labels =
            Tensor::from_slice(&items.iter().map(|it| it.gold[0] as i64).collect::<Vec<_>>()).to_device(dev);
        if kind == LossKind::F1 {
            let ctx =
                gen.ok_or_else(|| TrainError::Config("the f1 objective needs a generation task".into()))?;
            if items.iter().any(|it| it.prompt.is_empty() || it.answers.is_empty()) {
                return Err(TrainError::Config(
                    "--loss f1 needs a generation task (SQuAD, DROP, or a user task with --answer-field)"
                        .into(),
                ));
            }
            return Ok(Prepared {
                score: None,
                cands: None,
                tokens: items.iter().map(|it| it.prompt.len() as u64).sum(),
                gen: Some(Generation {
                    prompts: items.iter().map(|it| it.prompt.to_vec()).collect(),
                    answers: items.iter().map(|it| it.answers.to_vec()).collect(),
                    ctx: Arc::clone(ctx),
                }),
                labels,
                examples,
                weight: examples as f64,
                kind,
                id: next_batch_id(),
            });
        }
        let picked: Vec<&ScoringRow> = match kind {
            LossKind::AnswerCe => items.iter().map(|it| &it.rows[it.gold[0]]).collect(),
            _ => items.iter().flat_map(|it| it.rows.iter()).collect(),
        };
        let cands = (kind != LossKind::AnswerCe).then(|| {
            let max = items.iter().map(|it| it.rows.len()).max().unwrap_or(0);
            let (mut idx, mut real, mut gold) = (Vec::new(), Vec::new(), Vec::new());
            let mut row = 0i64;
            for it in items {
                for c in 0..max {
                    let here = c < it.rows.len();
                    idx.push(if here { row + c as i64 } else { 0 });
                    real.push(here);
                    gold.push(it.gold.contains(&c));
                }
                row += it.rows.len() as i64;
            }
            let shape = [examples, max as i64];
            Candidates {
                idx: Tensor::from_slice(&idx).to_device(dev),
                real: Tensor::from_slice(&real).view(shape).to_device(dev),
                gold: Tensor::from_slice(&gold).view(shape).to_device(dev),
                max: max as i64,
            }
        });
        let tokens: Vec<Vec<i64>> = picked.iter().map(|r| r.tokens.clone()).collect();
        let starts: Vec<usize> = picked.iter().map(|r| r.answer_start).collect();
        let weight = match kind {
            LossKind::AnswerCe => picked.iter().map(|r| (r.tokens.len() - r.answer_start) as f64).sum(),
            _ => examples as f64,
        };
        let score = model.score_batch(&tokens, &starts)?;
        let n_tokens = score.input_tokens;
        Ok(Prepared {
            score: Some(score),
            cands,
            gen: None,
            labels,
            examples,
            weight,
            tokens: n_tokens,
            kind,
            id: next_batch_id(),
        })
    }

    /// The shape of every tensor the loss reads, or `None` for a batch whose loss runs on the
    /// host (the F1 objective's decoding), which no CUDA graph can capture.
    /// On CUDA, pads the scoring rows to [`bucket_width`] (at most `max_width` columns, and never
    /// narrower than they are): forwards replay CUDA graphs captured per batch shape, and a few
    /// widths that recur let every batch replay one, where a width per batch would capture anew
    /// most steps. Elsewhere (no graphs) the rows keep their width: padding would only cost time.
    pub fn pad_to_bucket(&mut self, max_width: usize, pad: i64) {
        if let Some(s) = self.score.as_mut().filter(|s| s.ids.device().is_cuda()) {
            let now = s.ids.size()[1] as usize;
            s.widen(bucket_width(now).min(max_width).max(now) as i64, pad);
            self.id = next_batch_id();
        }
    }

    /// The padded width of the scoring rows (`None` for a batch the F1 objective decodes).
    pub fn width(&self) -> Option<i64> {
        self.score.as_ref().map(|s| s.ids.size()[1])
    }

    pub(crate) fn graph_shapes(&self) -> Option<Vec<i64>> {
        if self.gen.is_some() {
            return None;
        }
        // Tree rows take another attention mask: never the graph of plain rows.
        let tree = self.score.as_ref().is_some_and(|s| s.tree);
        let mut out = vec![self.kind as i64, self.examples, i64::from(tree)];
        let mut push = |t: &Tensor| {
            out.push(t.dim() as i64);
            out.extend(t.size());
        };
        push(&self.labels);
        if let Some(s) = &self.score {
            for t in [&s.ids, &s.mask, &s.src_row, &s.row_idx, &s.pos_idx, &s.targets, &s.counts] {
                push(t);
            }
        }
        if let Some(c) = &self.cands {
            for t in [&c.idx, &c.real, &c.gold] {
                push(t);
            }
        }
        Some(out)
    }

    /// A copy with tensors of its own (a CUDA graph's inputs, refilled by [`Self::copy_inputs_from`]).
    pub(crate) fn deep_copy(&self) -> Prepared {
        Prepared {
            score: self.score.as_ref().map(|s| ScoreBatch {
                ids: s.ids.copy(),
                mask: s.mask.copy(),
                src_row: s.src_row.copy(),
                row_idx: s.row_idx.copy(),
                pos_idx: s.pos_idx.copy(),
                targets: s.targets.copy(),
                counts: s.counts.copy(),
                rows: s.rows,
                input_tokens: s.input_tokens,
                tree: s.tree,
            }),
            cands: self.cands.as_ref().map(|c| Candidates {
                idx: c.idx.copy(),
                real: c.real.copy(),
                gold: c.gold.copy(),
                max: c.max,
            }),
            gen: None,
            labels: self.labels.copy(),
            examples: self.examples,
            weight: self.weight,
            tokens: self.tokens,
            kind: self.kind,
            id: next_batch_id(),
        }
    }

    /// See the field: equal ids, equal contents.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Copies `src`'s tensors into this batch's (same shapes: [`Self::graph_shapes`] equal).
    pub(crate) fn copy_inputs_from(&self, src: &Prepared) {
        let copy = |dst: &Tensor, src: &Tensor| dst.shallow_clone().copy_(src);
        copy(&self.labels, &src.labels);
        if let (Some(d), Some(s)) = (&self.score, &src.score) {
            for (a, b) in [
                (&d.ids, &s.ids),
                (&d.mask, &s.mask),
                (&d.src_row, &s.src_row),
                (&d.row_idx, &s.row_idx),
                (&d.pos_idx, &s.pos_idx),
                (&d.targets, &s.targets),
                (&d.counts, &s.counts),
            ] {
                copy(a, b);
            }
        }
        if let (Some(d), Some(s)) = (&self.cands, &src.cands) {
            for (a, b) in [(&d.idx, &s.idx), (&d.real, &s.real), (&d.gold, &s.gold)] {
                copy(a, b);
            }
        }
    }

    /// Mean candidate log-probabilities `[variants, examples, max_candidates]`, padding at -inf.
    fn candidate_scores(&self, sums: Tensor, score: &ScoreBatch) -> Tensor {
        let c = self.cands.as_ref().expect("candidate batches carry their layout");
        let v = sums.size()[0];
        let means = sums / &score.counts;
        let s = means.index_select(1, &c.idx).view([v, self.examples, c.max]);
        s.masked_fill(&c.real.logical_not().unsqueeze(0), f64::NEG_INFINITY)
    }

    /// The summed loss of each variant of `tuning`, `[variants]` float32 (divide by `weight`).
    pub fn loss_sums(&self, model: &Model, tuning: Option<&Tuning>) -> Result<Tensor> {
        if let Some(g) = &self.gen {
            // Greedy generations under every variant, scored on the host: -sum of F1.
            let outs = greedy(model, &g.prompts, tuning, &g.ctx.decoding)?;
            let mut sums = Vec::with_capacity(outs.len());
            for variant in outs {
                let mut s = 0.0;
                for (toks, answers) in variant.iter().zip(&g.answers) {
                    s += f1_score(&answer_text(&g.ctx.tokenizer, toks)?, answers);
                }
                sums.push(-s as f32);
            }
            return Ok(Tensor::from_slice(&sums).to_device(model.device()));
        }
        let score = self.score.as_ref().expect("scoring batches carry rows");
        let sums = model.answer_logprob_sums(score, tuning)?;
        let v = sums.size()[0];
        Ok(match self.kind {
            LossKind::Classification => {
                let logp = self.candidate_scores(sums, score).log_softmax(-1, Kind::Float);
                let idx = self.labels.view([1, self.examples, 1]).expand([v, self.examples, 1], false);
                -logp.gather(2, &idx, false).squeeze_dim(2).sum_dim_intlist(1, false, Kind::Float)
            }
            LossKind::Accuracy => {
                let pred = self.candidate_scores(sums, score).argmax(-1, true);
                let c = self.cands.as_ref().expect("candidate layout");
                let gold = c.gold.unsqueeze(0).expand([v, self.examples, c.max], false);
                let correct = gold.gather(2, &pred, false).squeeze_dim(2).to_kind(Kind::Float);
                -correct.sum_dim_intlist(1, false, Kind::Float)
            }
            LossKind::AnswerCe | LossKind::F1 => -sums.sum_dim_intlist(1, false, Kind::Float),
        })
    }
}

/// Which parameters train, and their state.
pub enum Trainable {
    Lora(LoraState),
    Prefix(PrefixState),
    Full(FullState),
}

impl Trainable {
    /// The flat vector of a LoRA or prefix state; `None` for full-parameter training.
    pub fn flat_state(&self) -> Option<&FlatState> {
        match self {
            Trainable::Lora(l) => Some(&l.state),
            Trainable::Prefix(p) => Some(&p.state),
            Trainable::Full(_) => None,
        }
    }

    pub fn flat_state_mut(&mut self) -> Option<&mut FlatState> {
        match self {
            Trainable::Lora(l) => Some(&mut l.state),
            Trainable::Prefix(p) => Some(&mut p.state),
            Trainable::Full(_) => None,
        }
    }

    /// What a forward applies for the values `flat` (`[variants, P]`, this state's layout), in
    /// the model's dtype `kind`; `None` for full-parameter training (the weights are the state).
    pub fn tuning_of(&self, flat: &Tensor, kind: Kind) -> Result<Option<Tuning>> {
        Ok(match self {
            Trainable::Lora(l) => {
                Some(Tuning::Lora(LoraBatch::from_flat(flat, &l.config, &l.tensors, kind)?))
            }
            Trainable::Prefix(p) => {
                Some(Tuning::Prefix(PrefixBatch::from_flat(flat, &p.config, &p.model, kind)?))
            }
            Trainable::Full(_) => None,
        })
    }

    /// One variant (the current θ) for evaluation.
    pub fn tuning(&self, kind: Kind) -> Result<Option<Tuning>> {
        match self.flat_state() {
            Some(f) => self.tuning_of(&f.flat.unsqueeze(0), kind),
            None => Ok(None),
        }
    }
}

/// Trainable values held as one float32 vector of named segments back to back (LoRA: one per
/// matrix; prefix: PEFT's one `prompt_embeddings`), so Z for every segment and every direction
/// comes from one vectorised pass, and a CPU update is one fused sweep. Z of element i of a
/// segment is Z(seed, segment name, i).
pub struct FlatState {
    pub flat: Tensor,
    /// Each segment's stream name and length, in order.
    segments: Vec<(String, i64)>,
    /// Element index within its own segment, and the segment it belongs to, per element.
    local_idx: Tensor,
    owner: Tensor,
    slot: Slot,
}

impl FlatState {
    pub fn new(segments: Vec<(String, i64)>, flat: Tensor, dev: Device) -> Result<Self> {
        let mut local = Vec::new();
        let mut owner = Vec::new();
        for (i, (_, n)) in segments.iter().enumerate() {
            local.extend(0..*n);
            owner.extend(std::iter::repeat_n(i as i64, *n as usize));
        }
        if flat.size() != [local.len() as i64] {
            return Err(TrainError::Config(format!(
                "the trainable state has {:?} values, the configuration needs {}",
                flat.size(),
                local.len()
            )));
        }
        Ok(FlatState {
            flat: flat.to_kind(Kind::Float).to_device(dev),
            segments,
            local_idx: Tensor::from_slice(&local).to_device(dev),
            owner: Tensor::from_slice(&owner).to_device(dev),
            slot: Slot::default(),
        })
    }

    /// `[seeds, P]` float32: row i is Z(seed_i) for every element.
    fn z(&self, seeds: &[u64], dist: Distribution, table: &GaussTable) -> Tensor {
        let (a, b) = self.keys(seeds);
        self.z_of_keys(&a, &b, dist, table)
    }

    /// Every segment's stream key under each seed: `a` and `b`, int64 `[seeds, segments]` on
    /// the state's device (one small host-to-device copy for both).
    fn keys(&self, seeds: &[u64]) -> (Tensor, Tensor) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for &s in seeds {
            for (name, _) in &self.segments {
                let k = StreamKey::new(s, name);
                a.push(k.a as i64);
                b.push(k.b as i64);
            }
        }
        // One upload for both (a copy from pageable memory waits for the stream: one wait).
        let shape = [2, seeds.len() as i64, self.segments.len() as i64];
        a.extend(b);
        let both = Tensor::from_slice(&a).view(shape).to_device(self.flat.device());
        (both.get(0), both.get(1))
    }

    /// Z from keys already on the device ([`Self::keys`]): no host data, so a CUDA graph can
    /// capture it with the keys as an input.
    fn z_of_keys(&self, a: &Tensor, b: &Tensor, dist: Distribution, table: &GaussTable) -> Tensor {
        let a = a.index_select(1, &self.owner);
        let b = b.index_select(1, &self.owner);
        z_from_bits(&bits_tensor(&self.local_idx.unsqueeze(0), &a, &b), dist, table)
    }

    /// `[2n, P]` float32: rows 2i and 2i+1 are θ+εz_i and θ-εz_i for the n directions whose
    /// keys are `a`, `b` ([`Self::keys`]). One fused kernel on CUDA (capturable), tensor ops
    /// elsewhere; the same bits (tested on the GPU).
    fn variants(
        &self,
        a: &Tensor,
        b: &Tensor,
        eps: f64,
        dist: Distribution,
        table: &GaussTable,
    ) -> Result<Tensor> {
        if !self.flat.device().is_cuda() {
            return Ok(self.variants_tensor(a, b, eps, dist, table));
        }
        let out =
            Tensor::empty([2 * a.size()[0], self.flat.numel() as i64], (Kind::Float, self.flat.device()));
        mezo_core::cuda::flat_variants(
            &out,
            &self.flat,
            a,
            b,
            &self.owner,
            &self.local_idx,
            eps as f32,
            dist,
        )?;
        Ok(out)
    }

    fn variants_tensor(
        &self,
        a: &Tensor,
        b: &Tensor,
        eps: f64,
        dist: Distribution,
        table: &GaussTable,
    ) -> Tensor {
        let ze = self.z_of_keys(a, b, dist, table) * eps;
        let theta = self.flat.unsqueeze(0);
        Tensor::stack(&[&theta + &ze, &theta - &ze], 1).view([2 * a.size()[0], -1])
    }

    /// Each segment's stretch of `flat` with its stream key per direction.
    fn fused_segments(&self, seeds: &[u64]) -> Vec<fused::Segment> {
        let mut offset = 0;
        self.segments
            .iter()
            .map(|(name, n)| {
                let len = *n as usize;
                let keys = seeds.iter().map(|&s| StreamKey::new(s, name)).collect();
                let seg = fused::Segment { offset, len, keys };
                offset += len;
                seg
            })
            .collect()
    }

    pub fn optimizer_state_bytes(&self) -> i64 {
        self.slot.state_bytes()
    }
}

/// LoRA matrices in PEFT's order (one segment each).
pub struct LoraState {
    pub config: LoraConfig,
    pub tensors: Vec<LoraTensor>,
    pub state: FlatState,
}

impl LoraState {
    /// PEFT's initialisation: A Kaiming-uniform (bound 1/sqrt(in_features)), B zeros; the uniform
    /// draws come from the same seeded generator as Z, so every process builds the same A.
    /// Needs only the model's configuration, so a coordinator can hold the state without weights.
    pub fn init(config: LoraConfig, model: &ModelConfig, dev: Device, seed: u64) -> Result<Self> {
        if config.r < 1 || config.targets.is_empty() {
            return Err(TrainError::Config("LoRA needs --lora-r >= 1 and at least one target module".into()));
        }
        let tensors = config.tensors(model)?;
        let mut parts = Vec::with_capacity(tensors.len());
        for t in &tensors {
            if t.is_a {
                let k = StreamKey::new(seed, &t.key);
                let idx = Tensor::arange(t.numel(), (Kind::Int64, dev));
                let bits = bits_tensor(
                    &idx,
                    &Tensor::from(k.a as i64).to_device(dev),
                    &Tensor::from(k.b as i64).to_device(dev),
                );
                let bound = 1.0 / (t.shape[1] as f64).sqrt();
                parts.push((mezo_core::uniform_from_bits(&bits) * 2.0 - 1.0) * bound);
            } else {
                parts.push(Tensor::zeros([t.numel()], (Kind::Float, dev)));
            }
        }
        Self::from_flat(config, tensors, Tensor::cat(&parts, 0), dev)
    }

    pub fn from_flat(
        config: LoraConfig,
        tensors: Vec<LoraTensor>,
        flat: Tensor,
        dev: Device,
    ) -> Result<Self> {
        let segments = tensors.iter().map(|t| (t.key.clone(), t.numel())).collect();
        let state = FlatState::new(segments, flat, dev)?;
        Ok(LoraState { config, tensors, state })
    }

    /// One variant (the current θ) for evaluation.
    pub fn batch(&self, kind: Kind) -> Result<LoraBatch> {
        Ok(LoraBatch::from_flat(&self.state.flat.unsqueeze(0), &self.config, &self.tensors, kind)?)
    }

    pub fn optimizer_state_bytes(&self) -> i64 {
        self.state.optimizer_state_bytes()
    }
}

/// Prefix keys and values of every layer (MeZO's prefix mode), PEFT's `prompt_embeddings` as one
/// segment.
pub struct PrefixState {
    pub config: PrefixConfig,
    pub model: OptConfig,
    pub state: FlatState,
}

impl PrefixState {
    /// MeZO's `--prefix_init_by_real_act`: `num_prefix` tokens drawn uniformly from the vocabulary
    /// with a seeded generator, run through `model`; each layer's keys and values on them are
    /// the initial prefix. Deterministic for a given model, device and dtype; the service computes
    /// it once on the coordinator and ships it to the workers.
    pub fn init(config: PrefixConfig, model: &Opt, seed: u64) -> Result<Self> {
        let tokens = prefix_init_tokens(&config, &model.config, seed)?;
        let flat = model.key_values(&tokens)?;
        Self::from_flat(config, model.config.clone(), flat, model.device)
    }

    pub fn from_flat(config: PrefixConfig, model: OptConfig, flat: Tensor, dev: Device) -> Result<Self> {
        let n = config.numel(&model);
        let state = FlatState::new(vec![(PREFIX_KEY.to_string(), n)], flat, dev)?;
        Ok(PrefixState { config, model, state })
    }
}

/// The token ids a prefix is initialised from: `num_prefix` uniform draws over the vocabulary.
pub fn prefix_init_tokens(config: &PrefixConfig, model: &OptConfig, seed: u64) -> Result<Vec<i64>> {
    if !(1..=model.max_position_embeddings).contains(&config.num_prefix) {
        return Err(TrainError::Config(format!(
            "--num-prefix must be between 1 and the model's max_position_embeddings ({}), got {}",
            model.max_position_embeddings, config.num_prefix
        )));
    }
    let mut rng = HostRng::new(seed);
    Ok((0..config.num_prefix).map(|_| rng.below(model.vocab_size as u64) as i64).collect())
}

/// Full-parameter training: the model's own tensors, selected by name pattern, perturbed in place.
pub struct FullState {
    /// Indices into `Model::named_parameters()`, with their names and whether weight decay applies.
    pub selected: Vec<(usize, String, bool)>,
    slots: Vec<Slot>,
}

impl FullState {
    /// `patterns`: empty = every parameter; else a name matches when it contains a pattern, or
    /// matches it as a glob with `*`.
    pub fn new(model: &Model, patterns: &[String]) -> Result<Self> {
        let selected: Vec<(usize, String, bool)> = model
            .named_parameters()
            .into_iter()
            .enumerate()
            .filter(|(_, (n, _))| patterns.is_empty() || patterns.iter().any(|p| name_matches(n, p)))
            .map(|(i, (n, t))| (i, n, t.dim() >= 2))
            .collect();
        if selected.is_empty() {
            return Err(TrainError::Config(format!(
                "--full-patterns {patterns:?} match no parameter of the model"
            )));
        }
        let slots = selected.iter().map(|_| Slot::default()).collect();
        Ok(FullState { selected, slots })
    }

    pub fn numel(&self, model: &Model) -> i64 {
        let params = model.named_parameters();
        self.selected.iter().map(|(i, _, _)| params[*i].1.numel() as i64).sum()
    }
}

fn name_matches(name: &str, pattern: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    // A glob where `*` matches any run of characters.
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(p) => rest = &rest[p + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

/// The step's fixed hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub eps: f64,
    pub dist: Distribution,
    pub rule: Rule,
    pub weight_decay: f64,
}

/// The Gaussian table on every device that holds trained values: the engine's device's, made
/// at once, and (a model split over devices) each other device's, made on first use.
struct Tables {
    first: GaussTable,
    more: std::cell::RefCell<Vec<GaussTable>>,
}

impl Tables {
    fn new(device: Device) -> Self {
        Tables { first: GaussTable::new(device), more: Default::default() }
    }

    /// The table on `dev` (a handle sharing its storage), where the tensor that Z is drawn for
    /// lives: the tensor ops read it there.
    fn on(&self, dev: Device) -> GaussTable {
        let handle = |t: &GaussTable| GaussTable { t: t.t.shallow_clone(), d: t.d.shallow_clone() };
        if self.first.device() == dev {
            return handle(&self.first);
        }
        let mut more = self.more.borrow_mut();
        if let Some(t) = more.iter().find(|t| t.device() == dev) {
            return handle(t);
        }
        let t = GaussTable::new(dev);
        let h = handle(&t);
        more.push(t);
        h
    }
}

pub struct Engine {
    pub trainable: Trainable,
    pub settings: StepSettings,
    table: Tables,
    /// The forwards' CUDA graphs by batch shape (a mutex only to lend `&self` methods mutable
    /// access; one thread drives an engine).
    graphs: Mutex<StepGraphs>,
    /// With [`Engine::set_deferred_update`]: the last step's full-parameter update, not yet in
    /// the weights (see [`Pending`]).
    deferred: bool,
    pending: Mutex<Option<Pending>>,
}

/// A full-parameter ZO-SGD update that [`Engine::step`] left to the next sweep over the weights
/// (the next step's first perturbation, or [`Engine::flush`]): the step's seeds and projected
/// gradients, its rate, and the settings it ran under. The weights still carry the last
/// direction's `-εz`, undone by the same sweep.
struct Pending {
    seeds: Vec<u64>,
    grads: Vec<f64>,
    lr: f64,
    settings: StepSettings,
    /// Where the model's first weight lives ([`model_anchor`]): the update belongs to that model.
    anchor: usize,
}

impl Engine {
    pub fn new(trainable: Trainable, settings: StepSettings, device: Device) -> Self {
        Engine {
            trainable,
            settings,
            table: Tables::new(device),
            graphs: Mutex::new(StepGraphs::new(device)),
            deferred: false,
            pending: Mutex::new(None),
        }
    }

    /// Whether this engine's forwards replay CUDA graphs (CUDA, a build with graphs, and
    /// `MEZO_CUDA_GRAPHS` not `0`).
    pub fn cuda_graphs(&self) -> bool {
        self.graphs.lock().expect("graph cache").enabled()
    }

    /// `body(micro, extra)` replayed from the graph cache ([`StepGraphs::run`]), or run eagerly
    /// for a model split over devices (a graph is captured on one device).
    fn forward(
        &self,
        model: &Model,
        tag: &'static str,
        micro: &[Prepared],
        extra: &[Tensor],
        anchors: Vec<usize>,
        body: impl FnMut(&[Prepared], &[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if model.placement().is_split() {
            let mut body = body;
            return body(micro, extra);
        }
        self.graphs.lock().expect("graph cache").run(tag, micro, extra, anchors, body)
    }

    /// Turns CUDA graphs off (every forward eager) or back on where supported.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.get_mut().expect("graph cache").set_enabled(on);
    }

    /// Whether [`Self::step`] leaves its full-parameter ZO-SGD update pending, to apply it in
    /// the next step's first perturbation sweep (two sweeps over the weights a step instead of
    /// three, the same bits). Off by default. While an update is pending the model's weights are
    /// not the trained θ: whoever reads them between steps (evaluation, saving, checksums)
    /// calls [`Self::flush`] first. Every other method of the engine that touches the weights
    /// flushes by itself. Turning it off leaves a pending update pending until then.
    pub fn set_deferred_update(&mut self, on: bool) {
        self.deferred = on;
    }

    pub fn deferred_update(&self) -> bool {
        self.deferred
    }

    /// Whether the weights of the model the last step ran on lack that step's update.
    pub fn has_pending_update(&self) -> bool {
        self.pending.lock().expect("pending update").is_some()
    }

    /// Applies a pending update ([`Self::set_deferred_update`]) to `model`'s weights: the sweep
    /// that would have ended the last step (its restore and update). A no-op when none is
    /// pending. Takes `&self` so that readers holding the engine shared (evaluation) can call it.
    pub fn flush(&self, model: &Model) -> Result<()> {
        let Some(p) = self.take_pending(model)? else { return Ok(()) };
        let _g = tch::no_grad_guard();
        self.sweep_pending(model, &p, None)
    }

    /// The pending update, taken; an error (leaving it pending) when it belongs to another model.
    fn take_pending(&self, model: &Model) -> Result<Option<Pending>> {
        let mut slot = self.pending.lock().expect("pending update");
        if let Some(p) = slot.as_ref() {
            if p.anchor != model_anchor(model) {
                return Err(TrainError::Config(
                    "the engine holds a pending update of another model's weights: flush it with \
                     that model first"
                        .into(),
                ));
            }
        }
        Ok(slot.take())
    }

    /// The pending update's sweep (restore, then update) over every selected weight, with
    /// `then = (seed, scale)` also the perturbation θ += scale·z(seed) in the same sweep.
    fn sweep_pending(&self, model: &Model, p: &Pending, then: Option<(u64, f64)>) -> Result<()> {
        let Trainable::Full(f) = &self.trainable else {
            unreachable!("only full-parameter steps leave an update pending")
        };
        let params = model.named_parameters();
        let StepSettings { eps, dist, weight_decay, .. } = p.settings;
        let last = *p.seeds.last().expect("a step has directions");
        let (mut ps, mut us, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        for (i, name, decay) in &f.selected {
            ps.push(params[*i].1);
            us.push(sgd_update_of(name, *decay, &p.seeds, &p.grads, p.lr, weight_decay, Some((last, eps))));
            if let Some((seed, _)) = then {
                keys.push(StreamKey::new(seed, name));
            }
        }
        match then {
            Some((_, scale)) => fused::sgd_update_then_perturb_many_(&ps, &us, &keys, scale as f32, dist)?,
            None => fused::sgd_update_many_(&ps, &us, dist)?,
        }
        Ok(())
    }

    /// `(L+, L-)` of each direction seed, each the loss over all of `micro` (micro-batches
    /// share every z: gradient accumulation). One host synchronisation at the end.
    pub fn direction_losses(
        &self,
        model: &Model,
        micro: &[Prepared],
        seeds: &[u64],
    ) -> Result<Vec<(f64, f64)>> {
        self.flush(model)?;
        let _g = tch::no_grad_guard();
        let eps = self.settings.eps;
        let weight: f64 = micro.iter().map(|p| p.weight).sum();
        let losses = match self.trainable.flat_state() {
            Some(l) => {
                let (a, b) = l.keys(seeds);
                let dist = self.settings.dist;
                // One forward of every variant: a pure function of the keys, the batch, the
                // state and the weights (read in place), so it can be a CUDA graph.
                let forward = |micro: &[Prepared], keys: &[Tensor]| -> Result<Tensor> {
                    let variants =
                        l.variants(&keys[0], &keys[1], eps, dist, &self.table.on(l.flat.device()))?;
                    let batch = self.trainable.tuning_of(&variants, model.kind())?;
                    summed_losses(micro, model, batch.as_ref())
                };
                let anchors = vec![l.flat.data_ptr() as usize, model_anchor(model)];
                self.forward(model, "adapter", micro, &[a, b], anchors, forward)? / weight
            }
            None => {
                let Trainable::Full(f) = &self.trainable else { unreachable!("no flat state") };
                self.full_losses(model, f, micro, seeds, false)?
            }
        };
        let v: Vec<f32> = Vec::<f32>::try_from(&losses.to_device(Device::Cpu))?;
        Ok(v.chunks(2).map(|c| (c[0] as f64, c[1] as f64)).collect())
    }

    /// Full-parameter losses: per direction θ+εz, θ-εz, then θ restored, except (with
    /// `leave_last`) the last direction's restore, which the caller owes.
    fn full_losses(
        &self,
        model: &Model,
        f: &FullState,
        micro: &[Prepared],
        seeds: &[u64],
        leave_last: bool,
    ) -> Result<Tensor> {
        let eps = self.settings.eps;
        let weight: f64 = micro.iter().map(|p| p.weight).sum();
        let mut out = Vec::with_capacity(2 * seeds.len());
        for (k, &seed) in seeds.iter().enumerate() {
            for scale in [1.0, -2.0] {
                self.perturb(model, f, seed, scale * eps)?;
                // The weights are perturbed in place, so one captured forward serves every sign
                // and direction.
                let body = |micro: &[Prepared], _: &[Tensor]| summed_losses(micro, model, None);
                let total =
                    self.forward(model, "full-parameter", micro, &[], vec![model_anchor(model)], body)?;
                out.push(total / weight);
            }
            if !(leave_last && k + 1 == seeds.len()) {
                self.perturb(model, f, seed, eps)?;
            }
        }
        Ok(Tensor::cat(&out, 0))
    }

    /// A whole ZO step: every direction's losses, then the update when they are finite (the
    /// projected gradients, or `None` for a skipped step). The same bits as [`Self::direction_losses`]
    /// followed by [`Self::apply_update`]; for full-parameter ZO-SGD on fused kernels the last
    /// direction's restore sweep is folded into the update's sweep (three passes over the weights
    /// a step instead of four), and with [`Self::set_deferred_update`] that sweep is left pending
    /// and folded into the next step's first perturbation (two passes a step).
    pub fn step(
        &mut self,
        model: &Model,
        micro: &[Prepared],
        seeds: &[u64],
        lr: f64,
    ) -> Result<(Vec<(f64, f64)>, Option<Vec<f64>>)> {
        let eps = self.settings.eps;
        let fusable = match &self.trainable {
            Trainable::Full(f) if self.settings.rule == Rule::Sgd && !seeds.is_empty() => {
                let params = model.named_parameters();
                f.selected.iter().all(|(i, _, _)| fused::supported(params[*i].1))
            }
            _ => false,
        };
        if !fusable {
            let losses = self.direction_losses(model, micro, seeds)?;
            let grads = projected_grads(&losses, eps);
            if let Some(g) = &grads {
                self.apply_update(Some(model), seeds, g, lr)?;
            }
            return Ok((losses, grads));
        }
        let Trainable::Full(f) = &self.trainable else { unreachable!("checked above") };
        let losses = {
            let _g = tch::no_grad_guard();
            let t = self.full_losses(model, f, micro, seeds, true)?;
            let v: Vec<f32> = Vec::<f32>::try_from(&t.to_device(Device::Cpu))?;
            v.chunks(2).map(|c| (c[0] as f64, c[1] as f64)).collect::<Vec<_>>()
        };
        let last = *seeds.last().expect("not empty");
        let grads = projected_grads(&losses, eps);
        match &grads {
            Some(g) if self.deferred => {
                let p = Pending {
                    seeds: seeds.to_vec(),
                    grads: g.clone(),
                    lr,
                    settings: self.settings,
                    anchor: model_anchor(model),
                };
                *self.pending.lock().expect("pending update") = Some(p);
            }
            Some(g) => self.update(Some(model), seeds, g, lr, Some(last))?,
            None => {
                let _g = tch::no_grad_guard();
                self.perturb(model, f, last, eps)?;
            }
        }
        Ok((losses, grads))
    }

    /// θ ← θ + scale·z(seed) for every selected parameter, in float32 with one rounding to the
    /// model's dtype: one fused sweep over all the tensors the kernels take (one launch per CUDA
    /// device), chunked tensor ops for the rest.
    /// A pending update (only [`Self::step`] perturbs while one exists) goes into the same sweep.
    fn perturb(&self, model: &Model, f: &FullState, seed: u64, scale: f64) -> Result<()> {
        if let Some(p) = self.take_pending(model)? {
            // One sweep draws one distribution: settings changed since the step take two.
            if p.settings.dist == self.settings.dist {
                return self.sweep_pending(model, &p, Some((seed, scale)));
            }
            self.sweep_pending(model, &p, None)?;
        }
        let params = model.named_parameters();
        let dist = self.settings.dist;
        let (mut fused_ps, mut fused_keys) = (Vec::new(), Vec::new());
        for (i, name, _) in &f.selected {
            let p = params[*i].1;
            let key = StreamKey::new(seed, name);
            if fused::supported(p) {
                fused_ps.push(p);
                fused_keys.push(key);
            } else {
                let table = self.table.on(p.device());
                for_chunks(p, |chunk, off| {
                    let z = z_range(key, off, chunk.numel() as i64, dist, &table, p.device());
                    let new = chunk.to_kind(Kind::Float) + (z * scale as f32 as f64);
                    chunk.shallow_clone().copy_(&new);
                });
            }
        }
        fused::perturb_many_(&fused_ps, &fused_keys, scale as f32, dist)?;
        Ok(())
    }

    /// Applies one step's update: `grads[i]` is the projected gradient of `seeds[i]`.
    /// `model` is needed for full-parameter state only (LoRA state lives here).
    pub fn apply_update(
        &mut self,
        model: Option<&Model>,
        seeds: &[u64],
        grads: &[f64],
        lr: f64,
    ) -> Result<()> {
        self.update(model, seeds, grads, lr, None)
    }

    /// [`Self::apply_update`]; `restore`: the seed whose `-εz` is still applied to the fused
    /// full-parameter weights, undone in the update's sweep.
    fn update(
        &mut self,
        model: Option<&Model>,
        seeds: &[u64],
        grads: &[f64],
        lr: f64,
        restore: Option<u64>,
    ) -> Result<()> {
        match model {
            Some(m) => self.flush(m)?,
            None if self.has_pending_update() => {
                return Err(TrainError::Config(
                    "an update of the model's weights is pending: this update needs the model".into(),
                ))
            }
            None => {}
        }
        let _g = tch::no_grad_guard();
        let eps = self.settings.eps;
        // A multiply by the f32 reciprocal, never a division: CUDA turns division by a scalar
        // into exactly this, the CPU would not, and replicas on both must agree.
        let inv_n = (1.0 / seeds.len() as f64) as f32 as f64;
        let StepSettings { dist, rule, weight_decay, .. } = self.settings;
        if let Some(l) = self.trainable.flat_state_mut() {
            if rule == Rule::Sgd && fused::supported(&l.flat) {
                // One fused pass: on the CPU (the coordinator's copy, CPU runs) on every core, on
                // CUDA one launch over the segments; z drawn on the fly, the same bits on both
                // (the kernels are tested against the CPU pass) as the tensor ops below.
                l.slot.count_step();
                let segs = l.fused_segments(seeds);
                let g: Vec<f32> = grads.iter().map(|&g| g as f32).collect();
                let wd = (weight_decay != 0.0).then_some(weight_decay as f32);
                fused::sgd_update_segments_(&l.flat, &segs, &g, lr as f32, wd, dist)?;
            } else {
                let table = self.table.on(l.flat.device());
                flat_update_tensor(l, seeds, grads, lr, rule, weight_decay, dist, &table)
            }
            return Ok(());
        }
        match &mut self.trainable {
            Trainable::Lora(_) | Trainable::Prefix(_) => unreachable!("flat states are updated above"),
            Trainable::Full(f) => {
                let model = model.ok_or_else(|| {
                    TrainError::Config("a full-parameter update needs the model's weights".into())
                })?;
                let params = model.named_parameters();
                // ZO-SGD on the tensors the kernels take: one fused sweep for all of them.
                let (mut fused_ps, mut fused_us) = (Vec::new(), Vec::new());
                for ((i, name, decay), slot) in f.selected.iter().zip(f.slots.iter_mut()) {
                    debug_assert!(restore.is_none() || (rule == Rule::Sgd && fused::supported(params[*i].1)));
                    let p = params[*i].1;
                    if rule == Rule::Sgd && fused::supported(p) {
                        fused_ps.push(p);
                        let restore = restore.map(|r| (r, eps));
                        fused_us.push(sgd_update_of(name, *decay, seeds, grads, lr, weight_decay, restore));
                        continue;
                    }
                    let keys: Vec<StreamKey> = seeds.iter().map(|&s| StreamKey::new(s, name)).collect();
                    // Stateful rules: chunk by chunk, so no temporary is larger than a chunk
                    // (the state itself is the rule's documented extra memory).
                    let flat_p = p.view(-1);
                    let mut new_parts = Vec::new();
                    let table = self.table.on(p.device());
                    for_chunks(&flat_p, |chunk, off| {
                        let len = chunk.numel() as i64;
                        let mut ghat = z_range(keys[0], off, len, dist, &table, p.device()) * grads[0];
                        for (k, &g) in keys.iter().zip(grads).skip(1) {
                            ghat = ghat + z_range(*k, off, len, dist, &table, p.device()) * g;
                        }
                        if seeds.len() > 1 {
                            ghat = ghat * inv_n;
                        }
                        new_parts.push(ghat);
                    });
                    let ghat = Tensor::cat(&new_parts, 0).view(p.size().as_slice());
                    let new =
                        optim::apply(rule, slot, &p.to_kind(Kind::Float), &ghat, lr, weight_decay, *decay);
                    p.shallow_clone().copy_(&new);
                }
                fused::sgd_update_many_(&fused_ps, &fused_us, dist)?;
            }
        }
        Ok(())
    }

    pub fn optimizer_state_bytes(&self) -> i64 {
        match &self.trainable {
            Trainable::Lora(_) | Trainable::Prefix(_) => {
                self.trainable.flat_state().map_or(0, FlatState::optimizer_state_bytes)
            }
            Trainable::Full(f) => f.slots.iter().map(Slot::state_bytes).sum(),
        }
    }
}

/// The fused ZO-SGD update of the parameter `name`; `restore = (seed, ε)`: that seed's `-εz` is
/// still in the weights. One construction for the step's update and a pending one, so both give
/// the same bits.
fn sgd_update_of(
    name: &str,
    decay: bool,
    seeds: &[u64],
    grads: &[f64],
    lr: f64,
    weight_decay: f64,
    restore: Option<(u64, f64)>,
) -> SgdUpdate {
    SgdUpdate {
        keys: seeds.iter().map(|&s| StreamKey::new(s, name)).collect(),
        grads: grads.iter().map(|&g| g as f32).collect(),
        lr: lr as f32,
        weight_decay: (decay && weight_decay != 0.0).then_some(weight_decay as f32),
        restore: restore.map(|(r, eps)| (StreamKey::new(r, name), eps as f32)),
    }
}

/// The update of a flat (LoRA or prefix) state with tensor ops (any device, any rule): ĝ summed
/// in a fixed order with element-wise ops, identical bits on every device.
#[allow(clippy::too_many_arguments)]
fn flat_update_tensor(
    l: &mut FlatState,
    seeds: &[u64],
    grads: &[f64],
    lr: f64,
    rule: Rule,
    weight_decay: f64,
    dist: Distribution,
    table: &GaussTable,
) {
    let inv_n = (1.0 / seeds.len() as f64) as f32 as f64;
    let z = l.z(seeds, dist, table);
    let mut ghat = z.get(0) * grads[0];
    for (i, &g) in grads.iter().enumerate().skip(1) {
        ghat = ghat + z.get(i as i64) * g;
    }
    if seeds.len() > 1 {
        ghat = ghat * inv_n;
    }
    let new = optim::apply(rule, &mut l.slot, &l.flat, &ghat, lr, weight_decay, true);
    // In place: the state's address is what a captured forward reads.
    l.flat.copy_(&new);
}

/// The summed losses of every micro-batch under `tuning` (divide by the batches' weight).
fn summed_losses(micro: &[Prepared], model: &Model, tuning: Option<&Tuning>) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for p in micro {
        let s = p.loss_sums(model, tuning)?;
        total = Some(match total {
            Some(t) => t + s,
            None => s,
        });
    }
    total.ok_or_else(|| TrainError::Config("a step needs at least one micro-batch".into()))
}

/// Where the model's first weight lives: a captured forward reads the weights in place, so a
/// graph belongs to one model.
fn model_anchor(model: &Model) -> usize {
    model.named_parameters().first().map_or(0, |(_, t)| t.data_ptr() as usize)
}

/// Elements a generic (unfused) chunk handles at once: bounds the int64 temporaries of Z.
const CHUNK: i64 = 1 << 22;

/// Calls `f(chunk, offset)` on consecutive views of the flattened tensor.
fn for_chunks(p: &Tensor, mut f: impl FnMut(&Tensor, i64)) {
    let flat = p.view(-1);
    let n = flat.numel() as i64;
    let mut off = 0;
    while off < n {
        let len = CHUNK.min(n - off);
        f(&flat.narrow(0, off, len), off);
        off += len;
    }
}

/// Z for elements `off .. off + len` of one parameter stream, float32.
fn z_range(
    key: StreamKey,
    off: i64,
    len: i64,
    dist: Distribution,
    table: &GaussTable,
    dev: Device,
) -> Tensor {
    let idx = Tensor::arange_start(off, off + len, (Kind::Int64, dev));
    let a = Tensor::from(key.a as i64).to_device(dev);
    let b = Tensor::from(key.b as i64).to_device(dev);
    z_from_bits(&bits_tensor(&idx, &a, &b), dist, table)
}

/// Projected gradients from direction losses; `None` when any loss is NaN or infinite (the step
/// is then skipped, never applied).
pub fn projected_grads(losses: &[(f64, f64)], eps: f64) -> Option<Vec<f64>> {
    if losses.iter().any(|(a, b)| !a.is_finite() || !b.is_finite()) {
        return None;
    }
    Some(losses.iter().map(|(a, b)| (a - b) / (2.0 * eps)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketed_widths_are_few_and_waste_little() {
        assert_eq!([1, 8, 9, 16, 17, 63, 64].map(bucket_width), [8, 8, 16, 16, 24, 64, 64]);
        assert_eq!([65, 80, 81, 129, 200, 1000, 2048].map(bucket_width), [72, 80, 88, 144, 208, 1024, 2048]);
        let widths: std::collections::BTreeSet<usize> = (1..=2048).map(bucket_width).collect();
        assert_eq!(widths.len(), 16 + 8 * 4, "8 widths per doubling past 128 tokens");
        for n in 1..=2048 {
            let w = bucket_width(n);
            assert!(w >= n && (w - n <= 7 || (w - n) * 8 <= n), "{n} -> {w}");
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_variants_kernel_equals_tensor_ops() {
        let dev = Device::Cuda(0);
        let segments: Vec<(String, i64)> =
            [("x.lora_A", 300), ("x.lora_B", 1), ("y.lora_A", 4097), ("y.lora_B", 77)]
                .iter()
                .map(|(n, k)| (n.to_string(), *k))
                .collect();
        let total = segments.iter().map(|(_, k)| k).sum::<i64>();
        let flat = Tensor::randn([total], (Kind::Float, Device::Cpu));
        let l = FlatState::new(segments, flat, dev).unwrap();
        let table = GaussTable::new(dev);
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            for seeds in [vec![7u64], vec![1, 2, 3]] {
                let (a, b) = l.keys(&seeds);
                let k = l.variants(&a, &b, 1e-3, dist, &table).unwrap().to_device(Device::Cpu);
                let t = l.variants_tensor(&a, &b, 1e-3, dist, &table).to_device(Device::Cpu);
                let (k, t) = (
                    Vec::<f32>::try_from(&k.flatten(0, -1)).unwrap(),
                    Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap(),
                );
                assert_eq!(k.len(), t.len());
                for (i, (x, y)) in k.iter().zip(&t).enumerate() {
                    assert_eq!(x.to_bits(), y.to_bits(), "{dist:?} {seeds:?}: element {i}");
                }
            }
        }
    }

    #[test]
    fn globs_and_substrings() {
        assert!(name_matches("model.decoder.layers.3.fc1.weight", "fc1"));
        assert!(name_matches("model.decoder.layers.3.fc1.weight", "*.layers.*.fc1.*"));
        assert!(!name_matches("model.decoder.layers.3.fc2.weight", "*.fc1.*"));
        assert!(name_matches("lm_head.weight", "lm_head*"));
    }

    /// The fused CPU update of a LoRA state gives the tensor path's bits: one and three
    /// directions, with and without weight decay, Gaussian and Rademacher.
    #[test]
    fn lora_fused_update_equals_tensor_update() {
        let json = serde_json::json!({
            "model_type": "opt", "vocab_size": 96, "hidden_size": 24, "num_hidden_layers": 2,
            "ffn_dim": 48, "num_attention_heads": 2, "max_position_embeddings": 32,
        });
        let mc = ModelConfig::from_json(&json.to_string(), std::path::Path::new("tiny")).unwrap();
        let lc = LoraConfig { r: 4, alpha: 8.0, targets: vec![mezo_model::Target::Q, mezo_model::Target::V] };
        let table = GaussTable::new(Device::Cpu);
        for dist in [Distribution::Gaussian, Distribution::Rademacher] {
            for (seeds, grads, wd) in
                [(vec![7u64], vec![0.75f64], 0.0), (vec![1, 2, 3], vec![1.5, -0.25, 3.0], 0.01)]
            {
                let mut a = LoraState::init(lc.clone(), &mc, Device::Cpu, 5).unwrap();
                // B starts at zero: give every element a value so decay and updates show.
                a.state.flat = Tensor::randn([a.state.flat.numel() as i64], (Kind::Float, Device::Cpu));
                let mut b = LoraState::init(lc.clone(), &mc, Device::Cpu, 5).unwrap();
                b.state.flat = a.state.flat.copy();
                let settings = StepSettings { eps: 1e-2, dist, rule: Rule::Sgd, weight_decay: wd };
                let mut engine = Engine::new(Trainable::Lora(a), settings, Device::Cpu);
                engine.apply_update(None, &seeds, &grads, 1e-3).unwrap();
                flat_update_tensor(&mut b.state, &seeds, &grads, 1e-3, Rule::Sgd, wd, dist, &table);
                let Trainable::Lora(a) = &engine.trainable else { unreachable!() };
                assert!(
                    a.state.flat.equal(&b.state.flat),
                    "{dist} {seeds:?}: fused and tensor LoRA updates differ"
                );
            }
        }
    }

    #[test]
    fn non_finite_losses_skip_the_step() {
        assert_eq!(projected_grads(&[(1.0, 0.5)], 0.25), Some(vec![1.0]));
        assert_eq!(projected_grads(&[(1.0, 0.5), (f64::NAN, 0.0)], 0.1), None);
        assert_eq!(projected_grads(&[(f64::INFINITY, 0.5)], 0.1), None);
    }
}
