//! The container way of configuring: every `serve`/`worker` flag also reads an env var,
//! `0.0.0.0` listens with a separate advertise address, and `RINGTRAIN_LOG_FORMAT=json`
//! gives one JSON object per log line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{bin, Proc};

#[test]
fn serve_reads_its_flags_from_env_and_logs_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-env");
    let mut child = Command::new(bin())
        .arg("serve")
        .env("RINGTRAIN_LISTEN", "0.0.0.0:0")
        .env("RINGTRAIN_DATA_DIR", &data)
        .env("RINGTRAIN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on 0.0.0.0:"), "{line:?}");
    let mut log = String::new();
    BufReader::new(stderr).read_line(&mut log).unwrap();
    let v: serde_json::Value = serde_json::from_str(&log)
        .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {log:?}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "coordinator listening", "{v}");
    assert_eq!(v["fields"]["data_dir"], data.display().to_string(), "{v}");
}

/// Starts `ringtrain worker` (its coordinator unreachable: only start-up is looked at)
/// on `0.0.0.0:0` with JSON logs and `env`; returns the `listening on` line it printed
/// and its JSON `worker started` log line.
fn start_worker(env: &[(&str, &str)]) -> (String, serde_json::Value) {
    let mut cmd = Command::new(bin());
    cmd.args(["worker", "--coordinator", "http://127.0.0.1:9"])
        .env("RINGTRAIN_LISTEN", "0.0.0.0:0")
        .env_remove("RINGTRAIN_ADVERTISE")
        .env("RINGTRAIN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let started = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .find(|v| v["fields"]["message"] == "worker started")
        .expect("a JSON 'worker started' line");
    (line, started)
}

#[test]
fn a_worker_on_all_interfaces_advertises_the_address_from_env() {
    let (line, started) = start_worker(&[
        ("RINGTRAIN_ADVERTISE", "127.0.0.1:4567"),
        ("RINGTRAIN_NAME", "pod-7"),
        // Boolean env vars take what shells and manifests write: 1/0, yes/no, true/false.
        ("RINGTRAIN_TCP_ONLY", "1"),
    ]);
    assert!(line.starts_with("listening on 0.0.0.0:"), "{line:?}");
    assert_eq!(
        started["fields"]["collective"], "127.0.0.1:4567",
        "{started}"
    );
}

#[test]
fn a_worker_on_all_interfaces_without_advertise_advertises_the_route_to_its_coordinator() {
    // No RINGTRAIN_ADVERTISE: a worker bound to 0.0.0.0 must not advertise 0.0.0.0 (every
    // peer would dial itself) but the address it reaches the coordinator from, here
    // loopback.
    let (line, started) = start_worker(&[]);
    let port = line
        .trim()
        .strip_prefix("listening on 0.0.0.0:")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    assert_eq!(
        started["fields"]["collective"],
        format!("127.0.0.1:{port}"),
        "{started}"
    );
    let data = started["fields"]["data"].as_str().unwrap_or_default();
    assert!(data.starts_with("127.0.0.1:"), "{started}");
}
