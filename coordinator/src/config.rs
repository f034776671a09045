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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("ringtrain-data"),
            collective_timeout: Duration::from_secs(20),
        }
    }
}
