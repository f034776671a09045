//! A trained model on disk (`model.safetensors` + `model.json`) and what a user does with
//! it without a cluster: predict and evaluate.

use std::path::Path;

use ringtrain_worker::loss::{LossKind, Metric, MetricSums};
use ringtrain_worker::model::{Mlp, ModelSpec};
use serde::{Deserialize, Serialize};

use crate::dataset::Normalization;
use crate::error::CoordinatorError;

/// Format marker of `model.json`.
pub const FORMAT: &str = "ringtrain.model.v1";

/// Rows per forward pass.
const BATCH_ROWS: usize = 4096;

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The job that trained it.
    pub job_id: String,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Epochs trained.
    pub epochs: u32,
    /// SHA-256 of the job spec.
    pub spec_hash: String,
}

/// `model.json`: the architecture and everything needed to feed it new data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// [`FORMAT`].
    pub format: String,
    /// The job name.
    pub name: String,
    /// The architecture.
    pub model: ModelSpec,
    /// The training loss (decides how outputs are read).
    pub loss: LossKind,
    /// Metrics the job reported.
    pub metrics: Vec<Metric>,
    /// Classes (0 for regression).
    pub classes: usize,
    /// Feature scaling fitted on the training split, applied to every input.
    pub normalization: Normalization,
    /// Feature column names when trained from CSV (predict selects them by name).
    pub feature_names: Option<Vec<String>>,
    /// Name of the CSV target column, if any.
    pub label: Option<String>,
    /// Provenance.
    pub trained: Provenance,
}

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
    pub fn load(dir: &Path) -> Result<SavedModel, CoordinatorError> {
        let bad = |m: String| CoordinatorError::Data {
            path: dir.display().to_string(),
            message: m,
        };
        let card_path = dir.join("model.json");
        let text = std::fs::read_to_string(&card_path).map_err(|e| {
            bad(format!(
                "cannot read model.json: {e} (pass a run directory written by ringtrain)"
            ))
        })?;
        let card: ModelCard =
            serde_json::from_str(&text).map_err(|e| bad(format!("model.json: {e}")))?;
        if card.format != FORMAT {
            return Err(bad(format!(
                "model.json has format {:?}, expected {FORMAT:?}",
                card.format
            )));
        }
        let bytes = std::fs::read(dir.join("model.safetensors"))
            .map_err(|e| bad(format!("model.safetensors: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("model.safetensors: {e}")))?;
        let params = crate::checkpoint::read_group(&st, &card.model, "").map_err(|m| {
            bad(format!(
                "model.safetensors: {m} (model.json describes another model)"
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
    ) -> Result<Vec<f32>, CoordinatorError> {
        if features != self.features() {
            return Err(CoordinatorError::Data {
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
    ) -> Result<Vec<Vec<f64>>, CoordinatorError> {
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
                .map_err(|e| CoordinatorError::Data {
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
    ) -> Result<Evaluation, CoordinatorError> {
        let x = self.prepare(x, features, source)?;
        let rows = y.len();
        if x.len() != rows * features {
            return Err(CoordinatorError::Data {
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
                return Err(CoordinatorError::Data {
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
                .map_err(|e| CoordinatorError::Data {
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

/// Where predict/evaluate read their rows from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A CSV with a header. Feature columns are selected by the names the model was
    /// trained with (other columns, such as the label, are ignored); `label` names the
    /// target column for evaluate.
    Csv {
        /// The file.
        path: std::path::PathBuf,
        /// Target column (evaluate; default: the training label column, else "label").
        label: Option<String>,
    },
    /// IDX images, with labels for evaluate.
    Idx {
        /// IDX3 images.
        images: std::path::PathBuf,
        /// IDX1 labels.
        labels: Option<std::path::PathBuf>,
    },
    /// NPY features, with labels for evaluate.
    Npy {
        /// 2-D features.
        features: std::path::PathBuf,
        /// 1-D labels.
        labels: Option<std::path::PathBuf>,
    },
}

/// Rows read for predict/evaluate.
#[derive(Debug, Clone)]
pub struct InputRows {
    /// rows × features.
    pub x: Vec<f32>,
    /// Features per row.
    pub features: usize,
    /// Targets when asked for.
    pub y: Option<Vec<f32>>,
    /// The file, for messages.
    pub source: String,
}

impl SavedModel {
    /// Reads `input` for this model; with `labels`, the targets too.
    pub fn read(&self, input: &Input, labels: bool) -> Result<InputRows, CoordinatorError> {
        use crate::csv_table::{read_csv, LabelColumn};
        let need = |p: &Option<std::path::PathBuf>, what: &str| {
            p.clone().ok_or_else(|| {
                CoordinatorError::Precondition(format!("evaluate needs the {what} file as well"))
            })
        };
        Ok(match input {
            Input::Csv { path, label } => {
                let col = if labels {
                    LabelColumn::Name(
                        label
                            .clone()
                            .or_else(|| self.card.label.clone())
                            .unwrap_or_else(|| "label".into()),
                    )
                } else {
                    LabelColumn::None
                };
                let t = read_csv(path, &col, self.card.feature_names.as_deref())?;
                InputRows {
                    x: t.x,
                    features: t.features,
                    y: labels.then_some(t.y),
                    source: path.display().to_string(),
                }
            }
            Input::Idx { images, labels: l } => {
                let (x, features) = crate::dataset::idx_images(images)?;
                let y = if labels {
                    let p = need(l, "IDX labels")?;
                    Some(crate::dataset::idx_labels(&p)?)
                } else {
                    None
                };
                InputRows {
                    x,
                    features,
                    y,
                    source: images.display().to_string(),
                }
            }
            Input::Npy {
                features: f,
                labels: l,
            } => {
                let (x, _, features) = crate::npy::read_npy_features(f)?;
                let y = if labels {
                    let p = need(l, "NPY labels")?;
                    Some(crate::npy::read_npy_labels(&p)?)
                } else {
                    None
                };
                InputRows {
                    x,
                    features,
                    y,
                    source: f.display().to_string(),
                }
            }
        })
    }
}
