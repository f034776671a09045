//! The model: a stack of dense layers, its parameter layout, forward and backward passes.
//!
//! Parameters live in one flat `f32` buffer (per layer: kernel `[in, out]` row-major, then
//! bias `[out]`), the same layout the all-reduce, Adam and checkpoints use. Forward and
//! backward run on candle-core tensors; the loss head runs in f64 on the host because it
//! is tiny and its numerics matter.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::WorkerError;
use crate::loss;
use crate::rng::{derive_seed, Rng};

/// Activation of a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x)
    Relu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// tanh(x)
    Tanh,
    /// Row-wise softmax. On the last layer with a cross-entropy loss it is fused into the
    /// loss and computed from logits.
    Softmax,
    /// Identity.
    #[default]
    Linear,
}

impl Activation {
    /// Every accepted name, for error messages.
    pub const NAMES: &'static str = "relu, sigmoid, tanh, softmax, linear";
}

/// One layer of the job file's `model.layers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Output units of the dense layer.
    pub dense: usize,
    /// Activation applied to the layer's output (default linear).
    #[serde(default)]
    pub activation: Activation,
}

/// The job file's `[model]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Number of input features.
    pub input: usize,
    /// Dense layers, first to last.
    pub layers: Vec<LayerSpec>,
}

/// Where one dense layer's tensors sit in the flat parameter buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLayout {
    /// Fan-in.
    pub inputs: usize,
    /// Fan-out.
    pub outputs: usize,
    /// Offset of the `[inputs, outputs]` kernel.
    pub kernel: usize,
    /// Offset of the `[outputs]` bias.
    pub bias: usize,
}

impl ModelSpec {
    /// The flat-buffer layout of every layer.
    pub fn layout(&self) -> Vec<LayerLayout> {
        let mut offset = 0;
        let mut inputs = self.input;
        self.layers
            .iter()
            .map(|l| {
                let lay = LayerLayout {
                    inputs,
                    outputs: l.dense,
                    kernel: offset,
                    bias: offset + inputs * l.dense,
                };
                offset += inputs * l.dense + l.dense;
                inputs = l.dense;
                lay
            })
            .collect()
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout()
            .last()
            .map(|l| l.bias + l.outputs)
            .unwrap_or(0)
    }

    /// Width of the last layer (the number of classes for a classifier).
    pub fn outputs(&self) -> usize {
        self.layers.last().map(|l| l.dense).unwrap_or(self.input)
    }

    /// Names and shapes of the tensors in the flat buffer, in order (for checkpoints).
    pub fn tensor_names(&self) -> Vec<(String, Vec<usize>, usize)> {
        let mut out = Vec::new();
        for (i, l) in self.layout().iter().enumerate() {
            out.push((
                format!("dense_{i}.kernel"),
                vec![l.inputs, l.outputs],
                l.kernel,
            ));
            out.push((format!("dense_{i}.bias"), vec![l.outputs], l.bias));
        }
        out
    }

    /// Glorot-uniform kernels (limit sqrt(6 / (fan_in + fan_out)), Glorot & Bengio 2010,
    /// the Keras default) and zero biases, drawn from `seed` so every replica starts equal.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut params = vec![0f32; self.num_params()];
        for (i, l) in self.layout().iter().enumerate() {
            let mut rng = Rng::new(derive_seed(seed, &[0x494E_4954, i as u64]));
            let limit = (6.0 / (l.inputs + l.outputs) as f64).sqrt();
            for p in &mut params[l.kernel..l.kernel + l.inputs * l.outputs] {
                *p = rng.uniform(-limit, limit) as f32;
            }
        }
        params
    }
}

/// Sums over one batch: what the all-reduce adds up besides the gradient.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchStats {
    /// Sum of per-example losses.
    pub loss_sum: f64,
    /// Number of examples whose arg-max prediction equals the label.
    pub correct: u64,
    /// Number of examples.
    pub count: u64,
}

impl BatchStats {
    /// Adds another batch's sums.
    pub fn add(&mut self, o: &BatchStats) {
        self.loss_sum += o.loss_sum;
        self.correct += o.correct;
        self.count += o.count;
    }
}

/// A dense network bound to a compute device and precision.
#[derive(Debug, Clone)]
pub struct Mlp {
    spec: ModelSpec,
    layout: Vec<LayerLayout>,
    device: Device,
    dtype: DType,
}

impl Mlp {
    /// An f32 network on the CPU.
    pub fn new(spec: ModelSpec) -> Self {
        Self::with_dtype(spec, DType::F32)
    }

    /// A network computing in `dtype` (f64 is used by the gradient checks).
    pub fn with_dtype(spec: ModelSpec, dtype: DType) -> Self {
        let layout = spec.layout();
        Mlp {
            spec,
            layout,
            device: Device::Cpu,
            dtype,
        }
    }

    /// The architecture.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.spec.num_params()
    }

    fn tensor(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, WorkerError> {
        Ok(Tensor::from_slice(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn weights(&self, params: &[f32], l: &LayerLayout) -> Result<(Tensor, Tensor), WorkerError> {
        let w = self.tensor(
            &params[l.kernel..l.kernel + l.inputs * l.outputs],
            &[l.inputs, l.outputs],
        )?;
        let b = self.tensor(&params[l.bias..l.bias + l.outputs], &[1, l.outputs])?;
        Ok((w, b))
    }

    /// Forward pass; returns the pre-activations and activations of every layer, with the
    /// last layer's softmax left out (the loss works on logits).
    fn forward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>), WorkerError> {
        let mut acts = vec![self.tensor(x, &[rows, self.spec.input])?];
        let mut pre = Vec::with_capacity(self.layout.len());
        let last = self.layout.len() - 1;
        for (i, l) in self.layout.iter().enumerate() {
            let (w, b) = self.weights(params, l)?;
            let z = acts[i].matmul(&w)?.broadcast_add(&b)?;
            let a = if i == last {
                z.clone()
            } else {
                activate(self.spec.layers[i].activation, &z)?
            };
            pre.push(z);
            acts.push(a);
        }
        Ok((pre, acts))
    }

    /// Logits (last layer's pre-softmax output) for `rows` examples.
    pub fn logits(&self, params: &[f32], x: &[f32], rows: usize) -> Result<Vec<f64>, WorkerError> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        let (_, acts) = self.forward(params, x, rows)?;
        host_f64(&acts[acts.len() - 1])
    }

    /// Loss and accuracy sums of a batch, without gradients.
    pub fn evaluate(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[u32],
        rows: usize,
    ) -> Result<BatchStats, WorkerError> {
        let logits = self.logits(params, x, rows)?;
        let (stats, _) =
            loss::sparse_softmax_cross_entropy(&logits, y, self.spec.outputs(), false)?;
        Ok(stats)
    }

    /// Forward and backward over a batch: writes the gradient of the **summed** loss into
    /// `grad` (the caller divides by the global batch after the all-reduce) and returns
    /// the batch's loss and accuracy sums.
    pub fn forward_backward(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[u32],
        rows: usize,
        grad: &mut [f32],
    ) -> Result<BatchStats, WorkerError> {
        grad.fill(0.0);
        if rows == 0 {
            return Ok(BatchStats::default());
        }
        let (pre, acts) = self.forward(params, x, rows)?;
        let classes = self.spec.outputs();
        let logits = host_f64(&acts[acts.len() - 1])?;
        let (stats, dlogits) = loss::sparse_softmax_cross_entropy(&logits, y, classes, true)?;
        let dlogits: Vec<f32> = dlogits.iter().map(|&v| v as f32).collect();
        let mut delta = self.tensor(&dlogits, &[rows, classes])?;
        for i in (0..self.layout.len()).rev() {
            let l = &self.layout[i];
            if i != self.layout.len() - 1 {
                delta = activation_backward(
                    self.spec.layers[i].activation,
                    &pre[i],
                    &acts[i + 1],
                    &delta,
                )?;
            }
            let dw = acts[i].t()?.matmul(&delta)?;
            let db = delta.sum(0)?;
            write_f32(&dw, &mut grad[l.kernel..l.kernel + l.inputs * l.outputs])?;
            write_f32(&db, &mut grad[l.bias..l.bias + l.outputs])?;
            if i > 0 {
                let (w, _) = self.weights(params, l)?;
                delta = delta.matmul(&w.t()?)?;
            }
        }
        Ok(stats)
    }
}

fn activate(act: Activation, z: &Tensor) -> Result<Tensor, WorkerError> {
    Ok(match act {
        Activation::Relu => z.relu()?,
        Activation::Sigmoid => sigmoid(z)?,
        Activation::Tanh => z.tanh()?,
        Activation::Softmax => softmax_rows(z)?,
        Activation::Linear => z.clone(),
    })
}

fn sigmoid(z: &Tensor) -> Result<Tensor, WorkerError> {
    Ok((z.neg()?.exp()? + 1.0)?.recip()?)
}

fn softmax_rows(z: &Tensor) -> Result<Tensor, WorkerError> {
    let max = z.max_keepdim(1)?;
    let e = z.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Gradient through an activation: given dL/da, returns dL/dz.
fn activation_backward(
    act: Activation,
    z: &Tensor,
    a: &Tensor,
    da: &Tensor,
) -> Result<Tensor, WorkerError> {
    Ok(match act {
        Activation::Relu => (da * z.gt(0.0)?.to_dtype(da.dtype())?)?,
        Activation::Sigmoid => (da * (a * (1.0 - a)?)?)?,
        Activation::Tanh => (da * (1.0 - a.sqr()?)?)?,
        // Softmax Jacobian-vector product: s * (da - sum(da * s)).
        Activation::Softmax => {
            let dot = (da * a)?.sum_keepdim(1)?;
            (a * da.broadcast_sub(&dot)?)?
        }
        Activation::Linear => da.clone(),
    })
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>, WorkerError> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn write_f32(t: &Tensor, out: &mut [f32]) -> Result<(), WorkerError> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    out.copy_from_slice(&v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(acts: &[Activation]) -> ModelSpec {
        ModelSpec {
            input: 5,
            layers: acts
                .iter()
                .enumerate()
                .map(|(i, &a)| LayerSpec {
                    dense: if i + 1 == acts.len() { 3 } else { 4 },
                    activation: a,
                })
                .collect(),
        }
    }

    fn batch(rows: usize, input: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut r = Rng::new(seed);
        let x = (0..rows * input).map(|_| r.normal() as f32).collect();
        let y = (0..rows).map(|_| r.below(3) as u32).collect();
        (x, y)
    }

    /// Central finite differences of the summed loss, computed in f64, against the
    /// analytic gradient. Parameters are f32, so the step actually taken is measured as
    /// f32(p + h) - f32(p - h) rather than assumed to be 2h.
    fn check_gradients(acts: &[Activation]) {
        let spec = spec(acts);
        let mlp = Mlp::with_dtype(spec.clone(), DType::F64);
        let mut params = spec.init_params(11);
        // Non-zero biases so every code path (including relu kinks) is exercised.
        let mut r = Rng::new(5);
        for p in params.iter_mut() {
            *p += 0.1 * r.normal() as f32;
        }
        let rows = 6;
        let (x, y) = batch(rows, spec.input, 3);
        let mut grad = vec![0f32; spec.num_params()];
        mlp.forward_backward(&params, &x, &y, rows, &mut grad)
            .unwrap();
        let h = 1e-3f32;
        for i in 0..params.len() {
            let orig = params[i];
            params[i] = orig + h;
            let up = mlp.evaluate(&params, &x, &y, rows).unwrap().loss_sum;
            let hi = params[i];
            params[i] = orig - h;
            let down = mlp.evaluate(&params, &x, &y, rows).unwrap().loss_sum;
            let lo = params[i];
            params[i] = orig;
            let numeric = (up - down) / (hi as f64 - lo as f64);
            let analytic = grad[i] as f64;
            let tol = 1e-3 + 1e-3 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() <= tol,
                "{acts:?} param {i}: numeric {numeric} analytic {analytic}"
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_for_every_activation() {
        use Activation::*;
        check_gradients(&[Tanh, Softmax]);
        check_gradients(&[Sigmoid, Linear]);
        check_gradients(&[Relu, Relu, Softmax]);
        check_gradients(&[Softmax, Linear]);
        check_gradients(&[Linear, Tanh, Softmax]);
    }

    #[test]
    fn glorot_init_is_deterministic_and_bounded() {
        let s = spec(&[Activation::Relu, Activation::Softmax]);
        let a = s.init_params(7);
        assert_eq!(a, s.init_params(7));
        assert_ne!(a, s.init_params(8));
        let l = s.layout()[0];
        let limit = (6.0f64 / 9.0).sqrt() as f32;
        assert!(a[l.kernel..l.bias].iter().all(|v| v.abs() <= limit));
        assert!(a[l.bias..l.bias + l.outputs].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn layout_counts_parameters() {
        let s = ModelSpec {
            input: 100,
            layers: vec![
                LayerSpec {
                    dense: 64,
                    activation: Activation::Relu,
                },
                LayerSpec {
                    dense: 64,
                    activation: Activation::Relu,
                },
                LayerSpec {
                    dense: 10,
                    activation: Activation::Softmax,
                },
            ],
        };
        // Keras model.summary() of the seed model: 6464 + 4160 + 650.
        assert_eq!(s.num_params(), 11_274);
    }
}
