//! The ring's bulk data plane over plain TCP, negotiated through the gRPC control plane.
//!
//! gRPC streams cost a protobuf encode, an HTTP/2 frame and a copy per chunk, and top out
//! well below the loopback link. Like gloo beside its store, each worker also listens on
//! a plain TCP port; the coordinator hands every rank its neighbours' data addresses and
//! a per-generation secret token. A connection opens with a hello (magic, job,
//! generation, sending rank, token); the receiver hands it to the generation's engine,
//! which accepts it only with the right token and the right left-hand neighbour, so a
//! stranger's connection is refused.
//!
//! Frames are a fixed 40-byte header (magic, op, step, phase, round, chunk, length, four
//! reserved zero bytes) followed by the little-endian payload. This module is a
//! [`Transport`] of the one ring engine ([`crate::engine`]): a send writes straight from
//! the caller's buffer, and a receive reads straight into the slice the engine names
//! (the buffer itself in all-gather, an aligned scratch in reduce-scatter).
//!
//! **Ranks on one host** talk over a Unix socket instead (Linux abstract namespace, so
//! there is no file to clean up). A worker advertises a local socket name beside its TCP
//! port; the name starts with the host's boot id. A rank dials its right neighbour's
//! name only when the boot id is its own, and uses the link only when the listener runs
//! as the same user; otherwise, or when the dial fails or takes over 2 s (another network
//! namespace, a full accept queue), it falls back to TCP. The hello and token check are
//! the same on both. On this
//! project's 2-core machine loopback TCP moved 3.3 GB/s each way when both directions
//! were busy, against 8.8 GB/s for a Unix socket (BENCHMARKS.md): the kernel's TCP
//! path, not the copy, is what costs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::engine::{ChunkReceiver, ChunkSender, LinkError, Transport};
use crate::error::WorkerError;
use crate::ring::Tag;

const HELLO_MAGIC: u32 = 0x5254_4450; // "RTDP"
const FRAME_MAGIC: u32 = 0x5254_4446; // "RTDF"
const HEADER: usize = 40;
/// Longest job id a hello may carry.
const MAX_JOB_ID: usize = 256;

/// A per-generation secret shared by the ranks of one generation.
pub type Token = [u8; 16];

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A data-plane connection: TCP, or a Unix socket between ranks on one host.
enum DataStream {
    Tcp(TcpStream),
    #[cfg(target_os = "linux")]
    Unix(tokio::net::UnixStream),
}

impl DataStream {
    fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            DataStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            #[cfg(target_os = "linux")]
            DataStream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Prefix of every same-host socket name; the host's boot id follows it.
#[cfg(target_os = "linux")]
const LOCAL_PREFIX: &str = "ringtrain-data-";

/// This host's boot id (32 hex digits), which names same-host sockets: a rank dials a
/// neighbour's socket only when the name carries its own host's boot id. Otherwise a
/// user on another host could bind the advertised name there and receive that rank's
/// hello (with the generation's token) and its gradients.
#[cfg(target_os = "linux")]
fn boot_id() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id: String = raw.trim().chars().filter(|c| *c != '-').collect();
    (id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// Binds this worker's same-host data socket: a Unix socket in the Linux abstract
/// namespace, named after the host's boot id, the process and `tag`, so no two live
/// workers share a name. Returns the listener and the name to advertise.
#[cfg(target_os = "linux")]
pub fn bind_local(tag: &str) -> std::io::Result<(tokio::net::UnixListener, String)> {
    use std::os::linux::net::SocketAddrExt;
    let boot = boot_id().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no readable /proc/sys/kernel/random/boot_id",
        )
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!(
        "{LOCAL_PREFIX}{boot}-{}-{tag}-{nanos:x}",
        std::process::id()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    Ok((tokio::net::UnixListener::from_std(listener)?, name))
}

/// Bytes a same-host socket may hold in flight. A Unix stream socket's default (about
/// 200 KiB) makes every 1 MiB chunk several wake-ups of the peer; with it the ring at
/// N = 2 ran slower over Unix sockets than over TCP. Only the sending side's buffer
/// counts for a Unix stream. The kernel caps it at `net.core.wmem_max`, which is fine: a
/// smaller buffer only costs speed.
#[cfg(target_os = "linux")]
const LOCAL_SOCKET_BUFFER: usize = 4 << 20;

/// How long a same-host dial may take before the rank falls back to TCP (a local
/// connect normally completes at once; it waits only when the listener's accept queue is
/// full).
#[cfg(target_os = "linux")]
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Dials a same-host data socket by its abstract name. `Ok(None)` when the name is not
/// this host's (another boot id), nobody listens on it here (another host or network
/// namespace), the dial times out, or the listener runs as another user: the caller then
/// uses TCP.
#[cfg(target_os = "linux")]
async fn connect_local(name: &str) -> Option<DataStream> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::fs::MetadataExt;
    let boot = boot_id()?;
    if !name.starts_with(&format!("{LOCAL_PREFIX}{boot}-")) {
        return None;
    }
    let addr: tokio::net::unix::SocketAddr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .ok()?
            .into();
    let stream = tokio::time::timeout(
        LOCAL_CONNECT_TIMEOUT,
        tokio::net::UnixStream::connect_addr(&addr),
    )
    .await
    .ok()?
    .ok()?;
    // The listener must be one of ours: same user as this process.
    let me = std::fs::metadata("/proc/self").ok()?.uid();
    if stream.peer_cred().ok()?.uid() != me {
        warn!(
            socket = name,
            "same-host data socket belongs to another user; using TCP"
        );
        return None;
    }
    let sock = socket2::SockRef::from(&stream);
    if let Err(e) = sock.set_send_buffer_size(LOCAL_SOCKET_BUFFER) {
        debug!(error = %e, "cannot enlarge the same-host socket buffer; the link is slower");
    }
    Some(DataStream::Unix(stream))
}

#[cfg(not(target_os = "linux"))]
async fn connect_local(_name: &str) -> Option<DataStream> {
    None
}

/// An accepted, not yet claimed, connection from a left-hand neighbour.
struct Pending {
    from_rank: u32,
    token: Token,
    stream: DataStream,
}

enum Slot {
    Arrived(Pending),
    Waiting(oneshot::Sender<Pending>),
}

/// Routes accepted data connections to the generation that claims them.
#[derive(Default)]
pub struct DataHub {
    slots: Mutex<HashMap<(String, u64), Slot>>,
}

impl std::fmt::Debug for DataHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataHub")
    }
}

impl DataHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u64), Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, job: String, generation: u64, p: Pending) {
        let mut slots = self.lock();
        match slots.remove(&(job.clone(), generation)) {
            Some(Slot::Waiting(tx)) => {
                if let Err(p) = tx.send(p) {
                    // The claimant gave up (its deadline passed) as this arrived.
                    warn!(
                        job = %job,
                        generation,
                        from_rank = p.from_rank,
                        "dropping a data connection nobody waits for any more"
                    );
                }
            }
            // A second connection for the same generation replaces an unclaimed one.
            _ => {
                slots.insert((job, generation), Slot::Arrived(p));
            }
        }
    }

    async fn claim(&self, job: &str, generation: u64, timeout: Duration) -> Option<Pending> {
        let rx = {
            let mut slots = self.lock();
            match slots.remove(&(job.to_string(), generation)) {
                Some(Slot::Arrived(p)) => return Some(p),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    slots.insert((job.to_string(), generation), Slot::Waiting(tx));
                    rx
                }
            }
        };
        let got = tokio::time::timeout(timeout, rx)
            .await
            .ok()
            .and_then(|r| r.ok());
        if got.is_none() {
            self.lock().remove(&(job.to_string(), generation));
        }
        got
    }
}

/// Accepts TCP data connections until `stop`, reading each hello and handing the stream
/// to `hub`. Malformed hellos are dropped.
pub async fn accept_loop(listener: TcpListener, hub: Arc<DataHub>, stop: CancellationToken) {
    let listener = &listener;
    accept_each(hub, stop, move || async move {
        let (stream, peer) = listener.accept().await?;
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, peer = %peer, "cannot set TCP_NODELAY on a data connection");
        }
        Ok((DataStream::Tcp(stream), peer.to_string()))
    })
    .await
}

/// [`accept_loop`] for the same-host Unix socket of [`bind_local`].
#[cfg(target_os = "linux")]
pub async fn accept_local_loop(
    listener: tokio::net::UnixListener,
    hub: Arc<DataHub>,
    stop: CancellationToken,
) {
    let listener = &listener;
    accept_each(hub, stop, move || async move {
        let (stream, _) = listener.accept().await?;
        Ok((DataStream::Unix(stream), "local socket".to_string()))
    })
    .await
}

/// The accept loop of both listeners: each accepted stream (and a name for logs) goes
/// to [`receive_hello`] on its own task; a failed accept is logged and retried shortly.
/// The hello tasks belong to the loop: finished ones are reaped as it goes, and on
/// `stop` the rest (each bounded by the hello deadline) are aborted and awaited.
async fn accept_each<F, Fut>(hub: Arc<DataHub>, stop: CancellationToken, mut accept: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(DataStream, String)>>,
{
    let mut hellos = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(done) = hellos.join_next(), if !hellos.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, "a data-connection hello task failed");
                }
                continue;
            }
            r = accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "data plane accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        hellos.spawn(receive_hello(stream, hub.clone(), peer));
    }
    hellos.shutdown().await;
}

async fn receive_hello(mut stream: DataStream, hub: Arc<DataHub>, peer: String) {
    let hello = tokio::time::timeout(Duration::from_secs(10), async {
        match &mut stream {
            DataStream::Tcp(s) => read_hello(s).await,
            #[cfg(target_os = "linux")]
            DataStream::Unix(s) => read_hello(s).await,
        }
    })
    .await;
    match hello {
        Ok(Ok((job, generation, from_rank, token))) => hub.deliver(
            job,
            generation,
            Pending {
                from_rank,
                token,
                stream,
            },
        ),
        _ => warn!(peer = %peer, "dropping a data connection without a valid hello"),
    }
}

async fn read_hello<R: AsyncRead + Unpin>(s: &mut R) -> std::io::Result<(String, u64, u32, Token)> {
    let magic = s.read_u32_le().await?;
    let len = s.read_u32_le().await? as usize;
    if magic != HELLO_MAGIC || len > MAX_JOB_ID {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad hello",
        ));
    }
    let mut job = vec![0u8; len];
    s.read_exact(&mut job).await?;
    let generation = s.read_u64_le().await?;
    let from_rank = s.read_u32_le().await?;
    let mut token = [0u8; 16];
    s.read_exact(&mut token).await?;
    let job = String::from_utf8(job)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad job id"))?;
    Ok((job, generation, from_rank, token))
}

/// Everything needed to open one generation's data links.
#[derive(Debug, Clone)]
pub struct DataPeers {
    /// Data-plane addresses in rank order.
    pub addrs: Vec<String>,
    /// The generation's secret.
    pub token: Token,
    /// Same-host socket names in rank order (empty: none offered); may be empty.
    pub locals: Vec<String>,
}

/// One rank's two data links for a generation (TCP, or Unix sockets on one host).
pub struct SocketLink {
    local: bool,
    halves: Option<(SocketSender, SocketReceiver)>,
}

/// The outgoing socket to the right neighbour.
pub struct SocketSender(WriteHalf);

/// The incoming socket from the left neighbour.
pub struct SocketReceiver {
    stream: ReadHalf,
    job: String,
    generation: u64,
}

impl std::fmt::Debug for SocketLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketLink")
            .field("local", &self.local)
            .field("connected", &self.halves.is_some())
            .finish()
    }
}

/// A frame header: magic, op, step, phase, round, chunk, payload bytes, reserved zeros.
fn header(tag: &Tag, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4..12].copy_from_slice(&tag.op.to_le_bytes());
    h[12..20].copy_from_slice(&tag.step.to_le_bytes());
    h[20..24].copy_from_slice(&tag.phase.code().to_le_bytes());
    h[24..28].copy_from_slice(&tag.round.to_le_bytes());
    h[28..32].copy_from_slice(&tag.chunk.to_le_bytes());
    h[32..36].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// A received header in words, for a mismatch report.
fn describe(h: &[u8; HEADER]) -> String {
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        u64::from_le_bytes([
            h[i],
            h[i + 1],
            h[i + 2],
            h[i + 3],
            h[i + 4],
            h[i + 5],
            h[i + 6],
            h[i + 7],
        ])
    };
    format!(
        "magic {:#x} step {} op {} phase {} round {} chunk {} ({} bytes)",
        u32_at(0),
        u64_at(12),
        u64_at(4),
        u32_at(20),
        u32_at(24),
        u32_at(28),
        u32_at(32)
    )
}

impl ChunkSender for SocketSender {
    async fn send(&mut self, tag: &Tag, data: &[u8]) -> Result<(), LinkError> {
        let io =
            |e: std::io::Error| LinkError::Broken(format!("data link to right neighbour: {e}"));
        self.0
            .write_all(&header(tag, data.len()))
            .await
            .map_err(io)?;
        self.0.write_all(data).await.map_err(io)
    }
}

impl ChunkReceiver for SocketReceiver {
    async fn recv_into(&mut self, tag: &Tag, dst: &mut [u8]) -> Result<(), LinkError> {
        let io =
            |e: std::io::Error| LinkError::Broken(format!("data link from left neighbour: {e}"));
        let mut h = [0u8; HEADER];
        self.stream.read_exact(&mut h).await.map_err(io)?;
        let want = header(tag, dst.len());
        if h != want {
            // Only the length differs: the tag is right, the payload is not.
            if h[..32] == want[..32] && h[36..] == want[36..] {
                let got = u32::from_le_bytes([h[32], h[33], h[34], h[35]]) as usize;
                return Err(LinkError::Size {
                    expected: dst.len(),
                    got,
                });
            }
            return Err(LinkError::Tag {
                expected: format!(
                    "job {} generation {} {tag} ({} bytes)",
                    self.job,
                    self.generation,
                    dst.len()
                ),
                got: describe(&h),
            });
        }
        self.stream.read_exact(dst).await.map_err(io)?;
        Ok(())
    }
}

impl Transport for SocketLink {
    type Sender = SocketSender;
    type Receiver = SocketReceiver;

    fn halves(&mut self) -> Option<(&mut SocketSender, &mut SocketReceiver)> {
        self.halves.as_mut().map(|(s, r)| (s, r))
    }

    async fn close(mut self, timeout: Duration) {
        if let Some((mut tx, _)) = self.halves.take() {
            match tokio::time::timeout(timeout, tx.0.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "data link to right neighbour closed uncleanly"),
                Err(_) => warn!("data link to right neighbour did not flush within the deadline"),
            }
        }
    }
}

impl SocketLink {
    /// Dials the right neighbour and waits for the left one's connection. A world of
    /// one has no links.
    pub async fn connect(
        hub: &DataHub,
        job: &str,
        generation: u64,
        rank: usize,
        peers: &DataPeers,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Self, WorkerError> {
        tokio::select! {
            _ = cancel.cancelled() => Err(WorkerError::Cancelled),
            r = Self::dial_and_claim(hub, job, generation, rank, peers, timeout) => r,
        }
    }

    async fn dial_and_claim(
        hub: &DataHub,
        job: &str,
        generation: u64,
        rank: usize,
        peers: &DataPeers,
        timeout: Duration,
    ) -> Result<Self, WorkerError> {
        let world = peers.addrs.len();
        if world <= 1 {
            return Ok(SocketLink {
                local: false,
                halves: None,
            });
        }
        let right = (rank + 1) % world;
        let left = ((rank + world - 1) % world) as u32;
        let lost = |r: usize, d: String| WorkerError::PeerLost {
            rank: r as u32,
            generation,
            detail: d,
        };
        let addr = &peers.addrs[right];
        let local = match peers.locals.get(right).filter(|name| !name.is_empty()) {
            Some(name) => connect_local(name).await,
            None => None,
        };
        let is_local = local.is_some();
        let out = match local {
            Some(s) => s,
            None => {
                let start = tokio::time::Instant::now();
                let mut backoff = Duration::from_millis(20);
                let s = loop {
                    match TcpStream::connect(addr).await {
                        Ok(s) => break s,
                        Err(e) if start.elapsed() >= timeout => {
                            return Err(lost(right, format!("data connect to {addr}: {e}")))
                        }
                        Err(_) => {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                };
                s.set_nodelay(true)
                    .map_err(|e| lost(right, e.to_string()))?;
                DataStream::Tcp(s)
            }
        };
        let (_, mut out) = out.split();
        let mut hello = Vec::with_capacity(40 + job.len());
        hello.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        hello.extend_from_slice(&(job.len() as u32).to_le_bytes());
        hello.extend_from_slice(job.as_bytes());
        hello.extend_from_slice(&generation.to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&peers.token);
        out.write_all(&hello)
            .await
            .map_err(|e| lost(right, e.to_string()))?;
        let incoming = hub.claim(job, generation, timeout).await.ok_or_else(|| {
            lost(
                left as usize,
                format!("no data connection within {timeout:?}"),
            )
        })?;
        if incoming.token != peers.token || incoming.from_rank != left {
            return Err(WorkerError::TagMismatch {
                expected: format!("data connection from rank {left} with this generation's token"),
                got: format!(
                    "rank {} with a {} token",
                    incoming.from_rank,
                    if incoming.token == peers.token {
                        "valid"
                    } else {
                        "wrong"
                    }
                ),
            });
        }
        let (rx, _) = incoming.stream.split();
        Ok(SocketLink {
            local: is_local,
            halves: Some((
                SocketSender(out),
                SocketReceiver {
                    stream: rx,
                    job: job.to_string(),
                    generation,
                },
            )),
        })
    }

    /// Whether the link to the right-hand neighbour is a same-host Unix socket.
    pub fn is_local(&self) -> bool {
        self.local
    }
}
