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
