//! Loss heads, computed in f64 on the host.

use crate::error::WorkerError;
use crate::model::BatchStats;

/// Sparse categorical cross-entropy of softmax(logits), computed stably from logits:
/// loss_i = logsumexp(z_i) - z_i[y_i], with the max subtracted before exponentiating.
/// With `want_grad`, also returns d(sum_i loss_i)/dz = softmax(z) - onehot(y) (the standard
/// derivation, e.g. Goodfellow et al., Deep Learning, §6.2.2.3).
///
/// Labels outside `0..classes` are an error, never silently clamped.
pub fn sparse_softmax_cross_entropy(
    logits: &[f64],
    labels: &[u32],
    classes: usize,
    want_grad: bool,
) -> Result<(BatchStats, Vec<f64>), WorkerError> {
    let rows = labels.len();
    let mut grad = if want_grad {
        vec![0.0; logits.len()]
    } else {
        Vec::new()
    };
    let mut stats = BatchStats {
        count: rows as u64,
        ..BatchStats::default()
    };
    for (i, &label) in labels.iter().enumerate() {
        let y = label as usize;
        if y >= classes {
            return Err(WorkerError::LabelOutOfRange { label, classes });
        }
        let z = &logits[i * classes..(i + 1) * classes];
        let (mut arg, mut max) = (0usize, f64::NEG_INFINITY);
        for (k, &v) in z.iter().enumerate() {
            if v > max {
                max = v;
                arg = k;
            }
        }
        let sum: f64 = z.iter().map(|&v| (v - max).exp()).sum();
        let lse = max + sum.ln();
        stats.loss_sum += lse - z[y];
        if arg == y {
            stats.correct += 1;
        }
        if want_grad {
            let g = &mut grad[i * classes..(i + 1) * classes];
            for (k, gk) in g.iter_mut().enumerate() {
                *gk = (z[k] - lse).exp();
            }
            g[y] -= 1.0;
        }
    }
    Ok((stats, grad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_formula() {
        // -log(softmax(z)[y]) by hand for z = [1, 2, 3], y = 2:
        // softmax = e^z / (e + e^2 + e^3); loss = log(e + e^2 + e^3) - 3 = 0.4076059644443801
        let (s, g) = sparse_softmax_cross_entropy(&[1.0, 2.0, 3.0], &[2], 3, true).unwrap();
        assert!((s.loss_sum - 0.407_605_964_444_380_1).abs() < 1e-12);
        assert_eq!(s.correct, 1);
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
    fn is_stable_for_huge_logits() {
        let (s, g) = sparse_softmax_cross_entropy(&[1000.0, 0.0], &[1], 2, true).unwrap();
        assert!((s.loss_sum - 1000.0).abs() < 1e-9);
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn rejects_labels_out_of_range() {
        assert!(sparse_softmax_cross_entropy(&[0.0, 0.0], &[2], 2, false).is_err());
    }
}
