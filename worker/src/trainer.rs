//! The step loop of one job on one worker.
//!
//! It runs on a dedicated blocking thread (compute must not stall the async runtime) and
//! enters the runtime only for network calls, through `Handle::block_on`. Every rank runs
//! exactly the same sequence of collectives (no rank-divergent control flow), so a short
//! last batch, or a rank with no rows in it, still lines up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringtrain_proto::v1::{
    worker_control_client::WorkerControlClient, worker_report, Assignment, CheckpointUpload,
    EpochReport, EpochSummary, Failure, Finished, ShardRequest, Split, StepReport, WorkerReport,
};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, info_span, warn};

use crate::collective::{CollectiveHub, RingConfig, RingLink};
use crate::error::WorkerError;
use crate::model::{BatchStats, Mlp};
use crate::optimizer::Adam;
use crate::plan::TrainingPlan;
use crate::sharding;

/// Reports buffered towards the coordinator before the step loop waits.
const REPORT_CAPACITY: usize = 1024;
/// Rows evaluated per forward pass in validation and test.
const EVAL_ROWS: usize = 1024;

/// Everything one job run needs.
#[derive(Debug)]
pub struct JobContext {
    /// The runtime that drives network calls.
    pub handle: Handle,
    /// Client of the coordinator's worker-control service.
    pub control: WorkerControlClient<Channel>,
    /// Where incoming ring streams arrive.
    pub hub: Arc<CollectiveHub>,
    /// This worker's id at the coordinator.
    pub worker_id: String,
    /// The assignment being run.
    pub assignment: Assignment,
    /// Its parsed training plan.
    pub plan: TrainingPlan,
    /// Cancelled when the coordinator cancels the job or the worker shuts down.
    pub cancel: CancellationToken,
}

/// One split's rows held by this worker.
#[derive(Debug, Default)]
struct Shard {
    x: Vec<f32>,
    y: Vec<u32>,
    rows: usize,
}

/// Runs the job to its end, reporting progress, and returns how it ended. Failures are
/// also reported to the coordinator (with the lost peer's rank when that was the cause).
pub fn run_blocking(ctx: JobContext) -> Result<(), WorkerError> {
    let a = &ctx.assignment;
    let span = info_span!("job", job = %a.job_id, generation = a.generation, rank = a.rank);
    let _enter = span.enter();
    let (tx, rx) = mpsc::channel(REPORT_CAPACITY);
    let mut control = ctx.control.clone();
    let reporter = ctx
        .handle
        .spawn(async move { control.report(ReceiverStream::new(rx)).await });
    let reports = Reports { ctx: &ctx, tx };
    let result = train(&ctx, &reports);
    match &result {
        Ok(()) => info!("job finished"),
        Err(WorkerError::Cancelled) => info!("job cancelled"),
        Err(e) => {
            warn!(error = %e, "job failed");
            let lost_rank = match e {
                WorkerError::PeerLost { rank, .. } => Some(*rank),
                _ => None,
            };
            reports.send(worker_report::Kind::Failure(Failure {
                message: e.to_string(),
                lost_rank,
            }));
        }
    }
    drop(reports);
    // Flush the report stream (bounded: a vanished coordinator must not hold us here).
    let _ = ctx
        .handle
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), reporter).await });
    result
}

struct Reports<'a> {
    ctx: &'a JobContext,
    tx: mpsc::Sender<WorkerReport>,
}

impl Reports<'_> {
    fn send(&self, kind: worker_report::Kind) {
        let a = &self.ctx.assignment;
        let report = WorkerReport {
            job_id: a.job_id.clone(),
            generation: a.generation,
            rank: a.rank,
            worker_id: self.ctx.worker_id.clone(),
            kind: Some(kind),
        };
        // A closed stream means the coordinator is gone; the next collective or RPC
        // surfaces that as an error, so a lost report needs no handling of its own.
        let _ = self.tx.blocking_send(report);
    }
}

fn block_on<T>(
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

fn fetch(
    ctx: &JobContext,
    split: Split,
    epoch: u32,
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
    };
    let features = ctx.plan.features;
    async move {
        let status = |s: tonic::Status| WorkerError::Coordinator {
            call: "FetchShard",
            status: s.to_string(),
        };
        let mut stream = control.fetch_shard(req).await.map_err(status)?.into_inner();
        let mut shard = Shard::default();
        while let Some(chunk) = stream.message().await.map_err(status)? {
            let rows = chunk.rows as usize;
            if chunk.features.len() != rows * features * 4 || chunk.labels.len() != rows * 4 {
                return Err(WorkerError::Shard(format!(
                    "chunk of {rows} rows has {} feature bytes and {} label bytes",
                    chunk.features.len(),
                    chunk.labels.len()
                )));
            }
            shard.x.extend(
                chunk
                    .features
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            shard.y.extend(
                chunk
                    .labels
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            shard.rows += rows;
        }
        Ok(shard)
    }
}

/// Loss and accuracy sums of a split, summed across all ranks.
fn evaluate(
    ctx: &JobContext,
    ring: &mut RingLink,
    mlp: &Mlp,
    params: &[f32],
    shard: &Shard,
    step: u64,
) -> Result<BatchStats, WorkerError> {
    let d = ctx.plan.features;
    let mut local = BatchStats::default();
    let mut start = 0;
    while start < shard.rows {
        let rows = EVAL_ROWS.min(shard.rows - start);
        let s = mlp.evaluate(
            params,
            &shard.x[start * d..(start + rows) * d],
            &shard.y[start..start + rows],
            rows,
        )?;
        local.add(&s);
        start += rows;
    }
    let mut buf = [
        local.loss_sum as f32,
        local.correct as f32,
        local.count as f32,
    ];
    block_on(ctx, ring.all_reduce(&mut buf, step))?;
    Ok(BatchStats {
        loss_sum: buf[0] as f64,
        correct: buf[1] as u64,
        count: buf[2] as u64,
    })
}

fn upload(
    ctx: &JobContext,
    params: &[f32],
    adam: &Adam,
    step: u64,
    epoch: u32,
    final_: bool,
) -> Result<(), WorkerError> {
    let _span = info_span!("checkpoint", step, final_).entered();
    let a = &ctx.assignment;
    let req = CheckpointUpload {
        job_id: a.job_id.clone(),
        generation: a.generation,
        step,
        epoch,
        r#final: final_,
        params: Bytes::copy_from_slice(bytemuck::cast_slice(params)),
        adam_m: Bytes::copy_from_slice(bytemuck::cast_slice(&adam.m)),
        adam_v: Bytes::copy_from_slice(bytemuck::cast_slice(&adam.v)),
        adam_t: adam.t,
        param_hash: crate::param_hash(params),
    };
    let mut control = ctx.control.clone();
    block_on(ctx, async move {
        control
            .upload_checkpoint(req)
            .await
            .map_err(|s| WorkerError::Coordinator {
                call: "UploadCheckpoint",
                status: s.to_string(),
            })
    })?;
    Ok(())
}

fn ratio(num: f64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num / den as f64
    }
}

fn train(ctx: &JobContext, reports: &Reports<'_>) -> Result<(), WorkerError> {
    let plan = &ctx.plan;
    let a = &ctx.assignment;
    let (rank, world) = (a.rank as usize, a.world as usize);
    let ring_config = RingConfig {
        timeout: Duration::from_millis(plan.collective_timeout_ms),
        ..RingConfig::default()
    };
    let mut ring = block_on(
        ctx,
        RingLink::connect(
            ctx.hub.clone(),
            &a.job_id,
            a.generation,
            rank,
            &a.peers,
            ring_config,
            ctx.cancel.clone(),
        ),
    )?;
    let validation = if plan.validation_samples > 0 {
        block_on(ctx, fetch(ctx, Split::Validation, 0))?
    } else {
        Shard::default()
    };
    let mlp = Mlp::new(plan.model.clone());
    let p = mlp.num_params();
    let mut params = plan.model.init_params(plan.seed);
    let mut adam = Adam::new(plan.optimizer, p);
    // Gradient, then the batch's loss sum and correct count: one all-reduce gives both.
    let mut buf = vec![0f32; p + 2];
    let d = plan.features;
    let mut step: u64 = 0;
    let mut next = Some(ctx.handle.spawn(fetch(ctx, Split::Train, 0)));
    for epoch in 0..plan.epochs {
        let shard = match next.take() {
            Some(h) => block_on(ctx, async {
                h.await.map_err(|e| WorkerError::Join(e.to_string()))?
            })?,
            None => return Err(WorkerError::Shard("missing epoch shard".into())),
        };
        if epoch + 1 < plan.epochs {
            next = Some(ctx.handle.spawn(fetch(ctx, Split::Train, epoch + 1)));
        }
        let lens = sharding::rank_batch_lens(plan.train_samples, plan.batch_size, rank, world);
        if shard.rows != lens.iter().sum::<usize>() {
            return Err(WorkerError::Shard(format!(
                "epoch {epoch}: got {} rows, the plan needs {}",
                shard.rows,
                lens.iter().sum::<usize>()
            )));
        }
        let started = Instant::now();
        let mut epoch_stats = BatchStats::default();
        let mut cursor = 0usize;
        for (k, &rows) in lens.iter().enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(WorkerError::Cancelled);
            }
            step += 1;
            let _span = info_span!("step", step).entered();
            let m = sharding::global_batch_len(plan.train_samples, plan.batch_size, k);
            let x = &shard.x[cursor * d..(cursor + rows) * d];
            let y = &shard.y[cursor..cursor + rows];
            cursor += rows;
            let stats = mlp.forward_backward(&params, x, y, rows, &mut buf[..p])?;
            buf[p] = stats.loss_sum as f32;
            buf[p + 1] = stats.correct as f32;
            {
                let t = Instant::now();
                let span = info_span!(
                    "all_reduce",
                    bytes = buf.len() * 4,
                    seconds = tracing::field::Empty
                );
                let _ar = span.enter();
                block_on(ctx, ring.all_reduce(&mut buf, step))?;
                span.record("seconds", t.elapsed().as_secs_f64());
            }
            let (loss_sum, correct) = (buf[p] as f64, buf[p + 1] as u64);
            let inv = 1.0 / m as f32;
            buf[..p].iter_mut().for_each(|g| *g *= inv);
            adam.step(&mut params, &buf[..p]);
            epoch_stats.add(&BatchStats {
                loss_sum,
                correct,
                count: m as u64,
            });
            reports.send(worker_report::Kind::Step(StepReport {
                step,
                epoch,
                loss: ratio(loss_sum, m as u64),
                accuracy: ratio(correct as f64, m as u64),
                param_hash: crate::param_hash(&params),
                global_batch: m as u32,
            }));
            if rank == 0 && plan.checkpoint_every > 0 && step.is_multiple_of(plan.checkpoint_every)
            {
                upload(ctx, &params, &adam, step, epoch, false)?;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let (val_loss, val_accuracy) = if plan.validation_samples > 0 {
            let v = evaluate(ctx, &mut ring, &mlp, &params, &validation, step)?;
            (
                Some(ratio(v.loss_sum, v.count)),
                Some(ratio(v.correct as f64, v.count)),
            )
        } else {
            (None, None)
        };
        let summary = EpochSummary {
            epoch: epoch + 1,
            loss: ratio(epoch_stats.loss_sum, epoch_stats.count),
            accuracy: ratio(epoch_stats.correct as f64, epoch_stats.count),
            val_loss,
            val_accuracy,
            samples_per_sec: plan.train_samples as f64 / seconds.max(1e-9),
            seconds,
        };
        info!(
            epoch = epoch + 1,
            loss = summary.loss,
            accuracy = summary.accuracy,
            "epoch done"
        );
        if rank == 0 {
            reports.send(worker_report::Kind::Epoch(EpochReport {
                summary: Some(summary),
            }));
        }
    }
    let (test_loss, test_accuracy) = if plan.test_samples > 0 {
        let test = block_on(ctx, fetch(ctx, Split::Test, 0))?;
        let t = evaluate(ctx, &mut ring, &mlp, &params, &test, step)?;
        (
            Some(ratio(t.loss_sum, t.count)),
            Some(ratio(t.correct as f64, t.count)),
        )
    } else {
        (None, None)
    };
    if rank == 0 {
        upload(ctx, &params, &adam, step, plan.epochs, true)?;
    }
    ctx.handle.block_on(ring.close());
    reports.send(worker_report::Kind::Finished(Finished {
        steps: step,
        test_loss,
        test_accuracy,
    }));
    Ok(())
}
