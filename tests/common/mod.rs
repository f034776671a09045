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
