//! The coordinator's durable state in a real etcd: a `kill -9`ed coordinator restarted
//! with the same `--etcd` and `--data-dir` finds its running job and completes it, and a
//! standby takes over from a killed leader. Real processes on 127.0.0.1, a real etcd
//! server (started by the test; Debian's `etcd-server`, which `.ci/run` installs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/etcd.rs"]
mod etcd;

use std::path::Path;
use std::time::Duration;

use common::{run_json, spawn_listening, synthetic_job, wait_for, worker, Proc};

fn serve_etcd(data_dir: &Path, listen: &str, etcd: &str, prefix: &str) -> (Proc, String) {
    let (p, addr) = spawn_listening(&[
        "serve",
        "--listen",
        listen,
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--etcd",
        etcd,
        "--etcd-prefix",
        prefix,
        "--leader-ttl-secs",
        "2",
        "--collective-timeout-secs",
        "10",
    ]);
    (p, format!("http://{addr}"))
}

fn status(coord: &str, job: &str) -> Option<serde_json::Value> {
    let (ok, v, _) = run_json(&["status", "--coordinator", coord, job]);
    ok.then_some(v)
}

fn submit(coord: &str, job: &Path) -> String {
    let (ok, v, err) = run_json(&["submit", "--coordinator", coord, job.to_str().unwrap()]);
    assert!(ok, "submit failed: {err}");
    v["job_id"].as_str().unwrap().to_string()
}

/// Waits until the job has taken some steps (so the kill lands mid-training).
fn wait_running(coord: &str, job: &str, steps: u64) {
    wait_for(Duration::from_secs(60), "training to get going", || {
        status(coord, job)
            .filter(|s| s["state"] == "running" && s["steps"].as_u64().unwrap_or(0) >= steps)
    });
}

fn wait_done(coord: &str, job: &str) -> serde_json::Value {
    wait_for(Duration::from_secs(120), "the job to end", || {
        status(coord, job).filter(|s| {
            matches!(
                s["state"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
    })
}

fn assert_all_steps_accounted(s: &serde_json::Value) {
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["steps"], s["total_steps"], "{s}");
    assert_eq!(s["verified_steps"], s["steps"], "{s}");
}

#[test]
fn a_killed_coordinator_restarted_on_the_same_etcd_finishes_its_running_job() {
    let etcd = etcd::Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (coord, url) = serve_etcd(&data, "127.0.0.1:0", etcd.url(), "/restart");
    let listen = url.trim_start_matches("http://").to_string();
    let _w: Vec<Proc> = (0..3).map(|i| worker(&url, &format!("w{i}"))).collect();
    let job = synthetic_job(dir.path(), "durable", 20_000, 12, 0.0, 200);
    let id = submit(&url, &job);
    wait_running(&url, &id, 300);
    let before = status(&url, &id).unwrap();
    drop(coord); // kill -9: Child::kill sends SIGKILL
                 // The same address, etcd and data directory: the workers reattach by themselves.
    let (_coord, url2) = wait_for(Duration::from_secs(20), "the port to be free again", || {
        std::panic::catch_unwind(|| serve_etcd(&data, &listen, etcd.url(), "/restart")).ok()
    });
    assert_eq!(url2, url);
    let s = wait_done(&url, &id);
    assert_all_steps_accounted(&s);
    let events = s["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == "restarted"),
        "no restarted generation in {events:?}"
    );
    // It continued from where the workers were, not from scratch.
    let restarted = events.iter().find(|e| e["kind"] == "restarted").unwrap();
    assert!(
        restarted["step"].as_u64().unwrap() >= before["steps"].as_u64().unwrap(),
        "restarted from step {} but had reached {} before the kill",
        restarted["step"],
        before["steps"]
    );
}

#[test]
fn a_standby_takes_over_when_the_leader_is_killed() {
    let etcd = etcd::Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (leader, a) = serve_etcd(&data, "127.0.0.1:0", etcd.url(), "/standby");
    // The leader serves first; only then start the standby.
    wait_for(Duration::from_secs(20), "the leader to serve", || {
        run_json(&["jobs", "--coordinator", &a]).0.then_some(())
    });
    let (_standby, b) = serve_etcd(&data, "127.0.0.1:0", etcd.url(), "/standby");
    let (ok, _, err) = run_json(&["jobs", "--coordinator", &b]);
    assert!(!ok, "a standby answered");
    assert!(err.contains("standby"), "{err}");
    let both = format!("{a},{b}");
    let _w: Vec<Proc> = (0..3).map(|i| worker(&both, &format!("w{i}"))).collect();
    let job = synthetic_job(dir.path(), "failover", 20_000, 12, 0.0, 200);
    let id = submit(&a, &job);
    wait_running(&a, &id, 300);
    let killed = std::time::Instant::now();
    drop(leader);
    // The standby serves within the lease TTL (2 s here) plus a retry.
    wait_for(Duration::from_secs(15), "the standby to serve", || {
        status(&b, &id)
    });
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(8), "takeover took {took:?}");
    let s = wait_done(&b, &id);
    assert_all_steps_accounted(&s);
}
