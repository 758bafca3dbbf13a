//! `mezo train --workers N`: the service in one process. A coordinator (the `serve` of
//! `mezo coordinator`) and N workers (the `run` of `mezo worker`) talk gRPC over loopback, and
//! this process is also the client that starts the run, follows it, and writes what `mezo train`
//! writes. Nothing here is a shortcut around the fleet's code paths: a run trained this way gives
//! the same adapter, bit for bit, as the same spec on a coordinator and worker processes.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mezo_proto::connect::Target;
use mezo_proto::v1 as pb;
use mezo_train::spec::{spec_from_config, Split};
use serde_json::json;

use crate::train::TrainCmd;

const RUN_ID: &str = "train";

pub fn train_with_workers(a: TrainCmd) -> Result<()> {
    let out = a
        .train
        .out
        .clone()
        .context("--out DIR is required: where the adapter, the step log and the report go")?;
    let cfg = a.train.config()?;
    cfg.validate()?;
    mezo_model::parse_devices(&cfg.device)?;
    let split = match a.split.as_str() {
        "direction" => Split::Direction,
        "data" => Split::Data,
        s => bail!("unknown --split `{s}`: expected direction or data"),
    };
    if cfg.optimizer == mezo_train::OptimizerSpec::Adam {
        bail!("--optimizer adam (first-order) runs in one process only: drop --workers");
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating --out {}", out.display()))?;
    // The coordinator's store (the run's step log and snapshots) lives in --out; each `mezo train`
    // is a fresh run, so an earlier one's store is replaced.
    let store = out.join("store");
    if store.exists() {
        std::fs::remove_dir_all(&store)
            .with_context(|| format!("removing the old store {}", store.display()))?;
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")?;
        let url = format!("http://{}", listener.local_addr()?);
        let (security, client_token, worker_token) =
            mezo_coordinator::auth::Security::ephemeral().context("making this run's tokens")?;
        let client = Target { token: Some(client_token), ..Target::new(&url) };
        let worker = Target { token: Some(worker_token), ..Target::new(&url) };
        let opts = mezo_coordinator::server::Options {
            data_dir: store.clone(),
            lease: Duration::from_secs(30),
            snapshot_every: 50,
            strict_durability: false,
            path_roots: Vec::new(),
        };
        let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut stop_rx = stop.subscribe();
        let server = tokio::spawn(mezo_coordinator::server::serve_secured(
            opts,
            security,
            listener,
            None,
            async move {
                let _ = stop_rx.recv().await;
            },
        ));
        // N engines on N threads of this process: no CUDA graphs (see the function's docs).
        if a.workers > 1 {
            mezo_train::graphs::disable_in_this_process();
        }
        let mut workers = Vec::new();
        for _ in 0..a.workers {
            let mut rx = stop.subscribe();
            let o = mezo_worker::Options { coordinator: worker.clone(), device: cfg.device.clone() };
            workers.push(tokio::spawn(mezo_worker::run(o, async move {
                let _ = rx.recv().await;
            })));
        }
        let result = drive(&client, &worker, &cfg, split, &out, a.train.json, a.workers, started).await;
        let _ = stop.send(());
        for w in workers {
            let _ = w.await;
        }
        let _ = server.await;
        result
    })
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    client: &Target,
    worker: &Target,
    cfg: &mezo_train::TrainConfig,
    split: Split,
    out: &std::path::Path,
    json_out: bool,
    n_workers: usize,
    started: Instant,
) -> Result<()> {
    let mut client = loop {
        match client.mezo().await {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => bail!("the in-process coordinator did not answer: {e}"),
        }
    };
    let spec = spec_from_config(cfg, split, 0);
    client
        .start_run(pb::StartRunRequest { spec: Some(spec), run_id: RUN_ID.into() })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?;
    let bar = if json_out { ProgressBar::hidden() } else { ProgressBar::new(cfg.steps) };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec} {msg}",
        )
        .expect("valid template"),
    );
    let mut stream = client
        .stream_metrics(pb::StreamMetricsRequest { run_id: RUN_ID.into(), from_step: 0 })
        .await
        .map_err(|s| anyhow!("{}", s.message()))?
        .into_inner();
    let log_path = out.join("train_log.jsonl");
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?,
    );
    let t_train = Instant::now();
    let (mut losses, mut skipped, mut best) = (Vec::new(), 0u64, None::<(f64, u64)>);
    let mut ema: Option<f64> = None;
    let mut last_dev = None;
    let done = loop {
        let m = stream.message().await?.ok_or_else(|| anyhow!("the coordinator closed the metric stream"))?;
        if m.done {
            break m;
        }
        if m.skipped {
            skipped += 1;
        } else {
            losses.push(m.loss);
            ema = Some(ema.map_or(m.loss, |e| 0.95 * e + 0.05 * m.loss));
        }
        if let Some(d) = m.dev_accuracy {
            last_dev = Some(d);
            if best.is_none_or(|(b, _)| d > b) {
                best = Some((d, m.step + 1));
            }
        }
        serde_json::to_writer(
            &mut log,
            &json!({"step": m.step, "loss": m.loss, "projected_grad": m.projected_grad, "lr": m.lr,
                    "skipped": m.skipped, "dev_accuracy": m.dev_accuracy,
                    "seconds": t_train.elapsed().as_secs_f64()}),
        )?;
        log.write_all(b"\n")?;
        bar.set_position(m.step + 1);
        let dev = last_dev.map_or("-".into(), |d| format!("{:.1}%", 100.0 * d));
        bar.set_message(format!("loss {:.4} dev {dev}", ema.unwrap_or(f64::NAN)));
    };
    log.flush()?;
    bar.finish_and_clear();
    let train_seconds = t_train.elapsed().as_secs_f64();
    if done.status != pb::RunStatus::Completed as i32 {
        bail!(
            "the run did not complete: {}",
            if done.message.is_empty() { "stopped" } else { &done.message }
        );
    }
    // What the run produced: the adapter from the coordinator, or (full-parameter: the
    // coordinator holds only the log) the base model with the logged updates replayed.
    let output = if !matches!(cfg.mode, mezo_train::ModeSpec::Full { .. }) {
        let r = client
            .export_adapter(pb::ExportAdapterRequest { run_id: RUN_ID.into() })
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner();
        let dir = out.join("adapter");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("adapter_config.json"), &r.adapter_config_json)?;
        std::fs::write(dir.join("adapter_model.safetensors"), &r.adapter_model_safetensors)?;
        dir
    } else {
        // The step log is the workers' API: this process reads it as one of its workers.
        let mut w = worker.worker().await?.max_decoding_message_size(256 << 20);
        let log = w
            .fetch_log(pb::FetchLogRequest { run_id: RUN_ID.into(), from_step: 0 })
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner();
        let c = cfg.clone();
        let dir = out.join("model");
        tokio::task::spawn_blocking(move || -> Result<std::path::PathBuf> {
            let mut s = mezo_train::Session::new(c)?;
            for u in log.updates.iter().filter(|u| !u.skipped) {
                s.apply_logged(&u.seeds, &u.grads, u.lr)?;
            }
            Ok(s.save_model(&dir)?)
        })
        .await??
    };
    let tail = losses.len().saturating_sub(losses.len().div_ceil(10).clamp(1, 50));
    let final_train_loss = if losses.is_empty() {
        f64::NAN
    } else {
        losses[tail..].iter().sum::<f64>() / (losses.len() - tail) as f64
    };
    let metric = cfg.task()?.metric().name();
    let report = json!({
        "steps": cfg.steps,
        "metric": metric,
        "final_train_loss": final_train_loss,
        "best_dev_accuracy": best.map(|b| b.0),
        "best_step": best.map(|b| b.1),
        "test_accuracy": done.test_accuracy,
        "skipped_steps": skipped,
        "seconds": started.elapsed().as_secs_f64(),
        "train_seconds": train_seconds,
        "steps_per_s": cfg.steps as f64 / train_seconds,
        "workers": n_workers,
        "split": match split { Split::Direction => "direction", Split::Data => "data" },
        "output": output,
    });
    let report_path = out.join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    if json_out {
        println!("{report}");
    } else {
        println!(
            "{} steps in {:.1}s ({:.2} steps/s, {} skipped) through {} workers; train loss {:.4}; \
             dev {metric} {}; test {metric} {}; saved {} (the final state)",
            cfg.steps,
            train_seconds,
            cfg.steps as f64 / train_seconds,
            skipped,
            n_workers,
            final_train_loss,
            best.map_or("-".into(), |(d, s)| format!("best {:.2}% (step {s})", 100.0 * d)),
            done.test_accuracy.map_or("-".into(), |t| format!("{:.2}%", 100.0 * t)),
            output.display()
        );
    }
    Ok(())
}
