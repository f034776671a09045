//! One training step as a pipeline of named stages.
//!
//! ```text
//! scale -> privatize (DP clip + noise) -> mask (secure aggregation) -> all-reduce
//!       -> unmask -> divide -> regularize (L2, clip by global norm) -> optimize
//! ```
//!
//! Every stage is a small function (or a hook object) tested alone; [`StepPipeline`]
//! runs them in order over one flat buffer `[gradient | metric sums]`, so the metric
//! sums travel in the same all-reduce as the gradient and every rank knows the exact
//! global loss of every step.
//!
//! Under DP-SGD (`plan.privacy`), `scale` clips every example's gradient
//! ([`Mlp::forward_backward_clipped`]), `privatize` is a [`NoiseHook`] adding this rank's
//! share of the noise to the gradient part only, and `divide` divides by the plan's
//! expected batch size instead of the real one (which would leak it): an empty batch
//! still adds noise and still steps. [`StepPipeline::for_job`] builds all of it. Differential privacy and secure aggregation plug in as
//! hooks ([`StepPipeline::with_privatize`], [`StepPipeline::with_secure_aggregation`])
//! without touching the trainer's loop; without them those stages are skipped and a
//! step is exactly what it always was, byte for byte.
//!
//! The stages are synchronous: the all-reduce is reached through [`Collective`], which
//! the trainer implements by entering the runtime from its step thread.

use std::time::Instant;

use tracing::{info_span, Span};

use crate::dp::{NoiseHook, NoiseSeed};
use crate::error::WorkerError;
use crate::loss::MetricSums;
use crate::model::{ClipStats, DropoutKey, Mlp};
use crate::optimizer::{clip_by_global_norm, Optimizer};
use crate::plan::{DpPlan, TrainingPlan};

/// The stages, in pipeline order (names for spans, logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Forward and backward: the gradient of the summed loss over this rank's rows.
    Scale,
    /// Differential privacy: clip each example's contribution and add noise.
    Privatize,
    /// Secure aggregation: encode in Z(2^64) and add the pairwise masks.
    Mask,
    /// The ring all-reduce.
    AllReduce,
    /// Secure aggregation: remove what is left of the masks and decode.
    Unmask,
    /// Divide by the global batch.
    Divide,
    /// L2 penalty gradient, then clipping by the global norm.
    Regularize,
    /// The optimizer update.
    Optimize,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 8] = [
        Stage::Scale,
        Stage::Privatize,
        Stage::Mask,
        Stage::AllReduce,
        Stage::Unmask,
        Stage::Divide,
        Stage::Regularize,
        Stage::Optimize,
    ];

    /// The stage's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Scale => "scale",
            Stage::Privatize => "privatize",
            Stage::Mask => "mask",
            Stage::AllReduce => "all_reduce",
            Stage::Unmask => "unmask",
            Stage::Divide => "divide",
            Stage::Regularize => "regularize",
            Stage::Optimize => "optimize",
        }
    }
}

/// The step's collectives, entered from the (blocking) step thread.
pub trait Collective {
    /// Sums f32 `buf` across all ranks, in place.
    fn sum_f32(&mut self, buf: &mut [f32], step: u64) -> Result<(), WorkerError>;
    /// Sums `buf` in Z(2^64) across all ranks, in place (exact, so masks cancel).
    fn sum_u64(&mut self, buf: &mut [u64], step: u64) -> Result<(), WorkerError>;
}

/// A stage over this rank's local gradient before the all-reduce (DP-SGD's clip and
/// noise plugs in here).
pub trait GradientHook: Send {
    /// Transforms `grad` (this rank's summed gradient) in place.
    fn apply(&mut self, grad: &mut [f32], step: u64) -> Result<(), WorkerError>;
}

/// Secure aggregation around the all-reduce: the ring then sums masked fixed-point
/// values in Z(2^64), where the pairwise masks cancel exactly.
pub trait SecureAggregation: Send {
    /// Encodes `local` (gradient and metric sums) and adds this rank's masks.
    fn mask(&mut self, local: &[f32], out: &mut [u64], step: u64) -> Result<(), WorkerError>;
    /// Decodes the ring's sum into `out`, removing whatever is left of the masks.
    fn unmask(&mut self, sum: &[u64], out: &mut [f32], step: u64) -> Result<(), WorkerError>;
}

/// Where this rank sits in the ring: what a traced step's `all_reduce` span records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPosition {
    /// This rank.
    pub rank: u32,
    /// Ranks in the ring.
    pub world: u32,
}

/// A traced step's stage span (`compute`, `all_reduce`, `optimizer`, children of the
/// current `step` span); none at all for an untraced step, which so costs no span.
fn stage_span(traced: Option<RingPosition>, make: impl FnOnce(RingPosition) -> Span) -> Span {
    match traced {
        Some(at) => make(at),
        None => Span::none(),
    }
}

/// One step's rows on this rank.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Features, row-major.
    pub x: &'a [f32],
    /// Labels or targets.
    pub y: &'a [f32],
    /// Rows (may be 0: the rank still takes part in every collective).
    pub rows: usize,
    /// Training-mode dropout key.
    pub dropout: DropoutKey<'a>,
}

/// What a step produced.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The global batch's metric sums (all ranks').
    pub global: MetricSums,
    /// The L2 penalty added to the loss (0 without L2).
    pub penalty: f64,
    /// Seconds in scale (forward and backward).
    pub compute_secs: f64,
    /// Seconds in the all-reduce.
    pub allreduce_secs: f64,
    /// Seconds from the all-reduce's end through the optimizer update.
    pub optimizer_secs: f64,
    /// Some rank voted to stop after this step (a drain or a leave); every rank sees
    /// the same sum, so all stop after the same step.
    pub stop: bool,
    /// Under DP: the rows of the global batch whose gradient was clipped (`None`
    /// without DP).
    pub clipped: Option<f64>,
}

impl StepOutcome {
    /// The global batch size (at least 1): the divisor of [`divide`] without DP, and
    /// what the step's metrics are averaged over in any case.
    pub fn batch(&self) -> f64 {
        self.global.count.max(1.0)
    }
}

/// Stage `scale`: forward and backward over this rank's rows. Writes the gradient of the
/// **summed** loss into `buf[..p]` (the local mean scaled by the local row count, so
/// contributions add up to the global sum whatever each rank's share) and the batch's
/// metric sums into `buf[p..]`. With `clip` (DP-SGD's C), each example's gradient is
/// clipped to that L2 norm before the sum, and what the clipping did is returned.
pub fn scale(
    mlp: &Mlp,
    params: &[f32],
    batch: &Batch<'_>,
    buf: &mut [f32],
    p: usize,
    clip: Option<f64>,
) -> Result<Option<ClipStats>, WorkerError> {
    let (grad, sums) = buf.split_at_mut(p);
    let dropout = Some(&batch.dropout);
    let (local, stats) = match clip {
        None => (
            mlp.forward_backward(params, batch.x, batch.y, batch.rows, grad, dropout)?,
            None,
        ),
        Some(c) => {
            let (local, stats) = mlp
                .forward_backward_clipped(params, batch.x, batch.y, batch.rows, grad, dropout, c)?;
            (local, Some(stats))
        }
    };
    local.write_flat(sums);
    Ok(stats)
}

/// Stage `divide`: the summed gradient becomes the global batch's mean; returns the
/// divisor (the global count, or under DP the expected batch size; at least 1).
pub fn divide(grad: &mut [f32], global_count: f64) -> f64 {
    let m = global_count.max(1.0);
    let inv = (1.0 / m) as f32;
    grad.iter_mut().for_each(|g| *g *= inv);
    m
}

/// Stage `regularize`: adds the L2 penalty's gradient (when the model has any), then
/// clips to `clip_norm`. Returns the penalty (part of the reported loss, as Keras).
pub fn regularize(plan: &TrainingPlan, has_l2: bool, params: &[f32], grad: &mut [f32]) -> f64 {
    let penalty = if has_l2 {
        plan.model.add_l2_grad(params, grad);
        plan.model.l2_penalty(params)
    } else {
        0.0
    };
    if let Some(c) = plan.clip_norm {
        clip_by_global_norm(grad, c);
    }
    penalty
}

/// Stage `optimize`: one update at the scheduled rate of 1-based `step`.
pub fn optimize(
    plan: &TrainingPlan,
    opt: &mut Optimizer,
    params: &mut [f32],
    grad: &[f32],
    step: u64,
    threads: usize,
) {
    let lr = plan.schedule.rate(
        plan.optimizer.learning_rate(),
        step.saturating_sub(1),
        plan.warmup_steps,
    );
    opt.step_threads(params, grad, lr, threads);
}

/// The stages of one step, built once per job from its plan.
pub struct StepPipeline {
    /// Parameters (the gradient's length).
    p: usize,
    classes: usize,
    threads: usize,
    has_l2: bool,
    /// DP-SGD: clip each example in `scale`, divide by the expected batch size.
    dp: Option<DpPlan>,
    /// The DP divisor: the plan's (expected) batch size.
    expected_batch: f64,
    privatize: Option<Box<dyn GradientHook>>,
    secure: Option<Box<dyn SecureAggregation>>,
    /// `[gradient | metric sums | clipped rows (DP only) | stop vote]`, reused every
    /// step. Without DP the buffer is what it always was, so the ring's chunks and sums
    /// are too.
    buf: Vec<f32>,
    /// This rank's vote to stop after the next step.
    vote: bool,
    /// The masked buffer under secure aggregation (empty otherwise).
    masked: Vec<u64>,
    /// The next step is traced (with this rank's ring position): its stages get spans.
    traced: Option<RingPosition>,
}

impl std::fmt::Debug for StepPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepPipeline")
            .field("p", &self.p)
            .field("dp", &self.dp.is_some())
            .field("privatize", &self.privatize.is_some())
            .field("secure", &self.secure.is_some())
            .finish_non_exhaustive()
    }
}

impl StepPipeline {
    /// The pipeline of `plan` for `mlp`, with no privatize or secure-aggregation hook.
    /// Under a DP plan it clips each example and divides by the expected batch size,
    /// but [`run`](Self::run) refuses to step until a noise hook is installed
    /// ([`with_privatize`](Self::with_privatize)); [`for_job`](Self::for_job) installs
    /// the real one.
    pub fn from_plan(plan: &TrainingPlan, mlp: &Mlp, threads: usize) -> Self {
        let p = mlp.num_params();
        let classes = mlp.metric_classes();
        let dp = plan.privacy;
        let extra = usize::from(dp.is_some());
        StepPipeline {
            p,
            classes,
            threads,
            has_l2: plan.model.layers.iter().any(|l| l.l2 > 0.0),
            dp,
            expected_batch: plan.batch_size as f64,
            privatize: None,
            secure: None,
            buf: vec![0.0; p + MetricSums::flat_len(classes) + extra + 1],
            vote: false,
            masked: Vec::new(),
            traced: None,
        }
    }

    /// The pipeline a job's rank runs: [`from_plan`](Self::from_plan), plus under DP the
    /// [`NoiseHook`] adding `N(0, σ²C²/world)` per coordinate, drawn from the OS or,
    /// with `deterministic_noise`, from (job seed, step, `rank`).
    pub fn for_job(
        plan: &TrainingPlan,
        mlp: &Mlp,
        threads: usize,
        rank: u32,
        world: u32,
    ) -> Result<Self, WorkerError> {
        let pipeline = Self::from_plan(plan, mlp, threads);
        let Some(dp) = plan.privacy else {
            return Ok(pipeline);
        };
        let std = dp.noise_multiplier * dp.max_grad_norm / f64::from(world.max(1)).sqrt();
        let seed = if dp.deterministic_noise {
            NoiseSeed::Deterministic {
                seed: plan.seed,
                rank,
            }
        } else {
            NoiseSeed::Os
        };
        let hook = NoiseHook::new(std, pipeline.p, seed)?;
        Ok(pipeline.with_privatize(Box::new(hook)))
    }

    /// Adds the DP stage (noise on the local clipped gradient sum).
    pub fn with_privatize(mut self, hook: Box<dyn GradientHook>) -> Self {
        self.privatize = Some(hook);
        self
    }

    /// Adds secure aggregation: mask before the all-reduce, unmask after it.
    pub fn with_secure_aggregation(mut self, secure: Box<dyn SecureAggregation>) -> Self {
        self.masked = vec![0; self.buf.len()];
        self.secure = Some(secure);
        self
    }

    /// Votes to stop after the next step (or takes the vote back). The vote travels in
    /// the step's own all-reduce, one slot after the metric sums: stopping costs no
    /// extra round trip.
    pub fn set_vote(&mut self, stop: bool) {
        self.vote = stop;
    }

    /// Traces the next steps' stages (`Some`, at this ring position) or not (`None`).
    pub fn set_traced(&mut self, traced: Option<RingPosition>) {
        self.traced = traced;
    }

    /// The stages this pipeline runs, in order (skipped ones left out).
    pub fn stages(&self) -> Vec<Stage> {
        Stage::ALL
            .into_iter()
            .filter(|s| match s {
                Stage::Privatize => self.privatize.is_some(),
                Stage::Mask | Stage::Unmask => self.secure.is_some(),
                _ => true,
            })
            .collect()
    }

    /// Runs one step: every stage in order, ending with `params` and `opt` updated.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        plan: &TrainingPlan,
        mlp: &Mlp,
        params: &mut [f32],
        opt: &mut Optimizer,
        batch: &Batch<'_>,
        step: u64,
        ring: &mut dyn Collective,
    ) -> Result<StepOutcome, WorkerError> {
        let p = self.p;
        if self.dp.is_some() && self.privatize.is_none() {
            return Err(WorkerError::Plan(
                "a dp plan needs its noise stage: build the pipeline with for_job".into(),
            ));
        }
        let traced = self.traced;
        let t = Instant::now();
        let last = self.buf.len() - 1;
        // The end of the metric sums: the clipped-row count (DP only) sits after them.
        let sums_end = p + MetricSums::flat_len(self.classes);
        let clip = self.dp.map(|dp| dp.max_grad_norm);
        let compute_secs = {
            // DP's noise is part of the `compute` span (not of compute_secs).
            let _compute =
                stage_span(traced, |_| info_span!("compute", rows = batch.rows)).entered();
            let stats = scale(mlp, params, batch, &mut self.buf[..sums_end], p, clip)?;
            if let Some(stats) = stats {
                // Exact in f32 up to 2^24 rows.
                self.buf[sums_end] = stats.clipped as f32;
            }
            self.buf[last] = if self.vote { 1.0 } else { 0.0 };
            let secs = t.elapsed().as_secs_f64();
            if let Some(hook) = &mut self.privatize {
                hook.apply(&mut self.buf[..p], step)?;
            }
            secs
        };
        let t = Instant::now();
        {
            let span = stage_span(traced, |at| {
                info_span!(
                    "all_reduce",
                    bytes = self.buf.len() * 4,
                    rank = at.rank,
                    world = at.world,
                    wait_seconds = tracing::field::Empty
                )
            });
            let _ar = span.enter();
            // The time this rank is blocked in the ring (sending, receiving and waiting
            // for its neighbours); masking is compute, not waiting.
            let wait = match &mut self.secure {
                None => {
                    ring.sum_f32(&mut self.buf, step)?;
                    t.elapsed()
                }
                Some(secure) => {
                    secure.mask(&self.buf, &mut self.masked, step)?;
                    let w = Instant::now();
                    ring.sum_u64(&mut self.masked, step)?;
                    let wait = w.elapsed();
                    secure.unmask(&self.masked, &mut self.buf, step)?;
                    wait
                }
            };
            span.record("wait_seconds", wait.as_secs_f64());
        }
        let allreduce_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _optimizer = stage_span(traced, |_| info_span!("optimizer")).entered();
        let stop = self.buf[last] > 0.5;
        let global = MetricSums::from_flat(self.classes, &self.buf[p..sums_end]);
        let clipped = self.dp.map(|_| f64::from(self.buf[sums_end]));
        let divisor = if self.dp.is_some() {
            self.expected_batch
        } else {
            global.count
        };
        let grad = &mut self.buf[..p];
        divide(grad, divisor);
        let penalty = regularize(plan, self.has_l2, params, grad);
        optimize(plan, opt, params, grad, step, self.threads);
        Ok(StepOutcome {
            global,
            penalty,
            compute_secs,
            allreduce_secs,
            optimizer_secs: t.elapsed().as_secs_f64(),
            stop,
            clipped,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ring::{self, SumF32, WrappingSumU64};

    #[test]
    fn divide_makes_the_global_mean_and_never_divides_by_zero() {
        let mut g = [2.0f32, -4.0, 1.0];
        assert_eq!(divide(&mut g, 4.0), 4.0);
        assert_eq!(g, [0.5, -1.0, 0.25]);
        let mut g = [3.0f32];
        assert_eq!(divide(&mut g, 0.0), 1.0);
        assert_eq!(g, [3.0]);
    }

    #[test]
    fn stages_are_listed_in_pipeline_order() {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "scale",
                "privatize",
                "mask",
                "all_reduce",
                "unmask",
                "divide",
                "regularize",
                "optimize"
            ]
        );
    }

    /// Fixed point with 2^16 steps per unit and a mask that is the same for every
    /// element: rank `r` adds `(r + 1) · K` and the last rank subtracts the total, so
    /// the masks sum to zero in Z(2^64) as pairwise masks do.
    struct ToyMask {
        rank: u64,
        world: u64,
    }

    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    const ONE: f64 = 65536.0;

    impl ToyMask {
        fn mask_of(&self) -> u64 {
            if self.rank + 1 == self.world {
                (0..self.world - 1).fold(0u64, |a, r| a.wrapping_sub((r + 1).wrapping_mul(K)))
            } else {
                (self.rank + 1).wrapping_mul(K)
            }
        }
    }

    impl SecureAggregation for ToyMask {
        fn mask(&mut self, local: &[f32], out: &mut [u64], _: u64) -> Result<(), WorkerError> {
            let m = self.mask_of();
            for (o, v) in out.iter_mut().zip(local) {
                *o = ((*v as f64 * ONE).round() as i64 as u64).wrapping_add(m);
            }
            Ok(())
        }
        fn unmask(&mut self, sum: &[u64], out: &mut [f32], _: u64) -> Result<(), WorkerError> {
            for (o, s) in out.iter_mut().zip(sum) {
                *o = (*s as i64 as f64 / ONE) as f32;
            }
            Ok(())
        }
    }

    /// The ranks' buffers, summed by the pure simulation once every rank has called in.
    struct SimRing {
        world: usize,
        f32s: Vec<Vec<f32>>,
        u64s: Vec<Vec<u64>>,
    }

    impl Collective for SimRing {
        fn sum_f32(&mut self, buf: &mut [f32], _: u64) -> Result<(), WorkerError> {
            self.f32s.push(buf.to_vec());
            if self.f32s.len() == self.world {
                ring::simulate::<SumF32>(&mut self.f32s);
            }
            buf.copy_from_slice(&self.f32s[0]);
            Ok(())
        }
        fn sum_u64(&mut self, buf: &mut [u64], _: u64) -> Result<(), WorkerError> {
            self.u64s.push(buf.to_vec());
            if self.u64s.len() == self.world {
                ring::simulate::<WrappingSumU64>(&mut self.u64s);
            }
            buf.copy_from_slice(&self.u64s[0]);
            Ok(())
        }
    }

    #[test]
    fn masks_cancel_through_the_u64_stage_and_unmask_recovers_the_sum() {
        // Two ranks' contributions (dyadic, so fixed point is exact), masked, summed by
        // the ring's schedule, unmasked: the plain sum.
        let world = 3;
        let locals = [
            vec![1.5f32, -2.25, 7.0],
            vec![0.25, 4.0, -1.0],
            vec![-3.0, 0.5, 2.0],
        ];
        let mut ring = SimRing {
            world,
            f32s: Vec::new(),
            u64s: Vec::new(),
        };
        let mut masked: Vec<Vec<u64>> = Vec::new();
        for (r, l) in locals.iter().enumerate() {
            let mut m = ToyMask {
                rank: r as u64,
                world: world as u64,
            };
            let mut out = vec![0u64; 3];
            m.mask(l, &mut out, 1).unwrap();
            // A masked contribution hides the plain one.
            assert_ne!(out[0], (l[0] as f64 * ONE) as u64);
            masked.push(out);
        }
        for m in &mut masked {
            let mut b = m.clone();
            ring.sum_u64(&mut b, 1).unwrap();
            *m = b;
        }
        let mut out = vec![0f32; 3];
        ToyMask { rank: 0, world: 3 }
            .unmask(&ring.u64s[0], &mut out, 1)
            .unwrap();
        assert_eq!(out, vec![-1.25, 2.25, 8.0]);
    }

    /// The credit example's plan (dropout, L2, AdamW) with clipping on.
    fn credit_plan() -> TrainingPlan {
        let file = ringtrain_core::job_file::JobFile::parse(
            include_str!("../../examples/credit-binary.toml"),
            "examples/credit-binary.toml",
        )
        .unwrap();
        let mut plan = file.training_plan(ringtrain_core::job_file::PlanData {
            train_samples: 64,
            validation_samples: 0,
            test_samples: 0,
            features: file.model.input,
            collective_timeout_ms: 1000,
            target_center: 0.0,
            max_steps: None,
        });
        plan.warmup_steps = 3;
        plan.clip_norm = Some(0.05);
        plan.early_stopping = None;
        plan.checkpoint_every = 0;
        plan
    }

    /// A ring of `world` ranks that all contributed the same buffer.
    struct Replicated(usize);

    impl Collective for Replicated {
        fn sum_f32(&mut self, buf: &mut [f32], _: u64) -> Result<(), WorkerError> {
            let mut bufs = vec![buf.to_vec(); self.0];
            ring::simulate::<SumF32>(&mut bufs);
            buf.copy_from_slice(&bufs[0]);
            Ok(())
        }
        fn sum_u64(&mut self, _: &mut [u64], _: u64) -> Result<(), WorkerError> {
            unreachable!("no secure aggregation in this pipeline")
        }
    }

    #[test]
    fn the_pipeline_is_its_stages_in_order_bit_for_bit() {
        // The step as the trainer wrote it before it became a pipeline, stage by stage,
        // against `StepPipeline::run`: the same bytes after three steps.
        let plan = credit_plan();
        let mlp = Mlp::new(plan.model.clone(), plan.loss).with_threads(1);
        let p = mlp.num_params();
        let mut rng = crate::rng::Rng::new(5);
        let rows = 16;
        let x: Vec<f32> = (0..rows * plan.features)
            .map(|_| rng.normal() as f32)
            .collect();
        let y: Vec<f32> = (0..rows).map(|i| (i % 2) as f32).collect();
        let idx: Vec<u32> = (0..rows as u32).collect();
        let mut pipeline = StepPipeline::from_plan(&plan, &mlp, 1);
        assert_eq!(
            pipeline.stages(),
            [
                Stage::Scale,
                Stage::AllReduce,
                Stage::Divide,
                Stage::Regularize,
                Stage::Optimize
            ]
        );
        let (mut pa, mut oa) = (
            plan.model.init_params(plan.seed),
            Optimizer::new(plan.optimizer, p),
        );
        let (mut pb, mut ob) = (pa.clone(), oa.clone());
        let mut buf = vec![0f32; p + MetricSums::flat_len(mlp.metric_classes())];
        for step in 1..=3u64 {
            let batch = Batch {
                x: &x,
                y: &y,
                rows,
                dropout: DropoutKey {
                    seed: plan.seed,
                    step,
                    samples: &idx,
                },
            };
            let out = pipeline
                .run(
                    &plan,
                    &mlp,
                    &mut pa,
                    &mut oa,
                    &batch,
                    step,
                    &mut Replicated(2),
                )
                .unwrap();
            let sums = mlp
                .forward_backward(&pb, &x, &y, rows, &mut buf[..p], Some(&batch.dropout))
                .unwrap();
            sums.write_flat(&mut buf[p..]);
            Replicated(2).sum_f32(&mut buf, step).unwrap();
            let global = MetricSums::from_flat(mlp.metric_classes(), &buf[p..]);
            let inv = (1.0 / global.count.max(1.0)) as f32;
            buf[..p].iter_mut().for_each(|g| *g *= inv);
            plan.model.add_l2_grad(&pb, &mut buf[..p]);
            let penalty = plan.model.l2_penalty(&pb);
            clip_by_global_norm(&mut buf[..p], 0.05);
            let lr = plan
                .schedule
                .rate(plan.optimizer.learning_rate(), step - 1, 3);
            ob.step_threads(&mut pb, &buf[..p], lr, 1);
            assert_eq!(out.global, global);
            assert_eq!(out.batch(), 2.0 * rows as f64);
            assert_eq!(out.penalty.to_bits(), penalty.to_bits());
            assert!(
                pa.iter().zip(&pb).all(|(a, b)| a.to_bits() == b.to_bits()),
                "step {step}"
            );
        }
        // The clip stage bounded the update's gradient: the parameters moved.
        assert_ne!(pa, plan.model.init_params(plan.seed));
    }

    #[test]
    fn regularize_clips_to_the_global_norm() {
        let plan = credit_plan();
        let params = plan.model.init_params(plan.seed);
        let mut g = vec![1.0f32; params.len()];
        let penalty = regularize(&plan, false, &params, &mut g);
        assert_eq!(penalty, 0.0);
        let norm = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 0.05).abs() < 1e-6, "{norm}");
    }

    #[test]
    fn a_privatize_hook_runs_on_the_local_gradient_only() {
        struct Halve;
        impl GradientHook for Halve {
            fn apply(&mut self, g: &mut [f32], _: u64) -> Result<(), WorkerError> {
                g.iter_mut().for_each(|v| *v *= 0.5);
                Ok(())
            }
        }
        let mut g = vec![2.0f32, 4.0];
        Halve.apply(&mut g, 1).unwrap();
        assert_eq!(g, [1.0, 2.0]);
    }

    /// The credit plan under DP-SGD with reproducible noise.
    fn dp_plan() -> TrainingPlan {
        let mut plan = credit_plan();
        plan.clip_norm = None;
        plan.privacy = Some(DpPlan {
            noise_multiplier: 1.3,
            max_grad_norm: 0.2,
            sample_rate: 0.25,
            delta: 1e-5,
            accountant: crate::privacy::AccountantKind::Rdp,
            deterministic_noise: true,
            budget_steps: None,
        });
        plan
    }

    /// Ranks on their own threads meeting in the collective: each contribution is
    /// recorded, then all are summed by the ring's schedule.
    #[derive(Clone)]
    struct ThreadRing {
        rank: usize,
        slots: std::sync::Arc<std::sync::Mutex<Vec<Vec<f32>>>>,
        barrier: std::sync::Arc<std::sync::Barrier>,
        sent: Vec<Vec<f32>>,
    }

    impl Collective for ThreadRing {
        fn sum_f32(&mut self, buf: &mut [f32], _: u64) -> Result<(), WorkerError> {
            self.sent.push(buf.to_vec());
            self.slots.lock().unwrap()[self.rank] = buf.to_vec();
            self.barrier.wait();
            let mut all = self.slots.lock().unwrap().clone();
            ring::simulate::<SumF32>(&mut all);
            buf.copy_from_slice(&all[self.rank]);
            // Nobody overwrites a slot before every rank has read the sum.
            self.barrier.wait();
            Ok(())
        }
        fn sum_u64(&mut self, _: &mut [u64], _: u64) -> Result<(), WorkerError> {
            unreachable!("no secure aggregation in this pipeline")
        }
    }

    #[test]
    fn dp_steps_clip_add_each_ranks_noise_and_divide_by_the_expected_batch() {
        let plan = dp_plan();
        let dp = plan.privacy.unwrap();
        let world = 2usize;
        let mlp = Mlp::new(plan.model.clone(), plan.loss).with_threads(1);
        let p = mlp.num_params();
        let flat = MetricSums::flat_len(mlp.metric_classes());
        // Rank 0 holds 5 rows, rank 1 none (a Poisson batch may be empty); the divisor is
        // the plan's 64 all the same.
        let mut rng = crate::rng::Rng::new(5);
        let x: Vec<f32> = (0..5 * plan.features)
            .map(|_| rng.normal() as f32)
            .collect();
        let y: Vec<f32> = (0..5).map(|i| (i % 2) as f32).collect();
        let idx: Vec<u32> = (0..5).collect();
        let rows = [5usize, 0];
        let steps = 2u64;
        let ring = ThreadRing {
            rank: 0,
            slots: std::sync::Arc::new(std::sync::Mutex::new(vec![Vec::new(); world])),
            barrier: std::sync::Arc::new(std::sync::Barrier::new(world)),
            sent: Vec::new(),
        };
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (plan, mlp, x, y, idx) =
                    (plan.clone(), mlp.clone(), x.clone(), y.clone(), idx.clone());
                let mut ring = ThreadRing {
                    rank: r,
                    ..ring.clone()
                };
                std::thread::spawn(move || {
                    let mut pipeline =
                        StepPipeline::for_job(&plan, &mlp, 1, r as u32, world as u32).unwrap();
                    assert_eq!(pipeline.stages()[1], Stage::Privatize);
                    let mut params = plan.model.init_params(plan.seed);
                    let mut opt = Optimizer::new(plan.optimizer, params.len());
                    let n = rows[r];
                    let mut outs = Vec::new();
                    for step in 1..=steps {
                        let batch = Batch {
                            x: &x[..n * plan.features],
                            y: &y[..n],
                            rows: n,
                            dropout: DropoutKey {
                                seed: plan.seed,
                                step,
                                samples: &idx[..n],
                            },
                        };
                        let out = pipeline
                            .run(&plan, &mlp, &mut params, &mut opt, &batch, step, &mut ring)
                            .unwrap();
                        outs.push(out);
                    }
                    (params, outs, ring.sent)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // Identical replicas.
        assert!(results[0]
            .0
            .iter()
            .zip(&results[1].0)
            .all(|(a, b)| a.to_bits() == b.to_bits()));

        // The same steps by hand: each rank's contribution is its clipped sum plus the
        // noise of (seed, step, rank), metric sums and the clipped count untouched; the
        // sum is divided by the plan's batch size, not the 5 real rows.
        let std = dp.noise_multiplier * dp.max_grad_norm / (world as f64).sqrt();
        let mut params = plan.model.init_params(plan.seed);
        let mut opt = Optimizer::new(plan.optimizer, p);
        for step in 1..=steps {
            let mut bufs = Vec::new();
            for (r, &n) in rows.iter().enumerate() {
                let mut want = vec![0f32; p + flat + 2];
                let key = DropoutKey {
                    seed: plan.seed,
                    step,
                    samples: &idx[..n],
                };
                let (sums, stats) = mlp
                    .forward_backward_clipped(
                        &params,
                        &x[..n * plan.features],
                        &y[..n],
                        n,
                        &mut want[..p],
                        Some(&key),
                        dp.max_grad_norm,
                    )
                    .unwrap();
                sums.write_flat(&mut want[p..p + flat]);
                want[p + flat] = stats.clipped as f32;
                let clean = want.clone();
                let seed = crate::dp::NoiseSeed::Deterministic {
                    seed: plan.seed,
                    rank: r as u32,
                };
                crate::dp::NoiseHook::synchronous(std, p, seed)
                    .unwrap()
                    .apply(&mut want[..p], step)
                    .unwrap();
                let sent = &results[r].2[step as usize - 1];
                assert_eq!(bits(sent), bits(&want), "rank {r} step {step}");
                // Only the gradient is noised, and it is.
                assert_eq!(bits(&sent[p..]), bits(&clean[p..]));
                assert_ne!(bits(&sent[..p]), bits(&clean[..p]));
                bufs.push(want);
            }
            ring::simulate::<SumF32>(&mut bufs);
            let sum = &mut bufs[0];
            let global = MetricSums::from_flat(mlp.metric_classes(), &sum[p..p + flat]);
            for (r, res) in results.iter().enumerate() {
                let out = &res.1[step as usize - 1];
                assert_eq!(out.global, global, "rank {r}");
                assert_eq!(out.batch(), 5.0);
                assert_eq!(out.clipped, Some(sum[p + flat] as f64));
            }
            divide(&mut sum[..p], plan.batch_size as f64);
            let has_l2 = plan.model.layers.iter().any(|l| l.l2 > 0.0);
            let penalty = regularize(&plan, has_l2, &params, &mut sum[..p]);
            assert_eq!(results[0].1[step as usize - 1].penalty, penalty);
            optimize(&plan, &mut opt, &mut params, &sum[..p], step, 1);
        }
        // The tiny C clips every row.
        assert_eq!(results[0].1[0].clipped, Some(5.0));
        assert_eq!(bits(&params), bits(&results[0].0));
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn a_dp_pipeline_without_its_noise_stage_refuses_to_step() {
        let plan = dp_plan();
        let mlp = Mlp::new(plan.model.clone(), plan.loss);
        let mut pipeline = StepPipeline::from_plan(&plan, &mlp, 1);
        let mut params = plan.model.init_params(plan.seed);
        let mut opt = Optimizer::new(plan.optimizer, params.len());
        let batch = Batch {
            x: &[],
            y: &[],
            rows: 0,
            dropout: DropoutKey {
                seed: 1,
                step: 1,
                samples: &[],
            },
        };
        let err = pipeline
            .run(
                &plan,
                &mlp,
                &mut params,
                &mut opt,
                &batch,
                1,
                &mut Replicated(1),
            )
            .unwrap_err();
        assert!(err.to_string().contains("noise"), "{err}");
        // Without DP, for_job is from_plan: no privatize stage, the same buffer.
        let plain = StepPipeline::for_job(&credit_plan(), &mlp, 1, 0, 2).unwrap();
        assert!(!plain.stages().contains(&Stage::Privatize));
        assert_eq!(
            plain.buf.len(),
            params.len() + MetricSums::flat_len(mlp.metric_classes()) + 1
        );
    }
}
