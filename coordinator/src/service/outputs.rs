//! The files a run leaves behind: metrics.jsonl (appended per epoch), model.json and
//! model.safetensors (written with the final checkpoint).

use std::io::Write;
use std::path::Path;

use ringtrain_proto::v1::EpochSummary;
use tracing::warn;

use crate::checkpoint::{tensors_bytes, CheckpointMeta};
use crate::error::CoordinatorError;
use crate::job_file::JobFile;
use ringtrain_core::saved_model::Normalization;

/// What `model.json` says besides the architecture.
#[derive(Debug, Clone)]
pub(super) struct ModelInfo {
    pub(super) file: JobFile,
    pub(super) normalization: Normalization,
    pub(super) feature_names: Option<Vec<String>>,
    pub(super) label_name: Option<String>,
    /// DP-SGD's accounting, so the card says what the weights cost in privacy.
    pub(super) privacy: Option<ringtrain_core::privacy::PrivacyRun>,
}

pub(super) fn append_metrics(out_dir: &Path, s: &EpochSummary) {
    let mut line = serde_json::Map::new();
    line.insert("epoch".into(), s.epoch.into());
    let mut keys: Vec<&String> = s.metrics.keys().collect();
    keys.sort();
    for k in keys {
        line.insert(k.clone(), serde_json::json!(s.metrics[k]));
    }
    line.insert(
        "samples_per_sec".into(),
        serde_json::json!(s.samples_per_sec),
    );
    line.insert("seconds".into(), serde_json::json!(s.seconds));
    let res = std::fs::create_dir_all(out_dir).and_then(|_| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out_dir.join("metrics.jsonl"))?;
        writeln!(f, "{}", serde_json::Value::Object(line))
    });
    if let Err(e) = res {
        warn!(dir = %out_dir.display(), error = %e, "cannot append metrics.jsonl");
    }
}

/// Writes `model.safetensors` and `model.json` into the run directory: everything
/// `ringtrain predict` and `evaluate` need.
pub(super) fn write_model(
    out_dir: &Path,
    info: &ModelInfo,
    meta: &CheckpointMeta,
    params: &[f32],
) -> Result<(), CoordinatorError> {
    let file = &info.file;
    std::fs::create_dir_all(out_dir).map_err(CoordinatorError::io(format!(
        "creating {}",
        out_dir.display()
    )))?;
    let bytes = tensors_bytes(&file.model, &[("", params)])?;
    let weights_sha256 = ringtrain_core::saved_model::sha256_hex(&bytes);
    let tmp = out_dir.join(".model.safetensors.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, out_dir.join("model.safetensors")))
        .map_err(CoordinatorError::io("writing model.safetensors"))?;
    let saved =
        ringtrain_core::saved_model::ModelCard {
            format: ringtrain_core::saved_model::FORMAT.into(),
            name: file.name.clone(),
            model: file.model.clone(),
            loss: file.train.loss,
            metrics: file.train.metrics.clone(),
            classes: file.train.loss.metric_classes(file.model.outputs()),
            normalization: info.normalization.clone(),
            feature_names: info.feature_names.clone(),
            label: info.label_name.clone(),
            trained: ringtrain_core::saved_model::Provenance {
                job_id: meta.job_id.clone(),
                steps: meta.step,
                epochs: meta.epoch,
                spec_hash: meta.spec_hash.clone(),
            },
            weights_sha256,
            privacy: match &info.privacy {
                Some(run) => Some(run.report(meta.step).map_err(|e| {
                    CoordinatorError::Precondition(format!("privacy accounting: {e}"))
                })?),
                None => None,
            },
        };
    let text = serde_json::to_string_pretty(&saved)
        .map_err(|e| CoordinatorError::Serialize(e.to_string()))?;
    // The card goes in last and by rename: a reader never sees a card without its
    // weights, nor a half-written one.
    let tmp = out_dir.join(".model.json.tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, out_dir.join("model.json")))
        .map_err(CoordinatorError::io("writing model.json"))
}
