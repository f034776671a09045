//! The Kubernetes manifests under `deploy/`, checked without a cluster (there is no API
//! server on our machines):
//!
//! - `deploy/validate.sh` renders base and both overlays and validates every document
//!   strictly against the pinned Kubernetes version's schemas;
//! - the dev overlay's containers are started as real processes on 127.0.0.1, with
//!   exactly the args and env the kubelet would give them (ConfigMap `envFrom`, downward
//!   API `fieldRef`, `$(VAR)` expansion), the pod IP as 127.0.0.1 and each pod's ports
//!   moved to free ones. The readiness and liveness probes written in the manifests are
//!   asked as the kubelet would ask them; the workers are resized 2 → 3 → 2 the way
//!   `kubectl scale statefulset` does it (a new ordinal starts; the highest ordinal gets
//!   SIGTERM), and a submitted job completes across both changes.
//!
//! What this does not cover: scheduling, volumes, the probes' timing, Services' load
//! balancing, the PDBs and the HPA (they need an API server), and the OTLP export to
//! Jaeger (the endpoint is dropped here; tests of their own cover tracing).
//!
//! `kubectl` (1.32, kustomize 5.5) and python3 with PyYAML (it comes with the pinned
//! kubernetes-validate that `.ci/run` installs) must be installed: without them these
//! tests fail, saying so; they never skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/kubelet.rs"]
mod kubelet;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{job_status, mlp_job, serial, submit, test_dir, wait_status};
use kubelet::{
    expand, render, repo, sigterm, start_pod, wait_ready, Manifests, Network, Pod, POD_IP,
};
use serde_json::Value;

/// The overlay a developer applies (`kubectl apply -k deploy/overlays/dev`).
const DEV_OVERLAY: &str = "deploy/overlays/dev";

fn count(s: &Value, kind: &str) -> usize {
    common::event_kinds(s).iter().filter(|k| *k == kind).count()
}

fn generation(s: &Value) -> u64 {
    s["generation"].as_u64().unwrap_or(0)
}

#[test]
fn the_rendered_manifests_pass_strict_schema_validation() {
    let out = Command::new(repo().join("deploy/validate.sh"))
        .output()
        .expect("run deploy/validate.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "deploy/validate.sh failed:\n{text}");
    // All three render and are checked; nothing is left out silently.
    for dir in ["base", "overlays/dev", "overlays/prod"] {
        assert!(
            text.contains(&format!("ok   {dir}:")),
            "{dir} not checked:\n{text}"
        );
    }
}

#[test]
fn kubelet_env_expansion_follows_kubernetes() {
    let vars = |n: &str| (n == "POD_IP").then(|| "10.1.2.3".to_string());
    for (input, want) in [
        ("$(POD_IP):7071", "10.1.2.3:7071"),
        ("$$(POD_IP)", "$(POD_IP)"),
        ("$(MISSING):1", "$(MISSING):1"),
        ("$POD_IP", "$POD_IP"),
        ("a$", "a$"),
        ("$(POD_IP", "$(POD_IP"),
        ("x=$(POD_IP),y=$(POD_IP)", "x=10.1.2.3,y=10.1.2.3"),
    ] {
        assert_eq!(expand(input, vars), want, "{input}");
    }
}

#[test]
fn the_dev_overlay_runs_a_job_while_workers_scale_2_3_2() {
    let _serial = serial();
    let started = Instant::now();
    let m = Manifests(render(DEV_OVERLAY));
    let dir = test_dir();
    let etcd = etcd::Etcd::start();
    let mut net = Network {
        services: vec![(
            "http://ringtrain-etcd:2379".to_string(),
            etcd.url().to_string(),
        )],
    };

    // The coordinator's Deployment: one pod, named the way a ReplicaSet names it.
    let coordinator_replicas = m.get("Deployment", "ringtrain-coordinator")["spec"]["replicas"]
        .as_u64()
        .unwrap();
    assert_eq!(coordinator_replicas, 1);
    let mut coordinator = start_pod(
        &m,
        "Deployment",
        "ringtrain-coordinator",
        "ringtrain-coordinator-7c9d5b6f4-x2k8q",
        &net,
        dir.path(),
    );
    wait_ready(&m, "Deployment", "ringtrain-coordinator", &mut coordinator);
    // The ConfigMap's RINGTRAIN_LOG_FORMAT=json reached it (one JSON object per line),
    // and so did the PVC's mount path (moved to the pod's directory).
    let log = std::fs::read_to_string(&coordinator.log).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("coordinator log line is not JSON ({e}): {l:?}"))
        })
        .collect();
    let listening = lines
        .iter()
        .find(|v| v["fields"]["message"] == "coordinator listening")
        .unwrap_or_else(|| panic!("no 'coordinator listening' line in {log}"));
    let data = dir.path().join(&coordinator.name).join("data");
    assert_eq!(
        listening["fields"]["data_dir"],
        data.display().to_string(),
        "{listening}"
    );
    // The Service's port 7070 leads to the coordinator pod's grpc port.
    let coord = format!("http://{POD_IP}:{}", coordinator.port(7070));
    net.services.push((
        "http://ringtrain-coordinator:7070".to_string(),
        coord.clone(),
    ));

    // The worker StatefulSet at its declared size: ordinals 0..replicas.
    let replicas = m.get("StatefulSet", "ringtrain-worker")["spec"]["replicas"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(replicas, 2, "the dev overlay starts two workers");
    let mut workers: Vec<Pod> = (0..replicas)
        .map(|i| {
            let name = format!("ringtrain-worker-{i}");
            start_pod(
                &m,
                "StatefulSet",
                "ringtrain-worker",
                &name,
                &net,
                dir.path(),
            )
        })
        .collect();
    for w in &mut workers {
        wait_ready(&m, "StatefulSet", "ringtrain-worker", w);
    }

    // About 20 000 steps: long enough that both resizes happen mid-job on a loaded machine.
    let job = mlp_job(dir.path(), "k8s", "{ min = 2, max = 3 }", 30_000, 50, 0);
    let id = submit(&coord, &[job.to_str().unwrap()]);
    let s = wait_status(&coord, &id, Duration::from_secs(60), "training on 2", |s| {
        s["state"] == "running" && s["workers"] == 2 && s["steps"].as_u64() > Some(20)
    });
    let g2 = generation(&s);

    // kubectl scale statefulset/ringtrain-worker --replicas=3: ordinal 2 starts.
    let mut w2 = start_pod(
        &m,
        "StatefulSet",
        "ringtrain-worker",
        "ringtrain-worker-2",
        &net,
        dir.path(),
    );
    wait_ready(&m, "StatefulSet", "ringtrain-worker", &mut w2);
    workers.push(w2);
    let grown = wait_status(&coord, &id, Duration::from_secs(60), "3 workers", |s| {
        s["workers"] == 3
    });
    assert!(generation(&grown) > g2, "no new generation on 3: {grown}");
    assert!(
        grown["steps"].as_u64() < grown["total_steps"].as_u64(),
        "the job should grow mid-job, not at its end: {grown}"
    );
    let g3 = generation(&grown);

    // kubectl scale statefulset/ringtrain-worker --replicas=2: the highest ordinal gets
    // SIGTERM and must be gone within the pod's terminationGracePeriodSeconds, or the
    // kubelet would SIGKILL it.
    let mut leaver = workers.pop().unwrap();
    sigterm(&leaver);
    let termed = Instant::now();
    let exit = loop {
        if let Some(status) = leaver.proc.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            termed.elapsed() < leaver.grace,
            "{} did not exit within terminationGracePeriodSeconds ({:?}); log {}",
            leaver.name,
            leaver.grace,
            leaver.log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = termed.elapsed();
    assert!(exit.success(), "{} exited with {exit}", leaver.name);
    let shrunk = wait_status(&coord, &id, Duration::from_secs(60), "back on 2", |s| {
        s["workers"] == 2 && generation(s) > g3
    });
    assert_eq!(count(&shrunk, "left"), 1, "{shrunk}");

    let done = wait_status(&coord, &id, Duration::from_secs(300), "completion", |s| {
        s["state"] == "completed"
    });
    assert_eq!(done["steps"], done["total_steps"], "{done}");
    assert_eq!(done["verified_steps"], done["steps"], "{done}");
    assert_eq!(done["workers"], 2, "{done}");
    assert!(count(&done, "joined") >= 1, "{done}");
    assert_eq!(count(&done, "left"), 1, "{done}");
    assert_eq!(count(&done, "lost"), 0, "{done}");
    // RINGTRAIN_TCP_ONLY=true reached the workers: every ring link is TCP, never the
    // same-host Unix socket (pods on one node do not share a network namespace).
    for w in &workers {
        let links = common::log_lines(&w.log, "ring data link to the right neighbour is up");
        assert!(!links.is_empty(), "{}: no ring link in its log", w.name);
        for l in links {
            let v: Value = serde_json::from_str(&l).unwrap();
            assert_eq!(v["fields"]["same_host_socket"], false, "{}: {l}", w.name);
        }
    }
    // The remaining pods are still live and ready after the job.
    for w in &mut workers {
        wait_ready(&m, "StatefulSet", "ringtrain-worker", w);
    }
    let last = job_status(&coord, &id);
    eprintln!(
        "manifests: 2 -> 3 -> 2 workers, generations {g2} -> {g3} -> {}, leave took {took:?}, \
         {} steps, {:.1}s in all",
        generation(&last),
        last["steps"],
        started.elapsed().as_secs_f64()
    );
}
