//! The ledger of training segments: the accountant's only input about the run.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::PrivacyError;

/// Which accountant computes `ε`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountantKind {
    /// Rényi DP with the Balle et al. (2020) conversion: fast, always an upper
    /// bound, typically 5-15% above the tight value for DP-SGD.
    Rdp,
    /// Privacy loss distribution composed with an FFT: tight up to a stated,
    /// one-sided error (the reported `ε` is never below the exact one).
    Pld,
}

impl AccountantKind {
    /// The lowercase name, as accepted by [`FromStr`] and used by serde.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountantKind::Rdp => "rdp",
            AccountantKind::Pld => "pld",
        }
    }
}

impl fmt::Display for AccountantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AccountantKind {
    type Err = PrivacyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rdp" => Ok(AccountantKind::Rdp),
            "pld" => Ok(AccountantKind::Pld),
            _ => Err(PrivacyError::UnknownAccountant(s.to_string())),
        }
    }
}

/// A run of `steps` consecutive DP-SGD steps with the same noise multiplier
/// and Poisson sampling rate.
///
/// Each step includes every example independently with probability
/// `sample_rate`, sums the per-example gradients clipped to L2 norm `C`, and
/// adds `N(0, (noise_multiplier * C)^2)` noise per coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// `σ`: noise standard deviation divided by the clipping norm; `> 0`.
    pub noise_multiplier: f64,
    /// `q`: Poisson inclusion probability per example and step; in `(0, 1]`.
    pub sample_rate: f64,
    /// Number of steps; `>= 1`.
    pub steps: u64,
}

impl Segment {
    /// A validated segment.
    pub fn new(noise_multiplier: f64, sample_rate: f64, steps: u64) -> Result<Self, PrivacyError> {
        let s = Segment {
            noise_multiplier,
            sample_rate,
            steps,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks the ranges: `σ` finite and `> 0`, `q` in `(0, 1]`, `steps >= 1`.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        validate_noise(self.noise_multiplier)?;
        validate_sample_rate(self.sample_rate)?;
        if self.steps == 0 {
            return Err(PrivacyError::ZeroSteps);
        }
        Ok(())
    }
}

pub(crate) fn validate_noise(sigma: f64) -> Result<(), PrivacyError> {
    // Written so that NaN fails.
    if sigma.is_finite() && sigma > 0.0 {
        Ok(())
    } else {
        Err(PrivacyError::NoiseMultiplier(sigma))
    }
}

pub(crate) fn validate_sample_rate(q: f64) -> Result<(), PrivacyError> {
    if q > 0.0 && q <= 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::SampleRate(q))
    }
}

pub(crate) fn validate_delta(delta: f64) -> Result<(), PrivacyError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::Delta(delta))
    }
}

/// Everything a job has released so far, as a list of segments.
///
/// Serialize it into checkpoints (JSON via serde) and keep pushing after a
/// resume; the accountant treats the list as one adaptive composition, so the
/// order of segments does not change `ε`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// The segments in the order they ran.
    pub segments: Vec<Segment>,
}

impl Ledger {
    /// An empty ledger (nothing released, `ε = 0`).
    pub fn new() -> Self {
        Ledger::default()
    }

    /// A ledger with one segment.
    pub fn single(
        noise_multiplier: f64,
        sample_rate: f64,
        steps: u64,
    ) -> Result<Self, PrivacyError> {
        let mut l = Ledger::new();
        l.push(Segment::new(noise_multiplier, sample_rate, steps)?)?;
        Ok(l)
    }

    /// Appends a segment after validating it, merging it into the last one when
    /// `σ` and `q` are bitwise equal (so per-step pushes stay compact).
    pub fn push(&mut self, segment: Segment) -> Result<(), PrivacyError> {
        segment.validate()?;
        if let Some(last) = self.segments.last_mut() {
            if last.noise_multiplier.to_bits() == segment.noise_multiplier.to_bits()
                && last.sample_rate.to_bits() == segment.sample_rate.to_bits()
            {
                // On (absurd) overflow keep a separate segment rather than lose steps.
                if let Some(total) = last.steps.checked_add(segment.steps) {
                    last.steps = total;
                    return Ok(());
                }
            }
        }
        self.segments.push(segment);
        Ok(())
    }

    /// Total number of steps over all segments (saturating).
    pub fn total_steps(&self) -> u64 {
        self.segments
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.steps))
    }

    /// Validates every segment; a ledger read back from JSON may hold anything.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        self.segments.iter().try_for_each(Segment::validate)
    }
}
