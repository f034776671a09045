//! A trained model loaded for predict and evaluate, without a cluster. The card format
//! is `ringtrain_core::saved_model`; this side runs the forward pass.

use std::path::Path;

use ringtrain_core::saved_model::{sha256_hex, ModelCard, CARD_FILE, FORMAT, WEIGHTS_FILE};

use crate::error::WorkerError;
use crate::loss::{LossKind, Metric, MetricSums};
use crate::model::Mlp;

/// Rows per forward pass.
const BATCH_ROWS: usize = 4096;

/// A loaded model.
#[derive(Debug, Clone)]
pub struct SavedModel {
    /// Its card.
    pub card: ModelCard,
    params: Vec<f32>,
    mlp: Mlp,
}

/// What `evaluate` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Examples evaluated.
    pub samples: usize,
    /// Mean loss.
    pub loss: f64,
    /// Every metric that applies to the task, by name.
    pub metrics: Vec<(String, f64)>,
    /// Per class: (precision, recall, f1, support), classification only.
    pub per_class: Vec<(f64, f64, f64, f64)>,
    /// Row = true class, column = predicted; classification only.
    pub confusion: Vec<Vec<u64>>,
}

impl SavedModel {
    /// Reads `model.json` and `model.safetensors` from a run directory.
    pub fn load(dir: &Path) -> Result<SavedModel, WorkerError> {
        let bad = |m: String| WorkerError::Model {
            path: dir.display().to_string(),
            message: m,
        };
        let text = std::fs::read_to_string(dir.join(CARD_FILE)).map_err(|e| {
            bad(format!(
                "cannot read {CARD_FILE}: {e} (pass a run directory written by ringtrain)"
            ))
        })?;
        let card: ModelCard =
            serde_json::from_str(&text).map_err(|e| bad(format!("{CARD_FILE}: {e}")))?;
        if card.format != FORMAT {
            return Err(bad(format!(
                "{CARD_FILE} has format {:?}, expected {FORMAT:?} (retrain with this version)",
                card.format
            )));
        }
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE))
            .map_err(|e| bad(format!("{WEIGHTS_FILE}: {e}")))?;
        let actual = sha256_hex(&bytes);
        if actual != card.weights_sha256 {
            return Err(bad(format!(
                "{WEIGHTS_FILE} does not match {CARD_FILE}: its SHA-256 is {actual}, the card \
                 records {} (the weights were changed or truncated; restore them from the \
                 run's final checkpoint or retrain)",
                card.weights_sha256
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("{WEIGHTS_FILE}: {e}")))?;
        let params = ringtrain_core::checkpoint::read_group(&st, &card.model, "").map_err(|m| {
            bad(format!(
                "{WEIGHTS_FILE}: {m} ({CARD_FILE} describes another model)"
            ))
        })?;
        let mlp = Mlp::new(card.model.clone(), card.loss);
        Ok(SavedModel { card, params, mlp })
    }

    /// Number of input features.
    pub fn features(&self) -> usize {
        self.card.model.input
    }

    fn prepare(
        &self,
        mut x: Vec<f32>,
        features: usize,
        source: &str,
    ) -> Result<Vec<f32>, WorkerError> {
        if features != self.features() {
            return Err(WorkerError::Model {
                path: source.to_string(),
                message: format!(
                    "the model expects {} features per row, the data has {features}",
                    self.features()
                ),
            });
        }
        self.card.normalization.apply(&mut x, features);
        Ok(x)
    }

    /// Outputs per row: class probabilities for classifiers (two columns for a binary
    /// classifier), the predicted value for regression.
    pub fn predict(
        &self,
        x: Vec<f32>,
        features: usize,
        source: &str,
    ) -> Result<Vec<Vec<f64>>, WorkerError> {
        let x = self.prepare(x, features, source)?;
        let rows = x.len() / features.max(1);
        let outputs = self.card.model.outputs();
        let mut out = Vec::with_capacity(rows);
        for start in (0..rows).step_by(BATCH_ROWS) {
            let n = BATCH_ROWS.min(rows - start);
            let p = self
                .mlp
                .predict(
                    &self.params,
                    &x[start * features..(start + n) * features],
                    n,
                )
                .map_err(|e| WorkerError::Model {
                    path: source.to_string(),
                    message: e.to_string(),
                })?;
            for row in p.chunks(outputs) {
                out.push(if self.card.loss == LossKind::BinaryCrossentropy {
                    vec![1.0 - row[0], row[0]]
                } else {
                    row.to_vec()
                });
            }
        }
        Ok(out)
    }

    /// Loss and every applicable metric over labelled data.
    pub fn evaluate(
        &self,
        x: Vec<f32>,
        y: &[f32],
        features: usize,
        source: &str,
    ) -> Result<Evaluation, WorkerError> {
        let x = self.prepare(x, features, source)?;
        let rows = y.len();
        if x.len() != rows * features {
            return Err(WorkerError::Model {
                path: source.to_string(),
                message: format!(
                    "{} labels for {} rows of features",
                    rows,
                    x.len() / features.max(1)
                ),
            });
        }
        if self.card.loss.is_classification() {
            let classes = self.mlp.metric_classes();
            if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| {
                !(v.is_finite() && **v >= 0.0 && v.fract() == 0.0 && (**v as usize) < classes)
            }) {
                return Err(WorkerError::Model {
                    path: source.to_string(),
                    message: format!("row {i}: label {v} is out of range for {classes} classes"),
                });
            }
        }
        let mut sums = MetricSums::new(self.mlp.metric_classes());
        for start in (0..rows).step_by(BATCH_ROWS) {
            let n = BATCH_ROWS.min(rows - start);
            let s = self
                .mlp
                .evaluate(
                    &self.params,
                    &x[start * features..(start + n) * features],
                    &y[start..start + n],
                    n,
                )
                .map_err(|e| WorkerError::Model {
                    path: source.to_string(),
                    message: format!("{e} (row {})", start),
                })?;
            sums.add(&s);
        }
        let all: &[Metric] = if self.card.loss.is_classification() {
            &[
                Metric::Accuracy,
                Metric::Precision,
                Metric::Recall,
                Metric::F1,
                Metric::TopKAccuracy,
            ]
        } else {
            &[Metric::Mae, Metric::Mse, Metric::R2]
        };
        let values = sums.values(all);
        let c = sums.classes;
        let confusion: Vec<Vec<u64>> = (0..c)
            .map(|i| {
                (0..c)
                    .map(|j| sums.confusion[i * c + j].round() as u64)
                    .collect()
            })
            .collect();
        let per_class = sums
            .per_class()
            .into_iter()
            .enumerate()
            .map(|(k, (p, r, f))| (p, r, f, confusion[k].iter().sum::<u64>() as f64))
            .collect();
        Ok(Evaluation {
            samples: rows,
            loss: sums.loss(),
            metrics: values
                .into_iter()
                .skip(1)
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            per_class,
            confusion,
        })
    }
}
