//! The training plan: everything a worker needs to train its part of a job, sent by the
//! coordinator with each assignment (as JSON inside the `Assignment` message).

use serde::{Deserialize, Serialize};

use crate::error::PlanError;
use crate::loss::{LossKind, Metric};
use crate::model::ModelSpec;
use crate::optimizer::{OptimizerConfig, Schedule};

/// Early stopping, as Keras's `EarlyStopping` callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// The epoch metric watched, e.g. `val_loss` or `val_accuracy`.
    #[serde(default = "val_loss")]
    pub monitor: String,
    /// Epochs without improvement before stopping.
    #[serde(default)]
    pub patience: u32,
    /// Smallest change that counts as an improvement.
    #[serde(default)]
    pub min_delta: f64,
    /// Put back the weights of the best epoch when stopping (or at the end).
    #[serde(default)]
    pub restore_best: bool,
}

fn val_loss() -> String {
    "val_loss".into()
}

/// What to train and how.
///
/// Unknown fields are tolerated (not denied) so that a worker one version behind a
/// coordinator still understands plans that only add optional settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    /// Job name, for logs.
    pub name: String,
    /// Seed of initialization, epoch permutations and dropout.
    pub seed: u64,
    /// Epochs to train.
    pub epochs: u32,
    /// Global batch size (split across ranks).
    pub batch_size: usize,
    /// The network.
    pub model: ModelSpec,
    /// The loss.
    pub loss: LossKind,
    /// Metrics reported besides the loss.
    pub metrics: Vec<Metric>,
    /// Optimizer settings.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Clip the averaged gradient to this global L2 norm.
    pub clip_norm: Option<f64>,
    /// Early stopping, if any.
    pub early_stopping: Option<EarlyStopping>,
    /// Rank 0 uploads a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Training samples.
    pub train_samples: usize,
    /// Validation samples (0: none).
    pub validation_samples: usize,
    /// Test samples (0: none).
    pub test_samples: usize,
    /// Features per sample.
    pub features: usize,
    /// Deadline of one ring round (and of any single send or receive), in milliseconds.
    pub collective_timeout_ms: u64,
    /// Mean of the training targets (regression; 0 otherwise), subtracted in metric sums.
    #[serde(default)]
    pub target_center: f64,
    /// Stop after this many steps (benchmarks); `None`: train every epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// DP-SGD (`None`: plain training). With it, batches are Poisson samples, each
    /// example's gradient is clipped, every rank adds its share of the noise, and the
    /// summed gradient is divided by the expected batch size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<DpPlan>,
}

/// DP-SGD as the workers run it, worked out by the coordinator from the job file's
/// `[privacy]` section (σ calibrated, `q` from the data size, the step budget of
/// `max_epsilon`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpPlan {
    /// σ: the noise standard deviation of the summed gradient divided by the clipping
    /// bound; each of `W` ranks adds `N(0, σ²C²/W)`.
    pub noise_multiplier: f64,
    /// C: every example's gradient is clipped to this L2 norm.
    pub max_grad_norm: f64,
    /// q: every step includes each training example independently with this
    /// probability (`batch_size / train_samples`).
    pub sample_rate: f64,
    /// δ of the reported `(ε, δ)`.
    pub delta: f64,
    /// Which accountant reports `ε`.
    pub accountant: crate::privacy::AccountantKind,
    /// Noise drawn from a generator seeded by (job seed, step, rank) instead of the OS:
    /// reproducible, for tests only, and no privacy at all against anyone who knows
    /// the seed.
    #[serde(default)]
    pub deterministic_noise: bool,
    /// The last step `max_epsilon` allows (`None`: no budget). Workers stop after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_steps: Option<u64>,
}

impl TrainingPlan {
    /// Parses the plan of an assignment.
    pub fn from_json(s: &str) -> Result<Self, PlanError> {
        let plan: TrainingPlan = serde_json::from_str(s).map_err(|e| PlanError(e.to_string()))?;
        plan.model
            .validate()
            .map_err(|(f, m)| PlanError(format!("{f}: {m}")))?;
        if plan.model.input != plan.features {
            return Err(PlanError(format!(
                "model takes {} inputs but the data has {} features",
                plan.model.input, plan.features
            )));
        }
        plan.loss
            .check_output(plan.model.outputs(), plan.model.output_activation())
            .map_err(PlanError)?;
        if plan.batch_size == 0 {
            return Err(PlanError("batch size must be positive".into()));
        }
        Ok(plan)
    }

    /// Optimizer steps per epoch: `ceil(N / B)` batches of a permutation, or under
    /// DP-SGD `N / B` Poisson samples (at least 1).
    pub fn steps_per_epoch(&self) -> usize {
        if self.privacy.is_some() {
            crate::sharding::poisson_steps_per_epoch(self.train_samples, self.batch_size)
        } else {
            crate::sharding::steps_per_epoch(self.train_samples, self.batch_size)
        }
    }

    /// The step after which training ends early: the benchmark limit or the privacy
    /// budget, whichever comes first (`u64::MAX`: neither).
    pub fn step_limit(&self) -> u64 {
        let budget = self.privacy.and_then(|p| p.budget_steps);
        self.max_steps
            .unwrap_or(u64::MAX)
            .min(budget.unwrap_or(u64::MAX))
    }

    /// The sample indices `rank` of `world` trains on in `epoch` from global batch
    /// `start_batch` on, and its row count at each of those steps: a permutation's
    /// batches, or under DP-SGD Poisson samples (see [`crate::sharding`]).
    pub fn rank_epoch(
        &self,
        epoch: u32,
        rank: usize,
        world: usize,
        start_batch: usize,
    ) -> (Vec<u32>, Vec<usize>) {
        use crate::sharding as sh;
        match &self.privacy {
            Some(dp) => sh::poisson_rank_epoch(
                self.seed,
                epoch,
                self.train_samples,
                dp.sample_rate,
                self.steps_per_epoch(),
                rank,
                world,
                start_batch,
            ),
            None => (
                sh::rank_epoch_indices_from(
                    self.seed,
                    epoch,
                    self.train_samples,
                    self.batch_size,
                    rank,
                    world,
                    start_batch,
                ),
                sh::rank_batch_lens_from(
                    self.train_samples,
                    self.batch_size,
                    rank,
                    world,
                    start_batch,
                ),
            ),
        }
    }
}
