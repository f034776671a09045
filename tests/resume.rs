//! `--resume RUN_DIR` end to end: a cancelled run continued on the same cluster (and by
//! `ringtrain local`) ends with the same model bytes as an uninterrupted run; a corrupted
//! newest checkpoint is skipped for the one before; a changed job file is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// 27000 train + 3000 validation rows: 422 steps an epoch at batch 64, 20 epochs. A step
/// takes well under a millisecond, so checkpoints are 1000 steps apart for a test to see
/// the second one and cancel long before the job would end.
const SAMPLES: usize = 30_000;
const EPOCHS: u32 = 20;
const EVERY: u64 = 1000;

/// The run's checkpoints (`step-NNNNNNNNNN[-final]`), oldest first.
fn checkpoints(run_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn checkpoint_step(path: &Path) -> u64 {
    let name = path.file_name().unwrap().to_str().unwrap();
    name["step-".len()..]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Submits `job`, cancels it once its run directory holds `n` checkpoints, and returns
/// the run directory.
fn run_until_checkpoints(coord: &str, job: &Path, n: usize) -> PathBuf {
    let id = submit(coord, &[job.to_str().unwrap()]);
    let s = wait_status(
        coord,
        &id,
        Duration::from_secs(30),
        "the run directory",
        |s| s["out_dir"].as_str().is_some_and(|d| !d.is_empty()),
    );
    let run_dir = PathBuf::from(s["out_dir"].as_str().unwrap());
    wait_status(coord, &id, Duration::from_secs(60), "checkpoints", |_| {
        checkpoints(&run_dir).len() >= n
    });
    let (ok, _, stderr) = run_json(&["cancel", "--coordinator", coord, &id]);
    assert!(ok, "{stderr}");
    let s = wait_status(coord, &id, Duration::from_secs(10), "the cancel", |s| {
        s["state"] == "cancelled"
    });
    assert!(
        s["steps"].as_u64().unwrap() < s["total_steps"].as_u64().unwrap(),
        "the job ended before it was cancelled: {s}"
    );
    run_dir
}

fn wait_done(coord: &str, id: &str) -> serde_json::Value {
    let s = wait_status(coord, id, Duration::from_secs(60), "completion", |s| {
        s["state"] == "completed"
    });
    assert_eq!(s["steps"], s["total_steps"], "{s}");
    assert_eq!(s["verified_steps"], s["steps"], "{s}");
    s
}

fn resumed_event(s: &serde_json::Value) -> serde_json::Value {
    let events = s["events"].as_array().unwrap();
    assert_eq!(events[0]["kind"], "resumed", "{s}");
    events[0].clone()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn model_bytes(run_dir: &Path) -> Vec<u8> {
    let p = run_dir.join("model.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_cancelled_run_resumed_ends_with_the_bytes_of_an_uninterrupted_run() {
    let _serial = serial();
    let started = Instant::now();
    let dir = test_dir();
    let (_serve, coord, _log) = serve_logged(dir.path());
    let _workers: Vec<Proc> = (0..2)
        .map(|i| worker_logged(&coord, &format!("r{i}"), dir.path()).0)
        .collect();
    let job = mlp_job(dir.path(), "resume", "2", SAMPLES, EPOCHS, EVERY);

    let run_dir = run_until_checkpoints(&coord, &job, 2);
    let newest = checkpoint_step(checkpoints(&run_dir).last().unwrap());
    // A copy of the cancelled run for `ringtrain local --resume`, before the cluster
    // writes on into the original.
    let local_dir = dir.path().join("local-copy");
    copy_dir(&run_dir, &local_dir);

    let id = submit(&coord, &["--resume", run_dir.to_str().unwrap()]);
    let resumed = wait_done(&coord, &id);
    assert_eq!(resumed_event(&resumed)["step"], newest, "{resumed}");
    assert_eq!(resumed["out_dir"].as_str(), run_dir.to_str(), "{resumed}");

    let base_id = submit(&coord, &[job.to_str().unwrap()]);
    let base = wait_done(&coord, &base_id);
    assert_eq!(
        (resumed["workers"].as_u64(), base["workers"].as_u64()),
        (Some(2), Some(2))
    );
    let base_dir = PathBuf::from(base["out_dir"].as_str().unwrap());
    let want = model_bytes(&base_dir);
    assert!(
        model_bytes(&run_dir) == want,
        "the resumed model differs from the uninterrupted one (world size 2)"
    );

    // The same run continued by `ringtrain local`, with its own coordinator and workers.
    let out = run(&["local", "--resume", local_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "local --resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        model_bytes(&local_dir) == want,
        "the model of local --resume differs from the uninterrupted one (world size 2)"
    );
    eprintln!("resume: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn a_corrupted_newest_checkpoint_is_skipped_for_the_one_before() {
    let _serial = serial();
    let started = Instant::now();
    let dir = test_dir();
    let (_serve, coord, serve_log) = serve_logged(dir.path());
    let _workers: Vec<Proc> = (0..2)
        .map(|i| worker_logged(&coord, &format!("k{i}"), dir.path()).0)
        .collect();
    let job = mlp_job(dir.path(), "corrupt", "2", SAMPLES, EPOCHS, EVERY);
    let run_dir = run_until_checkpoints(&coord, &job, 2);
    let all = checkpoints(&run_dir);
    let (previous, newest) = (&all[all.len() - 2], &all[all.len() - 1]);
    // One bit of one parameter, past the safetensors header: the file still parses, only
    // the checksum can tell.
    let tensors = newest.join("state.safetensors");
    let mut bytes = std::fs::read(&tensors).unwrap();
    let at = bytes.len() - 17;
    bytes[at] ^= 0x01;
    std::fs::write(&tensors, bytes).unwrap();

    let id = submit(&coord, &["--resume", run_dir.to_str().unwrap()]);
    let done = wait_done(&coord, &id);
    assert_eq!(
        resumed_event(&done)["step"],
        checkpoint_step(previous),
        "resumed from the wrong checkpoint: {done}"
    );
    let warned = log_lines(&serve_log, "skipped a checkpoint that does not verify");
    assert_eq!(warned.len(), 1, "{warned:?}");
    let newest_name = newest.file_name().unwrap().to_str().unwrap();
    assert!(warned[0].contains(newest_name), "{warned:?}");
    eprintln!("corrupt: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn a_resume_refuses_a_changed_job_file_but_lets_epochs_grow() {
    let _serial = serial();
    let started = Instant::now();
    let dir = test_dir();
    let (_serve, coord, _log) = serve_logged(dir.path());
    let _workers: Vec<Proc> = (0..2)
        .map(|i| worker_logged(&coord, &format!("g{i}"), dir.path()).0)
        .collect();
    let job = mlp_job(dir.path(), "change", "2", SAMPLES, EPOCHS, EVERY);
    let run_dir = run_until_checkpoints(&coord, &job, 1);
    let text = std::fs::read_to_string(&job).unwrap();
    let edited = dir.path().join("edited");
    std::fs::create_dir_all(&edited).unwrap();

    let changed = edited.join("units.toml");
    std::fs::write(&changed, text.replacen("dense = 64", "dense = 32", 1)).unwrap();
    for cmd in [vec!["submit", "--coordinator", &coord], vec!["local"]] {
        let mut args = cmd.clone();
        args.extend([
            "--resume",
            run_dir.to_str().unwrap(),
            changed.to_str().unwrap(),
        ]);
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} accepted a changed layer");
        assert!(
            stderr.contains("model.layers[0].dense"),
            "{cmd:?} should name the field: {stderr}"
        );
    }
    let fewer = edited.join("fewer.toml");
    std::fs::write(&fewer, text.replacen("epochs = 20", "epochs = 19", 1)).unwrap();
    let out = run(&[
        "submit",
        "--coordinator",
        &coord,
        "--resume",
        run_dir.to_str().unwrap(),
        fewer.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "epochs shrank on a resume");
    assert!(String::from_utf8_lossy(&out.stderr).contains("epochs"));

    let grown = edited.join("grown.toml");
    std::fs::write(&grown, text.replacen("epochs = 20", "epochs = 21", 1)).unwrap();
    let id = submit(
        &coord,
        &[
            "--resume",
            run_dir.to_str().unwrap(),
            grown.to_str().unwrap(),
        ],
    );
    let done = wait_done(&coord, &id);
    assert_eq!(done["epochs"], 21, "{done}");
    assert_eq!(done["total_steps"], 21 * 422, "{done}");
    eprintln!("change: {:.1}s", started.elapsed().as_secs_f64());
}
