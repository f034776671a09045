//! One rank of `ringtrain bench allreduce`: the production ring (gRPC `Collective` server,
//! [`RingLink`]) timed over a list of buffer sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtrain_proto::v1::collective_server::CollectiveServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::collective::{CollectiveHub, RingConfig, RingLink};
use crate::error::WorkerError;
use crate::grpc::CollectiveService;

/// Starts this rank's `Collective` server on `listener`; returns the hub it feeds.
pub fn serve(listener: TcpListener, stop: CancellationToken) -> Arc<CollectiveHub> {
    let hub = Arc::new(CollectiveHub::default());
    let svc = CollectiveServer::new(CollectiveService::new(hub.clone()))
        .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES);
    tokio::spawn(
        Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned()),
    );
    hub
}

/// Times `iters` all-reduces of each size (in bytes, rounded down to whole f32s) after
/// one warm-up, with a one-float all-reduce before each as a barrier. Returns, per size,
/// this rank's seconds for every timed iteration.
pub async fn run(
    hub: Arc<CollectiveHub>,
    rank: usize,
    peers: &[String],
    sizes: &[usize],
    iters: usize,
) -> Result<Vec<Vec<f64>>, WorkerError> {
    let config = RingConfig {
        timeout: Duration::from_secs(60),
        ..RingConfig::default()
    };
    let mut link = RingLink::connect(
        hub,
        "bench",
        1,
        rank,
        peers,
        config,
        CancellationToken::new(),
    )
    .await?;
    let mut out = Vec::new();
    let mut step = 0u64;
    for &bytes in sizes {
        let n = (bytes / 4).max(1);
        let mut buf: Vec<f32> = (0..n)
            .map(|i| (i % 1024) as f32 * 0.5 + rank as f32)
            .collect();
        let mut times = Vec::with_capacity(iters);
        for it in 0..=iters {
            let mut barrier = [1.0f32];
            step += 1;
            link.all_reduce(&mut barrier, step).await?;
            step += 1;
            let t = Instant::now();
            link.all_reduce(&mut buf, step).await?;
            if it > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        out.push(times);
    }
    link.close().await;
    Ok(out)
}
