//! ringtrain's data plane: what a worker computes and how it talks to its ring.
//!
//! # Layout
//! - [`model`]: forward/backward on candle-core over the architecture in
//!   `ringtrain_core::model`.
//! - [`matmul`]: the single-threaded GEMM the dense layers use (the crate's only
//!   `unsafe`).
//! - [`loss`]: the loss heads (sparse categorical cross-entropy on logits).
//! - [`optimizer`]: Adam on flat buffers.
//! - [`ring`]: the ring all-reduce schedule and its reductions (pure); [`engine`]: the
//!   one ring all-reduce loop over a transport trait, and [`engine::Ring`], one
//!   generation's ring; its transports: [`collective`] (gRPC streams) and [`tcp_ring`]
//!   (plain TCP, or Unix sockets on one host).
//! - [`step`]: one training step as a pipeline of named stages.
//! - [`dp`]: DP-SGD's noise, each rank's share added before the all-reduce (the
//!   per-example clipping is [`model::Mlp::forward_backward_clipped`]).
//! - [`trainer`]: the per-job loop (data, epochs, evaluation, checkpoints, reports);
//!   its I/O (shards, checkpoint uploads, the ring entered from the step thread) in
//!   `trainer/io.rs`.
//! - [`resume`]: the state a worker keeps between generations, and how a new
//!   generation's ranks agree where to start (peer broadcast, checkpoint, or init).
//! - [`agent`]: the worker process: attach to the coordinator, run assignments.
//! - [`metrics`]: the worker's `/metrics` counters (steps, samples, all-reduces).
//! - [`bench`]: one rank of the all-reduce benchmark.
//! - [`saved_model`]: a trained model loaded (and its bytes verified) for predict and
//!   evaluate.
//! - [`grpc`]: the `Collective` service adapter; [`error`]: [`WorkerError`].
//! - re-exported from `ringtrain-core`: [`plan`], [`privacy`], [`rng`], [`sharding`],
//!   [`wire`].

pub mod agent;
pub mod bench;
pub mod collective;
pub mod config;
pub mod dp;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod loss;
pub mod matmul;
pub mod metrics;
pub mod model;
pub mod optimizer;
pub mod resume;
pub mod ring;
pub mod saved_model;
pub mod step;
pub mod tcp_ring;
pub mod trainer;

pub use error::WorkerError;
// The shared vocabulary, re-exported under the names this crate has always used.
pub use ringtrain_core::{plan, privacy, rng, sharding, wire};

/// xxh3-64 of a parameter buffer's bytes: the replica fingerprint in step reports.
pub fn param_hash(params: &[f32]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(params))
}
