//! The production ring all-reduce on loopback: the one engine over each of its three
//! transports (gRPC `Collective` streams, TCP, same-host Unix sockets): equality with the
//! naive sum for every world size 1..=5 and awkward lengths, an exact wrapping u64 sum,
//! bit-identical results on every rank, tag checking, a lost peer turning into an error
//! instead of a hang, and strangers refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use ringtrain_proto::v1::collective_server::CollectiveServer;
use ringtrain_worker::collective::CollectiveHub;
use ringtrain_worker::engine::{Ring, RingConfig};
use ringtrain_worker::grpc::CollectiveService;
use ringtrain_worker::ring::{WrappingSumU32, WrappingSumU64};
use ringtrain_worker::rng::Rng;
use ringtrain_worker::tcp_ring::{accept_local_loop, accept_loop, bind_local, DataHub, DataPeers};
use ringtrain_worker::WorkerError;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

struct Node {
    hub: Arc<CollectiveHub>,
    addr: String,
    data_hub: Arc<DataHub>,
    data_addr: String,
    /// The node's same-host socket name.
    data_local: String,
}

const TOKEN: [u8; 16] = [7; 16];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Plane {
    Grpc,
    /// The socket data plane forced onto TCP.
    Tcp,
    /// The socket data plane between ranks on one host: Unix sockets.
    Unix,
}

const PLANES: [Plane; 3] = [Plane::Grpc, Plane::Tcp, Plane::Unix];

async fn connect(
    nodes: &[Node],
    plane: Plane,
    generation: u64,
    rank: usize,
    world: usize,
    config: RingConfig,
) -> Result<Ring, WorkerError> {
    let cancel = CancellationToken::new();
    match plane {
        Plane::Grpc => {
            let peers: Vec<String> = nodes[..world].iter().map(|n| n.addr.clone()).collect();
            Ring::connect_grpc(
                nodes[rank].hub.clone(),
                "job-test",
                generation,
                rank,
                &peers,
                config,
                cancel,
            )
            .await
        }
        Plane::Tcp | Plane::Unix => {
            let data = DataPeers {
                addrs: nodes[..world].iter().map(|n| n.data_addr.clone()).collect(),
                token: TOKEN,
                locals: if plane == Plane::Unix {
                    nodes[..world]
                        .iter()
                        .map(|n| n.data_local.clone())
                        .collect()
                } else {
                    Vec::new()
                },
            };
            let ring = Ring::connect_socket(
                &nodes[rank].data_hub,
                "job-test",
                generation,
                rank,
                &data,
                config,
                cancel,
            )
            .await?;
            // The link really is the transport under test.
            assert_eq!(ring.is_local(), plane == Plane::Unix && world > 1);
            Ok(ring)
        }
    }
}

async fn start_nodes(n: usize) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hub = Arc::new(CollectiveHub::default());
        let svc = CollectiveServer::new(CollectiveService::new(hub.clone()))
            .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let data_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let data_addr = data_listener.local_addr().unwrap().to_string();
        let data_hub = Arc::new(DataHub::default());
        tokio::spawn(accept_loop(
            data_listener,
            data_hub.clone(),
            CancellationToken::new(),
        ));
        let (local, data_local) = bind_local(&format!("test-{}", nodes.len())).unwrap();
        tokio::spawn(accept_local_loop(
            local,
            data_hub.clone(),
            CancellationToken::new(),
        ));
        nodes.push(Node {
            hub,
            addr,
            data_hub,
            data_addr,
            data_local,
        });
    }
    nodes
}

/// Runs one all-reduce per rank concurrently and returns every rank's result.
async fn ring_all_reduce(
    nodes: &Arc<Vec<Node>>,
    plane: Plane,
    generation: u64,
    inputs: Vec<Vec<f32>>,
    steps: Vec<u64>,
    config: RingConfig,
) -> Vec<Result<Vec<f32>, WorkerError>> {
    let world = inputs.len();
    let mut tasks = Vec::new();
    for (rank, mut buf) in inputs.into_iter().enumerate() {
        let nodes = nodes.clone();
        let step = steps[rank];
        tasks.push(tokio::spawn(async move {
            let mut ring = connect(&nodes, plane, generation, rank, world, config).await?;
            ring.all_reduce(&mut buf, step).await?;
            // A second call on the same link must work too (op counter, link reuse).
            let mut again = buf.clone();
            ring.all_reduce(&mut again, step).await?;
            let scale = world as f32;
            assert!(again
                .iter()
                .zip(&buf)
                .all(|(a, b)| *a == b * scale || world == 1 && a == b));
            ring.close().await;
            Ok(buf)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_equals_naive_sum_for_worlds_1_to_5() {
    let nodes = Arc::new(start_nodes(5).await);
    let mut rng = Rng::new(12);
    let mut generation = 0;
    let config = RingConfig {
        timeout: Duration::from_secs(30),
        // Small sub-chunks so the long vector also exercises many chunks per segment.
        chunk_bytes: 256 * 1024,
    };
    for plane in PLANES {
        for world in 1..=5usize {
            for len in [1usize, 2, 3, 7, 1000, 1_000_003] {
                generation += 1;
                // Multiples of 1/8 below 2^10: every partial sum is exact in f32, so the
                // ring's summation order cannot matter and equality must be exact.
                let inputs: Vec<Vec<f32>> = (0..world)
                    .map(|_| {
                        (0..len)
                            .map(|_| (rng.below(8192) as f32 - 4096.0) / 8.0)
                            .collect()
                    })
                    .collect();
                let naive: Vec<f32> = (0..len)
                    .map(|i| inputs.iter().map(|b| b[i]).sum())
                    .collect();
                let results =
                    ring_all_reduce(&nodes, plane, generation, inputs, vec![7; world], config)
                        .await;
                for (rank, r) in results.into_iter().enumerate() {
                    let r = r.unwrap_or_else(|e| {
                        panic!("{plane:?} world {world} len {len} rank {rank}: {e}")
                    });
                    assert!(
                        r == naive,
                        "{plane:?} world {world} len {len} rank {rank}: differs from the naive sum"
                    );
                }
            }
        }
    }
}

/// Secure aggregation's sum: wrapping u64 (and u32) through the same engine over every
/// transport, exact, with pairwise masks that cancel; a rank that reduces another type
/// than its neighbours fails the tag check instead of mixing bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapping_integer_sums_are_exact_and_masks_cancel_over_every_transport() {
    let nodes = Arc::new(start_nodes(3).await);
    let mut rng = Rng::new(21);
    let (world, len) = (3usize, 70_001usize);
    let plain: Vec<Vec<u64>> = (0..world)
        .map(|_| (0..len).map(|_| rng.next_u64()).collect())
        .collect();
    let mut masked = plain.clone();
    for i in 0..world {
        for j in i + 1..world {
            let mask: Vec<u64> = (0..len).map(|_| rng.next_u64()).collect();
            for (x, m) in masked[i].iter_mut().zip(&mask) {
                *x = x.wrapping_add(*m);
            }
            for (x, m) in masked[j].iter_mut().zip(&mask) {
                *x = x.wrapping_sub(*m);
            }
        }
    }
    let want: Vec<u64> = (0..len)
        .map(|k| plain.iter().fold(0u64, |a, b| a.wrapping_add(b[k])))
        .collect();
    let want32: Vec<u32> = (0..len)
        .map(|k| plain.iter().fold(0u32, |a, b| a.wrapping_add(b[k] as u32)))
        .collect();
    let config = RingConfig {
        timeout: Duration::from_secs(30),
        chunk_bytes: 64 * 1024,
    };
    for (generation, plane) in [(41, Plane::Grpc), (42, Plane::Tcp), (43, Plane::Unix)] {
        let mut tasks = Vec::new();
        for (rank, mut buf) in masked.clone().into_iter().enumerate() {
            let nodes = nodes.clone();
            let mut small: Vec<u32> = plain[rank].iter().map(|v| *v as u32).collect();
            tasks.push(tokio::spawn(async move {
                let mut ring = connect(&nodes, plane, generation, rank, world, config).await?;
                ring.reduce::<WrappingSumU64>(&mut buf, 5).await?;
                ring.reduce::<WrappingSumU32>(&mut small, 5).await?;
                ring.close().await;
                Ok::<_, WorkerError>((buf, small))
            }));
        }
        for t in tasks {
            let (sum, small) = t.await.unwrap().unwrap();
            assert!(sum == want, "{plane:?}: u64 sum differs");
            assert!(small == want32, "{plane:?}: u32 sum differs");
        }

        // Rank 0 sums u64 while rank 1 sums f32 of the same byte length: refused.
        let gen2 = generation + 100;
        let n = nodes.clone();
        let other = tokio::spawn(async move {
            let mut ring = connect(&n, plane, gen2, 1, 2, config).await?;
            ring.all_reduce(&mut [1.0f32; 20], 5).await
        });
        let mut ring = connect(&nodes, plane, gen2, 0, 2, config).await.unwrap();
        let mine = ring.reduce::<WrappingSumU64>(&mut [1u64; 10], 5).await;
        let theirs = other.await.unwrap();
        assert!(
            matches!(mine, Err(WorkerError::TagMismatch { .. }))
                || matches!(theirs, Err(WorkerError::TagMismatch { .. })),
            "{plane:?}: {mine:?} {theirs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_get_identical_bytes_for_arbitrary_floats() {
    let nodes = Arc::new(start_nodes(4).await);
    let mut rng = Rng::new(3);
    let len = 100_003;
    let inputs: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..len).map(|_| rng.normal() as f32).collect())
        .collect();
    let naive: Vec<f64> = (0..len)
        .map(|i| inputs.iter().map(|b| b[i] as f64).sum())
        .collect();
    for (generation, plane) in [(1, Plane::Grpc), (2, Plane::Tcp), (3, Plane::Unix)] {
        let results = ring_all_reduce(
            &nodes,
            plane,
            generation,
            inputs.clone(),
            vec![1; 4],
            RingConfig::default(),
        )
        .await;
        let results: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap()).collect();
        for r in &results[1..] {
            let same = r
                .iter()
                .zip(&results[0])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{plane:?}: replicas differ");
        }
        for (a, b) in results[0].iter().zip(&naive) {
            assert!((*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_mismatch_is_an_error_not_a_silent_mix() {
    let nodes = Arc::new(start_nodes(2).await);
    let config = RingConfig {
        timeout: Duration::from_secs(5),
        ..RingConfig::default()
    };
    for (generation, plane) in [(1, Plane::Grpc), (2, Plane::Tcp), (3, Plane::Unix)] {
        let inputs = vec![vec![1.0; 10], vec![2.0; 10]];
        let results = ring_all_reduce(&nodes, plane, generation, inputs, vec![1, 2], config).await;
        let mismatches = results
            .iter()
            .filter(|r| matches!(r, Err(WorkerError::TagMismatch { .. })))
            .count();
        assert!(mismatches >= 1, "{plane:?}: {results:?}");
        assert!(results.iter().all(|r| r.is_err()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_socket_peer_is_an_error_and_a_stranger_is_refused() {
    let nodes = Arc::new(start_nodes(2).await);
    let config = RingConfig {
        timeout: Duration::from_millis(800),
        ..RingConfig::default()
    };
    for (generation, plane) in [(9, Plane::Tcp), (19, Plane::Unix)] {
        // Rank 1 connects, then leaves without ever joining the all-reduce.
        let n = nodes.clone();
        let leaver =
            tokio::spawn(async move { drop(connect(&n, plane, generation, 1, 2, config).await) });
        let mut ring0 = connect(&nodes, plane, generation, 0, 2, config)
            .await
            .unwrap();
        leaver.await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = vec![1.0f32; 1000];
        let err = ring0.all_reduce(&mut buf, 1).await.unwrap_err();
        assert!(
            matches!(err, WorkerError::PeerLost { generation: g, .. } if g == generation),
            "{plane:?}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        // A connection that does not know the generation's token is refused by rank 0,
        // over TCP and over the same-host socket alike.
        let stranger = DataPeers {
            addrs: vec![nodes[0].data_addr.clone(), nodes[1].data_addr.clone()],
            token: [0; 16],
            locals: if plane == Plane::Unix {
                vec![nodes[0].data_local.clone(), nodes[1].data_local.clone()]
            } else {
                Vec::new()
            },
        };
        let n = nodes.clone();
        let honest = tokio::spawn(async move {
            connect(&n, plane, generation + 1, 0, 2, config)
                .await
                .map(|_| ())
        });
        let own_hub = DataHub::default();
        // The stranger's own inbound side simply times out; what matters is rank 0's view.
        let _ = Ring::connect_socket(
            &own_hub,
            "job-test",
            generation + 1,
            1,
            &stranger,
            config,
            CancellationToken::new(),
        )
        .await;
        let refused = honest.await.unwrap().unwrap_err();
        assert!(
            matches!(refused, WorkerError::TagMismatch { .. }),
            "{plane:?}: rank 0 must refuse a wrong-token connection: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_an_error_within_the_deadline() {
    let nodes = Arc::new(start_nodes(2).await);
    let peers: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let config = RingConfig {
        timeout: Duration::from_millis(800),
        ..RingConfig::default()
    };
    // Rank 1 connects, then leaves without ever joining the all-reduce.
    let p = peers.clone();
    let hub1 = nodes[1].hub.clone();
    let leaver = tokio::spawn(async move {
        let link =
            Ring::connect_grpc(hub1, "job-test", 9, 1, &p, config, CancellationToken::new()).await;
        drop(link);
    });
    let mut link0 = Ring::connect_grpc(
        nodes[0].hub.clone(),
        "job-test",
        9,
        0,
        &peers,
        config,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    leaver.await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![1.0f32; 1000];
    let err = link0.all_reduce(&mut buf, 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            WorkerError::PeerLost {
                rank: 1,
                generation: 9,
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A same-host socket name is dialed only when it carries this host's boot id: a name
/// advertised by a worker on another host (here, a forged boot id, bound locally as an
/// attacker on this host could) is never dialed, and the link uses TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_name_from_another_host_is_not_dialed() {
    let nodes = Arc::new(start_nodes(2).await);
    let foreign = |n: &Node| {
        let (_, rest) = n.data_local.split_at("ringtrain-data-".len() + 32);
        format!("ringtrain-data-{}{rest}", "0".repeat(32))
    };
    // Someone on this host listens on the foreign names.
    let mut squatters = Vec::new();
    for n in nodes.iter() {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(foreign(n).as_bytes()).unwrap();
        squatters.push(std::os::unix::net::UnixListener::bind_addr(&addr).unwrap());
    }
    let data = DataPeers {
        addrs: nodes.iter().map(|n| n.data_addr.clone()).collect(),
        token: TOKEN,
        locals: nodes.iter().map(foreign).collect(),
    };
    let config = RingConfig::default();
    let mut tasks = Vec::new();
    for rank in 0..2 {
        let (nodes, data) = (nodes.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut ring = Ring::connect_socket(
                &nodes[rank].data_hub,
                "job-test",
                31,
                rank,
                &data,
                config,
                CancellationToken::new(),
            )
            .await
            .unwrap();
            assert!(!ring.is_local(), "dialed a socket name from another host");
            let mut buf = vec![rank as f32 + 1.0; 100];
            ring.all_reduce(&mut buf, 1).await.unwrap();
            buf
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), vec![3.0; 100]);
    }
    for s in &squatters {
        s.set_nonblocking(true).unwrap();
        assert!(s.accept().is_err(), "a squatter received a connection");
    }
}
