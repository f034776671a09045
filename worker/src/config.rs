//! Configuration of a worker process.

use std::time::Duration;

/// How a worker process runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator's URL, e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    /// Address ring neighbours dial (defaults to the bound listen address).
    pub advertise: Option<String>,
    /// Free-form name for logs.
    pub name: String,
    /// Give up reconnecting to the coordinator after this long without success
    /// (`None`: keep trying).
    pub reconnect_limit: Option<Duration>,
}
