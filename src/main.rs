//! `ringtrain`: the command-line entry point of the cluster (and the container image's
//! entrypoint for both roles). Parses arguments, installs tracing, calls a library `run`.

mod bench;
mod metrics_http;
mod model_cmds;
mod plot;
mod privacy_cmd;
mod progress;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringtrain_coordinator::client::{self, is_terminal, DEFAULT_COORDINATOR};
use ringtrain_coordinator::local::{run_local, LocalOptions};
use ringtrain_coordinator::upload;
use ringtrain_coordinator::watch::HistoryKeeper;
use ringtrain_coordinator::{DataPlane, ServerConfig};
use ringtrain_core::telemetry::{InstanceId, StepSampling};
use ringtrain_proto::v1::{JobRequest, ListRequest};
use ringtrain_worker::config::WorkerConfig;
use telemetry::{Export, LogFormat, Role};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "ringtrain",
    version,
    about = "Distributed data-parallel training with a ring all-reduce"
)]
struct Cli {
    /// Print one JSON object on stdout at the end instead of human output.
    #[arg(long, global = true)]
    json: bool,
    /// Coordinator address for client commands.
    #[arg(long, global = true, env = "RINGTRAIN_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// Log lines on stderr: text, or json (one JSON object per line, for log shippers).
    #[arg(
        long,
        global = true,
        env = "RINGTRAIN_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this endpoint (a Jaeger or OpenTelemetry
    /// Collector, e.g. http://jaeger:4317); off when unset. `serve`, `worker`, `local`,
    /// `submit` and `bench train` export; OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and
    /// OTEL_TRACES_SAMPLER(_ARG) apply.
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// Which training steps get spans (every step of the first N, then one in M): tracing
/// every step of a fast job costs throughput, a sample costs next to nothing.
#[derive(clap::Args, Debug, Clone, Copy)]
struct TraceSteps {
    /// Trace every step up to this one.
    #[arg(long, env = "RINGTRAIN_TRACE_FIRST_STEPS", default_value_t = ringtrain_core::telemetry::DEFAULT_TRACE_FIRST_STEPS)]
    trace_first_steps: u64,
    /// After those, trace one step in this many (1: every step; 0: no more).
    #[arg(long, env = "RINGTRAIN_TRACE_EVERY_STEPS", default_value_t = ringtrain_core::telemetry::DEFAULT_TRACE_EVERY_STEPS)]
    trace_every_steps: u64,
}

impl TraceSteps {
    fn sampling(self) -> StepSampling {
        StepSampling {
            first: self.trace_first_steps,
            every: self.trace_every_steps,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a job on an embedded coordinator plus N local worker processes.
    Local {
        /// Worker processes (default: the job file's `workers`).
        #[arg(long)]
        workers: Option<u32>,
        /// Run directory (default runs/<name>-<id>/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Deadline of one collective send/receive, in seconds.
        #[arg(long, default_value_t = 20)]
        collective_timeout_secs: u64,
        /// Ring transport: tcp (plain sockets: Unix sockets between workers on this
        /// host, TCP otherwise) or grpc (Collective streams).
        #[arg(long, default_value = "tcp")]
        data_plane: DataPlane,
        /// Keep ring data on TCP even between workers on this host.
        #[arg(long)]
        tcp_only: bool,
        /// Continue the run in RUN_DIR from its newest checkpoint that verifies, writing on
        /// into it (not with --out). Without JOB.toml the job file saved in RUN_DIR is
        /// used; with one, only `epochs` may differ from it, and only upwards.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        #[command(flatten)]
        trace: TraceSteps,
        /// The job file (optional with --resume).
        #[arg(required_unless_present = "resume")]
        job: Option<PathBuf>,
    },
    /// Run a coordinator.
    Serve {
        /// Address to listen on (`0.0.0.0:7070` in a container).
        #[arg(long, env = "RINGTRAIN_LISTEN", default_value = "127.0.0.1:7070")]
        listen: String,
        /// Where run directories and checkpoints go.
        #[arg(long, env = "RINGTRAIN_DATA_DIR", default_value = "ringtrain-data")]
        data_dir: PathBuf,
        /// Deadline of one collective send/receive, in seconds.
        #[arg(long, env = "RINGTRAIN_COLLECTIVE_TIMEOUT_SECS", default_value_t = 20)]
        collective_timeout_secs: u64,
        /// Ring transport: tcp (plain TCP data plane) or grpc (Collective streams).
        #[arg(long, env = "RINGTRAIN_DATA_PLANE", default_value = "tcp")]
        data_plane: DataPlane,
        /// Keep jobs, the checkpoint index and worker leases in etcd v3 at URL[,URL…]
        /// (http://host:port); coordinators on one prefix elect a leader, the others
        /// answer UNAVAILABLE until they take over. Without it, state lives in memory.
        #[arg(long, env = "RINGTRAIN_ETCD", value_name = "URL[,URL…]")]
        etcd: Option<String>,
        /// Key prefix in etcd shared by the coordinators of one cluster.
        #[arg(long, env = "RINGTRAIN_ETCD_PREFIX", default_value = "/ringtrain")]
        etcd_prefix: String,
        /// TTL of the leader lease in seconds (at least 2): a standby takes over within
        /// about this long after the leader dies.
        #[arg(long, env = "RINGTRAIN_LEADER_TTL_SECS", default_value_t = 5)]
        leader_ttl_secs: u64,
        /// Largest dataset file a client may upload with `submit` (bytes, or with a unit:
        /// 512MiB, 4GiB). Uploads land in DATA_DIR/datasets/sha256/.
        #[arg(
            long,
            env = "RINGTRAIN_MAX_UPLOAD_BYTES",
            default_value = "4GiB",
            value_parser = ringtrain_coordinator::config::parse_byte_size,
            value_name = "SIZE"
        )]
        max_upload_bytes: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090); off when
        /// unset.
        ///
        /// The coordinator exports gauges: ringtrain_jobs{state} (submitted, waiting,
        /// running, completed, failed, cancelled), ringtrain_workers{state} (idle, busy),
        /// ringtrain_generation{job,name} (jobs that have not ended) and ringtrain_leader
        /// (1 while it leads). Port 0 picks a free port; the bound address is printed on
        /// stdout as "metrics listening on ADDR".
        #[arg(long, env = "RINGTRAIN_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Run a worker that attaches to a coordinator.
    Worker {
        /// Address for ring neighbours to connect to (port 0: any free port;
        /// `0.0.0.0:PORT` in a container).
        #[arg(long, env = "RINGTRAIN_LISTEN", default_value = "127.0.0.1:0")]
        listen: String,
        /// Address neighbours should dial, when it differs from the bound one (a pod's
        /// IP and the listen port). Default: the bound address, or, when bound to every
        /// interface, the local address of the interface that reaches the coordinator.
        #[arg(long, env = "RINGTRAIN_ADVERTISE")]
        advertise: Option<String>,
        /// Name shown in the coordinator's logs.
        #[arg(long, env = "RINGTRAIN_NAME", default_value = "")]
        name: String,
        /// Exit after failing to reach the coordinator for this long (default: retry forever).
        #[arg(long, env = "RINGTRAIN_RECONNECT_TIMEOUT_SECS")]
        reconnect_timeout_secs: Option<u64>,
        /// Keep ring data on TCP even to workers on this host (by default they use a
        /// Unix socket, which is several times faster than loopback TCP). The env var
        /// takes true/false, 1/0, yes/no or on/off.
        #[arg(long, env = "RINGTRAIN_TCP_ONLY", value_parser = clap::builder::BoolishValueParser::new())]
        tcp_only: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090); off when
        /// unset.
        ///
        /// The worker exports its own counters: ringtrain_steps_total,
        /// ringtrain_samples_total (its rows of each batch), ringtrain_step_seconds
        /// (histogram), ringtrain_allreduce_bytes_total, ringtrain_allreduce_seconds
        /// (histogram) and ringtrain_generation (gauge). Port 0 picks a free port; the
        /// bound address is printed on stdout as "metrics listening on ADDR".
        #[arg(long, env = "RINGTRAIN_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<String>,
        #[command(flatten)]
        trace: TraceSteps,
    },
    /// Submit a job file to the coordinator, or continue a run (--resume).
    Submit {
        /// Override the job file's `workers`.
        #[arg(long)]
        workers: Option<u32>,
        /// Run directory on the coordinator's host.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in RUN_DIR (on the coordinator's host) from its newest
        /// checkpoint that verifies, writing on into it (not with --out). Without JOB.toml
        /// the job file saved in RUN_DIR is used; with one, only `epochs` may differ from
        /// it, and only upwards.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Send dataset paths as they are instead of uploading the files: for a
        /// coordinator on this host that reads them itself. (Paths written
        /// `coordinator:PATH` are never uploaded.)
        #[arg(long)]
        no_upload: bool,
        /// The job file (optional with --resume).
        #[arg(required_unless_present = "resume")]
        job: Option<PathBuf>,
    },
    /// Show a job's state, epoch, step and metrics.
    Status {
        /// The job id.
        job_id: String,
    },
    /// Follow a job until it ends (exit 0 when it completes).
    Watch {
        /// The job id.
        job_id: String,
    },
    /// Cancel a job.
    Cancel {
        /// The job id.
        job_id: String,
    },
    /// List jobs.
    Jobs,
    /// Predict with a saved model (a run directory); no cluster needed.
    Predict {
        /// The run directory holding model.json and model.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// Rows from a CSV with a header (feature columns are picked by name).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// IDX3 images.
        #[arg(long)]
        idx: Option<PathBuf>,
        /// A 2-D NPY feature array.
        #[arg(long)]
        npy: Option<PathBuf>,
        /// Write the predictions as CSV here.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Evaluate a saved model on labelled data: loss, metrics, confusion matrix.
    Evaluate {
        /// The run directory holding model.json and model.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// A CSV with a header and a label column.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// The CSV's label column (default: the one the model was trained with).
        #[arg(long)]
        label: Option<String>,
        /// IDX3 images and IDX1 labels.
        #[arg(long, num_args = 2, value_names = ["IMAGES", "LABELS"])]
        idx: Option<Vec<PathBuf>>,
        /// NPY features and labels.
        #[arg(long, num_args = 2, value_names = ["FEATURES", "LABELS"])]
        npy: Option<Vec<PathBuf>>,
    },
    /// Draw a run's loss and metric curves to PNG.
    Plot {
        /// The run directory (holding metrics.jsonl).
        run_dir: PathBuf,
        /// Output file (default RUN_DIR/curves.png).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Measure the all-reduce (and, later, training) against the wire.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// One rank of `bench allreduce` (started by it).
    #[command(hide = true)]
    BenchPeer {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        data_plane: DataPlane,
        #[arg(long)]
        bytes: String,
        #[arg(long)]
        iters: usize,
        #[arg(long)]
        tcp_only: bool,
    },
    /// Differential-privacy accounting for DP-SGD (Poisson-subsampled Gaussian).
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// N worker processes on loopback running the production ring all-reduce.
    Allreduce {
        /// Processes in the ring.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Buffer sizes, e.g. 1MiB,16MiB,64MiB.
        #[arg(long, default_value = "1MiB,16MiB,64MiB")]
        bytes: String,
        /// Timed iterations per size (after one warm-up).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Ring transport: tcp (plain sockets; Unix sockets between ranks on one host)
        /// or grpc.
        #[arg(long, default_value = "tcp")]
        data_plane: DataPlane,
        /// With the tcp data plane, keep every link on TCP (no same-host Unix sockets):
        /// the figure to compare with a TCP-only peer.
        #[arg(long)]
        tcp_only: bool,
    },
    /// Samples/s of the real training path (data, compute, all-reduce, optimizer) on N
    /// local worker processes, excluding start-up.
    Train {
        /// Worker processes.
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Steps to run (at most the job's epochs' worth).
        #[arg(long, default_value_t = 2000)]
        steps: u64,
        /// Ring transport: tcp or grpc.
        #[arg(long, default_value = "tcp")]
        data_plane: DataPlane,
        /// Keep ring data on TCP even between workers on this host.
        #[arg(long)]
        tcp_only: bool,
        #[command(flatten)]
        trace: TraceSteps,
        /// The job file.
        job: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PrivacyCommand {
    /// Epsilon spent by T steps at noise multiplier S and sample rate Q.
    Epsilon {
        /// Noise standard deviation over the clipping norm (sigma).
        #[arg(long)]
        noise_multiplier: f64,
        /// Poisson sampling rate q (batch size / dataset size).
        #[arg(long)]
        sample_rate: f64,
        /// Number of steps T.
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long)]
        delta: f64,
        /// rdp (Renyi DP, Balle et al. 2020 conversion) or pld (tight, the default).
        #[arg(long, default_value = "pld")]
        accountant: String,
    },
    /// The smallest noise multiplier whose epsilon stays within a target.
    Noise {
        /// Epsilon budget.
        #[arg(long)]
        target_epsilon: f64,
        /// Poisson sampling rate q.
        #[arg(long)]
        sample_rate: f64,
        /// Number of steps T.
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long)]
        delta: f64,
        /// rdp or pld (default).
        #[arg(long, default_value = "pld")]
        accountant: String,
    },
}

/// The log format every `init_tracing` call uses (set once from the command line).
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Log lines only (the commands that export no spans).
fn init_tracing(default: &str) {
    // A subscriber can only be installed once; a second call keeps the first.
    let _ = telemetry::init(log_format(), default, None);
}

/// Log lines, and spans exported to `endpoint` when one is set.
fn init_traced(
    default: &str,
    endpoint: Option<&str>,
    role: Role,
    instance: &InstanceId,
) -> anyhow::Result<()> {
    let export = endpoint.map(|e| Export {
        endpoint: e.to_string(),
        role,
        instance: instance.clone(),
    });
    telemetry::init(log_format(), default, export)
}

fn log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or(LogFormat::Text)
}

/// Cancels the returned token on ctrl-c or SIGTERM.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

fn main() -> ExitCode {
    // A worker runs its own compute threads (one row block of a batch each, see
    // `Mlp::forward_backward`). candle's elementwise ops would otherwise start a spinning
    // barrier pool of their own on the same cores, which halved the 2-thread speed of the
    // large MLP. Setting the variable here, before any thread exists, is the one moment
    // it cannot race with a reader; a value the user set wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async_main());
    // The exporter's connection runs on the runtime: flush before it is dropped.
    telemetry::shutdown();
    code
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    let _ = LOG_FORMAT.set(cli.log_format);
    let json = cli.json;
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("error: {msg}");
            if json {
                println!("{}", serde_json::json!({ "error": msg }));
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    let otlp = cli.otlp_endpoint.clone().filter(|e| !e.trim().is_empty());
    let otlp = otlp.as_deref();
    // Set once the process knows its id (a worker's comes at registration).
    let instance = InstanceId::default();
    match cli.command {
        Command::Local {
            workers,
            out,
            collective_timeout_secs,
            data_plane,
            tcp_only,
            resume,
            trace,
            job,
        } => {
            instance.set(&format!("local (pid {})", std::process::id()));
            init_traced("warn", otlp, Role::Coordinator, &instance)?;
            let exe = std::env::current_exe().context("locating the ringtrain executable")?;
            let mut bar = progress::Progress::new();
            let status = run_local(
                LocalOptions {
                    job,
                    resume,
                    workers,
                    out,
                    exe,
                    collective_timeout: Duration::from_secs(collective_timeout_secs),
                    max_steps: None,
                    data_plane,
                    tcp_only,
                    otlp_endpoint: otlp.map(str::to_string),
                    trace_steps: trace.sampling(),
                },
                |s| bar.update(s),
                shutdown_token(),
            )
            .await?;
            model_cmds::draw_curves(&status);
            bar.finish(&status);
            progress::print_result(&status, json);
            Ok(progress::exit_code(&status))
        }
        Command::Serve {
            listen,
            data_dir,
            collective_timeout_secs,
            data_plane,
            etcd,
            etcd_prefix,
            leader_ttl_secs,
            max_upload_bytes,
            metrics_listen,
        } => {
            init_traced("info", otlp, Role::Coordinator, &instance)?;
            let store = serve_store(etcd.as_deref(), etcd_prefix, leader_ttl_secs).await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            let metrics = bind_metrics(metrics_listen.as_deref()).await?;
            instance.set(&ringtrain_coordinator::server::coordinator_id(&listener));
            tracing::info!(addr = %addr, data_dir = %data_dir.display(), "coordinator listening");
            announce(addr, metrics.as_ref());
            let config = ServerConfig {
                data_dir,
                collective_timeout: Duration::from_secs(collective_timeout_secs),
                data_plane,
                store,
                max_upload_bytes,
                ..ServerConfig::default()
            };
            let core = ringtrain_coordinator::Coordinator::new(config);
            let gate = ringtrain_coordinator::server::Gate::standby();
            let shutdown = shutdown_token();
            let exporter = metrics.map(|listener| {
                let (core, gate) = (core.clone(), gate.clone());
                let render: metrics_http::Render = std::sync::Arc::new(move || {
                    let mut g = core.gauges();
                    g.leader = gate.state() == ringtrain_coordinator::server::GateState::Serving;
                    g.render()
                });
                tokio::spawn(metrics_http::serve(listener, render, shutdown.clone()))
            });
            let result =
                ringtrain_coordinator::server::run_with(core, gate, listener, shutdown.clone())
                    .await;
            stop_exporter(exporter, &shutdown).await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            listen,
            advertise,
            name,
            reconnect_timeout_secs,
            tcp_only,
            metrics_listen,
            trace,
        } => {
            init_traced("info", otlp, Role::Worker, &instance)?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            let metrics = bind_metrics(metrics_listen.as_deref()).await?;
            announce(addr, metrics.as_ref());
            let counters = std::sync::Arc::new(ringtrain_worker::metrics::WorkerMetrics::default());
            let shutdown = shutdown_token();
            let exporter = metrics.map(|listener| {
                let counters = counters.clone();
                let render: metrics_http::Render = std::sync::Arc::new(move || counters.render());
                tokio::spawn(metrics_http::serve(listener, render, shutdown.clone()))
            });
            let config = WorkerConfig {
                coordinator: cli.coordinator,
                advertise,
                name,
                reconnect_limit: reconnect_timeout_secs.map(Duration::from_secs),
                local_socket: !tcp_only,
                metrics: counters,
                trace_steps: trace.sampling(),
                instance,
            };
            let result = ringtrain_worker::agent::run(config, listener, shutdown.clone()).await;
            stop_exporter(exporter, &shutdown).await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            workers,
            out,
            resume,
            no_upload,
            job,
        } => {
            init_traced("warn", otlp, Role::Client, &instance)?;
            let mut req =
                client::submit_request(job.as_deref(), out.as_deref(), workers, resume.as_deref())?;
            let mut c = client::connect(&cli.coordinator).await?;
            let uploads = if no_upload {
                Vec::new()
            } else {
                upload::upload_datasets(&mut c, &mut req, |u| {
                    if !json {
                        progress::print_upload(u);
                    }
                })
                .await?
            };
            // The job's trace starts here: its context goes with the request.
            let span = tracing::info_span!("submit", job = tracing::field::Empty);
            let id = c
                .submit(span.in_scope(|| client::traced(req)))
                .await
                .map_err(status_err)?
                .into_inner()
                .job_id;
            span.record("job", id.as_str());
            drop(span);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "job_id": id, "uploads": uploads })
                );
            } else {
                println!("{id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { job_id } => {
            init_tracing("warn");
            let mut c = client::connect(&cli.coordinator).await?;
            let s = c
                .get(JobRequest { job_id })
                .await
                .map_err(status_err)?
                .into_inner();
            progress::print_status(&s, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { job_id } => {
            init_tracing("warn");
            let mut c = client::connect(&cli.coordinator).await?;
            let mut stream = c
                .watch(JobRequest { job_id })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut bar = progress::Progress::new();
            // Watch sends the history only when it grew; keep the last one seen.
            let mut history = HistoryKeeper::default();
            let mut last = None;
            while let Some(s) = stream.message().await.map_err(status_err)? {
                let s = history.apply(s);
                bar.update(&s);
                let done = is_terminal(&s);
                last = Some(s);
                if done {
                    break;
                }
            }
            let s = last.context("the coordinator ended the watch without a status")?;
            bar.finish(&s);
            progress::print_result(&s, json);
            Ok(progress::exit_code(&s))
        }
        Command::Cancel { job_id } => {
            init_tracing("warn");
            let mut c = client::connect(&cli.coordinator).await?;
            let s = c
                .cancel(JobRequest { job_id })
                .await
                .map_err(status_err)?
                .into_inner();
            progress::print_status(&s, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict {
            model,
            csv,
            idx,
            npy,
            output,
        } => {
            init_tracing("warn");
            let input = model_cmds::input(csv, None, idx.map(|p| vec![p]), npy.map(|p| vec![p]))?;
            model_cmds::predict(&model, input, output, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Evaluate {
            model,
            csv,
            label,
            idx,
            npy,
        } => {
            init_tracing("warn");
            let input = model_cmds::input(csv, label, idx, npy)?;
            model_cmds::evaluate(&model, input, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { run_dir, output } => {
            init_tracing("warn");
            model_cmds::plot(&run_dir, output, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { command } => {
            match command {
                BenchCommand::Allreduce {
                    workers,
                    bytes,
                    iters,
                    data_plane,
                    tcp_only,
                } => {
                    init_tracing("warn");
                    let sizes = bench::parse_sizes(&bytes)?;
                    bench::allreduce(workers, &sizes, iters.max(1), data_plane, tcp_only, json)?;
                }
                BenchCommand::Train {
                    workers,
                    steps,
                    data_plane,
                    tcp_only,
                    trace,
                    job,
                } => {
                    instance.set(&format!("bench (pid {})", std::process::id()));
                    init_traced("warn", otlp, Role::Coordinator, &instance)?;
                    let exe =
                        std::env::current_exe().context("locating the ringtrain executable")?;
                    let out = std::env::temp_dir()
                        .join(format!("ringtrain-bench-{}", std::process::id()));
                    let status = run_local(
                        LocalOptions {
                            job: Some(job),
                            resume: None,
                            workers: Some(workers),
                            out: Some(out.clone()),
                            exe,
                            collective_timeout: Duration::from_secs(20),
                            max_steps: Some(steps),
                            data_plane,
                            tcp_only,
                            otlp_endpoint: otlp.map(str::to_string),
                            trace_steps: trace.sampling(),
                        },
                        |_| {},
                        shutdown_token(),
                    )
                    .await?;
                    let _ = std::fs::remove_dir_all(&out);
                    bench::print_train(&status, json)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchPeer {
            rank,
            data_plane,
            bytes,
            iters,
            tcp_only,
        } => {
            init_tracing("warn");
            let sizes: Vec<usize> = bytes
                .split(',')
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?;
            bench::peer(rank, &sizes, iters, data_plane, tcp_only).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Privacy { command } => {
            init_tracing("warn");
            privacy_cmd::run(command, json)
        }
        Command::Jobs => {
            init_tracing("warn");
            let mut c = client::connect(&cli.coordinator).await?;
            let jobs = c
                .list(ListRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .jobs;
            progress::print_jobs(&jobs, json);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Binds `--metrics-listen` when it is set; an empty value (an env var a manifest left
/// blank) counts as unset.
async fn bind_metrics(addr: Option<&str>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match addr.map(str::trim).filter(|a| !a.is_empty()) {
        Some(a) => Ok(Some(metrics_http::bind(a).await?)),
        None => Ok(None),
    }
}

/// The bound addresses on stdout, so scripts and tests that pass port 0 learn the ports:
/// "listening on ADDR" first, then "metrics listening on ADDR" when metrics are served.
/// One write, so a reader that stops after the first line cannot break the second.
fn announce(addr: std::net::SocketAddr, metrics: Option<&tokio::net::TcpListener>) {
    let metrics = metrics
        .and_then(|l| l.local_addr().ok())
        .map(|m| {
            tracing::info!(addr = %m, "serving prometheus metrics at /metrics");
            format!("\nmetrics listening on {m}")
        })
        .unwrap_or_default();
    println!("listening on {addr}{metrics}");
}

/// Stops the metrics endpoint after its process's main task ended (whichever way).
async fn stop_exporter(
    exporter: Option<tokio::task::JoinHandle<()>>,
    shutdown: &CancellationToken,
) {
    if let Some(task) = exporter {
        shutdown.cancel();
        let _ = task.await;
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// The store of `ringtrain serve`: etcd when `--etcd` is given, else `None` (memory).
async fn serve_store(
    etcd: Option<&str>,
    prefix: String,
    leader_ttl_secs: u64,
) -> anyhow::Result<Option<std::sync::Arc<dyn ringtrain_coordinator::store::Store>>> {
    use ringtrain_coordinator::store::{parse_endpoints, EtcdConfig, EtcdStore};
    let Some(etcd) = etcd else {
        return Ok(None);
    };
    let config = EtcdConfig {
        endpoints: parse_endpoints(etcd)?,
        prefix,
        leader_ttl: Duration::from_secs(leader_ttl_secs),
        ..EtcdConfig::default()
    };
    let store = EtcdStore::connect(config).await?;
    tracing::info!(store = %ringtrain_coordinator::store::Store::describe(&store), "durable store");
    Ok(Some(std::sync::Arc::new(store)))
}
