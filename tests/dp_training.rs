//! DP-SGD end to end: a job with a `[privacy]` section trains on real worker processes,
//! and every report (local --json, status --json, metrics.jsonl, model.json) carries
//! the epsilon that `ringtrain privacy epsilon` gives for the job's sigma, q and steps;
//! a resumed job continues the ledger (same epsilon, and with deterministic noise the
//! same bytes); max_epsilon stops a job and refuses a resume that would pass it; bad
//! `[privacy]` sections are refused naming the key; `bench train` runs a DP job and says
//! what it spent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// 4,000 synthetic rows, batch 100: q = 0.025, 40 Poisson steps an epoch.
const SAMPLES: usize = 4000;
const BATCH: usize = 100;

fn dp_job(dir: &Path, name: &str, epochs: u32, privacy: &str, every: u64) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
seed = 11
epochs = {epochs}
batch_size = {BATCH}
workers = 2

[data]
train = {{ format = "synthetic", samples = {SAMPLES}, features = 20, classes = 4, noise = 1.0 }}
test = {{ format = "synthetic", samples = 400, features = 20, classes = 4, noise = 1.0 }}

[model]
input = 20
layers = [
  {{ dense = 32, activation = "relu" }},
  {{ dropout = 0.1 }},
  {{ dense = 4, activation = "softmax" }},
]

[train]
optimizer = {{ adam = {{ learning_rate = 0.01 }} }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]

[privacy]
{privacy}

[checkpoint]
every_steps = {every}
keep = 10
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `ringtrain privacy epsilon` for the job's numbers.
fn cli_epsilon(sigma: f64, q: f64, steps: u64, delta: f64, accountant: &str) -> f64 {
    let (ok, v, stderr) = run_json(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        &sigma.to_string(),
        "--sample-rate",
        &q.to_string(),
        "--steps",
        &steps.to_string(),
        "--delta",
        &delta.to_string(),
        "--accountant",
        accountant,
    ]);
    assert!(ok, "{stderr}");
    v["epsilon"].as_f64().unwrap()
}

fn local_json(args: &[&str]) -> Value {
    let mut all = vec!["local"];
    all.extend_from_slice(args);
    let (ok, v, stderr) = run_json(&all);
    assert!(ok, "local failed: {stderr}");
    v
}

fn metrics_lines(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn model_card(run_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("model.json")).unwrap()).unwrap()
}

#[test]
fn every_report_carries_the_epsilon_of_the_accountant() {
    let _serial = serial();
    let dir = test_dir();
    let job = dp_job(
        dir.path(),
        "dp-report",
        3,
        "noise_multiplier = 1.1\ndelta = 1e-5\nmax_grad_norm = 1.0",
        0,
    );
    let out = dir.path().join("run");
    let s = local_json(&[job.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(s["state"], "completed", "{s}");
    let p = &s["privacy"];
    assert_eq!(p["noise_multiplier"], 1.1, "{s}");
    assert_eq!(p["sample_rate"], 0.025, "{s}");
    assert_eq!(p["steps"], 120, "{s}");
    assert_eq!(p["delta"], 1e-5, "{s}");
    assert_eq!(p["accountant"], "pld", "{s}");
    assert_eq!(p["max_grad_norm"], 1.0, "{s}");
    assert_eq!(s["steps"], 120, "{s}");
    let eps = p["epsilon"].as_f64().unwrap();
    let want = cli_epsilon(1.1, 0.025, 120, 1e-5, "pld");
    assert_eq!(eps, want, "the job's epsilon is not the accountant's");
    // Per epoch: metrics.jsonl (and so the curves) and the history.
    let lines = metrics_lines(&out);
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        let steps = 40 * (i as u64 + 1);
        assert_eq!(
            l["epsilon"].as_f64().unwrap(),
            cli_epsilon(1.1, 0.025, steps, 1e-5, "pld"),
            "epoch {}: {l}",
            i + 1
        );
    }
    let card = model_card(&out);
    assert_eq!(card["privacy"]["epsilon"].as_f64().unwrap(), want, "{card}");
    assert_eq!(card["privacy"]["steps"], 120, "{card}");
    // The model learned something through the noise (4 classes: chance is 0.25).
    let acc = s["metrics"]["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "test accuracy {acc}: {s}");
}

#[test]
fn a_target_epsilon_is_met_with_the_rdp_accountant_too() {
    let _serial = serial();
    let dir = test_dir();
    let job = dp_job(
        dir.path(),
        "dp-target",
        2,
        "target_epsilon = 2.0\ndelta = 1e-5\nmax_grad_norm = 0.5\naccountant = \"rdp\"",
        0,
    );
    let s = local_json(&[
        job.to_str().unwrap(),
        "--out",
        dir.path().join("r").to_str().unwrap(),
    ]);
    let p = &s["privacy"];
    let (eps, sigma) = (
        p["epsilon"].as_f64().unwrap(),
        p["noise_multiplier"].as_f64().unwrap(),
    );
    assert!(eps <= 2.0 && eps > 1.9, "{s}");
    assert_eq!(eps, cli_epsilon(sigma, 0.025, 80, 1e-5, "rdp"), "{s}");
}

/// Submits `job`, cancels it once it has a checkpoint past step 0, returns the run dir.
fn cancel_after_a_checkpoint(coord: &str, job: &Path) -> PathBuf {
    let id = submit(coord, &[job.to_str().unwrap()]);
    let s = wait_status(coord, &id, Duration::from_secs(30), "a run dir", |s| {
        s["out_dir"].as_str().is_some_and(|d| !d.is_empty())
    });
    let run_dir = PathBuf::from(s["out_dir"].as_str().unwrap());
    wait_status(coord, &id, Duration::from_secs(120), "a checkpoint", |_| {
        std::fs::read_dir(run_dir.join("checkpoints"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
            })
            .unwrap_or(false)
    });
    let (ok, _, stderr) = run_json(&["cancel", "--coordinator", coord, &id]);
    assert!(ok, "{stderr}");
    let s = wait_status(coord, &id, Duration::from_secs(20), "the cancel", |s| {
        s["state"] == "cancelled" || s["state"] == "completed"
    });
    assert_eq!(
        s["state"], "cancelled",
        "the job ended before the cancel: {s}"
    );
    run_dir
}

#[test]
fn a_resumed_dp_job_continues_the_ledger_and_with_deterministic_noise_the_bytes() {
    let _serial = serial();
    let dir = test_dir();
    let (_serve, coord, _log) = serve_logged(dir.path());
    let _workers: Vec<Proc> = (0..2)
        .map(|i| worker_logged(&coord, &format!("d{i}"), dir.path()).0)
        .collect();
    // Enough epochs that a cancel lands mid-run; a checkpoint every 40 steps.
    let privacy = "target_epsilon = 4.0\ndelta = 1e-5\nmax_grad_norm = 1.0\naccountant = \"rdp\"\ndeterministic_noise = true";
    let job = dp_job(dir.path(), "dp-resume", 60, privacy, 40);
    let run_dir = cancel_after_a_checkpoint(&coord, &job);
    let id = submit(&coord, &["--resume", run_dir.to_str().unwrap()]);
    let resumed = wait_status(
        &coord,
        &id,
        Duration::from_secs(300),
        "the resumed job",
        |s| s["state"] == "completed" || s["state"] == "failed",
    );
    assert_eq!(resumed["state"], "completed", "{resumed}");
    assert_eq!(resumed["events"][0]["kind"], "resumed", "{resumed}");
    let base_id = submit(&coord, &[job.to_str().unwrap()]);
    let base = wait_status(
        &coord,
        &base_id,
        Duration::from_secs(300),
        "the uninterrupted job",
        |s| s["state"] == "completed" || s["state"] == "failed",
    );
    assert_eq!(base["state"], "completed", "{base}");
    assert_eq!(
        resumed["privacy"], base["privacy"],
        "resumed vs uninterrupted"
    );
    assert_eq!(resumed["privacy"]["steps"], 2400);
    let base_dir = PathBuf::from(base["out_dir"].as_str().unwrap());
    assert!(
        std::fs::read(run_dir.join("model.safetensors")).unwrap()
            == std::fs::read(base_dir.join("model.safetensors")).unwrap(),
        "with deterministic noise a resumed DP job must end with the uninterrupted bytes"
    );
    // The ledger is in every checkpoint.
    let ck = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("meta.json")).unwrap()).unwrap();
    let ledger = &meta["resume"]["privacy_ledger"]["segments"];
    assert_eq!(ledger[0]["steps"], meta["step"], "{meta}");
}

#[test]
fn max_epsilon_stops_the_job_and_refuses_a_resume_past_it() {
    let _serial = serial();
    let dir = test_dir();
    let privacy = "noise_multiplier = 0.7\ndelta = 1e-5\nmax_grad_norm = 1.0\nmax_epsilon = 3.0\naccountant = \"rdp\"";
    let job = dp_job(dir.path(), "dp-budget", 10, privacy, 0);
    let out = dir.path().join("run");
    let s = local_json(&[job.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(s["state"], "completed", "{s}");
    let p = &s["privacy"];
    assert_eq!(p["stopped_at_max_epsilon"], true, "{s}");
    let steps = p["steps"].as_u64().unwrap();
    assert!(steps > 0 && steps < 400, "{s}");
    assert_eq!(s["steps"], steps, "{s}");
    let eps = p["epsilon"].as_f64().unwrap();
    assert!(eps <= 3.0, "{s}");
    assert!(cli_epsilon(0.7, 0.025, steps + 1, 1e-5, "rdp") > 3.0);
    // Human output says so too.
    let human = run(&[
        "local",
        job.to_str().unwrap(),
        "--out",
        dir.path().join("h").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("stopped at max_epsilon"), "{text}");
    // A resume asking for more epochs is refused: the budget is spent.
    let longer = dp_job(dir.path(), "dp-budget", 20, privacy, 0);
    let r = run(&[
        "local",
        "--resume",
        out.to_str().unwrap(),
        longer.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("privacy.max_epsilon"), "{err}");
}

#[test]
fn bad_privacy_sections_are_refused_naming_the_key() {
    let dir = test_dir();
    let cases = [
        (
            "target_epsilon = 3.0\nnoise_multiplier = 1.0\ndelta = 1e-5\nmax_grad_norm = 1.0",
            "privacy.noise_multiplier",
        ),
        (
            "noise_multiplier = 1.0\nmax_grad_norm = 1.0",
            "privacy.delta",
        ),
        (
            "noise_multiplier = 1.0\ndelta = 1e-5",
            "privacy.max_grad_norm",
        ),
        ("delta = 1e-5", "privacy.delta"),
        (
            "noise_multiplier = 1.0\ndelta = 0.5\nmax_grad_norm = 1.0",
            "privacy.delta",
        ),
        (
            "noise_multiplier = 1.0\ndelta = 1e-5\nmax_grad_norm = 1.0\naccountant = \"moments\"",
            "privacy.accountant",
        ),
        (
            "target_epsilon = 1e-9\ndelta = 1e-5\nmax_grad_norm = 1.0",
            "privacy.target_epsilon",
        ),
    ];
    for (i, (section, key)) in cases.iter().enumerate() {
        let job = dp_job(dir.path(), &format!("bad{i}"), 1, section, 0);
        let r = run(&[
            "local",
            job.to_str().unwrap(),
            "--out",
            dir.path().join(format!("o{i}")).to_str().unwrap(),
        ]);
        assert!(!r.status.success(), "{section}: accepted");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(key), "{section}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bench_train_accepts_a_dp_job_and_reports_its_privacy() {
    let _serial = serial();
    let dir = test_dir();
    let job = dp_job(
        dir.path(),
        "dp-bench",
        3,
        "noise_multiplier = 1.0\ndelta = 1e-5\nmax_grad_norm = 1.0\naccountant = \"rdp\"",
        0,
    );
    let (ok, v, stderr) = run_json(&[
        "bench",
        "train",
        "--workers",
        "2",
        "--steps",
        "25",
        job.to_str().unwrap(),
    ]);
    assert!(ok, "bench train failed: {stderr}");
    assert_eq!(v["steps"], 25, "{v}");
    assert!(v["samples_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    let p = &v["privacy"];
    assert_eq!(p["steps"], 25, "{v}");
    assert_eq!(p["sample_rate"], 0.025, "{v}");
    assert_eq!(p["accountant"], "rdp", "{v}");
    assert_eq!(
        p["epsilon"].as_f64().unwrap(),
        cli_epsilon(1.0, 0.025, 25, 1e-5, "rdp"),
        "{v}"
    );
}
