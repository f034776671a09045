//! A trained model on disk: `model.safetensors` (the weights, named per layer) and
//! `model.json` (the [`ModelCard`]: architecture, loss, feature scaling, provenance and
//! the weights' SHA-256). Loading it for predict and evaluate lives in the worker, which
//! has the forward pass.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job_file::NormalizeKind;
use crate::loss::{LossKind, Metric};
use crate::model::ModelSpec;

/// Name of the weights file in a run directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the card in a run directory.
pub const CARD_FILE: &str = "model.json";

/// Format marker of `model.json`.
pub const FORMAT: &str = "ringtrain.model.v2";

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
    /// Hex SHA-256 of `model.safetensors`: predict and evaluate refuse weights whose bytes
    /// do not match.
    pub weights_sha256: String,
    /// DP-SGD jobs: the privacy the weights were trained under, `(epsilon, delta)` with
    /// how it was accounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacyReport>,
}

/// Per-feature scaling fitted on the training split; saved with the model and applied
/// by predict and evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Normalization {
    /// No scaling.
    None,
    /// (x − min) / (max − min); a constant feature maps to 0.
    Minmax {
        /// Per-feature minimum.
        min: Vec<f32>,
        /// Per-feature maximum.
        max: Vec<f32>,
    },
    /// (x − mean) / std (population std); a constant feature maps to 0.
    Standard {
        /// Per-feature mean.
        mean: Vec<f32>,
        /// Per-feature standard deviation.
        std: Vec<f32>,
    },
}

impl Normalization {
    /// Fits `kind` on a training split of `features` values per row.
    pub fn fit(kind: NormalizeKind, x: &[f32], features: usize) -> Normalization {
        let f = features;
        let rows = (x.len() / f.max(1)).max(1);
        match kind {
            NormalizeKind::None => Normalization::None,
            NormalizeKind::Minmax => {
                let mut min = vec![f32::INFINITY; f];
                let mut max = vec![f32::NEG_INFINITY; f];
                for row in x.chunks(f.max(1)) {
                    for j in 0..f {
                        min[j] = min[j].min(row[j]);
                        max[j] = max[j].max(row[j]);
                    }
                }
                Normalization::Minmax { min, max }
            }
            NormalizeKind::Standard => {
                let mut mean = vec![0f64; f];
                for row in x.chunks(f.max(1)) {
                    for j in 0..f {
                        mean[j] += row[j] as f64;
                    }
                }
                mean.iter_mut().for_each(|m| *m /= rows as f64);
                let mut var = vec![0f64; f];
                for row in x.chunks(f.max(1)) {
                    for j in 0..f {
                        let e = row[j] as f64 - mean[j];
                        var[j] += e * e;
                    }
                }
                Normalization::Standard {
                    mean: mean.iter().map(|&m| m as f32).collect(),
                    std: var
                        .iter()
                        .map(|&v| (v / rows as f64).sqrt() as f32)
                        .collect(),
                }
            }
        }
    }

    /// Scales rows of `features` values in place.
    pub fn apply(&self, x: &mut [f32], features: usize) {
        let (shift, scale): (&[f32], Vec<f32>) = match self {
            Normalization::None => return,
            Normalization::Minmax { min, max } => {
                (min, min.iter().zip(max).map(|(a, b)| b - a).collect())
            }
            Normalization::Standard { mean, std } => (mean, std.clone()),
        };
        for row in x.chunks_mut(features) {
            for j in 0..features {
                let s = scale[j];
                row[j] = if s > 0.0 {
                    (row[j] - shift[j]) / s
                } else {
                    0.0
                };
            }
        }
    }
}

/// Hex SHA-256 of `bytes` (what [`ModelCard::weights_sha256`] records).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
