//! `mezo coordinator`, `mezo worker` and the client commands `mezo run …`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget};
use mezo_coordinator::auth::{Security, SecurityFiles};
use mezo_proto::connect::{status_chain, transport_hint, AuthChannel, Target};
use mezo_proto::credentials::caller_token;
use mezo_proto::v1 as pb;
use mezo_proto::v1::mezo_service_client::MezoServiceClient;
use mezo_train::spec::{spec_from_config, Split};

use crate::train::TrainArgs;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// gRPC address to listen on (clients and workers).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Address for Prometheus' /metrics.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,
    /// Folder of the store (sled database and snapshots); runs resume from it after a restart.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// A worker that has not renewed its lease for this long loses it and its tasks.
    #[arg(long, default_value_t = 3000)]
    pub lease_ms: u64,
    /// Snapshot interval in steps when a run does not set one.
    #[arg(long, default_value_t = 50)]
    pub snapshot_every: u64,
    /// Flush each step to disk before dispatching the next one, instead of overlapping the flush
    /// with the next step's forwards. Either way no client hears of a step before it is durable.
    #[arg(long)]
    pub strict_durability: bool,
    /// Only accept runs whose model and data folders (and the files directly in them) resolve
    /// inside one of these folders; `..` and symlinks that lead out are refused. Repeatable.
    /// Without it a client may name any folder the coordinator can read.
    #[arg(long)]
    pub path_root: Vec<PathBuf>,
    /// File of the tokens clients (`mezo run`, `mezo report`, the Python client) may use, one a
    /// line (several allow rotation). Tokens come from files, never flags, so they stay out of
    /// `ps` and shell history. With --worker-token-file; without both (and --tls-client-ca), the
    /// coordinator admits every caller and says so at start-up.
    #[arg(long, value_name = "FILE")]
    pub client_token_file: Option<PathBuf>,
    /// File of the tokens workers may use, one a line. A worker token cannot start or read runs;
    /// a client token cannot register a worker.
    #[arg(long, value_name = "FILE")]
    pub worker_token_file: Option<PathBuf>,
    /// PEM certificate (chain) of this coordinator: serve gRPC over TLS (callers use https://).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) for mutual TLS: every WorkerService call must come over a connection
    /// whose client certificate this CA signed (clients need none). Use a CA that signs only
    /// workers' certificates.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// cpu, cuda, cuda:N, or a list (`cuda:0,cuda:1`, also as `--devices`) that splits the
    /// model's layers over those devices (a model larger than one GPU).
    #[arg(long, visible_alias = "devices", default_value = "cpu")]
    pub device: String,
    /// PEM certificate this worker presents (mutual TLS: a coordinator with --tls-client-ca).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum RunCommand {
    /// Start a run on the coordinator (takes `mezo train`'s flags); prints its id.
    Start(RunStartArgs),
    /// Follow a run's metrics until it ends.
    Watch(RunIdArgs),
    /// Show a run's status and progress (JSON).
    Get(RunIdArgs),
    /// List every run (JSON lines).
    List(ClientArgs),
    /// Stop a run after its current step.
    Stop(RunIdArgs),
    /// Write a run's current adapter (PEFT format) to a folder.
    Export(ExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The coordinator: http://HOST:PORT, or https://HOST:PORT when it serves TLS.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// File holding the token to send (a client token, or a worker's for `mezo worker`); else
    /// $MEZO_TOKEN. A file or the environment, never a flag, keeps it out of `ps` and shell
    /// history.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate of the CA that signed the coordinator's certificate (https:// only);
    /// without it, the system's trusted roots.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl ClientArgs {
    /// The coordinator and the credentials to present to it (files are read here, so a missing
    /// one is named before anything is sent).
    pub fn target(&self) -> Result<Target> {
        Ok(Target {
            url: self.coordinator.clone(),
            token: caller_token(self.token_file.as_deref())?,
            tls_ca: self.tls_ca.clone(),
            tls_identity: None,
        })
    }

    /// A connected `MezoService` client.
    pub async fn connect(&self) -> Result<MezoServiceClient<AuthChannel>> {
        Ok(self.target()?.mezo().await?)
    }

    /// A failed call as a user reads it: the coordinator's message; for a credentials problem
    /// also the status and what a client passes; for a failure below gRPC, its causes and the
    /// likely mistake.
    pub fn rpc_error(&self, s: tonic::Status) -> anyhow::Error {
        match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => anyhow!(
                "the coordinator refused the call ({:?}): {} (a client sends its token with --token-file \
                 FILE or $MEZO_TOKEN)",
                s.code(),
                s.message()
            ),
            _ if std::error::Error::source(&s).is_some() => anyhow!(
                "the call to the coordinator at {} failed: {}{}",
                self.coordinator,
                status_chain(&s),
                transport_hint(&self.coordinator, &s)
            ),
            _ => anyhow!("{}", s.message()),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunIdArgs {
    pub run_id: String,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print JSON lines instead of a progress bar (watch).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct RunStartArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// direction (each worker evaluates whole directions) or data (each evaluates a batch shard).
    #[arg(long, default_value = "direction")]
    pub split: String,
    /// Snapshot interval in steps (0: the coordinator's default).
    #[arg(long, default_value_t = 0)]
    pub snapshot_every: u64,
    #[arg(long, default_value = "")]
    pub run_id: String,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    pub run_id: String,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub out: PathBuf,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    // Before binding anything: a bad token or certificate file ends the command with its name.
    let security = Security::from_files(&SecurityFiles {
        client_token_file: a.client_token_file.clone(),
        worker_token_file: a.worker_token_file.clone(),
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        tls_client_ca: a.tls_client_ca.clone(),
    })?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("binding --listen {}", a.listen))?;
        let metrics = tokio::net::TcpListener::bind(&a.metrics_listen)
            .await
            .with_context(|| format!("binding --metrics-listen {}", a.metrics_listen))?;
        eprintln!(
            "coordinator: gRPC on {}, metrics on http://{}/metrics, store in {}",
            listener.local_addr()?,
            metrics.local_addr()?,
            a.data_dir.display()
        );
        let opts = mezo_coordinator::server::Options {
            data_dir: a.data_dir.clone(),
            lease: Duration::from_millis(a.lease_ms),
            snapshot_every: a.snapshot_every,
            strict_durability: a.strict_durability,
            path_roots: a.path_root.clone(),
        };
        eprintln!("coordinator: {}", security.describe());
        for w in security.warnings() {
            eprintln!("coordinator: {w}");
        }
        mezo_coordinator::server::serve_secured(opts, security, listener, Some(metrics), shutdown_signal())
            .await
    })
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    mezo_model::parse_devices(&a.device)?;
    let mut target = a.client.target()?;
    target.tls_identity = a.tls_cert.zip(a.tls_key);
    // Checks the URL and reads the PEM files now: a mistake there is not worth retrying.
    target.endpoint()?;
    runtime()?.block_on(mezo_worker::run(
        mezo_worker::Options { coordinator: target, device: a.device },
        shutdown_signal(),
    ))
}

fn status_name(s: i32) -> &'static str {
    match pb::RunStatus::try_from(s).unwrap_or(pb::RunStatus::Unspecified) {
        pb::RunStatus::Pending => "pending",
        pb::RunStatus::Running => "running",
        pb::RunStatus::Completed => "completed",
        pb::RunStatus::Failed => "failed",
        pb::RunStatus::Stopped => "stopped",
        pb::RunStatus::Unspecified => "unknown",
    }
}

fn describe(r: &pb::GetRunResponse) -> serde_json::Value {
    serde_json::json!({
        "run_id": r.run_id, "status": status_name(r.status), "steps_done": r.steps_done,
        "steps": r.spec.as_ref().map(|s| s.steps), "message": r.message,
    })
}

pub fn run(cmd: RunCommand) -> Result<()> {
    runtime()?.block_on(async move {
        match cmd {
            RunCommand::Start(a) => {
                let cfg = a.train.config()?;
                let split = match a.split.as_str() {
                    "direction" => Split::Direction,
                    "data" => Split::Data,
                    s => anyhow::bail!("unknown --split `{s}`: expected direction or data"),
                };
                let spec = spec_from_config(&cfg, split, a.snapshot_every);
                let r = a.client
                    .connect()
                    .await?
                    .start_run(pb::StartRunRequest { spec: Some(spec), run_id: a.run_id })
                    .await
                    .map_err(|s| a.client.rpc_error(s))?;
                println!("{}", r.into_inner().run_id);
            }
            RunCommand::Watch(a) => {
                let mut c = a.client.connect().await?;
                let run = c
                    .get_run(pb::GetRunRequest { run_id: a.run_id.clone() })
                    .await
                    .map_err(|s| a.client.rpc_error(s))?
                    .into_inner();
                let total = run.spec.map_or(0, |s| s.steps);
                let bar = if a.json { ProgressBar::hidden() } else { crate::progress::step_bar(total) };
                // The stream first replays the steps already done, all at once: they must not count
                // towards the rate (the ETA would read near zero), so the bar stays hidden and its
                // estimate restarts once the replay has caught up with the steps done when we asked.
                let mut replaying = run.steps_done > 0 && !a.json;
                if replaying {
                    bar.set_draw_target(ProgressDrawTarget::hidden());
                }
                // When the last message came: the replay ends at a step that arrives on its own.
                let mut last_message = std::time::Instant::now();
                let mut s = c
                    .stream_metrics(pb::StreamMetricsRequest { run_id: a.run_id.clone(), from_step: 0 })
                    .await
                    .map_err(|s| a.client.rpc_error(s))?
                    .into_inner();
                while let Some(m) = s.message().await.map_err(|s| a.client.rpc_error(s))? {
                    if a.json {
                        println!(
                            "{}",
                            serde_json::json!({"step": m.step, "loss": m.loss, "projected_grad": m.projected_grad,
                                "lr": m.lr, "skipped": m.skipped, "dev_accuracy": m.dev_accuracy, "done": m.done,
                                "status": status_name(m.status)})
                        );
                    } else if !m.done {
                        bar.set_position(m.step + 1);
                        let gap = last_message.elapsed();
                        last_message = std::time::Instant::now();
                        // The replay is over once the steps done when we asked have come and a
                        // step arrives after a pause. Steps published in one burst with the
                        // replay's tail (the committer makes several durable in one flush, and
                        // more can be published between our two calls) arrive microseconds
                        // apart: counted, they read as thousands of steps a second.
                        if replaying && m.step + 1 >= run.steps_done && gap >= std::time::Duration::from_millis(1) {
                            replaying = false;
                            // set_position defers the estimator's update to the next draw: make it
                            // take the jump now, then forget it.
                            bar.tick();
                            bar.reset_eta();
                            bar.set_draw_target(ProgressDrawTarget::stderr());
                        }
                        let dev = m.dev_accuracy.map_or(String::new(), |d| format!(" dev {:.1}%", 100.0 * d));
                        bar.set_message(format!("loss {:.4}{dev}", m.loss));
                    }
                    if m.done {
                        bar.finish_and_clear();
                        if !a.json {
                            println!("run {}: {}", a.run_id, status_name(m.status));
                        }
                        break;
                    }
                }
            }
            RunCommand::Get(a) => {
                let r = a.client
                    .connect()
                    .await?
                    .get_run(pb::GetRunRequest { run_id: a.run_id })
                    .await
                    .map_err(|s| a.client.rpc_error(s))?;
                println!("{}", describe(r.get_ref()));
            }
            RunCommand::List(a) => {
                let r = a.connect().await?.list_runs(pb::ListRunsRequest {}).await.map_err(|s| a.rpc_error(s))?;
                for run in &r.get_ref().runs {
                    println!("{}", describe(run));
                }
            }
            RunCommand::Stop(a) => {
                let r = a.client
                    .connect()
                    .await?
                    .stop_run(pb::StopRunRequest { run_id: a.run_id.clone() })
                    .await
                    .map_err(|s| a.client.rpc_error(s))?;
                match status_name(r.get_ref().status) {
                    ended @ ("completed" | "failed") => {
                        println!("run {}: already {ended}, nothing to stop", a.run_id)
                    }
                    "stopped" => println!("run {}: stopped", a.run_id),
                    was => println!("run {}: stopping (was {was})", a.run_id),
                }
            }
            RunCommand::Export(a) => {
                let r = a.client
                    .connect()
                    .await?
                    .export_adapter(pb::ExportAdapterRequest { run_id: a.run_id.clone() })
                    .await
                    .map_err(|s| a.client.rpc_error(s))?
                    .into_inner();
                std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
                std::fs::write(a.out.join("adapter_config.json"), &r.adapter_config_json)?;
                std::fs::write(a.out.join("adapter_model.safetensors"), &r.adapter_model_safetensors)?;
                println!("run {}: adapter at step {} written to {}", a.run_id, r.step, a.out.display());
            }
        }
        Ok(())
    })
}
