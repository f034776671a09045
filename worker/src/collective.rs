//! The ring's gRPC transport: tagged chunks in `Collective` streams.
//!
//! Each worker opens one client stream to its right-hand neighbour per generation
//! ([`GrpcLink::connect`]) and receives its left-hand neighbour's stream through the
//! [`CollectiveHub`], which the gRPC adapter feeds. The ring itself (schedule, deadlines,
//! cancellation, reduction) is the one engine of [`crate::engine`]; this module only moves
//! and checks tagged chunks. Every send and receive also has its own deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringtrain_proto::v1::{collective_client::CollectiveClient, Phase as WirePhase, RingChunk};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use crate::engine::{ChunkReceiver, ChunkSender, LinkError, Transport};
use crate::error::WorkerError;
use crate::ring::{Phase, Tag};

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

/// Routes incoming ring streams to the generation that consumes them, and owns the
/// outgoing stream tasks of every link.
///
/// The adapter and the engine may arrive in either order, so whichever comes first
/// creates the slot. `std::sync::Mutex` is fine: sections are a map lookup.
#[derive(Debug, Default)]
pub struct CollectiveHub {
    /// The outgoing stream of every link: a dropped link lets its stream drain on its
    /// own, and [`CollectiveHub::shutdown`] waits for what is left.
    tasks: TaskTracker,
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

    /// Waits up to `grace` for every outgoing stream to drain (each also ends by itself
    /// within the ring deadline once its link is gone); links made afterwards are
    /// still tracked, but this call no longer waits for them.
    pub async fn shutdown(&self, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                streams = self.tasks.len(),
                "ring streams still open after the shutdown grace"
            );
        }
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

/// This worker's two gRPC ring links for one generation.
#[derive(Debug)]
pub struct GrpcLink {
    hub: Arc<CollectiveHub>,
    job: String,
    generation: u64,
    halves: Option<(GrpcSender, GrpcReceiver)>,
    call: Option<JoinHandle<()>>,
}

/// The outgoing stream to the right neighbour.
#[derive(Debug)]
pub struct GrpcSender {
    out: mpsc::Sender<RingChunk>,
    job: String,
    generation: u64,
    rank: u32,
    timeout: Duration,
}

/// The incoming stream from the left neighbour, as the hub hands it over.
#[derive(Debug)]
pub struct GrpcReceiver {
    inbox: mpsc::Receiver<Inbound>,
    got_hello: bool,
    job: String,
    generation: u64,
    left: u32,
    timeout: Duration,
}

impl GrpcLink {
    /// Connects to the right neighbour and claims the inbox for the left one.
    /// `peers[i]` is rank i's collective address. A world of one has no links.
    pub async fn connect(
        hub: Arc<CollectiveHub>,
        job: &str,
        generation: u64,
        rank: usize,
        peers: &[String],
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<Self, WorkerError> {
        let world = peers.len();
        let mut link = GrpcLink {
            hub: hub.clone(),
            job: job.to_string(),
            generation,
            halves: None,
            call: None,
        };
        if world <= 1 {
            return Ok(link);
        }
        let inbox = hub.take_inbox(job, generation).ok_or_else(|| {
            WorkerError::Plan(format!(
                "ring inbox of job {job} generation {generation} is already in use"
            ))
        })?;
        let right = (rank + 1) % world;
        let channel = dial(&peers[right], timeout, &cancel).await?;
        let mut client = CollectiveClient::new(channel)
            .max_decoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ringtrain_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let peer = peers[right].clone();
        link.call = Some(hub.tasks.spawn(async move {
            if let Err(status) = client.ring(ReceiverStream::new(rx)).await {
                debug!(peer = %peer, %status, "ring stream to right neighbour ended");
            }
        }));
        let mut sender = GrpcSender {
            out: tx,
            job: job.to_string(),
            generation,
            rank: rank as u32,
            timeout,
        };
        let hello = RingChunk {
            job_id: job.to_string(),
            generation,
            phase: WirePhase::Hello as i32,
            from_rank: rank as u32,
            ..RingChunk::default()
        };
        let sent = tokio::select! {
            _ = cancel.cancelled() => return Err(WorkerError::Cancelled),
            r = sender.push(hello) => r,
        };
        sent.map_err(|detail| WorkerError::PeerLost {
            rank: right as u32,
            generation,
            detail,
        })?;
        let receiver = GrpcReceiver {
            inbox,
            got_hello: false,
            job: job.to_string(),
            generation,
            left: ((rank + world - 1) % world) as u32,
            timeout,
        };
        link.halves = Some((sender, receiver));
        Ok(link)
    }
}

impl GrpcSender {
    async fn push(&mut self, msg: RingChunk) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.out.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("stream to right neighbour closed".into()),
            Err(_) => Err(format!("send blocked for {:?}", self.timeout)),
        }
    }
}

impl ChunkSender for GrpcSender {
    async fn send(&mut self, tag: &Tag, data: &[u8]) -> Result<(), LinkError> {
        // tonic needs owned bytes: this copy is the gRPC transport's price.
        let msg = RingChunk {
            job_id: self.job.clone(),
            generation: self.generation,
            step: tag.step,
            op: tag.op,
            phase: tag.phase.code() as i32,
            round: tag.round,
            chunk: tag.chunk,
            from_rank: self.rank,
            data: Bytes::copy_from_slice(data),
        };
        self.push(msg).await.map_err(LinkError::Broken)
    }
}

impl GrpcReceiver {
    async fn next(&mut self) -> Result<RingChunk, LinkError> {
        match tokio::time::timeout(self.timeout, self.inbox.recv()).await {
            Ok(Some(Inbound::Chunk(c))) => Ok(c),
            Ok(Some(Inbound::Broken(e))) => Err(LinkError::Broken(format!(
                "stream from left neighbour failed: {e}"
            ))),
            Ok(None) => Err(LinkError::Broken(
                "stream from left neighbour closed".into(),
            )),
            Err(_) => Err(LinkError::Broken(format!(
                "no ring chunk within {:?}",
                self.timeout
            ))),
        }
    }
}

impl ChunkReceiver for GrpcReceiver {
    async fn recv_into(&mut self, tag: &Tag, dst: &mut [u8]) -> Result<(), LinkError> {
        if !self.got_hello {
            let hello = self.next().await?;
            if hello.phase != WirePhase::Hello as i32 || hello.from_rank != self.left {
                return Err(LinkError::Tag {
                    expected: format!("hello from rank {}", self.left),
                    got: format!("phase {} from rank {}", hello.phase, hello.from_rank),
                });
            }
            self.got_hello = true;
        }
        let c = self.next().await?;
        let same = c.step == tag.step
            && c.op == tag.op
            && u32::try_from(c.phase).ok().and_then(Phase::from_code) == Some(tag.phase)
            && c.round == tag.round
            && c.chunk == tag.chunk
            && c.job_id == self.job
            && c.generation == self.generation
            && c.from_rank == self.left;
        if !same {
            return Err(LinkError::Tag {
                expected: format!(
                    "job {} generation {} {tag} from rank {}",
                    self.job, self.generation, self.left
                ),
                got: format!(
                    "job {} generation {} step {} op {} phase {} round {} chunk {} from rank {}",
                    c.job_id, c.generation, c.step, c.op, c.phase, c.round, c.chunk, c.from_rank
                ),
            });
        }
        if c.data.len() != dst.len() {
            return Err(LinkError::Size {
                expected: dst.len(),
                got: c.data.len(),
            });
        }
        dst.copy_from_slice(&c.data);
        Ok(())
    }
}

impl Transport for GrpcLink {
    type Sender = GrpcSender;
    type Receiver = GrpcReceiver;

    fn halves(&mut self) -> Option<(&mut GrpcSender, &mut GrpcReceiver)> {
        self.halves.as_mut().map(|(s, r)| (s, r))
    }

    async fn close(mut self, timeout: Duration) {
        // Dropping the sender ends the stream once its queue is flushed.
        self.halves.take();
        if let Some(call) = self.call.take() {
            if tokio::time::timeout(timeout, call).await.is_err() {
                warn!(
                    job = %self.job,
                    generation = self.generation,
                    "ring stream to the right neighbour did not drain within the deadline"
                );
            }
        }
    }
}

impl Drop for GrpcLink {
    fn drop(&mut self) {
        self.hub.close(&self.job, self.generation);
        // Dropping the sender ends the outgoing stream once its queue is flushed; the call
        // task then finishes by itself (the hub's tracker owns it). It is not aborted:
        // that could cut off the last chunks a neighbour still needs.
        self.halves.take();
    }
}
