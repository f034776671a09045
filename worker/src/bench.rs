//! One rank of `ringtrain bench allreduce`: the production ring over either data plane
//! (gRPC `Collective` streams or the plain-socket data plane, which uses same-host Unix
//! sockets unless told to stay on TCP), timed over buffer sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtrain_proto::v1::collective_server::CollectiveServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::collective::CollectiveHub;
use crate::engine::{Ring, RingConfig};
use crate::error::WorkerError;
use crate::grpc::CollectiveService;
use crate::tcp_ring::{accept_loop, DataHub, DataPeers};

/// Where this rank receives ring traffic.
#[derive(Debug)]
pub enum Hubs {
    /// gRPC streams arrive here.
    Grpc(Arc<CollectiveHub>),
    /// Data-plane connections (TCP and, when offered, the same-host socket) arrive here.
    Tcp(Arc<DataHub>),
}

/// The token the benchmark's ranks share (they are one trusted process tree).
const BENCH_TOKEN: [u8; 16] = *b"ringtrain-bench!";

/// Binds 127.0.0.1:0 and serves the chosen data plane on it; with `tcp` and `local`, also
/// a same-host Unix socket. Returns the hubs, the address and the local socket name
/// (empty: none).
pub async fn listen(
    tcp: bool,
    local: bool,
    stop: CancellationToken,
) -> Result<(Hubs, String, String), WorkerError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| WorkerError::Connect {
            addr: "127.0.0.1:0".into(),
            detail: e.to_string(),
        })?;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if tcp {
        let hub = Arc::new(DataHub::default());
        let mut name = String::new();
        #[cfg(target_os = "linux")]
        if local {
            let (unix, n) = crate::tcp_ring::bind_local(&format!("bench-{}", std::process::id()))
                .map_err(|e| WorkerError::Connect {
                addr: "a same-host data socket".into(),
                detail: e.to_string(),
            })?;
            tokio::spawn(crate::tcp_ring::accept_local_loop(
                unix,
                hub.clone(),
                stop.clone(),
            ));
            name = n;
        }
        let _ = local;
        tokio::spawn(accept_loop(listener, hub.clone(), stop));
        return Ok((Hubs::Tcp(hub), addr, name));
    }
    let hub = Arc::new(CollectiveHub::default());
    let svc = CollectiveServer::new(CollectiveService::new(hub.clone()))
        .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES);
    tokio::spawn(
        Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(crate::collective::H2_STREAM_WINDOW))
            .initial_connection_window_size(Some(crate::collective::H2_CONNECTION_WINDOW))
            .max_frame_size(Some(crate::collective::H2_MAX_FRAME))
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned()),
    );
    Ok((Hubs::Grpc(hub), addr, String::new()))
}

/// Times `iters` all-reduces of each size (in bytes, rounded down to whole f32s) after
/// one warm-up, with a one-float all-reduce before each as a barrier. Returns, per size,
/// this rank's seconds for every timed iteration.
pub async fn run(
    hubs: Hubs,
    rank: usize,
    peers: &[String],
    locals: &[String],
    sizes: &[usize],
    iters: usize,
) -> Result<Vec<Vec<f64>>, WorkerError> {
    let config = RingConfig {
        timeout: Duration::from_secs(60),
        ..RingConfig::default()
    };
    let cancel = CancellationToken::new();
    let mut ring = match hubs {
        Hubs::Grpc(hub) => Ring::connect_grpc(hub, "bench", 1, rank, peers, config, cancel).await?,
        Hubs::Tcp(hub) => {
            let data = DataPeers {
                addrs: peers.to_vec(),
                token: BENCH_TOKEN,
                locals: locals.to_vec(),
            };
            Ring::connect_socket(&hub, "bench", 1, rank, &data, config, cancel).await?
        }
    };
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
            ring.all_reduce(&mut barrier, step).await?;
            step += 1;
            let t = Instant::now();
            ring.all_reduce(&mut buf, step).await?;
            if it > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        out.push(times);
    }
    ring.close().await;
    Ok(out)
}
