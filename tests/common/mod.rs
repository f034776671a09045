//! Helpers for end-to-end tests: real `ringtrain` processes on 127.0.0.1 with ephemeral
//! ports, killed when the test ends (pass or fail).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringtrain")
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a process and returns it with the address from its "listening on ADDR" line.
pub fn spawn_listening(args: &[&str]) -> (Proc, String) {
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringtrain");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Proc(child), addr)
}

/// A coordinator (`serve`) with its data in `data_dir`.
pub fn serve(data_dir: &Path) -> (Proc, String) {
    let (p, addr) = spawn_listening(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--collective-timeout-secs",
        "10",
    ]);
    (p, format!("http://{addr}"))
}

/// A worker attached to `coordinator`.
pub fn worker(coordinator: &str, name: &str) -> Proc {
    worker_at(coordinator, name).0
}

/// A worker process and the collective address it listens on (what the coordinator
/// knows it by).
pub fn worker_at(coordinator: &str, name: &str) -> (Proc, String) {
    spawn_listening(&[
        "worker",
        "--coordinator",
        coordinator,
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
    ])
}

/// Runs the CLI to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run ringtrain")
}

/// Runs the CLI with `--json` and parses its stdout.
pub fn run_json(args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--json");
    let out = run(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.status.success(), v, stderr)
}

/// Polls `f` until it returns `Some`, or panics after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a synthetic-data job file and returns its path.
pub fn synthetic_job(
    dir: &Path,
    name: &str,
    samples: usize,
    epochs: u32,
    validation_split: f64,
    every_steps: u64,
) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
seed = 11
epochs = {epochs}
batch_size = 32
workers = 3

[data]
train = {{ format = "synthetic", samples = {samples}, features = 20, classes = 4, noise = 1.0 }}
validation_split = {validation_split}

[model]
input = 20
layers = [
  {{ dense = 16, activation = "relu" }},
  {{ dense = 16, activation = "tanh" }},
  {{ dense = 4, activation = "softmax" }},
]

[train]
optimizer = {{ adam = {{ learning_rate = 0.001 }} }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]

[checkpoint]
every_steps = {every_steps}
keep = 2
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a process with `RUST_LOG=info` and its stderr in `log`; returns it with the
/// address from its "listening on ADDR" line. Tests read the log for what the status API
/// does not show (which worker id a process got, "rank resumed", skipped checkpoints).
pub fn spawn_logged(args: &[&str], log: &Path) -> (Proc, String) {
    let file = std::fs::File::create(log).expect("create log file");
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start ringtrain");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}; log {}", log.display()))
        .to_string();
    (Proc(child), addr)
}

/// A coordinator with its data in `dir/data` and its log in `dir/serve.log`.
pub fn serve_logged(dir: &Path) -> (Proc, String, PathBuf) {
    let log = dir.join("serve.log");
    let data = dir.join("data");
    let (p, addr) = spawn_logged(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--collective-timeout-secs",
            "10",
        ],
        &log,
    );
    (p, format!("http://{addr}"), log)
}

/// A worker named `name` with its log in `dir/NAME.log`; returns it with the worker id
/// the coordinator gave it (from its "registered with the coordinator" line).
pub fn worker_logged(coordinator: &str, name: &str, dir: &Path) -> (Proc, String) {
    let log = dir.join(format!("{name}.log"));
    let (p, _) = spawn_logged(
        &[
            "worker",
            "--coordinator",
            coordinator,
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
        ],
        &log,
    );
    let id = wait_for(Duration::from_secs(20), "the worker to register", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let line = text
            .lines()
            .find(|l| l.contains("registered with the coordinator"))?;
        let id = line.split("worker_id=").nth(1)?.split_whitespace().next()?;
        Some(id.trim_matches('"').to_string())
    });
    (p, id)
}

/// The lines of `log` that contain `needle`.
pub fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// `ringtrain status --json` of a job (panics when the call fails).
pub fn job_status(coordinator: &str, id: &str) -> serde_json::Value {
    let (ok, v, stderr) = run_json(&["status", "--coordinator", coordinator, id]);
    assert!(ok, "status failed: {stderr}");
    v
}

/// Submits with `--json` extra args and returns the job id.
pub fn submit(coordinator: &str, args: &[&str]) -> String {
    let mut all = vec!["submit", "--coordinator", coordinator];
    all.extend_from_slice(args);
    let (ok, v, stderr) = run_json(&all);
    assert!(ok, "submit {args:?} failed: {stderr}");
    v["job_id"].as_str().expect("job_id").to_string()
}

/// Polls the job's status until `f` accepts it; panics naming `what` and the last status
/// after `limit`, or as soon as the job ends in a state `f` did not accept.
pub fn wait_status(
    coordinator: &str,
    id: &str,
    limit: Duration,
    what: &str,
    mut f: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = job_status(coordinator, id);
        if f(&s) {
            return s;
        }
        let state = s["state"].as_str().unwrap_or("");
        if matches!(state, "completed" | "failed" | "cancelled") {
            panic!("job {id} ended ({state}) while waiting for {what}: {s}");
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}: {s}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The kinds of a status's generation events, in order ("start", "lost", ...).
pub fn event_kinds(s: &serde_json::Value) -> Vec<String> {
    s["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["kind"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A job file of a 100-feature, 10-class synthetic problem (noise 4.0: about 74%
/// validation accuracy after 30 epochs, so accuracy comparisons are not trivially 1.0) and
/// a 64-64-10 MLP at global batch 64, with `workers` as the job file spells it (`3`, `{ min = 2, max = 3 }`).
pub fn mlp_job(
    dir: &Path,
    name: &str,
    workers: &str,
    samples: usize,
    epochs: u32,
    every_steps: u64,
) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
seed = 5
epochs = {epochs}
batch_size = 64
workers = {workers}

[data]
train = {{ format = "synthetic", samples = {samples}, features = 100, classes = 10, noise = 4.0 }}
validation_split = 0.1

[model]
input = 100
layers = [
  {{ dense = 64, activation = "relu" }},
  {{ dense = 64, activation = "relu" }},
  {{ dense = 10, activation = "softmax" }},
]

[train]
optimizer = {{ adam = {{ learning_rate = 0.001 }} }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]

[checkpoint]
every_steps = {every_steps}
keep = 3

[fault]
max_wait_secs = 30
max_restarts = 20
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Serializes the tests of one test binary: each starts a cluster of several processes,
/// and on a small machine two clusters at once would make each other's timings meaningless.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A temporary directory for a test's cluster, kept (and its path printed) when
/// `RINGTRAIN_KEEP_TEST_DIRS` is set, so the process logs in it can be read after a failure.
pub fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("RINGTRAIN_KEEP_TEST_DIRS").is_some() {
        eprintln!("test dir (kept): {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}
