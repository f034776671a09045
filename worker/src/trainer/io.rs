//! The trainer's input and output: data shards and checkpoints to and from the
//! coordinator, and the generation's ring entered from the (blocking) step thread, with a
//! stall report when a collective waits too long.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ringtrain_core::telemetry::{context_of, RemoteParent};
use ringtrain_proto::v1::{
    checkpoint_part, worker_report, CheckpointData, CheckpointHeader, CheckpointPart, ShardRequest,
    Split, Waiting, WorkerReport,
};
use tracing::{info, info_span, warn, Instrument};

use super::JobContext;
use crate::engine::{Ring, RingConfig};
use crate::error::WorkerError;
use crate::resume::{self, Exchange, HeldState};
use crate::ring::{WrappingSumU32, WrappingSumU64};
use crate::step::Collective;

/// One split's rows held by this worker.
#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) x: Vec<f32>,
    pub(super) y: Vec<f32>,
    /// Dataset index of each row.
    pub(super) idx: Vec<u32>,
    pub(super) rows: usize,
}

pub(super) fn block_on<T>(
    ctx: &JobContext,
    fut: impl std::future::Future<Output = Result<T, WorkerError>>,
) -> Result<T, WorkerError> {
    ctx.handle.block_on(async {
        tokio::select! {
            _ = ctx.cancel.cancelled() => Err(WorkerError::Cancelled),
            r = fut => r,
        }
    })
}

pub(super) fn fetch(
    ctx: &JobContext,
    split: Split,
    epoch: u32,
    start_batch: u64,
) -> impl std::future::Future<Output = Result<Shard, WorkerError>> {
    let mut control = ctx.control.clone();
    let a = &ctx.assignment;
    let req = ShardRequest {
        job_id: a.job_id.clone(),
        generation: a.generation,
        rank: a.rank,
        split: split as i32,
        epoch,
        worker_id: ctx.worker_id.clone(),
        start_batch: start_batch as u32,
    };
    let features = ctx.plan.features;
    // Built here, on the caller's thread, where its span is current.
    let request = traced(req);
    async move {
        let status = |s: tonic::Status| WorkerError::Coordinator {
            call: "FetchShard",
            status: s.to_string(),
        };
        let mut stream = control
            .fetch_shard(request)
            .await
            .map_err(status)?
            .into_inner();
        let mut shard = Shard::default();
        while let Some(chunk) = stream.message().await.map_err(status)? {
            let rows = chunk.rows as usize;
            if chunk.features.len() != rows * features * 4
                || chunk.labels.len() != rows * 4
                || chunk.indices.len() != rows * 4
            {
                return Err(WorkerError::Shard(format!(
                    "chunk of {rows} rows has {} feature, {} label and {} index bytes",
                    chunk.features.len(),
                    chunk.labels.len(),
                    chunk.indices.len()
                )));
            }
            shard.x.extend(crate::wire::f32s_le(&chunk.features));
            shard.y.extend(crate::wire::f32s_le(&chunk.labels));
            shard.idx.extend(crate::wire::u32s_le(&chunk.indices));
            shard.rows += rows;
        }
        Ok(shard)
    }
}

/// The job's ring, entered from the step thread.
pub(super) struct BlockingRing<'a> {
    pub(super) ctx: &'a JobContext,
    pub(super) ring: &'a mut Ring,
}

/// Runs a step's collective; when it has waited a quarter of the deadline (at least a
/// second), tells the coordinator, which names the ranks that have not joined yet while
/// there is still time before the deadline fires.
fn block_on_watched<T>(
    ctx: &JobContext,
    step: u64,
    fut: impl std::future::Future<Output = Result<T, WorkerError>>,
) -> Result<T, WorkerError> {
    let slow =
        (Duration::from_millis(ctx.plan.collective_timeout_ms) / 4).max(Duration::from_secs(1));
    let started = Instant::now();
    ctx.handle.block_on(async {
        tokio::pin!(fut);
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Err(WorkerError::Cancelled),
            r = &mut fut => return r,
            _ = tokio::time::sleep(slow) => {}
        }
        let waited = started.elapsed().as_secs_f64();
        warn!(step, waited, "waiting in the step's all-reduce");
        if let Some(tx) = &ctx.stall_reports {
            let a = &ctx.assignment;
            let _ = tx.try_send(WorkerReport {
                job_id: a.job_id.clone(),
                generation: a.generation,
                rank: a.rank,
                worker_id: ctx.worker_id.clone(),
                kind: Some(worker_report::Kind::Waiting(Waiting {
                    step,
                    seconds: waited,
                })),
            });
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => Err(WorkerError::Cancelled),
            r = fut => r,
        }
    })
}

// The step's and evaluation's all-reduces count in the worker's metrics (a completed
// one only: a failed collective ends the generation and is logged instead).
impl Collective for BlockingRing<'_> {
    fn sum_f32(&mut self, buf: &mut [f32], step: u64) -> Result<(), WorkerError> {
        let (ctx, bytes, started) = (self.ctx, std::mem::size_of_val(buf), Instant::now());
        block_on_watched(ctx, step, self.ring.all_reduce(buf, step))?;
        ctx.metrics
            .record_allreduce(bytes, started.elapsed().as_secs_f64());
        Ok(())
    }

    fn sum_u64(&mut self, buf: &mut [u64], step: u64) -> Result<(), WorkerError> {
        let (ctx, bytes, started) = (self.ctx, std::mem::size_of_val(buf), Instant::now());
        block_on(ctx, self.ring.reduce::<WrappingSumU64>(buf, step))?;
        ctx.metrics
            .record_allreduce(bytes, started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// A checkpoint upload in flight.
pub(super) type Upload = tokio::task::JoinHandle<Result<(), WorkerError>>;

/// Bytes per checkpoint chunk message.
const CHECKPOINT_CHUNK_BYTES: usize = 4 << 20;

/// Starts uploading a copy of the state and returns at once: rank 0 keeps stepping (its
/// peers would otherwise wait in the next all-reduce for as long as the coordinator
/// takes to write and fsync) while the copy travels, streamed in chunks. `epoch` is the
/// epochs completed (the final checkpoint) or the epoch in progress (periodic ones).
pub(super) fn upload(ctx: &JobContext, s: &HeldState, final_: bool) -> Upload {
    let a = &ctx.assignment;
    // Spans the copy and the whole upload, under the coordinator's `generation` span
    // (checkpoints are rare: always traced); its context goes with the upload, so the
    // coordinator's `checkpoint` span for the write is its child.
    let span = info_span!("checkpoint", step = s.step, final_, job = %a.job_id, rank = a.rank);
    RemoteParent::from_map(&a.trace_context).adopt(&span);
    let _enter = span.enter();
    let plan = &ctx.plan;
    let mut buffers: Vec<(String, &[f32])> = vec![("params".into(), &s.params)];
    for (name, data) in s.opt.config.slot_names().iter().zip(&s.opt.slots) {
        buffers.push((format!("opt.{name}"), data));
    }
    if let Some(b) = s.best_params(plan) {
        buffers.push(("best".into(), b));
    }
    let mut resume = s.resume_state(plan);
    if final_ {
        resume.epoch_cursor = 0;
    }
    let header = CheckpointHeader {
        job_id: a.job_id.clone(),
        generation: a.generation,
        step: s.step,
        epoch: s.epochs_done,
        r#final: final_,
        optimizer_t: s.opt.t,
        param_hash: s.hash(),
        worker_id: ctx.worker_id.clone(),
        buffers: buffers.iter().map(|(n, _)| n.clone()).collect(),
        resume_json: serde_json::to_string(&resume).unwrap_or_default(),
    };
    let mut parts = vec![CheckpointPart {
        kind: Some(checkpoint_part::Kind::Header(header)),
    }];
    for (i, (_, data)) in buffers.iter().enumerate() {
        for chunk in bytemuck::cast_slice::<f32, u8>(data).chunks(CHECKPOINT_CHUNK_BYTES) {
            parts.push(CheckpointPart {
                kind: Some(checkpoint_part::Kind::Data(CheckpointData {
                    buffer: i as u32,
                    data: Bytes::copy_from_slice(chunk),
                })),
            });
        }
    }
    let mut control = ctx.control.clone();
    let request = traced(tokio_stream::iter(parts));
    let send = async move {
        control
            .upload_checkpoint(request)
            .await
            .map(|_| ())
            .map_err(|s| WorkerError::Coordinator {
                call: "UploadCheckpoint",
                status: s.to_string(),
            })
    };
    ctx.handle.spawn(send.instrument(span.clone()))
}

/// A request carrying the current span's W3C trace context in its metadata, so the
/// coordinator's spans for it join this worker's trace; a plain request when no
/// exported span is current.
fn traced<T>(message: T) -> tonic::Request<T> {
    ringtrain_proto::request_with_metadata(message, context_of(&tracing::Span::current()))
}

/// Waits for an upload started by [`upload`].
pub(super) fn finish_upload(ctx: &JobContext, pending: Option<Upload>) -> Result<(), WorkerError> {
    match pending {
        Some(h) => block_on(ctx, async {
            h.await.map_err(|e| WorkerError::Join(e.to_string()))?
        }),
        None => Ok(()),
    }
}

/// The agreement's collectives over the generation's ring, and the checkpoint fetch.
impl Exchange for BlockingRing<'_> {
    fn sum_u64(&mut self, buf: &mut [u64]) -> Result<(), WorkerError> {
        block_on(self.ctx, self.ring.reduce::<WrappingSumU64>(buf, 0))
    }

    fn sum_u32(&mut self, buf: &mut [u32]) -> Result<(), WorkerError> {
        block_on(self.ctx, self.ring.reduce::<WrappingSumU32>(buf, 0))
    }

    fn fetch_checkpoint(&mut self) -> Result<HeldState, WorkerError> {
        let ctx = self.ctx;
        let req = resume::checkpoint_request(&ctx.assignment, &ctx.worker_id);
        let mut control = ctx.control.clone();
        let parts = block_on(ctx, async move {
            let status = |s: tonic::Status| WorkerError::Coordinator {
                call: "FetchCheckpoint",
                status: s.to_string(),
            };
            let mut stream = control
                .fetch_checkpoint(req)
                .await
                .map_err(status)?
                .into_inner();
            let mut parts = Vec::new();
            while let Some(p) = stream.message().await.map_err(status)? {
                parts.push(p);
            }
            Ok(parts)
        })?;
        let classes = ctx.plan.loss.metric_classes(ctx.plan.model.outputs());
        resume::state_from_checkpoint(parts, &ctx.plan, &ctx.assignment.job_id, classes)
    }
}

/// Connects this generation's ring over the transport the coordinator chose.
pub(super) fn connect_ring(ctx: &JobContext) -> Result<Ring, WorkerError> {
    let plan = &ctx.plan;
    let a = &ctx.assignment;
    let rank = a.rank as usize;
    let ring_config = RingConfig {
        timeout: Duration::from_millis(plan.collective_timeout_ms),
        ..RingConfig::default()
    };
    if a.data_peers.len() == a.peers.len() && a.ring_token.len() == 16 {
        let mut token = [0u8; 16];
        token.copy_from_slice(&a.ring_token);
        let peers = crate::tcp_ring::DataPeers {
            addrs: a.data_peers.clone(),
            token,
            locals: a.data_locals.clone(),
        };
        let ring = block_on(
            ctx,
            Ring::connect_socket(
                &ctx.data_hub,
                &a.job_id,
                a.generation,
                rank,
                &peers,
                ring_config,
                ctx.cancel.clone(),
            ),
        )?;
        info!(
            rank,
            generation = a.generation,
            same_host_socket = ring.is_local(),
            "ring data link to the right neighbour is up"
        );
        Ok(ring)
    } else {
        block_on(
            ctx,
            Ring::connect_grpc(
                ctx.hub.clone(),
                &a.job_id,
                a.generation,
                rank,
                &a.peers,
                ring_config,
                ctx.cancel.clone(),
            ),
        )
    }
}
