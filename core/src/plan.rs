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

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        crate::sharding::steps_per_epoch(self.train_samples, self.batch_size)
    }
}
