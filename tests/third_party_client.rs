//! The job API as a client that is not ours sees it: Python grpcio stubs generated from
//! `proto/proto/ringtrain.proto` submit the seed job to a real coordinator with three
//! real workers and follow it with `Watch` (`tests/python/watch_client.py`). The stream
//! must end by itself after the job completes, its last message must be the full final
//! status, and it must stay small: about ten messages a second, not one per step.
//!
//! Needs `grpcio` and `grpcio-tools` for `python3` (`.ci/run` installs them); without
//! them the test fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const PYTHON_SETUP: &str =
    "run .ci/run, or `pip install grpcio grpcio-tools` (add --break-system-packages if pip refuses)";

/// Generates `ringtrain_pb2*.py` from the proto into `out`.
fn generate_stubs(repo: &Path, out: &Path) {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install Python 3, then {PYTHON_SETUP}")
        });
    assert!(
        probe.status.success(),
        "python3 cannot import grpc and grpc_tools: {PYTHON_SETUP}\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let proto_dir = repo.join("proto/proto");
    let out_arg = out.to_str().unwrap();
    let gen = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I", proto_dir.to_str().unwrap()])
        .arg(format!("--python_out={out_arg}"))
        .arg(format!("--grpc_python_out={out_arg}"))
        .arg(proto_dir.join("ringtrain.proto"))
        .output()
        .expect("run grpc_tools.protoc");
    assert!(
        gen.status.success(),
        "grpc_tools.protoc failed: {}",
        String::from_utf8_lossy(&gen.stderr)
    );
}

#[test]
fn a_python_grpc_client_watches_the_seed_job_to_its_end() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    generate_stubs(repo, &stubs);

    let (_serve, coord) = serve(&dir.path().join("data"));
    let _workers: Vec<Proc> = (0..3).map(|i| worker(&coord, &format!("w{i}"))).collect();

    let client = Command::new("python3")
        .arg(repo.join("tests/python/watch_client.py"))
        .args(["--stubs", stubs.to_str().unwrap()])
        .args(["--coordinator", coord.trim_start_matches("http://")])
        .arg("--job")
        .arg(repo.join("examples/seed-mlp.toml"))
        .args(["--end-grace", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the python client");
    // The client bounds its own run: a Watch deadline, and a cancel 10 s after the
    // terminal status if the stream has not ended by then.
    let out = client
        .wait_with_output()
        .expect("wait for the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("python client printed no JSON ({e}): {stdout}"));
    eprintln!("python watch of the seed job: {m}");

    // The stream ended by itself, promptly after the job completed.
    assert_eq!(m["ended"], true, "Watch did not end by itself: {m}");
    let after = m["seconds_after_terminal"].as_f64().unwrap();
    assert!(
        after < 10.0,
        "Watch ended {after:.1}s after completion: {m}"
    );

    // The last message is the whole final status: completed, every epoch's summary, and
    // identical to what Get returns.
    assert_eq!(m["last_state"], "completed", "{m}");
    let epochs = m["last_epochs"].as_u64().unwrap();
    assert_eq!(epochs, 10, "the seed job has 10 epochs: {m}");
    let expected: Vec<u64> = (1..=epochs).collect();
    assert_eq!(m["last_history_epochs"], serde_json::json!(expected), "{m}");
    assert_eq!(m["last_equals_get"], true, "{m}");

    // History travels only when it grew: at most the first message, one per epoch and
    // the final one carry it, and each carried history is longer than the one before it
    // (the final one may repeat the last epoch's).
    let lengths: Vec<u64> = m["history_lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(m["history_messages"].as_u64().unwrap() <= epochs + 2, "{m}");
    assert!(
        lengths.windows(2).all(|w| w[0] <= w[1]) && lengths.last() == Some(&epochs),
        "{m}"
    );

    // About ten messages a second, plus one per state, epoch and history change: a few
    // hundred at most for this job (about 150 when it trains in 11 s), where one per step
    // was 22,000 messages and 16 MB. The bound follows the watch's length so that a slow,
    // loaded machine does not fail a correct coalescer.
    let messages = m["messages"].as_u64().unwrap();
    let seconds = m["watch_seconds"].as_f64().unwrap();
    let bound = (seconds * 10.0).ceil() as u64 + 1 + 2 * epochs + 10;
    assert!(
        messages <= bound,
        "{messages} messages in {seconds:.1}s (at most {bound} expected): {m}"
    );
    let bytes = m["bytes"].as_u64().unwrap();
    assert!(
        bytes <= 200_000,
        "{bytes} bytes in {messages} messages: {m}"
    );
}
