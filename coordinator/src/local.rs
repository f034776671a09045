//! `ringtrain local`: an embedded coordinator plus N worker OS processes on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringtrain_proto::v1::JobStatus;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStderr, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{is_terminal, submit_request};
use crate::config::ServerConfig;
use crate::error::CoordinatorError;
use crate::job_file::{JobFile, SavedSubmit, SAVED_JOB_FILE, SAVED_SUBMIT_FILE};
use crate::server::serve;
use crate::service::Coordinator;
use ringtrain_core::telemetry::StepSampling;

/// How long workers get to exit after being told to.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Bytes of a worker's stderr kept for an error message.
const STDERR_TAIL_BYTES: usize = 4096;

/// The last lines a worker wrote to stderr.
#[derive(Debug, Default)]
struct StderrTail(std::collections::VecDeque<String>);

impl StderrTail {
    fn push(&mut self, line: String) {
        self.0.push_back(line);
        while self.0.iter().map(|l| l.len() + 1).sum::<usize>() > STDERR_TAIL_BYTES
            && self.0.len() > 1
        {
            self.0.pop_front();
        }
    }

    fn text(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Copies a worker's stderr to ours line by line (the user still sees its warnings) and
/// keeps the tail for an error message.
async fn forward_stderr(err: ChildStderr, tail: Arc<Mutex<StderrTail>>) {
    let mut lines = BufReader::new(err).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{line}");
        tail.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
}

/// The error for the first worker process that has exited, with its exit status and the
/// end of its stderr; `None` while all are running.
fn exited_early(children: &mut [Child], tails: &[Arc<Mutex<StderrTail>>]) -> Option<String> {
    for (i, c) in children.iter_mut().enumerate() {
        if let Ok(Some(status)) = c.try_wait() {
            let tail = tails
                .get(i)
                .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).text())
                .unwrap_or_default();
            return Some(format!(
                "worker process local-{i} exited ({status}) before the job finished; its stderr ends with:\n{}",
                if tail.is_empty() { "(nothing)" } else { &tail }
            ));
        }
    }
    None
}

/// How many workers the run in `run_dir` was started with: the `--workers` it was
/// submitted with (saved in `job.json`), or else its saved job file's `workers` (the
/// most, for an elastic range).
fn resumed_worker_count(run_dir: &Path) -> Result<u32, CoordinatorError> {
    if !run_dir.is_dir() {
        return Err(CoordinatorError::BadRequest(format!(
            "{}: no such directory (--resume takes the run directory of an earlier job, such \
             as runs/<name>-<job id>)",
            run_dir.display()
        )));
    }
    let toml_path = run_dir.join(SAVED_JOB_FILE);
    let text = std::fs::read_to_string(&toml_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CoordinatorError::Precondition(format!(
                "{} has no {SAVED_JOB_FILE}: is it a ringtrain run directory (it holds \
                 metrics.jsonl, checkpoints/)?",
                run_dir.display()
            ))
        } else {
            CoordinatorError::io(format!("reading {}", toml_path.display()))(e)
        }
    })?;
    let file = JobFile::parse(&text, &toml_path.display().to_string())?;
    let json_path = run_dir.join(SAVED_SUBMIT_FILE);
    let overridden = match std::fs::read(&json_path) {
        Ok(bytes) => {
            let saved: SavedSubmit =
                serde_json::from_slice(&bytes).map_err(|e| CoordinatorError::Data {
                    path: json_path.display().to_string(),
                    message: format!("not a saved submit: {e}"),
                })?;
            saved.workers
        }
        // The coordinator's resume reports a missing job.json with the fix.
        Err(_) => 0,
    };
    Ok(if overridden > 0 {
        overridden
    } else {
        file.workers.max()
    })
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The job file (optional with `resume`: the run's saved one is used).
    pub job: Option<PathBuf>,
    /// A run directory to continue from its newest checkpoint that verifies, writing on
    /// into it (then `out` must be `None`).
    pub resume: Option<PathBuf>,
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
    /// The OTLP endpoint the workers export spans to (as this process does).
    pub otlp_endpoint: Option<String>,
    /// Which steps the workers trace.
    pub trace_steps: StepSampling,
}

/// Runs one job on an embedded cluster and returns its final status. `on_status` sees
/// every status change (for progress display). `interrupt` cancels the job.
pub async fn run_local(
    opts: LocalOptions,
    mut on_status: impl FnMut(&JobStatus),
    interrupt: CancellationToken,
) -> Result<JobStatus, CoordinatorError> {
    // Validate and load first: bad input fails before any process starts.
    let mut req = submit_request(
        opts.job.as_deref(),
        opts.out.as_deref(),
        opts.workers,
        opts.resume.as_deref(),
    )?;
    req.max_steps = opts.max_steps.unwrap_or(0);
    let core = Coordinator::new(ServerConfig {
        // Run directories land in ./runs/<name>-<id>/ (checkpoints inside them).
        data_dir: PathBuf::from("."),
        collective_timeout: opts.collective_timeout,
        data_plane: opts.data_plane,
        ..ServerConfig::default()
    });
    let job_id = core.submit(req).await?;
    // A resume without --workers runs as many workers as the run was started with; the
    // run directory is on this machine, so read that here (after the coordinator
    // accepted the resume, whose errors say best what is wrong with the directory).
    let resumed_workers = match (&opts.resume, opts.workers) {
        (Some(run_dir), None) => Some(resumed_worker_count(run_dir)?),
        _ => None,
    };
    let status = core.get(&job_id.0)?;
    let workers = resumed_workers.unwrap_or(status.workers);

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
    let mut stderr_tails: Vec<Arc<Mutex<StderrTail>>> = Vec::new();
    let mut readers = JoinSet::new();
    for i in 0..workers {
        let mut child = Command::new(&opts.exe)
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
            // Tracing goes by flags, not by inheritance: a value given on the command
            // line (not in the environment) reaches the workers too.
            .args(
                opts.otlp_endpoint
                    .iter()
                    .flat_map(|e| ["--otlp-endpoint".to_string(), e.clone()]),
            )
            .args([
                "--trace-first-steps".to_string(),
                opts.trace_steps.first.to_string(),
                "--trace-every-steps".to_string(),
                opts.trace_steps.every.to_string(),
            ])
            // A container's settings (RINGTRAIN_ADVERTISE, ...) belong to the container's
            // own worker, not to the local ones started here.
            .env_remove("RINGTRAIN_ADVERTISE")
            .env_remove("RINGTRAIN_TCP_ONLY")
            .env("RAYON_NUM_THREADS", &threads)
            .env(
                "RUST_LOG",
                std::env::var("RINGTRAIN_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(CoordinatorError::io(format!(
                "starting worker {i} from {}",
                opts.exe.display()
            )))?;
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        if let Some(err) = child.stderr.take() {
            readers.spawn(forward_stderr(err, tail.clone()));
        }
        stderr_tails.push(tail);
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
            // A worker that exits after attaching is noticed by the coordinator through
            // its stream; one that exits before (a bad flag, a crash at start-up) is not a
            // member of anything, so the job would wait for it forever. Poll for that.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(message) = exited_early(&mut children, &stderr_tails) {
                    core.fail(&job_id.0, message)?;
                }
            }
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
    // The children are gone, so their stderr pipes are closed and the readers end.
    let _ = tokio::time::timeout(WORKER_EXIT_GRACE, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    Ok(final_status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_worker_that_dies_before_attaching_fails_the_job_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job.toml");
        std::fs::write(&job, crate::test_jobs::tiny(2, 1)).unwrap();
        // A "worker" that fails at start-up, before it could attach.
        let exe = dir.path().join("broken-worker");
        std::fs::write(
            &exe,
            "#!/bin/sh\necho 'error: cannot bind 127.0.0.1:0: no such device' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let opts = LocalOptions {
            job: Some(job),
            resume: None,
            workers: None,
            out: Some(dir.path().join("out")),
            exe,
            collective_timeout: Duration::from_secs(5),
            max_steps: None,
            data_plane: crate::config::DataPlane::Tcp,
            tcp_only: false,
            otlp_endpoint: None,
            trace_steps: StepSampling::default(),
        };
        let status = tokio::time::timeout(
            Duration::from_secs(30),
            run_local(opts, |_| {}, CancellationToken::new()),
        )
        .await
        .expect("run_local must not wait forever")
        .unwrap();
        assert_eq!(status.state, "failed");
        assert!(
            status.error.contains("exited (exit status: 3)")
                && status
                    .error
                    .contains("cannot bind 127.0.0.1:0: no such device"),
            "{}",
            status.error
        );
    }

    #[test]
    fn a_resume_runs_as_many_workers_as_the_run_was_started_with() {
        let dir = tempfile::tempdir().unwrap();
        let e = resumed_worker_count(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("has no job.toml: is it a ringtrain run directory"),
            "{e}"
        );
        std::fs::write(dir.path().join("job.toml"), crate::test_jobs::tiny(3, 1)).unwrap();
        assert_eq!(resumed_worker_count(dir.path()).unwrap(), 3);
        let saved = SavedSubmit {
            source: "t.toml".into(),
            base_dir: "/".into(),
            workers: 2,
            max_steps: 0,
            uploaded: Vec::new(),
        };
        std::fs::write(
            dir.path().join("job.json"),
            serde_json::to_vec(&saved).unwrap(),
        )
        .unwrap();
        assert_eq!(resumed_worker_count(dir.path()).unwrap(), 2);
        let e = resumed_worker_count(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope: no such directory"), "{e}");
    }

    #[tokio::test]
    async fn out_with_resume_is_refused_before_anything_starts() {
        let opts = LocalOptions {
            job: None,
            resume: Some(PathBuf::from("runs/t-j-1")),
            workers: None,
            out: Some(PathBuf::from("elsewhere")),
            exe: PathBuf::from("/nonexistent/ringtrain"),
            collective_timeout: Duration::from_secs(5),
            max_steps: None,
            data_plane: crate::config::DataPlane::Tcp,
            tcp_only: false,
            otlp_endpoint: None,
            trace_steps: StepSampling::default(),
        };
        let e = run_local(opts, |_| {}, CancellationToken::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--out elsewhere cannot be given with --resume"),
            "{e}"
        );
    }
}
