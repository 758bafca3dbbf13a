//! `mezo train` in one process: the MeZO protocol's data, the step loop, dev evaluation, the best
//! adapter kept, the test score, and the outputs (PEFT adapter or full model, a step log, a report).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mezo_core::{direction_seed, splitmix64, Distribution};
use std::sync::Arc;

use mezo_data::{ScoringRow, Task, TaskExample, UserTemplate};
use mezo_model::scoring::{evaluate_generation, evaluate_rows, example_rows, prompt_tokens, EvalReport};
use mezo_model::{
    parse_devices, parse_dtype, Adapter, Decoding, LoraConfig, Model, ModelConfig, Opt, PrefixAdapter,
    PrefixConfig, Target, TextTokenizer,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::{mezo_splits, Batcher};
use crate::engine::{
    Engine, FullState, GenContext, Item, LoraState, LossKind, PrefixState, Prepared, StepSettings, Trainable,
};
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
    /// MeZO's prefix mode: `num_prefix` key/value prefixes a layer, initialised from real
    /// activations.
    Prefix {
        num_prefix: i64,
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
    /// SST-2's prompt variant (`mezo` or `classify`); `mezo` for the other tasks.
    pub template: String,
    /// The prompt, candidates and fields of a `custom` task.
    #[serde(default)]
    pub user_template: Option<UserTemplate>,
    /// Generation tasks: the most tokens greedy decoding adds (it stops earlier at a newline).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
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

fn default_max_new_tokens() -> usize {
    DEFAULT_MAX_NEW_TOKENS
}

/// MeZO's `--max_new_tokens` default.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 50;

/// The loss a task trains with when none is asked for: classification for candidate tasks,
/// answer-ce for generation tasks.
pub fn default_loss(task: &Task) -> LossKind {
    if task.is_generation() {
        LossKind::AnswerCe
    } else {
        LossKind::Classification
    }
}

/// The most steps a run may ask for.
pub const MAX_STEPS: u64 = 100_000_000;

impl TrainConfig {
    /// Checks every field a user sets, naming it and the accepted range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        let task = self.task()?;
        match (task.is_generation(), self.loss) {
            (true, LossKind::Classification | LossKind::Accuracy) => {
                return bad(format!(
                    "--loss {} scores candidates, but task {} generates its answers: use answer-ce or f1",
                    self.loss.name(),
                    self.task
                ))
            }
            (false, LossKind::F1) => {
                return bad(format!(
                    "--loss f1 scores generated answers, but task {} scores candidates: use classification, \
                     answer-ce or accuracy",
                    self.task
                ))
            }
            _ => {}
        }
        if self.optimizer == OptimizerSpec::Adam && !self.loss.is_differentiable() {
            return bad(format!(
                "--loss {} is not differentiable, so first-order --optimizer adam cannot train on it: use a \
                 zeroth-order optimizer (zo-sgd, zo-momentum, zo-adam)",
                self.loss.name()
            ));
        }
        // Each count within a range: beyond it a typo (an extra zero) would allocate or run for
        // days before anyone noticed. The message names the flag and the run-spec field.
        let counts: [(&str, u64, u64, u64); 9] = [
            ("--steps (steps)", self.steps, 1, MAX_STEPS),
            ("--batch-size (batch_size)", self.batch_size as u64, 1, 4096),
            ("--directions (directions)", self.directions as u64, 1, 1024),
            ("--grad-accum (grad_accum)", self.grad_accum as u64, 1, 4096),
            ("--eval-batch-size (eval_batch_size)", self.eval_batch_size as u64, 1, 4096),
            ("--n-train (n_train)", self.n_train as u64, 1, 10_000_000),
            ("--n-dev (n_dev)", self.n_dev as u64, 1, 10_000_000),
            ("--min-words (min_words)", self.min_words as u64, 0, 10_000),
            ("--max-new-tokens (max_new_tokens)", self.max_new_tokens as u64, 1, 1024),
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
        if let ModeSpec::Prefix { num_prefix } = &self.mode {
            if !(1..=1024).contains(num_prefix) {
                return bad(format!(
                    "--num-prefix (prefix.num_prefix) must be between 1 and 1024, got {num_prefix}"
                ));
            }
        }
        self.distribution.parse::<Distribution>()?;
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

    /// The run's task (its name, template and user template checked).
    pub fn task(&self) -> Result<Task> {
        Ok(Task::new(&self.task, &self.template, self.user_template.clone())?)
    }

    /// The prefix configuration of a prefix run; `None` otherwise.
    pub fn prefix_config(&self) -> Option<PrefixConfig> {
        match &self.mode {
            ModeSpec::Prefix { num_prefix } => Some(PrefixConfig { num_prefix: *num_prefix }),
            _ => None,
        }
    }

    /// The MeZO protocol's splits of this run, the test set cut to `test_limit`.
    fn splits(&self) -> Result<crate::data::Splits> {
        let mut s = mezo_splits(
            &self.task()?,
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

/// The seed of a run's prefix initialisation (the tokens it is run on), from the run seed.
pub fn prefix_init_seed(run_seed: u64) -> u64 {
    splitmix64(run_seed ^ 0x9_0EF1_C5E5)
}

/// A run's initial trainable state on `model`: LoRA (PEFT's init), prefix (real activations of
/// `model`) or full-parameter (the model's own weights).
pub fn init_trainable(cfg: &TrainConfig, model: &Model) -> Result<Trainable> {
    if let Some(lc) = cfg.lora_config()? {
        return Ok(Trainable::Lora(LoraState::init(
            lc,
            &model.config(),
            model.device(),
            lora_init_seed(cfg.seed),
        )?));
    }
    match &cfg.mode {
        ModeSpec::Prefix { num_prefix } => Ok(Trainable::Prefix(PrefixState::init(
            PrefixConfig { num_prefix: *num_prefix },
            prefix_model(model)?,
            prefix_init_seed(cfg.seed),
        )?)),
        ModeSpec::Full { patterns } => Ok(Trainable::Full(FullState::new(model, patterns)?)),
        ModeSpec::Lora { .. } => unreachable!("handled above"),
    }
}

/// The OPT model a prefix run needs: the Llama family has no prefix-tuning yet.
fn prefix_model(model: &Model) -> Result<&Opt> {
    match model {
        Model::Opt(m) => Ok(m),
        Model::Llama(_) => Err(TrainError::Config(format!(
            "--mode prefix supports OPT models; this one is {} (use --mode lora or full)",
            model.config().model_type()
        ))),
    }
}

/// The initial state a coordinator holds for a run, on the CPU: LoRA from the configuration
/// alone; a prefix from the base model's activations (the model is loaded on the CPU in the
/// run's dtype for that, then dropped); `None` for full-parameter runs (the workers' weights are
/// the state).
pub fn coordinator_state(cfg: &TrainConfig) -> Result<Option<Trainable>> {
    if let Some(lc) = cfg.lora_config()? {
        let mc = ModelConfig::from_dir(&cfg.model)?;
        return Ok(Some(Trainable::Lora(LoraState::init(
            lc,
            &mc,
            tch::Device::Cpu,
            lora_init_seed(cfg.seed),
        )?)));
    }
    if cfg.prefix_config().is_some() {
        let mc = ModelConfig::from_dir(&cfg.model)?;
        if !matches!(mc, ModelConfig::Opt(_)) {
            return Err(TrainError::Config(format!(
                "--mode prefix supports OPT models; {} is {} (use --mode lora or full)",
                cfg.model.display(),
                mc.model_type()
            )));
        }
        let model = Model::load(&cfg.model, tch::Device::Cpu, parse_dtype(&cfg.dtype)?)?;
        return Ok(Some(init_trainable(cfg, &model)?));
    }
    Ok(None)
}

/// Writes a LoRA or prefix state (`flat`, float32) as a PEFT adapter directory; `Ok(false)` for
/// full-parameter runs, which have none.
pub fn save_adapter(cfg: &TrainConfig, model: &ModelConfig, flat: Tensor, dir: &Path) -> Result<bool> {
    let base = cfg.model.to_string_lossy();
    if let Some(config) = cfg.lora_config()? {
        Adapter { config, flat }.save(dir, model, &base)?;
    } else if let Some(config) = cfg.prefix_config() {
        let ModelConfig::Opt(opt) = model else {
            return Err(TrainError::Config("a prefix adapter needs an OPT model".into()));
        };
        PrefixAdapter { config, flat }.save(dir, opt, &base)?;
    } else {
        return Ok(false);
    }
    Ok(true)
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

/// The `*_accuracy` fields hold the task's metric, named by `metric`: accuracy for candidate
/// tasks, F1 for generation tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: u64,
    #[serde(default)]
    pub metric: String,
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
    examples: Vec<TaskExample>,
    /// Scoring rows: the candidates, or a generation task's teacher-forced gold row.
    rows: Vec<Vec<ScoringRow>>,
    /// Prompt tokens (generation tasks only).
    prompts: Vec<Vec<i64>>,
}

fn tokenise(tok: &TextTokenizer, examples: Vec<TaskExample>, task: &Task) -> Result<Tokenised> {
    let rows = example_rows(tok, &examples)?;
    let prompts = if task.is_generation() { prompt_tokens(tok, &examples)? } else { Vec::new() };
    Ok(Tokenised { examples, rows, prompts })
}

/// Everything [`train`] loads before its first step.
/// Training batches a [`Session`] keeps prepared: the current step's and the next one's.
const BATCHES_KEPT: usize = 2;

pub struct Session {
    pub cfg: TrainConfig,
    pub task: Task,
    /// Tokenizer and stop tokens of generation tasks.
    gen: Option<Arc<GenContext>>,
    pub model: Model,
    kind: Kind,
    train: Tokenised,
    dev: Tokenised,
    test: Tokenised,
    pub engine: Engine,
    /// First-order Adam state (only with `--optimizer adam`).
    fo_slots: Vec<Slot>,
    /// The last training batches prepared (newest first, at most [`BATCHES_KEPT`]), by their
    /// examples: a step's directions, served as one task each, all read one batch, so its host
    /// work and uploads happen once a step rather than once a task; and a worker prepares the
    /// next step's batch ahead ([`Self::prefetch`]) while it waits for that step's tasks.
    batches: std::sync::Mutex<Vec<(Vec<usize>, Vec<Prepared>)>>,
}

impl Session {
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let devices = parse_devices(&cfg.device)?;
        let kind = parse_dtype(&cfg.dtype)?;
        let task = cfg.task()?;
        let tok = TextTokenizer::from_dir(&cfg.model)?;
        let model = Model::load_on(&cfg.model, &devices, kind)?;
        tok.check_fits(model.config().vocab_size())?;
        let splits = cfg.splits()?;
        let test = splits.test;
        let train = tokenise(&tok, splits.train, &task)?;
        let dev = tokenise(&tok, splits.dev, &task)?;
        let test = tokenise(&tok, test, &task)?;
        let gen = task.is_generation().then(|| {
            let decoding = Decoding::new(&tok, model.eos_token_id(), cfg.max_new_tokens);
            Arc::new(GenContext { tokenizer: Arc::new(tok), decoding })
        });
        let trainable = init_trainable(&cfg, &model)?;
        let settings = cfg.step_settings()?;
        let engine = Engine::new(trainable, settings, model.device());
        Ok(Session {
            cfg,
            task,
            gen,
            model,
            kind,
            train,
            dev,
            test,
            engine,
            fo_slots: Vec::new(),
            batches: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub fn trainable_params(&self) -> i64 {
        match &self.engine.trainable {
            Trainable::Full(f) => f.numel(&self.model),
            t => t.flat_state().map_or(0, |s| s.flat.numel() as i64),
        }
    }

    /// Applies the engine's pending full-parameter update, if any ([`Engine::set_deferred_update`]):
    /// after it the model's weights are the trained θ. Everything here that reads the weights
    /// calls it first; code reading `self.model` directly between steps must too.
    pub fn flush(&self) -> Result<()> {
        self.engine.flush(&self.model)
    }

    /// Evaluates the given examples of a set at the current state.
    fn evaluate(&self, set: &Tokenised, idx: Option<&[usize]>) -> Result<EvalReport> {
        self.flush()?;
        let tuning = self.engine.trainable.tuning(self.kind)?;
        let all: Vec<usize>;
        let idx = match idx {
            Some(i) => i,
            None => {
                all = (0..set.examples.len()).collect();
                &all
            }
        };
        let examples: Vec<TaskExample> = idx.iter().map(|&i| set.examples[i].clone()).collect();
        let bs = self.cfg.eval_batch_size;
        Ok(match &self.gen {
            None => {
                let rows: Vec<Vec<ScoringRow>> = idx.iter().map(|&i| set.rows[i].clone()).collect();
                evaluate_rows(&self.model, &examples, &rows, bs, tuning.as_ref())?
            }
            Some(g) => {
                let prompts: Vec<Vec<i64>> = idx.iter().map(|&i| set.prompts[i].clone()).collect();
                evaluate_generation(
                    &self.model,
                    &g.tokenizer,
                    &g.decoding,
                    &examples,
                    &prompts,
                    bs,
                    tuning.as_ref(),
                )?
            }
        })
    }

    /// The task's metric (accuracy, or F1 for generation tasks) on the dev set.
    pub fn dev_accuracy(&self) -> Result<f64> {
        Ok(self.evaluate(&self.dev, None)?.score)
    }

    /// The task's metric on the test set.
    pub fn test_accuracy(&self) -> Result<f64> {
        Ok(self.evaluate(&self.test, None)?.score)
    }

    /// The whole test set's report (predictions and every metric).
    pub fn test_report(&self) -> Result<EvalReport> {
        self.evaluate(&self.test, None)
    }

    /// Micro-batches of the given training examples.
    pub fn prepare(&self, idx: &[usize]) -> Result<Vec<Prepared>> {
        let per = idx.len().div_ceil(self.cfg.grad_accum);
        idx.chunks(per)
            .map(|c| {
                let items: Vec<Item> = c
                    .iter()
                    .map(|&i| {
                        let ex = &self.train.examples[i];
                        Item {
                            rows: &self.train.rows[i],
                            // A generation task's only row is its gold answer.
                            gold: if ex.candidates.is_empty() { &[0] } else { &ex.gold },
                            prompt: self.train.prompts.get(i).map_or(&[], Vec::as_slice),
                            answers: &ex.answers,
                        }
                    })
                    .collect();
                let mut p = Prepared::from_items(&items, self.cfg.loss, &self.model, self.gen.as_ref())?;
                // Prefix tokens take positions before the rows (the model refuses more in all).
                let prefix = match self.cfg.mode {
                    ModeSpec::Prefix { num_prefix } => num_prefix as usize,
                    _ => 0,
                };
                let max = self.model.config().max_position_embeddings() as usize;
                p.pad_to_bucket(max.saturating_sub(prefix), self.model.pad_token_id());
                Ok(p)
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
        self.flush()?;
        let lr = self.cfg.schedule.lr(self.cfg.lr, step, self.cfg.steps);
        let weight: f64 = micro.iter().map(|p| p.weight).sum();
        let rule = self.cfg.rule();
        let wd = self.cfg.weight_decay;
        let mut total = 0.0;
        if let Some(state) = self.engine.trainable.flat_state() {
            let leaf = state.flat.detach().set_requires_grad(true);
            for p in micro {
                let batch = self.engine.trainable.tuning_of(&leaf.unsqueeze(0), self.kind)?;
                let loss = p.loss_sums(&self.model, batch.as_ref())?.sum(Kind::Float) / weight;
                total += loss.double_value(&[]);
                loss.backward();
            }
            let _g = tch::no_grad_guard();
            if self.fo_slots.is_empty() {
                self.fo_slots.push(Slot::default());
            }
            let grad = leaf.grad();
            let state = self.engine.trainable.flat_state_mut().expect("checked above");
            state.flat = optim::apply(rule, &mut self.fo_slots[0], &leaf.detach(), &grad, lr, wd, true);
        }
        match &mut self.engine.trainable {
            Trainable::Lora(_) | Trainable::Prefix(_) => {}
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

    /// Writes the trained state as a PEFT adapter (LoRA or prefix runs) into `dir`; `Ok(false)`
    /// for full-parameter runs.
    pub fn save_adapter(&self, dir: &Path) -> Result<bool> {
        match self.engine.trainable.flat_state() {
            Some(s) => save_adapter(&self.cfg, &self.model.config(), s.flat.copy(), dir),
            None => Ok(false),
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
/// The wire and snapshot form of a LoRA or prefix state: its f32 values, little-endian, in PEFT
/// order; empty for full-parameter training.
pub fn flat_state_bytes(trainable: &Trainable) -> Vec<u8> {
    match trainable.flat_state() {
        Some(s) => {
            let v: Vec<f32> = Vec::try_from(&s.flat.to_device(tch::Device::Cpu)).expect("f32 state");
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        None => Vec::new(),
    }
}

/// The inverse of [`flat_state_bytes`] (a trailing partial value is dropped).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Decodes LoRA or prefix state bytes (a snapshot, a replica's state) that must hold exactly `expected`
/// values: a length that is off, even by a partial value, means the bytes belong to another
/// configuration or were cut short.
pub fn flat_values_from_bytes(bytes: &[u8], expected: usize) -> std::result::Result<Vec<f32>, String> {
    if bytes.len() != expected.saturating_mul(4) {
        return Err(format!(
            "{} bytes for {expected} trainable values ({} bytes)",
            bytes.len(),
            expected.saturating_mul(4)
        ));
    }
    Ok(f32_from_le_bytes(bytes))
}

impl Session {
    /// The LoRA or prefix state as little-endian f32 bytes (PEFT order); empty for
    /// full-parameter runs.
    pub fn state_bytes(&self) -> Vec<u8> {
        flat_state_bytes(&self.engine.trainable)
    }

    /// Replaces the LoRA or prefix state with `bytes` (as from [`Session::state_bytes`]).
    pub fn set_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(l) = self.engine.trainable.flat_state_mut() else {
            return if bytes.is_empty() {
                Ok(())
            } else {
                Err(TrainError::Config("a full-parameter replica takes no state bytes".into()))
            };
        };
        let values = flat_values_from_bytes(bytes, l.flat.numel())
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
        let mut cache = self.batches.lock().expect("batch cache");
        let micro = &self.cached_batch(&mut cache, examples)?.1;
        let weight = micro.iter().map(|p| p.weight).sum();
        let tokens = micro.iter().map(|p| p.tokens).sum::<u64>() * 2 * seeds.len() as u64;
        Ok((self.engine.direction_losses(&self.model, micro, seeds)?, weight, tokens))
    }

    /// Prepares the training batch of `examples` (tokens to device tensors) and keeps it for
    /// the [`Self::train_losses`] that will read it: a worker calls this with the next step's
    /// examples while it waits for that step's tasks, taking the batch's host work and uploads
    /// off the step's critical path.
    pub fn prefetch(&self, examples: &[usize]) -> Result<()> {
        let mut cache = self.batches.lock().expect("batch cache");
        self.cached_batch(&mut cache, examples).map(|_| ())
    }

    /// The cached batch of `examples`, prepared and cached (newest first) if it is not there.
    fn cached_batch<'c>(
        &self,
        cache: &'c mut Vec<(Vec<usize>, Vec<Prepared>)>,
        examples: &[usize],
    ) -> Result<&'c (Vec<usize>, Vec<Prepared>)> {
        match cache.iter().position(|(idx, _)| idx.as_slice() == examples) {
            Some(0) => {}
            Some(j) => {
                let hit = cache.remove(j);
                cache.insert(0, hit);
            }
            None => {
                let prepared = self.prepare(examples)?;
                cache.insert(0, (examples.to_vec(), prepared));
                cache.truncate(BATCHES_KEPT);
            }
        }
        Ok(&cache[0])
    }

    /// The sum of the task's metric over the given examples of `set` (correct predictions, or
    /// F1), the examples exactly right (correct, or exact matches), and the examples evaluated.
    pub fn eval_subset(&self, set: EvalSet, idx: &[usize]) -> Result<(f64, usize, usize)> {
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
        let r = self.evaluate(src, Some(idx))?;
        let exact = if r.generations.is_empty() {
            r.per_example.iter().filter(|e| e.correct).count()
        } else {
            r.generations.iter().filter(|g| g.exact_match == 1.0).count()
        };
        Ok((r.score_sum(), exact, r.examples))
    }

    pub fn set_sizes(&self) -> (usize, usize, usize) {
        (self.train.examples.len(), self.dev.examples.len(), self.test.examples.len())
    }
}

/// A checksum of state bytes (FNV-1a 64 forward and backward, and the length), hex: how replicas
/// and the coordinator compare their states. It catches divergence, not tampering; the store
/// keeps SHA-256 for files.
pub fn state_checksum(bytes: &[u8]) -> String {
    fn fnv<'a>(init: u64, it: impl Iterator<Item = &'a u8>) -> u64 {
        it.fold(init, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
    }
    // The two hashes are independent chains: on two threads for a large state (a 1.3B model's
    // LoRA state is 6 MB, ~10 ms a chain), and every worker and the coordinator wait for it at
    // snapshot steps.
    let (h1, h2) = if bytes.len() >= 1 << 20 {
        std::thread::scope(|s| {
            let back = s.spawn(|| fnv(0x84222325cbf29ce4, bytes.iter().rev()));
            let h1 = fnv(0xcbf29ce484222325, bytes.iter());
            (h1, back.join().expect("checksum thread"))
        })
    } else {
        (fnv(0xcbf29ce484222325, bytes.iter()), fnv(0x84222325cbf29ce4, bytes.iter().rev()))
    };
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
        let task = cfg.task()?;
        let tok = TextTokenizer::from_dir(&cfg.model)?;
        // A bad config.json, or LoRA targets the architecture lacks, fail here, before any
        // worker loads the model.
        let mc = ModelConfig::from_dir(&cfg.model)?;
        tok.check_fits(mc.vocab_size())?;
        if let Some(lc) = cfg.lora_config()? {
            lc.tensors(&mc)?;
        }
        let splits = cfg.splits()?;
        let n_test = splits.test.len();
        let train = tokenise(&tok, splits.train, &task)?;
        let train_lengths =
            train.rows.iter().map(|r| r.iter().map(|x| x.tokens.len()).max().unwrap_or(0)).collect();
        Ok(DataPlan { train_lengths, n_dev: splits.dev.len(), n_test })
    }
}

/// A copy of the trained values, to keep the best by dev accuracy.
enum Snapshot {
    Flat(Tensor),
    Full(Vec<Tensor>),
}

fn snapshot(s: &Session) -> Result<Snapshot> {
    if let Some(f) = s.engine.trainable.flat_state() {
        return Ok(Snapshot::Flat(f.flat.copy()));
    }
    s.flush()?;
    match &s.engine.trainable {
        Trainable::Lora(_) | Trainable::Prefix(_) => unreachable!("flat states are copied above"),
        Trainable::Full(f) => {
            let params = s.model.named_parameters();
            Ok(Snapshot::Full(
                f.selected.iter().map(|(i, _, _)| params[*i].1.to_device(tch::Device::Cpu)).collect(),
            ))
        }
    }
}

fn restore(s: &mut Session, snap: &Snapshot) -> Result<()> {
    // A pending update applied now, not later on top of the restored weights.
    s.flush()?;
    let _g = tch::no_grad_guard();
    if let (Some(l), Snapshot::Flat(t)) = (s.engine.trainable.flat_state_mut(), snap) {
        l.flat = t.copy();
        return Ok(());
    }
    match (&mut s.engine.trainable, snap) {
        (Trainable::Full(f), Snapshot::Full(ts)) => {
            let params = s.model.named_parameters();
            for ((i, _, _), t) in f.selected.iter().zip(ts) {
                params[*i].1.shallow_clone().copy_(t);
            }
        }
        _ => unreachable!("snapshot of the same kind"),
    }
    Ok(())
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
    // Full-parameter ZO-SGD steps leave their update to the next step's first sweep: everything
    // below that reads the weights (evaluation, snapshots, saving) goes through `Session::flush`.
    s.engine.set_deferred_update(true);
    let cfg = s.cfg.clone();
    let zero_shot = s.test_accuracy()?;
    let mut best_dev = s.dev_accuracy()?;
    let mut best_step = 0;
    let mut best = snapshot(&s)?;
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
                best = snapshot(&s)?;
            }
        }
        rec.seconds = t_train.elapsed().as_secs_f64();
        serde_json::to_writer(&mut log, &rec).expect("records serialise");
        log.write_all(b"\n").map_err(io(&log_path))?;
        observer.on_step(&rec);
    }
    log.flush().map_err(io(&log_path))?;
    let train_seconds = t_train.elapsed().as_secs_f64();
    restore(&mut s, &best)?;
    let test_accuracy = s.test_accuracy()?;
    let dir = out.join("adapter");
    let output = if s.save_adapter(&dir)? { dir } else { save_full_model(&s, &out.join("model"))? };
    let tail = recent.len().saturating_sub(recent.len().div_ceil(10).max(1).min(50));
    let final_train_loss = if recent.is_empty() {
        f64::NAN
    } else {
        recent[tail..].iter().sum::<f64>() / (recent.len() - tail) as f64
    };
    let report = TrainReport {
        steps: cfg.steps,
        metric: s.task.metric().name().into(),
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
    s.flush()?;
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

#[cfg(test)]
mod checksum_tests {
    use super::state_checksum;

    /// The checksum is part of the protocol (snapshots and replicas compare it): pinned to the
    /// sequential definition, for states under and over the two-thread threshold.
    #[test]
    fn checksum_is_fnv_forward_and_backward() {
        let reference = |bytes: &[u8]| {
            let (mut h1, mut h2): (u64, u64) = (0xcbf29ce484222325, 0x84222325cbf29ce4);
            for (i, &b) in bytes.iter().enumerate() {
                h1 = (h1 ^ u64::from(b)).wrapping_mul(0x100000001b3);
                h2 = (h2 ^ u64::from(bytes[bytes.len() - 1 - i])).wrapping_mul(0x100000001b3);
            }
            format!("{h1:016x}{h2:016x}-{}", bytes.len())
        };
        for n in [0usize, 1, 1000, (1 << 20) + 3] {
            let bytes: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
            assert_eq!(state_checksum(&bytes), reference(&bytes), "{n} bytes");
        }
        // A golden value (computed independently), so the reference itself cannot drift.
        assert_eq!(state_checksum(b"mezo"), "4342e7a2e34b8f3857f6b15848aa6063-4");
    }
}
