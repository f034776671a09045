//! The model: dense and dropout layers, the parameter layout, forward and backward.
//!
//! Parameters live in one flat `f32` buffer (per dense layer: kernel `[in, out]`
//! row-major, then the bias `[out]` when it has one): the same layout the all-reduce, the
//! optimizers and checkpoints use. Forward and backward run on candle-core tensors; the
//! loss head ([`crate::loss`]) runs in f64 on the host.

use crate::error::WorkerError;
use crate::loss::{self, HeadGrad, LossKind, MetricSums};
use crate::matmul::{gemm_into, matmul, with_contiguous, with_view, MatRef};
use crate::rng::{derive_seed, Rng};
use candle_core::{DType, Device, Tensor};

pub use ringtrain_core::model::{Activation, Init, LayerLayout, LayerSpec, ModelSpec, LEAKY_SLOPE};

/// What makes a training forward pass reproducible: dropout masks are drawn from
/// (seed, step, sample index, layer), so they do not depend on which rank holds a sample.
#[derive(Debug, Clone, Copy)]
pub struct DropoutKey<'a> {
    /// The job seed.
    pub seed: u64,
    /// The global step.
    pub step: u64,
    /// Dataset index of each row.
    pub samples: &'a [u32],
}

/// What per-example clipping did to one batch ([`Mlp::forward_backward_clipped`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClipStats {
    /// Rows whose gradient was scaled down (`c_i < 1`).
    pub clipped: usize,
    /// Rows in the batch.
    pub rows: usize,
    /// Sum of the rows' gradient norms before clipping (divide by `rows` for the mean).
    pub norm_sum: f64,
}

/// A network bound to a loss, a compute device and a precision.
#[derive(Debug, Clone)]
pub struct Mlp {
    spec: ModelSpec,
    layout: Vec<LayerLayout>,
    loss: LossKind,
    target_center: f64,
    device: Device,
    dtype: DType,
    threads: usize,
}

impl Mlp {
    /// An f32 network on the CPU.
    pub fn new(spec: ModelSpec, loss: LossKind) -> Self {
        Self::with_dtype(spec, loss, DType::F32)
    }

    /// A network computing in `dtype` (f64 is used by the gradient checks).
    pub fn with_dtype(spec: ModelSpec, loss: LossKind, dtype: DType) -> Self {
        let layout = spec.layout();
        Mlp {
            spec,
            layout,
            loss,
            target_center: 0.0,
            device: Device::Cpu,
            dtype,
            threads: 1,
        }
    }

    /// Sets the value subtracted from regression targets in the metric moment sums
    /// (the training-target mean keeps R² accurate through the f32 all-reduce).
    pub fn with_target_center(mut self, center: f64) -> Self {
        self.target_center = center;
        self
    }

    /// Sets how many threads each dense-layer product may use. Results do not depend on
    /// it (see [`crate::matmul`]).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The architecture.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The loss.
    pub fn loss(&self) -> LossKind {
        self.loss
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.spec.num_params()
    }

    /// Classes the metrics track (0 for regression).
    pub fn metric_classes(&self) -> usize {
        self.loss.metric_classes(self.spec.outputs())
    }

    fn tensor(&self, data: &[f32], shape: &[usize]) -> Result<Tensor, WorkerError> {
        Ok(Tensor::from_slice(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn kernel(&self, params: &[f32], l: &LayerLayout) -> Result<Tensor, WorkerError> {
        self.tensor(
            &params[l.kernel..l.kernel + l.inputs * l.outputs],
            &[l.inputs, l.outputs],
        )
    }

    fn dropout_mask(
        &self,
        rate: f64,
        width: usize,
        layer: usize,
        key: &DropoutKey<'_>,
    ) -> Result<Tensor, WorkerError> {
        // Inverted dropout: kept units are scaled by 1/(1−rate) so inference needs no
        // rescaling (Srivastava et al. 2014, as Keras implements it).
        let keep = 1.0 - rate;
        let scale = (1.0 / keep) as f32;
        let mut m = Vec::with_capacity(key.samples.len() * width);
        for &s in key.samples {
            let mut rng = Rng::new(derive_seed(
                key.seed,
                &[0x4452_4F50, key.step, s as u64, layer as u64],
            ));
            m.extend((0..width).map(|_| if rng.next_f64() < keep { scale } else { 0.0 }));
        }
        self.tensor(&m, &[key.samples.len(), width])
    }

    /// Forward pass. Returns per layer the input activation, the dense pre-activation
    /// and the dropout mask; `out` is the last activation, left as logits when the loss
    /// is fused with the output activation.
    fn forward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        dropout: Option<&DropoutKey<'_>>,
    ) -> Result<Forward, WorkerError> {
        let mut f = Forward {
            inputs: Vec::new(),
            pre: Vec::new(),
            masks: Vec::new(),
            kernels: Vec::new(),
            out: self.tensor(x, &[rows, self.spec.input])?,
        };
        let last = self.layout.last().map(|l| l.layer).unwrap_or(0);
        let mut dense = self.layout.iter();
        for (i, layer) in self.spec.layers.iter().enumerate() {
            let input = f.out.clone();
            let mut kernel = None;
            let (pre, mask, out) = if layer.dense.is_some() {
                let l = dense
                    .next()
                    .ok_or_else(|| WorkerError::Plan("layer layout mismatch".into()))?;
                let z = if self.dtype == DType::F32 {
                    // The kernel is read where it lies in `params` (no tensor copy), and
                    // the bias is the GEMM's starting value.
                    let w =
                        MatRef::row_major(&params[l.kernel..l.kernel_end()], l.inputs, l.outputs)?;
                    let mut z = vec![0f32; rows * l.outputs];
                    if let Some(b) = l.bias {
                        for row in z.chunks_mut(l.outputs) {
                            row.copy_from_slice(&params[b..b + l.outputs]);
                        }
                    }
                    with_view::<f32, _>(&input, |x| {
                        gemm_into(&mut z, x, w, l.bias.is_some(), self.threads)
                    })?;
                    Tensor::from_vec(z, (rows, l.outputs), &self.device)?
                } else {
                    let w = self.kernel(params, l)?;
                    let mut z = matmul(&input, &w, self.threads)?;
                    kernel = Some(w);
                    if let Some(b) = l.bias {
                        z = z.broadcast_add(
                            &self.tensor(&params[b..b + l.outputs], &[1, l.outputs])?,
                        )?;
                    }
                    z
                };
                let a = if i == last && self.loss.fused() {
                    z.clone()
                } else {
                    activate(layer.activation, &z)?
                };
                (Some(z), None, a)
            } else {
                match (dropout, layer.dropout) {
                    (Some(key), Some(rate)) if rate > 0.0 => {
                        let width = input.dim(1)?;
                        let m = self.dropout_mask(rate, width, i, key)?;
                        let a = (&input * &m)?;
                        (None, Some(m), a)
                    }
                    _ => (None, None, input.clone()),
                }
            };
            f.inputs.push(input);
            f.pre.push(pre);
            f.masks.push(mask);
            f.kernels.push(kernel);
            f.out = out;
        }
        Ok(f)
    }

    /// The model's outputs for `rows` examples: class probabilities (softmax or sigmoid)
    /// for classifiers, the activated output for regression. Row-major, rows × outputs.
    pub fn predict(&self, params: &[f32], x: &[f32], rows: usize) -> Result<Vec<f64>, WorkerError> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        let f = self.forward(params, x, rows, None)?;
        let out = host_f64(&f.out)?;
        Ok(match (self.loss, self.spec.output_activation()) {
            (LossKind::BinaryCrossentropy, _) => {
                out.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect()
            }
            (k, _) if k.fused() => {
                let c = self.spec.outputs();
                let mut p = out;
                for row in p.chunks_mut(c) {
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
                    row.iter_mut().for_each(|v| *v = (*v - max).exp() / sum);
                }
                p
            }
            _ => out,
        })
    }

    /// Loss and metric sums over a batch, without gradients (no dropout).
    pub fn evaluate(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[f32],
        rows: usize,
    ) -> Result<MetricSums, WorkerError> {
        if rows == 0 {
            return Ok(MetricSums::new(self.metric_classes()));
        }
        let f = self.forward(params, x, rows, None)?;
        let (z, a) = self.head_inputs(&f)?;
        Ok(loss::head(
            self.loss,
            &z,
            &a,
            y,
            self.spec.outputs(),
            false,
            self.target_center,
        )?
        .0)
    }

    fn head_inputs(&self, f: &Forward) -> Result<(Vec<f64>, Vec<f64>), WorkerError> {
        let out = host_f64(&f.out)?;
        if self.loss.fused() {
            Ok((out, Vec::new()))
        } else {
            Ok((Vec::new(), out))
        }
    }

    /// Forward and backward over a batch: writes the gradient of the **summed** loss into
    /// `grad` (the caller divides by the global batch after the all-reduce) and returns
    /// the batch's metric sums. `dropout` enables training-mode dropout.
    pub fn forward_backward(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[f32],
        rows: usize,
        grad: &mut [f32],
        dropout: Option<&DropoutKey<'_>>,
    ) -> Result<MetricSums, WorkerError> {
        grad.fill(0.0);
        if rows == 0 {
            return Ok(MetricSums::new(self.metric_classes()));
        }
        let (f, sums, g) = self.forward_to_head(params, x, y, rows, dropout)?;
        let Some((g, fused)) = g else {
            return Ok(sums);
        };
        let mut on_dense = |i: usize, l: &LayerLayout, delta: &Tensor| {
            self.dense_grads(&f.inputs[i], l, delta, grad)
        };
        self.backward(params, &f, rows, &g, fused, &mut on_dense)?;
        Ok(sums)
    }

    /// Forward and backward with DP-SGD's per-example clipping: writes into `grad` the
    /// sum over rows of each example's gradient scaled by
    /// `c_i = min(1, C / (‖g_i‖ + 1e-6))` (Opacus's formula), where `‖g_i‖` is the L2
    /// norm of example `i`'s gradient over all parameters and `C` is `max_grad_norm`.
    ///
    /// No per-example gradient is built ("ghost norms", Goodfellow 2015; Li et al. 2022):
    /// a dense layer's kernel gradient of example `i` is the outer product `a_i ⊗ δ_i` of
    /// its input row and its dL_i/dz row, so its squared norm is `‖a_i‖²·‖δ_i‖²`, plus
    /// `‖δ_i‖²` for the bias. One backward pass keeps every dense layer's δ and adds
    /// these up per row; then each layer's gradient is `Xᵀ·(c ⊙ δ)` and the column sums
    /// of `c ⊙ δ`, which is exact because the backward pass is linear in the head's
    /// gradient row by row and rows never mix (dropout masks and softmax activations
    /// are per row too). Costs a plain step plus O(rows·(in + out)) per dense layer.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_clipped(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[f32],
        rows: usize,
        grad: &mut [f32],
        dropout: Option<&DropoutKey<'_>>,
        max_grad_norm: f64,
    ) -> Result<(MetricSums, ClipStats), WorkerError> {
        if max_grad_norm.is_nan() || max_grad_norm <= 0.0 {
            return Err(WorkerError::Plan(format!(
                "max_grad_norm must be positive, got {max_grad_norm}"
            )));
        }
        grad.fill(0.0);
        let mut stats = ClipStats {
            rows,
            ..ClipStats::default()
        };
        if rows == 0 {
            return Ok((MetricSums::new(self.metric_classes()), stats));
        }
        let (f, sums, g) = self.forward_to_head(params, x, y, rows, dropout)?;
        let Some((g, fused)) = g else {
            return Ok((sums, stats));
        };
        // Pass 1: every dense layer's unscaled δ, and each example's squared norm.
        let mut deltas: Vec<Option<Tensor>> = vec![None; self.spec.layers.len()];
        let mut sq = vec![0f64; rows];
        let mut keep = |i: usize, l: &LayerLayout, delta: &Tensor| -> Result<(), WorkerError> {
            let d2 = row_sq_norms(delta, rows)?;
            let a2 = row_sq_norms(&f.inputs[i], rows)?;
            let bias = if l.bias.is_some() { 1.0 } else { 0.0 };
            for ((s, d), a) in sq.iter_mut().zip(&d2).zip(&a2) {
                *s += d * (a + bias);
            }
            deltas[i] = Some(delta.clone());
            Ok(())
        };
        self.backward(params, &f, rows, &g, fused, &mut keep)?;
        // Pass 2: the clip factors, then each layer's gradient of the clipped sum.
        let c: Vec<f64> = sq
            .iter()
            .map(|&s| {
                let norm = s.sqrt();
                stats.norm_sum += norm;
                (max_grad_norm / (norm + 1e-6)).min(1.0)
            })
            .collect();
        stats.clipped = c.iter().filter(|&&c| c < 1.0).count();
        let c = Tensor::from_vec(c, (rows, 1), &self.device)?.to_dtype(self.dtype)?;
        for l in &self.layout {
            let delta = deltas[l.layer]
                .as_ref()
                .ok_or_else(|| WorkerError::Plan("missing dense layer delta".into()))?;
            let scaled = delta.broadcast_mul(&c)?;
            self.dense_grads(&f.inputs[l.layer], l, &scaled, grad)?;
        }
        Ok((sums, stats))
    }

    /// The forward pass and the loss head of a training step: the activations, the
    /// batch's metric sums and the head's gradient with whether it is already dL/dz of
    /// the last layer (`None` when the loss has no gradient to carry down).
    #[allow(clippy::type_complexity)]
    fn forward_to_head(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[f32],
        rows: usize,
        dropout: Option<&DropoutKey<'_>>,
    ) -> Result<(Forward, MetricSums, Option<(Vec<f64>, bool)>), WorkerError> {
        let f = self.forward(params, x, rows, dropout)?;
        let (z, a) = self.head_inputs(&f)?;
        let outputs = self.spec.outputs();
        let (sums, g) = loss::head(self.loss, &z, &a, y, outputs, true, self.target_center)?;
        let g = match g {
            Some(HeadGrad::PreActivation(g)) => Some((g, true)),
            Some(HeadGrad::Output(g)) => Some((g, false)),
            None => None,
        };
        Ok((f, sums, g))
    }

    /// A dense layer's gradient from its input rows and its dL/dz rows `delta`: the bias
    /// gradient (column sums of δ) and the kernel gradient `Xᵀ·δ`, written into their
    /// places in `grad`.
    fn dense_grads(
        &self,
        input: &Tensor,
        l: &LayerLayout,
        delta: &Tensor,
        grad: &mut [f32],
    ) -> Result<(), WorkerError> {
        if let Some(b) = l.bias {
            if self.dtype == DType::F32 {
                column_sums_f32(delta, &mut grad[b..b + l.outputs])?;
            } else {
                write_f32(&delta.sum(0)?, &mut grad[b..b + l.outputs])?;
            }
        }
        if self.dtype == DType::F32 {
            // dW = Xᵀ·δ straight into the gradient buffer.
            let threads = self.threads;
            let dw = &mut grad[l.kernel..l.kernel_end()];
            with_view::<f32, _>(input, |x| {
                with_view::<f32, _>(delta, |d| gemm_into(dw, x.t(), d, false, threads))
            })?;
        } else {
            let dw = matmul(&input.t()?, delta, self.threads)?;
            write_f32(&dw, &mut grad[l.kernel..l.kernel_end()])?;
        }
        Ok(())
    }

    /// The backward pass from the head's gradient `g` (rows × outputs; dL/dz of the
    /// last layer when `fused`, else dL/d(output)): calls `on_dense(layer index, layout,
    /// δ)` with every dense layer's dL/dz, top layer first, and carries δ·Wᵀ down
    /// (through dropout masks) to the layer below.
    fn backward(
        &self,
        params: &[f32],
        f: &Forward,
        rows: usize,
        g: &[f64],
        fused: bool,
        on_dense: &mut dyn FnMut(usize, &LayerLayout, &Tensor) -> Result<(), WorkerError>,
    ) -> Result<(), WorkerError> {
        let outputs = self.spec.outputs();
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        // `delta` is dL/d(output of layer i) on the way down, turned into dL/dz at dense
        // layers (except the fused last layer, where the head already gave dL/dz).
        let mut delta = self.tensor(&g32, &[rows, outputs])?;
        let last = self.layout.last().map(|l| l.layer).unwrap_or(0);
        let mut dense = self.layout.iter().rev();
        for i in (0..self.spec.layers.len()).rev() {
            let layer = &self.spec.layers[i];
            if layer.dense.is_some() {
                let l = dense
                    .next()
                    .ok_or_else(|| WorkerError::Plan("layer layout mismatch".into()))?;
                let z = f.pre[i]
                    .as_ref()
                    .ok_or_else(|| WorkerError::Plan("missing pre-activation".into()))?;
                if !(i == last && fused) {
                    let a = if i == last {
                        f.out.clone()
                    } else {
                        f.inputs[i + 1].clone()
                    };
                    delta = if layer.activation == Activation::Relu && self.dtype == DType::F32 {
                        relu_backward_f32(z, &delta)?
                    } else {
                        activation_backward(layer.activation, z, &a, &delta)?
                    };
                }
                on_dense(i, l, &delta)?;
                if self.dtype == DType::F32 {
                    // δ·Wᵀ reads the kernel from `params`.
                    let threads = self.threads;
                    if i > 0 {
                        let w = MatRef::row_major(
                            &params[l.kernel..l.kernel_end()],
                            l.inputs,
                            l.outputs,
                        )?;
                        let mut dx = vec![0f32; rows * l.inputs];
                        with_view::<f32, _>(&delta, |d| {
                            gemm_into(&mut dx, d, w.t(), false, threads)
                        })?;
                        delta = Tensor::from_vec(dx, (rows, l.inputs), &self.device)?;
                    }
                } else if i > 0 {
                    let w = f.kernels[i]
                        .as_ref()
                        .ok_or_else(|| WorkerError::Plan("missing kernel".into()))?;
                    delta = matmul(&delta, &w.t()?, self.threads)?;
                }
            } else if let Some(m) = &f.masks[i] {
                delta = (&delta * m)?;
            }
        }
        Ok(())
    }
}

struct Forward {
    inputs: Vec<Tensor>,
    pre: Vec<Option<Tensor>>,
    masks: Vec<Option<Tensor>>,
    /// Each dense layer's kernel tensor in f64 mode, kept for the backward pass (the f32
    /// path reads kernels from the parameter buffer instead).
    kernels: Vec<Option<Tensor>>,
    out: Tensor,
}

fn activate(act: Activation, z: &Tensor) -> Result<Tensor, WorkerError> {
    Ok(match act {
        Activation::Relu => z.relu()?,
        Activation::LeakyRelu => z.maximum(&(z * LEAKY_SLOPE)?)?,
        Activation::Elu => {
            let pos = z.gt(0.0)?.to_dtype(z.dtype())?;
            let neg = (z.minimum(0.0)?.exp()? - 1.0)?;
            ((z * &pos)? + (neg * (1.0 - &pos)?)?)?
        }
        Activation::Gelu => z.gelu_erf()?,
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
    let dt = da.dtype();
    Ok(match act {
        Activation::Relu => (da * z.gt(0.0)?.to_dtype(dt)?)?,
        Activation::LeakyRelu => {
            let pos = z.gt(0.0)?.to_dtype(dt)?;
            (da * ((&pos * (1.0 - LEAKY_SLOPE))? + LEAKY_SLOPE)?)?
        }
        // d/dz elu = 1 for z > 0, e^z = a + 1 otherwise.
        Activation::Elu => {
            let pos = z.gt(0.0)?.to_dtype(dt)?;
            (da * (&pos + ((1.0 - &pos)? * (a + 1.0)?)?)?)?
        }
        // d/dz zΦ(z) = Φ(z) + z·φ(z), φ(z) = e^(−z²/2)/sqrt(2π).
        Activation::Gelu => {
            let cdf = ((z / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
            let pdf = ((z.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))?;
            (da * (cdf? + (z * pdf)?)?)?
        }
        Activation::Sigmoid => (da * (a * (1.0 - a)?)?)?,
        Activation::Tanh => (da * (1.0 - a.sqr()?)?)?,
        // Softmax Jacobian-vector product: s ⊙ (da − Σ da ⊙ s).
        Activation::Softmax => {
            let dot = (da * a)?.sum_keepdim(1)?;
            (a * da.broadcast_sub(&dot)?)?
        }
        Activation::Linear => da.clone(),
    })
}

/// dL/dz of a ReLU in one pass (δ where z > 0, else δ·0): the values of candle's
/// `δ · (z > 0)`, NaN and signed zeros included, without its three passes and two
/// temporaries.
fn relu_backward_f32(z: &Tensor, da: &Tensor) -> Result<Tensor, WorkerError> {
    let (z, da) = (z.contiguous()?, da.contiguous()?);
    let out = with_contiguous::<f32, _>(&z, |zs| {
        with_contiguous::<f32, _>(&da, |ds| {
            Ok(zs
                .iter()
                .zip(ds)
                .map(|(&z, &d)| if z > 0.0 { d } else { d * 0.0 })
                .collect::<Vec<f32>>())
        })
    })?;
    Ok(Tensor::from_vec(out, z.shape(), z.device())?)
}

/// Each row's squared L2 norm of a rows × n f32 or f64 tensor, accumulated in f64.
fn row_sq_norms(t: &Tensor, rows: usize) -> Result<Vec<f64>, WorkerError> {
    let t = t.contiguous()?;
    let n = t.dim(1)?;
    if n == 0 {
        return Ok(vec![0.0; rows]);
    }
    let out: Vec<f64> = match t.dtype() {
        DType::F32 => with_contiguous::<f32, _>(&t, |v| {
            Ok(v.chunks_exact(n).map(|r| sq_norm(r, f64::from)).collect())
        })?,
        DType::F64 => with_contiguous::<f64, _>(&t, |v| {
            Ok(v.chunks_exact(n).map(|r| sq_norm(r, |x| x)).collect())
        })?,
        other => {
            return Err(WorkerError::Plan(format!(
                "per-example norms need f32 or f64, got {other:?}"
            )))
        }
    };
    if out.len() != rows {
        return Err(WorkerError::Plan(format!(
            "per-example norms: {} rows, expected {rows}",
            out.len()
        )));
    }
    Ok(out)
}

/// A row's squared L2 norm in f64. Eight independent partial sums: one running sum is a
/// chain of dependent additions the CPU cannot overlap or vectorize, and on the big MLP
/// that chain alone made clipping cost ~2 ms a step.
fn sq_norm<T: Copy>(row: &[T], to_f64: impl Fn(T) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let x = to_f64(x);
            *a += x * x;
        }
    }
    let mut total: f64 = acc.iter().sum();
    for &x in tail {
        let x = to_f64(x);
        total += x * x;
    }
    total
}

/// Column sums of a rows × n f32 tensor into `out` (the bias gradient), rows added in
/// order.
fn column_sums_f32(t: &Tensor, out: &mut [f32]) -> Result<(), WorkerError> {
    let t = t.contiguous()?;
    let n = out.len();
    with_contiguous::<f32, _>(&t, |v| {
        if n == 0 || v.len() % n != 0 {
            return Err(WorkerError::Plan(format!(
                "bias gradient: {} values do not make rows of {n}",
                v.len()
            )));
        }
        out.fill(0.0);
        for row in v.chunks_exact(n) {
            for (o, x) in out.iter_mut().zip(row) {
                *o += *x;
            }
        }
        Ok(())
    })
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>, WorkerError> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn write_f32(t: &Tensor, out: &mut [f32]) -> Result<(), WorkerError> {
    let t = if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    };
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    out.copy_from_slice(&v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(acts: &[Activation], outputs: usize) -> ModelSpec {
        ModelSpec {
            input: 5,
            layers: acts
                .iter()
                .enumerate()
                .map(|(i, &a)| LayerSpec::dense(if i + 1 == acts.len() { outputs } else { 4 }, a))
                .collect(),
        }
    }

    fn batch(rows: usize, input: usize, seed: u64, loss: LossKind) -> (Vec<f32>, Vec<f32>) {
        let mut r = Rng::new(seed);
        let x = (0..rows * input).map(|_| r.normal() as f32).collect();
        let y = (0..rows)
            .map(|_| match loss {
                LossKind::BinaryCrossentropy => r.below(2) as f32,
                k if k.is_classification() => r.below(3) as f32,
                _ => r.normal() as f32,
            })
            .collect();
        (x, y)
    }

    /// Central finite differences of the summed loss, computed in f64, against the
    /// analytic gradient. Parameters are f32, so the step actually taken is measured as
    /// f32(p + h) − f32(p − h) rather than assumed to be 2h.
    fn check_gradients(spec: ModelSpec, loss: LossKind) {
        let mlp = Mlp::with_dtype(spec.clone(), loss, DType::F64);
        let mut params = spec.init_params(11);
        // Non-zero biases and jitter so every code path is exercised.
        let mut r = Rng::new(5);
        for p in params.iter_mut() {
            *p += 0.1 * r.normal() as f32;
        }
        let rows = 6;
        let (x, y) = batch(rows, spec.input, 3, loss);
        let mut grad = vec![0f32; spec.num_params()];
        mlp.forward_backward(&params, &x, &y, rows, &mut grad, None)
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
            let tol = 2e-3 + 2e-3 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() <= tol,
                "{loss:?} {:?} param {i}: numeric {numeric} analytic {analytic}",
                spec.layers.iter().map(|l| l.activation).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_for_every_activation() {
        use Activation::*;
        let sparse = LossKind::SparseCategoricalCrossentropy;
        for hidden in [Relu, LeakyRelu, Elu, Gelu, Sigmoid, Tanh, Softmax, Linear] {
            check_gradients(spec(&[hidden, Softmax], 3), sparse);
        }
        check_gradients(spec(&[Relu, Tanh, Linear], 3), sparse);
    }

    #[test]
    fn gradients_match_finite_differences_for_every_loss() {
        use Activation::*;
        check_gradients(spec(&[Tanh, Softmax], 3), LossKind::CategoricalCrossentropy);
        check_gradients(spec(&[Tanh, Sigmoid], 1), LossKind::BinaryCrossentropy);
        check_gradients(spec(&[Elu, Linear], 1), LossKind::Mse);
        check_gradients(spec(&[Gelu, Tanh], 1), LossKind::Mae);
        check_gradients(spec(&[Sigmoid, Linear], 1), LossKind::Huber);
        check_gradients(spec(&[LeakyRelu, Sigmoid], 1), LossKind::Mse);
    }

    #[test]
    fn no_bias_and_dropout_layers_keep_gradients_right() {
        let mut s = spec(&[Activation::Tanh, Activation::Softmax], 3);
        s.layers[0].use_bias = false;
        s.layers.insert(1, LayerSpec::dropout(0.5));
        assert_eq!(s.num_params(), 5 * 4 + 4 * 3 + 3);
        check_gradients(s.clone(), LossKind::SparseCategoricalCrossentropy);
        // With a fixed dropout key the training pass is deterministic and differs from
        // the inference pass.
        let mlp = Mlp::new(s.clone(), LossKind::SparseCategoricalCrossentropy);
        let params = s.init_params(1);
        let (x, y) = batch(4, 5, 9, LossKind::SparseCategoricalCrossentropy);
        let key = DropoutKey {
            seed: 3,
            step: 7,
            samples: &[10, 11, 12, 13],
        };
        let mut g1 = vec![0f32; s.num_params()];
        let mut g2 = g1.clone();
        let mut g3 = g1.clone();
        mlp.forward_backward(&params, &x, &y, 4, &mut g1, Some(&key))
            .unwrap();
        mlp.forward_backward(&params, &x, &y, 4, &mut g2, Some(&key))
            .unwrap();
        mlp.forward_backward(&params, &x, &y, 4, &mut g3, None)
            .unwrap();
        assert_eq!(g1, g2);
        assert_ne!(g1, g3);
    }

    /// The f32 path (kernels read in place from `params`, bias folded into the GEMM, dW
    /// written straight into `grad`, products split across threads) against the f64
    /// tensor path, whose gradients the finite-difference checks above pin. The hidden
    /// layers are large enough that their products are split; the thread count must not
    /// change a bit.
    #[test]
    fn f32_path_matches_f64_and_ignores_the_thread_count() {
        let mut s = ModelSpec {
            input: 300,
            layers: vec![
                LayerSpec::dense(256, Activation::Relu),
                LayerSpec::dropout(0.25),
                LayerSpec::dense(160, Activation::Tanh),
                LayerSpec::dense(7, Activation::Softmax),
            ],
        };
        s.layers[2].use_bias = false;
        let loss = LossKind::SparseCategoricalCrossentropy;
        let mut params = s.init_params(4);
        let mut r = Rng::new(8);
        for p in params.iter_mut() {
            *p += 0.05 * r.normal() as f32;
        }
        // Large enough that the first two layers' products are split across threads.
        let rows = 260;
        let (x, y) = batch(rows, s.input, 12, loss);
        let samples: Vec<u32> = (0..rows as u32).map(|i| 3 * i + 1).collect();
        let key = DropoutKey {
            seed: 9,
            step: 2,
            samples: &samples,
        };
        let mut want = vec![0f32; s.num_params()];
        let sums64 = Mlp::with_dtype(s.clone(), loss, DType::F64)
            .forward_backward(&params, &x, &y, rows, &mut want, Some(&key))
            .unwrap();
        let mut first: Option<Vec<f32>> = None;
        for threads in [1, 2, 3] {
            let mlp = Mlp::new(s.clone(), loss).with_threads(threads);
            let mut got = vec![0f32; s.num_params()];
            let sums = mlp
                .forward_backward(&params, &x, &y, rows, &mut got, Some(&key))
                .unwrap();
            assert!((sums.loss_sum - sums64.loss_sum).abs() < 1e-4 * sums64.loss_sum.abs());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-4 * scale, "param {i}: {g} vs {w}");
            }
            match &first {
                None => first = Some(got),
                Some(f) => assert!(
                    f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{threads} threads changed the gradient bytes"
                ),
            }
        }
    }

    #[test]
    fn dropout_masks_depend_on_the_sample_not_the_batch_position() {
        let s = ModelSpec {
            input: 3,
            layers: vec![
                LayerSpec::dense(8, Activation::Relu),
                LayerSpec::dropout(0.5),
                LayerSpec::dense(2, Activation::Softmax),
            ],
        };
        let mlp = Mlp::new(s, LossKind::SparseCategoricalCrossentropy);
        let a = mlp
            .dropout_mask(
                0.5,
                8,
                1,
                &DropoutKey {
                    seed: 1,
                    step: 2,
                    samples: &[5, 9],
                },
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = mlp
            .dropout_mask(
                0.5,
                8,
                1,
                &DropoutKey {
                    seed: 1,
                    step: 2,
                    samples: &[9],
                },
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a[1], b[0]);
        assert!(a[0].iter().all(|&v| v == 0.0 || v == 2.0));
    }

    #[test]
    fn initializers_are_deterministic_and_shaped() {
        let mut s = spec(&[Activation::Relu, Activation::Softmax], 3);
        let a = s.init_params(7);
        assert_eq!(a, s.init_params(7));
        assert_ne!(a, s.init_params(8));
        let l = s.layout()[0];
        let limit = (6.0f64 / 9.0).sqrt() as f32;
        assert!(a[l.kernel..l.kernel + 20].iter().all(|v| v.abs() <= limit));
        s.layers[0].init = Init::HeNormal;
        let sd = (2.0f64 / 5.0).sqrt() as f32;
        assert!(s.init_params(7)[l.kernel..l.kernel + 20]
            .iter()
            .all(|v| v.abs() <= 2.0 * sd));
        s.layers[0].init = Init::Zeros;
        assert!(s.init_params(7)[l.kernel..l.kernel + 20]
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn l2_penalty_and_gradient_agree() {
        let mut s = spec(&[Activation::Relu, Activation::Softmax], 3);
        s.layers[0].l2 = 0.01;
        let p = s.init_params(2);
        let l = s.layout()[0];
        let expect: f64 = 0.01
            * p[l.kernel..l.kernel + 20]
                .iter()
                .map(|&w| (w as f64).powi(2))
                .sum::<f64>();
        assert!((s.l2_penalty(&p) - expect).abs() < 1e-12);
        let mut g = vec![0f32; p.len()];
        s.add_l2_grad(&p, &mut g);
        assert!((g[0] - 0.02 * p[0]).abs() < 1e-9);
        assert_eq!(g[l.kernel + 20..], vec![0f32; p.len() - 20][..]);
    }

    #[test]
    fn layout_counts_parameters() {
        let s = ModelSpec {
            input: 100,
            layers: vec![
                LayerSpec::dense(64, Activation::Relu),
                LayerSpec::dense(64, Activation::Relu),
                LayerSpec::dense(10, Activation::Softmax),
            ],
        };
        // Keras model.summary() of the seed model: 6464 + 4160 + 650.
        assert_eq!(s.num_params(), 11_274);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn bad_layers_are_named() {
        let mut s = spec(&[Activation::Relu, Activation::Softmax], 3);
        s.layers.push(LayerSpec::dropout(0.2));
        assert_eq!(s.validate().unwrap_err().0, "model.layers[2].dropout");
        s.layers[2].dropout = Some(1.5);
        assert!(s.validate().unwrap_err().1.contains("outside"));
    }

    // Per-example clipping (`forward_backward_clipped`) against the naive oracle: one
    // `forward_backward` per row (each example's own gradient), its norm, Opacus's
    // factor min(1, C/(‖g_i‖ + 1e-6)), and the sum, all accumulated in f64.

    struct Naive {
        grad: Vec<f64>,
        clipped: usize,
        norm_sum: f64,
    }

    #[allow(clippy::too_many_arguments)]
    fn naive_clipped(
        mlp: &Mlp,
        params: &[f32],
        x: &[f32],
        y: &[f32],
        rows: usize,
        samples: &[u32],
        key: Option<(u64, u64)>,
        c: f64,
    ) -> Naive {
        let input = mlp.spec().input;
        let mut out = Naive {
            grad: vec![0.0; params.len()],
            clipped: 0,
            norm_sum: 0.0,
        };
        let mut g = vec![0f32; params.len()];
        for r in 0..rows {
            let k = key.map(|(seed, step)| DropoutKey {
                seed,
                step,
                samples: &samples[r..r + 1],
            });
            mlp.forward_backward(
                params,
                &x[r * input..(r + 1) * input],
                &y[r..r + 1],
                1,
                &mut g,
                k.as_ref(),
            )
            .unwrap();
            let norm = g.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let f = (c / (norm + 1e-6)).min(1.0);
            out.norm_sum += norm;
            if f < 1.0 {
                out.clipped += 1;
            }
            for (o, &v) in out.grad.iter_mut().zip(&g) {
                *o += f * v as f64;
            }
        }
        out
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let diff: f64 = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|w| w * w).sum();
        (diff / norm.max(1e-300)).sqrt()
    }

    /// The output activation and width each loss is used with.
    fn head_of(loss: LossKind) -> (Activation, usize) {
        match loss {
            LossKind::SparseCategoricalCrossentropy | LossKind::CategoricalCrossentropy => {
                (Activation::Softmax, 3)
            }
            LossKind::BinaryCrossentropy => (Activation::Sigmoid, 1),
            LossKind::Mse => (Activation::Linear, 1),
            LossKind::Mae => (Activation::Tanh, 1),
            LossKind::Huber => (Activation::Linear, 1),
        }
    }

    /// Every hidden activation × every loss × bias on/off × a dropout layer or not, on
    /// shapes drawn from a seeded generator, at a C that clips nearly every row and one
    /// that clips none. Returns the worst relative error seen.
    fn check_clipping(dtype: DType, tol: f64) -> f64 {
        use Activation::*;
        let losses = [
            LossKind::SparseCategoricalCrossentropy,
            LossKind::CategoricalCrossentropy,
            LossKind::BinaryCrossentropy,
            LossKind::Mse,
            LossKind::Mae,
            LossKind::Huber,
        ];
        let mut shapes = Rng::new(77);
        let mut worst = 0f64;
        let mut clipped_some = false;
        for hidden in [Relu, LeakyRelu, Elu, Gelu, Sigmoid, Tanh, Softmax, Linear] {
            for loss in losses {
                for (bias, drop) in [(true, false), (false, false), (true, true), (false, true)] {
                    let input = 2 + shapes.below(5) as usize;
                    let rows = 1 + shapes.below(8) as usize;
                    let (out_act, outputs) = head_of(loss);
                    let mut layers = vec![LayerSpec::dense(1 + shapes.below(6) as usize, hidden)];
                    if drop {
                        layers.push(LayerSpec::dropout(0.4));
                    }
                    layers.push(LayerSpec::dense(1 + shapes.below(6) as usize, hidden));
                    layers.push(LayerSpec::dense(outputs, out_act));
                    for l in layers.iter_mut() {
                        l.use_bias = bias;
                    }
                    let s = ModelSpec { input, layers };
                    let mut params = s.init_params(shapes.below(1000));
                    let mut r = Rng::new(shapes.below(1000));
                    for p in params.iter_mut() {
                        *p += 0.2 * r.normal() as f32;
                    }
                    let (x, y) = batch(rows, input, shapes.below(1000), loss);
                    let samples: Vec<u32> = (0..rows as u32).map(|i| 5 * i + 2).collect();
                    let mlp = Mlp::with_dtype(s.clone(), loss, dtype);
                    let key = drop.then_some((4u64, 9u64));
                    let dkey = key.map(|(seed, step)| DropoutKey {
                        seed,
                        step,
                        samples: &samples,
                    });
                    for c in [1e-3, 1e9] {
                        let want = naive_clipped(&mlp, &params, &x, &y, rows, &samples, key, c);
                        let mut got = vec![0f32; s.num_params()];
                        let (sums, stats) = mlp
                            .forward_backward_clipped(
                                &params,
                                &x,
                                &y,
                                rows,
                                &mut got,
                                dkey.as_ref(),
                                c,
                            )
                            .unwrap();
                        let e = rel_err(&got, &want.grad);
                        let case = format!(
                            "{dtype:?} {hidden:?} {loss:?} bias={bias} dropout={drop} \
                             rows={rows} C={c}"
                        );
                        assert!(e <= tol, "{case}: relative error {e:e}");
                        worst = worst.max(e);
                        assert_eq!(stats.rows, rows, "{case}");
                        assert_eq!(stats.clipped, want.clipped, "{case}");
                        assert!(
                            (stats.norm_sum - want.norm_sum).abs() <= 1e-4 * want.norm_sum,
                            "{case}: norm sum {} vs {}",
                            stats.norm_sum,
                            want.norm_sum
                        );
                        assert_eq!(sums.count, rows as f64);
                        if c > 1.0 {
                            assert_eq!(stats.clipped, 0, "{case}");
                        } else {
                            clipped_some |= stats.clipped == rows;
                            // The clipped sum's norm is at most rows·C.
                            let norm = got.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
                            assert!(norm.sqrt() <= rows as f64 * c * (1.0 + 1e-5), "{case}");
                        }
                    }
                }
            }
        }
        assert!(clipped_some, "the small C never clipped a whole batch");
        worst
    }

    #[test]
    fn clipped_gradients_match_the_per_example_loop_in_f64() {
        let worst = check_clipping(DType::F64, 1e-5);
        eprintln!("f64 model: worst relative error {worst:e}");
    }

    #[test]
    fn clipped_gradients_match_the_per_example_loop_in_f32() {
        let worst = check_clipping(DType::F32, 1e-5);
        eprintln!("f32 model: worst relative error {worst:e}");
    }

    #[test]
    fn clipping_with_a_huge_bound_is_the_plain_gradient_bit_for_bit() {
        // c_i = min(1, C/(‖g_i‖ + 1e-6)) is exactly 1, and multiplying δ by 1 changes no
        // bit, so the clipped path must give the plain path's bytes.
        let mut s = spec(
            &[Activation::Relu, Activation::Tanh, Activation::Softmax],
            3,
        );
        s.layers.insert(1, LayerSpec::dropout(0.3));
        s.layers[2].use_bias = false;
        let loss = LossKind::SparseCategoricalCrossentropy;
        let params = s.init_params(3);
        let rows = 9;
        let (x, y) = batch(rows, s.input, 4, loss);
        let samples: Vec<u32> = (0..rows as u32).collect();
        let key = DropoutKey {
            seed: 1,
            step: 1,
            samples: &samples,
        };
        for dtype in [DType::F32, DType::F64] {
            let mlp = Mlp::with_dtype(s.clone(), loss, dtype);
            let mut plain = vec![0f32; s.num_params()];
            let mut clipped = vec![1f32; s.num_params()];
            let a = mlp
                .forward_backward(&params, &x, &y, rows, &mut plain, Some(&key))
                .unwrap();
            let (b, stats) = mlp
                .forward_backward_clipped(&params, &x, &y, rows, &mut clipped, Some(&key), 1e30)
                .unwrap();
            assert_eq!(a, b);
            assert_eq!(stats.clipped, 0);
            assert!(plain
                .iter()
                .zip(&clipped)
                .all(|(p, c)| p.to_bits() == c.to_bits()));
        }
    }

    #[test]
    fn clipping_an_empty_batch_gives_zero_and_a_bad_bound_is_refused() {
        let s = spec(&[Activation::Relu, Activation::Softmax], 3);
        let mlp = Mlp::new(s.clone(), LossKind::SparseCategoricalCrossentropy);
        let params = s.init_params(1);
        let mut g = vec![1f32; s.num_params()];
        let (sums, stats) = mlp
            .forward_backward_clipped(&params, &[], &[], 0, &mut g, None, 1.0)
            .unwrap();
        assert!(g.iter().all(|&v| v == 0.0));
        assert_eq!(sums, MetricSums::new(3));
        assert_eq!(stats, ClipStats::default());
        for bad in [0.0, -1.0, f64::NAN] {
            assert!(mlp
                .forward_backward_clipped(&params, &[], &[], 0, &mut g, None, bad)
                .is_err());
        }
    }
}
