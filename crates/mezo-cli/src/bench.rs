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
    /// What to time: forward (one full forward pass with logits at every position).
    #[arg(default_value = "forward")]
    pub what: String,
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
    if args.what != "forward" {
        bail!("unknown benchmark `{}`: expected forward", args.what);
    }
    let config = OptConfig::shape(&args.shape).with_context(|| {
        format!("unknown --shape `{}`: expected 125m, 350m, 1.3b, 2.7b, 6.7b, 13b, 30b or 66b", args.shape)
    })?;
    if args.batch < 1 || args.seq < 1 || args.seq > config.max_position_embeddings || args.iters < 1 {
        bail!("--batch, --seq (at most {}) and --iters must be positive", config.max_position_embeddings);
    }
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
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
    let step = || -> Result<Tensor> {
        Ok(model.logits(&model.hidden_states(&ids, &mask, Padding::Right, None)?))
    };
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
