//! The checkpoint format (versioned: [`FORMAT`], [`VERSION`]) and its store: atomic,
//! checksummed, pruned to the newest N.
//!
//! A checkpoint is a directory `step-<step>/` holding
//! - `state.safetensors`: parameters and optimizer state, one tensor per layer and kind
//!   (`dense_0.kernel`, `opt.m.dense_0.kernel`, ...);
//! - `meta.json`: [`CheckpointMeta`] (step, epoch, generation, optimizer t, job-spec hash,
//!   and in [`ResumeState`] everything else a resume needs: the position within the
//!   epoch, the RNG's seed, early-stopping and schedule state, the privacy ledger);
//! - `CHECKSUM`: hex SHA-256 over the bytes of `state.safetensors` then `meta.json`.
//!
//! It is written into a hidden temporary directory, every file fsynced, then renamed into
//! place and the parent fsynced: a crash leaves either the old set or the new one, never a
//! half-written checkpoint under a real name.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::model::ModelSpec;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::CheckpointError;
use crate::privacy::Ledger;

/// Format marker in `meta.json`.
pub const FORMAT: &str = "ringtrain.checkpoint";
/// Version of the format this build writes and reads. Version 1 (before resume state was
/// recorded) had no `version` field and is refused with a message saying so.
pub const VERSION: u32 = 2;

/// Early stopping's memory across epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStoppingState {
    /// Best value of the monitored metric so far.
    pub best: f64,
    /// Epochs in a row without improvement.
    pub since_best: u32,
    /// Whether the best epoch's parameters are saved (tensor group `best`).
    pub has_best_params: bool,
}

/// Everything besides parameters and optimizer buffers that a resume needs to continue
/// exactly as if training had never stopped.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ResumeState {
    /// Epoch in progress (0-based) when the checkpoint was taken.
    pub epoch: u32,
    /// Training examples of that epoch already consumed, over all ranks (the global
    /// cursor into the epoch's permutation).
    pub epoch_cursor: u64,
    /// The job seed. Every random draw in training (initialization, the epoch
    /// permutations, dropout masks, DP noise) is derived from (seed, epoch, step, sample
    /// index) rather than from a running generator, so the seed and the counters above
    /// are the complete RNG state.
    pub rng_seed: u64,
    /// The learning-rate schedule's position (0-based step of the next update).
    pub schedule_step: u64,
    /// Early stopping's state, when the job uses it.
    pub early_stopping: Option<EarlyStoppingState>,
    /// The privacy ledger (steps taken under which noise and sampling rate), when the
    /// job trains with differential privacy; a resume never resets the budget.
    pub privacy_ledger: Option<Ledger>,
    /// The epoch's training metric sums so far (the all-reduced global sums, flat), so
    /// the epoch's summary and early stopping on a training metric come out the same
    /// after a resume. Absent in checkpoints taken at an epoch's start.
    #[serde(default)]
    pub epoch_sums: Option<Vec<f64>>,
    /// The epoch's L2 penalty so far (summed per example), beside `epoch_sums`.
    #[serde(default)]
    pub penalty_sum: f64,
}

/// Metadata saved beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    #[serde(default)]
    pub version: u32,
    /// The job.
    pub job_id: String,
    /// Generation that produced it.
    pub generation: u64,
    /// Optimizer steps completed.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u32,
    /// The optimizer's step count.
    pub optimizer_t: u64,
    /// Names of the optimizer state buffers saved as `opt.<name>.*`.
    pub optimizer_slots: Vec<String>,
    /// SHA-256 of the canonical job spec: a resume must use the same spec.
    pub spec_hash: String,
    /// xxh3-64 of the parameter bytes as the replicas reported it.
    pub param_hash: u64,
    /// Whether this is the end-of-training checkpoint.
    pub final_: bool,
    /// The architecture, so the checkpoint is self-describing.
    pub model: ModelSpec,
    /// What a resume needs besides the tensors.
    pub resume: ResumeState,
}

/// The flat buffers of one training state.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingState {
    /// Parameters.
    pub params: Vec<f32>,
    /// Optimizer state buffers in the order of `CheckpointMeta::optimizer_slots`.
    pub slots: Vec<Vec<f32>>,
    /// Early stopping's best parameters, when it keeps them (`restore_best`).
    pub best: Option<Vec<f32>>,
}

/// A checkpoint read back and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Where it lives.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: CheckpointMeta,
    /// Its tensors.
    pub state: TrainingState,
}

const TENSORS: &str = "state.safetensors";
const META: &str = "meta.json";
const CHECKSUM: &str = "CHECKSUM";

fn fsync_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = fs::File::create(path)
        .map_err(CheckpointError::io(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(CheckpointError::io(format!("writing {}", path.display())))
}

fn fsync_dir(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(CheckpointError::io(format!(
            "syncing directory {}",
            path.display()
        )))
}

fn checksum(tensors: &[u8], meta: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(tensors);
    h.update(meta);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serializes flat buffers as named per-layer tensors in safetensors format.
pub fn tensors_bytes(
    model: &ModelSpec,
    groups: &[(&str, &[f32])],
) -> Result<Vec<u8>, CheckpointError> {
    let names = model.tensor_names();
    let mut views = Vec::new();
    for (prefix, buf) in groups {
        if buf.len() != model.num_params() {
            return Err(CheckpointError::Invalid(format!(
                "{prefix} buffer has {} values, the model has {} parameters",
                buf.len(),
                model.num_params()
            )));
        }
        for (name, shape, offset) in &names {
            let len: usize = shape.iter().product();
            let bytes: &[u8] = bytemuck::cast_slice(&buf[*offset..offset + len]);
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| CheckpointError::Serialize(e.to_string()))?;
            let full = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            views.push((full, view));
        }
    }
    safetensors::tensor::serialize(views, None::<HashMap<String, String>>)
        .map_err(|e| CheckpointError::Serialize(e.to_string()))
}

/// Reads named tensors (`<prefix>.dense_<i>.kernel`, ... or unprefixed) back into a flat
/// buffer in the model's layout; the error names the tensor.
pub fn read_group(
    st: &safetensors::SafeTensors<'_>,
    model: &ModelSpec,
    prefix: &str,
) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; model.num_params()];
    for (name, shape, offset) in model.tensor_names() {
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        let t = st
            .tensor(&full)
            .map_err(|e| format!("tensor {full}: {e}"))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
            return Err(format!(
                "tensor {full} is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ));
        }
        for (d, v) in out[offset..offset + shape.iter().product::<usize>()]
            .iter_mut()
            .zip(crate::wire::f32s_le(t.data()))
        {
            *d = v;
        }
    }
    Ok(out)
}

/// Checkpoints of one job.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

impl CheckpointStore {
    /// A store under `dir`, keeping the `keep` newest checkpoints.
    pub fn new(dir: PathBuf, keep: usize) -> Self {
        CheckpointStore {
            dir,
            keep: keep.max(1),
        }
    }

    /// Writes a checkpoint atomically and prunes old ones; returns its directory.
    pub fn write(
        &self,
        meta: &CheckpointMeta,
        state: &TrainingState,
    ) -> Result<PathBuf, CheckpointError> {
        fs::create_dir_all(&self.dir).map_err(CheckpointError::io(format!(
            "creating {}",
            self.dir.display()
        )))?;
        if state.slots.len() != meta.optimizer_slots.len() {
            return Err(CheckpointError::Invalid(format!(
                "{} optimizer buffers for slots {:?}",
                state.slots.len(),
                meta.optimizer_slots
            )));
        }
        let names: Vec<String> = meta
            .optimizer_slots
            .iter()
            .map(|n| format!("opt.{n}"))
            .collect();
        let mut groups: Vec<(&str, &[f32])> = vec![("", &state.params)];
        groups.extend(
            names
                .iter()
                .map(|n| n.as_str())
                .zip(state.slots.iter().map(|v| v.as_slice())),
        );
        let has_best = meta
            .resume
            .early_stopping
            .as_ref()
            .is_some_and(|e| e.has_best_params);
        match (&state.best, has_best) {
            (Some(b), true) => groups.push(("best", b)),
            (None, false) => {}
            _ => {
                return Err(CheckpointError::Invalid(
                    "the best-epoch parameters and the early-stopping metadata disagree".into(),
                ))
            }
        }
        let tensors = tensors_bytes(&meta.model, &groups)?;
        let meta_bytes = serde_json::to_vec_pretty(meta)
            .map_err(|e| CheckpointError::Serialize(e.to_string()))?;
        // The final checkpoint gets its own name, so it never replaces a periodic one
        // taken at the same step (names still sort by step, final last).
        let name = if meta.final_ {
            format!("step-{:010}-final", meta.step)
        } else {
            format!("step-{:010}", meta.step)
        };
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(CheckpointError::io(format!("creating {}", tmp.display())))?;
        fsync_file(&tmp.join(TENSORS), &tensors)?;
        fsync_file(&tmp.join(META), &meta_bytes)?;
        fsync_file(
            &tmp.join(CHECKSUM),
            checksum(&tensors, &meta_bytes).as_bytes(),
        )?;
        fsync_dir(&tmp)?;
        let dest = self.dir.join(&name);
        if dest.exists() {
            // Same step written again (e.g. the final checkpoint on a checkpoint step):
            // move the old one aside first so the rename below stays atomic.
            let old = self.dir.join(format!(".old-{name}-{}", std::process::id()));
            fs::rename(&dest, &old)
                .map_err(CheckpointError::io(format!("replacing {}", dest.display())))?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(&tmp, &dest).map_err(CheckpointError::io(format!(
            "renaming into {}",
            dest.display()
        )))?;
        fsync_dir(&self.dir)?;
        // The new checkpoint is safely in place; failing to delete an old one must not
        // fail the upload.
        if let Err(e) = self.prune() {
            tracing::warn!(error = %e, "cannot prune old checkpoints");
        }
        Ok(dest)
    }

    /// Checkpoint directories, oldest first.
    pub fn list(&self) -> Result<Vec<PathBuf>, CheckpointError> {
        let mut out: Vec<PathBuf> = match fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-"))
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(CheckpointError::io(format!(
                    "listing {}",
                    self.dir.display()
                ))(e))
            }
        };
        out.sort();
        Ok(out)
    }

    fn prune(&self) -> Result<(), CheckpointError> {
        let all = self.list()?;
        if all.len() > self.keep {
            for p in &all[..all.len() - self.keep] {
                fs::remove_dir_all(p)
                    .map_err(CheckpointError::io(format!("pruning {}", p.display())))?;
            }
        }
        Ok(())
    }

    /// The newest checkpoint, verified.
    pub fn latest(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        match self.list()?.last() {
            Some(p) => Ok(Some(load(p)?)),
            None => Ok(None),
        }
    }

    /// The newest checkpoint that verifies. One that fails its checksum (or cannot be
    /// read) is skipped with a warning and the one before it is tried; returns the
    /// checkpoint and the problems of the ones skipped.
    pub fn latest_verified(&self) -> Result<(Option<Checkpoint>, Vec<String>), CheckpointError> {
        let mut skipped = Vec::new();
        for p in self.list()?.iter().rev() {
            match load(p) {
                Ok(c) => return Ok((Some(c), skipped)),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "skipping a checkpoint that does not verify; trying the one before it");
                    skipped.push(e.to_string());
                }
            }
        }
        Ok((None, skipped))
    }
}

/// Reads and verifies a checkpoint directory.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let corrupt = |m: String| CheckpointError::Corrupt {
        path: path.display().to_string(),
        message: m,
    };
    let read = |n: &str| fs::read(path.join(n)).map_err(|e| corrupt(format!("{n}: {e}")));
    let (tensors, meta_bytes, sum) = (read(TENSORS)?, read(META)?, read(CHECKSUM)?);
    if String::from_utf8_lossy(&sum).trim() != checksum(&tensors, &meta_bytes) {
        return Err(corrupt(
            "checksum mismatch: the files were changed or truncated".into(),
        ));
    }
    // The version is read on its own first, so an older checkpoint gets a message that
    // says so rather than a missing-field error.
    #[derive(Deserialize)]
    struct Versioned {
        format: String,
        #[serde(default)]
        version: u32,
    }
    let v: Versioned =
        serde_json::from_slice(&meta_bytes).map_err(|e| corrupt(format!("{META}: {e}")))?;
    if !v.format.starts_with(FORMAT) || v.version != VERSION {
        return Err(corrupt(format!(
            "{META} is format {:?} version {}, this ringtrain reads {FORMAT:?} version {VERSION} (a checkpoint from another release cannot be resumed)",
            v.format, v.version
        )));
    }
    let meta: CheckpointMeta =
        serde_json::from_slice(&meta_bytes).map_err(|e| corrupt(format!("{META}: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&tensors)
        .map_err(|e| corrupt(format!("{TENSORS}: {e}")))?;
    let mut slots = Vec::new();
    for n in &meta.optimizer_slots {
        slots.push(read_group(&st, &meta.model, &format!("opt.{n}")).map_err(corrupt)?);
    }
    let has_best = meta
        .resume
        .early_stopping
        .as_ref()
        .is_some_and(|e| e.has_best_params);
    let best = if has_best {
        Some(read_group(&st, &meta.model, "best").map_err(corrupt)?)
    } else {
        None
    };
    let state = TrainingState {
        params: read_group(&st, &meta.model, "").map_err(corrupt)?,
        slots,
        best,
    };
    Ok(Checkpoint {
        path: path.to_path_buf(),
        meta,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, LayerSpec};

    fn meta(step: u64) -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT.into(),
            version: VERSION,
            job_id: "j-1".into(),
            generation: 1,
            step,
            epoch: 0,
            optimizer_t: step,
            optimizer_slots: vec!["m".into(), "v".into()],
            spec_hash: "abc".into(),
            param_hash: 0,
            final_: false,
            model: ModelSpec {
                input: 3,
                layers: vec![LayerSpec::dense(2, Activation::Softmax)],
            },
            resume: ResumeState {
                epoch: 1,
                epoch_cursor: 96,
                rng_seed: 11,
                schedule_step: step,
                early_stopping: Some(EarlyStoppingState {
                    best: 0.25,
                    since_best: 1,
                    has_best_params: true,
                }),
                privacy_ledger: None,
                epoch_sums: Some(vec![1.5, 32.0]),
                penalty_sum: 0.0,
            },
        }
    }

    fn state(seed: f32) -> TrainingState {
        let n = 8;
        TrainingState {
            params: (0..n).map(|i| i as f32 * seed).collect(),
            slots: vec![vec![seed; n], vec![seed * 2.0; n]],
            best: Some(vec![seed * 3.0; n]),
        }
    }

    #[test]
    fn round_trips_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("ck"), 2);
        for step in [1, 2, 3] {
            store.write(&meta(step), &state(step as f32)).unwrap();
        }
        let names: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["step-0000000002", "step-0000000003"]);
        let latest = store.latest().unwrap().unwrap();
        assert_eq!(latest.meta, meta(3));
        assert_eq!(latest.state, state(3.0));
    }

    #[test]
    fn a_flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().to_path_buf(), 3);
        let p = store.write(&meta(5), &state(1.0)).unwrap();
        let mut bytes = fs::read(p.join(TENSORS)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(p.join(TENSORS), bytes).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn a_checkpoint_of_another_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().to_path_buf(), 3);
        let p = store.write(&meta(5), &state(1.0)).unwrap();
        // Rewrite it as a version-1 checkpoint (no version field), with a valid checksum.
        let tensors = fs::read(p.join(TENSORS)).unwrap();
        let text = fs::read_to_string(p.join(META)).unwrap();
        let old = text.replace("\"version\": 2,", "");
        fs::write(p.join(META), &old).unwrap();
        fs::write(p.join(CHECKSUM), checksum(&tensors, old.as_bytes())).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("version 0") && e.contains("version 2"), "{e}");
    }
}
