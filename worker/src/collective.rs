//! The networked ring all-reduce over the `Collective` gRPC stream.
//!
//! Each worker opens one client stream to its right-hand neighbour per generation
//! ([`RingLink::connect`]) and receives its left-hand neighbour's stream through the
//! [`CollectiveHub`], which the gRPC adapter feeds. The schedule itself is the pure one in
//! [`crate::ring`]. Every receive and send has a deadline and watches the job's
//! cancellation token: a dead neighbour is a [`WorkerError::PeerLost`], never a hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringtrain_proto::v1::{collective_client::CollectiveClient, Phase, RingChunk};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::error::WorkerError;
use crate::ring;

#[cfg(target_endian = "big")]
compile_error!("ringtrain's wire format is little-endian f32; big-endian hosts are not supported");

/// Messages buffered between the gRPC adapter and the ring engine.
const INBOX_CAPACITY: usize = 64;
/// Messages buffered on the outgoing stream.
const OUTBOX_CAPACITY: usize = 64;

/// HTTP/2 tuning for bulk ring streams, shared by the client and server sides: large
/// frames (the 16 KiB default costs a frame header and a wake-up per 16 KiB) and windows
/// big enough that flow control never idles a loopback link.
pub const H2_MAX_FRAME: u32 = 1 << 20;
/// Per-stream flow-control window.
pub const H2_STREAM_WINDOW: u32 = 16 << 20;
/// Per-connection flow-control window.
pub const H2_CONNECTION_WINDOW: u32 = 32 << 20;

/// What the adapter hands the engine: a chunk, or the news that the stream broke.
#[derive(Debug)]
pub enum Inbound {
    /// A chunk from the left neighbour.
    Chunk(RingChunk),
    /// The left neighbour's stream failed.
    Broken(String),
}

#[derive(Debug)]
struct Slot {
    tx: mpsc::Sender<Inbound>,
    rx: Option<mpsc::Receiver<Inbound>>,
}

/// Routes incoming ring streams to the generation that consumes them.
///
/// The adapter and the engine may arrive in either order, so whichever comes first
/// creates the slot. `std::sync::Mutex` is fine: sections are a map lookup.
#[derive(Debug, Default)]
pub struct CollectiveHub {
    slots: Mutex<HashMap<(String, u64), Slot>>,
    /// Generations whose engine has finished: late streams for them are refused
    /// instead of creating a slot nobody will ever drain.
    closed: Mutex<std::collections::HashSet<(String, u64)>>,
}

/// Most finished generations remembered (oldest forgotten first is not needed: a job's
/// generations are few, and the set is cleared when it grows past this).
const CLOSED_MEMORY: usize = 4096;

impl CollectiveHub {
    fn slot<R>(&self, job: &str, generation: u64, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .entry((job.to_string(), generation))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
                Slot { tx, rx: Some(rx) }
            });
        f(slot)
    }

    /// The sender the adapter forwards a stream into; `None` for a generation that has
    /// already finished here.
    pub fn sender(&self, job: &str, generation: u64) -> Option<mpsc::Sender<Inbound>> {
        let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if closed.contains(&(job.to_string(), generation)) {
            return None;
        }
        drop(closed);
        Some(self.slot(job, generation, |s| s.tx.clone()))
    }

    /// The receiving end for the engine; `None` if it was already taken.
    pub fn take_inbox(&self, job: &str, generation: u64) -> Option<mpsc::Receiver<Inbound>> {
        self.slot(job, generation, |s| s.rx.take())
    }

    /// Forgets a generation once its engine is done.
    pub fn close(&self, job: &str, generation: u64) {
        let key = (job.to_string(), generation);
        {
            let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
            if closed.len() >= CLOSED_MEMORY {
                closed.clear();
            }
            closed.insert(key.clone());
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(&key);
    }
}

/// Tuning of the ring.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// Deadline for any single send or receive.
    pub timeout: Duration,
    /// Largest sub-chunk in f32 elements.
    pub chunk_elems: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            timeout: Duration::from_secs(20),
            chunk_elems: 256 * 1024,
        }
    }
}

/// An HTTP/2 endpoint tuned for bulk streams on a LAN.
pub fn endpoint(addr: &str, timeout: Duration) -> Result<Endpoint, WorkerError> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url.clone())
        .map_err(|e| WorkerError::Connect {
            addr: url,
            detail: e.to_string(),
        })?
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .initial_stream_window_size(Some(H2_STREAM_WINDOW))
        .initial_connection_window_size(Some(H2_CONNECTION_WINDOW))
        .max_frame_size(Some(H2_MAX_FRAME))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(timeout))
}

/// Dials `addr`, retrying with capped backoff until `deadline` has passed.
pub async fn dial(
    addr: &str,
    deadline: Duration,
    cancel: &CancellationToken,
) -> Result<Channel, WorkerError> {
    let ep = endpoint(addr, deadline)?;
    let start = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        match ep.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) if start.elapsed() >= deadline => {
                return Err(WorkerError::Connect {
                    addr: addr.to_string(),
                    detail: e.to_string(),
                })
            }
            Err(_) => {
                tokio::select! {
                    _ = cancel.cancelled() => return Err(WorkerError::Cancelled),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Identity of one collective call, carried by every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    step: u64,
    op: u64,
    phase: Phase,
    round: u32,
    chunk: u32,
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {} op {} {:?} round {} chunk {}",
            self.step, self.op, self.phase, self.round, self.chunk
        )
    }
}

/// This worker's two ring links for one generation.
#[derive(Debug)]
pub struct RingLink {
    hub: Arc<CollectiveHub>,
    job: String,
    generation: u64,
    rank: usize,
    world: usize,
    config: RingConfig,
    cancel: CancellationToken,
    out: Option<mpsc::Sender<RingChunk>>,
    call: Option<JoinHandle<()>>,
    inbox: Option<mpsc::Receiver<Inbound>>,
    got_hello: bool,
    op: u64,
}

impl RingLink {
    /// Connects to the right neighbour and claims the inbox for the left one.
    /// `peers[i]` is rank i's collective address.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        hub: Arc<CollectiveHub>,
        job: &str,
        generation: u64,
        rank: usize,
        peers: &[String],
        config: RingConfig,
        cancel: CancellationToken,
    ) -> Result<Self, WorkerError> {
        let world = peers.len();
        let mut link = RingLink {
            hub: hub.clone(),
            job: job.to_string(),
            generation,
            rank,
            world,
            config,
            cancel: cancel.clone(),
            out: None,
            call: None,
            inbox: None,
            got_hello: false,
            op: 0,
        };
        if world <= 1 {
            return Ok(link);
        }
        link.inbox = hub.take_inbox(job, generation);
        if link.inbox.is_none() {
            return Err(WorkerError::Plan(format!(
                "ring inbox of job {job} generation {generation} is already in use"
            )));
        }
        let right = (rank + 1) % world;
        let channel = dial(&peers[right], config.timeout, &cancel).await?;
        let mut client = CollectiveClient::new(channel)
            .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let peer = peers[right].clone();
        link.call = Some(tokio::spawn(async move {
            if let Err(status) = client.ring(ReceiverStream::new(rx)).await {
                tracing::debug!(peer = %peer, %status, "ring stream to right neighbour ended");
            }
        }));
        link.out = Some(tx);
        let hello = RingChunk {
            job_id: job.to_string(),
            generation,
            phase: Phase::Hello as i32,
            from_rank: rank as u32,
            ..RingChunk::default()
        };
        link.send(hello).await?;
        Ok(link)
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    fn left(&self) -> u32 {
        ((self.rank + self.world - 1) % self.world) as u32
    }

    fn right(&self) -> u32 {
        ((self.rank + 1) % self.world) as u32
    }

    fn lost(&self, rank: u32, detail: impl Into<String>) -> WorkerError {
        WorkerError::PeerLost {
            rank,
            generation: self.generation,
            detail: detail.into(),
        }
    }

    async fn send(&self, msg: RingChunk) -> Result<(), WorkerError> {
        let out = self
            .out
            .as_ref()
            .ok_or_else(|| self.lost(self.right(), "no link"))?;
        send_on(out, msg, &self.cancel, self.config.timeout)
            .await
            .map_err(|d| self.classify(self.right(), d))
    }

    fn classify(&self, rank: u32, detail: String) -> WorkerError {
        if self.cancel.is_cancelled() {
            WorkerError::Cancelled
        } else {
            self.lost(rank, detail)
        }
    }

    /// Sums `buf` element-wise across all ranks, in place. Every rank ends with identical
    /// bytes. `step` tags the chunks so a stale or foreign message is caught.
    pub async fn all_reduce(&mut self, buf: &mut [f32], step: u64) -> Result<(), WorkerError> {
        let n = self.world;
        if n <= 1 {
            return Ok(());
        }
        self.op += 1;
        let (left, right) = (self.left(), self.right());
        let segs = ring::segments(buf.len(), n);
        let out = self
            .out
            .clone()
            .ok_or_else(|| self.lost(right, "no link to right neighbour"))?;
        for phase in [Phase::ReduceScatter, Phase::AllGather] {
            for round in 0..n - 1 {
                let (send_seg, recv_seg) = if phase == Phase::ReduceScatter {
                    (
                        segs[ring::reduce_scatter_send(self.rank, round, n)].clone(),
                        segs[ring::reduce_scatter_recv(self.rank, round, n)].clone(),
                    )
                } else {
                    (
                        segs[ring::all_gather_send(self.rank, round, n)].clone(),
                        segs[ring::all_gather_recv(self.rank, round, n)].clone(),
                    )
                };
                let (op, chunk_elems) = (self.op, self.config.chunk_elems);
                let tag = move |chunk: usize| Tag {
                    step,
                    op,
                    phase,
                    round: round as u32,
                    chunk: chunk as u32,
                };
                // Encode the outgoing segment first (a copy into owned bytes), so sending
                // and receiving can run at once without borrowing `buf` twice; running
                // both halves together is what keeps a segment larger than the stream
                // buffers from deadlocking the ring.
                let outgoing: Vec<RingChunk> = ring::sub_chunks(send_seg, chunk_elems)
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| RingChunk {
                        job_id: self.job.clone(),
                        generation: self.generation,
                        step,
                        op,
                        phase: phase as i32,
                        round: round as u32,
                        chunk: i as u32,
                        from_rank: self.rank as u32,
                        data: Bytes::copy_from_slice(bytemuck::cast_slice(&buf[r])),
                    })
                    .collect();
                let (cancel, timeout) = (self.cancel.clone(), self.config.timeout);
                let send_all = async {
                    for m in outgoing {
                        send_on(&out, m, &cancel, timeout).await?;
                    }
                    Ok::<(), String>(())
                };
                let mut rx = Receiver {
                    inbox: self.inbox.as_mut(),
                    got_hello: &mut self.got_hello,
                    cancel: &self.cancel,
                    timeout,
                    job: &self.job,
                    generation: self.generation,
                    left,
                };
                let recv_all = async {
                    for (i, r) in ring::sub_chunks(recv_seg, chunk_elems)
                        .into_iter()
                        .enumerate()
                    {
                        let c = rx.expect(tag(i)).await?;
                        let dst = &mut buf[r];
                        if c.data.len() != dst.len() * 4 {
                            return Err(WorkerError::ChunkSize {
                                expected: dst.len() * 4,
                                got: c.data.len(),
                            });
                        }
                        let src = crate::wire::f32s_le(&c.data);
                        if phase == Phase::ReduceScatter {
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        } else {
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d = s);
                        }
                    }
                    Ok::<(), WorkerError>(())
                };
                let (sent, received) = tokio::join!(send_all, recv_all);
                received?;
                sent.map_err(|d| {
                    if self.cancel.is_cancelled() {
                        WorkerError::Cancelled
                    } else {
                        self.lost(right, d)
                    }
                })?;
            }
        }
        Ok(())
    }
}

async fn send_on(
    out: &mpsc::Sender<RingChunk>,
    msg: RingChunk,
    cancel: &CancellationToken,
    timeout: Duration,
) -> Result<(), String> {
    tokio::select! {
        _ = cancel.cancelled() => Err("cancelled".into()),
        r = tokio::time::timeout(timeout, out.send(msg)) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("stream to right neighbour closed".into()),
            Err(_) => Err(format!("send blocked for {timeout:?}")),
        }
    }
}

/// The receiving half of a link, borrowed for one collective call.
struct Receiver<'a> {
    inbox: Option<&'a mut mpsc::Receiver<Inbound>>,
    got_hello: &'a mut bool,
    cancel: &'a CancellationToken,
    timeout: Duration,
    job: &'a str,
    generation: u64,
    left: u32,
}

impl Receiver<'_> {
    fn lost(&self, detail: String) -> WorkerError {
        if self.cancel.is_cancelled() {
            WorkerError::Cancelled
        } else {
            WorkerError::PeerLost {
                rank: self.left,
                generation: self.generation,
                detail,
            }
        }
    }

    async fn next(&mut self) -> Result<RingChunk, WorkerError> {
        let (cancel, timeout) = (self.cancel, self.timeout);
        let Some(inbox) = self.inbox.as_deref_mut() else {
            return Err(self.lost("no inbox".into()));
        };
        let r = tokio::select! {
            _ = cancel.cancelled() => Err(String::new()),
            r = tokio::time::timeout(timeout, inbox.recv()) => match r {
                Ok(Some(Inbound::Chunk(c))) => Ok(c),
                Ok(Some(Inbound::Broken(e))) => Err(format!("stream from left neighbour failed: {e}")),
                Ok(None) => Err("stream from left neighbour closed".into()),
                Err(_) => Err(format!("no ring chunk within {timeout:?}")),
            }
        };
        r.map_err(|d| self.lost(d))
    }

    /// Receives one chunk and checks its tag (and, the first time, the hello).
    async fn expect(&mut self, tag: Tag) -> Result<RingChunk, WorkerError> {
        if !*self.got_hello {
            let hello = self.next().await?;
            if hello.phase != Phase::Hello as i32 || hello.from_rank != self.left {
                return Err(WorkerError::TagMismatch {
                    expected: format!("hello from rank {}", self.left),
                    got: format!("phase {} from rank {}", hello.phase, hello.from_rank),
                });
            }
            *self.got_hello = true;
        }
        let c = self.next().await?;
        let got = Tag {
            step: c.step,
            op: c.op,
            phase: Phase::try_from(c.phase).unwrap_or(Phase::Hello),
            round: c.round,
            chunk: c.chunk,
        };
        if got != tag
            || c.job_id != self.job
            || c.generation != self.generation
            || c.from_rank != self.left
        {
            return Err(WorkerError::TagMismatch {
                expected: format!(
                    "job {} generation {} {tag} from rank {}",
                    self.job, self.generation, self.left
                ),
                got: format!(
                    "job {} generation {} {got} from rank {}",
                    c.job_id, c.generation, c.from_rank
                ),
            });
        }
        Ok(c)
    }
}

impl RingLink {
    /// Ends the outgoing stream after everything queued on it has been sent, waiting at
    /// most the collective deadline. Call it once the last collective is done: dropping
    /// a link also ends the stream, but without waiting for the queue to drain.
    pub async fn close(mut self) {
        self.out.take();
        if let Some(call) = self.call.take() {
            let _ = tokio::time::timeout(self.config.timeout, call).await;
        }
    }
}

impl Drop for RingLink {
    fn drop(&mut self) {
        self.hub.close(&self.job, self.generation);
        // Dropping the sender ends the outgoing stream once its queue is flushed; the call
        // task then finishes by itself. It is not aborted: that could cut off the last
        // chunks a neighbour still needs.
        self.out.take();
    }
}

/// The ring of one generation over whichever data plane the coordinator chose.
#[derive(Debug)]
pub enum Ring {
    /// Chunks in gRPC `Collective` streams.
    Grpc(RingLink),
    /// Chunks over plain TCP, negotiated through the control plane.
    Tcp(crate::tcp_ring::TcpRing),
}

impl Ring {
    /// Sums `buf` element-wise across all ranks, in place.
    pub async fn all_reduce(&mut self, buf: &mut [f32], step: u64) -> Result<(), WorkerError> {
        match self {
            Ring::Grpc(r) => r.all_reduce(buf, step).await,
            Ring::Tcp(r) => r.all_reduce(buf, step).await,
        }
    }

    /// Ends the outgoing link after everything queued has been sent.
    pub async fn close(self) {
        match self {
            Ring::Grpc(r) => r.close().await,
            Ring::Tcp(r) => r.close().await,
        }
    }
}
