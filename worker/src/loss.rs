//! Loss heads and metric sums, computed in f64 on the host.
//!
//! A head turns the last layer's output into a summed loss, the gradient of that sum, and
//! the sums every metric needs ([`MetricSums`]). Sums, never ratios: the all-reduce adds
//! them across ranks, so metrics are exact over the whole split (a confusion matrix,
//! absolute and squared errors, target moments).

use crate::error::WorkerError;

pub use ringtrain_core::loss::{LossKind, Metric};
/// Sums over a set of examples from which every metric follows exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSums {
    /// Sum of per-example losses.
    pub loss_sum: f64,
    /// Number of examples.
    pub count: f64,
    /// Classes tracked (0 for regression).
    pub classes: usize,
    /// `classes × classes` counts, row = true class, column = predicted class.
    pub confusion: Vec<f64>,
    /// Examples whose label is among the `k` highest scores.
    pub top_k: f64,
    /// Σ|ŷ − y| (regression).
    pub abs_err: f64,
    /// Σ(ŷ − y)² (regression).
    pub sq_err: f64,
    /// Σ(y − c) (regression), c the head's target centre.
    pub y_sum: f64,
    /// Σ(y − c)² (regression). Centring keeps Σy² − (Σy)²/n from cancelling when the
    /// sums travel through the f32 all-reduce.
    pub y_sq: f64,
}

/// The `k` of `top_k_accuracy` (Keras default).
pub const TOP_K: usize = 5;

impl MetricSums {
    /// Zero sums for `classes` classes.
    pub fn new(classes: usize) -> Self {
        MetricSums {
            loss_sum: 0.0,
            count: 0.0,
            classes,
            confusion: vec![0.0; classes * classes],
            top_k: 0.0,
            abs_err: 0.0,
            sq_err: 0.0,
            y_sum: 0.0,
            y_sq: 0.0,
        }
    }

    /// Length of the flat form.
    pub fn flat_len(classes: usize) -> usize {
        7 + classes * classes
    }

    /// Appends the flat form (what the all-reduce sums) to `out`.
    pub fn write_flat(&self, out: &mut [f32]) {
        let head = [
            self.loss_sum,
            self.count,
            self.top_k,
            self.abs_err,
            self.sq_err,
            self.y_sum,
            self.y_sq,
        ];
        for (o, v) in out.iter_mut().zip(head.iter().chain(self.confusion.iter())) {
            *o = *v as f32;
        }
    }

    /// Reads the flat form back.
    pub fn from_flat(classes: usize, v: &[f32]) -> Self {
        let g = |i: usize| v.get(i).copied().unwrap_or(0.0) as f64;
        MetricSums {
            loss_sum: g(0),
            count: g(1),
            classes,
            confusion: (0..classes * classes).map(|i| g(7 + i)).collect(),
            top_k: g(2),
            abs_err: g(3),
            sq_err: g(4),
            y_sum: g(5),
            y_sq: g(6),
        }
    }

    /// Every sum in f64, in the flat order (for checkpoints and state transfer).
    pub fn to_f64s(&self) -> Vec<f64> {
        let mut v = vec![
            self.loss_sum,
            self.count,
            self.top_k,
            self.abs_err,
            self.sq_err,
            self.y_sum,
            self.y_sq,
        ];
        v.extend_from_slice(&self.confusion);
        v
    }

    /// The inverse of [`MetricSums::to_f64s`] (missing values read as 0).
    pub fn from_f64s(classes: usize, v: &[f64]) -> Self {
        let g = |i: usize| v.get(i).copied().unwrap_or(0.0);
        MetricSums {
            loss_sum: g(0),
            count: g(1),
            classes,
            confusion: (0..classes * classes).map(|i| g(7 + i)).collect(),
            top_k: g(2),
            abs_err: g(3),
            sq_err: g(4),
            y_sum: g(5),
            y_sq: g(6),
        }
    }

    /// Adds another set of sums.
    pub fn add(&mut self, o: &MetricSums) {
        self.loss_sum += o.loss_sum;
        self.count += o.count;
        self.top_k += o.top_k;
        self.abs_err += o.abs_err;
        self.sq_err += o.sq_err;
        self.y_sum += o.y_sum;
        self.y_sq += o.y_sq;
        for (a, b) in self.confusion.iter_mut().zip(&o.confusion) {
            *a += b;
        }
    }

    fn ratio(a: f64, b: f64) -> f64 {
        if b > 0.0 {
            a / b
        } else {
            0.0
        }
    }

    /// Mean loss.
    pub fn loss(&self) -> f64 {
        Self::ratio(self.loss_sum, self.count)
    }

    /// Fraction of correct arg-max (or thresholded) predictions.
    pub fn accuracy(&self) -> f64 {
        let c = self.classes;
        Self::ratio((0..c).map(|i| self.confusion[i * c + i]).sum(), self.count)
    }

    /// Per-class precision, recall and F1 (0 where undefined, as scikit-learn's
    /// `zero_division=0`).
    pub fn per_class(&self) -> Vec<(f64, f64, f64)> {
        let c = self.classes;
        (0..c)
            .map(|k| {
                let tp = self.confusion[k * c + k];
                let predicted: f64 = (0..c).map(|i| self.confusion[i * c + k]).sum();
                let actual: f64 = (0..c).map(|j| self.confusion[k * c + j]).sum();
                let p = Self::ratio(tp, predicted);
                let r = Self::ratio(tp, actual);
                let f = Self::ratio(2.0 * p * r, p + r);
                (p, r, f)
            })
            .collect()
    }

    /// Named metric values: `loss` plus those asked for that apply.
    pub fn values(&self, metrics: &[Metric]) -> Vec<(&'static str, f64)> {
        let mut out = vec![("loss", self.loss())];
        let pc = if self.classes > 0 {
            self.per_class()
        } else {
            Vec::new()
        };
        let macro_avg = |f: fn(&(f64, f64, f64)) -> f64| {
            if pc.is_empty() {
                0.0
            } else {
                pc.iter().map(f).sum::<f64>() / pc.len() as f64
            }
        };
        for m in metrics {
            let v = match m {
                Metric::Accuracy if self.classes > 0 => self.accuracy(),
                Metric::Precision if self.classes > 0 => macro_avg(|t| t.0),
                Metric::Recall if self.classes > 0 => macro_avg(|t| t.1),
                Metric::F1 if self.classes > 0 => macro_avg(|t| t.2),
                Metric::TopKAccuracy if self.classes > 0 => Self::ratio(self.top_k, self.count),
                Metric::Mae if self.classes == 0 => Self::ratio(self.abs_err, self.count),
                Metric::Mse if self.classes == 0 => Self::ratio(self.sq_err, self.count),
                Metric::R2 if self.classes == 0 => {
                    let ss_tot = self.y_sq - self.y_sum * self.y_sum / self.count.max(1.0);
                    // Constant targets: R² is undefined; report 0 as Keras does.
                    if ss_tot > 0.0 {
                        1.0 - self.sq_err / ss_tot
                    } else {
                        0.0
                    }
                }
                _ => continue,
            };
            out.push((m.name(), v));
        }
        out
    }
}

/// What the head differentiated with respect to.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadGrad {
    /// d(sum loss)/dz of the last layer (fused cross-entropies).
    PreActivation(Vec<f64>),
    /// d(sum loss)/da of the last layer's activated output.
    Output(Vec<f64>),
}

fn check_label(y: f32, classes: usize) -> Result<usize, WorkerError> {
    if y.is_finite() && y >= 0.0 && y.fract() == 0.0 && (y as usize) < classes {
        Ok(y as usize)
    } else {
        Err(WorkerError::LabelOutOfRange { label: y, classes })
    }
}

/// Evaluates the loss head over `rows` examples. `z` is the last layer's pre-activation,
/// `a` its activated output (both rows × outputs), `y` one target per row. `center` is
/// subtracted from regression targets in the moment sums (see [`MetricSums::y_sq`]).
pub fn head(
    kind: LossKind,
    z: &[f64],
    a: &[f64],
    y: &[f32],
    outputs: usize,
    want_grad: bool,
    center: f64,
) -> Result<(MetricSums, Option<HeadGrad>), WorkerError> {
    let rows = y.len();
    let classes = kind.metric_classes(outputs);
    let mut sums = MetricSums::new(classes);
    sums.count = rows as f64;
    let mut grad = if want_grad {
        vec![0.0; rows * outputs]
    } else {
        Vec::new()
    };
    match kind {
        LossKind::SparseCategoricalCrossentropy | LossKind::CategoricalCrossentropy => {
            for (i, &label) in y.iter().enumerate() {
                let t = check_label(label, outputs)?;
                let zi = &z[i * outputs..(i + 1) * outputs];
                // loss = logsumexp(z) − z[t], with the max subtracted first; its gradient
                // is softmax(z) − onehot(t) (Goodfellow et al., Deep Learning, §6.2.2.3).
                // The gradient feeds the parameters, so exp and ln come from `libm` (pure
                // Rust, the same bits on every host), not the platform libm.
                let (mut arg, mut max) = (0usize, f64::NEG_INFINITY);
                for (k, &v) in zi.iter().enumerate() {
                    if v > max {
                        max = v;
                        arg = k;
                    }
                }
                let lse = max + libm::log(zi.iter().map(|&v| libm::exp(v - max)).sum::<f64>());
                sums.loss_sum += lse - zi[t];
                sums.confusion[t * classes + arg] += 1.0;
                let higher = zi.iter().filter(|&&v| v > zi[t]).count();
                if higher < TOP_K {
                    sums.top_k += 1.0;
                }
                if want_grad {
                    let g = &mut grad[i * outputs..(i + 1) * outputs];
                    for (k, gk) in g.iter_mut().enumerate() {
                        *gk = libm::exp(zi[k] - lse);
                    }
                    g[t] -= 1.0;
                }
            }
        }
        LossKind::BinaryCrossentropy => {
            for (i, &label) in y.iter().enumerate() {
                let t = check_label(label, 2)?;
                let zi = z[i];
                // Stable logistic loss on the logit: max(z, 0) − z·t + ln(1 + e^−|z|);
                // gradient σ(z) − t. `libm` for the same bits on every host, as above.
                sums.loss_sum += zi.max(0.0) - zi * t as f64 + libm::log1p(libm::exp(-zi.abs()));
                let pred = usize::from(zi > 0.0);
                sums.confusion[t * 2 + pred] += 1.0;
                sums.top_k += 1.0;
                if want_grad {
                    grad[i] = 1.0 / (1.0 + libm::exp(-zi)) - t as f64;
                }
            }
        }
        LossKind::Mse | LossKind::Mae | LossKind::Huber => {
            for (i, &target) in y.iter().enumerate() {
                let t = target as f64;
                let e = a[i] - t;
                // sign(0) = 0, as TensorFlow differentiates |e|.
                let sign = if e == 0.0 { 0.0 } else { e.signum() };
                let (l, g) = match kind {
                    LossKind::Mse => (e * e, 2.0 * e),
                    LossKind::Mae => (e.abs(), sign),
                    // Huber (1964) with δ = 1: ½e² inside, δ(|e| − ½δ) outside.
                    _ => {
                        if e.abs() <= 1.0 {
                            (0.5 * e * e, e)
                        } else {
                            (e.abs() - 0.5, sign)
                        }
                    }
                };
                sums.loss_sum += l;
                sums.abs_err += e.abs();
                sums.sq_err += e * e;
                sums.y_sum += t - center;
                sums.y_sq += (t - center) * (t - center);
                if want_grad {
                    grad[i] = g;
                }
            }
        }
    }
    let grad = want_grad.then(|| {
        if kind.fused() {
            HeadGrad::PreActivation(grad)
        } else {
            HeadGrad::Output(grad)
        }
    });
    Ok((sums, grad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(z: &[f64], y: &[f32], classes: usize) -> (MetricSums, Vec<f64>) {
        match head(
            LossKind::SparseCategoricalCrossentropy,
            z,
            z,
            y,
            classes,
            true,
            0.0,
        )
        .unwrap()
        {
            (s, Some(HeadGrad::PreActivation(g))) => (s, g),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cross_entropy_matches_the_published_formula() {
        // -log(softmax(z)[y]) for z = [1, 2, 3], y = 2:
        // log(e + e^2 + e^3) - 3 = 0.4076059644443801 (evaluated in f64).
        let (s, g) = sparse(&[1.0, 2.0, 3.0], &[2.0], 3);
        assert!((s.loss_sum - 0.407_605_964_444_380_1).abs() < 1e-12);
        assert_eq!(s.accuracy(), 1.0);
        let denom = 1f64.exp() + 2f64.exp() + 3f64.exp();
        let expect = [
            1f64.exp() / denom,
            2f64.exp() / denom,
            3f64.exp() / denom - 1.0,
        ];
        for (a, b) in g.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn cross_entropy_is_stable_for_huge_logits() {
        let (s, g) = sparse(&[1000.0, 0.0], &[1.0], 2);
        assert!((s.loss_sum - 1000.0).abs() < 1e-9);
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn binary_cross_entropy_matches_the_formula() {
        // -[t ln σ(z) + (1 − t) ln(1 − σ(z))] for z = 0.3, t = 1 and z = -2, t = 0.
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let expect = -(sig(0.3).ln()) - (1.0 - sig(-2.0)).ln();
        let (s, g) = head(
            LossKind::BinaryCrossentropy,
            &[0.3, -2.0],
            &[],
            &[1.0, 0.0],
            1,
            true,
            0.0,
        )
        .unwrap();
        assert!((s.loss_sum - expect).abs() < 1e-12);
        assert_eq!(
            g,
            Some(HeadGrad::PreActivation(vec![sig(0.3) - 1.0, sig(-2.0)]))
        );
        assert_eq!(s.accuracy(), 1.0);
    }

    #[test]
    fn regression_losses_match_their_formulas() {
        let a = [1.5, -0.2, 4.0];
        let y = [1.0f32, 0.0, 1.0];
        let (mse, _) = head(LossKind::Mse, &a, &a, &y, 1, false, 0.0).unwrap();
        assert!((mse.loss() - (0.25 + 0.04 + 9.0) / 3.0).abs() < 1e-12);
        let (mae, _) = head(LossKind::Mae, &a, &a, &y, 1, false, 0.0).unwrap();
        assert!((mae.loss() - (0.5 + 0.2 + 3.0) / 3.0).abs() < 1e-12);
        // Huber δ = 1: 0.125, 0.02, and 3 − 0.5 = 2.5.
        let (h, g) = head(LossKind::Huber, &a, &a, &y, 1, true, 0.0).unwrap();
        assert!((h.loss_sum - (0.125 + 0.02 + 2.5)).abs() < 1e-12);
        assert_eq!(g, Some(HeadGrad::Output(vec![0.5, -0.2, 1.0])));
    }

    #[test]
    fn labels_out_of_range_are_errors() {
        assert!(head(
            LossKind::SparseCategoricalCrossentropy,
            &[0.0, 0.0],
            &[],
            &[2.0],
            2,
            false,
            0.0
        )
        .is_err());
        assert!(head(
            LossKind::BinaryCrossentropy,
            &[0.0],
            &[],
            &[0.5],
            1,
            false,
            0.0
        )
        .is_err());
    }

    #[test]
    fn macro_metrics_from_a_confusion_matrix() {
        // Two classes; true 0 predicted 0 ×3, true 0 predicted 1 ×1, true 1 predicted 1 ×2.
        let mut s = MetricSums::new(2);
        s.count = 6.0;
        s.confusion = vec![3.0, 1.0, 0.0, 2.0];
        let pc = s.per_class();
        assert_eq!(pc[0].0, 1.0); // precision of class 0: 3/3
        assert_eq!(pc[0].1, 0.75); // recall of class 0: 3/4
        assert!((pc[1].0 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(pc[1].1, 1.0);
        let v = s.values(&[Metric::Accuracy, Metric::F1]);
        assert!((v[1].1 - 5.0 / 6.0).abs() < 1e-12);
        let f1_0 = 2.0 * 0.75 / 1.75;
        let f1_1 = 2.0 * (2.0 / 3.0) / (5.0 / 3.0);
        assert!((v[2].1 - (f1_0 + f1_1) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn centring_keeps_r2_accurate_through_f32() {
        // Targets around 2005 ± 8 (years): uncentred f32 moments lose R² entirely.
        let y: Vec<f32> = (0..1000).map(|i| 1997.0 + (i % 17) as f32).collect();
        let a: Vec<f64> = y.iter().map(|&v| v as f64 + 0.5).collect();
        let exact = {
            let mean = y.iter().map(|&v| v as f64).sum::<f64>() / 1000.0;
            let ss_tot: f64 = y.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
            1.0 - 250.0 / ss_tot
        };
        let (s, _) = head(LossKind::Mse, &a, &a, &y, 1, false, 2005.0).unwrap();
        let mut flat = vec![0f32; MetricSums::flat_len(0)];
        s.write_flat(&mut flat);
        let back = MetricSums::from_flat(0, &flat);
        assert!((back.values(&[Metric::R2])[1].1 - exact).abs() < 1e-4);
    }

    #[test]
    fn r2_is_one_for_a_perfect_fit_and_sums_survive_the_flat_form() {
        let a = [1.0, 2.0, 3.0];
        let (s, _) = head(LossKind::Mse, &a, &a, &[1.0, 2.0, 3.0], 1, false, 0.0).unwrap();
        assert_eq!(s.values(&[Metric::R2])[1].1, 1.0);
        let mut flat = vec![0f32; MetricSums::flat_len(0)];
        s.write_flat(&mut flat);
        assert_eq!(MetricSums::from_flat(0, &flat), s);
    }
}
