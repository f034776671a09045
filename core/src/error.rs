//! Errors of the shared vocabulary: a job file that does not validate, a training plan a
//! worker cannot run, a checkpoint that cannot be written or read back.

use thiserror::Error;

/// A job file problem: which file, which field, what is wrong and how to fix it.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{file}: {field}: {message}")]
pub struct SpecError {
    /// The job file (or "job" when it came without a name).
    pub file: String,
    /// The field (dotted path) or line.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// A training plan that cannot be run as sent.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("invalid training plan: {0}")]
pub struct PlanError(pub String);

/// A checkpoint that cannot be written, or that failed verification when read.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Storage failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The files on disk are not a valid checkpoint.
    #[error("corrupt checkpoint {path}: {message}")]
    Corrupt {
        /// Its directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// What was handed in does not fit the model (wrong buffer sizes, slot names).
    #[error("{0}")]
    Invalid(String),
    /// Encoding the tensors or the metadata failed.
    #[error("serialization failed: {0}")]
    Serialize(String),
}

impl CheckpointError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let context = context.into();
        move |source| CheckpointError::Io { context, source }
    }
}
