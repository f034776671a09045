//! Tight accountant: the privacy loss distribution (PLD) of the
//! Poisson-subsampled Gaussian, discretised on a uniform grid and composed
//! with an FFT (Koskela, Jälkö, Honkela 2020; Gopi, Lee, Wutschitz 2021).
//!
//! # Method and guarantee
//!
//! Under add/remove-one adjacency one step is the pair of output distributions
//! `P = (1-q)·N(0,σ²) + q·N(1,σ²)` and `Q = N(0,σ²)` ("remove" direction) or
//! the same pair swapped ("add" direction). For a direction with privacy loss
//! `L = ln(p(x)/q(x))`, `x ~ P`, the tight `δ` after `T` steps is
//! `δ(ε) = E[(1 - e^(ε - S))_+]` with `S` the sum of `T` independent losses
//! (Balle & Wang 2018; Koskela et al. 2020, Eq. 3.1); we take the larger `ε` of
//! the two directions.
//!
//! Each step's loss is discretised onto the grid `h·Z` by **mean-preserving
//! randomised rounding**: a loss value in `[ih, (i+1)h]` is moved to one of the
//! two endpoints with the probabilities that keep its mean. Then
//! `S_d = S + M` where `M` is a martingale with increments in intervals of
//! length `h`, so by Hoeffding–Azuma `P(M < -r) <= exp(-2r²/(T h²))`. Because
//! `s -> (1 - e^(ε-s))_+` is nondecreasing and bounded by 1,
//! `δ(ε_d + r) <= δ_d(ε_d) + exp(-2r²/(T h²))`. We solve `δ_d(ε_d) = δ - η`
//! with `η = 1e-5·δ`, `r = h·sqrt(T ln(1/η)/2)`, and report `ε_d + r`: an upper
//! bound on the exact `ε(δ)`. The symmetric argument bounds the excess by
//! `2r` plus the (negligible) change of `ε` when `δ` shrinks by 2e-5 relative.
//!
//! Every truncation is pessimistic: loss mass below the grid is moved up to
//! the lowest grid point, mass above the grid becomes "infinite loss" that
//! counts fully toward `δ`, and the mass of the composed sum that falls above
//! the FFT window is bounded with a Chernoff bound and added to `δ`. Mass below
//! the window wraps around the circular convolution onto larger losses, which
//! can only raise `δ_d`.
//!
//! Not covered by the bound: floating-point round-off in the FFT (absolute
//! errors around 1e-15 per grid cell; negative cells are clamped to zero) and
//! the Simpson's-rule error in each cell's mean (orders of magnitude smaller).

use rustfft::num_complex::Complex64;
use rustfft::FftPlanner;

use super::ledger::Ledger;
use super::special::{log_add, norm_cdf, norm_sf, norm_sf_inverse_upper};

/// Largest FFT length (2^22 complex doubles = 64 MiB per buffer).
const MAX_FFT_LEN: usize = 1 << 22;
/// Largest number of grid cells for one step's loss distribution.
const MAX_STEP_CELLS: f64 = (1u64 << 23) as f64;
/// Target for the rounding slack `r`; the grid is refined until `r` meets it
/// or the FFT length cap is hit.
const TARGET_SLACK: f64 = 2e-4;
/// Coarsest grid we ever use.
const MAX_GRID: f64 = 1e-3;
/// Share of `δ` spent on the Hoeffding–Azuma slack, on the window tail, and on
/// truncating each step's loss range.
const ETA_ROUNDING: f64 = 1e-5;
const ETA_WINDOW: f64 = 1e-5;
const ETA_RANGE: f64 = 1e-6;
/// Chernoff exponents tried for the window bounds.
const LAMBDAS: [f64; 11] = [
    0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0,
];

/// Result of the tight accountant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PldEpsilon {
    /// Upper bound on the exact `ε(δ)`.
    pub epsilon: f64,
    /// The reported `ε` exceeds the exact one by at most about this much.
    pub error_bound: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `P` = mixture, `Q` = `N(0, σ²)`: loss bounded below by `ln(1-q)`.
    Remove,
    /// `P` = `N(0, σ²)`, `Q` = mixture: loss bounded above by `-ln(1-q)`.
    Add,
}

/// The privacy loss of one step in one direction.
#[derive(Debug, Clone, Copy)]
struct LossModel {
    q: f64,
    sigma: f64,
    ln_q: f64,
    ln_1mq: f64,
    dir: Direction,
}

impl LossModel {
    fn new(q: f64, sigma: f64, dir: Direction) -> Self {
        LossModel {
            q,
            sigma,
            ln_q: q.ln(),
            ln_1mq: (-q).ln_1p(),
            dir,
        }
    }

    /// Remove-direction loss at output `x`:
    /// `ln((1-q) + q·exp((2x-1)/(2σ²)))` (Mironov et al. 2019, Eq. 2),
    /// increasing in `x`. The add-direction loss is its negative.
    fn loss_remove(&self, x: f64) -> f64 {
        log_add(
            self.ln_1mq,
            self.ln_q + (2.0 * x - 1.0) / (2.0 * self.sigma * self.sigma),
        )
    }

    /// Inverse of [`Self::loss_remove`]; `-inf` for `l <= ln(1-q)`.
    fn x_remove(&self, l: f64) -> f64 {
        if l <= self.ln_1mq {
            return f64::NEG_INFINITY;
        }
        // e^l - (1-q) = e^l (1 - e^(ln(1-q) - l)); -expm1 keeps digits near the
        // lower end and is exactly e^l when q = 1.
        let u = l + (-(self.ln_1mq - l).exp_m1()).ln() - self.ln_q;
        self.sigma * self.sigma * u + 0.5
    }

    /// `(P[L <= l], P[L > l])`, each computed directly so that both tails are
    /// accurate.
    fn cdf(&self, l: f64) -> (f64, f64) {
        let (q, s) = (self.q, self.sigma);
        match self.dir {
            Direction::Remove => {
                let x = self.x_remove(l);
                if x == f64::NEG_INFINITY {
                    return (0.0, 1.0);
                }
                let (a, b) = (x / s, (x - 1.0) / s);
                (
                    (1.0 - q) * norm_cdf(a) + q * norm_cdf(b),
                    (1.0 - q) * norm_sf(a) + q * norm_sf(b),
                )
            }
            Direction::Add => {
                // L <= l  <=>  loss_remove(x) >= -l  <=>  x >= x_remove(-l).
                let x = self.x_remove(-l);
                if x == f64::NEG_INFINITY {
                    return (1.0, 0.0);
                }
                (norm_sf(x / s), norm_cdf(x / s))
            }
        }
    }

    /// Loss range holding all but `Φc(z)` of the mass on each side.
    fn range(&self, z: f64) -> (f64, f64) {
        let s = self.sigma;
        match self.dir {
            Direction::Remove => (self.loss_remove(-z * s), self.loss_remove(1.0 + z * s)),
            Direction::Add => (-self.loss_remove(1.0 + z * s), -self.loss_remove(-z * s)),
        }
    }
}

/// `P(u < L <= v)` from the two `(cdf, sf)` pairs, using whichever side does
/// not cancel.
fn mass_between(u: (f64, f64), v: (f64, f64)) -> f64 {
    let m = if v.0 <= 0.5 { v.0 - u.0 } else { u.1 - v.1 };
    m.max(0.0)
}

/// One step's discretised loss distribution: `probs[j]` is the mass at loss
/// `(offset + j)·h`; `inf_mass` is the mass treated as infinite loss.
#[derive(Debug, Clone)]
struct Pmf {
    offset: i64,
    probs: Vec<f64>,
    inf_mass: f64,
}

fn add_at(v: &mut [f64], j: usize, x: f64) {
    // Indices are in range by construction (see `discretize`); a miss would be
    // a bug, and dropping mass silently would be optimistic, so the debug
    // build checks it.
    debug_assert!(j < v.len());
    if let Some(c) = v.get_mut(j) {
        *c += x;
    }
}

/// Mean-preserving discretisation of one step's loss onto `h·Z`.
fn discretize(model: &LossModel, h: f64, z: f64) -> Pmf {
    let (l_lo, l_hi) = model.range(z);
    let i_lo = (l_lo / h).floor() as i64;
    let i_hi = ((l_hi / h).ceil() as i64).max(i_lo + 1);
    let n = (i_hi - i_lo + 1) as usize;
    let mut probs = vec![0.0; n];
    let c_lo = model.cdf(l_lo);
    // Mass below l_lo goes *up* to the first grid point >= l_lo (pessimistic).
    let j_up = ((l_lo / h).ceil() as i64 - i_lo) as usize;
    add_at(&mut probs, j_up, c_lo.0);
    let mut prev = c_lo;
    for i in i_lo..i_hi {
        let cell_lo = i as f64 * h;
        let a = cell_lo.max(l_lo);
        let b = ((i + 1) as f64 * h).min(l_hi);
        if b <= a {
            continue;
        }
        let cb = model.cdf(b);
        let mass = mass_between(prev, cb);
        if mass > 0.0 {
            let cm = model.cdf(0.5 * (a + b));
            // ∫_a^b P(l < L <= b) dl = E[(L - a); a < L <= b], by Simpson's rule.
            let moment = (b - a) / 6.0 * (mass + 4.0 * mass_between(cm, cb));
            let up = ((moment + (a - cell_lo) * mass) / h).clamp(0.0, mass);
            let j = (i - i_lo) as usize;
            add_at(&mut probs, j, mass - up);
            add_at(&mut probs, j + 1, up);
        }
        prev = cb;
    }
    Pmf {
        offset: i_lo,
        probs,
        inf_mass: prev.1,
    }
}

/// `ln E[e^(λL); L finite]` for the discretised step.
fn log_mgf(pmf: &Pmf, h: f64, lambda: f64) -> f64 {
    let mut max = f64::NEG_INFINITY;
    for (j, &p) in pmf.probs.iter().enumerate() {
        if p > 0.0 {
            max = max.max(p.ln() + lambda * (pmf.offset + j as i64) as f64 * h);
        }
    }
    if max == f64::NEG_INFINITY {
        return max;
    }
    let mut sum = 0.0;
    for (j, &p) in pmf.probs.iter().enumerate() {
        if p > 0.0 {
            sum += (p.ln() + lambda * (pmf.offset + j as i64) as f64 * h - max).exp();
        }
    }
    max + sum.ln()
}

/// Chernoff window `[lo, hi]` (in loss units) holding the composed sum except
/// for mass `eta` on each side.
fn chernoff_window(pmfs: &[(Pmf, f64)], h: f64, eta: f64) -> (f64, f64) {
    let ln_eta = eta.ln();
    let mut hi = f64::INFINITY;
    let mut lo = f64::NEG_INFINITY;
    for &lam in &LAMBDAS {
        let kp: f64 = pmfs.iter().map(|(p, t)| t * log_mgf(p, h, lam)).sum();
        let km: f64 = pmfs.iter().map(|(p, t)| t * log_mgf(p, h, -lam)).sum();
        // P(S >= a) <= exp(K(λ) - λa);  P(S <= a) <= exp(K(-λ) + λa).
        hi = hi.min((kp - ln_eta) / lam);
        lo = lo.max((ln_eta - km) / lam);
    }
    (lo, hi)
}

/// Chernoff bound on `P(S >= a)`.
fn upper_tail_bound(pmfs: &[(Pmf, f64)], h: f64, a: f64) -> f64 {
    LAMBDAS
        .iter()
        .map(|&lam| {
            let kp: f64 = pmfs.iter().map(|(p, t)| t * log_mgf(p, h, lam)).sum();
            (kp - lam * a).exp()
        })
        .fold(1.0, f64::min)
}

/// `z^t` for `|z| <= 1`, in polar form so that `t` may be large.
fn cpow(z: Complex64, t: f64) -> Complex64 {
    let r2 = z.norm_sqr();
    if r2 == 0.0 {
        return Complex64::new(0.0, 0.0);
    }
    // Most frequencies die out after many steps: skip the trigonometry there.
    let lr = 0.5 * r2.ln() * t;
    if lr < -745.0 {
        return Complex64::new(0.0, 0.0);
    }
    Complex64::from_polar(lr.exp(), z.im.atan2(z.re) * t)
}

/// Smallest `ε >= 0` with `Σ_{s h > ε} w_s (1 - e^(ε - s h)) + extra <= target`,
/// where `w_s = mass[s mod N]` for `s` in `[lo, lo + N)`.
fn solve_epsilon(mass: &[f64], lo: i64, h: f64, extra: f64, target: f64) -> f64 {
    if extra > target {
        return f64::INFINITY;
    }
    let n = mass.len() as i64;
    let (mut a, mut b) = (0.0_f64, 0.0_f64); // Σ w and Σ w e^{-v} over v > current
    let mut v_next = f64::INFINITY;
    let solve = |a: f64, b: f64, lo_v: f64, hi_v: f64| -> f64 {
        if b <= 0.0 {
            return hi_v;
        }
        ((a + extra - target) / b).ln().clamp(lo_v, hi_v)
    };
    for s in (lo..lo + n).rev() {
        let v = s as f64 * h;
        if v <= 0.0 {
            break;
        }
        // δ_d at ε = v counts exactly the cells above v.
        let d = a - v.exp() * b + extra;
        if d > target {
            return solve(a, b, v, v_next);
        }
        let w = mass.get(s.rem_euclid(n) as usize).copied().unwrap_or(0.0);
        a += w;
        b += w * (-v).exp();
        v_next = v;
    }
    if a - b + extra > target {
        solve(a, b, 0.0, v_next)
    } else {
        0.0
    }
}

fn epsilon_one_direction(ledger: &Ledger, delta: f64, dir: Direction) -> PldEpsilon {
    let total_steps = ledger.total_steps() as f64;
    let eta_h = ETA_ROUNDING * delta;
    let eta_w = ETA_WINDOW * delta;
    let z = norm_sf_inverse_upper(ETA_RANGE * delta / total_steps);
    let models: Vec<(LossModel, f64)> = ledger
        .segments
        .iter()
        .map(|s| {
            (
                LossModel::new(s.sample_rate, s.noise_multiplier, dir),
                s.steps as f64,
            )
        })
        .collect();
    let max_range = models
        .iter()
        .map(|(m, _)| {
            let (a, b) = m.range(z);
            b - a
        })
        .fold(0.0, f64::max);

    // Pass 1: a coarse grid to size the window. Mean-preserving rounding on a
    // coarser grid is a mean-preserving spread of the finer one, so its MGF and
    // hence its Chernoff window are wider: safe for sizing.
    let h0 = MAX_GRID.max(max_range / 262_144.0);
    let coarse: Vec<(Pmf, f64)> = models
        .iter()
        .map(|(m, t)| (discretize(m, h0, z), *t))
        .collect();
    let (w_lo, w_hi) = chernoff_window(&coarse, h0, eta_w);
    drop(coarse);

    // Pass 2: the grid. Finer is tighter (slack r ∝ h) but the window must fit
    // in MAX_FFT_LEN cells and one step's range in MAX_STEP_CELLS cells.
    let log_term = (total_steps * (1.0 / eta_h).ln() / 2.0).sqrt();
    let h_err = TARGET_SLACK / log_term;
    let h = h_err
        .min(MAX_GRID)
        .max((w_hi - w_lo) / (MAX_FFT_LEN as f64 - 4.0))
        .max(max_range / MAX_STEP_CELLS);
    let pmfs: Vec<(Pmf, f64)> = models
        .iter()
        .map(|(m, t)| (discretize(m, h, z), *t))
        .collect();
    let (a_lo, a_hi) = chernoff_window(&pmfs, h, eta_w);
    let lo = (a_lo / h).floor() as i64;
    let want = ((a_hi / h).ceil() as i64 - lo + 2).max(2) as usize;
    let n = want.next_power_of_two().min(MAX_FFT_LEN);
    let top = lo + n as i64 - 1;
    let tail = upper_tail_bound(&pmfs, h, (top + 1) as f64 * h);

    // Composition: the sum of independent steps is the product of their
    // characteristic functions; circular convolution of length n.
    let mut planner = FftPlanner::<f64>::new();
    let fwd = planner.plan_fft_forward(n);
    let inv = planner.plan_fft_inverse(n);
    let mut acc = vec![Complex64::new(1.0, 0.0); n];
    let mut buf = vec![Complex64::new(0.0, 0.0); n];
    let mut log_no_inf = 0.0_f64;
    for (pmf, t) in &pmfs {
        buf.iter_mut().for_each(|c| *c = Complex64::new(0.0, 0.0));
        for (j, &p) in pmf.probs.iter().enumerate() {
            let idx = (pmf.offset + j as i64).rem_euclid(n as i64) as usize;
            if let Some(c) = buf.get_mut(idx) {
                c.re += p;
            }
        }
        fwd.process(&mut buf);
        for (a, &b) in acc.iter_mut().zip(buf.iter()) {
            *a *= cpow(b, *t);
        }
        log_no_inf += t * (-pmf.inf_mass).ln_1p();
    }
    inv.process(&mut acc);
    let scale = 1.0 / n as f64;
    let mass: Vec<f64> = acc.iter().map(|c| (c.re * scale).max(0.0)).collect();
    let inf_total = -log_no_inf.exp_m1();

    let r = h * log_term;
    let eps_d = solve_epsilon(&mass, lo, h, inf_total + tail, delta - eta_h);
    PldEpsilon {
        epsilon: eps_d + r,
        error_bound: 2.0 * r,
    }
}

/// Tight `ε` for the ledger at `δ` (the worse of the add and remove
/// directions). The ledger must be validated and non-empty.
///
/// The two directions are independent, so the add direction runs on a second thread
/// (on the calling one if no thread can be started): the same result, in about half
/// the time on two cores, for twice the peak memory (each direction holds two FFT
/// buffers of up to 2²² complex cells, 64 MiB each).
pub(crate) fn pld_epsilon(ledger: &Ledger, delta: f64) -> PldEpsilon {
    let (a, b) = std::thread::scope(|s| {
        let add = std::thread::Builder::new()
            .name("ringtrain-pld-add".into())
            .spawn_scoped(s, || epsilon_one_direction(ledger, delta, Direction::Add));
        let a = epsilon_one_direction(ledger, delta, Direction::Remove);
        let b = match add {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(_) => epsilon_one_direction(ledger, delta, Direction::Add),
        };
        (a, b)
    });
    PldEpsilon {
        epsilon: a.epsilon.max(b.epsilon),
        error_bound: a.error_bound.max(b.error_bound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::special::norm_cdf;

    /// Exact ε of the Gaussian mechanism with sensitivity 1 and noise σ
    /// composed T times, i.e. μ = sqrt(T)/σ (Balle & Wang 2018, Theorem 8):
    /// δ(ε) = Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ), solved by bisection.
    fn analytic_gaussian_epsilon(mu: f64, delta: f64) -> f64 {
        let d = |e: f64| norm_cdf(mu / 2.0 - e / mu) - e.exp() * norm_cdf(-mu / 2.0 - e / mu);
        let (mut lo, mut hi) = (0.0, 200.0);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if d(mid) > delta {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    #[test]
    fn discretization_keeps_mass_and_mean() {
        for &(q, s) in &[(0.01, 1.1), (0.5, 0.8), (1.0, 2.0)] {
            for dir in [Direction::Remove, Direction::Add] {
                let m = LossModel::new(q, s, dir);
                let z = 9.0;
                let h = 1e-3;
                let pmf = discretize(&m, h, z);
                let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.inf_mass;
                assert!((total - 1.0).abs() < 1e-12, "{q} {s} {dir:?}: {total}");
                // KL(P||Q) for the Gaussian (q = 1) is 1/(2σ²) in both directions.
                if q == 1.0 {
                    let mean: f64 = pmf
                        .probs
                        .iter()
                        .enumerate()
                        .map(|(j, p)| p * (pmf.offset + j as i64) as f64 * h)
                        .sum();
                    assert!((mean - 1.0 / (2.0 * s * s)).abs() < 1e-6, "{mean}");
                }
            }
        }
    }

    #[test]
    fn full_batch_matches_analytic_gaussian() {
        for &(sigma, steps, delta) in &[
            (1.0, 1u64, 1e-5),
            (2.0, 10, 1e-5),
            (5.0, 100, 1e-6),
            (0.8, 3, 1e-3),
        ] {
            let l = Ledger::single(sigma, 1.0, steps).unwrap();
            let got = pld_epsilon(&l, delta);
            let want = analytic_gaussian_epsilon((steps as f64).sqrt() / sigma, delta);
            assert!(
                got.epsilon >= want - 1e-9,
                "σ={sigma} T={steps}: {} < {want}",
                got.epsilon
            );
            assert!(
                (got.epsilon - want).abs() < 1e-3,
                "σ={sigma} T={steps}: {} vs {want}",
                got.epsilon
            );
        }
    }
}
