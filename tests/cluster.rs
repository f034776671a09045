//! A cluster started by hand, as a user would: `serve`, three `worker`s, then
//! `submit`/`status`/`watch`/`cancel`/`jobs` against it. Also the failure path: a worker
//! killed mid-job fails the job, naming the worker and generation, and nothing hangs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

fn status(coord: &str, id: &str) -> serde_json::Value {
    let (ok, v, stderr) = run_json(&["status", "--coordinator", coord, id]);
    assert!(ok, "status failed: {stderr}");
    v
}

#[test]
fn submit_watch_cancel_then_the_workers_take_the_next_job() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, coord) = serve(&dir.path().join("data"));
    let _workers: Vec<Proc> = (0..3).map(|i| worker(&coord, &format!("w{i}"))).collect();

    // A long job, cancelled while running.
    let long = synthetic_job(dir.path(), "long", 60_000, 50, 0.0, 0);
    let (ok, v, stderr) = run_json(&["submit", "--coordinator", &coord, long.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let running = wait_for(Duration::from_secs(30), "the job to make progress", || {
        let s = status(&coord, &id);
        (s["state"] == "running" && s["steps"].as_u64().unwrap_or(0) > 20).then_some(s)
    });
    assert!(running["metrics"]["loss"].as_f64().is_some(), "{running}");
    let (ok, _, stderr) = run_json(&["cancel", "--coordinator", &coord, &id]);
    assert!(ok, "{stderr}");
    let cancelled_at = Instant::now();
    wait_for(Duration::from_secs(5), "the job to be cancelled", || {
        (status(&coord, &id)["state"] == "cancelled").then_some(())
    });
    assert!(cancelled_at.elapsed() < Duration::from_secs(5));
    let (ok, _, _) = run_json(&["watch", "--coordinator", &coord, &id]);
    assert!(!ok, "watch of a cancelled job must exit non-zero");

    // The same three workers run the next job to completion; watch follows it.
    let short = synthetic_job(dir.path(), "short", 2000, 2, 0.1, 0);
    let (ok, v, stderr) = run_json(&["submit", "--coordinator", &coord, short.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let id2 = v["job_id"].as_str().unwrap().to_string();
    let (ok, done, stderr) = run_json(&["watch", "--coordinator", &coord, &id2]);
    assert!(ok, "watch failed: {done} {stderr}");
    assert_eq!(done["state"], "completed");
    // Watch sends the history only when it grew; the CLI keeps the last one, so each
    // epoch's line appears exactly once.
    for epoch in ["epoch 1/2 ", "epoch 2/2 "] {
        assert_eq!(stderr.matches(epoch).count(), 1, "{epoch:?} in {stderr}");
    }
    assert_eq!(done["verified_steps"], done["steps"]);
    let out_dir = std::path::PathBuf::from(done["out_dir"].as_str().unwrap());
    assert!(out_dir.join("model.safetensors").is_file());

    let (ok, jobs, _) = run_json(&["jobs", "--coordinator", &coord]);
    assert!(ok);
    let states: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["cancelled", "completed"]);
}

#[test]
fn a_job_that_loses_a_worker_waits_then_fails_after_max_wait_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, coord) = serve(&dir.path().join("data"));
    let mut workers: Vec<(Proc, String)> = (0..3)
        .map(|i| worker_at(&coord, &format!("w{i}")))
        .collect();
    let long = synthetic_job(dir.path(), "victim", 60_000, 50, 0.0, 0);
    // Exactly three workers, and only three exist: after a loss the job must wait, and
    // give up after max_wait_secs.
    let mut text = std::fs::read_to_string(&long).unwrap();
    text.push_str("\n[fault]\nmax_wait_secs = 3\n");
    std::fs::write(&long, text).unwrap();
    let (ok, v, stderr) = run_json(&["submit", "--coordinator", &coord, long.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let id = v["job_id"].as_str().unwrap().to_string();
    wait_for(Duration::from_secs(30), "the job to make progress", || {
        (status(&coord, &id)["steps"].as_u64().unwrap_or(0) > 50).then_some(())
    });
    let running = status(&coord, &id);
    let ids: Vec<String> = running["worker_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{running}");
    let victim_addr = workers[1].1.clone();
    (workers[1].0).0.kill().unwrap();
    let killed_at = Instant::now();
    // Below its minimum the job waits (not failed) ...
    let waiting = wait_for(Duration::from_secs(10), "the job to wait", || {
        let s = status(&coord, &id);
        (s["state"] == "waiting").then_some(s)
    });
    assert_eq!(waiting["error"], serde_json::Value::Null, "{waiting}");
    // ... and fails once max_wait_secs has passed, naming the lost worker, its rank,
    // where it was and the generation.
    let failed = wait_for(Duration::from_secs(30), "the job to fail", || {
        let s = status(&coord, &id);
        (s["state"] == "failed").then_some(s)
    });
    assert!(killed_at.elapsed() >= Duration::from_secs(3));
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("max_wait_secs"), "{err}");
    let named = err
        .split_once("lost workers: worker ")
        .and_then(|(_, rest)| rest.split_once(" (rank "))
        .and_then(|(w, rest)| {
            let rank: usize = rest.split([',', ')']).next()?.parse().ok()?;
            Some((w.to_string(), rank))
        })
        .unwrap_or_else(|| panic!("the error should name the lost worker and rank: {err}"));
    assert_eq!(
        ids[named.1], named.0,
        "rank {} of generation 1 is {}, but the error names {}: {err}",
        named.1, ids[named.1], named.0
    );
    // The named worker is the one that was killed: the error carries its address.
    assert!(
        err.contains(&format!(
            "(rank {}, {victim_addr}) in generation 1",
            named.1
        )),
        "the error names another worker's address, not the killed one's ({victim_addr}): {err}"
    );
    // The coordinator keeps serving.
    let (ok, jobs, _) = run_json(&["jobs", "--coordinator", &coord]);
    assert!(ok && jobs["jobs"].as_array().unwrap().len() == 1);
}
