//! ringtrain's control plane: jobs, scheduling, sharding, checkpoints.
//!
//! # Layout
//! - [`dataset`]: datasets (synthetic, IDX, CSV, NPY) and normalization; [`csv_table`] and
//!   [`npy`] read the files with errors that name the place.
//! - [`data_store`]: uploaded dataset files, content-addressed under the data dir.
//! - [`job_machine`]: the job state machine and the replica check (pure: events in,
//!   effects out).
//! - [`service`]: the [`Coordinator`] core: jobs, workers, scheduling, reports.
//! - [`watch`]: what `JobService.Watch` sends: status updates coalesced to about ten a
//!   second, history only when it grew, ending after the terminal status.
//! - [`grpc`]: tonic adapters; [`server`]: serving on a bound listener, behind a [`server::Gate`]
//!   that lets only the leader serve.
//! - [`store`]: durable state (jobs, checkpoint index, worker leases, the leader lease) in
//!   etcd or in memory, behind one [`store::Store`] trait.
//! - [`client`]: a client for the CLI, and [`upload`], its side of dataset uploads;
//!   [`local`]: the embedded single-machine cluster.
//! - [`model_input`]: the rows `predict` and `evaluate` read.
//! - [`metrics`]: the job and worker gauges `/metrics` serves.
//!
//! The job file, the checkpoint format and the rest of the shared vocabulary live in
//! `ringtrain-core` (re-exported here as [`job_file`] and [`checkpoint`]); the control
//! plane never links the compute kernels.
//! - [`config`], [`error`].

pub mod client;
pub mod config;
pub mod csv_table;
pub mod data_store;
pub mod dataset;
pub mod error;
pub mod grpc;
pub mod job_machine;
pub mod local;
pub mod metrics;
pub mod model_input;
pub mod npy;
pub mod server;
pub mod service;
pub mod store;
pub mod upload;
pub mod watch;

pub use config::{DataPlane, ServerConfig};
pub use error::CoordinatorError;
pub use ringtrain_core::{checkpoint, job_file, SpecError};
pub use service::Coordinator;

#[cfg(test)]
pub(crate) mod test_jobs {
    //! Job files the crate's unit tests share.

    /// A tiny synthetic classification job: `workers` workers, `epochs` epochs of 64
    /// samples with 3 features, one softmax layer.
    pub(crate) fn tiny(workers: u32, epochs: u32) -> String {
        format!(
            r#"
name = "t"
epochs = {epochs}
batch_size = 8
workers = {workers}
[data]
train = {{ format = "synthetic", samples = 64, features = 3, classes = 2 }}
[model]
input = 3
layers = [{{ dense = 2, activation = "softmax" }}]
[train]
loss = "sparse_categorical_crossentropy"
"#
        )
    }
}
