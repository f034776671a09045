//! The rows predict and evaluate read (CSV, IDX or NPY), with errors that name the place.

use ringtrain_core::saved_model::ModelCard;

use crate::error::CoordinatorError;

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

/// Reads `input` for a model described by `card`; with `labels`, the targets too. CSV
/// feature columns are selected by the names the model was trained with.
pub fn read_input(
    card: &ModelCard,
    input: &Input,
    labels: bool,
) -> Result<InputRows, CoordinatorError> {
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
                        .or_else(|| card.label.clone())
                        .unwrap_or_else(|| "label".into()),
                )
            } else {
                LabelColumn::None
            };
            let t = read_csv(path, &col, card.feature_names.as_deref())?;
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
