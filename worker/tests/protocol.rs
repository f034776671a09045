//! A worker refuses a coordinator that speaks another protocol version, naming both
//! versions, and exits instead of retrying. (The coordinator's side of the same check is
//! tested in the coordinator crate.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use ringtrain_proto::v1::worker_control_server::{WorkerControl, WorkerControlServer};
use ringtrain_proto::v1::{
    control_message, AttachRequest, CheckpointAck, CheckpointPart, CheckpointRequest,
    ControlMessage, Registered, ReportAck, ShardChunk, ShardRequest, WorkerReport,
};
use ringtrain_worker::agent;
use ringtrain_worker::config::WorkerConfig;
use ringtrain_worker::WorkerError;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// A coordinator from another release: it registers every worker with `version`.
struct OtherRelease {
    version: u32,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerControl for OtherRelease {
    type AttachStream = Boxed<ControlMessage>;

    async fn attach(
        &self,
        _request: Request<AttachRequest>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let registered = ControlMessage {
            kind: Some(control_message::Kind::Registered(Registered {
                worker_id: "w-1".into(),
                protocol_version: self.version,
            })),
        };
        // The stream stays open after the registration, as a real coordinator's does.
        let stream = futures::stream::iter(vec![Ok(registered)]).chain(futures::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    type FetchShardStream = Boxed<ShardChunk>;
    type FetchCheckpointStream = Boxed<CheckpointPart>;

    async fn fetch_checkpoint(
        &self,
        _request: Request<CheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn fetch_shard(
        &self,
        _request: Request<ShardRequest>,
    ) -> Result<Response<Self::FetchShardStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn report(
        &self,
        _request: Request<Streaming<WorkerReport>>,
    ) -> Result<Response<ReportAck>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn upload_checkpoint(
        &self,
        _request: Request<Streaming<CheckpointPart>>,
    ) -> Result<Response<CheckpointAck>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

use futures::StreamExt;

#[tokio::test]
async fn a_worker_refuses_a_coordinator_of_another_protocol_version() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerControlServer::new(OtherRelease { version: 999 }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let config = WorkerConfig {
        coordinator: format!("http://{addr}"),
        advertise: None,
        name: "new-worker".into(),
        reconnect_limit: Some(Duration::from_secs(5)),
        local_socket: false,
        metrics: Default::default(),
        trace_steps: Default::default(),
        instance: Default::default(),
    };
    let worker_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        agent::run(config, worker_listener, CancellationToken::new()),
    )
    .await
    .expect("the worker must give up, not retry forever");
    let err = result.expect_err("a coordinator of another version was accepted");
    assert!(matches!(err, WorkerError::Refused(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("protocol version 999")
            && msg.contains(&format!("version {}", ringtrain_proto::PROTOCOL_VERSION)),
        "{msg}"
    );
    stop.cancel();
    let _ = server.await;
}
