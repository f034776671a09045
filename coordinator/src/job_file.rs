//! The job file: TOML parsed once into typed data and validated, with errors that name
//! the file, the field and the fix.

use std::path::{Path, PathBuf};

use ringtrain_worker::model::{Activation, ModelSpec};
use ringtrain_worker::optimizer::AdamConfig;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// A whole job file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// Job name (used in run directory names).
    pub name: String,
    /// Seed of initialization, shuffling and synthetic data.
    #[serde(default)]
    pub seed: u64,
    /// Passes over the training data.
    pub epochs: u32,
    /// Global batch size, split across workers.
    pub batch_size: usize,
    /// Workers the job waits for.
    #[serde(default = "one")]
    pub workers: u32,
    /// Where the data comes from.
    pub data: DataSection,
    /// The network.
    pub model: ModelSpec,
    /// Loss, optimizer, metrics.
    pub train: TrainSection,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
}

fn one() -> u32 {
    1
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training data.
    pub train: DataSource,
    /// Fraction of the training data (taken from its end, as Keras does) held out for
    /// validation after every epoch.
    #[serde(default)]
    pub validation_split: f64,
    /// Test data evaluated once at the end.
    #[serde(default)]
    pub test: Option<DataSource>,
}

/// One dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    /// Gaussian clusters generated from the job seed: learnable and deterministic.
    Synthetic {
        /// Number of samples.
        samples: usize,
        /// Features per sample.
        features: usize,
        /// Number of classes (clusters).
        classes: usize,
        /// Standard deviation of each cluster (default 2.5; centres are N(0, 1)).
        #[serde(default)]
        noise: Option<f64>,
    },
    /// MNIST-style IDX files (gzipped or plain); pixels are scaled to [0, 1].
    Idx {
        /// IDX3 image file.
        images: PathBuf,
        /// IDX1 label file.
        labels: PathBuf,
    },
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// The optimizer (default Adam with Keras defaults).
    #[serde(default)]
    pub optimizer: Optimizer,
    /// The loss.
    pub loss: Loss,
    /// Metrics reported per epoch (the loss is always reported).
    #[serde(default)]
    pub metrics: Vec<Metric>,
}

/// Optimizer choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Optimizer {
    /// Adam (Kingma & Ba 2015), Keras defaults.
    Adam(AdamConfig),
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Adam(AdamConfig::default())
    }
}

/// Loss choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Cross-entropy of integer labels against softmax outputs.
    SparseCategoricalCrossentropy,
}

/// Metric choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of arg-max predictions equal to the label.
    Accuracy,
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Checkpoint every this many steps (0: only the final one).
    #[serde(default)]
    pub every_steps: u64,
    /// How many checkpoints to keep.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_keep() -> usize {
    3
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every_steps: 0,
            keep: default_keep(),
        }
    }
}

/// Line (1-based) of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl JobFile {
    /// Parses a job file's text. `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<JobFile, SpecError> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| SpecError {
            file: source.to_string(),
            field: e
                .span()
                .map(|s| format!("line {}", line_of(text, s.start)))
                .unwrap_or_else(|| "toml".into()),
            message: e.message().trim().to_string(),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().trim().to_string();
            let field = match (path.as_str(), inner.span()) {
                ("." | "", Some(s)) => format!("line {}", line_of(text, s.start)),
                (p, Some(s)) => format!("{p} (line {})", line_of(text, s.start)),
                (p, None) => p.to_string(),
            };
            SpecError {
                file: source.to_string(),
                field,
                message,
            }
        })
    }

    /// Checks everything that can be checked without reading the data, and that dataset
    /// files exist (resolved against `base`).
    pub fn validate(&self, source: &str, base: &Path) -> Result<(), SpecError> {
        let err = |field: &str, message: String| SpecError {
            file: source.to_string(),
            field: field.to_string(),
            message,
        };
        if self.name.trim().is_empty() || self.name.contains(['/', '\\']) {
            return Err(err(
                "name",
                "must be non-empty and contain no path separators".into(),
            ));
        }
        if self.epochs == 0 {
            return Err(err("epochs", "must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(err("batch_size", "must be at least 1".into()));
        }
        if self.workers == 0 {
            return Err(err("workers", "must be at least 1".into()));
        }
        let vs = self.data.validation_split;
        if !(0.0..1.0).contains(&vs) {
            return Err(err(
                "data.validation_split",
                format!("{vs} is outside [0, 1)"),
            ));
        }
        if self.model.input == 0 {
            return Err(err("model.input", "must be at least 1".into()));
        }
        if self.model.layers.is_empty() {
            return Err(err("model.layers", "needs at least one layer".into()));
        }
        for (i, l) in self.model.layers.iter().enumerate() {
            if l.dense == 0 {
                return Err(err(
                    &format!("model.layers[{i}].dense"),
                    "must be at least 1".into(),
                ));
            }
        }
        let last = self.model.layers.len() - 1;
        let act = self.model.layers[last].activation;
        if !matches!(act, Activation::Softmax | Activation::Linear) {
            return Err(err(
                &format!("model.layers[{last}].activation"),
                format!(
                    "sparse_categorical_crossentropy needs a softmax (or linear logits) output layer, not {act:?}"
                ),
            ));
        }
        let Optimizer::Adam(a) = &self.train.optimizer;
        if !(a.learning_rate > 0.0 && a.learning_rate.is_finite()) {
            return Err(err(
                "train.optimizer.adam.learning_rate",
                "must be a positive number".into(),
            ));
        }
        if !(0.0..1.0).contains(&a.beta_1) || !(0.0..1.0).contains(&a.beta_2) {
            return Err(err(
                "train.optimizer.adam",
                "beta_1 and beta_2 must be in [0, 1)".into(),
            ));
        }
        if self.checkpoint.keep == 0 {
            return Err(err("checkpoint.keep", "must be at least 1".into()));
        }
        for (field, src) in [
            ("data.train", Some(&self.data.train)),
            ("data.test", self.data.test.as_ref()),
        ] {
            match src {
                Some(DataSource::Synthetic {
                    samples,
                    features,
                    classes,
                    noise,
                }) => {
                    if *samples == 0 || *features == 0 || *classes < 2 {
                        return Err(err(
                            field,
                            "synthetic data needs samples >= 1, features >= 1 and classes >= 2"
                                .into(),
                        ));
                    }
                    if noise.is_some_and(|n| !(n >= 0.0 && n.is_finite())) {
                        return Err(err(
                            &format!("{field}.noise"),
                            "must be a non-negative number".into(),
                        ));
                    }
                }
                Some(DataSource::Idx { images, labels }) => {
                    for (key, p) in [("images", images), ("labels", labels)] {
                        let full = base.join(p);
                        if !full.is_file() {
                            return Err(err(
                                &format!("{field}.{key}"),
                                format!(
                                    "file not found: {} (paths resolve relative to the job file's directory)",
                                    full.display()
                                ),
                            ));
                        }
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The job file with every dataset path made absolute against `base`, so the spec
    /// means the same wherever it is read later.
    pub fn resolved(mut self, base: &Path) -> JobFile {
        let fix = |src: &mut DataSource| {
            if let DataSource::Idx { images, labels } = src {
                *images = base.join(&*images);
                *labels = base.join(&*labels);
            }
        };
        fix(&mut self.data.train);
        if let Some(t) = self.data.test.as_mut() {
            fix(t);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../examples/seed-mlp.toml");

    #[test]
    fn the_seed_example_parses_and_validates() {
        let j = JobFile::parse(SEED, "seed-mlp.toml").unwrap();
        assert_eq!(j.epochs, 10);
        assert_eq!(j.model.layers.len(), 3);
        assert_eq!(j.checkpoint.every_steps, 500);
        j.validate("seed-mlp.toml", Path::new(".")).unwrap();
    }

    #[test]
    fn unknown_key_names_its_place() {
        let text = SEED.replace("epochs = 10", "epochs = 10\nepochz = 3");
        let e = JobFile::parse(&text, "job.toml").unwrap_err().to_string();
        assert!(e.starts_with("job.toml: "), "{e}");
        assert!(e.contains("epochz"), "{e}");
    }

    #[test]
    fn unknown_activation_names_the_layer() {
        let text = SEED.replacen(
            "activation = \"relu\" },\n  { dense = 10",
            "activation = \"relu6\" },\n  { dense = 10",
            1,
        );
        let e = JobFile::parse(&text, "job.toml").unwrap_err().to_string();
        assert!(e.contains("model.layers[1].activation"), "{e}");
        assert!(e.contains("relu6") && e.contains("expected one of"), "{e}");
    }

    #[test]
    fn missing_dataset_file_is_named() {
        let text = r#"
name = "x"
epochs = 1
batch_size = 4
[data]
train = { format = "idx", images = "nope-images.gz", labels = "nope-labels.gz" }
[model]
input = 784
layers = [{ dense = 10, activation = "softmax" }]
[train]
loss = "sparse_categorical_crossentropy"
"#;
        let j = JobFile::parse(text, "job.toml").unwrap();
        let e = j
            .validate("job.toml", Path::new("/tmp"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train.images") && e.contains("file not found"),
            "{e}"
        );
    }
}
