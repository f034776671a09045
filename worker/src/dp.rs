//! DP-SGD's noise, added by every rank to its local gradient before the all-reduce.
//!
//! With `W` ranks each adding `N(0, σ²C²/W)` per coordinate to its clipped sum, the
//! all-reduced sum carries `N(0, σ²C²)`: the Gaussian mechanism of DP-SGD (Abadi et al.
//! 2016, Algorithm 1) whatever the world size. Each rank only ever sees its own share
//! and the sum, never another rank's plain noise.
//!
//! [`NoiseHook`] is the pipeline's `privatize` stage ([`crate::step::GradientHook`]). It
//! draws the next step's noise on a thread of its own while the step computes (the
//! draw is independent of the gradient), so the stage costs an addition. Samples are
//! `rand_distr`'s ziggurat `StandardNormal` over ChaCha20, a CSPRNG:
//! - [`NoiseSeed::Os`]: seeded from the operating system; nobody can reproduce it. This
//!   is the only mode that gives privacy.
//! - [`NoiseSeed::Deterministic`]: the noise of (step, rank) comes from a generator
//!   seeded by `derive_seed(job seed, [NOISE_STREAM, step, rank])`, so it does not
//!   depend on what was drawn before and a resumed job is byte-identical. Anyone who
//!   knows the job seed can subtract it: for tests only.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use tracing::warn;

use crate::error::WorkerError;
use crate::rng::derive_seed;
use crate::step::GradientHook;

/// The stream tag of DP noise in [`derive_seed`] ("NOISE" in ASCII), apart from
/// dropout's and the data order's streams.
pub const NOISE_STREAM: u64 = 0x4E_4F49_5345;

/// Where the noise generator's seed comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseSeed {
    /// The operating system's entropy (getrandom): private, not reproducible.
    Os,
    /// The job seed and this rank: reproducible, and no privacy at all against anyone
    /// who knows the seed.
    Deterministic {
        /// The job seed.
        seed: u64,
        /// This rank.
        rank: u32,
    },
}

/// A generator of one kind of noise: drawn by the hook itself or by its thread (each
/// holds its own).
enum Source {
    Os(Box<ChaCha20Rng>),
    Deterministic { seed: u64, rank: u32 },
}

impl Source {
    fn new(seed: NoiseSeed) -> Result<Self, WorkerError> {
        Ok(match seed {
            NoiseSeed::Os => Source::Os(Box::new(
                ChaCha20Rng::try_from_os_rng().map_err(|e| WorkerError::Entropy(e.to_string()))?,
            )),
            NoiseSeed::Deterministic { seed, rank } => Source::Deterministic { seed, rank },
        })
    }

    /// Overwrites `buf` with step `step`'s noise of standard deviation `std`.
    fn fill(&mut self, step: u64, std: f64, buf: &mut [f32]) {
        match self {
            Source::Os(rng) => fill_normal(rng, std, buf),
            Source::Deterministic { seed, rank } => {
                let s = derive_seed(*seed, &[NOISE_STREAM, step, u64::from(*rank)]);
                fill_normal(&mut ChaCha20Rng::seed_from_u64(s), std, buf);
            }
        }
    }
}

/// i.i.d. `N(0, std²)` samples, drawn in f64 and rounded once to f32.
fn fill_normal(rng: &mut ChaCha20Rng, std: f64, buf: &mut [f32]) {
    for v in buf.iter_mut() {
        let z: f64 = StandardNormal.sample(rng);
        *v = (std * z) as f32;
    }
}

/// One step's noise ahead: the step it was drawn for (in Os mode any step's will do).
struct Drawn {
    step: u64,
    buf: Vec<f32>,
}

/// Steps of noise drawn ahead: one, while the current step computes.
const PREFETCH_DEPTH: usize = 1;

/// The background drawing thread and its two channels: requests (a step and a buffer to
/// recycle) in, drawn buffers out. At most one request is outstanding, so neither side
/// ever blocks on a full channel.
struct Prefetch {
    requests: Option<SyncSender<Drawn>>,
    ready: Receiver<Drawn>,
    handle: Option<JoinHandle<()>>,
    /// A request was sent and its answer not yet taken.
    pending: bool,
}

impl Prefetch {
    fn spawn(mut source: Source, std: f64) -> std::io::Result<Self> {
        let (requests, inbox) = sync_channel::<Drawn>(PREFETCH_DEPTH);
        let (outbox, ready) = sync_channel::<Drawn>(PREFETCH_DEPTH);
        let handle = std::thread::Builder::new()
            .name("ringtrain-dp-noise".into())
            .spawn(move || {
                // Ends when the hook drops its request sender (or its receiver).
                while let Ok(mut d) = inbox.recv() {
                    source.fill(d.step, std, &mut d.buf);
                    if outbox.send(d).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Prefetch {
            requests: Some(requests),
            ready,
            handle: Some(handle),
            pending: false,
        })
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Closing the request channel ends the thread's loop after at most the one
        // draw in flight, whose answer fits in the channel: the join is bounded.
        self.requests = None;
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                warn!("dp noise thread panicked");
            }
        }
    }
}

/// The `privatize` stage of DP-SGD: adds i.i.d. `N(0, std²)` to every coordinate of
/// this rank's clipped gradient sum, where `std = σ·C/√W` (see the module docs).
///
/// If the background thread cannot be started or dies, the hook draws synchronously
/// from then on (logged once): slower, never wrong.
pub struct NoiseHook {
    std: f64,
    len: usize,
    deterministic: bool,
    /// For draws on the step thread (no prefetched buffer, or the wrong step's).
    source: Source,
    prefetch: Option<Prefetch>,
    /// A buffer to draw into when no prefetch is running.
    spare: Vec<f32>,
}

impl std::fmt::Debug for NoiseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseHook")
            .field("std", &self.std)
            .field("len", &self.len)
            .field("deterministic", &self.deterministic)
            .field("prefetch", &self.prefetch.is_some())
            .finish_non_exhaustive()
    }
}

impl NoiseHook {
    /// A hook adding `N(0, std²)` (the per-rank standard deviation `σ·C/√W`) to
    /// gradients of `len` coordinates, drawing each next step's noise ahead on its own
    /// thread.
    pub fn new(std: f64, len: usize, seed: NoiseSeed) -> Result<Self, WorkerError> {
        let mut hook = Self::synchronous(std, len, seed)?;
        match Prefetch::spawn(Source::new(seed)?, std) {
            Ok(p) => hook.prefetch = Some(p),
            Err(e) => {
                warn!(error = %e, "cannot start the dp noise thread; drawing noise on the step thread")
            }
        }
        Ok(hook)
    }

    /// The same hook without the background thread: every step's noise is drawn when
    /// it is applied.
    pub fn synchronous(std: f64, len: usize, seed: NoiseSeed) -> Result<Self, WorkerError> {
        // NaN is not finite either.
        if !std.is_finite() || std < 0.0 {
            return Err(WorkerError::Plan(format!(
                "dp noise standard deviation must be finite and >= 0, got {std}"
            )));
        }
        let deterministic = matches!(seed, NoiseSeed::Deterministic { .. });
        if deterministic {
            warn!(
                "deterministic_noise is on: noise is reproducible from the job seed; \
                 for tests only, it gives no privacy"
            );
        }
        Ok(NoiseHook {
            std,
            len,
            deterministic,
            source: Source::new(seed)?,
            prefetch: None,
            spare: Vec::new(),
        })
    }

    /// The per-coordinate standard deviation this hook adds.
    pub fn std(&self) -> f64 {
        self.std
    }

    /// Whether the noise is drawn ahead on a background thread (false after it failed).
    pub fn prefetching(&self) -> bool {
        self.prefetch.is_some()
    }

    /// This step's noise: the prefetched buffer when it fits, else drawn now.
    fn take(&mut self, step: u64) -> Vec<f32> {
        let mut drawn = None;
        if let Some(p) = &mut self.prefetch {
            if p.pending {
                p.pending = false;
                match p.ready.recv() {
                    Ok(d) => drawn = Some(d),
                    Err(_) => {
                        warn!(
                            step,
                            "dp noise thread is gone; drawing noise on the step thread"
                        );
                        self.prefetch = None;
                    }
                }
            }
        }
        match drawn {
            Some(d) if d.step == step || !self.deterministic => d.buf,
            other => {
                let mut buf = match other {
                    Some(d) => d.buf,
                    None => std::mem::take(&mut self.spare),
                };
                buf.resize(self.len, 0.0);
                self.source.fill(step, self.std, &mut buf);
                buf
            }
        }
    }

    /// Asks the thread for `step`'s noise in `buf`, or keeps `buf` for the next
    /// synchronous draw.
    fn request(&mut self, step: u64, buf: Vec<f32>) {
        let Some(p) = &mut self.prefetch else {
            self.spare = buf;
            return;
        };
        let sent = match &p.requests {
            Some(tx) => tx.send(Drawn { step, buf }),
            None => Err(std::sync::mpsc::SendError(Drawn { step, buf })),
        };
        match sent {
            Ok(()) => p.pending = true,
            Err(std::sync::mpsc::SendError(d)) => {
                warn!(
                    step,
                    "dp noise thread is gone; drawing noise on the step thread"
                );
                self.prefetch = None;
                self.spare = d.buf;
            }
        }
    }
}

impl GradientHook for NoiseHook {
    fn apply(&mut self, grad: &mut [f32], step: u64) -> Result<(), WorkerError> {
        if grad.len() != self.len {
            return Err(WorkerError::Plan(format!(
                "dp noise: gradient has {} values, the hook was built for {}",
                grad.len(),
                self.len
            )));
        }
        let noise = self.take(step);
        for (g, n) in grad.iter_mut().zip(&noise) {
            *g += *n;
        }
        self.request(step.wrapping_add(1), noise);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn draw(hook: &mut NoiseHook, step: u64) -> Vec<f32> {
        let mut g = vec![0f32; hook.len];
        hook.apply(&mut g, step).unwrap();
        g
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Checks that `v` looks like n i.i.d. N(0, s²) samples, at 5 sigma.
    ///
    /// Mean: x̄ ~ N(0, s²/n), so |x̄| ≤ 5·s/√n.
    /// Variance: with the mean known to be 0, n·S²/s² = Σ(x/s)² ~ χ²(n), which has mean
    /// n and variance 2n; so S²/s² has mean 1 and standard deviation √(2/n), and for
    /// n = 10⁶ the χ² is normal to far better than this bound needs (its skewness is
    /// √(8/n) ≈ 0.003): |S²/s² − 1| ≤ 5·√(2/n) ≈ 0.0071.
    fn assert_normal(v: &[f64], s: f64, what: &str) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| x * x).sum::<f64>() / n;
        assert!(
            mean.abs() <= 5.0 * s / n.sqrt(),
            "{what}: mean {mean} (std {s})"
        );
        let ratio = var / (s * s);
        assert!(
            (ratio - 1.0).abs() <= 5.0 * (2.0 / n).sqrt(),
            "{what}: variance ratio {ratio}"
        );
    }

    const N: usize = 1_000_000;

    #[test]
    fn noise_has_the_asked_mean_and_standard_deviation() {
        for seed in [NoiseSeed::Os, NoiseSeed::Deterministic { seed: 7, rank: 1 }] {
            let mut hook = NoiseHook::new(0.37, N, seed).unwrap();
            assert!(hook.prefetching());
            for step in 1..=2 {
                let v: Vec<f64> = draw(&mut hook, step).iter().map(|&x| x as f64).collect();
                assert_normal(&v, 0.37, &format!("{seed:?} step {step}"));
            }
        }
    }

    #[test]
    fn the_sum_over_ranks_has_variance_sigma_squared_c_squared_for_any_world() {
        let (sigma, c) = (1.1, 0.8);
        for world in [1u32, 2, 3, 5] {
            let std = sigma * c / f64::from(world).sqrt();
            let mut sum = vec![0f64; N];
            for rank in 0..world {
                let seed = NoiseSeed::Deterministic { seed: 99, rank };
                let mut hook = NoiseHook::synchronous(std, N, seed).unwrap();
                for (s, x) in sum.iter_mut().zip(draw(&mut hook, 4)) {
                    *s += x as f64;
                }
            }
            assert_normal(&sum, sigma * c, &format!("world {world}"));
        }
    }

    #[test]
    fn deterministic_noise_depends_on_seed_step_and_rank_only() {
        let det = |seed, rank| NoiseSeed::Deterministic { seed, rank };
        let len = 1000;
        let fresh = |seed, rank, step| {
            draw(
                &mut NoiseHook::new(1.0, len, det(seed, rank)).unwrap(),
                step,
            )
        };
        let base = fresh(3, 0, 3);
        assert_eq!(bits(&base), bits(&fresh(3, 0, 3)));
        assert_ne!(bits(&base), bits(&fresh(3, 1, 3)));
        assert_ne!(bits(&base), bits(&fresh(3, 0, 4)));
        assert_ne!(bits(&base), bits(&fresh(4, 0, 3)));
        // Out of order (the prefetched step 7 is not used for step 3), and in order
        // (step 6's noise came from the thread): the same as fresh hooks.
        for mut hook in [
            NoiseHook::new(1.0, len, det(3, 0)).unwrap(),
            NoiseHook::synchronous(1.0, len, det(3, 0)).unwrap(),
        ] {
            draw(&mut hook, 5);
            assert_eq!(bits(&draw(&mut hook, 6)), bits(&fresh(3, 0, 6)));
            assert_eq!(bits(&draw(&mut hook, 3)), bits(&base));
        }
    }

    #[test]
    fn noise_is_added_to_the_gradient() {
        let seed = NoiseSeed::Deterministic { seed: 1, rank: 2 };
        let noise = draw(&mut NoiseHook::new(0.5, 4, seed).unwrap(), 9);
        let mut g = vec![1.0f32, -2.0, 0.25, 8.0];
        NoiseHook::new(0.5, 4, seed)
            .unwrap()
            .apply(&mut g, 9)
            .unwrap();
        let want: Vec<f32> = [1.0f32, -2.0, 0.25, 8.0]
            .iter()
            .zip(&noise)
            .map(|(a, b)| a + b)
            .collect();
        assert_eq!(g, want);
        // Zero std adds exactly nothing; a wrong length is refused.
        let mut hook = NoiseHook::new(0.0, 4, seed).unwrap();
        let mut g = vec![1.0f32, -2.0, 0.25, 8.0];
        hook.apply(&mut g, 1).unwrap();
        assert_eq!(g, [1.0, -2.0, 0.25, 8.0]);
        assert!(hook.apply(&mut [0.0; 3], 2).is_err());
        assert!(NoiseHook::new(-1.0, 4, seed).is_err());
        assert!(NoiseHook::new(f64::NAN, 4, seed).is_err());
    }

    #[test]
    fn os_noise_differs_between_hooks_and_steps() {
        let mut a = NoiseHook::new(1.0, 1000, NoiseSeed::Os).unwrap();
        let mut b = NoiseHook::new(1.0, 1000, NoiseSeed::Os).unwrap();
        let (a1, b1) = (draw(&mut a, 1), draw(&mut b, 1));
        assert_ne!(bits(&a1), bits(&b1));
        assert_ne!(bits(&a1), bits(&draw(&mut a, 1)));
    }
}
