//! A pretend kubelet for tests/manifests.rs: renders a kustomize overlay, builds a
//! container's argv and environment the way the kubelet does (ConfigMap `envFrom`,
//! downward API `fieldRef`, `$(VAR)` expansion), and starts it as a `ringtrain` process on
//! 127.0.0.1 with the pod's ports, Service addresses and volume mounts moved to local
//! ones; asks the probes written in the manifest as the kubelet's native gRPC probe would.
//! Anything it does not simulate (another env source, a fieldRef it does not know) fails
//! the test rather than being ignored.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::{bin, Proc};

/// The namespace the pods are pretended to run in (`metadata.namespace`).
pub const NAMESPACE: &str = "default";
/// What `status.podIP` resolves to: every pod of the test shares this host's loopback,
/// so each pod's container ports are moved to free ports instead.
pub const POD_IP: &str = "127.0.0.1";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------
// Rendering and reading the manifests
// ---------------------------------------------------------------------------------------

/// `kubectl kustomize DIR`, as a list of JSON documents (PyYAML converts; no YAML crate
/// in the tree).
pub fn render(overlay: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(overlay))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubectl ({e}): this test needs kubectl 1.32 with kustomize 5.5 on \
                 PATH (google-cloud-cli's kubectl or dl.k8s.io; not Debian's kubernetes-client \
                 1.20, which is too old)"
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut py = Command::new("python3")
        .args([
            "-c",
            "import sys,yaml,json; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): it converts the rendered YAML"));
    py.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let converted = py.wait_with_output().unwrap();
    assert!(
        converted.status.success(),
        "python3 could not convert the YAML (PyYAML comes with `pip install \
         kubernetes-validate==1.32.0`, which .ci/run installs): {}",
        String::from_utf8_lossy(&converted.stderr)
    );
    serde_json::from_slice(&converted.stdout).unwrap()
}

/// The rendered documents of one overlay.
pub struct Manifests(pub Vec<Value>);

impl Manifests {
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
    }

    pub fn names_of(&self, kind: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|d| d["kind"] == kind)
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn config_map(&self, name: &str) -> BTreeMap<String, String> {
        let data = &self.get("ConfigMap", name)["data"];
        data.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The one container of a workload's pod template, and the template's pod spec.
    pub fn container<'a>(&'a self, kind: &str, name: &str) -> (&'a Value, &'a Value) {
        let pod = &self.get(kind, name)["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{kind} {name}: one container expected");
        (&containers[0], pod)
    }
}

// ---------------------------------------------------------------------------------------
// What the kubelet does with a container's env and args
// ---------------------------------------------------------------------------------------

/// Kubernetes' `$(VAR)` expansion (k8s.io/kubernetes third_party/forked/golang/expansion):
/// `$(NAME)` becomes the variable's value when it is defined, and stays as written when it
/// is not; `$$` is an escaped `$`; any other `$` is kept.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let (Some(body), Some(end)) = (after.strip_prefix('('), after.find(')')) {
            let name = &body[..end - 1];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The facts the downward API can give a pod.
pub struct PodFacts {
    pub name: String,
    pub node: String,
}

/// The container's environment as the kubelet builds it: `envFrom` sources in order, then
/// `env` entries in order (a later one wins); a `value` is expanded with what is defined
/// before it. Sources this test does not know fail it, so new ones get handled here.
pub fn container_env(m: &Manifests, container: &Value, pod: &PodFacts) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| match env
        .iter_mut()
        .find(|(name, _)| name == k)
    {
        Some(slot) => slot.1 = v,
        None => env.push((k.to_string(), v)),
    };
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let name = source["configMapRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("unsupported envFrom source {source}"));
        let prefix = source["prefix"].as_str().unwrap_or("");
        for (k, v) in m.config_map(name) {
            set(&mut env, &format!("{prefix}{k}"), v);
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap();
        let value = if let Some(v) = var["value"].as_str() {
            let defined = env.clone();
            expand(v, |n| {
                defined.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
            })
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match path {
                "metadata.name" => pod.name.clone(),
                "metadata.namespace" => NAMESPACE.to_string(),
                "status.podIP" | "status.hostIP" => POD_IP.to_string(),
                "spec.nodeName" => pod.node.clone(),
                other => panic!("{name}: fieldRef {other} is not simulated by this test"),
            }
        } else if let Some(key) = var["valueFrom"]["configMapKeyRef"]["key"].as_str() {
            let cm = var["valueFrom"]["configMapKeyRef"]["name"]
                .as_str()
                .unwrap();
            m.config_map(cm).remove(key).unwrap_or_else(|| {
                panic!("{name}: ConfigMap {cm} has no key {key}");
            })
        } else {
            panic!("{name}: unsupported env source {var}");
        };
        set(&mut env, name, value);
    }
    env
}

/// The process's argv after the image's ENTRYPOINT `["ringtrain"]`: the container must not
/// replace the entrypoint (no `command`), and its `args` are expanded with its env.
pub fn container_args(container: &Value, env: &[(String, String)]) -> Vec<String> {
    assert!(
        container["command"].is_null(),
        "container {} sets `command`, which replaces the image's ENTRYPOINT [\"ringtrain\"]; \
         give the subcommand in `args`",
        container["name"]
    );
    let lookup = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    container["args"]
        .as_array()
        .unwrap_or_else(|| panic!("container {} has no args", container["name"]))
        .iter()
        .map(|a| expand(a.as_str().unwrap(), lookup))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Pods as processes
// ---------------------------------------------------------------------------------------

pub fn free_port() -> u16 {
    TcpListener::bind((POD_IP, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pod of the test: its process, where each container port went, and its log.
pub struct Pod {
    pub name: String,
    pub proc: Proc,
    pub ports: BTreeMap<u16, u16>,
    pub log: PathBuf,
    pub grace: Duration,
}

impl Pod {
    pub fn port(&self, container_port: u16) -> u16 {
        self.ports[&container_port]
    }
}

/// The network of the test cluster: `host:port` strings a pod's env may name (Services,
/// its own listen addresses) and what they are on 127.0.0.1.
pub struct Network {
    pub services: Vec<(String, String)>,
}

/// Starts one pod of a workload: resolves its env and args, moves its container ports to
/// free ones and its Service names to their local addresses, and starts the binary with
/// exactly that environment (nothing inherited from the test). Volume mounts become
/// directories of the pod under `dir`.
pub fn start_pod(
    m: &Manifests,
    kind: &str,
    workload: &str,
    pod_name: &str,
    net: &Network,
    dir: &Path,
) -> Pod {
    let (container, pod_spec) = m.container(kind, workload);
    let facts = PodFacts {
        name: pod_name.to_string(),
        node: "test-node".to_string(),
    };
    let mut env = container_env(m, container, &facts);
    let args = container_args(container, &env);
    let ports: BTreeMap<u16, u16> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["containerPort"].as_u64().unwrap() as u16, free_port()))
        .collect();
    // The OTLP endpoint names the dev overlay's Jaeger, which cannot run here: dropped,
    // after checking the overlay wires it (export is then off, as without a collector).
    if let Some(i) = env
        .iter()
        .position(|(k, _)| k == "OTEL_EXPORTER_OTLP_ENDPOINT")
    {
        assert_eq!(env[i].1, "http://jaeger:4317", "{pod_name}");
        env.remove(i);
    }
    // Each volume mount becomes a directory of this pod under the test's directory (the
    // coordinator's PVC at /var/lib/ringtrain, scratch space at /tmp).
    let mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let path = dir.join(pod_name).join(v["name"].as_str().unwrap());
            std::fs::create_dir_all(&path).unwrap();
            (v["mountPath"].as_str().unwrap().to_string(), path)
        })
        .collect();
    let rewrite = |v: &str| {
        let mut v = v.to_string();
        // One mount per value (the first that contains it; nested mounts are not used).
        if let Some((mount, local)) = mounts
            .iter()
            .find(|(m, _)| v == *m || v.starts_with(&format!("{m}/")))
        {
            v = format!("{}{}", local.display(), &v[mount.len()..]);
        }
        for (from, to) in &net.services {
            v = v.replace(from, to);
        }
        for (from, to) in &ports {
            for host in ["0.0.0.0", POD_IP] {
                v = v.replace(&format!("{host}:{from}"), &format!("{POD_IP}:{to}"));
            }
        }
        v
    };
    for (_, v) in env.iter_mut() {
        *v = rewrite(v);
    }
    let args: Vec<String> = args.iter().map(|a| rewrite(a)).collect();
    // Nothing may still point into the cluster: a Service name, the wildcard address, or
    // a container port this test did not move.
    let services = m.names_of("Service");
    for (k, v) in &env {
        for s in &services {
            assert!(
                !v.contains(&format!("{s}:")) && !v.contains(&format!("//{s}")),
                "{pod_name}: {k}={v} still names Service {s}; add it to the test's network"
            );
        }
        assert!(!v.contains("0.0.0.0"), "{pod_name}: {k}={v}");
    }
    let log = dir.join(format!("{pod_name}.log"));
    let stdout = std::fs::File::create(dir.join(format!("{pod_name}.out"))).unwrap();
    let child = Command::new(bin())
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let grace = Duration::from_secs(
        pod_spec["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30),
    );
    eprintln!("started pod {pod_name}: ringtrain {args:?}, ports {ports:?}");
    Pod {
        name: pod_name.to_string(),
        proc: Proc(child),
        ports,
        log,
        grace,
    }
}

/// One grpc.health.v1 check, as the kubelet's native gRPC probe makes it.
pub fn health(port: u16, service: &str) -> Result<ServingStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{POD_IP}:{port}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(1))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map_err(|s| s.to_string())?;
        Ok(r.into_inner().status())
    })
}

/// Waits until the pod's readiness probe (from its manifest) says SERVING, checking its
/// liveness probe and that the process is still running on the way.
pub fn wait_ready(m: &Manifests, kind: &str, workload: &str, pod: &mut Pod) {
    let (container, _) = m.container(kind, workload);
    let probe = |p: &str| {
        let g = &container[p]["grpc"];
        assert!(!g.is_null(), "{workload}: {p} is not a native gRPC probe");
        let port = g["port"].as_u64().unwrap() as u16;
        (
            pod.port(port),
            g["service"].as_str().unwrap_or("").to_string(),
        )
    };
    let (ready_port, ready_service) = probe("readinessProbe");
    let (live_port, live_service) = probe("livenessProbe");
    let started = Instant::now();
    loop {
        if let Some(status) = pod.proc.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(&pod.log).unwrap_or_default();
            panic!(
                "pod {} exited ({status}) before it was ready:\n{log}",
                pod.name
            );
        }
        if health(ready_port, &ready_service) == Ok(ServingStatus::Serving) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "pod {}: readiness probe (service {ready_service:?}) not SERVING within 30 s; log {}",
            pod.name,
            pod.log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        health(live_port, &live_service),
        Ok(ServingStatus::Serving),
        "pod {}: liveness probe (service {live_service:?})",
        pod.name
    );
}

pub fn sigterm(pod: &Pod) {
    let pid = pod.proc.0.id().to_string();
    let term = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(term.success(), "kill -TERM {pid}");
}
