//! Human and JSON output of the CLI: the progress line on stderr and final results.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ringtrain_proto::v1::{JobStatus, Metrics};
use serde_json::{json, Value};

/// Redraws at most this often.
const REDRAW: Duration = Duration::from_millis(200);

/// A one-line progress display on stderr (a line per epoch when stderr is not a TTY).
pub struct Progress {
    tty: bool,
    last_draw: Option<Instant>,
    epochs_shown: usize,
    state: String,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last_draw: None,
            epochs_shown: 0,
            state: String::new(),
        }
    }

    pub fn update(&mut self, s: &JobStatus) {
        let mut err = std::io::stderr().lock();
        if s.state != self.state {
            if self.tty && self.last_draw.is_some() {
                let _ = writeln!(err);
            }
            let _ = writeln!(err, "job {} ({}): {}", s.job_id, s.name, s.state);
            self.state = s.state.clone();
        }
        for h in s.history.iter().skip(self.epochs_shown) {
            if self.tty {
                let _ = write!(err, "\r\x1b[2K");
            }
            // loss first, then train metrics, then validation ones, each alphabetically.
            let mut keys: Vec<&String> = h.metrics.keys().collect();
            keys.sort_by_key(|k| {
                (
                    k.starts_with("val_"),
                    k.trim_start_matches("val_") != "loss",
                    k.as_str(),
                )
            });
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{k} {:.4}", h.metrics[*k]))
                .collect();
            let _ = writeln!(
                err,
                "epoch {}/{} - {:.1}s - {} - {:.0} samples/s",
                h.epoch,
                s.epochs,
                h.seconds,
                parts.join(" - "),
                h.samples_per_sec
            );
        }
        self.epochs_shown = s.history.len();
        if self.tty && s.state == "running" && self.last_draw.is_none_or(|t| t.elapsed() >= REDRAW)
        {
            let m = s.metrics.clone().unwrap_or_default();
            let frac = if s.total_steps > 0 {
                s.step as f64 / s.total_steps as f64
            } else {
                0.0
            };
            let width = 24;
            let filled = (frac * width as f64).round() as usize;
            let _ = write!(
                err,
                "\r\x1b[2Kepoch {}/{} [{}{}] step {}/{} loss {:.4} accuracy {:.4}",
                (s.epoch + 1).min(s.epochs),
                s.epochs,
                "#".repeat(filled),
                "-".repeat(width - filled.min(width)),
                s.step,
                s.total_steps,
                m.loss.unwrap_or(f64::NAN),
                m.accuracy.unwrap_or(f64::NAN),
            );
            self.last_draw = Some(Instant::now());
        }
        let _ = err.flush();
    }

    pub fn finish(&mut self, _s: &JobStatus) {
        if self.tty && self.last_draw.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

fn metrics_json(m: &Metrics) -> Value {
    let mut o = serde_json::Map::new();
    for (k, v) in [
        ("loss", m.loss),
        ("accuracy", m.accuracy),
        ("val_loss", m.val_loss),
        ("val_accuracy", m.val_accuracy),
        ("test_loss", m.test_loss),
        ("test_accuracy", m.test_accuracy),
    ] {
        if let Some(v) = v {
            o.insert(k.into(), json!(v));
        }
    }
    for (k, v) in &m.other {
        o.insert(k.clone(), json!(v));
    }
    Value::Object(o)
}

/// The JSON object of a job's status.
pub fn status_json(s: &JobStatus) -> Value {
    let mut v = json!({
        "job_id": s.job_id,
        "name": s.name,
        "state": s.state,
        "workers": s.workers,
        "worker_ids": s.worker_ids,
        "epochs": s.epochs,
        "epoch": s.epoch,
        "steps": s.step,
        "total_steps": s.total_steps,
        "generation": s.generation,
        "verified_steps": s.verified_steps,
        "metrics": metrics_json(&s.metrics.clone().unwrap_or_default()),
        "samples_per_sec": s.samples_per_sec,
        "out_dir": s.out_dir,
    });
    if s.stopped_epoch > 0 {
        v["stopped_epoch"] = json!(s.stopped_epoch);
    }
    if !s.error.is_empty() {
        v["error"] = json!(s.error);
    }
    if s.workers_min != s.workers_max {
        v["workers_min"] = json!(s.workers_min);
        v["workers_max"] = json!(s.workers_max);
    }
    v["events"] = s
        .events
        .iter()
        .map(|e| {
            json!({
                "generation": e.generation,
                "kind": e.kind,
                "reason": e.reason,
                "step": e.step,
                "workers": e.workers,
            })
        })
        .collect();
    if !s.stalled.is_empty() {
        v["stalled"] = json!(s.stalled);
    }
    if let Some(p) = &s.privacy {
        v["privacy"] = privacy_json(p);
    }
    v
}

/// `"privacy"` of a DP job's status: the names are the interface scripts read.
pub(crate) fn privacy_json(p: &ringtrain_proto::v1::PrivacyStatus) -> Value {
    let mut o = json!({
        "epsilon": p.epsilon,
        "delta": p.delta,
        "noise_multiplier": p.noise_multiplier,
        "sample_rate": p.sample_rate,
        "steps": p.steps,
        "accountant": p.accountant,
        "max_grad_norm": p.max_grad_norm,
    });
    if p.max_epsilon > 0.0 {
        o["max_epsilon"] = json!(p.max_epsilon);
        o["stopped_at_max_epsilon"] = json!(p.stopped_at_max_epsilon);
    }
    if p.budget_steps > 0 {
        o["budget_steps"] = json!(p.budget_steps);
    }
    o
}

/// One line on a DP job's privacy, for people.
fn privacy_line(p: &ringtrain_proto::v1::PrivacyStatus) -> String {
    let mut line = format!(
        "privacy: epsilon {:.4} at delta {:e} after {} steps (noise multiplier {:.4}, sample rate {:.4}, clip {}, {})",
        p.epsilon, p.delta, p.steps, p.noise_multiplier, p.sample_rate, p.max_grad_norm, p.accountant
    );
    if p.stopped_at_max_epsilon {
        line.push_str(&format!(
            "; stopped at max_epsilon {}: one more step would pass it",
            p.max_epsilon
        ));
    }
    line
}

/// Prints a job's final result.
pub fn print_result(s: &JobStatus, json: bool) {
    if json {
        println!("{}", status_json(s));
        return;
    }
    let m = s.metrics.clone().unwrap_or_default();
    println!(
        "job {} {}: {} steps on {} workers",
        s.job_id, s.state, s.step, s.workers
    );
    let fmt = |name: &str, v: Option<f64>| v.map(|v| format!("{name} {v:.4}")).unwrap_or_default();
    let parts: Vec<String> = [
        fmt("loss", m.loss),
        fmt("accuracy", m.accuracy),
        fmt("val_loss", m.val_loss),
        fmt("val_accuracy", m.val_accuracy),
        fmt("test_accuracy", m.test_accuracy),
    ]
    .into_iter()
    .filter(|p| !p.is_empty())
    .collect();
    if !parts.is_empty() {
        println!("  {}", parts.join("  "));
    }
    if s.samples_per_sec > 0.0 {
        println!("  {:.0} samples/s", s.samples_per_sec);
    }
    if let Some(p) = &s.privacy {
        println!("  {}", privacy_line(p));
    }
    if !s.error.is_empty() {
        println!("  error: {}", s.error);
    }
    println!("  outputs: {}", s.out_dir);
}

/// Prints a status (for `status` and `cancel`).
pub fn print_status(s: &JobStatus, json: bool) {
    if json {
        println!("{}", status_json(s));
        return;
    }
    let m = s.metrics.clone().unwrap_or_default();
    println!(
        "{} {} {} epoch {}/{} step {}/{} loss {} accuracy {}",
        s.job_id,
        s.name,
        s.state,
        s.epoch,
        s.epochs,
        s.step,
        s.total_steps,
        m.loss.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        m.accuracy.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
    );
    if let Some(p) = &s.privacy {
        println!("  {}", privacy_line(p));
    }
    if !s.error.is_empty() {
        println!("  error: {}", s.error);
    }
}

/// Prints the job list.
pub fn print_jobs(jobs: &[JobStatus], json: bool) {
    if json {
        println!(
            "{}",
            json!({ "jobs": jobs.iter().map(status_json).collect::<Vec<_>>() })
        );
        return;
    }
    for s in jobs {
        print_status(s, false);
    }
}

/// One line on stderr per dataset file a submit handled (stdout keeps only the job id,
/// for scripts).
pub fn print_upload(u: &ringtrain_coordinator::upload::Uploaded) {
    let size = ringtrain_coordinator::config::format_bytes(u.bytes);
    let short = u.sha256.get(..12).unwrap_or(&u.sha256);
    if u.already_on_coordinator {
        eprintln!(
            "{}: {} ({size}, sha256 {short}…) already on the coordinator, not sent",
            u.field, u.path
        );
    } else {
        eprintln!("{}: uploaded {} ({size}, sha256 {short}…)", u.field, u.path);
    }
}

/// 0 when the job completed, 1 otherwise.
pub fn exit_code(s: &JobStatus) -> ExitCode {
    if s.state == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
