//! The training plan: everything a worker needs to train its part of a job, sent by the
//! coordinator with each assignment (as JSON inside the `Assignment` message).

use serde::{Deserialize, Serialize};

use crate::error::WorkerError;
use crate::model::ModelSpec;
use crate::optimizer::AdamConfig;

/// What to train and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingPlan {
    /// Job name, for logs.
    pub name: String,
    /// Seed of initialization and epoch permutations.
    pub seed: u64,
    /// Epochs to train.
    pub epochs: u32,
    /// Global batch size (split across ranks).
    pub batch_size: usize,
    /// The network.
    pub model: ModelSpec,
    /// Optimizer settings.
    pub optimizer: AdamConfig,
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
    /// Number of classes.
    pub classes: usize,
    /// Deadline of any single collective send or receive, in milliseconds.
    pub collective_timeout_ms: u64,
}

impl TrainingPlan {
    /// Parses the plan of an assignment.
    pub fn from_json(s: &str) -> Result<Self, WorkerError> {
        let plan: TrainingPlan =
            serde_json::from_str(s).map_err(|e| WorkerError::Plan(e.to_string()))?;
        if plan.model.input != plan.features || plan.model.outputs() != plan.classes {
            return Err(WorkerError::Plan(format!(
                "model is {}->{} but data has {} features and {} classes",
                plan.model.input,
                plan.model.outputs(),
                plan.features,
                plan.classes
            )));
        }
        if plan.batch_size == 0 || plan.model.layers.is_empty() {
            return Err(WorkerError::Plan(
                "batch size and layer count must be positive".into(),
            ));
        }
        Ok(plan)
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        crate::sharding::steps_per_epoch(self.train_samples, self.batch_size)
    }
}
