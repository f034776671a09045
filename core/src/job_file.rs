//! The job file: TOML parsed once into typed data and validated, with errors that name
//! the file, the field and the fix.

use std::path::{Path, PathBuf};

use crate::loss::{LossKind, Metric};
use crate::model::ModelSpec;
use crate::optimizer::{OptimizerConfig, Schedule};
use crate::plan::{EarlyStopping, TrainingPlan};
use serde::{Deserialize, Serialize};

use crate::data_path::{self, DataBinding, DataRoots, Located, COORDINATOR_PREFIX};
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
    /// Workers per generation: a fixed count (`workers = 3`) or an elastic range
    /// (`workers = { min = 2, max = 4 }`).
    #[serde(default)]
    pub workers: Workers,
    /// Where the data comes from.
    pub data: DataSection,
    /// The network.
    pub model: ModelSpec,
    /// Loss, optimizer, metrics.
    pub train: TrainSection,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// What happens when workers are lost.
    #[serde(default)]
    pub fault: FaultSection,
    /// Private training: DP-SGD (see [`crate::privacy::PrivacySection`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacySection>,
}

/// `workers`: how many workers a generation of the job has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Workers {
    /// Exactly this many (`workers = 3`).
    Exactly(u32),
    /// Any count in `min..=max` (`workers = { min = 2, max = 4 }`): the job starts with
    /// at least `min`, takes idle workers up to `max`, and keeps running while at least
    /// `min` remain.
    Range {
        /// Fewest workers the job runs with.
        min: u32,
        /// Most workers the job takes.
        max: u32,
    },
}

impl Default for Workers {
    fn default() -> Self {
        Workers::Exactly(1)
    }
}

impl Workers {
    /// Fewest workers a generation runs with.
    pub fn min(self) -> u32 {
        match self {
            Workers::Exactly(n) => n,
            Workers::Range { min, .. } => min,
        }
    }

    /// Most workers a generation takes.
    pub fn max(self) -> u32 {
        match self {
            Workers::Exactly(n) => n,
            Workers::Range { max, .. } => max,
        }
    }

    /// Whether the count may change while the job runs.
    pub fn is_elastic(self) -> bool {
        matches!(self, Workers::Range { .. })
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::Exactly(n) => write!(f, "{n}"),
            Workers::Range { min, max } => write!(f, "{{ min = {min}, max = {max} }}"),
        }
    }
}

/// `[fault]`: how long a job that lost workers may wait for replacements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSection {
    /// Seconds a job below its minimum waits for workers before it fails.
    #[serde(default = "default_max_wait_secs")]
    pub max_wait_secs: u64,
    /// New generations a job may start after losing workers before it fails.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
}

fn default_max_wait_secs() -> u64 {
    300
}

fn default_max_restarts() -> u32 {
    100
}

impl Default for FaultSection {
    fn default() -> Self {
        FaultSection {
            max_wait_secs: default_max_wait_secs(),
            max_restarts: default_max_restarts(),
        }
    }
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
    /// A separate validation set (instead of `validation_split`).
    #[serde(default)]
    pub validation: Option<DataSource>,
    /// Test data evaluated once at the end.
    #[serde(default)]
    pub test: Option<DataSource>,
    /// Feature scaling fitted on the training split only and saved with the model.
    #[serde(default)]
    pub normalize: NormalizeKind,
}

/// Feature scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeKind {
    /// Features as they are.
    #[default]
    None,
    /// (x − min) / (max − min) per feature.
    Minmax,
    /// (x − mean) / std per feature.
    Standard,
}

/// What a synthetic dataset asks the model to learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Gaussian clusters, one per class.
    #[default]
    Classification,
    /// A smooth nonlinear function of the features plus noise.
    Regression,
}

/// One dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    /// Generated from the job seed: learnable and deterministic.
    Synthetic {
        /// Number of samples.
        samples: usize,
        /// Features per sample.
        features: usize,
        /// Number of classes (classification; default 2).
        #[serde(default)]
        classes: Option<usize>,
        /// Classification (default) or regression.
        #[serde(default)]
        task: Task,
        /// Noise scale (classification: cluster std, default 2.5; regression: target
        /// noise std, default 0.1).
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
    /// A CSV file with a header row.
    Csv {
        /// The file.
        path: PathBuf,
        /// Name of the target column (default "label" unless `label_index` is given).
        #[serde(default)]
        label: Option<String>,
        /// 0-based index of the target column.
        #[serde(default)]
        label_index: Option<usize>,
        /// Feature columns by name, in order (default: every other column).
        #[serde(default)]
        features: Option<Vec<String>>,
    },
    /// NumPy `.npy` arrays: features (rows × features) and labels (rows).
    Npy {
        /// 2-D feature array (f32, f64, u8 or i64).
        features: PathBuf,
        /// 1-D target array.
        labels: PathBuf,
    },
}

impl DataSource {
    fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            DataSource::Synthetic { .. } => Vec::new(),
            DataSource::Idx { images, labels } => vec![images, labels],
            DataSource::Csv { path, .. } => vec![path],
            DataSource::Npy { features, labels } => vec![features, labels],
        }
    }

    /// The path under `key` (`images`, `path`, ...), when this source has one.
    fn path_mut(&mut self, key: &str) -> Option<&mut PathBuf> {
        match (self, key) {
            (DataSource::Idx { images, .. }, "images") => Some(images),
            (DataSource::Idx { labels, .. } | DataSource::Npy { labels, .. }, "labels") => {
                Some(labels)
            }
            (DataSource::Csv { path, .. }, "path") => Some(path),
            (DataSource::Npy { features, .. }, "features") => Some(features),
            _ => None,
        }
    }

    fn paths(&self) -> Vec<(&'static str, &PathBuf)> {
        match self {
            DataSource::Synthetic { .. } => Vec::new(),
            DataSource::Idx { images, labels } => vec![("images", images), ("labels", labels)],
            DataSource::Csv { path, .. } => vec![("path", path)],
            DataSource::Npy { features, labels } => {
                vec![("features", features), ("labels", labels)]
            }
        }
    }
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// The optimizer (default Adam with Keras defaults).
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// The loss.
    pub loss: LossKind,
    /// Metrics reported per epoch (the loss is always reported).
    #[serde(default)]
    pub metrics: Vec<Metric>,
    /// Learning-rate schedule (default constant).
    #[serde(default)]
    pub schedule: Schedule,
    /// Linear learning-rate warm-up over this many steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Clip the averaged gradient to this global L2 norm.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Stop when a monitored metric stops improving.
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
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

    /// The training plan workers receive for this job. `data` carries what only the
    /// loaded datasets and the coordinator know; everything else comes from the file.
    pub fn training_plan(&self, data: PlanData) -> TrainingPlan {
        TrainingPlan {
            name: self.name.clone(),
            seed: self.seed,
            epochs: self.epochs,
            batch_size: self.batch_size,
            model: self.model.clone(),
            loss: self.train.loss,
            metrics: self.train.metrics.clone(),
            optimizer: self.train.optimizer,
            schedule: self.train.schedule,
            warmup_steps: self.train.warmup_steps,
            clip_norm: self.train.clip_norm,
            early_stopping: self.train.early_stopping.clone(),
            checkpoint_every: self.checkpoint.every_steps,
            train_samples: data.train_samples,
            validation_samples: data.validation_samples,
            test_samples: data.test_samples,
            features: data.features,
            collective_timeout_ms: data.collective_timeout_ms,
            target_center: data.target_center,
            max_steps: data.max_steps,
            privacy: None,
        }
    }

    /// Checks that one worker can hold the model: parameters, the gradient, a checkpoint
    /// copy and the optimizer's state, at 4 bytes a value, must fit in `limit` bytes.
    /// The error names the largest dense layer, which is the one to shrink.
    pub fn check_fits(&self, source: &str, limit: u64) -> Result<(), SpecError> {
        let mut inputs = self.model.input as u128;
        let mut total: u128 = 0;
        let mut largest: Option<(usize, u128)> = None;
        for (i, l) in self.model.layers.iter().enumerate() {
            let Some(units) = l.dense else { continue };
            let units = units as u128;
            let p = inputs * units + if l.use_bias { units } else { 0 };
            total += p;
            if largest.is_none_or(|(_, q)| p > q) {
                largest = Some((i, p));
            }
            inputs = units;
        }
        let copies = 3 + self.train.optimizer.slot_names().len() as u128;
        let bytes = total.saturating_mul(4 * copies);
        if bytes <= limit as u128 {
            return Ok(());
        }
        let field = match largest {
            Some((i, _)) => format!("model.layers[{i}].dense"),
            None => "model".to_string(),
        };
        Err(SpecError {
            file: source.to_string(),
            field,
            message: format!(
                "the model has {total} parameters; with the gradient, a checkpoint copy and \
                 the optimizer's state a worker would hold about {}, over the {} it may hold \
                 (use fewer units)",
                human_bytes(bytes),
                human_bytes(limit as u128)
            ),
        })
    }

    /// Checks everything that can be checked without reading the data, and that dataset
    /// files exist (located through `roots`: on a client, `coordinator:` paths are not
    /// checked).
    pub fn validate(&self, source: &str, roots: &DataRoots<'_>) -> Result<(), SpecError> {
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
        match self.workers {
            Workers::Exactly(0) => return Err(err("workers", "must be at least 1".into())),
            Workers::Range { min, max } if min == 0 || max < min => {
                return Err(err(
                    "workers",
                    format!(
                        "{{ min = {min}, max = {max} }} needs 1 <= min <= max (e.g. {{ min = 2, max = 4 }})"
                    ),
                ))
            }
            _ => {}
        }
        let vs = self.data.validation_split;
        if !(0.0..1.0).contains(&vs) {
            return Err(err(
                "data.validation_split",
                format!("{vs} is outside [0, 1)"),
            ));
        }
        if vs > 0.0 && self.data.validation.is_some() {
            return Err(err(
                "data.validation",
                "give either data.validation or data.validation_split, not both".into(),
            ));
        }
        self.model.validate().map_err(|(f, m)| err(&f, m))?;
        let last = self
            .model
            .layout()
            .last()
            .map(|l| l.layer)
            .unwrap_or_default();
        self.train
            .loss
            .check_output(self.model.outputs(), self.model.output_activation())
            .map_err(|m| err(&format!("model.layers[{last}]"), m))?;
        for m in &self.train.metrics {
            let regression_metric = matches!(m, Metric::Mae | Metric::Mse | Metric::R2);
            if regression_metric == self.train.loss.is_classification() {
                return Err(err(
                    "train.metrics",
                    format!(
                        "{} does not apply to a {} loss",
                        m.name(),
                        if self.train.loss.is_classification() {
                            "classification"
                        } else {
                            "regression"
                        }
                    ),
                ));
            }
        }
        let opt = self.train.optimizer;
        opt.validate()
            .map_err(|(f, m)| err(&format!("train.optimizer.{f}"), m))?;
        if self
            .train
            .clip_norm
            .is_some_and(|c| !(c > 0.0 && c.is_finite()))
        {
            return Err(err("train.clip_norm", "must be a positive number".into()));
        }
        if let Some(es) = &self.train.early_stopping {
            let known = es.monitor == "loss"
                || self.train.metrics.iter().any(|m| m.name() == es.monitor)
                || es.monitor.strip_prefix("val_").is_some_and(|k| {
                    k == "loss" || self.train.metrics.iter().any(|m| m.name() == k)
                });
            if !known {
                return Err(err(
                    "train.early_stopping.monitor",
                    format!("{:?} is not a reported metric (use loss, val_loss or a val_ form of train.metrics)", es.monitor),
                ));
            }
            if es.monitor.starts_with("val_") && vs == 0.0 && self.data.validation.is_none() {
                return Err(err(
                    "train.early_stopping.monitor",
                    format!(
                        "{} needs validation data: set data.validation_split or data.validation",
                        es.monitor
                    ),
                ));
            }
        }
        if self.checkpoint.keep == 0 {
            return Err(err("checkpoint.keep", "must be at least 1".into()));
        }
        if let Some(p) = &self.privacy {
            p.validate().map_err(|e| {
                let field = if e.key.is_empty() {
                    "privacy".to_string()
                } else {
                    format!("privacy.{}", e.key)
                };
                err(&field, e.message)
            })?;
            if p.dp_enabled() && self.data.normalize != NormalizeKind::None {
                return Err(err(
                    "data.normalize",
                    "is fitted on the training data, and those statistics are released with \
                     the model outside the DP guarantee; a DP job needs normalize = \"none\" \
                     (scale the data beforehand with public bounds; IDX images are already \
                     scaled to [0, 1])"
                        .into(),
                ));
            }
        }
        let sources = [
            ("data.train", Some(&self.data.train)),
            ("data.validation", self.data.validation.as_ref()),
            ("data.test", self.data.test.as_ref()),
        ];
        for (field, src) in sources {
            let Some(src) = src else { continue };
            if let DataSource::Synthetic {
                samples,
                features,
                classes,
                task,
                noise,
            } = src
            {
                if *samples == 0 || *features == 0 {
                    return Err(err(
                        field,
                        "synthetic data needs samples >= 1 and features >= 1".into(),
                    ));
                }
                match (task, classes) {
                    (Task::Classification, Some(c)) if *c < 2 => {
                        return Err(err(
                            &format!("{field}.classes"),
                            "must be at least 2".into(),
                        ))
                    }
                    (Task::Regression, Some(_)) => {
                        return Err(err(
                            &format!("{field}.classes"),
                            "does not apply to task = \"regression\"".into(),
                        ))
                    }
                    _ => {}
                }
                if noise.is_some_and(|n| !(n >= 0.0 && n.is_finite())) {
                    return Err(err(
                        &format!("{field}.noise"),
                        "must be a non-negative number".into(),
                    ));
                }
            }
            if let DataSource::Csv {
                label, label_index, ..
            } = src
            {
                if label.is_some() && label_index.is_some() {
                    return Err(err(
                        field,
                        "give either label or label_index, not both".into(),
                    ));
                }
            }
            for (key, p) in src.paths() {
                if let Located::Here(full) = roots.locate(p) {
                    if !full.is_file() {
                        return Err(err(&format!("{field}.{key}"), roots.missing(p, &full)));
                    }
                }
            }
        }
        Ok(())
    }

    /// The job file with every dataset path made absolute through `roots`, so the spec
    /// means the same wherever it is read later (a `coordinator:` path seen from a
    /// client stays as written).
    pub fn resolved(mut self, roots: &DataRoots<'_>) -> JobFile {
        for (_, src) in self.sources_mut() {
            for p in src.paths_mut() {
                if let Located::Here(full) = roots.locate(p) {
                    *p = full;
                }
            }
        }
        self
    }

    /// Every dataset file the job names, with its field as errors name it
    /// (`data.train.images`), in the job file's order.
    pub fn dataset_files(&self) -> Vec<(String, &Path)> {
        let sources = [
            ("data.train", Some(&self.data.train)),
            ("data.validation", self.data.validation.as_ref()),
            ("data.test", self.data.test.as_ref()),
        ];
        sources
            .into_iter()
            .filter_map(|(field, src)| Some((field, src?)))
            .flat_map(|(field, src)| {
                src.paths()
                    .into_iter()
                    .map(move |(key, p)| (format!("{field}.{key}"), p.as_path()))
            })
            .collect()
    }

    /// Points each bound field at its uploaded file in the coordinator's store
    /// (`coordinator:datasets/sha256/<hex>`). A binding that names no dataset file of
    /// this job, or a malformed digest, is refused naming it.
    pub fn bind_uploads(
        &mut self,
        bindings: &[DataBinding],
        source: &str,
    ) -> Result<(), SpecError> {
        for b in bindings {
            let err = |message: String| SpecError {
                file: source.to_string(),
                field: b.field.clone(),
                message,
            };
            if !data_path::is_sha256_hex(&b.sha256) {
                return Err(err(format!(
                    "the upload bound to it has sha256 {:?}, which is not 64 lowercase hex \
                     digits (a client bug: upload the file with UploadData and send the \
                     digest it returns)",
                    b.sha256
                )));
            }
            let target = PathBuf::from(format!(
                "{COORDINATOR_PREFIX}{}",
                data_path::object_path(&b.sha256).display()
            ));
            let slot = self.sources_mut().into_iter().find_map(|(field, src)| {
                let key = b.field.strip_prefix(field)?.strip_prefix('.')?;
                src.path_mut(key)
            });
            match slot {
                Some(p) => *p = target,
                None => {
                    return Err(err(
                        "an upload is bound to it, but the job file has no such dataset file \
                         (bind only the fields listed by data.train, data.validation and \
                         data.test)"
                            .into(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn sources_mut(&mut self) -> Vec<(&'static str, &mut DataSource)> {
        let mut out = vec![("data.train", &mut self.data.train)];
        if let Some(v) = self.data.validation.as_mut() {
            out.push(("data.validation", v));
        }
        if let Some(t) = self.data.test.as_mut() {
            out.push(("data.test", t));
        }
        out
    }
}

/// Name of the job file's text as saved in a run directory at submit.
pub const SAVED_JOB_FILE: &str = "job.toml";
/// Name of [`SavedSubmit`] (JSON) beside [`SAVED_JOB_FILE`] in a run directory.
pub const SAVED_SUBMIT_FILE: &str = "job.json";

/// What a resume needs besides the saved job file's text: how it was submitted, so it is
/// read again with the same relative dataset paths and the same overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSubmit {
    /// Where the job file came from (for messages).
    pub source: String,
    /// The directory its relative dataset paths resolve against.
    pub base_dir: String,
    /// The `--workers` override (0: the job file's `workers`).
    pub workers: u32,
    /// The step limit (0: none).
    pub max_steps: u64,
    /// Dataset fields bound to uploaded files (see [`JobFile::bind_uploads`]); empty for
    /// a job whose files were read where the job file names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uploaded: Vec<DataBinding>,
}

/// Checks that `new` may continue the run in `run_dir`, which was started with `saved`:
/// every field must be equal except `epochs`, which may grow. Compare resolved job files
/// with their uploads bound ([`JobFile::bind_uploads`], [`JobFile::resolved`]), so the
/// same dataset named relative to another directory is still the same, and an uploaded
/// one compares by its content's digest, wherever it was uploaded from. The error names the first differing field of `new` (in `source`) with
/// both values.
pub fn check_resume(
    saved: &JobFile,
    new: &JobFile,
    source: &str,
    run_dir: &str,
) -> Result<(), SpecError> {
    let err = |field: String, message: String| SpecError {
        file: source.to_string(),
        field,
        message,
    };
    if new.epochs < saved.epochs {
        return Err(err(
            "epochs".into(),
            format!(
                "the run in {run_dir} was started with {}, this job file says {}; epochs may \
                 grow on a resume but not shrink (set epochs >= {}, or start a new run)",
                saved.epochs, new.epochs, saved.epochs
            ),
        ));
    }
    // Epochs are checked above; everything else must be equal.
    let mut new_same_epochs = new.clone();
    new_same_epochs.epochs = saved.epochs;
    match first_difference("", saved, &new_same_epochs).map_err(|e| err("job".into(), e))? {
        None => Ok(()),
        Some(d) => Err(err(
            d.field,
            format!(
                "the run in {run_dir} was started with {}, this job file says {}; only epochs \
                 may change on a resume (resume with the original job file, or start a new run)",
                d.was, d.now
            ),
        )),
    }
}

/// Where two values of a job file's types first differ: the dotted field path as the job
/// file spells it (`model.layers[1].dense`, `train.optimizer.adam.learning_rate`) and
/// both values, written for a message (`64`, `"relu"`, `the default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDifference {
    /// The dotted path.
    pub field: String,
    /// The value in the first (older) one.
    pub was: String,
    /// The value in the second (newer) one.
    pub now: String,
}

/// The first field where `was` and `now` differ, walking their serialized forms in key
/// order; `prefix` is the path of the values themselves (`"model"`, or `""` for a whole
/// job file). `None` when they are equal. The error is a serialization failure.
pub fn first_difference<T: Serialize>(
    prefix: &str,
    was: &T,
    now: &T,
) -> Result<Option<FieldDifference>, String> {
    let was = serde_json::to_value(was).map_err(|e| format!("cannot compare: {e}"))?;
    let now = serde_json::to_value(now).map_err(|e| format!("cannot compare: {e}"))?;
    Ok(diff_values(prefix.to_string(), Some(&was), Some(&now)))
}

fn join_field(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A value as a message shows it; a key left out of the serialized form (a default such
/// as `use_bias = true`) or a null (an unset option) is "the default".
fn show_value(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => "the default".into(),
        Some(v) => v.to_string(),
    }
}

fn diff_values(
    path: String,
    was: Option<&serde_json::Value>,
    now: Option<&serde_json::Value>,
) -> Option<FieldDifference> {
    use serde_json::Value;
    let whole = |path: String| {
        Some(FieldDifference {
            field: path,
            was: show_value(was),
            now: show_value(now),
        })
    };
    match (was, now) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            // An enum written as `{ variant = { ... } }` (the optimizer, a schedule) that
            // changed variant is one difference at the enum's own path.
            if a.len() == 1 && b.len() == 1 && a.keys().ne(b.keys()) {
                return whole(path);
            }
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .find_map(|k| diff_values(join_field(&path, k), a.get(k), b.get(k)))
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) => {
            let first = a
                .iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (x, y))| diff_values(format!("{path}[{i}]"), Some(x), Some(y)));
            match first {
                Some(d) => Some(d),
                None if a.len() != b.len() => Some(FieldDifference {
                    field: path,
                    was: format!("{} entries", a.len()),
                    now: format!("{} entries", b.len()),
                }),
                None => None,
            }
        }
        (a, b) if a == b => None,
        _ => whole(path),
    }
}

/// The parts of a [`TrainingPlan`] that the job file alone does not give: sizes of the
/// loaded data, the coordinator's collective deadline, a benchmark's step limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanData {
    /// Training samples.
    pub train_samples: usize,
    /// Validation samples (0: none).
    pub validation_samples: usize,
    /// Test samples (0: none).
    pub test_samples: usize,
    /// Features per sample.
    pub features: usize,
    /// Deadline of one ring round, in milliseconds.
    pub collective_timeout_ms: u64,
    /// Mean of the regression targets (0 for classification).
    pub target_center: f64,
    /// Stop after this many steps (benchmarks).
    pub max_steps: Option<u64>,
}

/// `bytes` in binary units, for messages ("5.8 TiB").
fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
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
        j.validate("seed-mlp.toml", &DataRoots::client(Path::new(".")))
            .unwrap();
    }

    #[test]
    fn a_model_too_large_for_a_worker_is_refused_naming_the_layer_and_size() {
        let text = SEED.replacen("dense = 64", "dense = 4000000000", 1);
        let j = JobFile::parse(&text, "big.toml").unwrap();
        // The seed model (about 11k parameters) fits in 1 MiB; the big one does not fit
        // in 16 GiB.
        JobFile::parse(SEED, "seed-mlp.toml")
            .unwrap()
            .check_fits("seed-mlp.toml", 1 << 20)
            .unwrap();
        let e = j.check_fits("big.toml", 16 << 30).unwrap_err().to_string();
        assert!(e.starts_with("big.toml: model.layers[0].dense: "), "{e}");
        // (100 + 1) * 4e9 + (4e9 + 1) * 64 + 650 parameters, 5 copies (adam: m and v).
        assert!(e.contains("the model has 660000000714 parameters"), "{e}");
        assert!(e.contains("12.0 TiB") && e.contains("16.0 GiB"), "{e}");
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
            .validate("job.toml", &DataRoots::client(Path::new("/tmp")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train.images") && e.contains("file not found"),
            "{e}"
        );
    }

    fn seed_edited(from: &str, to: &str) -> JobFile {
        assert!(
            SEED.contains(from),
            "the seed example no longer has {from:?}"
        );
        JobFile::parse(&SEED.replacen(from, to, 1), "new.toml").unwrap()
    }

    #[test]
    fn resuming_with_the_same_job_file_is_accepted() {
        let saved = JobFile::parse(SEED, "job.toml").unwrap();
        check_resume(&saved, &saved.clone(), "new.toml", "runs/x").unwrap();
    }

    #[test]
    fn epochs_may_grow_on_a_resume() {
        let saved = JobFile::parse(SEED, "job.toml").unwrap();
        let new = seed_edited("epochs = 10", "epochs = 25");
        check_resume(&saved, &new, "new.toml", "runs/x").unwrap();
    }

    #[test]
    fn fewer_epochs_are_refused_naming_both_counts() {
        let saved = JobFile::parse(SEED, "job.toml").unwrap();
        let new = seed_edited("epochs = 10", "epochs = 4");
        let e = check_resume(&saved, &new, "new.toml", "runs/x").unwrap_err();
        assert_eq!(e.field, "epochs");
        let text = e.to_string();
        assert!(text.starts_with("new.toml: epochs: "), "{text}");
        assert!(
            text.contains("runs/x") && text.contains("with 10") && text.contains("says 4"),
            "{text}"
        );
    }

    #[test]
    fn a_changed_layer_width_is_refused_naming_the_layer() {
        let saved = JobFile::parse(SEED, "job.toml").unwrap();
        let new = seed_edited(
            "{ dense = 64, activation = \"relu\" },\n  { dense = 10",
            "{ dense = 32, activation = \"relu\" },\n  { dense = 10",
        );
        let e = check_resume(&saved, &new, "new.toml", "runs/x").unwrap_err();
        assert_eq!(e.field, "model.layers[1].dense");
        assert_eq!(
            e.to_string(),
            "new.toml: model.layers[1].dense: the run in runs/x was started with 64, this job \
             file says 32; only epochs may change on a resume (resume with the original job \
             file, or start a new run)"
        );
    }

    #[test]
    fn a_changed_learning_rate_is_refused_naming_the_field() {
        let saved = JobFile::parse(SEED, "job.toml").unwrap();
        let new = seed_edited("learning_rate = 0.001", "learning_rate = 0.01");
        // Epochs growing at the same time does not hide the other change.
        let new = JobFile { epochs: 20, ..new };
        let e = check_resume(&saved, &new, "new.toml", "runs/x").unwrap_err();
        assert_eq!(e.field, "train.optimizer.adam.learning_rate");
        assert!(
            e.message.contains("with 0.001") && e.message.contains("says 0.01"),
            "{e}"
        );
    }

    #[test]
    fn differences_in_defaults_variants_and_lengths_are_named() {
        let saved = JobFile::parse(SEED, "job.toml").unwrap();
        // A key left at its default (and so not serialized) against one that is set.
        let new = seed_edited(
            "{ dense = 10, activation = \"softmax\" }",
            "{ dense = 10, activation = \"softmax\", l2 = 0.5 }",
        );
        let e = check_resume(&saved, &new, "new.toml", "runs/x").unwrap_err();
        assert_eq!(e.field, "model.layers[2].l2");
        assert!(
            e.message.contains("with the default") && e.message.contains("says 0.5"),
            "{e}"
        );
        // Another optimizer is one difference at the optimizer, not at a variant's field.
        let new = seed_edited(
            "{ adam = { learning_rate = 0.001 } }",
            "{ sgd = { learning_rate = 0.001 } }",
        );
        let e = check_resume(&saved, &new, "new.toml", "runs/x").unwrap_err();
        assert_eq!(e.field, "train.optimizer");
        // An extra layer.
        let new = seed_edited(
            "{ dense = 10, activation = \"softmax\" },",
            "{ dropout = 0.1 },\n  { dense = 10, activation = \"softmax\" },",
        );
        let e = check_resume(&saved, &new, "new.toml", "runs/x").unwrap_err();
        assert!(e.field.starts_with("model.layers"), "{e}");
        let d = first_difference("model", &saved.model, &saved.model).unwrap();
        assert_eq!(d, None);
        let mut longer = saved.model.clone();
        longer.layers.push(longer.layers[2].clone());
        let d = first_difference("model", &saved.model, &longer)
            .unwrap()
            .unwrap();
        assert_eq!(
            (d.field.as_str(), d.was.as_str(), d.now.as_str()),
            ("model.layers", "3 entries", "4 entries")
        );
    }

    fn seed_with(edit: impl FnOnce(String) -> String) -> Result<(), SpecError> {
        let j = JobFile::parse(&edit(SEED.to_string()), "job.toml")?;
        j.validate("job.toml", &DataRoots::client(Path::new(".")))
    }

    #[test]
    fn every_new_key_parses_and_mismatches_are_named() {
        seed_with(|t| {
            t.replace(
                r#"optimizer = { adam = { learning_rate = 0.001 } }"#,
                r#"optimizer = { sgd = { learning_rate = 0.1, momentum = 0.9, nesterov = true } }
schedule = { cosine = { decay_steps = 1000, alpha = 0.1 } }
warmup_steps = 10
clip_norm = 1.0
early_stopping = { monitor = "val_accuracy", patience = 2, restore_best = true }"#,
            )
            .replace("{ dense = 64, activation = \"relu\" },\n  { dense = 10", "{ dense = 64, activation = \"gelu\", init = \"he_normal\", l2 = 0.001, use_bias = false },\n  { dropout = 0.3 },\n  { dense = 10")
            .replace("validation_split = 0.1", "validation_split = 0.1\nnormalize = \"standard\"")
        })
        .unwrap();
        let e = seed_with(|t| t.replace(r#"metrics = ["accuracy"]"#, r#"metrics = ["r2"]"#))
            .unwrap_err();
        assert_eq!(e.field, "train.metrics");
        let e = seed_with(|t| {
            t.replace(
                r#"loss = "sparse_categorical_crossentropy""#,
                r#"loss = "binary_crossentropy""#,
            )
        })
        .unwrap_err();
        assert!(
            e.field.starts_with("model.layers[2]") && e.message.contains("one output unit"),
            "{e}"
        );
        let e = seed_with(|t| {
            t.replace(
                "keep = 3",
                "keep = 3\n[train.early_stopping]\nmonitor = \"val_f1\"",
            )
        })
        .unwrap_err();
        assert!(e.to_string().contains("val_f1"), "{e}");
        let e = seed_with(|t| {
            t.replace(
                "validation_split = 0.1",
                "validation_split = 0.1\nvalidation = { format = \"synthetic\", samples = 10, features = 100, classes = 10 }",
            )
        })
        .unwrap_err();
        assert_eq!(e.field, "data.validation");
        let e = seed_with(|t| {
            t.replace(
                r#"{ adam = { learning_rate = 0.001 } }"#,
                r#"{ rmsprop = { rho = 1.5 } }"#,
            )
        })
        .unwrap_err();
        assert_eq!(e.field, "train.optimizer.rho");
    }
}
