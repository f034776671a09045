//! `ringtrain local`: an embedded coordinator plus N worker OS processes on 127.0.0.1.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ringtrain_proto::v1::JobStatus;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{is_terminal, submit_request};
use crate::config::ServerConfig;
use crate::error::CoordinatorError;
use crate::server::serve;
use crate::service::Coordinator;

/// How long workers get to exit after being told to.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The job file.
    pub job: PathBuf,
    /// Worker processes (default: the job's `workers`).
    pub workers: Option<u32>,
    /// Run directory (default `runs/<name>-<id>/`).
    pub out: Option<PathBuf>,
    /// The `ringtrain` executable to start workers from.
    pub exe: PathBuf,
    /// Collective deadline handed to workers.
    pub collective_timeout: Duration,
    /// Stop after this many steps (benchmarks).
    pub max_steps: Option<u64>,
    /// The ring's transport.
    pub data_plane: crate::config::DataPlane,
    /// Start workers with `--tcp-only` (no same-host Unix sockets for ring data).
    pub tcp_only: bool,
}

/// Runs one job on an embedded cluster and returns its final status. `on_status` sees
/// every status change (for progress display). `interrupt` cancels the job.
pub async fn run_local(
    opts: LocalOptions,
    mut on_status: impl FnMut(&JobStatus),
    interrupt: CancellationToken,
) -> Result<JobStatus, CoordinatorError> {
    // Validate and load first: bad input fails before any process starts.
    let mut req = submit_request(&opts.job, opts.out.as_deref(), opts.workers)?;
    req.max_steps = opts.max_steps.unwrap_or(0);
    let core = Coordinator::new(ServerConfig {
        // Run directories land in ./runs/<name>-<id>/ (checkpoints inside them).
        data_dir: PathBuf::from("."),
        collective_timeout: opts.collective_timeout,
        data_plane: opts.data_plane,
    });
    let job_id = core.submit(req).await?;
    let status = core.get(&job_id.0)?;
    let workers = status.workers;

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(CoordinatorError::io("binding 127.0.0.1:0"))?;
    let addr = listener
        .local_addr()
        .map_err(CoordinatorError::io("reading the bound address"))?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(core.clone(), listener, stop.clone()));
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / workers.max(1) as usize).max(1).to_string()
    });
    let mut children: Vec<Child> = Vec::new();
    for i in 0..workers {
        let child = Command::new(&opts.exe)
            .args([
                "worker",
                "--coordinator",
                &format!("http://{addr}"),
                "--listen",
                "127.0.0.1:0",
                "--name",
                &format!("local-{i}"),
                "--reconnect-timeout-secs",
                "10",
            ])
            .args(opts.tcp_only.then_some("--tcp-only"))
            .env("RAYON_NUM_THREADS", &threads)
            .env(
                "RUST_LOG",
                std::env::var("RINGTRAIN_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(CoordinatorError::io(format!(
                "starting worker {i} from {}",
                opts.exe.display()
            )))?;
        children.push(child);
    }
    info!(job = %job_id, workers, coordinator = %addr, "local cluster started");

    let mut rx = core.watch(&job_id.0)?;
    let final_status = loop {
        let s = rx.borrow_and_update().clone();
        on_status(&s);
        if is_terminal(&s) {
            break s;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break core.get(&job_id.0)? },
            _ = interrupt.cancelled() => {
                warn!(job = %job_id, "interrupted; cancelling the job");
                core.cancel(&job_id.0)?;
            }
            // A worker process that exits early is a failure the coordinator notices
            // through its stream; polling here only keeps a dead child from going unseen.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };

    core.shutdown_workers();
    for mut c in children {
        if tokio::time::timeout(WORKER_EXIT_GRACE, c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
    stop.cancel();
    let _ = server.await;
    Ok(final_status)
}
