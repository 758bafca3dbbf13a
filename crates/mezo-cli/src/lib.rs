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
use mezo_model::{parse_device, parse_dtype, Model, TextTokenizer};

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
    /// Run a worker that serves a coordinator's forward passes on one device.
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
    /// Task: sst2 (any JSONL with `sentence` and `label` fields).
    #[arg(long, default_value = "sst2")]
    pub task: String,
    /// JSONL file of examples.
    #[arg(long)]
    pub data: PathBuf,
    /// Score only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prompt template: mezo ("<s> It was" terrible/great) or classify.
    #[arg(long, default_value = "mezo")]
    pub template: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Examples per forward pass (each carries one row per candidate).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply.
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
    if args.task != "sst2" {
        anyhow::bail!("unknown --task `{}`: expected sst2", args.task);
    }
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let template = mezo_data::Template::parse(&args.template)?;
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
    let mut examples = mezo_data::load_jsonl(&args.data)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    let start = Instant::now();
    let tokenizer = TextTokenizer::from_dir(&args.model)?;
    let model = Model::load(&args.model, device, kind)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    let adapter = match &args.adapter {
        Some(dir) => {
            let a = mezo_model::Adapter::load(dir, &model.config())
                .with_context(|| format!("loading adapter from {}", dir.display()))?;
            let tensors = a.config.tensors(&model.config())?;
            let flat = a.flat.to_device(device).unsqueeze(0);
            Some(mezo_model::LoraBatch::from_flat(&flat, &a.config, &tensors, kind)?)
        }
        None => None,
    };
    let report = evaluate(&model, &tokenizer, &examples, template, args.batch_size, adapter.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&args, &report, start.elapsed().as_secs_f64());
    }
    Ok(())
}

fn print_summary(args: &EvalArgs, report: &EvalReport, seconds: f64) {
    let correct = report.per_example.iter().filter(|e| e.pred == e.label).count();
    println!(
        "{} on {} ({} examples, template {}, {} {}): accuracy {:.2}% ({}/{}) in {:.1}s",
        args.model.display(),
        args.data.display(),
        report.examples,
        args.template,
        args.device,
        args.dtype,
        100.0 * report.accuracy,
        correct,
        report.examples,
        seconds
    );
}
