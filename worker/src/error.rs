//! Errors of the worker crate.

use thiserror::Error;

/// Everything that can go wrong on a worker.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A label is not a valid class index.
    #[error("label {label} is not a class index in 0..{classes}")]
    LabelOutOfRange {
        /// The bad label.
        label: f32,
        /// Number of classes.
        classes: usize,
    },
    /// A ring neighbour went away or stopped answering within the deadline.
    #[error("lost ring peer rank {rank} in generation {generation}: {detail}")]
    PeerLost {
        /// The neighbour's rank.
        rank: u32,
        /// The generation it was lost in.
        generation: u64,
        /// What was observed.
        detail: String,
    },
    /// A ring message carried a tag other than the one expected.
    #[error("ring tag mismatch: expected {expected}, got {got}")]
    TagMismatch {
        /// The tag this worker expected.
        expected: String,
        /// The tag it received.
        got: String,
    },
    /// A ring message had the wrong payload size.
    #[error("ring chunk has {got} bytes, expected {expected}")]
    ChunkSize {
        /// Expected payload bytes.
        expected: usize,
        /// Received payload bytes.
        got: usize,
    },
    /// Could not reach a peer or the coordinator.
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// Why it failed.
        detail: String,
    },
    /// The coordinator rejected or failed a call.
    #[error("coordinator call {call} failed: {status}")]
    Coordinator {
        /// The RPC.
        call: &'static str,
        /// Its status.
        status: String,
    },
    /// The data a worker received is malformed.
    #[error("bad shard data: {0}")]
    Shard(String),
    /// The assignment's training plan is malformed.
    #[error("bad training plan: {0}")]
    Plan(String),
    /// A saved model (or the data given to it) cannot be used.
    #[error("{path}: {message}")]
    Model {
        /// The run directory or data file at fault.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The coordinator and this worker cannot work together (protocol versions differ).
    #[error("refused by the coordinator: {0}")]
    Refused(String),
    /// A cancelled job did not stop in time; the worker exits rather than run a second
    /// job beside it.
    #[error("job {job} did not stop within {waited:?} of being cancelled")]
    Stuck {
        /// The job.
        job: String,
        /// How long it was given.
        waited: std::time::Duration,
    },
    /// The job was cancelled.
    #[error("job cancelled")]
    Cancelled,
    /// The plan failed the shared checks.
    #[error(transparent)]
    PlanRejected(#[from] ringtrain_core::PlanError),
    /// The operating system could not seed the DP noise generator.
    #[error("cannot seed the dp noise generator from the operating system: {0}")]
    Entropy(String),
    /// A blocking compute task panicked or was aborted.
    #[error("compute task failed: {0}")]
    Join(String),
}
