//! `ringtrain`: the command-line entry point of the cluster (and the container image's
//! entrypoint for both roles). Parses arguments, installs tracing, calls a library `run`.

mod progress;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringtrain_coordinator::client::{self, is_terminal, DEFAULT_COORDINATOR};
use ringtrain_coordinator::local::{run_local, LocalOptions};
use ringtrain_coordinator::ServerConfig;
use ringtrain_proto::v1::{JobRequest, ListRequest};
use ringtrain_worker::config::WorkerConfig;
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
    #[command(subcommand)]
    command: Command,
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
        /// The job file.
        job: PathBuf,
    },
    /// Run a coordinator.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// Where run directories and checkpoints go.
        #[arg(long, default_value = "ringtrain-data")]
        data_dir: PathBuf,
        /// Deadline of one collective send/receive, in seconds.
        #[arg(long, default_value_t = 20)]
        collective_timeout_secs: u64,
    },
    /// Run a worker that attaches to a coordinator.
    Worker {
        /// Address for ring neighbours to connect to (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Address neighbours should dial, when it differs from the bound one.
        #[arg(long)]
        advertise: Option<String>,
        /// Name shown in the coordinator's logs.
        #[arg(long, default_value = "")]
        name: String,
        /// Exit after failing to reach the coordinator for this long (default: retry forever).
        #[arg(long)]
        reconnect_timeout_secs: Option<u64>,
    },
    /// Submit a job file to the coordinator.
    Submit {
        /// Override the job file's `workers`.
        #[arg(long)]
        workers: Option<u32>,
        /// Run directory on the coordinator's host.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The job file.
        job: PathBuf,
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
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match cli.command {
        Command::Local {
            workers,
            out,
            collective_timeout_secs,
            job,
        } => {
            init_tracing("warn");
            let exe = std::env::current_exe().context("locating the ringtrain executable")?;
            let mut bar = progress::Progress::new();
            let status = run_local(
                LocalOptions {
                    job,
                    workers,
                    out,
                    exe,
                    collective_timeout: Duration::from_secs(collective_timeout_secs),
                },
                |s| bar.update(s),
                shutdown_token(),
            )
            .await?;
            bar.finish(&status);
            progress::print_result(&status, json);
            Ok(progress::exit_code(&status))
        }
        Command::Serve {
            listen,
            data_dir,
            collective_timeout_secs,
        } => {
            init_tracing("info");
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(addr = %listener.local_addr()?, data_dir = %data_dir.display(), "coordinator listening");
            let config = ServerConfig {
                data_dir,
                collective_timeout: Duration::from_secs(collective_timeout_secs),
            };
            ringtrain_coordinator::server::run(config, listener, shutdown_token()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            listen,
            advertise,
            name,
            reconnect_timeout_secs,
        } => {
            init_tracing("info");
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let config = WorkerConfig {
                coordinator: cli.coordinator,
                advertise,
                name,
                reconnect_limit: reconnect_timeout_secs.map(Duration::from_secs),
            };
            ringtrain_worker::agent::run(config, listener, shutdown_token()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit { workers, out, job } => {
            init_tracing("warn");
            let req = client::submit_request(&job, out.as_deref(), workers)?;
            let mut c = client::connect(&cli.coordinator).await?;
            let id = c.submit(req).await.map_err(status_err)?.into_inner().job_id;
            if json {
                println!("{}", serde_json::json!({ "job_id": id }));
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
            let mut last = None;
            while let Some(s) = stream.message().await.map_err(status_err)? {
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

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
