//! A job's datasets: loaded once at submit, checked against the model, normalized with
//! statistics of the training split, and held for the job's lifetime.

use crate::dataset::Dataset;
use crate::error::CoordinatorError;
use crate::job_file::JobFile;
use ringtrain_core::saved_model::Normalization;
use ringtrain_core::SpecError;

/// A job's datasets, held for its lifetime.
#[derive(Debug)]
pub struct JobData {
    pub(super) train: Dataset,
    pub(super) validation: Dataset,
    pub(super) test: Option<Dataset>,
    pub(super) normalization: Normalization,
}

impl JobData {
    /// No data: a finished job restored from the store only shows its status.
    pub(super) fn empty() -> Self {
        JobData {
            train: Dataset::default(),
            validation: Dataset::default(),
            test: None,
            normalization: Normalization::fit(Default::default(), &[], 0),
        }
    }
}

/// Loads a job's datasets, checks them against the model and normalizes them with
/// statistics of the training split.
pub(super) fn load_data(file: &JobFile, source: &str) -> Result<JobData, CoordinatorError> {
    let spec_err = |field: &str, message: String| SpecError {
        file: source.to_string(),
        field: field.to_string(),
        message,
    };
    let loss = file.train.loss;
    let classes = loss.metric_classes(file.model.outputs());
    let check = |d: &Dataset, field: &str| -> Result<(), CoordinatorError> {
        if d.features != file.model.input {
            return Err(spec_err(
                "model.input",
                format!(
                    "{} does not match the {} features per sample of {field} (set model.input = {})",
                    file.model.input, d.features, d.features
                ),
            )
            .into());
        }
        if loss.is_classification() {
            d.check_classes(classes, field)?;
        }
        Ok(())
    };
    let full = Dataset::load(&file.data.train, file.seed, 0)?;
    check(&full, "data.train")?;
    let (mut train, mut validation) = if file.data.validation_split > 0.0 {
        full.split_tail(file.data.validation_split)
    } else {
        (full, Dataset::default())
    };
    if train.rows() == 0 {
        return Err(spec_err("data.validation_split", "leaves no training samples".into()).into());
    }
    if let Some(src) = &file.data.validation {
        validation = Dataset::load(src, file.seed, 2)?;
        check(&validation, "data.validation")?;
    }
    let mut test = match &file.data.test {
        Some(src) => {
            let t = Dataset::load(src, file.seed, 1)?;
            check(&t, "data.test")?;
            Some(t)
        }
        None => None,
    };
    let normalization = Normalization::fit(file.data.normalize, &train.x, train.features);
    let d = train.features;
    normalization.apply(&mut train.x, d);
    normalization.apply(&mut validation.x, d);
    if let Some(t) = test.as_mut() {
        normalization.apply(&mut t.x, d);
    }
    Ok(JobData {
        train,
        validation,
        test,
        normalization,
    })
}
