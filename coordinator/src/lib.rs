//! ringtrain's control plane: jobs, scheduling, sharding, checkpoints.
//!
//! # Layout
//! - [`job_file`]: the job file, parsed and validated.
//! - [`dataset`]: datasets (synthetic, IDX, CSV, NPY) and normalization; [`csv_table`] and
//!   [`npy`] read the files with errors that name the place.
//! - [`jobs`]: ids, the job state machine, the replica check (pure).
//! - [`checkpoint`]: the atomic, checksummed checkpoint store.
//! - [`service`]: the [`Coordinator`] core: jobs, workers, scheduling, reports.
//! - [`grpc`]: tonic adapters; [`server`]: serving on a bound listener.
//! - [`client`]: a client for the CLI; [`local`]: the embedded single-machine cluster.
//! - [`saved_model`]: a trained model on disk, predict and evaluate; [`plot`]: curves.
//! - [`config`], [`error`].

pub mod checkpoint;
pub mod client;
pub mod config;
pub mod csv_table;
pub mod dataset;
pub mod error;
pub mod grpc;
pub mod job_file;
pub mod jobs;
pub mod local;
pub mod npy;
pub mod plot;
pub mod saved_model;
pub mod server;
pub mod service;

pub use config::{DataPlane, ServerConfig};
pub use error::{CoordinatorError, SpecError};
pub use service::Coordinator;
