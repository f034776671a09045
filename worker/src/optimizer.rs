//! Adam on flat buffers, in plain deterministic Rust so replicas stay bit-identical.

use serde::{Deserialize, Serialize};

/// Adam hyper-parameters; defaults are Keras's (lr 0.001, β1 0.9, β2 0.999, ε 1e-7).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    /// Step size α.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Decay of the first moment.
    #[serde(default = "default_beta1")]
    pub beta_1: f64,
    /// Decay of the second moment.
    #[serde(default = "default_beta2")]
    pub beta_2: f64,
    /// ε added to sqrt(v̂).
    #[serde(default = "default_eps")]
    pub epsilon: f64,
}

fn default_lr() -> f64 {
    0.001
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-7
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            learning_rate: default_lr(),
            beta_1: default_beta1(),
            beta_2: default_beta2(),
            epsilon: default_eps(),
        }
    }
}

/// Adam's state: first and second moments and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    /// Hyper-parameters.
    pub config: AdamConfig,
    /// First moment estimate m.
    pub m: Vec<f32>,
    /// Second moment estimate v.
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: u64,
}

impl Adam {
    /// Fresh state for `n` parameters.
    pub fn new(config: AdamConfig, n: usize) -> Self {
        Adam {
            config,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One update with gradient `g`, in the form Keras uses (Kingma & Ba 2015, Algorithm 1
    /// with the efficiency note of §2):
    ///   m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²,
    ///   α_t = α·sqrt(1−β2^t)/(1−β1^t),  θ ← θ − α_t·m / (sqrt(v) + ε).
    pub fn step(&mut self, params: &mut [f32], g: &[f32]) {
        self.t += 1;
        let c = self.config;
        let t = self.t as i32;
        let alpha =
            (c.learning_rate * (1.0 - c.beta_2.powi(t)).sqrt() / (1.0 - c.beta_1.powi(t))) as f32;
        let (b1, b2, eps) = (c.beta_1 as f32, c.beta_2 as f32, c.epsilon as f32);
        let (ob1, ob2) = (1.0 - b1, 1.0 - b2);
        for (((p, &gi), m), v) in params
            .iter_mut()
            .zip(g)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            *m = b1 * *m + ob1 * gi;
            *v = b2 * *v + ob2 * gi * gi;
            *p -= alpha * *m / (v.sqrt() + eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three steps of Adam on one parameter from the formula, evaluated in f64 by hand:
    /// θ0 = 1, g = 0.5, 0.25, -1 (fixed), α = 0.1, β1 = 0.9, β2 = 0.999, ε = 1e-7.
    ///   t=1: m=0.05,      v=0.00025,          α1=0.1·sqrt(0.001)/0.1         → θ=0.9000000
    ///   t=2: m=0.07,      v=0.00031225,       α2=0.1·sqrt(0.001999)/0.19
    ///   t=3: m=-0.037,    v=0.00131193775,    α3=0.1·sqrt(0.002997001)/0.271
    /// The reference values below were computed with the same expressions in f64.
    #[test]
    fn matches_the_published_update_rule() {
        let cfg = AdamConfig {
            learning_rate: 0.1,
            ..AdamConfig::default()
        };
        let mut adam = Adam::new(cfg, 1);
        let mut p = [1.0f32];
        let (mut m, mut v, mut theta) = (0f64, 0f64, 1f64);
        for (t, g) in [0.5f64, 0.25, -1.0].into_iter().enumerate() {
            let t = t as i32 + 1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let alpha = 0.1 * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
            theta -= alpha * m / (v.sqrt() + 1e-7);
            adam.step(&mut p, &[g as f32]);
            assert!(
                (p[0] as f64 - theta).abs() < 5e-6,
                "t={t}: {} vs {theta}",
                p[0]
            );
        }
        assert_eq!(adam.t, 3);
    }

    #[test]
    fn first_step_is_learning_rate_sized() {
        let mut adam = Adam::new(AdamConfig::default(), 2);
        let mut p = [0.0f32, 0.0];
        adam.step(&mut p, &[1e-3, -50.0]);
        // θ1 = -α·g/(|g| + ε/sqrt(1-β2)·...) ≈ -α·sign(g)
        assert!((p[0] + 0.001).abs() < 1e-5);
        assert!((p[1] - 0.001).abs() < 1e-5);
    }
}
