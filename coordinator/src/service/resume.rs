//! Continuing a run (`--resume RUN_DIR`): the job file saved in a run directory at
//! submit, the plan to continue from its newest checkpoint that verifies, and the metrics
//! history up to that checkpoint.
//!
//! A run directory holds, besides its checkpoints and outputs, `job.toml` (the submitted
//! job file's text, byte for byte) and `job.json` ([`SavedSubmit`]: where it came from,
//! the directory its relative dataset paths resolve against, the overrides). A resume
//! reads both, so it needs no job file of its own; given one, only `epochs` may differ,
//! and only upwards.
//!
//! Everything here is blocking file I/O: callers run it on a blocking thread.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ringtrain_proto::v1::{EpochSummary, SubmitRequest};
use tracing::warn;

use ringtrain_core::data_path::{DataBinding, DataRoots};

use crate::checkpoint::CheckpointStore;
use crate::error::CoordinatorError;
use crate::job_file::{
    check_resume, first_difference, JobFile, SavedSubmit, Workers, SAVED_JOB_FILE,
    SAVED_SUBMIT_FILE,
};
use crate::SpecError;

/// The run's per-epoch metrics, one JSON object a line (see `outputs::append_metrics`).
const METRICS_FILE: &str = "metrics.jsonl";
/// The checkpoint store's directory inside a run directory.
const CHECKPOINTS_DIR: &str = "checkpoints";
/// Prefix a checkpoint newer than the resumed one is renamed with: out of the store's
/// listing (which takes only `step-*`), kept for inspection.
const SET_ASIDE_PREFIX: &str = "unverified-";

/// What a resume continues from, all read and checked before anything starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResumePlan {
    /// The job file's text the resumed job runs with: the one given with the resume, or
    /// else the one saved in the run directory.
    pub spec_toml: String,
    /// Where that text came from, for messages.
    pub source: String,
    /// The directory its relative dataset paths resolve against.
    pub base_dir: String,
    /// The `workers` override (0: the job file's).
    pub workers: u32,
    /// The step limit (0: none).
    pub max_steps: u64,
    /// Dataset fields bound to uploaded files: the resume's own when it came with a job
    /// file, else the run's.
    pub uploaded: Vec<DataBinding>,
    /// The run directory, written on into.
    pub run_dir: PathBuf,
    /// The checkpoint resumed from.
    pub checkpoint_path: PathBuf,
    /// Its optimizer step.
    pub checkpoint_step: u64,
    /// The generation that wrote it.
    pub checkpoint_generation: u64,
    /// Epochs it had completed.
    pub checkpoint_epochs: u32,
    /// Why each newer checkpoint was skipped (newest first).
    pub skipped: Vec<String>,
    /// The epoch summaries up to the checkpoint, from `metrics.jsonl`.
    pub history: Vec<EpochSummary>,
    /// What the run has spent of its privacy up to the checkpoint (DP jobs).
    pub spent: ringtrain_core::privacy::Spent,
    /// The run's `epochs` before this resume (the saved job file's).
    pub saved_epochs: u32,
}

/// Writes `bytes` to a temporary name in `dir`, syncs it and renames it over `name`: a
/// reader sees the old file or the new one, never half of one.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CoordinatorError> {
    let dest = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, &dest));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(CoordinatorError::io(format!("writing {}", dest.display())))
}

fn write_saved(
    run_dir: &Path,
    spec_toml: &str,
    saved: &SavedSubmit,
) -> Result<(), CoordinatorError> {
    fs::create_dir_all(run_dir).map_err(CoordinatorError::io(format!(
        "creating {}",
        run_dir.display()
    )))?;
    let json = serde_json::to_vec_pretty(saved)
        .map_err(|e| CoordinatorError::Serialize(format!("{SAVED_SUBMIT_FILE}: {e}")))?;
    // job.json first: a directory with job.toml always has the job.json that goes with
    // it (a crash in between leaves a job.json alone, which a resume reports).
    write_atomic(run_dir, SAVED_SUBMIT_FILE, &json)?;
    write_atomic(run_dir, SAVED_JOB_FILE, spec_toml.as_bytes())
}

/// Saves a newly submitted job's file into its run directory (`job.toml`, its text byte
/// for byte, and `job.json`, with the fields bound to uploads), so `--resume` can read it
/// again. Refuses a directory that
/// already holds a run's job file: that run is continued with `--resume`, never
/// overwritten (a resume that changed the job file uses [`save_resumed_job_file`]).
pub(crate) fn save_job_file(
    run_dir: &Path,
    spec_toml: &str,
    source: &str,
    base_dir: &str,
    workers: u32,
    max_steps: u64,
    uploaded: &[DataBinding],
) -> Result<(), CoordinatorError> {
    // Run directories are named per job, so this guards against a user's `--out` naming
    // an earlier run, not against a race between two submits.
    if run_dir.join(SAVED_JOB_FILE).exists() {
        return Err(CoordinatorError::Precondition(format!(
            "{} already holds a run (it has {SAVED_JOB_FILE}); continue it with --resume {}, \
             or choose another --out",
            run_dir.display(),
            run_dir.display()
        )));
    }
    write_saved(
        run_dir,
        spec_toml,
        &SavedSubmit {
            source: source.to_string(),
            base_dir: base_dir.to_string(),
            workers,
            max_steps,
            uploaded: uploaded.to_vec(),
        },
    )
}

/// Replaces the run directory's saved job file with the one a resume runs with, when it
/// differs (only in `epochs`, as [`plan_resume`] checked, or in where its uploaded data
/// came from), so a later `--resume` without a job file trains to the new epoch count.
/// Nothing is written when the resume used the saved job file.
pub(crate) fn save_resumed_job_file(plan: &ResumePlan) -> Result<(), CoordinatorError> {
    let (saved, saved_submit) = read_saved(&plan.run_dir)?;
    if saved == plan.spec_toml && saved_submit.uploaded == plan.uploaded {
        return Ok(());
    }
    write_saved(
        &plan.run_dir,
        &plan.spec_toml,
        &SavedSubmit {
            source: plan.source.clone(),
            base_dir: plan.base_dir.clone(),
            workers: plan.workers,
            max_steps: plan.max_steps,
            uploaded: plan.uploaded.clone(),
        },
    )
}

/// Reads `job.toml` and `job.json` of a run directory.
fn read_saved(run_dir: &Path) -> Result<(String, SavedSubmit), CoordinatorError> {
    let shown = run_dir.display();
    if !run_dir.is_dir() {
        return Err(CoordinatorError::BadRequest(format!(
            "{shown}: no such directory (--resume takes the run directory of an earlier job, \
             such as runs/<name>-<job id>)"
        )));
    }
    let toml_path = run_dir.join(SAVED_JOB_FILE);
    let text = match fs::read_to_string(&toml_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let looks_like_a_run =
                run_dir.join(METRICS_FILE).exists() || run_dir.join(CHECKPOINTS_DIR).is_dir();
            return Err(CoordinatorError::Precondition(if looks_like_a_run {
                format!(
                    "{shown} has no {SAVED_JOB_FILE}: the run was started by a ringtrain that \
                     did not save its job file, so it cannot be resumed (start a new run)"
                )
            } else {
                format!(
                    "{shown} has no {SAVED_JOB_FILE}: is it a ringtrain run directory (it holds \
                     metrics.jsonl, checkpoints/)?"
                )
            }));
        }
        Err(e) => {
            return Err(CoordinatorError::io(format!(
                "reading {}",
                toml_path.display()
            ))(e))
        }
    };
    let json_path = run_dir.join(SAVED_SUBMIT_FILE);
    let json = match fs::read(&json_path) {
        Ok(j) => j,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CoordinatorError::Precondition(format!(
                "{shown} has {SAVED_JOB_FILE} but no {SAVED_SUBMIT_FILE} (written beside it at \
                 submit, it says where the job's dataset paths resolve); restore it, or start a \
                 new run"
            )))
        }
        Err(e) => {
            return Err(CoordinatorError::io(format!(
                "reading {}",
                json_path.display()
            ))(e))
        }
    };
    let saved: SavedSubmit = serde_json::from_slice(&json).map_err(|e| CoordinatorError::Data {
        path: json_path.display().to_string(),
        message: format!("not a saved submit: {e}"),
    })?;
    Ok((text, saved))
}

/// Works out how to continue the run in `req.resume_dir`: the job file (the one in `req`,
/// checked against the saved one, or the saved one), the newest checkpoint that verifies
/// (newer ones that do not are skipped, each with its reason), and the metrics history up
/// to it. Reads and writes nothing else; [`begin_resume`] prepares the directory once
/// the resume is accepted. `data_dir` is the coordinator's, which `coordinator:` paths
/// and uploaded files resolve against.
pub(crate) fn plan_resume(
    req: &SubmitRequest,
    max_model_bytes: u64,
    data_dir: &Path,
) -> Result<ResumePlan, CoordinatorError> {
    if req.resume_dir.is_empty() {
        return Err(CoordinatorError::BadRequest(
            "resume_dir is empty: name the run directory to continue".into(),
        ));
    }
    let run_dir = PathBuf::from(&req.resume_dir);
    let shown = run_dir.display().to_string();
    let (saved_text, saved) = read_saved(&run_dir)?;
    let saved_source = run_dir.join(SAVED_JOB_FILE).display().to_string();
    let mut saved_file = JobFile::parse(&saved_text, &saved_source)?;
    saved_file.bind_uploads(&saved.uploaded, &saved_source)?;
    let saved_epochs = saved_file.epochs;
    let (spec_toml, source, base_dir, uploaded, mut file) = if req.spec_toml.is_empty() {
        (
            saved_text,
            saved_source,
            saved.base_dir.clone(),
            saved.uploaded.clone(),
            saved_file,
        )
    } else {
        let source = if req.source.is_empty() {
            "job".to_string()
        } else {
            req.source.clone()
        };
        let base_dir = if req.base_dir.is_empty() {
            ".".to_string()
        } else {
            req.base_dir.clone()
        };
        let uploaded = super::uploads::bindings(&req.uploaded);
        let mut new = JobFile::parse(&req.spec_toml, &source)?;
        new.bind_uploads(&uploaded, &source)?;
        // Compared with dataset paths resolved and uploads bound, so the same files named
        // from another directory, or the same bytes uploaded from another host, are still
        // the same job.
        let was = DataRoots {
            base: Path::new(&saved.base_dir),
            coordinator: Some(data_dir),
        };
        let now = DataRoots {
            base: Path::new(&base_dir),
            ..was
        };
        check_resume(
            &saved_file.resolved(&was),
            &new.clone().resolved(&now),
            &source,
            &shown,
        )?;
        (req.spec_toml.clone(), source, base_dir, uploaded, new)
    };
    // A `--workers` given with the resume wins over the one the run was submitted with;
    // checkpoints hold the global position in the epoch, so the count may change.
    let workers = if req.workers > 0 {
        req.workers
    } else {
        saved.workers
    };
    if workers > 0 {
        file.workers = Workers::Exactly(workers);
    }
    let max_steps = if req.max_steps > 0 {
        req.max_steps
    } else {
        saved.max_steps
    };
    file.validate(
        &source,
        &DataRoots {
            base: Path::new(&base_dir),
            coordinator: Some(data_dir),
        },
    )?;
    file.check_fits(&source, max_model_bytes)?;

    let store = CheckpointStore::new(run_dir.join(CHECKPOINTS_DIR), file.checkpoint.keep);
    let (checkpoint, skipped) = store.latest_verified()?;
    let Some(checkpoint) = checkpoint else {
        let why = if skipped.is_empty() {
            format!("{CHECKPOINTS_DIR}/ holds none")
        } else {
            format!("{} skipped: {}", skipped.len(), skipped.join("; "))
        };
        return Err(CoordinatorError::Precondition(format!(
            "{shown} has no checkpoint that verifies ({why}); nothing to resume from (start a \
             new run with the job file instead)"
        )));
    };
    let meta = &checkpoint.meta;
    let ck_shown = checkpoint.path.display();
    if let Some(d) =
        first_difference("model", &meta.model, &file.model).map_err(CoordinatorError::Serialize)?
    {
        return Err(SpecError {
            file: source,
            field: d.field,
            message: format!(
                "the checkpoint {ck_shown} holds a model with {}, this job file says {}; resume \
                 with the job file the run was trained with",
                d.was, d.now
            ),
        }
        .into());
    }
    if meta.epoch >= file.epochs {
        return Err(SpecError {
            file: source,
            field: "epochs".into(),
            message: format!(
                "the run in {shown} has already trained {} epochs (checkpoint {ck_shown}), as \
                 many as this job file asks for; to train longer, resume with a job file whose \
                 epochs is larger",
                meta.epoch
            ),
        }
        .into());
    }
    let spent = super::privacy::spent_at(
        &file,
        meta.resume.privacy_ledger.as_ref(),
        meta.step,
        &ck_shown.to_string(),
    )?;
    let history = read_metrics(&run_dir)?
        .into_iter()
        .filter(|l| l.summary.epoch <= meta.epoch)
        .map(|l| l.summary)
        .collect();
    Ok(ResumePlan {
        spec_toml,
        source,
        base_dir,
        workers,
        max_steps,
        uploaded,
        checkpoint_path: checkpoint.path.clone(),
        checkpoint_step: meta.step,
        checkpoint_generation: meta.generation,
        checkpoint_epochs: meta.epoch,
        run_dir,
        skipped,
        history,
        spent,
        saved_epochs,
    })
}

/// Prepares the run directory once a resume is accepted, before training starts: the
/// metrics history is cut back to the checkpoint's epochs ([`trim_metrics`]), checkpoints
/// newer than the resumed one (those that failed to verify) are set aside so the store
/// neither lists them nor prunes new checkpoints in their favour
/// ([`set_aside_newer_checkpoints`]), and a grown `epochs` is saved
/// ([`save_resumed_job_file`]).
pub(crate) fn begin_resume(plan: &ResumePlan) -> Result<(), CoordinatorError> {
    trim_metrics(&plan.run_dir, plan.checkpoint_epochs)?;
    set_aside_newer_checkpoints(&plan.run_dir, &plan.checkpoint_path)?;
    save_resumed_job_file(plan)
}

/// Renames every checkpoint directory that sorts after `resumed` (the store names them
/// by step, so these are the newer ones, which did not verify) to `unverified-<name>`.
/// Left in place they would stay the "newest" and the store's pruning would delete the
/// resumed run's new checkpoints first.
pub(crate) fn set_aside_newer_checkpoints(
    run_dir: &Path,
    resumed: &Path,
) -> Result<(), CoordinatorError> {
    let store = CheckpointStore::new(run_dir.join(CHECKPOINTS_DIR), 1);
    let Some(resumed_name) = resumed.file_name() else {
        return Ok(());
    };
    for p in store.list()? {
        let Some(name) = p.file_name() else { continue };
        if name <= resumed_name {
            continue;
        }
        let aside = p.with_file_name(format!("{SET_ASIDE_PREFIX}{}", name.to_string_lossy()));
        // An earlier resume may have set aside a checkpoint of the same name.
        let _ = fs::remove_dir_all(&aside);
        fs::rename(&p, &aside).map_err(CoordinatorError::io(format!(
            "setting aside {} (it does not verify)",
            p.display()
        )))?;
        warn!(path = %p.display(), to = %aside.display(), "checkpoint newer than the resumed one set aside");
    }
    Ok(())
}

/// One line of `metrics.jsonl`, read back.
#[derive(Debug)]
struct MetricsLine {
    raw: String,
    summary: EpochSummary,
}

/// An `append_metrics` line back into its summary: `epoch`, `samples_per_sec`,
/// `seconds`, and every other key a metric (null where the value was not finite).
fn parse_metrics_line(line: &str) -> Result<EpochSummary, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(map) = value else {
        return Err("not a JSON object".into());
    };
    let epoch = map
        .get("epoch")
        .and_then(|v| v.as_u64())
        .and_then(|e| u32::try_from(e).ok())
        .ok_or("no epoch number")?;
    let number = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mut s = EpochSummary {
        epoch,
        ..EpochSummary::default()
    };
    for (k, v) in &map {
        match k.as_str() {
            "epoch" => {}
            "samples_per_sec" => s.samples_per_sec = number(v),
            "seconds" => s.seconds = number(v),
            _ => {
                s.metrics.insert(k.clone(), number(v));
            }
        }
    }
    // The same fields the worker fills in its summary.
    s.loss = s.metrics.get("loss").copied().unwrap_or(0.0);
    s.accuracy = s.metrics.get("accuracy").copied().unwrap_or(0.0);
    s.val_loss = s.metrics.get("val_loss").copied();
    s.val_accuracy = s.metrics.get("val_accuracy").copied();
    Ok(s)
}

/// The run's `metrics.jsonl` (none yet: empty). A line that does not parse (one cut
/// short by a crash mid-append) is dropped with a warning.
fn read_metrics(run_dir: &Path) -> Result<Vec<MetricsLine>, CoordinatorError> {
    let path = run_dir.join(METRICS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(CoordinatorError::io(format!("reading {}", path.display()))(
                e,
            ))
        }
    };
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        match parse_metrics_line(raw) {
            Ok(summary) => out.push(MetricsLine {
                raw: raw.to_string(),
                summary,
            }),
            Err(e) => {
                warn!(file = %path.display(), line = i + 1, error = %e, "dropping a metrics line that does not parse")
            }
        }
    }
    Ok(out)
}

/// Cuts `metrics.jsonl` back to the epochs up to `epochs` (the resumed checkpoint's),
/// so the resumed run appends the next epoch right after them. Lines kept are kept byte
/// for byte; the file is replaced atomically, and left alone when nothing is cut.
pub(crate) fn trim_metrics(run_dir: &Path, epochs: u32) -> Result<(), CoordinatorError> {
    let path = run_dir.join(METRICS_FILE);
    let before = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(CoordinatorError::io(format!("reading {}", path.display()))(
                e,
            ))
        }
    };
    let mut after = String::new();
    for l in read_metrics(run_dir)? {
        if l.summary.epoch <= epochs {
            after.push_str(&l.raw);
            after.push('\n');
        }
    }
    if after == before {
        return Ok(());
    }
    write_atomic(run_dir, METRICS_FILE, after.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointMeta, ResumeState, TrainingState, FORMAT, VERSION};

    /// The crate's tiny job with `epochs` epochs and a checkpoint every 4 steps.
    fn job_text(epochs: u32) -> String {
        format!(
            "{}[checkpoint]\nevery_steps = 4\nkeep = 5\n",
            crate::test_jobs::tiny(2, epochs)
        )
    }

    /// A run directory as a submit leaves it, with checkpoints at `steps` (8 steps an
    /// epoch) and a metrics line for each of `epochs_done` epochs.
    fn run_dir(steps: &[u64], epochs_done: u32) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("runs").join("t-j-1");
        let base = tmp.path().display().to_string();
        save_job_file(&run, &job_text(3), "jobs/t.toml", &base, 0, 0, &[]).unwrap();
        let file = JobFile::parse(&job_text(3), "t.toml").unwrap();
        let store = CheckpointStore::new(run.join(CHECKPOINTS_DIR), file.checkpoint.keep);
        for &step in steps {
            store
                .write(&meta(&file, step), &state(&file, step as f32))
                .unwrap();
        }
        for epoch in 1..=epochs_done {
            let mut s = EpochSummary {
                epoch,
                loss: 1.0 / epoch as f64,
                accuracy: 0.5,
                samples_per_sec: 100.0,
                seconds: 0.5,
                ..EpochSummary::default()
            };
            s.metrics.insert("loss".into(), s.loss);
            s.metrics.insert("accuracy".into(), s.accuracy);
            super::super::outputs::append_metrics(&run, &s);
        }
        (tmp, run)
    }

    fn meta(file: &JobFile, step: u64) -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT.into(),
            version: VERSION,
            job_id: "j-1".into(),
            generation: step / 4,
            step,
            epoch: (step / 8) as u32,
            optimizer_t: step,
            optimizer_slots: file
                .train
                .optimizer
                .slot_names()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            spec_hash: "h".into(),
            param_hash: 0,
            final_: false,
            model: file.model.clone(),
            resume: ResumeState {
                epoch: (step / 8) as u32,
                epoch_cursor: (step % 8) * 8,
                rng_seed: file.seed,
                schedule_step: step,
                ..ResumeState::default()
            },
        }
    }

    fn state(file: &JobFile, seed: f32) -> TrainingState {
        let n = file.model.num_params();
        TrainingState {
            params: vec![seed; n],
            slots: vec![vec![seed; n]; file.train.optimizer.slot_names().len()],
            best: None,
        }
    }

    fn request(run: &Path, spec_toml: &str) -> SubmitRequest {
        SubmitRequest {
            spec_toml: spec_toml.to_string(),
            source: "new.toml".into(),
            base_dir: run.display().to_string(),
            resume_dir: run.display().to_string(),
            ..SubmitRequest::default()
        }
    }

    fn flip_last_byte(path: &Path) {
        let mut bytes = fs::read(path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(path, bytes).unwrap();
    }

    const BIG: u64 = 1 << 30;

    #[test]
    fn resumes_from_the_newest_checkpoint_with_the_saved_job_file() {
        let (_tmp, run) = run_dir(&[4, 12, 20], 2);
        let plan = plan_resume(&request(&run, ""), BIG, Path::new(".")).unwrap();
        assert_eq!(plan.spec_toml, job_text(3));
        assert_eq!(plan.source, run.join("job.toml").display().to_string());
        assert_eq!(
            (
                plan.checkpoint_step,
                plan.checkpoint_generation,
                plan.checkpoint_epochs
            ),
            (20, 5, 2)
        );
        assert_eq!(
            plan.checkpoint_path,
            run.join("checkpoints/step-0000000020")
        );
        assert!(plan.skipped.is_empty());
        let epochs: Vec<u32> = plan.history.iter().map(|h| h.epoch).collect();
        assert_eq!(epochs, [1, 2]);
        assert_eq!(plan.history[1].loss, 0.5);
        assert_eq!(plan.history[1].accuracy, 0.5);
        assert_eq!(plan.history[1].metrics["loss"], 0.5);
        assert_eq!(plan.history[1].seconds, 0.5);
        assert_eq!(plan.history[1].val_loss, None);
    }

    #[test]
    fn a_corrupt_newest_checkpoint_is_skipped_and_set_aside_and_the_history_trimmed() {
        // Epoch 2 finished (its metrics line is there) but its checkpoint is corrupt: the
        // resume goes back to step 12 (in epoch 2) and epoch 2 is trained again.
        let (_tmp, run) = run_dir(&[4, 12, 16], 2);
        flip_last_byte(&run.join("checkpoints/step-0000000016/state.safetensors"));
        let plan = plan_resume(&request(&run, ""), BIG, Path::new(".")).unwrap();
        assert_eq!((plan.checkpoint_step, plan.checkpoint_epochs), (12, 1));
        assert_eq!(plan.skipped.len(), 1);
        assert!(
            plan.skipped[0].contains("step-0000000016")
                && plan.skipped[0].contains("checksum mismatch"),
            "{:?}",
            plan.skipped
        );
        assert_eq!(plan.history.len(), 1);
        // Planning changed nothing on disk.
        let metrics = fs::read_to_string(run.join(METRICS_FILE)).unwrap();
        assert_eq!(metrics.lines().count(), 2);

        begin_resume(&plan).unwrap();
        let after = fs::read_to_string(run.join(METRICS_FILE)).unwrap();
        assert_eq!(after, format!("{}\n", metrics.lines().next().unwrap()));
        let store = CheckpointStore::new(run.join(CHECKPOINTS_DIR), 5);
        assert_eq!(
            store.list().unwrap(),
            [
                run.join("checkpoints/step-0000000004"),
                run.join("checkpoints/step-0000000012")
            ]
        );
        assert!(run.join("checkpoints/unverified-step-0000000016").is_dir());
        // The saved job file was used: nothing to save.
        assert_eq!(
            fs::read_to_string(run.join("job.toml")).unwrap(),
            job_text(3)
        );
    }

    #[test]
    fn a_job_file_with_more_epochs_is_used_and_saved() {
        let (_tmp, run) = run_dir(&[4, 8], 1);
        let plan = plan_resume(&request(&run, &job_text(5)), BIG, Path::new(".")).unwrap();
        assert_eq!(plan.spec_toml, job_text(5));
        assert_eq!(plan.source, "new.toml");
        begin_resume(&plan).unwrap();
        assert_eq!(
            fs::read_to_string(run.join("job.toml")).unwrap(),
            job_text(5)
        );
        let saved: SavedSubmit =
            serde_json::from_slice(&fs::read(run.join("job.json")).unwrap()).unwrap();
        assert_eq!(saved.source, "new.toml");
        // A second resume without a job file now runs to 5 epochs.
        let again = plan_resume(&request(&run, ""), BIG, Path::new(".")).unwrap();
        assert_eq!(again.spec_toml, job_text(5));
    }

    #[test]
    fn a_changed_job_file_is_refused_naming_the_field() {
        let (_tmp, run) = run_dir(&[4], 0);
        let changed = job_text(3).replace("dense = 2,", "dense = 3,");
        assert_ne!(changed, job_text(3));
        let e = plan_resume(&request(&run, &changed), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("new.toml: model.layers[0].dense: ")
                && e.contains("with 2, this job file says 3"),
            "{e}"
        );
        let fewer = job_text(2);
        let e = plan_resume(&request(&run, &fewer), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("new.toml: epochs: "), "{e}");
    }

    #[test]
    fn a_checkpoint_of_another_model_is_refused_naming_the_field() {
        let (_tmp, run) = run_dir(&[], 0);
        let file = JobFile::parse(&job_text(3), "t.toml").unwrap();
        let mut other = file.clone();
        other.model.layers[0].activation = ringtrain_core::model::Activation::Sigmoid;
        CheckpointStore::new(run.join(CHECKPOINTS_DIR), 5)
            .write(&meta(&other, 4), &state(&other, 1.0))
            .unwrap();
        let e = plan_resume(&request(&run, ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers[0].activation: the checkpoint")
                && e.contains("\"sigmoid\"")
                && e.contains("\"softmax\""),
            "{e}"
        );
    }

    #[test]
    fn a_run_without_a_checkpoint_that_verifies_says_so() {
        let (_tmp, run) = run_dir(&[], 0);
        let e = plan_resume(&request(&run, ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "has no checkpoint that verifies (checkpoints/ holds none); nothing to resume from"
            ),
            "{e}"
        );
        let (_tmp, run) = run_dir(&[4], 0);
        flip_last_byte(&run.join("checkpoints/step-0000000004/state.safetensors"));
        let e = plan_resume(&request(&run, ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no checkpoint that verifies (1 skipped: ")
                && e.contains("checksum mismatch"),
            "{e}"
        );
    }

    #[test]
    fn a_finished_run_is_not_resumed_without_more_epochs() {
        let (_tmp, run) = run_dir(&[24], 3);
        let e = plan_resume(&request(&run, ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already trained 3 epochs"), "{e}");
        plan_resume(&request(&run, &job_text(4)), BIG, Path::new(".")).unwrap();
    }

    #[test]
    fn a_directory_that_is_not_a_run_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let e = plan_resume(&request(tmp.path(), ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "has no job.toml: is it a ringtrain run directory (it holds metrics.jsonl, checkpoints/)?"
            ),
            "{e}"
        );
        fs::create_dir(tmp.path().join(CHECKPOINTS_DIR)).unwrap();
        let e = plan_resume(&request(tmp.path(), ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has no job.toml: the run was started by a ringtrain that did not save"),
            "{e}"
        );
        let (_run_tmp, run) = run_dir(&[4], 0);
        fs::remove_file(run.join(SAVED_SUBMIT_FILE)).unwrap();
        let e = plan_resume(&request(&run, ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has job.toml but no job.json"), "{e}");
        let e = plan_resume(&request(&tmp.path().join("nope"), ""), BIG, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope: no such directory"), "{e}");
    }

    #[test]
    fn a_new_run_never_overwrites_a_saved_job_file() {
        let (_tmp, run) = run_dir(&[], 0);
        let e = save_job_file(&run, &job_text(7), "other.toml", "/", 0, 0, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("already holds a run") && e.contains("--resume"),
            "{e}"
        );
        assert_eq!(
            fs::read_to_string(run.join("job.toml")).unwrap(),
            job_text(3)
        );
    }

    #[test]
    fn metrics_lines_cut_short_are_dropped_when_trimming() {
        let (_tmp, run) = run_dir(&[], 3);
        let path = run.join(METRICS_FILE);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, format!("{text}{{\"epoch\": 4, \"lo")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        trim_metrics(&run, 2).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n{}\n", lines[0], lines[1])
        );
        // Nothing to cut: the file is left as it is.
        trim_metrics(&run, 2).unwrap();
        trim_metrics(&run.join("missing"), 2).unwrap();
    }

    #[test]
    fn a_resume_reads_uploaded_data_from_the_store_and_compares_it_by_digest() {
        use sha2::{Digest, Sha256};
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let csv = "a,b,c,label\n1,2,3,0\n4,5,6,1\n";
        let sha: String = Sha256::digest(csv)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let objects = data_dir.join("datasets/sha256");
        fs::create_dir_all(&objects).unwrap();
        fs::write(objects.join(&sha), csv).unwrap();
        let synthetic =
            r#"train = { format = "synthetic", samples = 64, features = 3, classes = 2 }"#;
        let text = job_text(3).replace(
            synthetic,
            r#"train = { format = "csv", path = "laptop/d.csv" }"#,
        );
        assert_ne!(text, job_text(3));
        let bound = vec![DataBinding {
            field: "data.train.path".into(),
            sha256: sha.clone(),
        }];
        // Submitted from a host whose directory the coordinator never sees.
        let run = tmp.path().join("runs/t-j-1");
        save_job_file(&run, &text, "t.toml", "/nonexistent-laptop", 0, 0, &bound).unwrap();
        let file = JobFile::parse(&text, "t.toml").unwrap();
        CheckpointStore::new(run.join(CHECKPOINTS_DIR), 5)
            .write(&meta(&file, 8), &state(&file, 1.0))
            .unwrap();

        // Without a job file: the saved one, reading the stored copy.
        let plan = plan_resume(&request(&run, ""), BIG, &data_dir).unwrap();
        assert_eq!(
            (plan.uploaded.clone(), plan.spec_toml.clone()),
            (bound.clone(), text.clone())
        );
        // With the same bytes uploaded from elsewhere under another name: the same job.
        let elsewhere = text.replace("laptop/d.csv", "other/name.csv");
        let mut req = request(&run, &elsewhere);
        req.uploaded = super::super::uploads::to_proto(&bound);
        plan_resume(&req, BIG, &data_dir).unwrap();
        // Other bytes: refused, naming the field and both digests.
        let other = "0".repeat(64);
        fs::write(objects.join(&other), csv).unwrap();
        req.uploaded[0].sha256 = other.clone();
        let e = plan_resume(&req, BIG, &data_dir).unwrap_err().to_string();
        assert!(
            e.contains("data.train.path") && e.contains(&sha) && e.contains(&other),
            "{e}"
        );
        // The stored copy gone: the resume says what to do.
        fs::remove_file(objects.join(&sha)).unwrap();
        let e = plan_resume(&request(&run, ""), BIG, &data_dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train.path")
                && e.contains(&format!(
                    "uploaded file with sha256 {sha} is not in the coordinator's store"
                ))
                && e.contains("submit again"),
            "{e}"
        );
    }
}
