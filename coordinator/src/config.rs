//! Configuration of a coordinator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Root of checkpoints and default run directories.
    pub data_dir: PathBuf,
    /// Deadline of a single collective send/receive, handed to workers.
    pub collective_timeout: Duration,
    /// Which transport ring chunks use.
    pub data_plane: DataPlane,
    /// Largest model (parameters, gradient and optimizer state, in bytes) a job may ask
    /// a worker to hold; larger ones are refused at submit.
    pub max_model_bytes: u64,
    /// How often the coordinator pings each connection (HTTP/2 keepalive); a worker
    /// behind a partition is noticed within this plus [`ServerConfig::keepalive_timeout`].
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Durable state and the leader lease (`ringtrain serve --etcd`); `None` keeps
    /// everything in memory ([`crate::store::MemoryStore`]) and leads at once.
    pub store: Option<Arc<dyn Store>>,
}

/// The ring's transport for bulk data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPlane {
    /// Plain TCP between neighbours, negotiated and authenticated through gRPC (used
    /// when every member of a generation advertises a data address).
    #[default]
    Tcp,
    /// gRPC `Collective` streams.
    Grpc,
}

impl std::str::FromStr for DataPlane {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(DataPlane::Tcp),
            "grpc" => Ok(DataPlane::Grpc),
            other => Err(format!(
                "unknown data plane {other:?} (expected tcp or grpc)"
            )),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("ringtrain-data"),
            collective_timeout: Duration::from_secs(20),
            data_plane: DataPlane::default(),
            max_model_bytes: default_max_model_bytes(),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            store: None,
        }
    }
}

/// Half the machine's memory (from `/proc/meminfo`), or 8 GiB where that cannot be read:
/// a worker needs room for its data shard and buffers besides the model.
pub fn default_max_model_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024 / 2)
        .unwrap_or(8 << 30)
}
