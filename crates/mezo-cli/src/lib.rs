//! The `mezo` command line. `main.rs` only parses; each subcommand is a function here.

mod bench;
pub mod local;
mod progress;
pub mod report;
pub mod service;
pub mod train;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mezo_model::scoring::{evaluate, EvalReport};
use mezo_model::{parse_devices, parse_dtype, Model, TextTokenizer};
use train::TaskArgs;

#[derive(Parser, Debug)]
#[command(name = "mezo", version, about = "Fine-tune language models with MeZO: forward passes only")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Score a task's examples with a model and report accuracy.
    Eval(EvalArgs),
    /// Time the engine on random weights of a published OPT or Llama-family shape (optionally against HF transformers).
    Bench(bench::BenchArgs),
    /// Fine-tune with MeZO (or first-order Adam, --optimizer adam): in one process, or with
    /// --workers N through a coordinator and N workers of this process over loopback.
    Train(train::TrainCmd),
    /// Train the bundled small OPT on SST-2 with MeZO on the CPU and show the accuracy gained.
    Demo(train::DemoArgs),
    /// Run the coordinator: gRPC for clients and workers, /metrics, a durable store.
    Coordinator(service::CoordinatorArgs),
    /// Run a worker that serves a coordinator's forward passes on one device (or a model split over several).
    Worker(service::WorkerArgs),
    /// Client commands for a coordinator's runs.
    #[command(subcommand)]
    Run(service::RunCommand),
    /// Chart a run's training loss and dev accuracy (SVG) from its stored step log.
    Report(report::ReportArgs),
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory as in the HF hub cache (config.json, weights, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub task: TaskArgs,
    /// JSONL file of examples (the task's fields, as the HF datasets name them).
    #[arg(long)]
    pub data: PathBuf,
    /// Score only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// cpu, cuda, cuda:N, or a list (`cuda:0,cuda:1`, also as `--devices`) that splits the
    /// model's layers over those devices (a model larger than one GPU).
    #[arg(long, visible_alias = "devices", default_value = "cpu")]
    pub device: String,
    /// fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Examples per forward pass (each carries one row per candidate; generation decodes this
    /// many prompts together).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), LoRA or
    /// prefix-tuning, to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval(args) => eval(args),
        Command::Bench(args) => bench::bench(args),
        Command::Train(args) if args.workers > 0 => local::train_with_workers(args),
        Command::Train(args) => train::run_train(args.train),
        Command::Demo(args) => train::run_demo(args),
        Command::Coordinator(args) => service::coordinator(args),
        Command::Worker(args) => service::worker(args),
        Command::Run(cmd) => service::run(cmd),
        Command::Report(args) => report::report(args),
    }
}

fn eval(args: EvalArgs) -> Result<()> {
    let task = args.task.task()?;
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if !(1..=1024).contains(&args.task.max_new_tokens) {
        anyhow::bail!("--max-new-tokens must be between 1 and 1024, got {}", args.task.max_new_tokens);
    }
    let devices = parse_devices(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
    let mut examples = task.load(&args.data)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    let start = Instant::now();
    let tokenizer = TextTokenizer::from_dir(&args.model)?;
    let model = Model::load_on(&args.model, &devices, kind)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    tokenizer.check_fits(model.config().vocab_size())?;
    let adapter = match &args.adapter {
        Some(dir) => Some(
            load_adapter(dir, &model, kind)
                .with_context(|| format!("loading adapter from {}", dir.display()))?,
        ),
        None => None,
    };
    let report = evaluate(
        &model,
        &tokenizer,
        &task,
        &examples,
        args.batch_size,
        adapter.as_ref(),
        args.task.max_new_tokens,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&args, &report, start.elapsed().as_secs_f64());
    }
    Ok(())
}

/// A PEFT adapter directory, LoRA or prefix-tuning (by its `peft_type`), ready to apply.
fn load_adapter(dir: &std::path::Path, model: &Model, kind: tch::Kind) -> Result<mezo_model::Tuning> {
    let config = model.config();
    Ok(if mezo_model::prefix::peft_type(dir)? == "PREFIX_TUNING" {
        let mezo_model::ModelConfig::Opt(c) = &config else {
            anyhow::bail!(
                "{} is a prefix-tuning adapter; prefix-tuning supports OPT models, this one is {}",
                dir.display(),
                config.model_type()
            );
        };
        let a = mezo_model::PrefixAdapter::load(dir, c)?;
        let flat = a.flat.to_device(model.device()).unsqueeze(0);
        mezo_model::Tuning::Prefix(mezo_model::PrefixBatch::from_flat(&flat, &a.config, c, kind)?)
    } else {
        let a = mezo_model::Adapter::load(dir, &config)?;
        let flat = a.flat.to_device(model.device()).unsqueeze(0);
        mezo_model::Tuning::Lora(mezo_model::LoraBatch::from_flat(
            &flat,
            &a.config,
            &a.config.tensors(&config)?,
            kind,
        )?)
    })
}

fn print_summary(args: &EvalArgs, report: &EvalReport, seconds: f64) {
    let what = match (report.accuracy, report.f1, report.exact_match) {
        (Some(a), _, _) => {
            let correct = report.per_example.iter().filter(|e| e.correct).count();
            format!("accuracy {:.2}% ({correct}/{})", 100.0 * a, report.examples)
        }
        (None, Some(f1), Some(em)) => format!("F1 {:.2}%, exact match {:.2}%", 100.0 * f1, 100.0 * em),
        _ => unreachable!("a report carries accuracy or F1 and exact match"),
    };
    println!(
        "{} on {} ({} examples, task {}, template {}, {} {}): {what} in {:.1}s",
        args.model.display(),
        args.data.display(),
        report.examples,
        args.task.task,
        args.task.template,
        args.device,
        args.dtype,
        seconds
    );
}
