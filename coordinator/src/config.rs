//! Configuration of a coordinator.

use std::path::PathBuf;
use std::time::Duration;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Root of checkpoints and default run directories.
    pub data_dir: PathBuf,
    /// Deadline of a single collective send/receive, handed to workers.
    pub collective_timeout: Duration,
    /// Which transport ring chunks use.
    pub data_plane: DataPlane,
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
        }
    }
}
