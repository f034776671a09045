//! ringtrain's shared vocabulary: everything both the coordinator (control plane) and the
//! worker (data plane) speak, with no tokio, tonic or candle behind it. The coordinator
//! links this crate instead of the worker's, so the control plane never builds the
//! compute kernels.
//!
//! # Layout
//! - [`ids`]: `JobId`, `WorkerId`, `Rank`, `Generation`, `Step`.
//! - [`job_file`]: the job file, parsed and validated ([`error::SpecError`] names the
//!   field and the fix); [`model`], [`loss`], [`optimizer`]: the parts of it a worker
//!   needs too (architecture and parameter layout, loss and metric names, optimizer
//!   settings and schedules).
//! - [`data_path`]: where dataset paths are read: the submitting host, the coordinator's
//!   volume (`coordinator:` paths), or its store of uploaded files.
//! - [`plan`]: the training plan a worker receives with its assignment.
//! - [`sharding`]: how epochs split into global batches and batches across ranks;
//!   [`rng`]: the stable random stream everything seeded draws from.
//! - [`wire`]: little-endian decoding shared by every hop.
//! - [`checkpoint`]: the versioned, checksummed checkpoint format and its store;
//!   [`saved_model`]: the trained model's card (`model.json`) and feature scaling.
//! - [`privacy`]: the differential-privacy accountant.
//! - [`metrics`]: lock-free counters, gauges and histograms, and the Prometheus text
//!   format they are scraped in.
//! - [`telemetry`]: which training steps are traced, and the W3C trace context that
//!   ties a step's spans on every process into one trace.
//! - [`error`]: the typed errors.

pub mod checkpoint;
pub mod data_path;
pub mod error;
pub mod ids;
pub mod job_file;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optimizer;
pub mod plan;
pub mod privacy;
pub mod rng;
pub mod saved_model;
pub mod sharding;
pub mod telemetry;
pub mod wire;

pub use error::{CheckpointError, PlanError, SpecError};
pub use ids::{Generation, JobId, Rank, Step, WorkerId};
