//! `ringtrain local` end to end: real worker processes, real gRPC, real files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use ringtrain_coordinator::checkpoint;

#[test]
fn three_workers_complete_and_every_step_is_verified_identical() {
    let dir = tempfile::tempdir().unwrap();
    let job = synthetic_job(dir.path(), "small", 3000, 2, 0.1, 40);
    let out = dir.path().join("run");
    let (ok, v, stderr) = run_json(&[
        "local",
        "--workers",
        "3",
        "--out",
        out.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    assert!(ok, "local failed: {v} {stderr}");
    assert_eq!(v["state"], "completed");
    assert_eq!(v["workers"], 3);
    // 2700 training samples / 32 = 85 steps per epoch.
    assert_eq!(v["steps"], 170);
    // The coordinator compared all three replicas' parameter hashes after every step.
    assert_eq!(v["verified_steps"], 170, "{v}");
    assert!(v["metrics"]["val_accuracy"].as_f64().unwrap() > 0.8, "{v}");
    for f in ["model.safetensors", "model.json", "metrics.jsonl"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in [
        "epoch",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "samples_per_sec",
        "seconds",
    ] {
        assert!(!first[k].is_null(), "metrics.jsonl lacks {k}: {first}");
    }
    // keep = 2: steps 160 and the final 170 remain, both verifiable.
    let ckpts: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(ckpts, ["step-0000000160", "step-0000000170-final"]);
    let last = checkpoint::load(&out.join("checkpoints/step-0000000170-final")).unwrap();
    assert_eq!(last.meta.step, 170);
    assert!(last.meta.final_);
}

fn final_params(out: &Path, step: u64) -> Vec<f32> {
    checkpoint::load(&out.join(format!("checkpoints/step-{step:010}-final")))
        .unwrap()
        .state
        .params
}

#[test]
fn one_and_three_workers_fed_the_same_batches_agree_after_50_steps() {
    let dir = tempfile::tempdir().unwrap();
    // 1600 samples, batch 32, no validation: exactly 50 steps. Plain SGD, which is not
    // scale-invariant: a ring that summed gradients instead of averaging them would take
    // 3x larger steps with 3 workers and fail this test (Adam would hide it).
    let job = synthetic_job(dir.path(), "fifty", 1600, 1, 0.0, 0);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "optimizer = { adam = { learning_rate = 0.001 } }",
        "optimizer = { sgd = { learning_rate = 0.05 } }",
    );
    assert!(text.contains("sgd"));
    std::fs::write(&job, text).unwrap();
    let mut params = Vec::new();
    for workers in ["1", "3"] {
        let out = dir.path().join(format!("run-{workers}"));
        let (ok, v, stderr) = run_json(&[
            "local",
            "--workers",
            workers,
            "--out",
            out.to_str().unwrap(),
            job.to_str().unwrap(),
        ]);
        assert!(ok && v["steps"] == 50, "{v} {stderr}");
        params.push(final_params(&out, 50));
    }
    let (a, b) = (&params[0], &params[1]);
    assert_eq!(a.len(), b.len());
    // Only the summation order of the gradient differs (one matmul over 32 rows vs three
    // partial sums added by the ring), so the runs agree to f32 rounding. Relative
    // difference of the parameter vectors:
    let (mut diff, mut norm, mut worst) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        diff += (x - y) * (x - y);
        norm += x * x;
        worst = worst.max((x - y).abs() / x.abs().max(y.abs()).max(1e-3));
    }
    let rel = (diff / norm).sqrt();
    assert!(rel <= 1e-5, "relative difference {rel}");
    // And element by element (relative, with a 1e-3 floor for near-zero weights).
    assert!(
        worst <= 1e-4,
        "largest element-wise relative difference {worst}"
    );
    assert_ne!(a, &vec![0f32; a.len()]);
}

fn job_text(mutate: impl FnOnce(String) -> String) -> String {
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/seed-mlp.toml"
    ))
    .unwrap();
    mutate(base)
}

fn expect_rejected(text: String, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, v, stderr) = run_json(&["local", "--workers", "1", path.to_str().unwrap()]);
    assert!(!ok, "a malformed job was accepted: {v}");
    let err = v["error"].as_str().unwrap_or_default().to_string();
    for n in needles {
        assert!(
            err.contains(n) && stderr.contains(n),
            "error {err:?} (stderr {stderr:?}) lacks {n:?}"
        );
    }
}

#[test]
fn malformed_job_files_name_the_field_and_exit_non_zero() {
    expect_rejected(
        job_text(|t| t.replace("epochs = 10", "epochs = 10\nlearning_rat = 0.1")),
        &["bad.toml", "learning_rat"],
    );
    expect_rejected(
        job_text(|t| t.replacen("activation = \"relu\"", "activation = \"relu6\"", 1)),
        &["model.layers[0].activation", "relu6", "expected one of"],
    );
    expect_rejected(
        job_text(|t| t.replace("input = 100", "input = 99")),
        &["model.input", "99", "100 features"],
    );
    expect_rejected(
        job_text(|t| {
            t.replace(
                r#"train = { format = "synthetic", samples = 60000, features = 100, classes = 10 }"#,
                r#"train = { format = "idx", images = "missing-images.gz", labels = "missing-labels.gz" }"#,
            )
        }),
        &["data.train.images", "file not found"],
    );
    expect_rejected(
        job_text(|t| t.replace("batch_size = 32 ", "batch_size = 0 ")),
        &["batch_size", "at least 1"],
    );
    // Parameters plus optimizer state that no worker can hold: refused at submit, before
    // any worker starts, naming the layer and the size.
    expect_rejected(
        job_text(|t| t.replacen("dense = 64", "dense = 4000000000", 1)),
        &["model.layers[0].dense", "660000000714 parameters", "TiB"],
    );
}

/// Workers on one host exchange ring data over Unix sockets, `--tcp-only` keeps them on
/// TCP, and the transport does not change a single byte of the trained model.
#[test]
fn same_host_workers_use_unix_sockets_and_tcp_only_gives_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let job = synthetic_job(dir.path(), "transport", 1200, 1, 0.0, 0);
    let mut models = Vec::new();
    for (name, tcp_only) in [("unix", false), ("tcp", true)] {
        let out = dir.path().join(name);
        let mut args = vec![
            "local",
            "--workers",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        if tcp_only {
            args.push("--tcp-only");
        }
        args.push(job.to_str().unwrap());
        let run = std::process::Command::new(bin())
            .args(&args)
            .env("RINGTRAIN_WORKER_LOG", "info")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{name}: {stderr}");
        let want = format!("same_host_socket={}", !tcp_only);
        assert_eq!(
            stderr.matches(&want).count(),
            2,
            "{name}: both ranks' links: {stderr}"
        );
        models.push(std::fs::read(out.join("model.safetensors")).unwrap());
    }
    assert!(
        models[0] == models[1],
        "the transport changed the trained parameters"
    );
}
