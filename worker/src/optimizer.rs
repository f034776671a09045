//! Optimizers, learning-rate schedules and gradient clipping on flat buffers, in plain
//! deterministic Rust so replicas stay bit-identical.
//!
//! Each update follows the Keras 3 implementation of the published rule (cited per
//! optimizer); `lr` is the scheduled rate for the step.

pub use ringtrain_core::optimizer::{
    AdamConfig, AdamWConfig, OptimizerConfig, RmsPropConfig, Schedule, SgdConfig,
};
/// Scales `g` so its global L2 norm is at most `max_norm` (Pascanu et al. 2013); returns
/// the norm before clipping.
pub fn clip_by_global_norm(g: &mut [f32], max_norm: f64) -> f64 {
    let norm = g
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    if norm > max_norm && norm > 0.0 {
        let s = (max_norm / norm) as f32;
        g.iter_mut().for_each(|v| *v *= s);
    }
    norm
}

/// An optimizer with its per-parameter state.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    /// Hyper-parameters.
    pub config: OptimizerConfig,
    /// State buffers, named by [`OptimizerConfig::slot_names`].
    pub slots: Vec<Vec<f32>>,
    /// Steps taken.
    pub t: u64,
}

impl Optimizer {
    /// Fresh state for `n` parameters.
    pub fn new(config: OptimizerConfig, n: usize) -> Self {
        Optimizer {
            slots: config.slot_names().iter().map(|_| vec![0.0; n]).collect(),
            config,
            t: 0,
        }
    }

    /// One update with gradient `g` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], g: &[f32], lr: f64) {
        self.step_threads(params, g, lr, 1);
    }

    /// [`Optimizer::step`] on up to `threads` threads, each updating a contiguous range of
    /// parameters and their state. Every rule is elementwise, so the result is the same
    /// bytes for any thread count.
    pub fn step_threads(&mut self, params: &mut [f32], g: &[f32], lr: f64, threads: usize) {
        self.t += 1;
        let (config, t) = (self.config, self.t as i32);
        let n = params.len();
        let threads = if n < MIN_PARAMS_PER_THREAD * 2 {
            1
        } else {
            threads.clamp(1, n / MIN_PARAMS_PER_THREAD)
        };
        if threads == 1 {
            let mut slots: Vec<&mut [f32]> = self.slots.iter_mut().map(|s| &mut s[..]).collect();
            update(config, t, lr, params, g, &mut slots);
            return;
        }
        let chunk = n.div_ceil(threads);
        let mut slot_chunks: Vec<_> = self.slots.iter_mut().map(|s| s.chunks_mut(chunk)).collect();
        std::thread::scope(|scope| {
            let mut ranges = params.chunks_mut(chunk).zip(g.chunks(chunk));
            let first = ranges.next().map(|(p, gc)| {
                let slots: Vec<&mut [f32]> =
                    slot_chunks.iter_mut().filter_map(|c| c.next()).collect();
                (p, gc, slots)
            });
            for (p, gc) in ranges {
                let mut slots: Vec<&mut [f32]> =
                    slot_chunks.iter_mut().filter_map(|c| c.next()).collect();
                scope.spawn(move || update(config, t, lr, p, gc, &mut slots));
            }
            if let Some((p, gc, mut slots)) = first {
                update(config, t, lr, p, gc, &mut slots);
            }
        });
    }
}

/// Fewest parameters a thread of [`Optimizer::step_threads`] updates.
const MIN_PARAMS_PER_THREAD: usize = 1 << 16;

/// The update rule of step `t` on one range of parameters, their gradient and the same
/// range of every state slot.
fn update(
    config: OptimizerConfig,
    t: i32,
    lr: f64,
    params: &mut [f32],
    g: &[f32],
    slots: &mut [&mut [f32]],
) {
    let lr32 = lr as f32;
    match config {
        // Keras SGD: v ← μv − lr·g; θ ← θ + μv − lr·g (Nesterov) or θ ← θ + v
        // (Sutskever et al. 2013 formulation).
        OptimizerConfig::Sgd(c) => {
            if c.momentum > 0.0 {
                let mu = c.momentum as f32;
                let v = &mut *slots[0];
                for ((p, &gi), vi) in params.iter_mut().zip(g).zip(v.iter_mut()) {
                    *vi = mu * *vi - lr32 * gi;
                    *p += if c.nesterov {
                        mu * *vi - lr32 * gi
                    } else {
                        *vi
                    };
                }
            } else {
                params
                    .iter_mut()
                    .zip(g)
                    .for_each(|(p, &gi)| *p -= lr32 * gi);
            }
        }
        // Kingma & Ba 2015, Algorithm 1 with the efficient form of §2 (as Keras):
        //   m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²,
        //   α_t = lr·sqrt(1−β2^t)/(1−β1^t), θ ← θ − α_t·m/(sqrt(v) + ε).
        // AdamW (Loshchilov & Hutter 2019) first applies θ ← θ − lr·λ·θ.
        OptimizerConfig::Adam(AdamConfig {
            beta_1,
            beta_2,
            epsilon,
            ..
        })
        | OptimizerConfig::Adamw(AdamWConfig {
            beta_1,
            beta_2,
            epsilon,
            ..
        }) => {
            if let OptimizerConfig::Adamw(c) = config {
                let d = (lr * c.weight_decay) as f32;
                params.iter_mut().for_each(|p| *p -= d * *p);
            }
            // Every replica computes the bias correction itself, so it must be the same
            // bits on every host: `libm::pow` (pure Rust) instead of `powi`, whose result
            // depends on how the compiler expands it, or the platform libm's `powf`.
            let t = f64::from(t);
            let alpha =
                (lr * (1.0 - libm::pow(beta_2, t)).sqrt() / (1.0 - libm::pow(beta_1, t))) as f32;
            let (b1, b2, e) = (beta_1 as f32, beta_2 as f32, epsilon as f32);
            let (ms, rest) = slots.split_at_mut(1);
            for (((p, &gi), m), v) in params
                .iter_mut()
                .zip(g)
                .zip(ms[0].iter_mut())
                .zip(rest[0].iter_mut())
            {
                *m = b1 * *m + (1.0 - b1) * gi;
                *v = b2 * *v + (1.0 - b2) * gi * gi;
                *p -= alpha * *m / (v.sqrt() + e);
            }
        }
        // Keras RMSprop (Hinton, Lecture 6e): v ← ρv + (1−ρ)g²; centered keeps
        // ḡ ← ρḡ + (1−ρ)g and uses v − ḡ²; inc = lr·g/sqrt(denom + ε); with momentum
        // μ: m ← μm + inc, θ ← θ − m; else θ ← θ − inc.
        OptimizerConfig::Rmsprop(c) => {
            let (r, e, mu) = (c.rho as f32, c.epsilon as f32, c.momentum as f32);
            let n = params.len();
            for i in 0..n {
                let gi = g[i];
                let v = r * slots[0][i] + (1.0 - r) * gi * gi;
                slots[0][i] = v;
                let mut denom = v;
                if c.centered {
                    let a = r * slots[1][i] + (1.0 - r) * gi;
                    slots[1][i] = a;
                    denom -= a * a;
                }
                let inc = lr32 * gi / (denom + e).sqrt();
                if c.momentum > 0.0 {
                    let k = slots.len() - 1;
                    let m = mu * slots[k][i] + inc;
                    slots[k][i] = m;
                    params[i] -= m;
                } else {
                    params[i] -= inc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_steps_write_the_same_bytes() {
        let n = (1 << 17) + 37;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let configs = [
            OptimizerConfig::Adam(AdamConfig {
                learning_rate: 1e-3,
                ..Default::default()
            }),
            OptimizerConfig::Rmsprop(RmsPropConfig {
                learning_rate: 1e-3,
                rho: 0.9,
                momentum: 0.9,
                epsilon: 1e-7,
                centered: true,
            }),
            OptimizerConfig::Sgd(SgdConfig {
                learning_rate: 0.01,
                momentum: 0.9,
                nesterov: true,
            }),
        ];
        for config in configs {
            let mut one = Optimizer::new(config, n);
            let mut two = Optimizer::new(config, n);
            let mut p1 = vec![0.5f32; n];
            let mut p2 = p1.clone();
            for _ in 0..3 {
                one.step_threads(&mut p1, &g, 0.01, 1);
                two.step_threads(&mut p2, &g, 0.01, 3);
            }
            assert_eq!(one, two, "{config:?}");
            assert!(p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(p1.iter().any(|&v| v != 0.5));
        }
    }

    /// Runs three steps from θ0 = 1 with gradients 0.5, 0.25, −1 and compares with a
    /// reference computed in f64 from the published rule. The reference gets its state
    /// `s` (s[3] holds the previous θ), the gradient and t, and returns the new θ.
    fn three_steps(
        config: OptimizerConfig,
        lr: f64,
        reference: impl Fn(&mut [f64], f64, i32) -> f64,
    ) {
        let mut opt = Optimizer::new(config, 1);
        let mut p = [1.0f32];
        let mut state = [0.0, 0.0, 0.0, 1.0];
        for (i, g) in [0.5f64, 0.25, -1.0].into_iter().enumerate() {
            let theta = reference(&mut state, g, i as i32 + 1);
            state[3] = theta;
            opt.step(&mut p, &[g as f32], lr);
            assert!(
                (p[0] as f64 - theta).abs() < 5e-6,
                "{config:?} t={}: {} vs {theta}",
                i + 1,
                p[0]
            );
        }
        assert_eq!(opt.t, 3);
    }

    #[test]
    fn adam_matches_kingma_and_ba() {
        let cfg = OptimizerConfig::Adam(AdamConfig {
            learning_rate: 0.1,
            ..AdamConfig::default()
        });
        three_steps(cfg, 0.1, |s, g, t| {
            let theta = s[3];
            s[0] = 0.9 * s[0] + 0.1 * g;
            s[1] = 0.999 * s[1] + 0.001 * g * g;
            let alpha = 0.1 * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
            theta - alpha * s[0] / (s[1].sqrt() + 1e-7)
        });
    }

    #[test]
    fn adamw_decays_weights_before_the_adam_step() {
        let cfg = OptimizerConfig::Adamw(AdamWConfig {
            learning_rate: 0.1,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            weight_decay: 0.5,
        });
        three_steps(cfg, 0.1, |s, g, t| {
            let mut theta = s[3];
            theta -= 0.1 * 0.5 * theta;
            s[0] = 0.9 * s[0] + 0.1 * g;
            s[1] = 0.999 * s[1] + 0.001 * g * g;
            let alpha = 0.1 * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
            theta - alpha * s[0] / (s[1].sqrt() + 1e-7)
        });
    }

    #[test]
    fn sgd_momentum_and_nesterov_match_keras() {
        for nesterov in [false, true] {
            let cfg = OptimizerConfig::Sgd(SgdConfig {
                learning_rate: 0.1,
                momentum: 0.9,
                nesterov,
            });
            three_steps(cfg, 0.1, |s, g, _t| {
                let theta = s[3];
                s[0] = 0.9 * s[0] - 0.1 * g;
                if nesterov {
                    theta + 0.9 * s[0] - 0.1 * g
                } else {
                    theta + s[0]
                }
            });
        }
        let plain = OptimizerConfig::Sgd(SgdConfig {
            learning_rate: 0.1,
            momentum: 0.0,
            nesterov: false,
        });
        three_steps(plain, 0.1, |s, g, _| s[3] - 0.1 * g);
    }

    #[test]
    fn rmsprop_matches_keras_including_centered_and_momentum() {
        for (centered, momentum) in [(false, 0.0), (true, 0.0), (false, 0.5), (true, 0.5)] {
            let cfg = OptimizerConfig::Rmsprop(RmsPropConfig {
                learning_rate: 0.01,
                rho: 0.9,
                momentum,
                epsilon: 1e-7,
                centered,
            });
            three_steps(cfg, 0.01, |s, g, _t| {
                let theta = s[3];
                s[0] = 0.9 * s[0] + 0.1 * g * g;
                let mut denom = s[0];
                if centered {
                    s[1] = 0.9 * s[1] + 0.1 * g;
                    denom -= s[1] * s[1];
                }
                let inc = 0.01 * g / (denom + 1e-7).sqrt();
                if momentum > 0.0 {
                    s[2] = momentum * s[2] + inc;
                    theta - s[2]
                } else {
                    theta - inc
                }
            });
        }
    }

    #[test]
    fn schedules_follow_their_formulas() {
        let lr = 0.1;
        assert_eq!(Schedule::Constant.rate(lr, 1000, 0), lr);
        assert!(
            (Schedule::Step {
                every_steps: 10,
                factor: 0.5
            }
            .rate(lr, 25, 0)
                - 0.025)
                .abs()
                < 1e-15
        );
        let e = Schedule::Exponential {
            decay_steps: 100,
            decay_rate: 0.5,
        };
        assert!((e.rate(lr, 50, 0) - 0.1 * 0.5f64.sqrt()).abs() < 1e-15);
        let c = Schedule::Cosine {
            decay_steps: 100,
            alpha: 0.1,
        };
        assert!((c.rate(lr, 0, 0) - 0.1).abs() < 1e-15);
        assert!((c.rate(lr, 50, 0) - 0.1 * (0.9 * 0.5 + 0.1)).abs() < 1e-15);
        assert!((c.rate(lr, 500, 0) - 0.01).abs() < 1e-15);
        assert!((Schedule::Constant.rate(lr, 4, 10) - 0.05).abs() < 1e-15);
        assert_eq!(Schedule::Constant.rate(lr, 10, 10), lr);
    }

    #[test]
    fn global_norm_clipping() {
        let mut g = [3.0f32, 4.0];
        assert_eq!(clip_by_global_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-7 && (g[1] - 0.8).abs() < 1e-7);
        let mut small = [0.3f32, 0.4];
        clip_by_global_norm(&mut small, 1.0);
        assert_eq!(small, [0.3, 0.4]);
    }
}
