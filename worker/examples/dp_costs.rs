//! What DP-SGD's two worker stages cost on one thread, outside any job: per-example
//! clipping (`forward_backward_clipped` against `forward_backward`) and one step's noise
//! (`NoiseHook`, drawn on the calling thread), for the big MLP (784-1024-1024-10, 256
//! rows) and the seed MLP (100-64-64-10, 32 rows). Medians of 21 runs after a warm-up.
//! Not a test: it prints and never fails on the numbers.
//!
//!     cargo run --release -p ringtrain-worker --example dp_costs
//!
//! `ringtrain bench train` on a DP job measures the whole step (benches/dp_cost.py).

use std::time::Instant;

use ringtrain_worker::dp::{NoiseHook, NoiseSeed};
use ringtrain_worker::loss::LossKind;
use ringtrain_worker::model::{Activation, LayerSpec, Mlp, ModelSpec};
use ringtrain_worker::rng::Rng;
use ringtrain_worker::step::GradientHook;
use ringtrain_worker::WorkerError;

fn median_ms(f: &mut dyn FnMut() -> Result<(), WorkerError>) -> Result<f64, WorkerError> {
    f()?;
    let mut t = Vec::with_capacity(21);
    for _ in 0..21 {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn measure(name: &str, input: usize, hidden: usize, rows: usize) -> Result<(), WorkerError> {
    let spec = ModelSpec {
        input,
        layers: vec![
            LayerSpec::dense(hidden, Activation::Relu),
            LayerSpec::dense(hidden, Activation::Relu),
            LayerSpec::dense(10, Activation::Softmax),
        ],
    };
    let loss = LossKind::SparseCategoricalCrossentropy;
    let mlp = Mlp::new(spec.clone(), loss).with_threads(1);
    let params = spec.init_params(1);
    let mut r = Rng::new(2);
    let x: Vec<f32> = (0..rows * input).map(|_| r.normal() as f32).collect();
    let y: Vec<f32> = (0..rows).map(|_| r.below(10) as f32).collect();
    let p = spec.num_params();
    let mut g = vec![0f32; p];
    let plain = median_ms(&mut || {
        mlp.forward_backward(&params, &x, &y, rows, &mut g, None)
            .map(|_| ())
    })?;
    let clipped = median_ms(&mut || {
        mlp.forward_backward_clipped(&params, &x, &y, rows, &mut g, None, 1.0)
            .map(|_| ())
    })?;
    let mut hook = NoiseHook::synchronous(1.0, p, NoiseSeed::Os)?;
    let mut step = 0u64;
    let noise = median_ms(&mut || {
        step += 1;
        hook.apply(&mut g, step)
    })?;
    println!(
        "{name}: {p} parameters, {rows} rows, 1 thread: forward_backward {plain:.3} ms, \
         clipped {clipped:.3} ms ({:.3}x), noise {noise:.3} ms ({:.1} ns a parameter)",
        clipped / plain,
        noise * 1e6 / p as f64
    );
    Ok(())
}

fn main() -> Result<(), WorkerError> {
    measure("big MLP", 784, 1024, 256)?;
    measure("seed MLP", 100, 64, 32)?;
    Ok(())
}
