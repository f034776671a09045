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
    /// Largest dataset file a client may upload (`--max-upload-bytes`), in bytes.
    pub max_upload_bytes: u64,
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
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
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

/// The default of `--max-upload-bytes`: 4 GiB, above any dataset the coordinator can hold
/// in memory on a modest node, below one that fills its volume by accident.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 4 << 30;

/// Units a byte size may carry, longest spelling first so `MiB` wins over `M`.
const BYTE_UNITS: [(&str, u64); 13] = [
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1000),
    ("MB", 1000 * 1000),
    ("GB", 1000 * 1000 * 1000),
    ("TB", 1000 * 1000 * 1000 * 1000),
    ("K", 1 << 10),
    ("M", 1 << 20),
    ("G", 1 << 30),
    ("T", 1 << 40),
    ("B", 1),
];

/// Parses a byte size as flags take it: a whole number of bytes (`4096`), or one with a
/// unit (`512MiB`, `4GiB`, `1.5G`; K/M/G/T are binary, KB/MB/GB/TB decimal).
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (number, scale) = BYTE_UNITS
        .iter()
        .find_map(|(u, m)| {
            t.strip_suffix(u)
                .or_else(|| t.strip_suffix(&u.to_lowercase()))
                .map(|n| (n.trim(), *m))
        })
        .unwrap_or((t, 1));
    let bad = || format!("{s:?} is not a byte size (write e.g. 1048576, 512MiB or 4GiB)");
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(scale).ok_or_else(bad);
    }
    let v: f64 = number.parse().map_err(|_| bad())?;
    let bytes = v * scale as f64;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// `bytes` in binary units, for messages: `4 GiB`, `1.5 MiB`, `300 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_and_without_units() {
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert_eq!(parse_byte_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_byte_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_byte_size("4 gib"), Ok(4 << 30));
        assert_eq!(parse_byte_size("2G"), Ok(2 << 30));
        assert_eq!(parse_byte_size("10KB"), Ok(10_000));
        assert_eq!(parse_byte_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_byte_size("7B"), Ok(7));
        for bad in ["", "MiB", "-1", "12XB", "nanGiB", "99999999999TiB"] {
            let e = parse_byte_size(bad).unwrap_err();
            assert!(e.contains("is not a byte size"), "{bad}: {e}");
        }
    }

    #[test]
    fn byte_sizes_format_in_binary_units() {
        assert_eq!(format_bytes(300), "300 B");
        assert_eq!(format_bytes(4 << 30), "4 GiB");
        assert_eq!(format_bytes(1536 << 10), "1.5 MiB");
    }
}
