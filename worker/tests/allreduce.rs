//! The production ring all-reduce over real gRPC on loopback: equality with the naive sum
//! for every world size 1..=5 and awkward lengths, bit-identical results on every rank,
//! tag checking, and a lost peer turning into an error instead of a hang.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use ringtrain_proto::v1::collective_server::CollectiveServer;
use ringtrain_worker::collective::{CollectiveHub, RingConfig, RingLink};
use ringtrain_worker::grpc::CollectiveService;
use ringtrain_worker::rng::Rng;
use ringtrain_worker::WorkerError;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

struct Node {
    hub: Arc<CollectiveHub>,
    addr: String,
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
        nodes.push(Node { hub, addr });
    }
    nodes
}

/// Runs one all-reduce per rank concurrently and returns every rank's result.
async fn ring_all_reduce(
    nodes: &[Node],
    generation: u64,
    inputs: Vec<Vec<f32>>,
    steps: Vec<u64>,
    config: RingConfig,
) -> Vec<Result<Vec<f32>, WorkerError>> {
    let world = inputs.len();
    let peers: Vec<String> = nodes[..world].iter().map(|n| n.addr.clone()).collect();
    let mut tasks = Vec::new();
    for (rank, mut buf) in inputs.into_iter().enumerate() {
        let hub = nodes[rank].hub.clone();
        let peers = peers.clone();
        let step = steps[rank];
        tasks.push(tokio::spawn(async move {
            let mut link = RingLink::connect(
                hub,
                "job-test",
                generation,
                rank,
                &peers,
                config,
                CancellationToken::new(),
            )
            .await?;
            link.all_reduce(&mut buf, step).await?;
            // A second call on the same link must work too (op counter, stream reuse).
            let mut again = buf.clone();
            link.all_reduce(&mut again, step).await?;
            let scale = world as f32;
            assert!(again
                .iter()
                .zip(&buf)
                .all(|(a, b)| *a == b * scale || world == 1 && a == b));
            link.close().await;
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
    let nodes = start_nodes(5).await;
    let mut rng = Rng::new(12);
    let mut generation = 0;
    let config = RingConfig {
        timeout: Duration::from_secs(30),
        // Small sub-chunks so the long vector also exercises many chunks per segment.
        chunk_elems: 64 * 1024,
    };
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
            let results = ring_all_reduce(&nodes, generation, inputs, vec![7; world], config).await;
            for (rank, r) in results.into_iter().enumerate() {
                let r = r.unwrap_or_else(|e| panic!("world {world} len {len} rank {rank}: {e}"));
                assert!(
                    r == naive,
                    "world {world} len {len} rank {rank}: differs from the naive sum"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_get_identical_bytes_for_arbitrary_floats() {
    let nodes = start_nodes(4).await;
    let mut rng = Rng::new(3);
    let len = 100_003;
    let inputs: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..len).map(|_| rng.normal() as f32).collect())
        .collect();
    let naive: Vec<f64> = (0..len)
        .map(|i| inputs.iter().map(|b| b[i] as f64).sum())
        .collect();
    let results = ring_all_reduce(&nodes, 1, inputs, vec![1; 4], RingConfig::default()).await;
    let results: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap()).collect();
    for r in &results[1..] {
        let same = r
            .iter()
            .zip(&results[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "replicas differ");
    }
    for (a, b) in results[0].iter().zip(&naive) {
        assert!((*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_mismatch_is_an_error_not_a_silent_mix() {
    let nodes = start_nodes(2).await;
    let config = RingConfig {
        timeout: Duration::from_secs(5),
        ..RingConfig::default()
    };
    let results = ring_all_reduce(
        &nodes,
        1,
        vec![vec![1.0; 10], vec![2.0; 10]],
        vec![1, 2],
        config,
    )
    .await;
    let mismatches = results
        .iter()
        .filter(|r| matches!(r, Err(WorkerError::TagMismatch { .. })))
        .count();
    assert!(mismatches >= 1, "{results:?}");
    assert!(results.iter().all(|r| r.is_err()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_an_error_within_the_deadline() {
    let nodes = start_nodes(2).await;
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
            RingLink::connect(hub1, "job-test", 9, 1, &p, config, CancellationToken::new()).await;
        drop(link);
    });
    let mut link0 = RingLink::connect(
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
