//! DP-SGD as a section of the job file: `[privacy]` parsed and checked, then turned into
//! the [`DpPlan`] workers run once the data size is known, and the [`PrivacyRun`] the
//! coordinator keeps to account for every step.

use serde::{Deserialize, Serialize};

use super::{calibrate_noise_after, epsilon, AccountantKind, Ledger, PrivacyError, Segment};
use crate::plan::DpPlan;
use crate::sharding::poisson_steps_per_epoch;

/// `[privacy]` in a job file.
///
/// DP-SGD is on when `target_epsilon` or `noise_multiplier` is given (exactly one of
/// them). A section without either turns nothing on by itself (secure aggregation,
/// issue 10, lives here too) and must not set the DP-only keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// Calibrate σ so the planned run is `(target_epsilon, delta)`-DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// σ itself: the noise standard deviation divided by `max_grad_norm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// δ of the guarantee; must be below 1 / (training examples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// C: each example's gradient is clipped to this L2 norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// `"pld"` (tight, the default) or `"rdp"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accountant: Option<AccountantKind>,
    /// Stop training before the spent `ε` would pass this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_epsilon: Option<f64>,
    /// Reproducible noise from the job seed: for tests only, no privacy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deterministic_noise: bool,
}

/// A `[privacy]` problem: the key and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct SectionError {
    /// The key under `privacy.` (empty: the section as a whole).
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn bad(key: &'static str, message: impl Into<String>) -> SectionError {
    SectionError {
        key,
        message: message.into(),
    }
}

fn positive(key: &'static str, v: Option<f64>) -> Result<(), SectionError> {
    match v {
        Some(x) if !(x.is_finite() && x > 0.0) => {
            Err(bad(key, format!("{x} is not a positive number")))
        }
        _ => Ok(()),
    }
}

impl PrivacySection {
    /// Whether the section turns DP-SGD on.
    pub fn dp_enabled(&self) -> bool {
        self.target_epsilon.is_some() || self.noise_multiplier.is_some()
    }

    /// The accountant (default PLD).
    pub fn accountant(&self) -> AccountantKind {
        self.accountant.unwrap_or(AccountantKind::Pld)
    }

    /// Checks what can be checked without the data.
    pub fn validate(&self) -> Result<(), SectionError> {
        positive("target_epsilon", self.target_epsilon)?;
        positive("noise_multiplier", self.noise_multiplier)?;
        positive("max_grad_norm", self.max_grad_norm)?;
        positive("max_epsilon", self.max_epsilon)?;
        if let Some(d) = self.delta {
            if !(d > 0.0 && d < 1.0) {
                return Err(bad(
                    "delta",
                    format!("{d} is outside (0, 1): use a value well below 1 / (training examples), e.g. 1e-5"),
                ));
            }
        }
        if !self.dp_enabled() {
            let set: Vec<&'static str> = [
                ("delta", self.delta.is_some()),
                ("max_grad_norm", self.max_grad_norm.is_some()),
                ("accountant", self.accountant.is_some()),
                ("max_epsilon", self.max_epsilon.is_some()),
                ("deterministic_noise", self.deterministic_noise),
            ]
            .into_iter()
            .filter_map(|(k, on)| on.then_some(k))
            .collect();
            if let Some(&first) = set.first() {
                return Err(bad(
                    first,
                    format!(
                        "{} set but DP-SGD is off: give target_epsilon (e.g. 3.0) or noise_multiplier (e.g. 1.1) to train privately, or remove {}",
                        set.join(", "),
                        if set.len() == 1 { "it" } else { "them" }
                    ),
                ));
            }
            return Ok(());
        }
        if self.target_epsilon.is_some() && self.noise_multiplier.is_some() {
            return Err(bad(
                "noise_multiplier",
                "give either target_epsilon (σ is calibrated to it) or noise_multiplier, not both",
            ));
        }
        if self.delta.is_none() {
            return Err(bad(
                "delta",
                "DP-SGD needs delta, the probability the guarantee fails (e.g. delta = 1e-5, below 1 / (training examples))",
            ));
        }
        if self.max_grad_norm.is_none() {
            return Err(bad(
                "max_grad_norm",
                "DP-SGD needs max_grad_norm, the per-example clipping bound C (e.g. max_grad_norm = 1.0)",
            ));
        }
        if let (Some(t), Some(m)) = (self.target_epsilon, self.max_epsilon) {
            if t > m {
                return Err(bad(
                    "max_epsilon",
                    format!("{m} is below target_epsilon {t}: the run would stop before it reached its target (raise max_epsilon or lower target_epsilon)"),
                ));
            }
        }
        Ok(())
    }
}

/// What the job has spent before this submission: the ledger of its stored checkpoint
/// and the step it was taken at (a fresh job: empty, step 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spent {
    /// The ledger read from the checkpoint the job resumes from.
    pub ledger: Ledger,
    /// That checkpoint's step.
    pub step: u64,
}

/// The privacy of one submission of a DP job: the plan the workers run and what the
/// coordinator needs to account for each step.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyRun {
    /// What workers run.
    pub plan: DpPlan,
    /// What was spent before `start_step`.
    pub spent: Spent,
    /// The `ε` at which training stops, if any.
    pub max_epsilon: Option<f64>,
    /// `ε` of the whole planned run (or up to the budget).
    pub planned_epsilon: f64,
    /// The run it was planned for.
    pub shape: RunShape,
}

/// The numbers a DP job's planning needs from the data and the job file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunShape {
    /// Training examples (N).
    pub train_samples: usize,
    /// Expected batch size (B); `q = B / N`.
    pub batch_size: usize,
    /// Epochs planned; the run has `epochs * (N / B)` steps.
    pub epochs: u32,
}

impl RunShape {
    /// Steps in the whole planned run.
    pub fn total_steps(&self) -> u64 {
        poisson_steps_per_epoch(self.train_samples, self.batch_size) as u64 * self.epochs as u64
    }
}

impl PrivacyRun {
    /// Plans DP-SGD for a job of `shape` that has already spent `spent`: σ as given, or
    /// calibrated so the whole run (what was spent plus the steps to come) meets
    /// `target_epsilon`; the step budget of `max_epsilon`. `Ok(None)` when the section
    /// does not turn DP on. Errors name the key.
    pub fn plan(
        section: &PrivacySection,
        shape: RunShape,
        spent: Spent,
    ) -> Result<Option<PrivacyRun>, SectionError> {
        section.validate()?;
        if !section.dp_enabled() {
            return Ok(None);
        }
        let n = shape.train_samples;
        let kind = section.accountant();
        let (Some(delta), Some(c)) = (section.delta, section.max_grad_norm) else {
            return Err(bad(
                "",
                "delta and max_grad_norm are required (checked above)",
            ));
        };
        if n == 0 {
            return Err(bad("", "DP-SGD needs training data, and there is none"));
        }
        if delta >= 1.0 / n as f64 {
            return Err(bad(
                "delta",
                format!(
                    "{delta} is not below 1 / N = {:.3e} for these {n} training examples: a delta that large allows a mechanism that publishes an example outright (use e.g. {:.0e})",
                    1.0 / n as f64,
                    0.1 / n as f64
                ),
            ));
        }
        if shape.batch_size > n {
            return Err(bad(
                "",
                format!(
                    "batch_size {} is larger than the {n} training examples: the Poisson sampling rate batch_size / N must be at most 1",
                    shape.batch_size
                ),
            ));
        }
        let q = shape.batch_size as f64 / n as f64;
        let total = shape.total_steps();
        let to_come = total.saturating_sub(spent.step);
        let accounting = |e: PrivacyError| bad("", e.to_string());
        let sigma = match (section.noise_multiplier, section.target_epsilon) {
            (Some(s), _) => s,
            (None, Some(target)) if to_come == 0 => {
                // Nothing left to train: keep the σ of the last segment (or any σ).
                let _ = target;
                spent
                    .ledger
                    .segments
                    .last()
                    .map(|s| s.noise_multiplier)
                    .unwrap_or(1.0)
            }
            (None, Some(target)) => {
                calibrate_noise_after(&spent.ledger, target, q, to_come, delta, kind).map_err(
                    |e| match e {
                        PrivacyError::Unreachable { best, .. } if spent.step > 0 => bad(
                            "target_epsilon",
                            format!(
                                "the run has already spent epsilon {:.4} over {} steps; {to_come} more steps cannot stay within target_epsilon {target} (best reachable {best:.4}): lower epochs or raise target_epsilon",
                                eps_of(&spent.ledger, delta, kind).unwrap_or(f64::NAN),
                                spent.step
                            ),
                        ),
                        PrivacyError::Unreachable { .. } => bad(
                            "target_epsilon",
                            format!("{e} (this job: q = {q:.4}, {total} steps)"),
                        ),
                        other => bad("", other.to_string()),
                    },
                )?
                .0
            }
            (None, None) => return Ok(None),
        };
        let mut plan = DpPlan {
            noise_multiplier: sigma,
            max_grad_norm: c,
            sample_rate: q,
            delta,
            accountant: kind,
            deterministic_noise: section.deterministic_noise,
            budget_steps: None,
        };
        let mut run = PrivacyRun {
            plan,
            spent,
            max_epsilon: section.max_epsilon,
            planned_epsilon: 0.0,
            shape,
        };
        run.planned_epsilon = run.epsilon_at(total).map_err(accounting)?;
        if let Some(max) = section.max_epsilon {
            if run.planned_epsilon > max {
                let budget = run.last_step_within(max, total).map_err(accounting)?;
                if budget == 0 {
                    return Err(bad(
                        "max_epsilon",
                        format!(
                            "one step at noise multiplier {sigma} already spends epsilon {:.4}, over max_epsilon {max}: raise noise_multiplier or max_epsilon",
                            run.epsilon_at(1).map_err(accounting)?
                        ),
                    ));
                }
                plan.budget_steps = Some(budget);
                run.plan = plan;
                run.planned_epsilon = run.epsilon_at(budget).map_err(accounting)?;
            }
        }
        Ok(Some(run))
    }

    /// The ledger after `step` steps of the job (what was spent, then this
    /// submission's steps at its σ and q).
    pub fn ledger_at(&self, step: u64) -> Result<Ledger, PrivacyError> {
        let mut l = self.spent.ledger.clone();
        let new = step.saturating_sub(self.spent.step);
        if new > 0 {
            l.push(Segment::new(
                self.plan.noise_multiplier,
                self.plan.sample_rate,
                new,
            )?)?;
        }
        Ok(l)
    }

    /// `ε` after `step` steps of the job.
    pub fn epsilon_at(&self, step: u64) -> Result<f64, PrivacyError> {
        eps_of(
            &self.ledger_at(step)?,
            self.plan.delta,
            self.plan.accountant,
        )
    }

    /// The largest step `s <= limit` with `ε(s) <= max` (the spent step when even one
    /// more step would pass it). Bisection: `ε` grows with the steps.
    fn last_step_within(&self, max: f64, limit: u64) -> Result<u64, PrivacyError> {
        let (mut lo, mut hi) = (self.spent.step, limit);
        if self.epsilon_at(hi)? <= max {
            return Ok(hi);
        }
        // Invariant: ε(lo) <= max (or lo is the spent step), ε(hi) > max.
        // (No underflow if the spent step is already past `limit`: then it is the answer.)
        while hi > lo + 1 {
            let mid = lo + (hi - lo) / 2;
            if self.epsilon_at(mid)? <= max {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The report of `ε` after `step` steps, as `status --json` and `local --json` show
    /// it.
    pub fn report(&self, step: u64) -> Result<PrivacyReport, PrivacyError> {
        let ledger = self.ledger_at(step)?;
        Ok(PrivacyReport {
            epsilon: eps_of(&ledger, self.plan.delta, self.plan.accountant)?,
            delta: self.plan.delta,
            noise_multiplier: self.plan.noise_multiplier,
            sample_rate: self.plan.sample_rate,
            steps: ledger.total_steps(),
            accountant: self.plan.accountant,
            max_grad_norm: self.plan.max_grad_norm,
            max_epsilon: self.max_epsilon,
            segments: ledger.segments,
        })
    }
}

fn eps_of(ledger: &Ledger, delta: f64, kind: AccountantKind) -> Result<f64, PrivacyError> {
    Ok(epsilon(ledger, delta, kind)?.epsilon)
}

/// A DP job's privacy as reports show it (`"privacy"` in `status --json`, `local
/// --json` and model.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    /// `ε` spent so far.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// σ of the steps of this submission.
    pub noise_multiplier: f64,
    /// q.
    pub sample_rate: f64,
    /// DP-SGD steps taken (over every submission of the job).
    pub steps: u64,
    /// The accountant.
    pub accountant: AccountantKind,
    /// C.
    pub max_grad_norm: f64,
    /// Where training stops, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_epsilon: Option<f64>,
    /// The ledger (one segment unless σ changed on a resume).
    #[serde(default)]
    pub segments: Vec<Segment>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn section(toml_text: &str) -> PrivacySection {
        toml::from_str(toml_text).unwrap()
    }

    const SHAPE: RunShape = RunShape {
        train_samples: 10_000,
        batch_size: 250,
        epochs: 5,
    };

    #[test]
    fn exactly_one_of_target_and_noise_and_the_required_keys() {
        let both = section(
            "target_epsilon = 3.0\nnoise_multiplier = 1.0\ndelta = 1e-5\nmax_grad_norm = 1.0",
        );
        assert_eq!(both.validate().unwrap_err().key, "noise_multiplier");
        let no_delta = section("noise_multiplier = 1.0\nmax_grad_norm = 1.0");
        assert_eq!(no_delta.validate().unwrap_err().key, "delta");
        let no_c = section("noise_multiplier = 1.0\ndelta = 1e-5");
        assert_eq!(no_c.validate().unwrap_err().key, "max_grad_norm");
        let off_but_set = section("delta = 1e-5");
        let e = off_but_set.validate().unwrap_err();
        assert_eq!(e.key, "delta");
        assert!(e.message.contains("DP-SGD is off"), "{}", e.message);
        assert!(section("").validate().is_ok());
        assert!(!section("").dp_enabled());
        let neg = section("noise_multiplier = -1.0\ndelta = 1e-5\nmax_grad_norm = 1.0");
        assert_eq!(neg.validate().unwrap_err().key, "noise_multiplier");
        let below =
            section("target_epsilon = 3.0\nmax_epsilon = 2.0\ndelta = 1e-5\nmax_grad_norm = 1.0");
        assert_eq!(below.validate().unwrap_err().key, "max_epsilon");
        assert!(toml::from_str::<PrivacySection>("epsilon = 3.0").is_err());
    }

    #[test]
    fn a_target_is_met_and_the_ledger_continues_across_a_resume() {
        let s = section(
            "target_epsilon = 2.0\ndelta = 1e-5\nmax_grad_norm = 1.0\naccountant = \"rdp\"",
        );
        let run = PrivacyRun::plan(&s, SHAPE, Spent::default())
            .unwrap()
            .unwrap();
        assert_eq!(run.plan.sample_rate, 0.025);
        let total = SHAPE.total_steps();
        assert_eq!(total, 200);
        let eps = run.epsilon_at(total).unwrap();
        assert!(eps <= 2.0 && eps > 1.95, "{eps}");
        // Resumed at step 80 with the same job file: same σ, same ledger, same ε.
        let spent = Spent {
            ledger: run.ledger_at(80).unwrap(),
            step: 80,
        };
        let again = PrivacyRun::plan(&s, SHAPE, spent).unwrap().unwrap();
        assert!((again.plan.noise_multiplier - run.plan.noise_multiplier).abs() < 1e-4);
        let (a, b) = (again.epsilon_at(total).unwrap(), eps);
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        // Raising epochs after 80 steps: more noise for the rest, same target.
        let longer = RunShape {
            epochs: 10,
            ..SHAPE
        };
        let spent = Spent {
            ledger: run.ledger_at(80).unwrap(),
            step: 80,
        };
        let more = PrivacyRun::plan(&s, longer, spent).unwrap().unwrap();
        assert!(more.plan.noise_multiplier > run.plan.noise_multiplier);
        assert_eq!(more.ledger_at(400).unwrap().segments.len(), 2);
        assert!(more.epsilon_at(400).unwrap() <= 2.0);
    }

    #[test]
    fn max_epsilon_sets_a_step_budget() {
        let s = section("noise_multiplier = 0.8\ndelta = 1e-5\nmax_grad_norm = 1.0\naccountant = \"rdp\"\nmax_epsilon = 4.0");
        let run = PrivacyRun::plan(&s, SHAPE, Spent::default())
            .unwrap()
            .unwrap();
        let b = run.plan.budget_steps.unwrap();
        assert!(b > 100 && b < SHAPE.total_steps(), "{b}");
        assert!(run.epsilon_at(b).unwrap() <= 4.0);
        assert!(run.epsilon_at(b + 1).unwrap() > 4.0);
        // A budget below what one step costs is refused up front.
        let none = section("noise_multiplier = 0.8\ndelta = 1e-5\nmax_grad_norm = 1.0\naccountant = \"rdp\"\nmax_epsilon = 1.0");
        assert_eq!(
            PrivacyRun::plan(&none, SHAPE, Spent::default())
                .unwrap_err()
                .key,
            "max_epsilon"
        );
        let loose = section("noise_multiplier = 5.0\ndelta = 1e-5\nmax_grad_norm = 1.0\nmax_epsilon = 8.0\naccountant = \"rdp\"");
        let run = PrivacyRun::plan(&loose, SHAPE, Spent::default())
            .unwrap()
            .unwrap();
        assert_eq!(run.plan.budget_steps, None);
    }

    #[test]
    fn data_dependent_checks_name_the_key() {
        let s = section("noise_multiplier = 1.0\ndelta = 0.01\nmax_grad_norm = 1.0");
        let e = PrivacyRun::plan(&s, SHAPE, Spent::default()).unwrap_err();
        assert_eq!(e.key, "delta");
        let s = section("noise_multiplier = 1.0\ndelta = 1e-6\nmax_grad_norm = 1.0");
        let tiny = RunShape {
            train_samples: 100,
            batch_size: 256,
            epochs: 1,
        };
        let e = PrivacyRun::plan(&s, tiny, Spent::default()).unwrap_err();
        assert!(e.message.contains("batch_size 256"), "{}", e.message);
        assert!(PrivacyRun::plan(&section(""), SHAPE, Spent::default())
            .unwrap()
            .is_none());
    }
}
