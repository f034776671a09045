//! ringtrain's data plane: what a worker computes and how it talks to its ring.
//!
//! # Layout
//! - [`model`]: dense layers, parameter layout, forward/backward on candle-core.
//! - [`matmul`]: the single-threaded GEMM the dense layers use (the crate's only
//!   `unsafe`).
//! - [`loss`]: the loss heads (sparse categorical cross-entropy on logits).
//! - [`optimizer`]: Adam on flat buffers.
//! - [`sharding`]: how epochs split into global batches and batches across ranks.
//! - [`ring`]: the ring all-reduce schedule (pure); [`collective`]: the same over gRPC
//!   streams, and [`tcp_ring`]: over a plain-TCP data plane.
//! - [`plan`]: the training plan a worker receives with its assignment.
//! - [`trainer`]: the per-job step loop.
//! - [`agent`]: the worker process: attach to the coordinator, run assignments.
//! - [`bench`]: one rank of the all-reduce benchmark.
//! - [`privacy`]: the differential-privacy accountant.
//! - [`wire`]: little-endian decoding shared by every hop.
//! - [`grpc`]: the `Collective` service adapter; [`error`]: [`WorkerError`].

pub mod agent;
pub mod bench;
pub mod collective;
pub mod config;
pub mod error;
pub mod grpc;
pub mod loss;
pub mod matmul;
pub mod model;
pub mod optimizer;
pub mod plan;
pub mod privacy;
pub mod ring;
pub mod rng;
pub mod sharding;
pub mod tcp_ring;
pub mod trainer;
pub mod wire;

pub use error::WorkerError;

/// xxh3-64 of a parameter buffer's bytes: the replica fingerprint in step reports.
pub fn param_hash(params: &[f32]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(params))
}
