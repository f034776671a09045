//! How an epoch's samples are split into global batches and each batch across ranks.
//!
//! Pure functions shared by the coordinator (which streams each worker its rows) and the
//! workers (which need each step's local and global batch sizes). The contract:
//! - the epoch order is a permutation of the training samples seeded by (seed, epoch);
//! - global batch k is `order[k*B .. min((k+1)*B, n)]`, so the last batch may be short;
//! - within a batch of m samples, rank r takes the contiguous slice
//!   `[r*m/world, (r+1)*m/world)`, so every sample is used exactly once per epoch and a
//!   rank may get zero rows (it still joins the all-reduce with a zero gradient).

use crate::rng::{derive_seed, Rng};

/// Stream id for the epoch permutation (mixed into the seed).
const PERMUTATION_STREAM: u64 = 0x5045_524D; // "PERM"
/// Stream id for DP-SGD's Poisson samples.
const POISSON_STREAM: u64 = 0x504F_4953; // "POIS"

/// Steps in one DP-SGD epoch: `N / B` Poisson samples of expected size `B`, at least 1.
pub fn poisson_steps_per_epoch(samples: usize, batch: usize) -> usize {
    (samples / batch.max(1)).max(1)
}

/// The Poisson sample of one DP-SGD step: every index in `0..samples` is included
/// independently with probability `rate`, drawn from (seed, epoch, step within the
/// epoch) alone, so it is the same whatever the world size and whichever process draws
/// it. Ascending. Drawn by geometric skips (`O(rate * samples)` work), with the
/// portable `libm` logarithm so the coordinator and every worker get the same bits.
pub fn poisson_batch(seed: u64, epoch: u32, step: usize, samples: usize, rate: f64) -> Vec<u32> {
    let mut out = Vec::new();
    if samples == 0 || rate.is_nan() || rate <= 0.0 {
        return out;
    }
    if rate >= 1.0 {
        return (0..samples as u32).collect();
    }
    let mut rng = Rng::new(derive_seed(
        seed,
        &[POISSON_STREAM, epoch as u64, step as u64],
    ));
    let log_miss = libm::log1p(-rate);
    let mut i = 0usize;
    loop {
        // P(skip >= k) = (1 - rate)^k: the gap before the next included index.
        let u = 1.0 - rng.next_f64(); // in (0, 1]
        let skip = libm::floor(libm::log(u) / log_miss);
        if skip.is_nan() || skip >= (samples - i) as f64 {
            break;
        }
        i += skip as usize;
        out.push(i as u32);
        i += 1;
        if i >= samples {
            break;
        }
    }
    out
}

/// What `rank` of `world` trains on in `epoch` under Poisson sampling, from step
/// `start_batch` of `steps` on: the indices in step order and the row count of each
/// step. Each step's sample is split into contiguous rank slices as a permutation's
/// batch is ([`rank_slice`]).
#[allow(clippy::too_many_arguments)]
pub fn poisson_rank_epoch(
    seed: u64,
    epoch: u32,
    samples: usize,
    rate: f64,
    steps: usize,
    rank: usize,
    world: usize,
    start_batch: usize,
) -> (Vec<u32>, Vec<usize>) {
    let mut idx = Vec::new();
    let mut lens = Vec::with_capacity(steps.saturating_sub(start_batch));
    for step in start_batch..steps {
        let batch = poisson_batch(seed, epoch, step, samples, rate);
        let (a, b) = rank_slice(batch.len(), rank, world);
        idx.extend_from_slice(&batch[a..b]);
        lens.push(b - a);
    }
    (idx, lens)
}

/// Number of optimizer steps in one epoch.
pub fn steps_per_epoch(samples: usize, batch: usize) -> usize {
    samples.div_ceil(batch.max(1))
}

/// Size of global batch `step` (0-based within the epoch).
pub fn global_batch_len(samples: usize, batch: usize, step: usize) -> usize {
    let start = step * batch;
    samples.saturating_sub(start).min(batch)
}

/// The slice `[start, end)` of a batch of `m` samples that `rank` of `world` takes.
pub fn rank_slice(m: usize, rank: usize, world: usize) -> (usize, usize) {
    (rank * m / world, (rank + 1) * m / world)
}

/// The epoch's sample order: a permutation of `0..samples` from (seed, epoch).
pub fn epoch_order(seed: u64, epoch: u32, samples: usize) -> Vec<u32> {
    Rng::new(derive_seed(seed, &[PERMUTATION_STREAM, epoch as u64])).permutation(samples)
}

/// The sample indices `rank` trains on in `epoch`, in step order.
pub fn rank_epoch_indices(
    seed: u64,
    epoch: u32,
    samples: usize,
    batch: usize,
    rank: usize,
    world: usize,
) -> Vec<u32> {
    rank_epoch_indices_from(seed, epoch, samples, batch, rank, world, 0)
}

/// The sample indices `rank` trains on in `epoch` from global batch `start_batch` on:
/// a generation that starts mid-epoch re-splits the batches that remain over its own
/// world, so across generations every example is still used exactly once per epoch.
pub fn rank_epoch_indices_from(
    seed: u64,
    epoch: u32,
    samples: usize,
    batch: usize,
    rank: usize,
    world: usize,
    start_batch: usize,
) -> Vec<u32> {
    let order = epoch_order(seed, epoch, samples);
    let mut out = Vec::with_capacity(samples / world.max(1) + batch);
    for step in start_batch..steps_per_epoch(samples, batch) {
        let start = step * batch;
        let m = global_batch_len(samples, batch, step);
        let (a, b) = rank_slice(m, rank, world);
        out.extend_from_slice(&order[start + a..start + b]);
    }
    out
}

/// Local batch sizes of `rank` for every step of an epoch.
pub fn rank_batch_lens(samples: usize, batch: usize, rank: usize, world: usize) -> Vec<usize> {
    rank_batch_lens_from(samples, batch, rank, world, 0)
}

/// Local batch sizes of `rank` for the steps of an epoch from global batch `start_batch`.
pub fn rank_batch_lens_from(
    samples: usize,
    batch: usize,
    rank: usize,
    world: usize,
    start_batch: usize,
) -> Vec<usize> {
    (start_batch..steps_per_epoch(samples, batch))
        .map(|step| {
            let (a, b) = rank_slice(global_batch_len(samples, batch, step), rank, world);
            b - a
        })
        .collect()
}

/// A static split of `0..samples` into `world` contiguous parts (validation and test sets,
/// which are evaluated, not trained on).
pub fn static_range(samples: usize, rank: usize, world: usize) -> (usize, usize) {
    rank_slice(samples, rank, world)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_samples_have_the_expected_size_and_do_not_depend_on_the_world() {
        let (n, q, seed) = (10_000usize, 256.0 / 10_000.0, 9u64);
        let steps = poisson_steps_per_epoch(n, 256);
        assert_eq!(steps, 39);
        let mut total = 0usize;
        let mut hits = vec![0u32; n];
        for epoch in 0..20u32 {
            for step in 0..steps {
                let b = poisson_batch(seed, epoch, step, n, q);
                assert!(b.windows(2).all(|w| w[0] < w[1]));
                total += b.len();
                b.iter().for_each(|&i| hits[i as usize] += 1);
            }
        }
        // 780 draws of Binomial(10000, 0.0256): mean 256, sd of the total sqrt(780*249.4).
        let draws = (20 * steps) as f64;
        let mean = total as f64 / draws;
        let sd_of_mean = (n as f64 * q * (1.0 - q) / draws).sqrt();
        assert!((mean - 256.0).abs() < 5.0 * sd_of_mean, "mean batch {mean}");
        // Early and late indices are as likely (no bias from the skips).
        let first: u32 = hits[..n / 2].iter().sum();
        let second: u32 = hits[n / 2..].iter().sum();
        let diff = (first as f64 - second as f64).abs();
        assert!(diff < 5.0 * (total as f64).sqrt(), "{first} vs {second}");
        // The union of the rank slices is the step's sample, for every world size.
        for world in 1..=5 {
            let mut all: Vec<u32> = Vec::new();
            let mut lens_sum = vec![0usize; steps - 3];
            for rank in 0..world {
                let (idx, lens) = poisson_rank_epoch(seed, 4, n, q, steps, rank, world, 3);
                assert_eq!(idx.len(), lens.iter().sum::<usize>());
                lens.iter().enumerate().for_each(|(i, l)| lens_sum[i] += l);
                all.extend(idx);
            }
            all.sort_unstable();
            let mut want: Vec<u32> = (3..steps)
                .flat_map(|s| poisson_batch(seed, 4, s, n, q))
                .collect();
            want.sort_unstable();
            assert_eq!(all, want, "world {world}");
            for (i, l) in lens_sum.iter().enumerate() {
                assert_eq!(*l, poisson_batch(seed, 4, i + 3, n, q).len());
            }
        }
    }

    #[test]
    fn poisson_edge_rates() {
        assert!(poisson_batch(1, 0, 0, 100, 0.0).is_empty());
        assert_eq!(poisson_batch(1, 0, 0, 5, 1.0), vec![0, 1, 2, 3, 4]);
        assert!(poisson_batch(1, 0, 0, 0, 0.5).is_empty());
        assert_eq!(poisson_steps_per_epoch(100, 256), 1);
    }

    #[test]
    fn a_generation_change_mid_epoch_still_uses_every_sample_once() {
        let (samples, batch, seed) = (103usize, 8usize, 5u64);
        // Three ranks take batches 0..5, then two ranks the rest.
        let mut seen: Vec<u32> = Vec::new();
        for rank in 0..3 {
            let all = rank_epoch_indices(seed, 1, samples, batch, rank, 3);
            let lens = rank_batch_lens(samples, batch, rank, 3);
            let first: usize = lens[..5].iter().sum();
            seen.extend_from_slice(&all[..first]);
        }
        for rank in 0..2 {
            let rest = rank_epoch_indices_from(seed, 1, samples, batch, rank, 2, 5);
            let lens = rank_batch_lens_from(samples, batch, rank, 2, 5);
            assert_eq!(rest.len(), lens.iter().sum::<usize>());
            seen.extend_from_slice(&rest);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..samples as u32).collect::<Vec<_>>());
    }

    #[test]
    fn every_sample_exactly_once_per_epoch_for_any_world() {
        for samples in [1usize, 2, 31, 32, 33, 100, 1001] {
            for batch in [1usize, 3, 32, 64] {
                for world in 1..=5 {
                    let mut seen = vec![0u8; samples];
                    for rank in 0..world {
                        let idx = rank_epoch_indices(9, 2, samples, batch, rank, world);
                        let lens = rank_batch_lens(samples, batch, rank, world);
                        assert_eq!(idx.len(), lens.iter().sum::<usize>());
                        for i in idx {
                            seen[i as usize] += 1;
                        }
                    }
                    assert!(
                        seen.iter().all(|&c| c == 1),
                        "n={samples} b={batch} w={world}"
                    );
                }
            }
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // indexes three parallel per-rank tables
    fn global_batches_do_not_depend_on_world_size() {
        // Concatenating the ranks' slices of each batch gives the same batch for 1 and 3
        // workers: the property that makes 1-worker and 3-worker runs agree.
        let (samples, batch) = (100, 32);
        let one = rank_epoch_indices(1, 0, samples, batch, 0, 1);
        let per_rank: Vec<Vec<u32>> = (0..3)
            .map(|r| rank_epoch_indices(1, 0, samples, batch, r, 3))
            .collect();
        let lens: Vec<Vec<usize>> = (0..3)
            .map(|r| rank_batch_lens(samples, batch, r, 3))
            .collect();
        let mut cursor = [0usize; 3];
        let mut rebuilt = Vec::new();
        for step in 0..steps_per_epoch(samples, batch) {
            for r in 0..3 {
                let l = lens[r][step];
                rebuilt.extend_from_slice(&per_rank[r][cursor[r]..cursor[r] + l]);
                cursor[r] += l;
            }
        }
        assert_eq!(one, rebuilt);
    }

    #[test]
    fn epochs_are_shuffled_differently() {
        assert_ne!(epoch_order(1, 0, 50), epoch_order(1, 1, 50));
        assert_eq!(epoch_order(1, 3, 50), epoch_order(1, 3, 50));
    }
}
