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

/// How often the coordinator pings each connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

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
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
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
