//! `mezo train` in one process: the MeZO protocol's data, the step loop, dev evaluation, the best
//! adapter kept, the test score, and the outputs (PEFT adapter or full model, a step log, a report).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mezo_core::{direction_seed, splitmix64, Distribution};
use mezo_data::{Example, ScoringRow, Template};
use mezo_model::scoring::{evaluate_rows, example_rows};
use mezo_model::{parse_device, parse_dtype, Adapter, LoraConfig, Model, ModelConfig, Target, TextTokenizer};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::{mezo_splits, Batcher};
use crate::engine::{Engine, FullState, LoraState, LossKind, Prepared, StepSettings, Trainable};
use crate::error::{Result, TrainError};
use crate::optim::{self, Rule, Schedule, Slot};

/// Which parameters train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModeSpec {
    Lora {
        r: i64,
        alpha: f64,
        targets: Vec<String>,
    },
    /// Empty patterns: every parameter.
    Full {
        patterns: Vec<String>,
    },
}

/// The optimizer: zeroth-order (MeZO) rules, or first-order Adam through autograd (the
/// fine-tuning baseline MeZO is compared with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerSpec {
    ZoSgd,
    ZoMomentum,
    ZoAdam,
    Adam,
}

impl OptimizerSpec {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "zo-sgd" | "sgd" => Ok(OptimizerSpec::ZoSgd),
            "zo-momentum" => Ok(OptimizerSpec::ZoMomentum),
            "zo-adam" => Ok(OptimizerSpec::ZoAdam),
            "adam" => Ok(OptimizerSpec::Adam),
            _ => Err(TrainError::Config(format!(
                "unknown --optimizer `{s}`: expected zo-sgd, zo-momentum, zo-adam or adam"
            ))),
        }
    }
}

/// Everything a run needs; serialisable so the service can carry it as a run spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub task: String,
    /// Holds `train.jsonl` and `validation.jsonl`.
    pub data_dir: PathBuf,
    pub mode: ModeSpec,
    pub steps: u64,
    pub lr: f64,
    pub eps: f64,
    pub batch_size: usize,
    pub directions: usize,
    /// Micro-batches a step's batch is split into (gradient accumulation).
    pub grad_accum: usize,
    pub seed: u64,
    /// Evaluate on dev every N steps (0: only at the end).
    pub eval_every: u64,
    pub optimizer: OptimizerSpec,
    pub momentum: f64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub distribution: String,
    pub loss: LossKind,
    pub template: String,
    pub n_train: usize,
    pub n_dev: usize,
    /// Sample train and dev only among examples of at least this many words (0: all).
    #[serde(default)]
    pub min_words: usize,
    pub test_limit: Option<usize>,
    pub eval_batch_size: usize,
    pub device: String,
    pub dtype: String,
    pub out: PathBuf,
}

/// The most steps a run may ask for.
pub const MAX_STEPS: u64 = 100_000_000;

impl TrainConfig {
    /// Checks every field a user sets, naming it and the accepted range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.task != "sst2" {
            return bad(format!("unknown task `{}`: expected sst2", self.task));
        }
        // Each count within a range: beyond it a typo (an extra zero) would allocate or run for
        // days before anyone noticed. The message names the flag and the run-spec field.
        let counts: [(&str, u64, u64, u64); 8] = [
            ("--steps (steps)", self.steps, 1, MAX_STEPS),
            ("--batch-size (batch_size)", self.batch_size as u64, 1, 4096),
            ("--directions (directions)", self.directions as u64, 1, 1024),
            ("--grad-accum (grad_accum)", self.grad_accum as u64, 1, 4096),
            ("--eval-batch-size (eval_batch_size)", self.eval_batch_size as u64, 1, 4096),
            ("--n-train (n_train)", self.n_train as u64, 1, 10_000_000),
            ("--n-dev (n_dev)", self.n_dev as u64, 1, 10_000_000),
            ("--min-words (min_words)", self.min_words as u64, 0, 10_000),
        ];
        for (name, v, lo, hi) in counts {
            if !(lo..=hi).contains(&v) {
                return bad(format!("{name} must be between {lo} and {hi}, got {v}"));
            }
        }
        if self.test_limit == Some(0) {
            return bad("--test-limit (test_limit) must be at least 1 when given".into());
        }
        // Rates only need to be positive numbers: a huge one wastes no resources (its losses are
        // non-finite and its steps skipped and counted), and the tests use that on purpose.
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr (lr) must be a positive finite number, got {}", self.lr));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("--eps (eps) must be a positive finite number, got {}", self.eps));
        }
        if self.grad_accum > self.batch_size {
            return bad(format!("--grad-accum {} exceeds --batch-size {}", self.grad_accum, self.batch_size));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("--momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay)) {
            return bad(format!(
                "--weight-decay (weight_decay) must be in [0, 1], got {}",
                self.weight_decay
            ));
        }
        if let ModeSpec::Lora { r, alpha, targets } = &self.mode {
            if !(1..=1024).contains(r) {
                return bad(format!("--lora-r (lora.r) must be between 1 and 1024, got {r}"));
            }
            if !(alpha.is_finite() && *alpha > 0.0) {
                return bad(format!("--lora-alpha (lora.alpha) must be a positive number, got {alpha}"));
            }
            if targets.is_empty() {
                return bad("--lora-targets (lora.targets) needs at least one module".into());
            }
            for t in targets {
                Target::parse(t)?;
            }
        }
        self.distribution.parse::<Distribution>()?;
        Template::parse(&self.template)?;
        parse_dtype(&self.dtype)?;
        Ok(())
    }

    fn rule(&self) -> Rule {
        match self.optimizer {
            OptimizerSpec::ZoSgd => Rule::Sgd,
            OptimizerSpec::ZoMomentum => Rule::Momentum { beta: self.momentum },
            OptimizerSpec::ZoAdam | OptimizerSpec::Adam => Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        }
    }

    /// The step's fixed hyper-parameters (every process of a run builds the same).
    pub fn step_settings(&self) -> Result<StepSettings> {
        Ok(StepSettings {
            eps: self.eps,
            dist: self.distribution.parse()?,
            rule: self.rule(),
            weight_decay: self.weight_decay,
        })
    }

    /// The LoRA configuration of a LoRA run; `None` for full-parameter runs.
    pub fn lora_config(&self) -> Result<Option<LoraConfig>> {
        let ModeSpec::Lora { r, alpha, targets } = &self.mode else { return Ok(None) };
        let targets = targets.iter().map(|t| Target::parse(t)).collect::<std::result::Result<_, _>>()?;
        Ok(Some(LoraConfig { r: *r, alpha: *alpha, targets }))
    }

    /// The MeZO protocol's splits of this run, the test set cut to `test_limit`.
    fn splits(&self) -> Result<crate::data::Splits> {
        let mut s = mezo_splits(
            &self.data_dir.join("train.jsonl"),
            &self.data_dir.join("validation.jsonl"),
            self.n_train,
            self.n_dev,
            self.seed,
            self.min_words,
        )?;
        if let Some(n) = self.test_limit {
            s.test.truncate(n);
        }
        Ok(s)
    }
}

/// The seed of a run's LoRA initialisation, derived from the run seed (every process agrees).
pub fn lora_init_seed(run_seed: u64) -> u64 {
    splitmix64(run_seed ^ 0x1A17_0A11)
}

/// One line of `OUT/train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    /// Mean projected gradient over the directions (0 for first-order steps).
    pub projected_grad: f64,
    pub lr: f64,
    pub skipped: bool,
    pub dev_accuracy: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: u64,
    pub final_train_loss: f64,
    pub zero_shot_accuracy: f64,
    pub best_dev_accuracy: f64,
    pub best_step: u64,
    pub test_accuracy: f64,
    pub skipped_steps: u64,
    pub seconds: f64,
    pub train_seconds: f64,
    pub steps_per_s: f64,
    pub trainable_params: i64,
    pub optimizer_state_bytes: i64,
    pub output: PathBuf,
}

/// Progress callbacks, so the loop stays free of terminal code.
pub trait Observer {
    fn on_start(&mut self, _total_steps: u64) {}
    fn on_step(&mut self, _record: &StepRecord) {}
}

pub struct NoObserver;
impl Observer for NoObserver {}

struct Tokenised {
    examples: Vec<Example>,
    rows: Vec<Vec<ScoringRow>>,
}

fn tokenise(tok: &TextTokenizer, examples: Vec<Example>, template: Template) -> Result<Tokenised> {
    let rows = example_rows(tok, &examples, template)?;
    Ok(Tokenised { examples, rows })
}

/// Everything [`train`] loads before its first step.
pub struct Session {
    pub cfg: TrainConfig,
    pub model: Model,
    kind: Kind,
    train: Tokenised,
    dev: Tokenised,
    test: Tokenised,
    pub engine: Engine,
    /// First-order Adam state (only with `--optimizer adam`).
    fo_slots: Vec<Slot>,
}

impl Session {
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let device = parse_device(&cfg.device)?;
        let kind = parse_dtype(&cfg.dtype)?;
        let template = Template::parse(&cfg.template)?;
        let tok = TextTokenizer::from_dir(&cfg.model)?;
        let model = Model::load(&cfg.model, device, kind)?;
        let splits = cfg.splits()?;
        let test = splits.test;
        let train = tokenise(&tok, splits.train, template)?;
        let dev = tokenise(&tok, splits.dev, template)?;
        let test = tokenise(&tok, test, template)?;
        let trainable = match cfg.lora_config()? {
            Some(lc) => Trainable::Lora(LoraState::init(
                lc,
                &model.config(),
                model.device(),
                lora_init_seed(cfg.seed),
            )?),
            None => {
                let ModeSpec::Full { patterns } = &cfg.mode else { unreachable!("not LoRA") };
                Trainable::Full(FullState::new(&model, patterns)?)
            }
        };
        let settings = cfg.step_settings()?;
        let engine = Engine::new(trainable, settings, device);
        Ok(Session { cfg, model, kind, train, dev, test, engine, fo_slots: Vec::new() })
    }

    pub fn trainable_params(&self) -> i64 {
        match &self.engine.trainable {
            Trainable::Lora(l) => l.flat.numel() as i64,
            Trainable::Full(f) => f.numel(&self.model),
        }
    }

    fn accuracy(&self, set: &Tokenised) -> Result<f64> {
        let lora = match &self.engine.trainable {
            Trainable::Lora(l) => Some(l.batch(self.kind)?),
            Trainable::Full(_) => None,
        };
        Ok(evaluate_rows(&self.model, &set.examples, &set.rows, self.cfg.eval_batch_size, lora.as_ref())?
            .accuracy)
    }

    pub fn dev_accuracy(&self) -> Result<f64> {
        self.accuracy(&self.dev)
    }

    pub fn test_accuracy(&self) -> Result<f64> {
        self.accuracy(&self.test)
    }

    /// Micro-batches of the given training examples.
    pub fn prepare(&self, idx: &[usize]) -> Result<Vec<Prepared>> {
        let per = idx.len().div_ceil(self.cfg.grad_accum);
        idx.chunks(per)
            .map(|c| {
                let rows: Vec<&[ScoringRow]> = c.iter().map(|&i| self.train.rows[i].as_slice()).collect();
                let labels: Vec<usize> = c.iter().map(|&i| self.train.examples[i].label).collect();
                Prepared::new(&rows, &labels, self.cfg.loss, &self.model)
            })
            .collect()
    }

    pub fn train_lengths(&self) -> Vec<usize> {
        self.train.rows.iter().map(|r| r.iter().map(|x| x.tokens.len()).max().unwrap_or(0)).collect()
    }

    /// One MeZO step; returns the record, or a skipped record when a loss was not finite.
    pub fn zo_step(&mut self, step: u64, micro: &[Prepared]) -> Result<StepRecord> {
        let seeds: Vec<u64> =
            (0..self.cfg.directions as u32).map(|i| direction_seed(self.cfg.seed, step, i)).collect();
        let lr = self.cfg.schedule.lr(self.cfg.lr, step, self.cfg.steps);
        let (losses, grads) = self.engine.step(&self.model, micro, &seeds, lr)?;
        let loss = losses.iter().map(|(a, b)| (a + b) / 2.0).sum::<f64>() / losses.len() as f64;
        let Some(grads) = grads else {
            return Ok(StepRecord {
                step,
                loss,
                projected_grad: f64::NAN,
                lr,
                skipped: true,
                dev_accuracy: None,
                seconds: 0.0,
            });
        };
        let g = grads.iter().sum::<f64>() / grads.len() as f64;
        Ok(StepRecord { step, loss, projected_grad: g, lr, skipped: false, dev_accuracy: None, seconds: 0.0 })
    }

    /// One first-order Adam step through autograd (the fine-tuning baseline).
    pub fn fo_step(&mut self, step: u64, micro: &[Prepared]) -> Result<StepRecord> {
        let lr = self.cfg.schedule.lr(self.cfg.lr, step, self.cfg.steps);
        let weight: f64 = micro.iter().map(|p| p.weight).sum();
        let rule = self.cfg.rule();
        let wd = self.cfg.weight_decay;
        let mut total = 0.0;
        match &mut self.engine.trainable {
            Trainable::Lora(l) => {
                let leaf = l.flat.detach().set_requires_grad(true);
                for p in micro {
                    let batch = mezo_model::LoraBatch::from_flat(
                        &leaf.unsqueeze(0),
                        &l.config,
                        &l.tensors,
                        self.kind,
                    )?;
                    let loss = p.loss_sums(&self.model, Some(&batch))?.sum(Kind::Float) / weight;
                    total += loss.double_value(&[]);
                    loss.backward();
                }
                let _g = tch::no_grad_guard();
                if self.fo_slots.is_empty() {
                    self.fo_slots.push(Slot::default());
                }
                let grad = leaf.grad();
                l.flat = optim::apply(rule, &mut self.fo_slots[0], &leaf.detach(), &grad, lr, wd, true);
            }
            Trainable::Full(f) => {
                let params = self.model.named_parameters();
                let trained: Vec<Tensor> =
                    f.selected.iter().map(|(i, _, _)| params[*i].1.shallow_clone()).collect();
                for t in &trained {
                    let _ = t.shallow_clone().set_requires_grad(true);
                }
                for p in micro {
                    let loss = p.loss_sums(&self.model, None)?.sum(Kind::Float) / weight;
                    total += loss.double_value(&[]);
                    loss.backward();
                }
                let _g = tch::no_grad_guard();
                if self.fo_slots.is_empty() {
                    self.fo_slots = trained.iter().map(|_| Slot::default()).collect();
                }
                for ((t, (_, _, decay)), slot) in
                    trained.iter().zip(&f.selected).zip(self.fo_slots.iter_mut())
                {
                    let mut grad = t.grad();
                    let new = optim::apply(
                        rule,
                        slot,
                        &t.to_kind(Kind::Float),
                        &grad.to_kind(Kind::Float),
                        lr,
                        wd,
                        *decay,
                    );
                    t.shallow_clone().copy_(&new);
                    let _ = grad.zero_();
                }
                for t in &trained {
                    let _ = t.shallow_clone().set_requires_grad(false);
                }
            }
        }
        let skipped = !total.is_finite();
        Ok(StepRecord {
            step,
            loss: total,
            projected_grad: 0.0,
            lr,
            skipped,
            dev_accuracy: None,
            seconds: 0.0,
        })
    }

    /// The trained state as a PEFT adapter (LoRA runs).
    pub fn adapter(&self) -> Option<Adapter> {
        match &self.engine.trainable {
            Trainable::Lora(l) => Some(Adapter { config: l.config.clone(), flat: l.flat.copy() }),
            Trainable::Full(_) => None,
        }
    }
}

/// Which evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSet {
    Dev,
    Test,
}

/// What the distributed service needs from a session: replicas that take their state from the
/// coordinator, replay logged updates, and evaluate given examples.
/// The wire and snapshot form of LoRA state: its f32 values, little-endian, in PEFT order.
pub fn lora_state_bytes(trainable: &Trainable) -> Vec<u8> {
    match trainable {
        Trainable::Lora(l) => {
            let v: Vec<f32> = Vec::try_from(&l.flat.to_device(tch::Device::Cpu)).expect("f32 state");
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        Trainable::Full(_) => Vec::new(),
    }
}

/// The inverse of [`lora_state_bytes`] (a trailing partial value is dropped).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Decodes LoRA state bytes (a snapshot, a replica's state) that must hold exactly `expected`
/// values: a length that is off, even by a partial value, means the bytes belong to another
/// configuration or were cut short.
pub fn lora_values_from_bytes(bytes: &[u8], expected: usize) -> std::result::Result<Vec<f32>, String> {
    if bytes.len() != expected.saturating_mul(4) {
        return Err(format!(
            "{} bytes for {expected} LoRA values ({} bytes)",
            bytes.len(),
            expected.saturating_mul(4)
        ));
    }
    Ok(f32_from_le_bytes(bytes))
}

impl Session {
    /// The LoRA state as little-endian f32 bytes (PEFT order); empty for full-parameter runs.
    pub fn state_bytes(&self) -> Vec<u8> {
        lora_state_bytes(&self.engine.trainable)
    }

    /// Replaces the LoRA state with `bytes` (as from [`Session::state_bytes`]).
    pub fn set_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let Trainable::Lora(l) = &mut self.engine.trainable else {
            return if bytes.is_empty() {
                Ok(())
            } else {
                Err(TrainError::Config("a full-parameter replica takes no state bytes".into()))
            };
        };
        let values = lora_values_from_bytes(bytes, l.flat.numel())
            .map_err(|why| TrainError::Config(format!("state: {why}")))?;
        l.flat = Tensor::from_slice(&values).to_device(l.flat.device());
        Ok(())
    }

    /// Applies a logged update (the same code path as the single-process trainer's).
    /// Writes the model (a full-parameter run's result) as an HF checkpoint directory.
    pub fn save_model(&self, dir: &Path) -> Result<PathBuf> {
        save_full_model(self, dir)
    }

    pub fn apply_logged(&mut self, seeds: &[u64], grads: &[f64], lr: f64) -> Result<()> {
        self.engine.apply_update(Some(&self.model), seeds, grads, lr)
    }

    /// `(L+, L-)` per seed over the given training examples, the loss's weight, and the tokens
    /// the forward passes processed (two signs per seed).
    pub fn train_losses(&self, seeds: &[u64], examples: &[usize]) -> Result<(Vec<(f64, f64)>, f64, u64)> {
        let micro = self.prepare(examples)?;
        let weight = micro.iter().map(|p| p.weight).sum();
        let tokens = micro.iter().map(|p| p.tokens).sum::<u64>() * 2 * seeds.len() as u64;
        Ok((self.engine.direction_losses(&self.model, &micro, seeds)?, weight, tokens))
    }

    /// Examples of `set` predicted correctly, of those given.
    pub fn eval_subset(&self, set: EvalSet, idx: &[usize]) -> Result<(usize, usize)> {
        let src = match set {
            EvalSet::Dev => &self.dev,
            EvalSet::Test => &self.test,
        };
        if let Some(&bad) = idx.iter().find(|&&i| i >= src.examples.len()) {
            return Err(TrainError::Config(format!(
                "example {bad} is outside the set of {}",
                src.examples.len()
            )));
        }
        let examples: Vec<Example> = idx.iter().map(|&i| src.examples[i].clone()).collect();
        let rows: Vec<Vec<ScoringRow>> = idx.iter().map(|&i| src.rows[i].clone()).collect();
        let lora = match &self.engine.trainable {
            Trainable::Lora(l) => Some(l.batch(self.kind)?),
            Trainable::Full(_) => None,
        };
        let r = evaluate_rows(&self.model, &examples, &rows, self.cfg.eval_batch_size, lora.as_ref())?;
        Ok((r.per_example.iter().filter(|e| e.pred == e.label).count(), r.examples))
    }

    pub fn set_sizes(&self) -> (usize, usize, usize) {
        (self.train.examples.len(), self.dev.examples.len(), self.test.examples.len())
    }
}

/// A checksum of state bytes (FNV-1a 64 forward and backward, and the length), hex: how replicas
/// and the coordinator compare their states. It catches divergence, not tampering; the store
/// keeps SHA-256 for files.
pub fn state_checksum(bytes: &[u8]) -> String {
    let mut h1: u64 = 0xcbf29ce484222325;
    let mut h2: u64 = 0x84222325cbf29ce4;
    for (i, &b) in bytes.iter().enumerate() {
        h1 = (h1 ^ u64::from(b)).wrapping_mul(0x100000001b3);
        h2 = (h2 ^ u64::from(bytes[bytes.len() - 1 - i])).wrapping_mul(0x100000001b3);
    }
    format!("{h1:016x}{h2:016x}-{}", bytes.len())
}

/// The data side of a run without the model: what a coordinator needs to plan batches and evals.
pub struct DataPlan {
    /// Token length of each training example's longest candidate row (for length-aware batches).
    pub train_lengths: Vec<usize>,
    pub n_dev: usize,
    pub n_test: usize,
}

impl DataPlan {
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let template = Template::parse(&cfg.template)?;
        let tok = TextTokenizer::from_dir(&cfg.model)?;
        // A bad config.json, or LoRA targets the architecture lacks, fail here, before any
        // worker loads the model.
        let mc = ModelConfig::from_dir(&cfg.model)?;
        if let Some(lc) = cfg.lora_config()? {
            lc.tensors(&mc)?;
        }
        let splits = cfg.splits()?;
        let n_test = splits.test.len();
        let train = tokenise(&tok, splits.train, template)?;
        let train_lengths =
            train.rows.iter().map(|r| r.iter().map(|x| x.tokens.len()).max().unwrap_or(0)).collect();
        Ok(DataPlan { train_lengths, n_dev: splits.dev.len(), n_test })
    }
}

/// A copy of the trained values, to keep the best by dev accuracy.
enum Snapshot {
    Lora(Tensor),
    Full(Vec<Tensor>),
}

fn snapshot(s: &Session) -> Snapshot {
    match &s.engine.trainable {
        Trainable::Lora(l) => Snapshot::Lora(l.flat.copy()),
        Trainable::Full(f) => {
            let params = s.model.named_parameters();
            Snapshot::Full(
                f.selected.iter().map(|(i, _, _)| params[*i].1.to_device(tch::Device::Cpu)).collect(),
            )
        }
    }
}

fn restore(s: &mut Session, snap: &Snapshot) {
    let _g = tch::no_grad_guard();
    match (&mut s.engine.trainable, snap) {
        (Trainable::Lora(l), Snapshot::Lora(t)) => l.flat = t.copy(),
        (Trainable::Full(f), Snapshot::Full(ts)) => {
            let params = s.model.named_parameters();
            for ((i, _, _), t) in f.selected.iter().zip(ts) {
                params[*i].1.shallow_clone().copy_(t);
            }
        }
        _ => unreachable!("snapshot of the same kind"),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// Runs a whole training job and writes its outputs under `cfg.out`.
pub fn train(cfg: TrainConfig, observer: &mut dyn Observer) -> Result<TrainReport> {
    let started = Instant::now();
    let out = cfg.out.clone();
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let mut s = Session::new(cfg)?;
    let cfg = s.cfg.clone();
    let zero_shot = s.test_accuracy()?;
    let mut best_dev = s.dev_accuracy()?;
    let mut best_step = 0;
    let mut best = snapshot(&s);
    let mut batcher = Batcher::new(s.train_lengths(), cfg.batch_size, cfg.seed)?;
    let log_path = out.join("train_log.jsonl");
    let mut log = std::io::BufWriter::new(std::fs::File::create(&log_path).map_err(io(&log_path))?);
    observer.on_start(cfg.steps);
    let t_train = Instant::now();
    let (mut skipped, mut recent) = (0u64, Vec::new());
    for step in 0..cfg.steps {
        let micro = s.prepare(&batcher.next_batch())?;
        let mut rec = if cfg.optimizer == OptimizerSpec::Adam {
            s.fo_step(step, &micro)?
        } else {
            s.zo_step(step, &micro)?
        };
        if rec.skipped {
            skipped += 1;
        } else {
            recent.push(rec.loss);
        }
        let last = step + 1 == cfg.steps;
        if (cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0) || last {
            let acc = s.dev_accuracy()?;
            rec.dev_accuracy = Some(acc);
            if acc > best_dev {
                best_dev = acc;
                best_step = step + 1;
                best = snapshot(&s);
            }
        }
        rec.seconds = t_train.elapsed().as_secs_f64();
        serde_json::to_writer(&mut log, &rec).expect("records serialise");
        log.write_all(b"\n").map_err(io(&log_path))?;
        observer.on_step(&rec);
    }
    log.flush().map_err(io(&log_path))?;
    let train_seconds = t_train.elapsed().as_secs_f64();
    restore(&mut s, &best);
    let test_accuracy = s.test_accuracy()?;
    let output = match s.adapter() {
        Some(a) => {
            let dir = out.join("adapter");
            a.save(&dir, &s.model.config(), &cfg.model.to_string_lossy())?;
            dir
        }
        None => save_full_model(&s, &out.join("model"))?,
    };
    let tail = recent.len().saturating_sub(recent.len().div_ceil(10).max(1).min(50));
    let final_train_loss = if recent.is_empty() {
        f64::NAN
    } else {
        recent[tail..].iter().sum::<f64>() / (recent.len() - tail) as f64
    };
    let report = TrainReport {
        steps: cfg.steps,
        final_train_loss,
        zero_shot_accuracy: zero_shot,
        best_dev_accuracy: best_dev,
        best_step,
        test_accuracy,
        skipped_steps: skipped,
        seconds: started.elapsed().as_secs_f64(),
        train_seconds,
        steps_per_s: cfg.steps as f64 / train_seconds,
        trainable_params: s.trainable_params(),
        optimizer_state_bytes: s.engine.optimizer_state_bytes()
            + s.fo_slots.iter().map(Slot::state_bytes).sum::<i64>(),
        output,
    };
    let report_path = out.join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report).expect("report serialises"))
        .map_err(io(&report_path))?;
    Ok(report)
}

/// A full-parameter run's result as an HF checkpoint directory: config.json and tokenizer files
/// copied from the base, the weights as model.safetensors in the run's dtype.
fn save_full_model(s: &Session, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for f in [
        "config.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "generation_config.json",
    ] {
        let src = s.cfg.model.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f)).map_err(io(&src))?;
        }
    }
    let named: Vec<(String, Tensor)> = s
        .model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    let path = dir.join("model.safetensors");
    Tensor::write_safetensors(&named, &path).map_err(TrainError::Torch)?;
    Ok(dir.to_path_buf())
}
