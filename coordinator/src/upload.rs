//! The client side of dataset uploads: `ringtrain submit` sends the job's local dataset
//! files to the coordinator before the job, so a coordinator that cannot see the
//! client's disk (a cluster, submitted to from a laptop) still reads them.
//!
//! Each file is hashed here first and the coordinator asked whether it holds that
//! digest (`HasData`); only a file it lacks is streamed (`UploadData`), in chunks of
//! 1 MiB read on a blocking thread. The submit then binds each field to its digest
//! (`SubmitRequest.uploaded`) and leaves the job file's text as written. Paths marked
//! `coordinator:` are on the coordinator's volume already and are skipped.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringtrain_core::data_path::on_coordinator;
use ringtrain_proto::v1::{
    data_chunk, job_service_client::JobServiceClient, DataBinding, DataChunk, DataHeader,
    SubmitRequest,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Code;

use crate::error::CoordinatorError;
use crate::job_file::JobFile;

/// Bytes per `data` message: the most the API allows.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the network.
const READ_AHEAD: usize = 4;
/// Deadline of a `HasData` question (an answer is a file lookup).
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// What happened to one dataset file of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Uploaded {
    /// The job file field (`data.train.images`).
    pub field: String,
    /// The file on this host.
    pub path: String,
    /// Lowercase hex SHA-256 of its bytes.
    pub sha256: String,
    /// Its length.
    pub bytes: u64,
    /// Bytes sent in this submit (0 when the coordinator had it).
    pub sent_bytes: u64,
    /// The coordinator held the file already, so nothing was sent.
    pub already_on_coordinator: bool,
}

/// Uploads every local dataset file of the job in `req` (its `spec_toml`, paths
/// relative to `base_dir`) that the coordinator lacks, and binds each field to its
/// digest in `req.uploaded`. A request without a job file (a resume that uses the saved
/// one) needs nothing. `progress` sees each file once it is handled.
pub async fn upload_datasets(
    client: &mut JobServiceClient<Channel>,
    req: &mut SubmitRequest,
    mut progress: impl FnMut(&Uploaded),
) -> Result<Vec<Uploaded>, CoordinatorError> {
    if req.spec_toml.is_empty() {
        return Ok(Vec::new());
    }
    let source = if req.source.is_empty() {
        "job".to_string()
    } else {
        req.source.clone()
    };
    let file = JobFile::parse(&req.spec_toml, &source)?;
    let base = PathBuf::from(&req.base_dir);
    // A file named by two fields is hashed and asked about once.
    let mut seen: HashMap<PathBuf, (String, u64)> = HashMap::new();
    let mut done = Vec::new();
    for (field, path) in file.dataset_files() {
        if on_coordinator(path).is_some() {
            continue;
        }
        let full = base.join(path);
        let shown = full.display().to_string();
        let fail = |message: String| CoordinatorError::Data {
            path: format!("{source}: {field} ({shown})"),
            message,
        };
        let (sha256, bytes, sent_bytes, already) = match seen.get(&full) {
            Some((sha, bytes)) => (sha.clone(), *bytes, 0, true),
            None => {
                let f = full.clone();
                let (sha, bytes) = tokio::task::spawn_blocking(move || hash_file(&f))
                    .await
                    .map_err(|e| CoordinatorError::Transport(e.to_string()))?
                    .map_err(|e| fail(format!("cannot read it: {e}")))?;
                let header = DataHeader {
                    sha256: sha.clone(),
                    size: bytes,
                    name: full
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                };
                let mut ask = tonic::Request::new(header.clone());
                ask.set_timeout(ASK_TIMEOUT);
                let known = client
                    .has_data(ask)
                    .await
                    .map_err(|s| from_status(s, &fail))?
                    .into_inner();
                let sent = if known.present {
                    0
                } else {
                    send_file(client, header, &full)
                        .await
                        .map_err(|e| match e {
                            Sent::Status(s) => from_status(s, &fail),
                            Sent::Read(e) => fail(format!("cannot read it: {e}")),
                        })?
                };
                (sha, bytes, sent, known.present)
            }
        };
        seen.insert(full.clone(), (sha256.clone(), bytes));
        req.uploaded.push(DataBinding {
            field: field.clone(),
            sha256: sha256.clone(),
        });
        let up = Uploaded {
            field,
            path: shown,
            sha256,
            bytes,
            sent_bytes,
            already_on_coordinator: already,
        };
        progress(&up);
        done.push(up);
    }
    Ok(done)
}

/// A coordinator's refusal as this crate's error, the message kept whole (it names the
/// limit and the flag) and prefixed with the field and file by `fail`.
fn from_status(s: tonic::Status, fail: &impl Fn(String) -> CoordinatorError) -> CoordinatorError {
    match s.code() {
        Code::ResourceExhausted => match fail(s.message().to_string()) {
            CoordinatorError::Data { path, message } => {
                CoordinatorError::TooLarge(format!("{path}: {message}"))
            }
            other => other,
        },
        Code::Unimplemented => fail(
            "the coordinator does not accept uploads (it is older than this client); \
             upgrade it, or submit with --no-upload from a host where the coordinator can \
             read the file"
                .into(),
        ),
        _ => fail(format!("upload failed: {}", s.message())),
    }
}

/// SHA-256 and length of a file, read in chunks.
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, total))
}

/// Why a file could not be sent.
enum Sent {
    Status(tonic::Status),
    Read(std::io::Error),
}

/// Streams one file (`header`, then its bytes) and returns the bytes the coordinator
/// stored. A read error here ends the stream early, which the coordinator refuses; the
/// read error is the one reported.
async fn send_file(
    client: &mut JobServiceClient<Channel>,
    header: DataHeader,
    path: &Path,
) -> Result<u64, Sent> {
    let (tx, rx) = mpsc::channel::<DataChunk>(READ_AHEAD);
    let first = DataChunk {
        kind: Some(data_chunk::Kind::Header(header)),
    };
    let path = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if tx.blocking_send(first).is_err() {
            return Ok(());
        }
        let mut f = File::open(&path)?;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let n = read_full(&mut f, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            let chunk = DataChunk {
                kind: Some(data_chunk::Kind::Data(buf.into())),
            };
            // The coordinator answered early (it had the file) or the call failed:
            // stop reading; the call's result says which.
            if tx.blocking_send(chunk).is_err() {
                return Ok(());
            }
        }
    });
    let started = Instant::now();
    let reply = client
        .upload_data(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let read = reader
        .await
        .map_err(|e| Sent::Read(std::io::Error::other(e.to_string())))?;
    read.map_err(Sent::Read)?;
    let reply = reply.map_err(Sent::Status)?.into_inner();
    tracing::info!(
        sha256 = %reply.sha256,
        bytes = reply.received,
        seconds = started.elapsed().as_secs_f64(),
        "dataset file uploaded"
    );
    Ok(reply.received)
}

/// Fills `buf` as far as the file allows (short only at its end).
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
