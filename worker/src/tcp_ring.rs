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
//! Frames are a fixed 40-byte header (magic, op, step, phase, round, chunk, length)
//! followed by little-endian f32 payload. Sends write straight from the parameter buffer
//! and all-gather reads straight into it; reduce-scatter reads into a scratch buffer and
//! adds. The schedule is the pure one in [`crate::ring`].
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
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::WorkerError;
use crate::ring;

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
    let _ = sock.set_send_buffer_size(LOCAL_SOCKET_BUFFER);
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
                let _ = tx.send(p);
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
        let _ = stream.set_nodelay(true);
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
async fn accept_each<F, Fut>(hub: Arc<DataHub>, stop: CancellationToken, mut accept: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(DataStream, String)>>,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "data plane accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(receive_hello(stream, hub.clone(), peer));
    }
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
pub struct TcpRing {
    job: String,
    generation: u64,
    rank: usize,
    world: usize,
    timeout: Duration,
    chunk_elems: usize,
    cancel: CancellationToken,
    tx: Option<WriteHalf>,
    rx: Option<ReadHalf>,
    local: bool,
    scratch: Vec<f32>,
    op: u64,
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing")
            .field("job", &self.job)
            .field("generation", &self.generation)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl TcpRing {
    /// Dials the right neighbour and waits for the left one's connection.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        hub: &DataHub,
        job: &str,
        generation: u64,
        rank: usize,
        peers: &DataPeers,
        timeout: Duration,
        chunk_elems: usize,
        cancel: CancellationToken,
    ) -> Result<Self, WorkerError> {
        let world = peers.addrs.len();
        let mut ring = TcpRing {
            job: job.to_string(),
            generation,
            rank,
            world,
            timeout,
            chunk_elems: chunk_elems.max(1024),
            cancel,
            tx: None,
            rx: None,
            scratch: Vec::new(),
            op: 0,
            local: false,
        };
        if world <= 1 {
            return Ok(ring);
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
        ring.local = local.is_some();
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
        ring.rx = Some(rx);
        ring.tx = Some(out);
        Ok(ring)
    }

    /// Whether the link to the right-hand neighbour is a same-host Unix socket.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// Sums `buf` element-wise across all ranks, in place; every rank ends with
    /// identical bytes.
    pub async fn all_reduce(&mut self, buf: &mut [f32], step: u64) -> Result<(), WorkerError> {
        let n = self.world;
        if n <= 1 {
            return Ok(());
        }
        self.op += 1;
        let segs = ring::segments(buf.len(), n);
        let (left, right) = (
            ((self.rank + n - 1) % n) as u32,
            ((self.rank + 1) % n) as u32,
        );
        let generation = self.generation;
        let (Some(tx), Some(rx)) = (self.tx.as_mut(), self.rx.as_mut()) else {
            return Err(WorkerError::PeerLost {
                rank: right,
                generation,
                detail: "no data link".into(),
            });
        };
        for phase in [1u32, 2] {
            for round in 0..n - 1 {
                let (send_seg, recv_seg) = if phase == 1 {
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
                // The two segments are disjoint: split the buffer so one half is read
                // for sending while the other is written by the receive.
                let (send, recv): (&[f32], &mut [f32]) = if send_seg.end <= recv_seg.start {
                    let (a, b) = buf.split_at_mut(recv_seg.start);
                    (&a[send_seg.clone()], &mut b[..recv_seg.len()])
                } else {
                    // Otherwise the receive segment lies wholly before the send segment.
                    let (a, b) = buf.split_at_mut(send_seg.start);
                    (&b[..send_seg.len()], &mut a[recv_seg.clone()])
                };
                let hdr = |chunk: usize, len: usize| {
                    let mut h = [0u8; HEADER];
                    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
                    h[4..12].copy_from_slice(&self.op.to_le_bytes());
                    h[12..20].copy_from_slice(&step.to_le_bytes());
                    h[20..24].copy_from_slice(&phase.to_le_bytes());
                    h[24..28].copy_from_slice(&(round as u32).to_le_bytes());
                    h[28..32].copy_from_slice(&(chunk as u32).to_le_bytes());
                    h[32..36].copy_from_slice(&((len * 4) as u32).to_le_bytes());
                    h
                };
                let chunk_elems = self.chunk_elems;
                let send_all = async {
                    for (i, r) in ring::sub_chunks(0..send.len(), chunk_elems)
                        .into_iter()
                        .enumerate()
                    {
                        tx.write_all(&hdr(i, r.len())).await?;
                        tx.write_all(bytemuck::cast_slice(&send[r])).await?;
                    }
                    Ok::<(), std::io::Error>(())
                };
                let scratch = &mut self.scratch;
                let recv_all = async {
                    for (i, r) in ring::sub_chunks(0..recv.len(), chunk_elems)
                        .into_iter()
                        .enumerate()
                    {
                        let mut h = [0u8; HEADER];
                        rx.read_exact(&mut h).await.map_err(RecvError::Io)?;
                        let want = hdr(i, r.len());
                        if h != want {
                            return Err(RecvError::Tag(format!(
                                "frame header {:?}, expected {:?}",
                                &h[..36],
                                &want[..36]
                            )));
                        }
                        let dst = &mut recv[r];
                        if phase == 2 {
                            rx.read_exact(bytemuck::cast_slice_mut(dst))
                                .await
                                .map_err(RecvError::Io)?;
                        } else {
                            // Read into an aligned f32 scratch so the add is a plain
                            // vectorizable loop.
                            scratch.resize(dst.len(), 0.0);
                            let tmp = &mut scratch[..dst.len()];
                            rx.read_exact(bytemuck::cast_slice_mut(tmp))
                                .await
                                .map_err(RecvError::Io)?;
                            for (d, s) in dst.iter_mut().zip(tmp.iter()) {
                                *d += *s;
                            }
                        }
                    }
                    Ok::<(), RecvError>(())
                };
                let both = async { tokio::join!(send_all, recv_all) };
                let (sent, received) = tokio::select! {
                    _ = self.cancel.cancelled() => return Err(WorkerError::Cancelled),
                    r = tokio::time::timeout(self.timeout, both) => match r {
                        Ok(v) => v,
                        Err(_) => return Err(WorkerError::PeerLost {
                            rank: left,
                            generation,
                            detail: format!("ring round did not finish within {:?}", self.timeout),
                        }),
                    },
                };
                match received {
                    Err(RecvError::Tag(got)) => {
                        return Err(WorkerError::TagMismatch {
                            expected: format!(
                                "job {} generation {generation} op {} step {step}",
                                self.job, self.op
                            ),
                            got,
                        })
                    }
                    Err(RecvError::Io(e)) => {
                        return Err(WorkerError::PeerLost {
                            rank: left,
                            generation,
                            detail: format!("data link from left neighbour: {e}"),
                        })
                    }
                    Ok(()) => {}
                }
                sent.map_err(|e| WorkerError::PeerLost {
                    rank: right,
                    generation,
                    detail: format!("data link to right neighbour: {e}"),
                })?;
            }
        }
        Ok(())
    }

    /// Flushes and closes the outgoing link.
    pub async fn close(mut self) {
        if let Some(mut tx) = self.tx.take() {
            let _ = tokio::time::timeout(self.timeout, tx.shutdown()).await;
        }
    }
}

enum RecvError {
    Io(std::io::Error),
    Tag(String),
}
