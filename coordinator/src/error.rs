//! Errors of the coordinator crate.

use ringtrain_core::{CheckpointError, SpecError};
use thiserror::Error;

/// Everything that can go wrong in the control plane.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    /// The job file is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A dataset could not be read or is malformed.
    #[error("{path}: {message}")]
    Data {
        /// The file (or data source) at fault.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A CSV or NPY file is malformed (the message names file, line and column).
    #[error(transparent)]
    Table(#[from] crate::csv_table::TableError),
    /// No such job.
    #[error("no job with id {0} (list jobs with `ringtrain jobs`)")]
    UnknownJob(String),
    /// A request that is malformed whatever the state (a missing field).
    #[error("{0}")]
    BadRequest(String),
    /// A request that does not fit the job's or worker's current state.
    #[error("{0}")]
    Precondition(String),
    /// A request over a configured limit (an upload larger than `--max-upload-bytes`).
    #[error("{0}")]
    TooLarge(String),
    /// A request that ended before it was complete (an upload stream cut short).
    #[error("{0}")]
    Aborted(String),
    /// Storage failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A checkpoint could not be written or failed verification.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Serialization failed.
    #[error("serialization failed: {0}")]
    Serialize(String),
    /// A server or connection failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The durable store (etcd) failed or refused a write.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The leader lease was lost while serving: the process exits so that a fresh one
    /// campaigns again.
    #[error("lost the leader lease; exiting so a fresh process can campaign again")]
    LeaderLost,
}

impl CoordinatorError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CoordinatorError {
        let context = context.into();
        move |source| CoordinatorError::Io { context, source }
    }
}
