//! `mezo bench`: timings on random weights of the published OPT shapes. With `--peer`, the same
//! measurement through HF transformers runs in the same process tree, and the ratio is printed:
//! only ratios measured in one call are comparable (the same GPU moves 2x between calls).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mezo_model::{parse_device, parse_dtype, Opt, OptConfig, Padding};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const HF_FORWARD: &str = include_str!("../bench/hf_forward.py");

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// What to time: forward (one full forward pass with logits at every position) or train
    /// (MeZO steps: loss on the last 2 tokens of each row, as ../shared/bench/baseline_mezo_hf.py).
    #[arg(default_value = "forward")]
    pub what: String,
    /// train: lora (r=8, alpha=16 on q_proj,v_proj) or full.
    #[arg(long, default_value = "lora")]
    pub mode: String,
    /// train: directions per step.
    #[arg(long, default_value_t = 1)]
    pub directions: usize,
    /// OPT shape: 125m, 350m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b.
    #[arg(long, default_value = "125m")]
    pub shape: String,
    #[arg(long, default_value_t = 32)]
    pub batch: i64,
    #[arg(long, default_value_t = 64)]
    pub seq: i64,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Also run HF transformers (this Python must have torch and transformers) and print the ratio.
    #[arg(long)]
    pub peer: bool,
    #[arg(long, default_value = "python3")]
    pub peer_python: String,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.what != "forward" && args.what != "train" {
        bail!("unknown benchmark `{}`: expected forward or train", args.what);
    }
    let config = OptConfig::shape(&args.shape).with_context(|| {
        format!("unknown --shape `{}`: expected 125m, 350m, 1.3b, 2.7b, 6.7b, 13b, 30b or 66b", args.shape)
    })?;
    if args.batch < 1 || args.seq < 1 || args.seq > config.max_position_embeddings || args.iters < 1 {
        bail!("--batch, --seq (at most {}) and --iters must be positive", config.max_position_embeddings);
    }
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
    if args.what == "train" {
        println!("{}", train_steps(&args, config, device, kind)?);
        if args.peer {
            bail!("--peer with train: run ../shared/bench/baseline_mezo_hf.py in the same call instead");
        }
        return Ok(());
    }
    let ours = forward(&args, config, device, kind)?;
    println!("{ours}");
    if args.peer {
        let peer = run_peer(&args)?;
        println!("{peer}");
        let ratio = ours["tokens_per_s"].as_f64().unwrap_or(0.0)
            / peer["tokens_per_s"].as_f64().context("peer printed no tokens_per_s")?;
        println!("{}", json!({"bench": "forward", "ratio_tokens_per_s": (ratio * 1000.0).round() / 1000.0}));
    }
    Ok(())
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn forward(args: &BenchArgs, config: OptConfig, device: Device, kind: Kind) -> Result<Value> {
    let _guard = tch::no_grad_guard();
    let vocab = config.vocab_size;
    let model = Opt::random(config, device, kind, 0)?;
    let ids = Tensor::randint_low(4, vocab, [args.batch, args.seq], (Kind::Int64, device));
    let mask = Tensor::ones([args.batch, args.seq], (Kind::Int64, device));
    let step =
        || -> Result<Tensor> { Ok(model.logits(&model.hidden_states(&ids, &mask, Padding::Right, None)?)) };
    for _ in 0..args.warmup {
        let _ = step()?;
    }
    sync(device);
    let start = Instant::now();
    for _ in 0..args.iters {
        let _ = step()?;
    }
    sync(device);
    let dt = start.elapsed().as_secs_f64() / args.iters as f64;
    Ok(json!({
        "bench": "forward", "impl": "mezo", "shape": args.shape, "dtype": args.dtype,
        "device": args.device, "batch": args.batch, "seq": args.seq,
        "ms": (dt * 1e7).round() / 1e4,
        "tokens_per_s": ((args.batch * args.seq) as f64 / dt * 10.0).round() / 10.0,
    }))
}

/// MeZO steps on random token rows: rows of `seq` tokens whose last 2 are the answer (the peer's
/// labels), answer-only cross-entropy, one direction seed per step.
fn train_steps(args: &BenchArgs, config: OptConfig, device: Device, kind: Kind) -> Result<Value> {
    use mezo_data::ScoringRow;
    use mezo_train::engine::{
        projected_grads, FullState, LoraState, LossKind, Prepared, StepSettings, Trainable,
    };
    let vocab = config.vocab_size;
    let model = Opt::random(config, device, kind, 0)?;
    let mut rng = mezo_core::HostRng::new(1);
    let rows: Vec<Vec<ScoringRow>> = (0..args.batch)
        .map(|_| {
            let tokens = (0..args.seq).map(|_| 4 + rng.below((vocab - 4) as u64) as i64).collect();
            vec![ScoringRow { tokens, answer_start: args.seq as usize - 2 }]
        })
        .collect();
    let refs: Vec<&[ScoringRow]> = rows.iter().map(|r| r.as_slice()).collect();
    let labels = vec![0usize; rows.len()];
    let micro = [Prepared::new(&refs, &labels, LossKind::AnswerCe, &model)?];
    let trainable = match args.mode.as_str() {
        "lora" => {
            let cfg = mezo_model::LoraConfig {
                r: 8,
                alpha: 16.0,
                targets: vec![mezo_model::Target::Q, mezo_model::Target::V],
            };
            Trainable::Lora(LoraState::init(cfg, &model.config, model.device, 0)?)
        }
        "full" => Trainable::Full(FullState::new(&model, &[])?),
        m => bail!("unknown --mode `{m}`: expected lora or full"),
    };
    let eps = if args.mode == "lora" { 1e-2 } else { 1e-3 };
    let settings = StepSettings {
        eps,
        dist: mezo_core::Distribution::Gaussian,
        rule: mezo_train::optim::Rule::Sgd,
        weight_decay: 0.0,
    };
    let mut engine = mezo_train::Engine::new(trainable, settings, device);
    let mut step = |t: u64| -> Result<()> {
        let seeds: Vec<u64> =
            (0..args.directions as u32).map(|i| mezo_core::direction_seed(0, t, i)).collect();
        let losses = engine.direction_losses(&model, &micro, &seeds)?;
        let grads = projected_grads(&losses, eps).context("non-finite loss in the benchmark")?;
        engine.apply_update(Some(&model), &seeds, &grads, 1e-6)?;
        Ok(())
    };
    for t in 0..args.warmup as u64 {
        step(t)?;
    }
    sync(device);
    let start = Instant::now();
    for t in 0..args.iters as u64 {
        step(args.warmup as u64 + t)?;
    }
    sync(device);
    let dt = start.elapsed().as_secs_f64() / args.iters as f64;
    Ok(json!({
        "bench": "train", "impl": "mezo", "shape": args.shape, "mode": args.mode, "dtype": args.dtype,
        "device": args.device, "batch": args.batch, "seq": args.seq, "directions": args.directions,
        "ms_per_step": (dt * 1e6).round() / 1e3, "steps_per_s": (1.0 / dt * 100.0).round() / 100.0,
        "tokens_per_s": ((2 * args.batch * args.seq * args.directions as i64) as f64 / dt).round(),
    }))
}

fn run_peer(args: &BenchArgs) -> Result<Value> {
    let mut script = tempfile_path("mezo-hf-forward.py");
    std::fs::File::create(&script)?.write_all(HF_FORWARD.as_bytes())?;
    let out = std::process::Command::new(&args.peer_python)
        .arg(&script)
        .args(["--shape", &args.shape, "--dtype", &args.dtype, "--device", &args.device])
        .args(["--batch", &args.batch.to_string(), "--seq", &args.seq.to_string()])
        .args(["--iters", &args.iters.to_string(), "--warmup", &args.warmup.to_string()])
        .output()
        .with_context(|| format!("running the peer with {}", args.peer_python))?;
    let _ = std::fs::remove_file(&mut script);
    if !out.status.success() {
        bail!("peer benchmark failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("peer printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("peer printed `{line}`"))
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", std::process::id()))
}
