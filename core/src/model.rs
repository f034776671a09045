//! The architecture a job file describes: dense and dropout layers, and the flat
//! parameter layout every replica, optimizer and checkpoint shares (per dense layer:
//! kernel `[in, out]` row-major, then the bias `[out]` when it has one). The forward and
//! backward passes live in the worker.

use serde::{Deserialize, Serialize};

use crate::rng::{derive_seed, Rng};

/// Negative slope of `leaky_relu` (Keras 3 `activations.leaky_relu` default).
pub const LEAKY_SLOPE: f64 = 0.2;

/// Activation of a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x)
    Relu,
    /// x for x > 0, 0.2·x otherwise.
    LeakyRelu,
    /// x for x > 0, e^x − 1 otherwise (α = 1).
    Elu,
    /// x·Φ(x), the exact (erf) form, Keras's default.
    Gelu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// tanh(x)
    Tanh,
    /// Row-wise softmax. On the last layer it is fused into the cross-entropy.
    Softmax,
    /// Identity.
    #[default]
    Linear,
}

impl Activation {
    /// The job-file name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::LeakyRelu => "leaky_relu",
            Activation::Elu => "elu",
            Activation::Gelu => "gelu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Softmax => "softmax",
            Activation::Linear => "linear",
        }
    }
}

/// Kernel initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// U(−l, l), l = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010).
    #[default]
    GlorotUniform,
    /// Normal with σ = sqrt(2 / fan_in) truncated at 2σ (He et al. 2015, as Keras).
    HeNormal,
    /// All zeros.
    Zeros,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// One entry of the job file's `model.layers`: `{ dense = N, ... }` or
/// `{ dropout = RATE }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Output units of a dense layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense: Option<usize>,
    /// Drop rate of a dropout layer (training only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// Activation of a dense layer (default linear).
    #[serde(default)]
    pub activation: Activation,
    /// Whether a dense layer has a bias (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub use_bias: bool,
    /// Kernel initializer (default glorot_uniform).
    #[serde(default)]
    pub init: Init,
    /// L2 kernel regularization factor: adds `l2 · Σ W²` to the loss (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub l2: f64,
}

impl LayerSpec {
    /// A dense layer with defaults.
    pub fn dense(units: usize, activation: Activation) -> Self {
        LayerSpec {
            dense: Some(units),
            dropout: None,
            activation,
            use_bias: true,
            init: Init::GlorotUniform,
            l2: 0.0,
        }
    }

    /// A dropout layer.
    pub fn dropout(rate: f64) -> Self {
        LayerSpec {
            dense: None,
            dropout: Some(rate),
            activation: Activation::Linear,
            use_bias: true,
            init: Init::GlorotUniform,
            l2: 0.0,
        }
    }
}

/// The job file's `[model]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Number of input features.
    pub input: usize,
    /// Layers, first to last.
    pub layers: Vec<LayerSpec>,
}

/// Where one dense layer's tensors sit in the flat parameter buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLayout {
    /// Index in `ModelSpec::layers`.
    pub layer: usize,
    /// Fan-in.
    pub inputs: usize,
    /// Fan-out.
    pub outputs: usize,
    /// Offset of the `[inputs, outputs]` kernel.
    pub kernel: usize,
    /// Offset of the `[outputs]` bias, if any.
    pub bias: Option<usize>,
}

impl LayerLayout {
    /// One past the kernel's last parameter.
    pub fn kernel_end(&self) -> usize {
        self.kernel + self.inputs * self.outputs
    }
}

impl ModelSpec {
    /// Checks the architecture; returns (field, message) of the first problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.input == 0 {
            return Err(("model.input".into(), "must be at least 1".into()));
        }
        if !self.layers.iter().any(|l| l.dense.is_some()) {
            return Err((
                "model.layers".into(),
                "needs at least one dense layer".into(),
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let f = |k: &str| format!("model.layers[{i}].{k}");
            match (l.dense, l.dropout) {
                (Some(0), _) => return Err((f("dense"), "must be at least 1".into())),
                (Some(_), Some(_)) | (None, None) => {
                    return Err((
                        format!("model.layers[{i}]"),
                        "give exactly one of `dense = UNITS` or `dropout = RATE`".into(),
                    ))
                }
                (None, Some(r)) if !(0.0..1.0).contains(&r) => {
                    return Err((f("dropout"), format!("{r} is outside [0, 1)")))
                }
                (None, Some(_)) if i + 1 == self.layers.len() => {
                    return Err((f("dropout"), "the last layer must be dense".into()))
                }
                _ => {}
            }
            if !(l.l2 >= 0.0 && l.l2.is_finite()) {
                return Err((f("l2"), "must be a non-negative number".into()));
            }
        }
        Ok(())
    }

    /// The flat-buffer layout of every dense layer.
    pub fn layout(&self) -> Vec<LayerLayout> {
        let mut offset = 0;
        let mut inputs = self.input;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let Some(units) = l.dense else { continue };
            let bias = l.use_bias.then_some(offset + inputs * units);
            out.push(LayerLayout {
                layer: i,
                inputs,
                outputs: units,
                kernel: offset,
                bias,
            });
            offset += inputs * units + if l.use_bias { units } else { 0 };
            inputs = units;
        }
        out
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout()
            .last()
            .map(|l| l.kernel + l.inputs * l.outputs + if l.bias.is_some() { l.outputs } else { 0 })
            .unwrap_or(0)
    }

    /// Width of the last dense layer.
    pub fn outputs(&self) -> usize {
        self.layout()
            .last()
            .map(|l| l.outputs)
            .unwrap_or(self.input)
    }

    /// Activation of the last dense layer.
    pub fn output_activation(&self) -> Activation {
        self.layout()
            .last()
            .map(|l| self.layers[l.layer].activation)
            .unwrap_or_default()
    }

    /// Names, shapes and offsets of the tensors in the flat buffer, in order.
    pub fn tensor_names(&self) -> Vec<(String, Vec<usize>, usize)> {
        let mut out = Vec::new();
        for (i, l) in self.layout().iter().enumerate() {
            out.push((
                format!("dense_{i}.kernel"),
                vec![l.inputs, l.outputs],
                l.kernel,
            ));
            if let Some(b) = l.bias {
                out.push((format!("dense_{i}.bias"), vec![l.outputs], b));
            }
        }
        out
    }

    /// Initial parameters drawn from `seed` (every replica starts equal); biases are 0.
    ///
    /// Replicas on different hosts must start from the same bits: the draws use only
    /// [`Rng`] (its normals go through `libm`) and `sqrt`, which IEEE 754 rounds
    /// correctly; keep any other transcendental here on `libm` too.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut params = vec![0f32; self.num_params()];
        for (i, l) in self.layout().iter().enumerate() {
            let mut rng = Rng::new(derive_seed(seed, &[0x494E_4954, i as u64]));
            let kernel = &mut params[l.kernel..l.kernel + l.inputs * l.outputs];
            match self.layers[l.layer].init {
                Init::GlorotUniform => {
                    let limit = (6.0 / (l.inputs + l.outputs) as f64).sqrt();
                    kernel
                        .iter_mut()
                        .for_each(|p| *p = rng.uniform(-limit, limit) as f32);
                }
                Init::HeNormal => {
                    let sd = (2.0 / l.inputs as f64).sqrt();
                    for p in kernel.iter_mut() {
                        let mut v = rng.normal();
                        while v.abs() > 2.0 {
                            v = rng.normal();
                        }
                        *p = (v * sd) as f32;
                    }
                }
                Init::Zeros => {}
            }
        }
        params
    }

    /// The L2 penalty Σ_layers l2 · Σ W² (part of the reported training loss, as Keras).
    pub fn l2_penalty(&self, params: &[f32]) -> f64 {
        self.layout()
            .iter()
            .map(|l| {
                let f = self.layers[l.layer].l2;
                if f == 0.0 {
                    return 0.0;
                }
                f * params[l.kernel..l.kernel + l.inputs * l.outputs]
                    .iter()
                    .map(|&w| (w as f64) * (w as f64))
                    .sum::<f64>()
            })
            .sum()
    }

    /// Adds the penalty's gradient 2 · l2 · W to `grad` (a per-batch-mean gradient).
    pub fn add_l2_grad(&self, params: &[f32], grad: &mut [f32]) {
        for l in self.layout() {
            let f = self.layers[l.layer].l2 as f32;
            if f == 0.0 {
                continue;
            }
            let r = l.kernel..l.kernel + l.inputs * l.outputs;
            for (g, &w) in grad[r.clone()].iter_mut().zip(&params[r]) {
                *g += 2.0 * f * w;
            }
        }
    }
}
