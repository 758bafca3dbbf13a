//! `mezo bench`: timings on random weights of published OPT and Llama-family shapes. With `--peer`, the same
//! measurement through HF transformers runs in the same process tree, and the ratio is printed:
//! only ratios measured in one call are comparable (the same GPU moves 2x between calls).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mezo_model::{device_name, parse_devices, parse_dtype, Model, ModelConfig, Padding};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// The shapes `--shape` takes, for messages.
const SHAPES: &str = "125m, 350m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b, llama2-7b, llama2-13b, llama3-8b, llama3.2-1b, qwen2.5-0.5b, qwen2.5-7b or mistral-7b";

const HF_FORWARD: &str = include_str!("../bench/hf_forward.py");

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// What to time: forward (one full forward pass with logits at every position), train
    /// (MeZO steps: loss on the last 2 tokens of each row, as ../shared/bench/baseline_mezo_hf.py),
    /// or coordinator (the service's overhead with 1, 4 and 16 instant in-process workers).
    #[arg(default_value = "forward")]
    pub what: String,
    /// train: lora (r=8, alpha=16 on q_proj,v_proj), prefix (5 tokens a layer) or full.
    #[arg(long, default_value = "lora")]
    pub mode: String,
    /// train: directions per step.
    #[arg(long, default_value_t = 1)]
    pub directions: usize,
    /// Model shape: OPT's 125m, 350m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b, or llama2-7b, llama2-13b,
    /// llama3-8b, llama3.2-1b, qwen2.5-0.5b, qwen2.5-7b, mistral-7b.
    #[arg(long, default_value = "125m")]
    pub shape: String,
    #[arg(long, default_value_t = 32)]
    pub batch: i64,
    #[arg(long, default_value_t = 64)]
    pub seq: i64,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// cpu, cuda, cuda:N, or a list (`cuda:0,cuda:1`, also as `--devices`) to split the model's
    /// layers over those devices in contiguous blocks (a model larger than one GPU).
    #[arg(long, visible_alias = "devices", default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// train: score classification candidates instead of the peer's answer tokens: each example
    /// is a prompt of seq-1 tokens and this many one-token candidates, cross-entropy over them
    /// (SST-2's shape with 2). The candidates share their prompt's input row, so this times the
    /// same forward rows as the default, and a line with it shows what scoring them costs.
    #[arg(long, default_value_t = 0)]
    pub candidates: usize,
    /// train: the first N tokens of every row are one prompt the whole batch shares (an
    /// instruction or demonstrations in a custom template). mezo reads a shared prompt once per
    /// pass, as a tree row's trunk; `MEZO_SHARED_PROMPT=0` reads it in every row (for comparison).
    #[arg(long, default_value_t = 0)]
    pub shared_prompt: usize,
    /// train: every forward eager, no CUDA graphs (for comparison; the same as
    /// MEZO_CUDA_GRAPHS=0).
    #[arg(long)]
    pub eager: bool,
    /// train: also time the step's forwards and its update separately.
    #[arg(long)]
    pub phases: bool,
    /// train, --mode full: apply each step's update in its own sweep instead of folding it into
    /// the next step's first perturbation (three sweeps over the weights a step, not two; for
    /// comparison, the same bits).
    #[arg(long)]
    pub undeferred: bool,
    /// Also run the peer on the same device and print the ratio. forward: `--peer` alone runs
    /// the built-in HF transformers forward; train: `--peer PATH` runs that MeZO script
    /// (../shared/bench/baseline_mezo_hf.py's interface: --model --batch --seq --steps --modes
    /// --dtypes, one JSON line per configuration with steps_per_s and peak_gib).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub peer: Option<String>,
    #[arg(long, default_value = "python3")]
    pub peer_python: String,
    /// scaling: the worker counts to run (simulated workers on this machine).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub workers: Vec<usize>,
    /// scaling: what one direction's two forwards over the whole batch take on one GPU (ms); a
    /// simulated worker sleeps that long per direction, times its share of the batch.
    #[arg(long, default_value_t = 12.0)]
    pub task_ms: f64,
    /// scaling: what applying one direction's update to a replica takes (ms); every worker
    /// applies every direction's update once a step (full-parameter: a sweep over the weights).
    #[arg(long, default_value_t = 0.0)]
    pub update_ms: f64,
    /// scaling: directions per step.
    #[arg(long, default_value_t = 8)]
    pub step_directions: usize,
    /// scaling: direction (a task is one direction over the batch) or data (a task is every
    /// direction over one of N shards of the batch, N = the workers).
    #[arg(long, default_value = "direction")]
    pub split: String,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.what == "coordinator" {
        for strict in [false, true] {
            for k in [1, 4, 16] {
                let s =
                    Fleet { workers: k, directions: k, task_ms: 0.0, update_ms: 0.0, data: false, strict };
                println!("{}", s.run(args.iters.max(100) as u64)?);
            }
        }
        return Ok(());
    }
    if args.what == "scaling" {
        let data = match args.split.as_str() {
            "direction" => false,
            "data" => true,
            s => bail!("unknown --split `{s}`: expected direction or data"),
        };
        if args.workers.is_empty() || args.workers.contains(&0) || args.step_directions == 0 {
            bail!("--workers needs positive counts and --step-directions at least 1");
        }
        let mut base = None;
        for &k in &args.workers {
            let s = Fleet {
                workers: k,
                directions: args.step_directions,
                task_ms: args.task_ms,
                update_ms: args.update_ms,
                data,
                strict: false,
            };
            let mut v = s.run(args.iters as u64)?;
            let sps = v["steps_per_s"].as_f64().unwrap_or(0.0);
            let b = *base.get_or_insert(sps);
            v["speedup"] = json!((sps / b * 100.0).round() / 100.0);
            println!("{v}");
        }
        return Ok(());
    }
    if args.what != "forward" && args.what != "train" {
        bail!("unknown benchmark `{}`: expected forward, train, coordinator or scaling", args.what);
    }
    let config = ModelConfig::shape(&args.shape)
        .with_context(|| format!("unknown --shape `{}`: expected {SHAPES}", args.shape))?;
    let max_seq = config.max_position_embeddings();
    if args.batch < 1 || args.seq < 1 || args.seq > max_seq || args.iters < 1 {
        bail!("--batch, --seq (at most {max_seq}) and --iters must be positive");
    }
    if args.peer.is_some() && !matches!(config, ModelConfig::Opt(_)) {
        bail!(
            "--peer runs OPT shapes only (the peer scripts build OPTForCausalLM); --shape {} is {}",
            args.shape,
            config.model_type()
        );
    }
    let devices = parse_devices(&args.device)?;
    if devices.len() > 1 && args.peer.is_some() {
        bail!("--peer runs on one device; drop it or give one --device (got {})", args.device);
    }
    let kind = parse_dtype(&args.dtype)?;
    if args.what == "train" {
        let ours = train_steps(&args, config, &devices, kind)?;
        println!("{ours}");
        if let Some(path) = &args.peer {
            if path.is_empty() {
                bail!("--peer with train needs the peer script's path, e.g. --peer ../shared/bench/baseline_mezo_hf.py");
            }
            let peer = run_train_peer(&args, path)?;
            println!("{peer}");
            let ratio = ours["steps_per_s"].as_f64().unwrap_or(0.0)
                / peer["steps_per_s"].as_f64().context("the peer printed no steps_per_s")?;
            println!(
                "{}",
                json!({"bench": "train", "shape": args.shape, "mode": args.mode, "dtype": args.dtype,
                       "ratio_steps_per_s": (ratio * 100.0).round() / 100.0,
                       "device_bytes": ours["device_bytes"],
                       "peer_peak_bytes": peer["peak_gib"].as_f64().map(|g| (g * (1u64 << 30) as f64) as u64)})
            );
        }
        return Ok(());
    }
    let ours = forward(&args, config, &devices, kind)?;
    println!("{ours}");
    if args.peer.is_some() {
        let peer = run_peer(&args)?;
        println!("{peer}");
        let ratio = ours["tokens_per_s"].as_f64().unwrap_or(0.0)
            / peer["tokens_per_s"].as_f64().context("peer printed no tokens_per_s")?;
        println!("{}", json!({"bench": "forward", "ratio_tokens_per_s": (ratio * 1000.0).round() / 1000.0}));
    }
    Ok(())
}

fn sync(devices: &[Device]) {
    for d in devices {
        if let Device::Cuda(i) = d {
            tch::Cuda::synchronize(*i as i64);
        }
    }
}

/// Bytes in use on each CUDA device of `devices` (every process's, as the driver counts them, in
/// that device's own context); `None` on the CPU.
fn memory_in_use(devices: &[Device]) -> Result<Option<Vec<u64>>> {
    if !devices.iter().all(|d| d.is_cuda()) {
        return Ok(None);
    }
    let used = devices.iter().map(|&d| mezo_core::cuda::memory_in_use(d)).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(used))
}

/// The JSON fields of the model's devices: the list, the layer placement, and (CUDA) the bytes
/// this process took on each since `before`, and their sum.
fn device_fields(model: &Model, devices: &[Device], before: &Option<Vec<u64>>) -> Result<Value> {
    let names: Vec<String> = devices.iter().map(|&d| device_name(d)).collect();
    let mut v = json!({ "devices": names, "placement": model.placement().to_string() });
    if let Some(b) = before {
        let after = memory_in_use(devices)?.context("CUDA memory readable before, not after")?;
        let used: Vec<u64> = after.iter().zip(b).map(|(a, b)| a.saturating_sub(*b)).collect();
        let per: serde_json::Map<String, Value> =
            names.iter().cloned().zip(used.iter().map(|&u| json!(u))).collect();
        v["device_bytes"] = json!(used.iter().sum::<u64>());
        v["per_device_bytes"] = Value::Object(per);
    } else {
        v["device_bytes"] = Value::Null;
    }
    Ok(v)
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

fn forward(args: &BenchArgs, config: ModelConfig, devices: &[Device], kind: Kind) -> Result<Value> {
    let _guard = tch::no_grad_guard();
    let vocab = config.vocab_size();
    let before = memory_in_use(devices)?;
    let model = Model::random_on(config, devices, kind, 0)?;
    let device = model.device();
    let ids = Tensor::randint_low(4, vocab, [args.batch, args.seq], (Kind::Int64, device));
    let mask = Tensor::ones([args.batch, args.seq], (Kind::Int64, device));
    let step =
        || -> Result<Tensor> { Ok(model.logits(&model.hidden_states(&ids, &mask, Padding::Right, None)?)) };
    for _ in 0..args.warmup {
        let _ = step()?;
    }
    sync(devices);
    let start = Instant::now();
    for _ in 0..args.iters {
        let _ = step()?;
    }
    sync(devices);
    let dt = start.elapsed().as_secs_f64() / args.iters as f64;
    let mut v = json!({
        "bench": "forward", "impl": "mezo", "shape": args.shape, "dtype": args.dtype,
        "device": args.device, "batch": args.batch, "seq": args.seq,
        "ms": (dt * 1e7).round() / 1e4,
        "tokens_per_s": ((args.batch * args.seq) as f64 / dt * 10.0).round() / 10.0,
    });
    if devices.len() > 1 {
        merge(&mut v, device_fields(&model, devices, &before)?);
    }
    Ok(v)
}

/// MeZO steps on random token rows: rows of `seq` tokens whose last 2 are the answer (the peer's
/// labels), answer-only cross-entropy, one direction seed per step.
fn train_steps(args: &BenchArgs, config: ModelConfig, devices: &[Device], kind: Kind) -> Result<Value> {
    use mezo_data::ScoringRow;
    use mezo_train::engine::{FullState, LoraState, LossKind, Prepared, StepSettings, Trainable};
    let vocab = config.vocab_size();
    let before = memory_in_use(devices)?;
    let model = Model::random_on(config, devices, kind, 0)?;
    let device = model.device();
    let mut rng = mezo_core::HostRng::new(1);
    let mut token = || 4 + rng.below((vocab - 4) as u64) as i64;
    let seq = args.seq as usize;
    if args.candidates == 1 || (args.candidates > 0 && seq < 2) {
        bail!("--candidates takes 0 (the peer's loss) or at least 2, with --seq of at least 2");
    }
    let own = if args.candidates == 0 { 2 } else { 1 };
    if args.shared_prompt + own > seq {
        bail!("--shared-prompt {} leaves no room for the answer in --seq {seq}", args.shared_prompt);
    }
    let shared: Vec<i64> = (0..args.shared_prompt).map(|_| token()).collect();
    let rows: Vec<Vec<ScoringRow>> = (0..args.batch)
        .map(|_| match args.candidates {
            0 => {
                let tokens = shared.iter().copied().chain((shared.len()..seq).map(|_| token())).collect();
                vec![ScoringRow { tokens, answer_start: seq - 2 }]
            }
            n => {
                let prompt: Vec<i64> =
                    shared.iter().copied().chain((shared.len()..seq - 1).map(|_| token())).collect();
                (0..n)
                    .map(|c| ScoringRow {
                        tokens: [prompt.as_slice(), &[4 + c as i64]].concat(),
                        answer_start: seq - 1,
                    })
                    .collect()
            }
        })
        .collect();
    let refs: Vec<&[ScoringRow]> = rows.iter().map(|r| r.as_slice()).collect();
    let labels = vec![0usize; rows.len()];
    let loss = if args.candidates == 0 { LossKind::AnswerCe } else { LossKind::Classification };
    let micro = [Prepared::new(&refs, &labels, loss, &model)?];
    let trainable = match args.mode.as_str() {
        "lora" => {
            let cfg = mezo_model::LoraConfig {
                r: 8,
                alpha: 16.0,
                targets: vec![mezo_model::Target::Q, mezo_model::Target::V],
            };
            Trainable::Lora(LoraState::init(cfg, &model.config(), model.device(), 0)?)
        }
        "full" => Trainable::Full(FullState::new(&model, &[])?),
        "prefix" => {
            let mezo_model::Model::Opt(opt) = &model else {
                bail!("--mode prefix supports OPT shapes; use --mode lora or full for {}", args.shape)
            };
            Trainable::Prefix(mezo_train::engine::PrefixState::init(
                mezo_model::PrefixConfig { num_prefix: 5 },
                opt,
                0,
            )?)
        }
        m => bail!("unknown --mode `{m}`: expected lora, prefix or full"),
    };
    let eps = match args.mode.as_str() {
        "lora" => 1e-2,
        "prefix" => 1e-1,
        _ => 1e-3,
    };
    let settings = StepSettings {
        eps,
        dist: mezo_core::Distribution::Gaussian,
        rule: mezo_train::optim::Rule::Sgd,
        weight_decay: 0.0,
    };
    let mut engine = mezo_train::Engine::new(trainable, settings, device);
    // A full-parameter step's update goes into the next step's first sweep, as in `mezo train`;
    // the last one is flushed inside the timed loop, so the steps timed are complete.
    engine.set_deferred_update(!args.undeferred);
    if args.eager {
        engine.set_cuda_graphs(false);
    }
    // A split model runs its forwards eagerly (the flat-state update may still replay a graph).
    let graphs = engine.cuda_graphs() && !model.placement().is_split();
    let mut step = |t: u64| -> Result<()> {
        let seeds: Vec<u64> =
            (0..args.directions as u32).map(|i| mezo_core::direction_seed(0, t, i)).collect();
        let (_, grads) = engine.step(&model, &micro, &seeds, 1e-6)?;
        grads.context("non-finite loss in the benchmark")?;
        Ok(())
    };
    for t in 0..args.warmup as u64 {
        step(t)?;
    }
    sync(devices);
    let start = Instant::now();
    for t in 0..args.iters as u64 {
        step(args.warmup as u64 + t)?;
    }
    engine.flush(&model)?;
    sync(devices);
    let dt = start.elapsed().as_secs_f64() / args.iters as f64;
    // Where a step's time goes: its forwards alone (each ends reading the losses back), then
    // its update alone (synchronised once at the end).
    let phases = if args.phases {
        let seeds: Vec<u64> =
            (0..args.directions as u32).map(|i| mezo_core::direction_seed(0, 1, i)).collect();
        let t0 = Instant::now();
        for _ in 0..args.iters {
            engine.direction_losses(&model, &micro, &seeds)?;
        }
        let losses_ms = t0.elapsed().as_secs_f64() * 1e3 / args.iters as f64;
        let grads = vec![0.0; seeds.len()];
        let t1 = Instant::now();
        for _ in 0..args.iters {
            engine.apply_update(Some(&model), &seeds, &grads, 0.0)?;
        }
        sync(devices);
        let update_ms = t1.elapsed().as_secs_f64() * 1e3 / args.iters as f64;
        json!({"losses_ms": (losses_ms * 1e3).round() / 1e3, "update_ms": (update_ms * 1e3).round() / 1e3})
    } else {
        Value::Null
    };
    let mut v = json!({
        "bench": "train", "impl": "mezo", "shape": args.shape, "mode": args.mode, "dtype": args.dtype,
        "device": args.device, "cuda_graphs": graphs, "deferred_update": !args.undeferred, "phases": phases, "batch": args.batch, "seq": args.seq, "directions": args.directions,
        "candidates": args.candidates, "shared_prompt": args.shared_prompt, "input_tokens": micro[0].tokens,
        "ms_per_step": (dt * 1e6).round() / 1e3, "steps_per_s": (1.0 / dt * 100.0).round() / 100.0,
        "tokens_per_s": ((2 * args.batch * args.seq * args.directions as i64) as f64 / dt).round(),
    });
    // What this process took on each device (weights, trained state, the caching allocator's
    // reserve for activations): an upper bound on its peak allocation there.
    merge(&mut v, device_fields(&model, devices, &before)?);
    Ok(v)
}

/// Runs the MeZO peer script for the same configuration; its JSON line for it.
fn run_train_peer(args: &BenchArgs, path: &str) -> Result<Value> {
    if !std::path::Path::new(path).is_file() {
        bail!("--peer {path}: no such file");
    }
    let out = std::process::Command::new(&args.peer_python)
        .arg(path)
        .args(["--model", &args.shape, "--batch", &args.batch.to_string(), "--seq", &args.seq.to_string()])
        .args(["--steps", &args.iters.to_string(), "--modes", &args.mode, "--dtypes", &args.dtype])
        .output()
        .with_context(|| format!("running the peer {path} with {}", args.peer_python))?;
    if !out.status.success() {
        bail!("the peer {path} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("steps_per_s").is_some())
        .with_context(|| format!("the peer printed no result line:\n{stdout}"))
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

/// A simulated fleet: the real coordinator (gRPC, store, group commit) with `workers` in-process
/// workers that answer each task after sleeping for its simulated forwards (none for
/// `mezo bench coordinator`, which then times the coordinator's own overhead; `task_ms` per
/// direction over the whole batch for `mezo bench scaling`). Full-parameter spec: the
/// coordinator holds no tensors.
struct Fleet {
    workers: usize,
    directions: usize,
    task_ms: f64,
    update_ms: f64,
    data: bool,
    strict: bool,
}

const SIM_BATCH: usize = 16;

impl Fleet {
    fn run(&self, steps: u64) -> Result<Value> {
        use mezo_proto::v1 as pb;
        let assets = crate::train::assets_dir()?;
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let k = self.workers;
        rt.block_on(async move {
            let dir = std::env::temp_dir().join(format!("mezo-bench-coord-{}-{k}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = format!("http://{}", listener.local_addr()?);
            let opts = mezo_coordinator::server::Options {
                data_dir: dir.clone(),
                lease: std::time::Duration::from_secs(10),
                snapshot_every: 0,
                strict_durability: self.strict,
                path_roots: Vec::new(),
            };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(mezo_coordinator::server::serve(opts, listener, None, async move {
                let _ = stop_rx.await;
            }));
            let mut fakes = Vec::new();
            for _ in 0..k {
                let addr = addr.clone();
                let (ms, ums) = (self.task_ms, self.update_ms);
                fakes.push(tokio::spawn(async move { instant_worker(&addr, ms, ums).await }));
            }
            let mut client = loop {
                match pb::mezo_service_client::MezoServiceClient::connect(addr.clone()).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            };
            let spec = pb::RunSpec {
                model: assets.join("opt-mini").to_string_lossy().into(),
                data_dir: assets.join("sst2").to_string_lossy().into(),
                mode: Some(pb::run_spec::Mode::Full(pb::FullSpec { patterns: vec![] })),
                steps,
                directions: self.directions as u32,
                batch_size: SIM_BATCH as u32,
                // Data-parallel: one shard of the batch per worker.
                grad_accum: if self.data { k as u32 } else { 1 },
                split: if self.data { pb::WorkSplit::Data } else { pb::WorkSplit::Direction } as i32,
                n_train: 64,
                n_dev: 16,
                ..Default::default()
            };
            client.start_run(pb::StartRunRequest { spec: Some(spec), run_id: "bench".into() }).await?;
            let mut stream = client
                .stream_metrics(pb::StreamMetricsRequest { run_id: "bench".into(), from_step: 0 })
                .await?
                .into_inner();
            let mut first: Option<Instant> = None;
            let mut last = None;
            let mut n = 0u64;
            while let Some(m) = stream.message().await? {
                if m.done {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                last = Some(Instant::now());
                n += 1;
            }
            // From the first step to the last (the run's final test evaluation is not a step).
            let dt = match (first, last) {
                (Some(f), Some(l)) => (l - f).as_secs_f64(),
                _ => 0.0,
            };
            // The first step's time is not in `dt`: count the steps after it.
            let steps_per_s = if dt > 0.0 { (n.saturating_sub(1)) as f64 / dt } else { 0.0 };
            let _ = stop_tx.send(());
            for f in fakes {
                f.abort();
            }
            let _ = server.await;
            let _ = std::fs::remove_dir_all(&dir);
            let mut v = json!({"bench": if self.task_ms > 0.0 { "scaling" } else { "coordinator" },
                   "durability": if self.strict { "strict" } else { "pipelined" },
                   "workers": k, "directions": self.directions, "steps": n,
                   "steps_per_s": (steps_per_s * 100.0).round() / 100.0});
            if self.task_ms > 0.0 {
                v["split"] = json!(if self.data { "data" } else { "direction" });
                v["task_ms"] = json!(self.task_ms);
                // What a perfect fleet would do: rounds of whole directions, or even shards
                // (at most one example each), and no overhead.
                let per_step_ms = self.update_ms * self.directions as f64
                    + if self.data {
                        self.task_ms * self.directions as f64 / k.min(SIM_BATCH) as f64
                    } else {
                        self.task_ms * self.directions.div_ceil(k) as f64
                    };
                v["update_ms"] = json!(self.update_ms);
                v["ideal_steps_per_s"] = json!((1000.0 / per_step_ms * 100.0).round() / 100.0);
            }
            Ok(v)
        })
    }
}

/// A worker that answers every training task with fixed losses, at once or after `task_ms` per
/// direction and batch (a simulated GPU).
async fn instant_worker(addr: &str, task_ms: f64, update_ms: f64) -> Result<()> {
    use mezo_proto::v1 as pb;
    let mut c = loop {
        match pb::worker_service_client::WorkerServiceClient::connect(addr.to_string()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let reg = c.register(pb::RegisterRequest::default()).await?.into_inner();
    let id = reg.worker_id;
    let mut hb = c.clone();
    let hb_id = id.clone();
    let period = std::time::Duration::from_millis(u64::from(reg.lease_ms / 3).max(50));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            if hb.heartbeat(pb::HeartbeatRequest { worker_id: hb_id.clone(), memory: None }).await.is_err() {
                return;
            }
        }
    });
    let mut tasks = c.tasks(pb::TasksRequest { worker_id: id.clone() }).await?.into_inner();
    // Results over one stream, as `mezo worker` sends them.
    let (results, rx) = tokio::sync::mpsc::channel(64);
    let mut rc = c.clone();
    let submitter =
        tokio::spawn(async move { rc.submit_results(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let mut version = 0;
    while let Some(t) = tasks.message().await? {
        let n = t.seeds.len();
        // A new version: the replica first applies the previous step's update, every direction.
        if update_ms > 0.0 && t.version > version {
            let dirs = t.previous.as_ref().map_or(0, |u| u.seeds.len());
            tokio::time::sleep(std::time::Duration::from_secs_f64(update_ms * 1e-3 * dirs as f64)).await;
            version = t.version;
        }
        let train = t.kind == pb::TaskKind::Train as i32 || t.kind == pb::TaskKind::Unspecified as i32;
        if task_ms > 0.0 && train {
            // Each direction's two forwards over this task's share of the batch.
            let share = t.examples.len() as f64 / SIM_BATCH as f64;
            tokio::time::sleep(std::time::Duration::from_secs_f64(task_ms * 1e-3 * n.max(1) as f64 * share))
                .await;
        }
        let r = pb::SubmitResultRequest {
            worker_id: id.clone(),
            task_id: t.task_id,
            run_id: t.run_id,
            step: t.step,
            loss_plus: vec![0.7; n],
            loss_minus: vec![0.69; n],
            weight: 1.0,
            ..Default::default()
        };
        if results.send(r).await.is_err() {
            break;
        }
    }
    submitter.abort();
    Ok(())
}
