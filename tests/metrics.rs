//! Prometheus `/metrics` on `serve` and `worker` (`--metrics-listen`), scraped from real
//! processes during and after a two-worker job. Every page is read strictly (every line a
//! comment, HELP/TYPE, or a sample with a valid float, every sample's family typed, the
//! histograms consistent) and, when Python's `prometheus_client` is installed (CI
//! installs it), also by its parser. A DP-SGD job adds the epsilon it has spent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/prom_text.rs"]
mod prom_text;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, job_status, run_json, serial, submit, test_dir, wait_for, worker, Proc};
use prom_text::Page;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Starts `ringtrain ARGS` (with `envs`) and returns it with the addresses of its
/// "listening on ADDR" and "metrics listening on ADDR" lines.
fn spawn_with_metrics(args: &[&str], envs: &[(&str, &str)]) -> (Proc, String, String) {
    let mut child = Command::new(bin())
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringtrain");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = |prefix: &str| {
        let mut l = String::new();
        out.read_line(&mut l).expect("read a line");
        l.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, got {l:?}"))
            .to_string()
    };
    let addr = line("listening on ");
    let metrics = line("metrics listening on ");
    (Proc(child), addr, metrics)
}

/// One HTTP/1.1 request to `addr`: (status code, headers, body).
/// `ringtrain serve` on ephemeral ports with `--metrics-listen`: the process, its gRPC
/// address and its metrics address.
fn serve_with_metrics(data: &std::path::Path) -> (Proc, String, String) {
    spawn_with_metrics(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
}

fn http(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, head.to_string(), body.to_string())
}

/// Whether Python's `prometheus_client` can be imported here.
fn python_prometheus() -> bool {
    Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Parses `page` with `prometheus_client.parser.text_string_to_metric_families`; returns
/// "name type" per family.
fn python_families(page: &str) -> Vec<String> {
    let script = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as f\nfor m in f(sys.stdin.read()):\n    assert m.samples or m.type == 'gauge', m\n    print(m.name, m.type)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the page: {}\n{page}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Scrapes `/metrics` at `addr` and reads it strictly (and with Python when `python`).
fn scrape(addr: &str, python: bool) -> Page {
    let (code, head, body) = http(addr, "GET", "/metrics");
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\ncontent-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let page = prom_text::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    for family in page.types.keys() {
        assert!(
            body.contains(&format!("# HELP {family} ")),
            "{family} has no HELP:\n{body}"
        );
    }
    if python {
        let families = python_families(&body);
        assert_eq!(families.len(), page.types.len(), "{families:?}\n{body}");
    }
    page
}

const WORKER_FAMILIES: [(&str, &str); 6] = [
    ("ringtrain_steps_total", "counter"),
    ("ringtrain_samples_total", "counter"),
    ("ringtrain_step_seconds", "histogram"),
    ("ringtrain_allreduce_bytes_total", "counter"),
    ("ringtrain_allreduce_seconds", "histogram"),
    ("ringtrain_generation", "gauge"),
];

const JOB_STATES: [&str; 6] = [
    "submitted",
    "waiting",
    "running",
    "completed",
    "failed",
    "cancelled",
];

fn jobs(page: &Page, state: &str) -> f64 {
    page.value("ringtrain_jobs", &[("state", state)])
}

fn workers(page: &Page, state: &str) -> f64 {
    page.value("ringtrain_workers", &[("state", state)])
}

#[test]
fn metrics_follow_a_two_worker_job_on_the_coordinator_and_each_worker() {
    let _serial = serial();
    let dir = test_dir();
    let python = python_prometheus();
    if !python {
        eprintln!(
            "NOTE: python3 cannot import prometheus_client; pages are read by the strict \
             reader only (`pip install prometheus-client` adds the second check)"
        );
    }
    let data = dir.path().join("data");
    let (_c, addr, coord_metrics) = serve_with_metrics(&data);
    let coord = format!("http://{addr}");
    // The workers take the address from the environment, as a container would.
    let mut ws = Vec::new();
    for name in ["m0", "m1"] {
        let (p, _, m) = spawn_with_metrics(
            &[
                "worker",
                "--coordinator",
                &coord,
                "--listen",
                "127.0.0.1:0",
                "--name",
                name,
            ],
            &[("RINGTRAIN_METRICS_LISTEN", "127.0.0.1:0")],
        );
        ws.push((p, m));
    }

    // Before any job: every job state present at zero, both workers idle, and a fresh
    // worker's counters at zero.
    let page = wait_for(Duration::from_secs(20), "both workers idle", || {
        let p = scrape(&coord_metrics, python);
        (workers(&p, "idle") == 2.0).then_some(p)
    });
    for state in JOB_STATES {
        assert_eq!(jobs(&page, state), 0.0, "{state}");
    }
    assert_eq!(workers(&page, "busy"), 0.0);
    assert_eq!(page.value("ringtrain_leader", &[]), 1.0);
    assert!(page.all("ringtrain_generation").is_empty());
    for (_, m) in &ws {
        let p = scrape(m, python);
        for (family, kind) in WORKER_FAMILIES {
            assert_eq!(
                p.types.get(family).map(String::as_str),
                Some(kind),
                "{family}"
            );
        }
        assert_eq!(p.value("ringtrain_steps_total", &[]), 0.0);
        assert_eq!(p.value("ringtrain_step_seconds_count", &[]), 0.0);
    }
    // Only /metrics is served.
    assert_eq!(http(&coord_metrics, "GET", "/").0, 404);
    assert_eq!(http(&ws[0].1, "GET", "/metric").0, 404);
    assert_eq!(http(&ws[0].1, "POST", "/metrics").0, 405);

    // 200 steps an epoch of a 100-1024-1024-10 MLP (1.16 M parameters): a few ms a step
    // even on a fast machine, so the job runs long enough to be scraped while it runs.
    let epochs = 3u32;
    let steps_per_epoch = 200u32;
    let job = wide_job(dir.path(), epochs, steps_per_epoch * 64);
    let total_steps = f64::from(epochs * steps_per_epoch);
    let id = submit(&coord, &[job.to_str().unwrap()]);

    // While it runs: the coordinator counts it running on two busy workers.
    let page = wait_for(
        Duration::from_secs(60),
        "the job running on the coordinator",
        || {
            let p = scrape(&coord_metrics, python);
            (jobs(&p, "running") == 1.0).then_some(p)
        },
    );
    assert_eq!(workers(&page, "busy"), 2.0, "{:?}", page.samples);
    assert_eq!(workers(&page, "idle"), 0.0);
    assert!(
        page.all("ringtrain_epsilon_spent").is_empty(),
        "a job without [privacy] has no epsilon"
    );
    assert_eq!(jobs(&page, "submitted") + jobs(&page, "waiting"), 0.0);
    assert_eq!(
        page.value(
            "ringtrain_generation",
            &[("job", &id), ("name", "metrics wide")]
        ),
        1.0
    );
    // ... and each worker's steps counter grows between two scrapes before the last step.
    for (_, m) in &ws {
        let first = wait_for(Duration::from_secs(60), "a first step", || {
            let v = scrape(m, python).value("ringtrain_steps_total", &[]);
            (v > 0.0).then_some(v)
        });
        assert!(
            first < total_steps,
            "the job was over ({first} steps) before its second scrape: the test needs a longer job"
        );
        let grown = wait_for(Duration::from_secs(60), "the steps counter to grow", || {
            let p = scrape(m, python);
            (p.value("ringtrain_steps_total", &[]) > first).then_some(p)
        });
        let steps = grown.value("ringtrain_steps_total", &[]);
        // A scrape may land between a step's time being observed and its count: one
        // apart at most, never more steps than observations.
        let observed = grown.value("ringtrain_step_seconds_count", &[]);
        assert!(
            observed >= steps && observed <= steps + 1.0,
            "{observed} vs {steps}"
        );
        assert!(grown.value("ringtrain_samples_total", &[]) > 0.0);
        assert!(grown.value("ringtrain_allreduce_bytes_total", &[]) > 0.0);
        assert_eq!(grown.value("ringtrain_generation", &[]), 1.0);
    }

    // After the job: the coordinator counts it completed and its workers idle again.
    let page = wait_for(
        Duration::from_secs(180),
        "ringtrain_jobs{state=\"completed\"} 1",
        || {
            let p = scrape(&coord_metrics, python);
            (jobs(&p, "completed") == 1.0).then_some(p)
        },
    );
    for state in JOB_STATES.iter().filter(|s| **s != "completed") {
        assert_eq!(jobs(&page, state), 0.0, "{state}");
    }
    assert!(
        page.all("ringtrain_generation").is_empty(),
        "an ended job keeps no generation series"
    );
    wait_for(Duration::from_secs(10), "both workers idle again", || {
        let p = scrape(&coord_metrics, python);
        (workers(&p, "idle") == 2.0 && workers(&p, "busy") == 0.0).then_some(())
    });
    let s = job_status(&coord, &id);
    assert_eq!(s["steps"].as_f64().unwrap(), total_steps, "{s}");
    let params = (100 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10);
    let mut samples = 0.0;
    for (_, m) in &ws {
        let p = scrape(m, python);
        // Each worker takes part in every step of a one-generation job.
        assert_eq!(p.value("ringtrain_steps_total", &[]), total_steps);
        assert_eq!(p.value("ringtrain_step_seconds_count", &[]), total_steps);
        assert!(p.value("ringtrain_step_seconds_sum", &[]) > 0.0);
        // Every step all-reduces at least the gradient (f32); evaluations add more.
        let reduced = p.value("ringtrain_allreduce_seconds_count", &[]);
        assert!(
            reduced >= total_steps,
            "{reduced} all-reduces for {total_steps} steps"
        );
        let bytes = p.value("ringtrain_allreduce_bytes_total", &[]);
        assert!(bytes >= total_steps * (params * 4) as f64, "{bytes} bytes");
        assert_eq!(
            p.value("ringtrain_generation", &[]),
            s["generation"].as_f64().unwrap()
        );
        samples += p.value("ringtrain_samples_total", &[]);
    }
    // The workers' rows add up to every training example once per epoch.
    assert_eq!(samples, f64::from(epochs * steps_per_epoch * 64));
}

/// A job file of `samples` synthetic rows (no validation split) and a wide MLP, on two
/// workers at global batch 64.
fn wide_job(dir: &std::path::Path, epochs: u32, samples: u32) -> std::path::PathBuf {
    let text = format!(
        r#"name = "metrics wide"
seed = 5
epochs = {epochs}
batch_size = 64
workers = 2

[data]
train = {{ format = "synthetic", samples = {samples}, features = 100, classes = 10, noise = 4.0 }}

[model]
input = 100
layers = [
  {{ dense = 1024, activation = "relu" }},
  {{ dense = 1024, activation = "relu" }},
  {{ dense = 10, activation = "softmax" }},
]

[train]
optimizer = {{ adam = {{ learning_rate = 0.001 }} }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
"#
    );
    let path = dir.join("wide.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The status `addr` reports for the whole server (""), or the error text.
fn health(addr: &str) -> Result<ServingStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest { service: "".into() })
            .await
            .map_err(|s| s.to_string())?;
        Ok(r.into_inner().status())
    })
}

#[test]
fn health_checks_report_serving_with_metrics_on() {
    let _serial = serial();
    let dir = test_dir();
    let data = dir.path().join("data");
    let (_c, addr, coord_metrics) = spawn_with_metrics(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("RINGTRAIN_METRICS_LISTEN", "127.0.0.1:0")],
    );
    let (_w, worker_addr, worker_metrics) = spawn_with_metrics(
        &[
            "worker",
            "--coordinator",
            &format!("http://{addr}"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    wait_for(
        Duration::from_secs(10),
        "the coordinator to be SERVING",
        || (health(&addr) == Ok(ServingStatus::Serving)).then_some(()),
    );
    wait_for(Duration::from_secs(20), "the worker to be SERVING", || {
        (health(&worker_addr) == Ok(ServingStatus::Serving)).then_some(())
    });
    assert_eq!(http(&coord_metrics, "GET", "/metrics").0, 200);
    assert_eq!(http(&worker_metrics, "HEAD", "/metrics").0, 200);
}

#[test]
fn a_taken_metrics_port_is_an_error_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = test_dir();
    for role in [vec!["serve", "--listen", "127.0.0.1:0"], vec!["worker"]] {
        let out = Command::new(bin())
            .args(&role)
            .args(["--metrics-listen", &port])
            .env("RINGTRAIN_DATA_DIR", dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role:?} started on a taken port");
        assert!(
            stderr.contains("--metrics-listen (RINGTRAIN_METRICS_LISTEN)")
                && stderr.contains(&port),
            "{role:?}: {stderr}"
        );
    }
}

/// `ringtrain privacy epsilon` (RDP) after `steps` steps at σ = 1, the given q, δ = 1e-5.
fn rdp_epsilon(q: f64, steps: u64) -> f64 {
    let (ok, v, stderr) = run_json(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "1",
        "--sample-rate",
        &q.to_string(),
        "--steps",
        &steps.to_string(),
        "--delta",
        "1e-5",
        "--accountant",
        "rdp",
    ]);
    assert!(ok, "{stderr}");
    v["epsilon"].as_f64().unwrap()
}

#[test]
fn a_dp_job_exports_the_epsilon_it_has_spent() {
    let _serial = serial();
    let dir = test_dir();
    let python = python_prometheus();
    let data = dir.path().join("data");
    let (_c, addr, coord_metrics) = serve_with_metrics(&data);
    let coord = format!("http://{addr}");
    let _ws: Vec<Proc> = ["e0", "e1"].iter().map(|n| worker(&coord, n)).collect();
    // 100 Poisson steps an epoch (q = 64 / 6400) of the wide MLP: long enough to be
    // scraped between epochs.
    let (epochs, spe, q) = (6u64, 100u64, 0.01);
    let plain = wide_job(dir.path(), epochs as u32, 6400);
    let text = std::fs::read_to_string(&plain).unwrap()
        + "\n[privacy]\nnoise_multiplier = 1.0\ndelta = 1e-5\nmax_grad_norm = 1.0\n\
           accountant = \"rdp\"\n";
    let job = dir.path().join("wide-dp.toml");
    std::fs::write(&job, text).unwrap();
    let id = submit(&coord, &[job.to_str().unwrap()]);
    let labels = [("job", id.as_str()), ("name", "metrics wide")];
    // While it runs: after an epoch, exactly the accountant's epsilon for a whole number
    // of epochs.
    let spent = wait_for(Duration::from_secs(120), "a spent epsilon", || {
        let p = scrape(&coord_metrics, python);
        let v = p
            .all("ringtrain_epsilon_spent")
            .iter()
            .find(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, w)| l.iter().any(|(lk, lv)| lk == k && lv == w))
            })
            .map(|(_, v)| *v)?;
        (jobs(&p, "running") == 1.0 && v > 0.0).then_some(v)
    });
    let epoch_ends: Vec<f64> = (1..=epochs).map(|e| rdp_epsilon(q, e * spe)).collect();
    assert!(
        epoch_ends.contains(&spent),
        "{spent} is not the epsilon at any epoch's end: {epoch_ends:?}"
    );
    // After it: the series is gone, and the status holds the whole run's epsilon.
    let page = wait_for(Duration::from_secs(180), "the job completed", || {
        let p = scrape(&coord_metrics, python);
        (jobs(&p, "completed") == 1.0).then_some(p)
    });
    assert!(page.all("ringtrain_epsilon_spent").is_empty());
    let s = job_status(&coord, &id);
    assert_eq!(
        s["privacy"]["epsilon"].as_f64().unwrap(),
        epoch_ends[epoch_ends.len() - 1],
        "{s}"
    );
}
