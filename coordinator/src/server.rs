//! Serving the coordinator on a bound listener until a shutdown token fires.

use std::sync::Arc;
use std::time::Duration;

use ringtrain_proto::v1::{
    job_service_server::JobServiceServer, worker_control_server::WorkerControlServer,
};
use ringtrain_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::config::ServerConfig;
use crate::error::CoordinatorError;
use crate::grpc::CoordinatorApi;
use crate::service::Coordinator;

/// How long background tasks get to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `core` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    core: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let api = CoordinatorApi::new(core.clone());
    let result = Server::builder()
        .tcp_nodelay(true)
        // A worker behind a partition sends nothing and receives nothing; keepalive pings
        // are what notice it (its attach stream then ends and it is detached).
        .http2_keepalive_interval(Some(core.config().keepalive_interval))
        .http2_keepalive_timeout(Some(core.config().keepalive_timeout))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(
            JobServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            WorkerControlServer::new(api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .map_err(|e| CoordinatorError::Transport(e.to_string()));
    core.tasks().close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, core.tasks().wait()).await;
    result
}

/// Builds a coordinator from `config` and serves it (the `ringtrain serve` entry point).
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    serve(Coordinator::new(config), listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringtrain_proto::v1::{
        job_service_client::JobServiceClient, worker_control_client::WorkerControlClient,
        AttachRequest, JobRequest, SubmitRequest,
    };
    use tokio::io::AsyncWriteExt;

    /// A TCP relay to `target` that can be frozen: once `freeze` fires it stops moving
    /// bytes either way but keeps both sockets open, as a network partition does.
    async fn relay(
        target: std::net::SocketAddr,
        freeze: CancellationToken,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let freeze = freeze.clone();
                tokio::spawn(async move {
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let pump = async {
                        tokio::join!(
                            tokio::io::copy(&mut ri, &mut wo),
                            tokio::io::copy(&mut ro, &mut wi)
                        )
                    };
                    tokio::select! {
                        _ = pump => {}
                        _ = freeze.cancelled() => {}
                    }
                    // Hold the sockets open, silent, until the test ends.
                    std::future::pending::<()>().await;
                    let _ = (wi.shutdown().await, wo.shutdown().await);
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_partitioned_worker_of_a_one_worker_job_is_noticed_by_keepalive() {
        let dir = tempfile::tempdir().unwrap();
        let core = Coordinator::new(ServerConfig {
            data_dir: dir.path().to_path_buf(),
            keepalive_interval: Duration::from_millis(300),
            keepalive_timeout: Duration::from_millis(600),
            ..ServerConfig::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(core.clone(), listener, stop.clone()));
        let freeze = CancellationToken::new();
        let via = relay(server_addr, freeze.clone()).await;
        // The "worker" attaches through the relay and then only listens, as a worker
        // busy in a one-worker job does: nothing else would notice it vanish.
        let mut worker = WorkerControlClient::connect(format!("http://{via}"))
            .await
            .unwrap();
        let mut control = worker
            .attach(AttachRequest {
                collective_addr: "127.0.0.1:1".into(),
                name: "partitioned".into(),
                protocol_version: ringtrain_proto::PROTOCOL_VERSION,
                ..AttachRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut jobs = JobServiceClient::connect(format!("http://{server_addr}"))
            .await
            .unwrap();
        let id = jobs
            .submit(SubmitRequest {
                spec_toml: crate::test_jobs::tiny(1, 50),
                ..SubmitRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        // Registered, then the assignment.
        for _ in 0..2 {
            control.message().await.unwrap().unwrap();
        }
        freeze.cancel();
        let started = tokio::time::Instant::now();
        let failed = loop {
            let s = jobs
                .get(JobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if s.state == "failed" {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the partitioned worker was never noticed: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(failed.error.contains("was lost"), "{}", failed.error);
        stop.cancel();
        let _ = server.await;
    }
}
