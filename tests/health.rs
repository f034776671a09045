//! `grpc.health.v1` on every process, as Kubernetes probes ask it: a coordinator is
//! SERVING once it serves (with etcd: only the leader, a standby says NOT_SERVING), a
//! worker once it is attached to a coordinator. Real processes, a real etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/etcd.rs"]
mod etcd;

use std::time::Duration;

use common::{spawn_listening, wait_for, worker_at, Proc};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The status `addr` reports for `service` ("" = the whole server), or the error text.
fn health(addr: &str, service: &str) -> Result<ServingStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = if addr.starts_with("http") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut client = HealthClient::new(channel);
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map_err(|s| s.to_string())?;
        Ok(r.into_inner().status())
    })
}

fn serve(dir: &std::path::Path, etcd: Option<&str>) -> (Proc, String) {
    let data = dir.join("data");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    if let Some(e) = etcd {
        args.extend(["--etcd", e, "--leader-ttl-secs", "2"]);
    }
    let (p, addr) = spawn_listening(&args);
    (p, format!("http://{addr}"))
}

#[test]
fn coordinators_and_workers_answer_health_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, coord) = serve(dir.path(), None);
    assert_eq!(health(&coord, "liveness"), Ok(ServingStatus::Serving));
    for service in ["", "ringtrain.v1.JobService", "ringtrain.v1.WorkerControl"] {
        wait_for(
            Duration::from_secs(10),
            "the coordinator to be SERVING",
            || (health(&coord, service) == Ok(ServingStatus::Serving)).then_some(()),
        );
    }
    // An unknown service is an error (NOT_FOUND), as the protocol says.
    assert!(health(&coord, "no.such.Service").is_err());
    // A worker listens (and answers) before it is attached; SERVING once it is.
    let (_w, addr) = worker_at(&coord, "w0");
    assert_eq!(health(&addr, "liveness"), Ok(ServingStatus::Serving));
    wait_for(Duration::from_secs(20), "the worker to be SERVING", || {
        (health(&addr, "") == Ok(ServingStatus::Serving)).then_some(())
    });
}

#[test]
fn a_standby_is_not_serving_until_it_leads() {
    let etcd = etcd::Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (leader, a) = serve(dir.path(), Some(etcd.url()));
    wait_for(Duration::from_secs(20), "the leader to be SERVING", || {
        (health(&a, "") == Ok(ServingStatus::Serving)).then_some(())
    });
    let (_standby, b) = serve(dir.path(), Some(etcd.url()));
    assert_eq!(health(&b, ""), Ok(ServingStatus::NotServing));
    assert_eq!(health(&b, "liveness"), Ok(ServingStatus::Serving));
    assert_eq!(
        health(&b, "ringtrain.v1.JobService"),
        Ok(ServingStatus::NotServing)
    );
    drop(leader); // kill -9
    wait_for(Duration::from_secs(15), "the standby to be SERVING", || {
        (health(&b, "") == Ok(ServingStatus::Serving)).then_some(())
    });
}

#[test]
fn the_coordinator_describes_its_services_through_reflection() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let (_c, coord) = serve(dir.path(), None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let services: Vec<String> = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(coord.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    });
    for want in [
        "ringtrain.v1.JobService",
        "ringtrain.v1.WorkerControl",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|s| s == want),
            "{want} not in {services:?}"
        );
    }
}
