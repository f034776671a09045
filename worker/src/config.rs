//! Configuration of a worker process.

use std::time::Duration;

use ringtrain_core::telemetry::{InstanceId, StepSampling};

/// How a worker process runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator's URL, e.g. `http://127.0.0.1:7070`, or several separated by
    /// commas (a leader and its standbys): the worker tries them in turn until one
    /// accepts it.
    pub coordinator: String,
    /// Address ring neighbours dial (defaults to the bound listen address).
    pub advertise: Option<String>,
    /// Free-form name for logs.
    pub name: String,
    /// Give up reconnecting to the coordinator after this long without success
    /// (`None`: keep trying).
    pub reconnect_limit: Option<Duration>,
    /// Offer a same-host Unix socket for ring data (Linux); off keeps every link on TCP.
    pub local_socket: bool,
    /// What the worker counts for `/metrics` (served by the caller, when enabled).
    pub metrics: std::sync::Arc<crate::metrics::WorkerMetrics>,
    /// Which training steps get spans.
    pub trace_steps: StepSampling,
    /// Set to the id the coordinator gives this worker, for the spans'
    /// `service.instance.id`.
    pub instance: InstanceId,
}

impl WorkerConfig {
    /// The coordinator URLs to try, in order.
    pub fn coordinators(&self) -> Vec<String> {
        let list: Vec<String> = self
            .coordinator
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if list.is_empty() {
            vec![self.coordinator.clone()]
        } else {
            list
        }
    }
}

/// Compute threads of one worker: `RAYON_NUM_THREADS` when set (the variable candle and
/// rayon read, which `ringtrain local` sets to cores ÷ workers), else every core.
pub fn compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}
