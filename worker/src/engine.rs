//! The one ring all-reduce engine, over any [`Transport`] and any [`Reduction`].
//!
//! The engine walks the pure schedule of [`crate::ring::rounds`]; in each round it sends
//! one segment of the caller's buffer to the right neighbour while it receives the
//! matching segment from the left one, cut into tagged sub-chunks. A transport only moves
//! tagged bytes: it sends a slice of the caller's buffer and receives straight into a
//! slice the engine hands it (the buffer itself in all-gather, an aligned scratch in
//! reduce-scatter, which the engine then reduces in), and it checks the tag and length
//! of everything it receives. Deadlines, cancellation, the error mapping and the
//! reduction live here, once. (burn's `burn-collective` keeps one ring over its
//! `Protocol` the same way.)
//!
//! Transports: gRPC `Collective` streams ([`crate::collective::GrpcLink`]) and plain
//! sockets, TCP or a same-host Unix socket ([`crate::tcp_ring::SocketLink`]). [`Ring`]
//! is the ring of one generation over whichever the coordinator chose.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::collective::{CollectiveHub, GrpcLink};
use crate::error::WorkerError;
use crate::ring::{self, Phase, Reduction, SumF32, Tag};
use crate::tcp_ring::{DataHub, DataPeers, SocketLink};

#[cfg(target_endian = "big")]
compile_error!("ringtrain's wire format is little-endian; big-endian hosts are not supported");

/// Tuning of the ring.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// Deadline of one ring round (both its send and its receive).
    pub timeout: Duration,
    /// Largest sub-chunk, in bytes (rounded down to whole elements, at least one).
    pub chunk_bytes: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            timeout: Duration::from_secs(20),
            chunk_bytes: 1 << 20,
        }
    }
}

/// What a transport half reports; the engine turns it into a [`WorkerError`] that names
/// the neighbour and the generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The link broke, closed or stalled.
    Broken(String),
    /// A chunk arrived with a tag (or job, generation, sender) other than expected.
    Tag {
        /// What this rank expected.
        expected: String,
        /// What arrived.
        got: String,
    },
    /// A chunk arrived with the wrong payload length.
    Size {
        /// Expected payload bytes.
        expected: usize,
        /// Received payload bytes.
        got: usize,
    },
}

/// The half of a link towards the right neighbour.
pub trait ChunkSender: Send {
    /// Sends one tagged chunk; `data` is a slice of the caller's buffer.
    fn send(
        &mut self,
        tag: &Tag,
        data: &[u8],
    ) -> impl Future<Output = Result<(), LinkError>> + Send;
}

/// The half of a link from the left neighbour.
pub trait ChunkReceiver: Send {
    /// Receives the next chunk, checks that it carries `tag` and exactly `dst.len()`
    /// bytes, and writes its payload into `dst`.
    fn recv_into(
        &mut self,
        tag: &Tag,
        dst: &mut [u8],
    ) -> impl Future<Output = Result<(), LinkError>> + Send;
}

/// One rank's two links of a ring generation.
pub trait Transport: Send {
    /// Towards the right neighbour.
    type Sender: ChunkSender;
    /// From the left neighbour.
    type Receiver: ChunkReceiver;
    /// Both halves, borrowed at once so a round can send and receive concurrently;
    /// `None` when the links are not up (a world of one never asks).
    fn halves(&mut self) -> Option<(&mut Self::Sender, &mut Self::Receiver)>;
    /// Ends the outgoing link after everything queued on it has been sent, waiting at
    /// most `timeout`.
    fn close(self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

/// The ring all-reduce of one rank over transport `T`.
pub struct RingEngine<T> {
    transport: T,
    generation: u64,
    rank: usize,
    world: usize,
    config: RingConfig,
    cancel: CancellationToken,
    /// Reduce-scatter receives land here before they are reduced into the buffer. Kept
    /// as u64 words so it is aligned for every element type.
    scratch: Vec<u64>,
    /// Collectives run so far in this generation.
    seq: u64,
}

impl<T> std::fmt::Debug for RingEngine<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingEngine")
            .field("generation", &self.generation)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The first `len` elements of `scratch` viewed as `E`, grown as needed.
fn scratch_as<E: bytemuck::Pod>(scratch: &mut Vec<u64>, len: usize) -> &mut [E] {
    let bytes = len * std::mem::size_of::<E>();
    let words = bytes.div_ceil(8);
    if scratch.len() < words {
        scratch.resize(words, 0);
    }
    let raw: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch[..words]);
    // Cannot panic: the bytes start on a u64 boundary (enough for any element this
    // crate reduces: f32, u32, u64) and are a whole number of elements long.
    bytemuck::cast_slice_mut(&mut raw[..bytes])
}

impl<T: Transport> RingEngine<T> {
    /// The engine of rank `rank` in a ring of `world` over `transport`.
    pub fn new(
        transport: T,
        generation: u64,
        rank: usize,
        world: usize,
        config: RingConfig,
        cancel: CancellationToken,
    ) -> Self {
        RingEngine {
            transport,
            generation,
            rank,
            world,
            config,
            cancel,
            scratch: Vec::new(),
            seq: 0,
        }
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Reduces `buf` element-wise with `R` across all ranks, in place; every rank ends
    /// with identical bytes. `step` tags the chunks so a stale or foreign message is
    /// caught. A world of one returns at once.
    pub async fn all_reduce<R: Reduction>(
        &mut self,
        buf: &mut [R::Elem],
        step: u64,
    ) -> Result<(), WorkerError> {
        let (rank, n, generation) = (self.rank, self.world, self.generation);
        if n <= 1 {
            return Ok(());
        }
        self.seq += 1;
        let op = ring::op_code(self.seq, R::CODE);
        let chunk = (self.config.chunk_bytes / std::mem::size_of::<R::Elem>()).max(1);
        let segs = ring::segments(buf.len(), n);
        let (left, right) = (((rank + n - 1) % n) as u32, ((rank + 1) % n) as u32);
        let (timeout, cancel) = (self.config.timeout, &self.cancel);
        let scratch = &mut self.scratch;
        let Some((tx, rx)) = self.transport.halves() else {
            return Err(WorkerError::PeerLost {
                rank: right,
                generation,
                detail: "no link to the right neighbour".into(),
            });
        };
        for round in ring::rounds(rank, n) {
            let (send, recv) =
                ring::split_send_recv(buf, segs[round.send].clone(), segs[round.recv].clone());
            let tag = |chunk: usize| Tag {
                step,
                op,
                phase: round.phase,
                round: round.round as u32,
                chunk: chunk as u32,
            };
            // Sending and receiving run at once: a segment larger than what the links
            // buffer would otherwise deadlock the ring.
            let send_all = async {
                for (i, r) in ring::sub_chunks(0..send.len(), chunk)
                    .into_iter()
                    .enumerate()
                {
                    tx.send(&tag(i), bytemuck::cast_slice(&send[r])).await?;
                }
                Ok::<(), LinkError>(())
            };
            let recv_all = async {
                for (i, r) in ring::sub_chunks(0..recv.len(), chunk)
                    .into_iter()
                    .enumerate()
                {
                    let dst = &mut recv[r];
                    match round.phase {
                        Phase::AllGather => {
                            rx.recv_into(&tag(i), bytemuck::cast_slice_mut(dst)).await?
                        }
                        Phase::ReduceScatter => {
                            let tmp = scratch_as::<R::Elem>(scratch, dst.len());
                            rx.recv_into(&tag(i), bytemuck::cast_slice_mut(tmp)).await?;
                            R::reduce(dst, tmp);
                        }
                    }
                }
                Ok::<(), LinkError>(())
            };
            let (sent, received) = tokio::select! {
                _ = cancel.cancelled() => return Err(WorkerError::Cancelled),
                r = tokio::time::timeout(timeout, async { tokio::join!(send_all, recv_all) }) => match r {
                    Ok(v) => v,
                    Err(_) => return Err(WorkerError::PeerLost {
                        rank: left,
                        generation,
                        detail: format!("ring round did not finish within {timeout:?}"),
                    }),
                },
            };
            let classify = |e: LinkError, peer: u32| {
                if cancel.is_cancelled() {
                    return WorkerError::Cancelled;
                }
                match e {
                    LinkError::Broken(detail) => WorkerError::PeerLost {
                        rank: peer,
                        generation,
                        detail,
                    },
                    LinkError::Tag { expected, got } => WorkerError::TagMismatch { expected, got },
                    LinkError::Size { expected, got } => WorkerError::ChunkSize { expected, got },
                }
            };
            received.map_err(|e| classify(e, left))?;
            sent.map_err(|e| classify(e, right))?;
        }
        Ok(())
    }

    /// Ends the outgoing link after everything queued has been sent (bounded by the
    /// ring's deadline).
    pub async fn close(self) {
        self.transport.close(self.config.timeout).await
    }
}

#[derive(Debug)]
enum Links {
    Grpc(RingEngine<GrpcLink>),
    Socket(RingEngine<SocketLink>),
}

/// The ring of one generation over whichever data plane the coordinator chose: one
/// [`RingEngine`] over gRPC streams or over plain sockets.
#[derive(Debug)]
pub struct Ring(Links);

impl Ring {
    /// Connects over gRPC `Collective` streams; `peers[i]` is rank i's collective
    /// address.
    pub async fn connect_grpc(
        hub: Arc<CollectiveHub>,
        job: &str,
        generation: u64,
        rank: usize,
        peers: &[String],
        config: RingConfig,
        cancel: CancellationToken,
    ) -> Result<Ring, WorkerError> {
        let link = GrpcLink::connect(
            hub,
            job,
            generation,
            rank,
            peers,
            config.timeout,
            cancel.clone(),
        )
        .await?;
        Ok(Ring(Links::Grpc(RingEngine::new(
            link,
            generation,
            rank,
            peers.len(),
            config,
            cancel,
        ))))
    }

    /// Connects over the plain-socket data plane (a same-host Unix socket where one is
    /// offered and reachable, TCP otherwise).
    pub async fn connect_socket(
        hub: &DataHub,
        job: &str,
        generation: u64,
        rank: usize,
        peers: &DataPeers,
        config: RingConfig,
        cancel: CancellationToken,
    ) -> Result<Ring, WorkerError> {
        let link =
            SocketLink::connect(hub, job, generation, rank, peers, config.timeout, &cancel).await?;
        Ok(Ring(Links::Socket(RingEngine::new(
            link,
            generation,
            rank,
            peers.addrs.len(),
            config,
            cancel,
        ))))
    }

    /// Whether the link to the right neighbour is a same-host Unix socket.
    pub fn is_local(&self) -> bool {
        match &self.0 {
            Links::Grpc(_) => false,
            Links::Socket(e) => e.transport().is_local(),
        }
    }

    /// Sums f32 `buf` element-wise across all ranks, in place.
    pub async fn all_reduce(&mut self, buf: &mut [f32], step: u64) -> Result<(), WorkerError> {
        self.reduce::<SumF32>(buf, step).await
    }

    /// Reduces `buf` with `R` across all ranks, in place.
    pub async fn reduce<R: Reduction>(
        &mut self,
        buf: &mut [R::Elem],
        step: u64,
    ) -> Result<(), WorkerError> {
        match &mut self.0 {
            Links::Grpc(e) => e.all_reduce::<R>(buf, step).await,
            Links::Socket(e) => e.all_reduce::<R>(buf, step).await,
        }
    }

    /// Ends the outgoing link after everything queued has been sent.
    pub async fn close(self) {
        match self.0 {
            Links::Grpc(e) => e.close().await,
            Links::Socket(e) => e.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The engine over an in-memory transport, against the naive sum and against the
    //! pure [`ring::simulate`], bit for bit.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ring::{WrappingSumU32, WrappingSumU64};
    use proptest::prelude::*;
    use tokio::sync::mpsc;

    /// Chunks buffered per in-memory link.
    const MEM_CAPACITY: usize = 4;

    type Msg = (Tag, Vec<u8>);

    struct MemSender(mpsc::Sender<Msg>);
    struct MemReceiver(mpsc::Receiver<Msg>);
    struct MemLink(MemSender, MemReceiver);

    impl ChunkSender for MemSender {
        async fn send(&mut self, tag: &Tag, data: &[u8]) -> Result<(), LinkError> {
            self.0
                .send((*tag, data.to_vec()))
                .await
                .map_err(|_| LinkError::Broken("closed".into()))
        }
    }

    impl ChunkReceiver for MemReceiver {
        async fn recv_into(&mut self, tag: &Tag, dst: &mut [u8]) -> Result<(), LinkError> {
            let (got, data) = self
                .0
                .recv()
                .await
                .ok_or_else(|| LinkError::Broken("closed".into()))?;
            if got != *tag {
                return Err(LinkError::Tag {
                    expected: tag.to_string(),
                    got: got.to_string(),
                });
            }
            if data.len() != dst.len() {
                return Err(LinkError::Size {
                    expected: dst.len(),
                    got: data.len(),
                });
            }
            dst.copy_from_slice(&data);
            Ok(())
        }
    }

    impl Transport for MemLink {
        type Sender = MemSender;
        type Receiver = MemReceiver;
        fn halves(&mut self) -> Option<(&mut MemSender, &mut MemReceiver)> {
            Some((&mut self.0, &mut self.1))
        }
        async fn close(self, _timeout: Duration) {}
    }

    /// One engine per rank, rank r's sender feeding rank r+1's receiver.
    fn mem_ring(world: usize, chunk_bytes: usize) -> Vec<RingEngine<MemLink>> {
        let (mut txs, mut rxs): (Vec<_>, Vec<_>) =
            (0..world).map(|_| mpsc::channel(MEM_CAPACITY)).unzip();
        // Rank r receives on the channel its left neighbour sends on.
        rxs.rotate_right(1);
        let config = RingConfig {
            timeout: Duration::from_secs(10),
            chunk_bytes,
        };
        txs.drain(..)
            .zip(rxs.drain(..))
            .enumerate()
            .map(|(rank, (tx, rx))| {
                RingEngine::new(
                    MemLink(MemSender(tx), MemReceiver(rx)),
                    1,
                    rank,
                    world,
                    config,
                    CancellationToken::new(),
                )
            })
            .collect()
    }

    /// Runs the engine on every rank at once (one thread) with per-rank steps.
    fn run_ring<R: Reduction>(
        mut bufs: Vec<Vec<R::Elem>>,
        chunk_bytes: usize,
        steps: &[u64],
    ) -> Vec<Result<Vec<R::Elem>, WorkerError>> {
        let world = bufs.len();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut engines = mem_ring(world, chunk_bytes);
        rt.block_on(async {
            let futs = engines
                .iter_mut()
                .zip(bufs.iter_mut())
                .zip(steps)
                .map(|((e, b), &s)| e.all_reduce::<R>(b, s));
            let results = futures::future::join_all(futs).await;
            results
                .into_iter()
                .zip(bufs)
                .map(|(r, b)| r.map(|()| b))
                .collect()
        })
    }

    fn naive<R: Reduction>(bufs: &[Vec<R::Elem>]) -> Vec<R::Elem> {
        let mut acc = bufs[0].clone();
        for b in &bufs[1..] {
            R::reduce(&mut acc, b);
        }
        acc
    }

    /// `world` buffers of equal length out of `flat`.
    fn split<T: Clone>(flat: &[T], world: usize) -> Vec<Vec<T>> {
        let len = flat.len() / world;
        (0..world)
            .map(|r| flat[r * len..(r + 1) * len].to_vec())
            .collect()
    }

    /// World size, length (often below the world size), bytes per sub-chunk.
    fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
        (1usize..=6, prop_oneof![0usize..8, 0usize..200], 1usize..64)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn f32_sum_equals_the_naive_sum(
            (world, len, chunk, vals) in shape().prop_flat_map(|(w, l, c)| {
                (Just(w), Just(l), Just(c), proptest::collection::vec(-4096i32..4096, w * l))
            })
        ) {
            // Multiples of 1/8 below 2^9: every partial sum is exact in f32, so the order
            // of summation cannot matter and equality must be exact.
            let flat: Vec<f32> = vals.iter().map(|&v| v as f32 / 8.0).collect();
            let bufs = split(&flat, world);
            let want = naive::<SumF32>(&bufs);
            for r in run_ring::<SumF32>(bufs, chunk * 4, &vec![3; world]) {
                prop_assert_eq!(r.unwrap(), want.clone(), "world {} len {}", world, len);
            }
        }

        #[test]
        fn u64_wrapping_sum_is_exact(
            (world, len, chunk, flat) in shape().prop_flat_map(|(w, l, c)| {
                (Just(w), Just(l), Just(c), proptest::collection::vec(any::<u64>(), w * l))
            })
        ) {
            let bufs = split(&flat, world);
            let want = naive::<WrappingSumU64>(&bufs);
            for r in run_ring::<WrappingSumU64>(bufs, chunk * 8, &vec![3; world]) {
                prop_assert_eq!(r.unwrap(), want.clone(), "world {} len {}", world, len);
            }
        }

        #[test]
        fn u32_wrapping_sum_is_exact(
            (world, _len, chunk, flat) in shape().prop_flat_map(|(w, l, c)| {
                (Just(w), Just(l), Just(c), proptest::collection::vec(any::<u32>(), w * l))
            })
        ) {
            let bufs = split(&flat, world);
            let want = naive::<WrappingSumU32>(&bufs);
            for r in run_ring::<WrappingSumU32>(bufs, chunk * 4, &vec![3; world]) {
                prop_assert_eq!(r.unwrap(), want.clone());
            }
        }

        #[test]
        fn arbitrary_floats_match_the_simulation_bit_for_bit(
            (world, _len, chunk, flat) in shape().prop_flat_map(|(w, l, c)| {
                (Just(w), Just(l), Just(c),
                 proptest::collection::vec(proptest::num::f32::NORMAL, w * l))
            })
        ) {
            let bufs = split(&flat, world);
            let mut sim = bufs.clone();
            ring::simulate::<SumF32>(&mut sim);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (r, s) in run_ring::<SumF32>(bufs, chunk * 4, &vec![3; world]).into_iter().zip(&sim) {
                // Replicas agree with each other because each agrees with rank 0 of the
                // simulation, whose replicas are identical by construction.
                prop_assert_eq!(bits(&r.unwrap()), bits(s));
                prop_assert_eq!(bits(s), bits(&sim[0]));
            }
        }
    }

    #[test]
    fn a_step_or_reduction_mismatch_is_a_tag_error() {
        let r = run_ring::<SumF32>(vec![vec![1.0; 10], vec![2.0; 10]], 16, &[1, 2]);
        assert!(r
            .iter()
            .all(|r| matches!(r, Err(WorkerError::TagMismatch { .. }))));
    }

    #[test]
    fn a_closed_link_is_peer_lost_with_the_neighbours_rank() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut engines = mem_ring(3, 64);
        let mut e0 = engines.remove(0);
        drop(engines);
        let mut buf = vec![1.0f32; 30];
        let err = rt
            .block_on(e0.all_reduce::<SumF32>(&mut buf, 1))
            .unwrap_err();
        // Rank 0's left neighbour is rank 2 in a ring of three.
        assert!(
            matches!(
                err,
                WorkerError::PeerLost {
                    rank: 2 | 1,
                    generation: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_silent_peer_times_out_and_cancellation_wins() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut engines = mem_ring(2, 64);
        engines[0].config.timeout = Duration::from_millis(100);
        let mut buf = vec![1.0f32; 4];
        let err = rt
            .block_on(engines[0].all_reduce::<SumF32>(&mut buf, 1))
            .unwrap_err();
        assert!(
            matches!(err, WorkerError::PeerLost { rank: 1, .. }),
            "{err}"
        );
        engines[1].config.timeout = Duration::from_secs(60);
        engines[1].cancel.cancel();
        let err = rt
            .block_on(engines[1].all_reduce::<SumF32>(&mut buf, 1))
            .unwrap_err();
        assert!(matches!(err, WorkerError::Cancelled), "{err}");
    }

    #[test]
    fn a_world_of_one_is_a_no_op() {
        let r = run_ring::<WrappingSumU64>(vec![vec![5, 6, 7]], 8, &[1]);
        assert_eq!(r[0].as_ref().unwrap(), &vec![5, 6, 7]);
    }
}
