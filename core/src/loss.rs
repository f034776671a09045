//! The loss and metric names a job file may use, and what each implies for the output
//! layer. The heads that compute them live in the worker.

use serde::{Deserialize, Serialize};

use crate::model::Activation;

/// The training loss (Keras names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Cross-entropy of integer class labels against softmax outputs.
    SparseCategoricalCrossentropy,
    /// Cross-entropy against one-hot targets; the data gives class indices, which are
    /// one-hot encoded, so it computes the same value as the sparse form.
    CategoricalCrossentropy,
    /// Cross-entropy of 0/1 labels against a single sigmoid output.
    BinaryCrossentropy,
    /// Mean squared error.
    Mse,
    /// Mean absolute error.
    Mae,
    /// Huber loss with δ = 1 (Keras default).
    Huber,
}

impl LossKind {
    /// Every accepted name, for error messages.
    pub const NAMES: &'static str = "sparse_categorical_crossentropy, categorical_crossentropy, binary_crossentropy, mse, mae, huber";

    /// Whether targets are class labels.
    pub fn is_classification(self) -> bool {
        matches!(
            self,
            LossKind::SparseCategoricalCrossentropy
                | LossKind::CategoricalCrossentropy
                | LossKind::BinaryCrossentropy
        )
    }

    /// Number of classes the metrics track for a model with `outputs` units (2 for a
    /// binary classifier's single unit; 0 for regression).
    pub fn metric_classes(self, outputs: usize) -> usize {
        match self {
            LossKind::BinaryCrossentropy => 2,
            k if k.is_classification() => outputs,
            _ => 0,
        }
    }

    /// Checks the output layer fits the loss; returns why not.
    pub fn check_output(self, outputs: usize, activation: Activation) -> Result<(), String> {
        match self {
            LossKind::SparseCategoricalCrossentropy | LossKind::CategoricalCrossentropy => {
                if !matches!(activation, Activation::Softmax | Activation::Linear) {
                    return Err(format!(
                        "{} needs a softmax (or linear logits) output layer, not {}",
                        self.name(),
                        activation.name()
                    ));
                }
                if outputs < 2 {
                    return Err("a categorical loss needs at least 2 output units".into());
                }
            }
            LossKind::BinaryCrossentropy => {
                if outputs != 1 || !matches!(activation, Activation::Sigmoid | Activation::Linear) {
                    return Err("binary_crossentropy needs one output unit with sigmoid (or linear logit) activation".into());
                }
            }
            _ => {
                if outputs != 1 {
                    return Err(format!(
                        "{} regression needs one output unit, not {outputs}",
                        self.name()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The Keras name.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::SparseCategoricalCrossentropy => "sparse_categorical_crossentropy",
            LossKind::CategoricalCrossentropy => "categorical_crossentropy",
            LossKind::BinaryCrossentropy => "binary_crossentropy",
            LossKind::Mse => "mse",
            LossKind::Mae => "mae",
            LossKind::Huber => "huber",
        }
    }

    /// Whether the head differentiates with respect to the pre-activation (the fused
    /// softmax/sigmoid cross-entropies) rather than the activated output.
    pub fn fused(self) -> bool {
        self.is_classification()
    }
}

/// A metric a job can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of correct predictions.
    Accuracy,
    /// Macro-averaged precision.
    Precision,
    /// Macro-averaged recall.
    Recall,
    /// Macro-averaged F1.
    F1,
    /// Label among the 5 highest scores.
    TopKAccuracy,
    /// Mean absolute error (regression).
    Mae,
    /// Mean squared error (regression).
    Mse,
    /// Coefficient of determination (regression).
    R2,
}

impl Metric {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Precision => "precision",
            Metric::Recall => "recall",
            Metric::F1 => "f1",
            Metric::TopKAccuracy => "top_k_accuracy",
            Metric::Mae => "mae",
            Metric::Mse => "mse",
            Metric::R2 => "r2",
        }
    }

    /// Whether larger is better (for early stopping).
    pub fn higher_is_better(name: &str) -> bool {
        !(name.ends_with("loss") || name.ends_with("mae") || name.ends_with("mse"))
    }
}
