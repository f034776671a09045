//! OpenTelemetry traces end to end: a real `serve`, two real `worker`s and a `submit`,
//! all exporting over OTLP/gRPC to a receiver in this test (opentelemetry-proto's
//! TraceService over tonic). One job's spans from every process form one trace: the
//! client's `submit` → the coordinator's `job` → `generation` → each worker's `step` →
//! its `compute`, `all_reduce` and `optimizer`; sampled steps only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, synthetic_job, wait_status, Proc};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};

/// Every export request the receiver got.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// One received span with its process's resource.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    instance: String,
    resource: BTreeMap<String, String>,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: BTreeMap<String, String>,
}

impl Got {
    fn int(&self, key: &str) -> i64 {
        self.attrs
            .get(key)
            .unwrap_or_else(|| panic!("span {} has no attribute {key}: {self:?}", self.name))
            .parse()
            .unwrap_or_else(|_| panic!("span {}: {key} is not an integer: {self:?}", self.name))
    }
}

fn flatten(attrs: &[KeyValue]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn spans(receiver: &Receiver) -> Vec<Got> {
    let mut out = Vec::new();
    for req in receiver.0.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let resource = flatten(
                rs.resource
                    .as_ref()
                    .map(|r| r.attributes.as_slice())
                    .unwrap_or(&[]),
            );
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push(Got {
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        instance: resource
                            .get("service.instance.id")
                            .cloned()
                            .unwrap_or_default(),
                        resource: resource.clone(),
                        name: s.name.clone(),
                        trace_id: s.trace_id.clone(),
                        span_id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attrs: flatten(&s.attributes),
                    });
                }
            }
        }
    }
    out
}

/// Starts `ringtrain ARGS` with `env` and returns it with its "listening on" address.
fn spawn_with_env(args: &[&str], env: &[(&str, &str)], log: &Path) -> (Proc, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .expect("start ringtrain");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}; log {}", log.display()))
        .to_string();
    (Proc(child), addr)
}

/// SIGTERM, then waits for a clean exit: the spans still buffered are flushed on the way
/// out, which is what a short job relies on.
fn terminate(p: &mut Proc, what: &str) {
    let pid = p.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "{what} exited with {status} after SIGTERM"
            );
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not exit within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_steps_spans_on_every_process_share_a_trace_and_unsampled_steps_have_none() {
    let _serial = common::serial();
    let dir = common::test_dir();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The default sampling, spelled out: steps 1-20, then 100, 200, ...
    let sampling = [
        "--otlp-endpoint",
        &endpoint,
        "--trace-first-steps",
        "20",
        "--trace-every-steps",
        "100",
    ];
    let data = dir.path().join("data");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--otlp-endpoint",
        &endpoint,
    ];
    let (mut serve, addr) = spawn_with_env(&args, &[], &dir.path().join("serve.log"));
    let coordinator = format!("http://{addr}");
    let mut workers = Vec::new();
    for name in ["a", "b"] {
        args = vec![
            "worker",
            "--coordinator",
            &coordinator,
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
        ];
        args.extend_from_slice(&sampling);
        let log = dir.path().join(format!("{name}.log"));
        workers.push(spawn_with_env(&args, &[], &log).0);
    }

    // 4000 samples at batch 32: 125 steps; rank 0 checkpoints at 50, 100 and the end.
    let job = synthetic_job(dir.path(), "traced", 4000, 1, 0.0, 50);
    let out = Command::new(bin())
        .args([
            "submit",
            "--json",
            "--coordinator",
            &coordinator,
            "--workers",
            "2",
        ])
        .args(["--otlp-endpoint", &endpoint])
        .arg(&job)
        // The SDK's own variables: the client names itself and adds an attribute.
        .env("OTEL_SERVICE_NAME", "ringtrain-test-client")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job_id = v["job_id"].as_str().unwrap().to_string();
    let status = wait_status(
        &coordinator,
        &job_id,
        Duration::from_secs(120),
        "the job to complete",
        |s| s["state"] == "completed",
    );
    assert_eq!(status["steps"], 125, "{status}");

    for (i, w) in workers.iter_mut().enumerate() {
        terminate(w, &format!("worker {i}"));
    }
    terminate(&mut serve, "serve");
    let got = spans(&receiver);
    assert!(!got.is_empty(), "the receiver got no spans");

    // The client's span, named by OTEL_SERVICE_NAME, with OTEL_RESOURCE_ATTRIBUTES.
    let submit: Vec<&Got> = got.iter().filter(|s| s.name == "submit").collect();
    assert_eq!(submit.len(), 1, "{submit:?}");
    let submit = submit[0];
    assert_eq!(submit.service, "ringtrain-test-client");
    assert_eq!(
        submit
            .resource
            .get("deployment.environment.name")
            .map(String::as_str),
        Some("ci")
    );
    let trace = submit.trace_id.clone();

    // The coordinator: `job` under the client's `submit`, `generation` under `job`.
    let coord: Vec<&Got> = got
        .iter()
        .filter(|s| s.service == "ringtrain-coordinator")
        .collect();
    let job_span = coord
        .iter()
        .find(|s| s.name == "job")
        .unwrap_or_else(|| panic!("no job span from the coordinator: {coord:?}"));
    assert!(job_span.instance.contains("(pid "), "{job_span:?}");
    assert_eq!(job_span.attrs.get("job"), Some(&job_id));
    assert_eq!(
        job_span.attrs.get("state").map(String::as_str),
        Some("completed")
    );
    assert_eq!(
        job_span.trace_id, trace,
        "the job is not in the client's trace"
    );
    assert_eq!(
        job_span.parent, submit.span_id,
        "the job's parent is not the submit"
    );
    let generations: Vec<&Got> = coord
        .iter()
        .copied()
        .filter(|s| s.name == "generation")
        .collect();
    assert_eq!(generations.len(), 1, "{generations:?}");
    let generation = generations[0];
    assert_eq!(generation.trace_id, trace);
    assert_eq!(generation.parent, job_span.span_id);
    assert_eq!(generation.int("world"), 2);

    // Two workers, each with its own instance id (the id the coordinator gave it).
    let worker_spans: Vec<&Got> = got
        .iter()
        .filter(|s| s.service == "ringtrain-worker")
        .collect();
    let instances: BTreeSet<&str> = worker_spans.iter().map(|s| s.instance.as_str()).collect();
    assert_eq!(instances.len(), 2, "worker instance ids: {instances:?}");
    assert!(
        instances.iter().all(|i| i.starts_with("w-")),
        "{instances:?}"
    );

    // Every step span is a child of the coordinator's generation span, in its trace, and
    // only sampled steps have one: 1..=20 and 100 on each worker (125 steps ran).
    let mut expected: BTreeSet<i64> = (1..=20).collect();
    expected.insert(100);
    for instance in &instances {
        let mine: Vec<&Got> = worker_spans
            .iter()
            .copied()
            .filter(|s| s.instance == *instance)
            .collect();
        let steps: Vec<&Got> = mine.iter().copied().filter(|s| s.name == "step").collect();
        let numbers: BTreeSet<i64> = steps.iter().map(|s| s.int("step")).collect();
        assert_eq!(numbers, expected, "worker {instance}: traced steps");
        assert_eq!(
            steps.len(),
            expected.len(),
            "worker {instance}: a step traced twice"
        );
        for s in &steps {
            assert_eq!(
                s.trace_id,
                trace,
                "worker {instance} step {}",
                s.int("step")
            );
            assert_eq!(
                s.parent,
                generation.span_id,
                "worker {instance} step {}",
                s.int("step")
            );
            assert_eq!(s.attrs.get("job"), Some(&job_id));
        }
        // Each traced step has exactly one compute, all_reduce and optimizer child; an
        // untraced step has none (no stage span without a step parent).
        let by_id: HashMap<&[u8], &Got> =
            steps.iter().map(|s| (s.span_id.as_slice(), *s)).collect();
        for stage in ["compute", "all_reduce", "optimizer"] {
            let stage_spans: Vec<&Got> = mine.iter().copied().filter(|s| s.name == stage).collect();
            assert_eq!(
                stage_spans.len(),
                expected.len(),
                "worker {instance}: {stage} spans"
            );
            let parents: BTreeSet<&[u8]> =
                stage_spans.iter().map(|s| s.parent.as_slice()).collect();
            assert_eq!(
                parents.len(),
                expected.len(),
                "worker {instance}: {stage} parents"
            );
            for s in &stage_spans {
                assert!(
                    by_id.contains_key(s.parent.as_slice()),
                    "worker {instance}: a {stage} span's parent is not one of its step spans: {s:?}"
                );
                assert_eq!(s.trace_id, trace);
            }
        }
        for ar in mine.iter().filter(|s| s.name == "all_reduce") {
            assert!(ar.int("bytes") > 0, "{ar:?}");
            assert_eq!(ar.int("world"), 2, "{ar:?}");
            assert!((0..2).contains(&ar.int("rank")), "{ar:?}");
            let wait: f64 = ar.attrs["wait_seconds"].parse().unwrap();
            assert!(wait >= 0.0, "{ar:?}");
        }
    }
    // One step (21 is the first one after the sampled start) on both workers: not traced.
    assert!(
        !worker_spans
            .iter()
            .any(|s| s.name == "step" && s.int("step") == 21),
        "step 21 was traced"
    );
    // Step 5's spans on both ranks: same trace, same parent, the two ranks.
    let step5: Vec<&Got> = worker_spans
        .iter()
        .copied()
        .filter(|s| s.name == "step" && s.int("step") == 5)
        .collect();
    let ranks: BTreeSet<i64> = step5.iter().map(|s| s.int("rank")).collect();
    assert_eq!(ranks, BTreeSet::from([0, 1]), "{step5:?}");

    // Checkpoints: rank 0's under the generation, the coordinator's write under rank 0's.
    let worker_ckpts: Vec<&Got> = worker_spans
        .iter()
        .copied()
        .filter(|s| s.name == "checkpoint")
        .collect();
    assert!(worker_ckpts.len() >= 3, "{worker_ckpts:?}");
    for c in &worker_ckpts {
        assert_eq!(c.parent, generation.span_id, "{c:?}");
        assert_eq!(c.trace_id, trace);
    }
    let coord_ckpts: Vec<&Got> = coord
        .iter()
        .copied()
        .filter(|s| s.name == "checkpoint")
        .collect();
    assert_eq!(coord_ckpts.len(), worker_ckpts.len(), "{coord_ckpts:?}");
    for c in &coord_ckpts {
        assert!(
            worker_ckpts.iter().any(|w| w.span_id == c.parent),
            "a coordinator checkpoint span's parent is not a worker's: {c:?}"
        );
    }
}
