//! `mezo train` and `mezo demo`.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::ProgressBar;
use mezo_data::{Task, UserTemplate};
use mezo_train::optim::Schedule;
use mezo_train::trainer::{default_loss, DEFAULT_MAX_NEW_TOKENS};
use mezo_train::{train, LossKind, ModeSpec, Observer, OptimizerSpec, StepRecord, TrainConfig, TrainReport};

/// The task flags `mezo train` and `mezo eval` share.
#[derive(clap::Args, Debug, Clone)]
pub struct TaskArgs {
    /// sst2, rte, cb, boolq, wsc, wic, multirc, copa, record (candidate scoring, accuracy), squad,
    /// drop (generation, F1), or custom (your own fields through --prompt).
    #[arg(long, default_value = "sst2")]
    pub task: String,
    /// SST-2's prompt: mezo ("<s> It was" terrible/great) or classify; other tasks use MeZO's.
    #[arg(long, default_value = "mezo")]
    pub template: String,
    /// --task custom: the prompt, with {field} placeholders for the JSONL's fields (\n: newline).
    #[arg(long)]
    pub prompt: Option<String>,
    /// --task custom: a fixed candidate, appended to the prompt verbatim (repeat the flag; start
    /// each with a space where one belongs).
    #[arg(long = "candidate")]
    pub candidates: Vec<String>,
    /// --task custom: the field holding each line's list of candidates.
    #[arg(long)]
    pub candidates_field: Option<String>,
    /// --task custom: the gold candidate's field, an index or a candidate's text [default: label].
    #[arg(long)]
    pub label_field: Option<String>,
    /// --task custom: a generation task; the field with the reference answer(s).
    #[arg(long)]
    pub answer_field: Option<String>,
    /// Generation tasks: the most tokens greedy decoding adds (it stops at a newline first).
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
}

impl TaskArgs {
    /// The user template the flags describe, if any flag of one is given.
    pub fn user_template(&self) -> Option<UserTemplate> {
        let any = self.prompt.is_some()
            || !self.candidates.is_empty()
            || self.candidates_field.is_some()
            || self.label_field.is_some()
            || self.answer_field.is_some();
        any.then(|| UserTemplate {
            prompt: self.prompt.clone().unwrap_or_default(),
            candidates: self.candidates.clone(),
            candidates_field: self.candidates_field.clone().unwrap_or_default(),
            label_field: self.label_field.clone().unwrap_or_default(),
            answer_field: self.answer_field.clone().unwrap_or_default(),
        })
    }

    pub fn task(&self) -> Result<Task> {
        Ok(Task::new(&self.task, &self.template, self.user_template())?)
    }

    /// SST-2 with MeZO's template (the demo's task).
    pub fn sst2() -> Self {
        TaskArgs {
            task: "sst2".into(),
            template: "mezo".into(),
            prompt: None,
            candidates: vec![],
            candidates_field: None,
            label_field: None,
            answer_field: None,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
#[command(args_override_self = true)]
pub struct TrainArgs {
    /// Base checkpoint directory (HF format).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Folder with train.jsonl (train and dev are sampled from it) and validation.jsonl (test).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// What trains: lora, prefix (MeZO's prefix-tuning: --num-prefix key/value prefixes a layer,
    /// initialised from real activations) or full (every selected parameter; same as --full).
    #[arg(long, default_value = "lora")]
    pub mode: String,
    /// With --mode prefix: virtual tokens a layer.
    #[arg(long, default_value_t = 5)]
    pub num_prefix: i64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: i64,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Comma-separated modules: q_proj, k_proj, v_proj, out_proj, fc1, fc2.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// Full-parameter MeZO instead of LoRA (--mode full).
    #[arg(long)]
    pub full: bool,
    /// With --full: train only parameters whose names contain one of these (or match as a glob).
    #[arg(long, value_delimiter = ',')]
    pub full_patterns: Vec<String>,
    #[arg(long, default_value_t = 20000)]
    pub steps: u64,
    /// Learning rate [default: 1e-4 with LoRA, 1e-6 with --full, 1e-3 with prefix or with
    /// --optimizer adam].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Perturbation scale ε [default: 1e-2 with LoRA, 1e-3 with --full, 1e-1 with prefix].
    #[arg(long)]
    pub eps: Option<f64>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Random directions per step (2 forward passes' worth each, batched into one pass with LoRA).
    #[arg(long, default_value_t = 1)]
    pub directions: usize,
    /// Micro-batches per step (gradient accumulation; all share the step's perturbations).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on the dev set every N steps (0: only at the end); the best adapter is kept.
    #[arg(long, default_value_t = 500)]
    pub eval_every: u64,
    /// zo-sgd (MeZO; no extra memory), zo-momentum (+1x the trainable parameters in fp32),
    /// zo-adam (+2x), or adam: first-order Adam through backprop (the fine-tuning baseline;
    /// +2x plus gradients and activations kept for the backward pass).
    #[arg(long, default_value = "zo-sgd")]
    pub optimizer: String,
    /// β of zo-momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// constant, linear or cosine (decay to 0 at the last step).
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    /// Decoupled weight decay λ, applied to matrices only.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Perturbation distribution: gaussian or rademacher.
    #[arg(long, default_value = "gaussian")]
    pub distribution: String,
    /// classification (cross-entropy over candidates), answer-ce (teacher-forced, answer tokens),
    /// or the non-differentiable accuracy (candidate tasks) or f1 (generation tasks): the
    /// estimator only needs a number per forward [default: classification, answer-ce for
    /// generation tasks].
    #[arg(long)]
    pub loss: Option<String>,
    /// Training examples sampled from train.jsonl (MeZO: 1000).
    #[arg(long, default_value_t = 1000)]
    pub n_train: usize,
    /// Dev examples sampled from train.jsonl, disjoint from the training ones (MeZO: 500).
    #[arg(long, default_value_t = 500)]
    pub n_dev: usize,
    /// Sample train and dev only among examples of at least N words (0: all, MeZO's protocol).
    #[arg(long, default_value_t = 0)]
    pub min_words: usize,
    /// Evaluate on only the first N test examples.
    #[arg(long)]
    pub test_limit: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub eval_batch_size: usize,
    /// cpu, cuda, cuda:N, or a list (`cuda:0,cuda:1`, also as `--devices`) that splits the
    /// model's layers over those devices (a model larger than one GPU).
    #[arg(long, visible_alias = "devices", default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Output folder: adapter/ (PEFT LoRA or prefix) or model/ (--full), train_log.jsonl, report.json
    /// (required by `mezo train`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one final JSON object (the report) on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `mezo train`: the training flags, and how to run them.
#[derive(clap::Args, Debug)]
pub struct TrainCmd {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Train through the service: a coordinator and N workers in this process, talking gRPC over
    /// loopback (the fleet's code paths; each worker holds its own copy of the model). 0: train
    /// in one process without the service.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// With --workers: direction (each worker evaluates whole directions) or data (batch shards).
    #[arg(long, default_value = "direction")]
    pub split: String,
}

impl TrainArgs {
    pub fn config(&self) -> Result<TrainConfig> {
        let optimizer = OptimizerSpec::parse(&self.optimizer)?;
        let mode = match (self.mode.as_str(), self.full) {
            ("full", _) | ("lora", true) => ModeSpec::Full { patterns: self.full_patterns.clone() },
            ("lora", false) => {
                ModeSpec::Lora { r: self.lora_r, alpha: self.lora_alpha, targets: self.lora_targets.clone() }
            }
            ("prefix", false) => ModeSpec::Prefix { num_prefix: self.num_prefix },
            ("prefix", true) => anyhow::bail!("--full and --mode prefix contradict each other: pick one"),
            (m, _) => anyhow::bail!("unknown --mode `{m}`: expected lora, prefix or full"),
        };
        let full = matches!(mode, ModeSpec::Full { .. });
        let prefix = matches!(mode, ModeSpec::Prefix { .. });
        let lr = self.lr.unwrap_or(match optimizer {
            OptimizerSpec::Adam => 1e-3,
            _ => mezo_train::spec::default_lr(full, prefix),
        });
        let eps = self.eps.unwrap_or(mezo_train::spec::default_eps(full, prefix));
        let loss = match &self.loss {
            Some(l) => LossKind::parse(l)?,
            None => default_loss(&self.task.task()?),
        };
        Ok(TrainConfig {
            model: self.model.clone(),
            task: self.task.task.clone(),
            data_dir: self.data_dir.clone(),
            mode,
            steps: self.steps,
            lr,
            eps,
            batch_size: self.batch_size,
            directions: self.directions,
            grad_accum: self.grad_accum,
            seed: self.seed,
            eval_every: self.eval_every,
            optimizer,
            momentum: self.momentum,
            schedule: Schedule::parse(&self.schedule)?,
            weight_decay: self.weight_decay,
            distribution: self.distribution.clone(),
            loss,
            template: self.task.template.clone(),
            user_template: self.task.user_template(),
            max_new_tokens: self.task.max_new_tokens,
            n_train: self.n_train,
            n_dev: self.n_dev,
            min_words: self.min_words,
            test_limit: self.test_limit,
            eval_batch_size: self.eval_batch_size,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            out: self.out.clone().unwrap_or_default(),
        })
    }
}

/// A progress bar on stderr with steps/s, the running loss and the last dev accuracy; hidden
/// when stderr is not a terminal.
pub(crate) struct Bar {
    pub(crate) bar: ProgressBar,
    loss: Option<f64>,
    dev: Option<f64>,
}

impl Bar {
    pub(crate) fn new() -> Self {
        Bar { bar: ProgressBar::hidden(), loss: None, dev: None }
    }
}

impl Observer for Bar {
    fn on_start(&mut self, total: u64) {
        self.bar = crate::progress::step_bar(total);
    }

    fn on_step(&mut self, r: &StepRecord) {
        if !r.skipped {
            // An exponential moving average: single-batch losses are noisy.
            self.loss = Some(match self.loss {
                Some(l) => 0.95 * l + 0.05 * r.loss,
                None => r.loss,
            });
        }
        if r.dev_accuracy.is_some() {
            self.dev = r.dev_accuracy;
        }
        let dev = self.dev.map_or("-".into(), |d| format!("{:.1}%", 100.0 * d));
        self.bar.set_message(format!("loss {:.4} dev {dev}", self.loss.unwrap_or(f64::NAN)));
        self.bar.inc(1);
    }
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    if args.out.is_none() {
        anyhow::bail!("--out DIR is required: where the adapter, the step log and the report go");
    }
    let cfg = args.config()?;
    let mut bar = Bar::new();
    let report = train(cfg, &mut bar)?;
    bar.bar.finish_and_clear();
    print_report(&report, args.json, None)
}

pub(crate) fn print_report(r: &TrainReport, json: bool, extra: Option<serde_json::Value>) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(r)?;
        if let (Some(serde_json::Value::Object(e)), serde_json::Value::Object(m)) = (extra, &mut v) {
            m.extend(e);
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        let m = if r.metric.is_empty() { "accuracy" } else { r.metric.as_str() };
        println!(
            "{} steps in {:.1}s ({:.2} steps/s, {} skipped); train loss {:.4}; dev best {m} {:.2}% (step {}); \
             test {m} {:.2}% (zero-shot {:.2}%); saved {}",
            r.steps,
            r.train_seconds,
            r.steps_per_s,
            r.skipped_steps,
            r.final_train_loss,
            100.0 * r.best_dev_accuracy,
            r.best_step,
            100.0 * r.test_accuracy,
            100.0 * r.zero_shot_accuracy,
            r.output.display()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Output folder [default: a fresh folder under the system's temp dir].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one final JSON object.
    #[arg(long)]
    pub json: bool,
    /// Fewer steps, for a quicker look (the demo's claim is made with the default).
    #[arg(long)]
    pub steps: Option<u64>,
}

/// The bundled assets, found beside the binary's source tree or under `$MEZO_ASSETS`.
pub fn assets_dir() -> Result<PathBuf> {
    let candidates = [
        std::env::var_os("MEZO_ASSETS").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets")),
        Some(PathBuf::from("crates/mezo-cli/assets")),
    ];
    candidates.into_iter().flatten().find(|d| d.join("opt-mini/config.json").is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "bundled assets not found: set MEZO_ASSETS to crates/mezo-cli/assets of a mezo checkout"
        )
    })
}

/// The demo's settings: MeZO with LoRA on the bundled small OPT and SST-2, sized for 2 CPU
/// cores in under 5 minutes.
pub fn demo_args(out: PathBuf, steps: Option<u64>) -> Result<TrainArgs> {
    let assets = assets_dir()?;
    Ok(TrainArgs {
        model: assets.join("opt-mini"),
        task: TaskArgs::sst2(),
        data_dir: assets.join("sst2"),
        mode: "lora".into(),
        num_prefix: 5,
        lora_r: DEMO_R,
        lora_alpha: 2.0 * DEMO_R as f64,
        lora_targets: DEMO_TARGETS.iter().map(|t| t.to_string()).collect(),
        full: false,
        full_patterns: vec![],
        steps: steps.unwrap_or(DEMO_STEPS),
        lr: Some(DEMO_LR),
        eps: Some(1e-2),
        batch_size: 16,
        directions: DEMO_DIRECTIONS,
        grad_accum: 1,
        seed: 0,
        eval_every: 250,
        optimizer: "zo-sgd".into(),
        momentum: 0.9,
        schedule: "constant".into(),
        weight_decay: 0.0,
        distribution: "gaussian".into(),
        loss: None,
        n_train: 1000,
        n_dev: 500,
        min_words: DEMO_MIN_WORDS,
        test_limit: None,
        eval_batch_size: 64,
        device: "cpu".into(),
        dtype: "fp32".into(),
        out: Some(out),
        json: false,
    })
}

pub const DEMO_STEPS: u64 = 1000;
pub const DEMO_LR: f64 = 3e-3;
pub const DEMO_R: i64 = 2;
pub const DEMO_TARGETS: [&str; 2] = ["out_proj", "fc2"];
pub const DEMO_DIRECTIONS: usize = 4;
pub const DEMO_MIN_WORDS: usize = 0;

pub fn run_demo(args: DemoArgs) -> Result<()> {
    let out =
        args.out.unwrap_or_else(|| std::env::temp_dir().join(format!("mezo-demo-{}", std::process::id())));
    let targs = demo_args(out, args.steps)?;
    if !args.json {
        eprintln!(
            "mezo demo: MeZO (LoRA r={DEMO_R} on {}; {} steps, batch 16, {} directions, lr {DEMO_LR}) on the \
             bundled opt-mini and SST-2 (1000 train / 500 dev sampled, 872 test), on the CPU",
            DEMO_TARGETS.join(","),
            targs.steps,
            targs.directions
        );
    }
    let mut bar = Bar::new();
    let report = train(targs.config()?, &mut bar)?;
    bar.bar.finish_and_clear();
    if !args.json {
        println!(
            "zero-shot test accuracy {:.2}% -> after MeZO {:.2}% ({:+.2} points) in {:.0}s; adapter in {}",
            100.0 * report.zero_shot_accuracy,
            100.0 * report.test_accuracy,
            100.0 * (report.test_accuracy - report.zero_shot_accuracy),
            report.seconds,
            report.output.display()
        );
        Ok(())
    } else {
        print_report(&report, true, None)
    }
}
