//! Rényi DP of the Poisson-subsampled Gaussian mechanism and its conversion
//! to `(ε, δ)`.
//!
//! For one step with sampling rate `q` and noise multiplier `σ`, the order-`α`
//! Rényi divergence under add/remove-one adjacency is `ln(A_α) / (α - 1)` with
//! `A_α = E_{z~N(0,σ²)}[((1-q) + q·exp((2z-1)/(2σ²)))^α]` (Mironov, Talwar and
//! Zhang 2019, "Rényi differential privacy of the sampled Gaussian mechanism",
//! Sec. 3.3). Composition adds the per-step values (Mironov 2017, Prop. 1).

use super::ledger::Ledger;
use super::special::{ln_erfc, log_add, log_sub};

/// The RDP orders we optimise over: 1.1, 1.2, ..., 10.9, then 11..=63, then
/// 128, 256, 512, 1024 (the large ones matter for small `ε` and large `σ`).
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|k| 1.0 + f64::from(k) / 10.0).collect();
    v.extend((11..64).map(f64::from));
    v.extend([128.0, 256.0, 512.0, 1024.0]);
    v
}

/// The orders TF-Privacy's `compute_dp_sgd_privacy` and Opacus use
/// (`[1 + x/10 for x in 1..100] + range(12, 64)`), for reproducing their numbers.
#[cfg(test)]
pub(crate) fn legacy_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|k| 1.0 + f64::from(k) / 10.0).collect();
    v.extend((12..64).map(f64::from));
    v
}

/// `ln A_α` for integer `α >= 2` and `0 < q < 1`, exactly, by the binomial
/// expansion `A_α = Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2σ²))`
/// (Mironov et al. 2019, Sec. 3.3), summed in log space.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let two_s2 = 2.0 * sigma * sigma;
    let a = alpha as f64;
    let mut log_binom = 0.0_f64; // ln C(α, 0)
    let mut acc = f64::NEG_INFINITY;
    for k in 0..=alpha {
        let kf = k as f64;
        let term = log_binom + kf * ln_q + (a - kf) * ln_1mq + (kf * kf - kf) / two_s2;
        acc = log_add(acc, term);
        // ln C(α, k+1) = ln C(α, k) + ln(α - k) - ln(k + 1): a stable recurrence
        // in place of lgamma differences (no cancellation, error ~k ulp).
        if k < alpha {
            log_binom += (a - kf).ln() - (kf + 1.0).ln();
        }
    }
    acc
}

/// Iteration cap for the fractional-order series; beyond it the order is
/// dropped (its RDP reported as +inf), which only loosens the bound.
const MAX_FRAC_TERMS: u32 = 100_000;

/// `ln A_α` for fractional `α > 1` and `0 < q < 1`.
///
/// Uses the **exact alternating series** of Mironov et al. 2019, Sec. 3.3 (as
/// Opacus does): split the integral at `z0 = σ² ln(1/q - 1) + 1/2`, expand each
/// half binomially, and integrate term by term against Gaussian tails. The
/// binomial coefficients `C(α, i)` change sign for `i > α`, so positive and
/// negative terms are accumulated separately in log space and subtracted once
/// at the end. The series is truncated after a positive term in its
/// alternating tail, so the result is an upper bound (relative excess below
/// 1e-13). dp-accounting (>= 0.4) instead sums absolute values, a looser upper
/// bound (about 3% high at α = 1.5, q = 0.01, σ = 1.1) that also converges too
/// slowly for small α at larger q.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let s2 = sigma * sigma;
    let z0 = s2 * (1.0 / q - 1.0).ln() + 0.5;
    let sqrt2s = std::f64::consts::SQRT_2 * sigma;
    let mut pos = f64::NEG_INFINITY;
    let mut neg = f64::NEG_INFINITY;
    let mut log_binom = 0.0_f64; // ln |C(α, i)|
    let mut sign_pos = true; // sign of C(α, i)
    let mut last_term = f64::INFINITY;
    for i in 0..MAX_FRAC_TERMS {
        let fi = f64::from(i);
        let j = alpha - fi;
        let t0 = log_binom + fi * ln_q + j * ln_1mq;
        let t1 = log_binom + j * ln_q + fi * ln_1mq;
        // ½ erfc((i - z0)/(√2σ)) and ½ erfc((z0 - j)/(√2σ)): the Gaussian tail
        // masses of each half after completing the square.
        let e0 = ln_erfc((fi - z0) / sqrt2s) - std::f64::consts::LN_2;
        let e1 = ln_erfc((z0 - j) / sqrt2s) - std::f64::consts::LN_2;
        let s0 = t0 + (fi * fi - fi) / (2.0 * s2) + e0;
        let s1 = t1 + (j * j - j) / (2.0 * s2) + e1;
        let term = log_add(s0, s1);
        if sign_pos {
            pos = log_add(pos, term);
        } else {
            neg = log_add(neg, term);
        }
        // For i > α the signs alternate and the magnitudes eventually decrease
        // (only polynomially, like i^(-α-2), in the second half), so a partial
        // sum that ends on a positive term is an upper bound on the limit. Stop
        // at such a point once the term is below 1e-13 of the total: the result
        // is an upper bound, too high by at most that relative amount.
        if fi > alpha && sign_pos && term < last_term && term < log_sub(pos, neg) - 30.0 {
            return finish_frac(pos, neg);
        }
        last_term = term;
        // C(α, i+1) = C(α, i) (α - i)/(i + 1).
        let factor = alpha - fi;
        if factor < 0.0 {
            sign_pos = !sign_pos;
        }
        log_binom += factor.abs().ln() - (fi + 1.0).ln();
    }
    f64::INFINITY
}

fn finish_frac(pos: f64, neg: f64) -> f64 {
    // A_α >= 1, so the negative part never comes close to the positive one in
    // practice; if it does, round-off dominates and the order is dropped.
    if neg - pos < -1e-6 {
        log_sub(pos, neg)
    } else {
        f64::INFINITY
    }
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism at order
/// `alpha > 1`. Inputs are assumed validated (`0 < q <= 1`, `σ > 0`).
///
/// `q = 1` is the plain Gaussian mechanism: `α / (2σ²)` (Mironov 2017, Prop. 7).
pub fn rdp_step(sample_rate: f64, noise_multiplier: f64, alpha: f64) -> f64 {
    let (q, sigma) = (sample_rate, noise_multiplier);
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= 1.0e6 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    // A_α >= 1 mathematically; clamp tiny negative round-off.
    (log_a / (alpha - 1.0)).max(0.0)
}

/// Total RDP of the ledger at each order (composition adds, Mironov 2017 Prop. 1).
pub(crate) fn rdp_curve(ledger: &Ledger, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&a| {
            ledger
                .segments
                .iter()
                .map(|s| s.steps as f64 * rdp_step(s.sample_rate, s.noise_multiplier, a))
                .sum()
        })
        .collect()
}

/// Which RDP-to-DP conversion to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conversion {
    /// Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis testing
    /// interpretations and Rényi differential privacy", Theorem 21:
    /// `ε = r + ln((α-1)/α) - (ln δ + ln α)/(α - 1)`.
    Balle,
    /// Mironov 2017, Proposition 3: `ε = r - ln δ / (α - 1)`. Looser; kept only to
    /// reproduce numbers printed by older TF-Privacy/Opacus releases.
    #[cfg_attr(not(test), allow(dead_code))]
    Mironov,
}

/// Result of optimising the conversion over the orders.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RdpEpsilon {
    pub epsilon: f64,
    pub order: f64,
    pub at_boundary: bool,
}

/// Minimises the chosen conversion over the orders. Orders whose RDP is
/// non-finite are skipped; if all are, `ε = +inf`.
pub(crate) fn rdp_to_epsilon(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
    conv: Conversion,
) -> RdpEpsilon {
    let ln_delta = delta.ln();
    let mut best = RdpEpsilon {
        epsilon: f64::INFINITY,
        order: f64::NAN,
        at_boundary: true,
    };
    let mut best_idx = 0usize;
    for (i, (&a, &r)) in orders.iter().zip(rdp).enumerate() {
        if !(r.is_finite() && a > 1.0) {
            continue;
        }
        let eps = match conv {
            Conversion::Balle => r + (-1.0 / a).ln_1p() - (ln_delta + a.ln()) / (a - 1.0),
            Conversion::Mironov => r - ln_delta / (a - 1.0),
        };
        if eps < best.epsilon {
            best.epsilon = eps;
            best.order = a;
            best_idx = i;
        }
    }
    if best.epsilon.is_finite() {
        best.at_boundary = best_idx == 0 || best_idx + 1 == orders.len();
        best.epsilon = best.epsilon.max(0.0);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::ledger::{Ledger, Segment};

    fn close(a: f64, b: f64, rtol: f64) -> bool {
        (a - b).abs() <= rtol * b.abs().max(1e-300)
    }

    #[test]
    fn order_two_closed_form() {
        // One step at α = 2: ln(1 + q²(e^{1/σ²} - 1)) (Mironov et al. 2019, Sec. 3.3).
        for &(q, s) in &[(0.01_f64, 1.0_f64), (0.3, 0.7), (0.9, 2.0), (1e-5, 0.5)] {
            let want = (q * q * (1.0 / (s * s)).exp_m1()).ln_1p();
            let got = rdp_step(q, s, 2.0);
            assert!(close(got, want, 1e-12), "q={q} s={s}: {got} vs {want}");
        }
    }

    #[test]
    fn full_batch_is_gaussian() {
        for &a in &[1.5, 2.0, 7.3, 63.0] {
            assert_eq!(rdp_step(1.0, 1.3, a), a / (2.0 * 1.3 * 1.3));
        }
    }

    #[test]
    fn composition_is_linear_in_steps() {
        let orders = default_orders();
        let one = rdp_curve(&Ledger::single(1.1, 0.01, 1).unwrap(), &orders);
        let many = rdp_curve(&Ledger::single(1.1, 0.01, 777).unwrap(), &orders);
        for (a, b) in one.iter().zip(&many) {
            assert!(close(*b, 777.0 * a, 1e-12));
        }
    }

    #[test]
    fn fractional_orders_interpolate_integers() {
        // RDP is nondecreasing in α (van Erven & Harremoës 2014); the exact
        // series at α = k ± 1e-9 must agree with the integer formula.
        for &(q, s) in &[(0.01, 1.1), (0.1, 0.8), (0.5, 3.0)] {
            for k in [2.0, 3.0, 10.0, 30.0] {
                let lo = rdp_step(q, s, k - 1e-9);
                let mid = rdp_step(q, s, k);
                let hi = rdp_step(q, s, k + 1e-9);
                assert!(
                    close(lo, mid, 1e-6) && close(hi, mid, 1e-6),
                    "{q} {s} {k}: {lo} {mid} {hi}"
                );
            }
            let orders = default_orders();
            let mut prev = 0.0;
            for &a in &orders[..150] {
                let r = rdp_step(q, s, a);
                assert!(r >= prev * (1.0 - 1e-9), "not monotone at {a}");
                prev = r;
            }
        }
    }

    #[test]
    fn dp_accounting_poisson_gaussian_values() {
        // google/differential-privacy, python/dp_accounting/rdp/
        // rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian:
        // σ = 2.5, q = 0.01, 50 steps, orders [1.5, 2.5, 5, 50, 100], rtol 1e-4.
        // Integer orders must agree. At the fractional orders dp-accounting sums
        // absolute values (an upper bound), so ours must be at most theirs and
        // match a 40-digit mpmath quadrature of A_α (computed offline:
        // 6.50070897186739e-4 and 1.0854180569174e-3).
        let l = Ledger::single(2.5, 0.01, 50).unwrap();
        let orders = [1.5, 2.5, 5.0, 50.0, 100.0];
        let dp_acc = [
            6.70579741e-04,
            1.08548710e-03,
            2.18075656e-03,
            2.38460375e-02,
            1.67416308e02,
        ];
        let mp = [6.50070897186739e-4, 1.0854180569174e-3];
        let got = rdp_curve(&l, &orders);
        for i in 0..2 {
            assert!(got[i] <= dp_acc[i] * (1.0 + 1e-4));
            assert!(
                close(got[i], mp[i], 1e-8),
                "order {}: {} vs {}",
                orders[i],
                got[i],
                mp[i]
            );
        }
        for i in 2..5 {
            assert!(
                close(got[i], dp_acc[i], 1e-4),
                "order {}: {} vs {}",
                orders[i],
                got[i],
                dp_acc[i]
            );
        }
        // Small order at a larger rate, where dp-accounting's series does not
        // converge at all: mpmath gives 9.55452857187224e-5 (q = 0.01, σ = 1.1,
        // α = 1.5).
        assert!(close(rdp_step(0.01, 1.1, 1.5), 9.55452857187224e-5, 1e-8));
    }

    #[test]
    fn balle_conversion_beats_mironov() {
        let l = Ledger::single(1.1, 256.0 / 60000.0, 14063).unwrap();
        let orders = default_orders();
        let rdp = rdp_curve(&l, &orders);
        let b = rdp_to_epsilon(&orders, &rdp, 1e-5, Conversion::Balle);
        let m = rdp_to_epsilon(&orders, &rdp, 1e-5, Conversion::Mironov);
        assert!(b.epsilon < m.epsilon);
    }

    #[test]
    fn opacus_docstring_heterogeneous_example() {
        // pytorch/opacus, opacus/accountants/analysis/rdp.py module docstring:
        // parameters [(q=1e-5, σ=1.0, 10 steps), (q=1e-4, σ=3.0, 4 steps)],
        // orders 2..=32, δ = 1e-5 -> (0.336, 23) (Balle conversion).
        let mut l = Ledger::new();
        l.push(Segment::new(1.0, 1e-5, 10).unwrap()).unwrap();
        l.push(Segment::new(3.0, 1e-4, 4).unwrap()).unwrap();
        let orders: Vec<f64> = (2..=32).map(f64::from).collect();
        let rdp = rdp_curve(&l, &orders);
        let e = rdp_to_epsilon(&orders, &rdp, 1e-5, Conversion::Balle);
        assert!((e.epsilon - 0.336).abs() < 5e-4, "{}", e.epsilon);
        assert_eq!(e.order, 23.0);
    }

    #[test]
    fn opacus_accountant_test_value() {
        // pytorch/opacus, opacus/tests/accountants_test.py, test_rdp_accountant:
        // σ = 1.5, q = 0.04, steps = int(90 / 0.04) = 2250, δ = 1e-5 ->
        // 7.32911117143 (assertAlmostEqual: 7 decimals) with Opacus' orders and
        // the Balle conversion.
        let l = Ledger::single(1.5, 0.04, 2250).unwrap();
        let orders = legacy_orders();
        let rdp = rdp_curve(&l, &orders);
        let e = rdp_to_epsilon(&orders, &rdp, 1e-5, Conversion::Balle);
        assert!((e.epsilon - 7.32911117143).abs() < 5e-7, "{}", e.epsilon);
    }

    #[test]
    fn tf_privacy_tutorial_table_with_mironov_conversion() {
        // tensorflow/privacy, tutorials/README.md ("Select Parameters" table and
        // the compute_dp_sgd_privacy example): MNIST n = 60000, batch 256,
        // δ = 1e-5, steps = ceil(epochs * n / batch), legacy orders, Mironov
        // Prop. 3 conversion:
        //   σ = 1.1, 60 epochs -> 3.01;  σ = 1.3, 15 epochs -> 1.19;
        //   σ = 0.7, 45 epochs -> 7.10.
        let q = 256.0 / 60000.0;
        for &(sigma, epochs, want) in &[(1.1, 60.0, 3.01), (1.3, 15.0, 1.19), (0.7, 45.0, 7.10)] {
            let steps = (epochs * 60000.0_f64 / 256.0).ceil() as u64;
            let l = Ledger::single(sigma, q, steps).unwrap();
            let orders = legacy_orders();
            let rdp = rdp_curve(&l, &orders);
            let m = rdp_to_epsilon(&orders, &rdp, 1e-5, Conversion::Mironov);
            assert!(
                (m.epsilon - want).abs() < 0.005,
                "σ={sigma}: {} vs {want}",
                m.epsilon
            );
            let b = rdp_to_epsilon(&orders, &rdp, 1e-5, Conversion::Balle);
            assert!(b.epsilon < m.epsilon);
        }
    }
}
