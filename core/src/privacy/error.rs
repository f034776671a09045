//! Typed errors for the privacy accountant.

/// Everything that can go wrong when accounting or calibrating.
///
/// Messages are lowercase, name the offending parameter and its valid range,
/// and say how to fix it where there is an obvious fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// The Poisson sampling rate `q` is NaN or outside `(0, 1]`.
    #[error("sample rate {0} is outside (0, 1]: pass --sample-rate as batch_size / dataset_size")]
    SampleRate(f64),
    /// The noise multiplier `σ` is NaN, infinite, or not positive.
    #[error(
        "noise multiplier {0} is outside (0, inf): pass --noise-multiplier as noise_std / clip_norm"
    )]
    NoiseMultiplier(f64),
    /// `δ` is NaN or outside `(0, 1)`.
    #[error("delta {0} is outside (0, 1): use a value well below 1 / dataset_size, e.g. 1e-5")]
    Delta(f64),
    /// A segment (or a calibration request) covers zero steps.
    #[error("steps is 0: a segment must cover at least one training step (valid range 1..)")]
    ZeroSteps,
    /// The calibration target `ε` is NaN, infinite, or not positive.
    #[error("target epsilon {0} is outside (0, inf)")]
    TargetEpsilon(f64),
    /// An accountant name that is neither `rdp` nor `pld`.
    #[error("unknown accountant {0:?}: expected \"rdp\" or \"pld\"")]
    UnknownAccountant(String),
    /// No noise multiplier in the search range meets the target.
    #[error(
        "no noise multiplier up to {max_noise} reaches target epsilon {target} (best epsilon {best}): raise the target or delta, or lower the sample rate or steps"
    )]
    Unreachable {
        /// The requested `ε`.
        target: f64,
        /// The largest noise multiplier tried.
        max_noise: f64,
        /// The `ε` achieved at `max_noise`.
        best: f64,
    },
}
