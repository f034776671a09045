//! The coordinator's side of DP-SGD: planning a job's privacy at submit (σ calibrated,
//! the budget of `max_epsilon`), the ledger in every checkpoint, and `ε` in every report.
//!
//! The accountant is pure code in `ringtrain_core::privacy`; here it is only called, and
//! always off the state lock (a PLD evaluation takes milliseconds to a second).

use ringtrain_core::privacy::{PrivacyReport, PrivacyRun, RunShape, Spent};
use ringtrain_proto::v1::PrivacyStatus;

use crate::error::CoordinatorError;
use crate::job_file::JobFile;
use ringtrain_core::SpecError;

/// Plans the privacy of a job with `train_samples` examples that has spent `spent`
/// (see [`PrivacyRun::plan`]); `None` when the job does not train privately. Errors
/// name the job file's `privacy.` key.
pub(super) fn plan(
    file: &JobFile,
    source: &str,
    train_samples: usize,
    spent: Spent,
) -> Result<Option<PrivacyRun>, CoordinatorError> {
    let Some(section) = &file.privacy else {
        return Ok(None);
    };
    let shape = RunShape {
        train_samples,
        batch_size: file.batch_size,
        epochs: file.epochs,
    };
    PrivacyRun::plan(section, shape, spent).map_err(|e| {
        SpecError {
            file: source.to_string(),
            field: if e.key.is_empty() {
                "privacy".into()
            } else {
                format!("privacy.{}", e.key)
            },
            message: e.message,
        }
        .into()
    })
}

/// What was spent before a resume: the checkpoint's ledger and step. A checkpoint of a
/// DP job without a ledger (written before DP-SGD existed, or by a non-DP job) is
/// refused rather than counted as nothing spent.
pub(super) fn spent_at(
    file: &JobFile,
    ledger: Option<&ringtrain_core::privacy::Ledger>,
    step: u64,
    shown: &str,
) -> Result<Spent, CoordinatorError> {
    let dp = file.privacy.as_ref().is_some_and(|p| p.dp_enabled());
    match ledger {
        Some(l) => Ok(Spent {
            ledger: l.clone(),
            step,
        }),
        None if dp && step > 0 => Err(CoordinatorError::Precondition(format!(
            "the checkpoint {shown} records no privacy ledger, so what its {step} steps spent \
             is unknown; a DP job cannot resume from it (start a new run)"
        ))),
        None => Ok(Spent::default()),
    }
}

/// The status message of a report.
pub(super) fn status(r: &PrivacyReport, budget_steps: Option<u64>, stopped: bool) -> PrivacyStatus {
    PrivacyStatus {
        epsilon: r.epsilon,
        delta: r.delta,
        noise_multiplier: r.noise_multiplier,
        sample_rate: r.sample_rate,
        steps: r.steps,
        accountant: r.accountant.as_str().into(),
        max_grad_norm: r.max_grad_norm,
        max_epsilon: r.max_epsilon.unwrap_or(0.0),
        budget_steps: budget_steps.unwrap_or(0),
        stopped_at_max_epsilon: stopped,
    }
}

/// The report after `step` steps, computed on a blocking thread.
pub(super) async fn report_at(
    run: PrivacyRun,
    step: u64,
) -> Result<PrivacyReport, CoordinatorError> {
    tokio::task::spawn_blocking(move || run.report(step))
        .await
        .map_err(|e| CoordinatorError::Transport(e.to_string()))?
        .map_err(|e| CoordinatorError::Precondition(format!("privacy accounting: {e}")))
}

/// Refuses a resume that cannot train within `max_epsilon`: one whose checkpoint already
/// spent the budget, or one that raised `epochs` past what the budget allows (a raised
/// `epochs` keeps spending from the same ledger; it never starts a new one).
pub(super) fn check_resume(
    run: &PrivacyRun,
    file: &JobFile,
    source: &str,
    saved_epochs: u32,
    checkpoint_step: u64,
) -> Result<(), CoordinatorError> {
    let (Some(budget), Some(max)) = (run.plan.budget_steps, run.max_epsilon) else {
        return Ok(());
    };
    let err = |message: String| -> CoordinatorError {
        SpecError {
            file: source.to_string(),
            field: "privacy.max_epsilon".into(),
            message,
        }
        .into()
    };
    if budget <= checkpoint_step {
        return Err(err(format!(
            "the run has spent its budget: {checkpoint_step} steps reach epsilon {:.4}, and \
             one more would pass max_epsilon {max} (the trained model is in the run directory; \
             nothing more can be trained privately)",
            run.epsilon_at(checkpoint_step).unwrap_or(f64::NAN)
        )));
    }
    if file.epochs > saved_epochs {
        let planned = run.shape.total_steps();
        return Err(err(format!(
            "raising epochs from {saved_epochs} to {} would take the run to {planned} steps, \
             but max_epsilon {max} allows {budget} (epsilon after {planned} steps would be \
             {:.4}); keep epochs at {saved_epochs}, or raise max_epsilon",
            file.epochs,
            run.epsilon_at(planned).unwrap_or(f64::NAN)
        )));
    }
    Ok(())
}
