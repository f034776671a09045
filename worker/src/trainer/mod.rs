//! The step loop of one job on one worker.
//!
//! It runs on a dedicated blocking thread (compute must not stall the async runtime) and
//! enters the runtime only for network calls, through `Handle::block_on`. Every rank runs
//! exactly the same sequence of collectives (no rank-divergent control flow), so a short
//! last batch, or a rank with no rows in it, still lines up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtrain_core::telemetry::{RemoteParent, StepSampling};
use ringtrain_proto::v1::{
    worker_control_client::WorkerControlClient, worker_report, Assignment, EpochReport,
    EpochSummary, Failure, Finished, Resumed, Split, StepReport, Stopped, WorkerReport,
};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, info_span, warn, Span};

use crate::collective::CollectiveHub;
use crate::engine::Ring;
use crate::error::WorkerError;
use crate::loss::{Metric, MetricSums};
use crate::model::{DropoutKey, Mlp};
use crate::plan::TrainingPlan;
use crate::resume::{self, HeldState};

use crate::step::{Batch, Collective, RingPosition, StepPipeline};

mod io;

use io::{block_on, connect_ring, fetch, finish_upload, upload, BlockingRing, Shard, Upload};

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
    /// Where incoming data-plane connections arrive.
    pub data_hub: Arc<crate::tcp_ring::DataHub>,
    /// This worker's id at the coordinator.
    pub worker_id: String,
    /// The assignment being run.
    pub assignment: Assignment,
    /// Its parsed training plan.
    pub plan: TrainingPlan,
    /// Cancelled when the coordinator cancels the job or the worker shuts down.
    pub cancel: CancellationToken,
    /// Set to stop after the next step (a drain, or this worker leaving); the ranks
    /// agree on the step in-band.
    pub drain: Arc<AtomicBool>,
    /// This worker is leaving the cluster (SIGTERM): its stop report says so.
    pub leaving: Arc<AtomicBool>,
    /// The report stream, for a report sent from inside a collective (set by
    /// [`run_blocking`]).
    pub stall_reports: Option<mpsc::Sender<WorkerReport>>,
    /// The worker's `/metrics` counters (shared by every job it runs).
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Which steps get spans.
    pub trace_steps: StepSampling,
}

/// How a generation ended on this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Training is over; the rank reported its end.
    Finished,
    /// The ranks stopped after the same step at a drain; the state is kept.
    Stopped,
}

/// Runs the job's generation to its end, reporting progress, and returns how it ended
/// together with the training state this rank holds afterwards (kept for the next
/// generation). Failures are also reported to the coordinator (with the lost peer's
/// rank when that was the cause).
pub fn run_blocking(
    mut ctx: JobContext,
    held: Option<HeldState>,
) -> (Result<Outcome, WorkerError>, Option<HeldState>) {
    let a = &ctx.assignment;
    // Context for this thread's log lines. Not `job`: that name is the coordinator's
    // exported span, and this one is not exported (the exported `step` spans are
    // children of the coordinator's `generation` span instead).
    let span = info_span!("assignment", job = %a.job_id, generation = a.generation, rank = a.rank);
    let _enter = span.enter();
    let (tx, rx) = mpsc::channel(REPORT_CAPACITY);
    ctx.stall_reports = Some(tx.clone());
    let mut control = ctx.control.clone();
    let reporter = ctx
        .handle
        .spawn(async move { control.report(ReceiverStream::new(rx)).await });
    let reports = Reports { ctx: &ctx, tx };
    let mut slot = held;
    let result = train(&ctx, &reports, &mut slot);
    match &result {
        Ok(Outcome::Finished) => info!("job finished"),
        Ok(Outcome::Stopped) => info!("generation stopped at the drain; state kept"),
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
    // The last sender: the stream ends (and flushes) only once every sender is gone.
    ctx.stall_reports = None;
    // Flush the report stream (bounded: a vanished coordinator must not hold us here).
    match ctx
        .handle
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), reporter).await })
    {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(status))) => warn!(%status, "coordinator ended the report stream"),
        Ok(Err(e)) => warn!(error = %e, "report stream task failed"),
        // The timeout drops the handle, not the task: the stream keeps sending for as
        // long as this process runs (a coordinator busy accounting a DP job's epochs
        // reads slowly); only a process that exits now would lose what is left.
        Err(_) => {
            warn!("report stream not flushed within 10 s; it keeps sending in the background")
        }
    }
    (result, slot)
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
        // surfaces that as an error, so a lost report needs no handling beyond a log.
        if self.tx.blocking_send(report).is_err() {
            warn!("report stream to the coordinator is closed; dropping a report");
        }
    }
}

/// Where step time goes on this rank (seconds, summed over steps).
#[derive(Debug, Default)]
struct StepTiming {
    compute: f64,
    allreduce: f64,
    optimizer: f64,
    total: f64,
    steps: u64,
    samples: f64,
}

impl StepTiming {
    fn into_map(self) -> std::collections::HashMap<String, f64> {
        let other = (self.total - self.compute - self.allreduce - self.optimizer).max(0.0);
        [
            ("compute", self.compute),
            ("allreduce", self.allreduce),
            ("optimizer", self.optimizer),
            ("other", other),
            ("total", self.total),
            ("steps", self.steps as f64),
            ("samples", self.samples),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A traced step's `step` span: a child of the coordinator's `generation` span (whose
/// context came with the assignment), so every rank's step joins one trace.
fn step_span(a: &Assignment, parent: &RemoteParent, step: u64) -> Span {
    let span = info_span!(
        "step",
        step,
        job = %a.job_id,
        generation = a.generation,
        rank = a.rank,
        world = a.world
    );
    parent.adopt(&span);
    span
}

/// Metric sums of a split, summed across all ranks.
fn evaluate(
    ctx: &JobContext,
    ring: &mut Ring,
    mlp: &Mlp,
    params: &[f32],
    shard: &Shard,
    step: u64,
) -> Result<MetricSums, WorkerError> {
    let d = ctx.plan.features;
    let classes = mlp.metric_classes();
    let mut local = MetricSums::new(classes);
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
    let mut buf = vec![0f32; MetricSums::flat_len(classes)];
    local.write_flat(&mut buf);
    BlockingRing { ctx, ring }.sum_f32(&mut buf, step)?;
    Ok(MetricSums::from_flat(classes, &buf))
}

/// Named values of a split's metrics, with a prefix (`val_`, `test_`).
fn named(
    sums: &MetricSums,
    metrics: &[Metric],
    prefix: &str,
    extra_loss: f64,
) -> Vec<(String, f64)> {
    sums.values(metrics)
        .into_iter()
        .map(|(k, v)| {
            (
                format!("{prefix}{k}"),
                if k == "loss" { v + extra_loss } else { v },
            )
        })
        .collect()
}

fn train(
    ctx: &JobContext,
    reports: &Reports<'_>,
    slot: &mut Option<HeldState>,
) -> Result<Outcome, WorkerError> {
    let plan = &ctx.plan;
    let a = &ctx.assignment;
    let (rank, world) = (a.rank as usize, a.world as usize);
    let mut ring = connect_ring(ctx)?;
    let threads = crate::config::compute_threads();
    let mlp = Mlp::new(plan.model.clone(), plan.loss)
        .with_target_center(plan.target_center)
        .with_threads(threads);
    let classes = mlp.metric_classes();
    // Where this generation starts: agreed with the other ranks before any step.
    let source = resume::agree(
        a,
        plan,
        classes,
        slot,
        &mut BlockingRing {
            ctx,
            ring: &mut ring,
        },
    )?;
    let Some(s) = slot.as_mut() else {
        return Err(WorkerError::Plan(
            "the ranks agreed on a start but this rank holds no state".into(),
        ));
    };
    info!(
        step = s.step,
        epochs_done = s.epochs_done,
        source = source.as_str(),
        "generation starts"
    );
    reports.send(worker_report::Kind::Resumed(Resumed {
        step: s.step,
        param_hash: s.hash(),
        source: source.as_str().into(),
    }));
    let validation = if plan.validation_samples > 0 && !s.done {
        block_on(ctx, fetch(ctx, Split::Validation, 0, 0))?
    } else {
        Shard::default()
    };
    let mut pipeline = StepPipeline::for_job(plan, &mlp, threads, a.rank, a.world)?;
    let trace_parent = RemoteParent::from_map(&a.trace_context);
    let position = RingPosition {
        rank: a.rank,
        world: a.world,
    };
    let d = plan.features;
    let spe = plan.steps_per_epoch().max(1) as u64;
    let mut timing = StepTiming::default();
    let mut pending_upload: Option<Upload> = None;
    let max_steps = plan.step_limit();
    let mut next: Option<(u32, tokio::task::JoinHandle<Result<Shard, WorkerError>>)> = None;
    while !s.done {
        let epoch = s.epochs_done;
        if epoch >= plan.epochs {
            s.done = true;
            break;
        }
        let start_batch = s.step.saturating_sub(epoch as u64 * spe).min(spe);
        let started = Instant::now();
        let mut trained = 0.0;
        if start_batch < spe && s.step < max_steps {
            let shard = match next.take() {
                Some((e, h)) if e == epoch && start_batch == 0 => block_on(ctx, async {
                    h.await.map_err(|e| WorkerError::Join(e.to_string()))?
                })?,
                _ => block_on(ctx, fetch(ctx, Split::Train, epoch, start_batch))?,
            };
            if epoch + 1 < plan.epochs {
                next = Some((
                    epoch + 1,
                    ctx.handle.spawn(fetch(ctx, Split::Train, epoch + 1, 0)),
                ));
            }
            let lens = plan.rank_epoch(epoch, rank, world, start_batch as usize).1;
            if shard.rows != lens.iter().sum::<usize>() {
                return Err(WorkerError::Shard(format!(
                    "epoch {epoch} from batch {start_batch}: got {} rows, the plan needs {}",
                    shard.rows,
                    lens.iter().sum::<usize>()
                )));
            }
            let mut cursor = 0usize;
            for &rows in &lens {
                if ctx.cancel.is_cancelled() {
                    return Err(WorkerError::Cancelled);
                }
                if s.step >= max_steps {
                    break;
                }
                let t_step = Instant::now();
                let step = s.step + 1;
                // An untraced step creates no span at all (see `StepSampling`).
                let traced = ctx.trace_steps.traces(step);
                let span = if traced {
                    step_span(a, &trace_parent, step)
                } else {
                    Span::none()
                };
                let _span = span.enter();
                pipeline.set_traced(traced.then_some(position));
                let batch = Batch {
                    x: &shard.x[cursor * d..(cursor + rows) * d],
                    y: &shard.y[cursor..cursor + rows],
                    rows,
                    dropout: DropoutKey {
                        seed: plan.seed,
                        step,
                        samples: &shard.idx[cursor..cursor + rows],
                    },
                };
                pipeline.set_vote(ctx.drain.load(Ordering::Acquire));
                // The pipeline changes the parameters and optimizer state only after
                // the all-reduce succeeded, so an error leaves the state at `s.step`.
                let out = pipeline.run(
                    plan,
                    &mlp,
                    &mut s.params,
                    &mut s.opt,
                    &batch,
                    step,
                    &mut BlockingRing {
                        ctx,
                        ring: &mut ring,
                    },
                )?;
                cursor += rows;
                s.step = step;
                timing.compute += out.compute_secs;
                timing.allreduce += out.allreduce_secs;
                timing.optimizer += out.optimizer_secs;
                let (global, penalty, m) = (&out.global, out.penalty, out.batch());
                s.penalty_sum += penalty * m;
                s.epoch_sums.add(global);
                trained += m;
                reports.send(worker_report::Kind::Step(StepReport {
                    step,
                    epoch,
                    loss: global.loss() + penalty,
                    accuracy: if classes > 0 { global.accuracy() } else { 0.0 },
                    param_hash: s.hash(),
                    global_batch: m as u32,
                }));
                if rank == 0
                    && plan.checkpoint_every > 0
                    && step.is_multiple_of(plan.checkpoint_every)
                {
                    // One upload at a time: the previous one has had `checkpoint_every`
                    // steps to finish.
                    finish_upload(ctx, pending_upload.take())?;
                    pending_upload = Some(upload(ctx, s, false));
                }
                let step_secs = t_step.elapsed().as_secs_f64();
                ctx.metrics.record_step(rows, step_secs);
                timing.total += step_secs;
                timing.steps += 1;
                timing.samples += m;
                if out.stop {
                    finish_upload(ctx, pending_upload.take())?;
                    let leaving = ctx.leaving.load(Ordering::Acquire);
                    info!(step, leaving, "stopping after this step (drain)");
                    reports.send(worker_report::Kind::Stopped(Stopped {
                        step,
                        param_hash: s.hash(),
                        leaving,
                    }));
                    ctx.handle.block_on(ring.close());
                    return Ok(Outcome::Stopped);
                }
            }
        }
        // The epoch's end: validation, summary, early stopping. The state changes only
        // after the validation all-reduce succeeded.
        let seconds = started.elapsed().as_secs_f64();
        let mut values = named(
            &s.epoch_sums,
            &plan.metrics,
            "",
            s.penalty_sum / s.epoch_sums.count.max(1.0),
        );
        if plan.validation_samples > 0 {
            let v = evaluate(ctx, &mut ring, &mlp, &s.params, &validation, s.step)?;
            values.extend(named(&v, &plan.metrics, "val_", 0.0));
        }
        let get = |k: &str| values.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        let summary = EpochSummary {
            epoch: epoch + 1,
            loss: get("loss").unwrap_or(0.0),
            accuracy: get("accuracy").unwrap_or(0.0),
            val_loss: get("val_loss"),
            val_accuracy: get("val_accuracy"),
            samples_per_sec: trained / seconds.max(1e-9),
            seconds,
            metrics: values.iter().cloned().collect(),
        };
        // Early stopping sees only all-reduced numbers, so every rank decides alike.
        let mut stop = false;
        if let Some(es) = &plan.early_stopping {
            let current = get(&es.monitor).ok_or_else(|| {
                WorkerError::Plan(format!(
                    "early_stopping.monitor {:?} is not a reported metric",
                    es.monitor
                ))
            })?;
            let sign = if Metric::higher_is_better(&es.monitor) {
                1.0
            } else {
                -1.0
            };
            let improved = s
                .best
                .as_ref()
                .is_none_or(|(b, _)| sign * (current - b) > es.min_delta);
            if improved {
                s.best = Some((
                    current,
                    if es.restore_best {
                        s.params.clone()
                    } else {
                        Vec::new()
                    },
                ));
                s.since_best = 0;
            } else {
                s.since_best += 1;
                // Keras: stop once `patience` epochs in a row brought no improvement.
                stop = s.since_best >= es.patience;
            }
        }
        info!(epoch = epoch + 1, loss = summary.loss, "epoch done");
        s.epochs_done = epoch + 1;
        s.epoch_sums = MetricSums::new(classes);
        s.penalty_sum = 0.0;
        if stop {
            info!(epoch = epoch + 1, "early stopping");
        }
        if stop || s.step >= max_steps || s.epochs_done >= plan.epochs {
            s.done = true;
        }
        if rank == 0 {
            reports.send(worker_report::Kind::Epoch(EpochReport {
                summary: Some(summary),
            }));
        }
    }
    if let (Some(es), Some((_, best))) = (&plan.early_stopping, &s.best) {
        if es.restore_best && !best.is_empty() {
            s.params = best.clone();
        }
    }
    let mut test_metrics = Vec::new();
    if plan.test_samples > 0 {
        let test = block_on(ctx, fetch(ctx, Split::Test, 0, 0))?;
        let t = evaluate(ctx, &mut ring, &mlp, &s.params, &test, s.step)?;
        test_metrics = named(&t, &plan.metrics, "test_", 0.0);
    }
    if rank == 0 {
        finish_upload(ctx, pending_upload.take())?;
        finish_upload(ctx, Some(upload(ctx, s, true)))?;
    }
    ctx.handle.block_on(ring.close());
    let get = |k: &str| test_metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    reports.send(worker_report::Kind::Finished(Finished {
        steps: s.step,
        test_loss: get("test_loss"),
        test_accuracy: get("test_accuracy"),
        test_metrics: test_metrics.iter().cloned().collect(),
        epochs: s.epochs_done,
        timing: timing.into_map(),
    }));
    Ok(Outcome::Finished)
}
