//! Differential-privacy accountant for DP-SGD with the Poisson-subsampled
//! Gaussian mechanism under add/remove-one adjacency.
//!
//! A training run is described by a [`Ledger`] of [`Segment`]s (noise
//! multiplier `σ`, sampling rate `q`, number of steps). [`epsilon`] turns a
//! ledger and a `δ` into an `ε` such that the sequence of all released noisy
//! gradient sums (and therefore every checkpoint and the final model) is
//! `(ε, δ)`-DP, assuming each step really includes each example
//! independently with probability `q`. [`calibrate_noise`] inverts it.
//!
//! Two accountants, picked with [`AccountantKind`]:
//!
//! * `rdp` — Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019), exact at
//!   integer orders, exact alternating series at fractional orders, converted
//!   with Balle et al. 2020, Theorem 21. Milliseconds; a valid but loose upper
//!   bound.
//! * `pld` — privacy loss distribution with mean-preserving discretisation and
//!   FFT composition, plus a Hoeffding–Azuma slack that makes the reported `ε`
//!   a rigorous upper bound within a stated error (see `pld` module docs).
//!
//! # Layout
//!
//! * `error.rs` — [`PrivacyError`], the typed parameter errors.
//! * `job.rs` — [`PrivacySection`] (the job file's `[privacy]`), [`PrivacyRun`] (σ
//!   calibrated for a job, its step budget, `ε` at any step, the report).
//! * `ledger.rs` — [`Segment`], [`Ledger`] (serde, goes into checkpoints),
//!   [`AccountantKind`].
//! * `rdp.rs` — RDP of one step, composition, RDP-to-DP conversions.
//! * `pld.rs` — the tight accountant.
//! * `calibrate.rs` — [`calibrate_noise`].
//! * `special.rs` — erfc (Cody 1969), log-normal-CDF, log-space arithmetic.
//!
//! See `docs/privacy.md` for the guarantee, conventions and a comparison with
//! Opacus and dp-accounting.

mod calibrate;
mod error;
mod job;
mod ledger;
mod pld;
mod rdp;
mod special;

use serde::{Deserialize, Serialize};

pub use calibrate::{calibrate_noise, calibrate_noise_after};
pub use error::PrivacyError;
pub use job::{PrivacyReport, PrivacyRun, PrivacySection, RunShape, SectionError, Spent};
pub use ledger::{AccountantKind, Ledger, Segment};
pub use rdp::{default_orders, rdp_step};

/// The answer of [`epsilon`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpsilonReport {
    /// `ε` such that the run is `(ε, δ)`-DP; an upper bound on the exact value
    /// for both accountants. `+inf` if no finite `ε` can be certified.
    pub epsilon: f64,
    /// The `δ` asked for.
    pub delta: f64,
    /// Which accountant produced `ε`.
    pub accountant: AccountantKind,
    /// RDP only: the order `α` attaining the minimum.
    pub optimal_order: Option<f64>,
    /// RDP only: `true` when the optimum is the smallest or largest order in
    /// [`default_orders`], i.e. the order list may be too narrow and `ε` may be
    /// needlessly loose.
    pub optimal_order_at_boundary: bool,
    /// PLD only: the reported `ε` exceeds the exact `ε(δ)` by at most about
    /// this much (twice the rounding slack; see the `pld` module docs).
    pub error_bound: Option<f64>,
}

/// `ε` at `δ` for everything recorded in `ledger`.
///
/// Errors on any invalid segment or on `δ` outside `(0, 1)`. An empty ledger
/// has released nothing: `ε = 0`.
pub fn epsilon(
    ledger: &Ledger,
    delta: f64,
    kind: AccountantKind,
) -> Result<EpsilonReport, PrivacyError> {
    ledger::validate_delta(delta)?;
    ledger.validate()?;
    let mut report = EpsilonReport {
        epsilon: 0.0,
        delta,
        accountant: kind,
        optimal_order: None,
        optimal_order_at_boundary: false,
        error_bound: None,
    };
    if ledger.segments.is_empty() {
        return Ok(report);
    }
    match kind {
        AccountantKind::Rdp => {
            let orders = default_orders();
            let curve = rdp::rdp_curve(ledger, &orders);
            let e = rdp::rdp_to_epsilon(&orders, &curve, delta, rdp::Conversion::Balle);
            report.epsilon = e.epsilon;
            report.optimal_order = e.order.is_finite().then_some(e.order);
            report.optimal_order_at_boundary = e.at_boundary;
        }
        AccountantKind::Pld => {
            let e = pld::pld_epsilon(ledger, delta);
            report.epsilon = e.epsilon;
            report.error_bound = Some(e.error_bound);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
