//! Optimizer settings and learning-rate schedules as a job file names them. The update
//! rules themselves run in the worker, on flat buffers.

use serde::{Deserialize, Serialize};

fn lr_default() -> f64 {
    0.001
}
fn lr_sgd() -> f64 {
    0.01
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-7
}
fn rho() -> f64 {
    0.9
}
fn wd() -> f64 {
    0.004
}

/// Adam hyper-parameters; defaults are Keras's (lr 0.001, β1 0.9, β2 0.999, ε 1e-7).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    /// Base step size α.
    #[serde(default = "lr_default")]
    pub learning_rate: f64,
    /// Decay of the first moment.
    #[serde(default = "beta1")]
    pub beta_1: f64,
    /// Decay of the second moment.
    #[serde(default = "beta2")]
    pub beta_2: f64,
    /// ε added to sqrt(v).
    #[serde(default = "eps")]
    pub epsilon: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            learning_rate: lr_default(),
            beta_1: beta1(),
            beta_2: beta2(),
            epsilon: eps(),
        }
    }
}

/// AdamW: Adam with decoupled weight decay (Keras default decay 0.004).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Base step size.
    #[serde(default = "lr_default")]
    pub learning_rate: f64,
    /// Decay of the first moment.
    #[serde(default = "beta1")]
    pub beta_1: f64,
    /// Decay of the second moment.
    #[serde(default = "beta2")]
    pub beta_2: f64,
    /// ε added to sqrt(v).
    #[serde(default = "eps")]
    pub epsilon: f64,
    /// Decoupled weight decay λ.
    #[serde(default = "wd")]
    pub weight_decay: f64,
}

/// SGD with optional (Nesterov) momentum; Keras default lr 0.01.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Base step size.
    #[serde(default = "lr_sgd")]
    pub learning_rate: f64,
    /// Momentum (0: plain SGD).
    #[serde(default)]
    pub momentum: f64,
    /// Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
}

/// RMSprop (Keras defaults: lr 0.001, ρ 0.9, no momentum, ε 1e-7, not centered).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmsPropConfig {
    /// Base step size.
    #[serde(default = "lr_default")]
    pub learning_rate: f64,
    /// Decay of the squared-gradient average.
    #[serde(default = "rho")]
    pub rho: f64,
    /// Momentum (0: none).
    #[serde(default)]
    pub momentum: f64,
    /// ε added inside the square root.
    #[serde(default = "eps")]
    pub epsilon: f64,
    /// Normalize by the gradient's estimated variance instead of its second moment.
    #[serde(default)]
    pub centered: bool,
}

/// The job file's `train.optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Stochastic gradient descent.
    Sgd(SgdConfig),
    /// Adam.
    Adam(AdamConfig),
    /// AdamW.
    Adamw(AdamWConfig),
    /// RMSprop.
    Rmsprop(RmsPropConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Adam(AdamConfig::default())
    }
}

impl OptimizerConfig {
    /// The base learning rate.
    pub fn learning_rate(&self) -> f64 {
        match self {
            OptimizerConfig::Sgd(c) => c.learning_rate,
            OptimizerConfig::Adam(c) => c.learning_rate,
            OptimizerConfig::Adamw(c) => c.learning_rate,
            OptimizerConfig::Rmsprop(c) => c.learning_rate,
        }
    }

    /// Checks ranges; returns (field suffix, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let lr = self.learning_rate();
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(("learning_rate".into(), "must be a positive number".into()));
        }
        let unit = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err((name.to_string(), format!("{v} is outside [0, 1)")))
            }
        };
        match self {
            OptimizerConfig::Sgd(c) => unit("momentum", c.momentum),
            OptimizerConfig::Adam(c) => unit("beta_1", c.beta_1).and(unit("beta_2", c.beta_2)),
            OptimizerConfig::Adamw(c) => unit("beta_1", c.beta_1)
                .and(unit("beta_2", c.beta_2))
                .and(if c.weight_decay >= 0.0 {
                    Ok(())
                } else {
                    Err(("weight_decay".into(), "must be >= 0".into()))
                }),
            OptimizerConfig::Rmsprop(c) => unit("rho", c.rho).and(unit("momentum", c.momentum)),
        }
    }

    /// Names of the per-parameter state buffers, in order.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::Sgd(c) if c.momentum > 0.0 => &["velocity"],
            OptimizerConfig::Sgd(_) => &[],
            OptimizerConfig::Adam(_) | OptimizerConfig::Adamw(_) => &["m", "v"],
            OptimizerConfig::Rmsprop(c) => match (c.centered, c.momentum > 0.0) {
                (false, false) => &["velocity"],
                (false, true) => &["velocity", "momentum"],
                (true, false) => &["velocity", "average_gradient"],
                (true, true) => &["velocity", "average_gradient", "momentum"],
            },
        }
    }
}

/// The job file's `train.schedule`: how the learning rate changes with the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Multiply by `factor` every `every_steps` steps.
    Step {
        /// Steps between drops.
        every_steps: u64,
        /// Multiplier per drop.
        factor: f64,
    },
    /// lr · decay_rate^(step / decay_steps) (Keras `ExponentialDecay`, not staircase).
    Exponential {
        /// Steps per decay period.
        decay_steps: u64,
        /// Multiplier per period.
        decay_rate: f64,
    },
    /// Cosine decay to `alpha`·lr over `decay_steps` (Loshchilov & Hutter 2017, Keras
    /// `CosineDecay`).
    Cosine {
        /// Steps of the decay.
        decay_steps: u64,
        /// Final fraction of the base rate.
        #[serde(default)]
        alpha: f64,
    },
}

impl Schedule {
    /// The rate at 0-based `step` from base rate `lr`, with a linear warm-up over the
    /// first `warmup` steps (rate · (step + 1) / warmup).
    ///
    /// Every replica computes the rate itself and must get the same bits on any host, so
    /// `pow` and `cos` come from `libm` (pure Rust), not the platform libm. The step
    /// schedule uses `libm::pow` with an integral exponent rather than `powi`, whose
    /// result depends on how the compiler expands or folds it.
    pub fn rate(&self, lr: f64, step: u64, warmup: u64) -> f64 {
        let s = step as f64;
        let base = match *self {
            Schedule::Constant => lr,
            Schedule::Step {
                every_steps,
                factor,
            } => lr * libm::pow(factor, (step / every_steps.max(1)) as f64),
            Schedule::Exponential {
                decay_steps,
                decay_rate,
            } => lr * libm::pow(decay_rate, s / decay_steps.max(1) as f64),
            Schedule::Cosine { decay_steps, alpha } => {
                let p = s.min(decay_steps as f64) / decay_steps.max(1) as f64;
                lr * ((1.0 - alpha) * 0.5 * (1.0 + libm::cos(std::f64::consts::PI * p)) + alpha)
            }
        };
        if warmup > 0 && step < warmup {
            base * (step + 1) as f64 / warmup as f64
        } else {
            base
        }
    }
}
