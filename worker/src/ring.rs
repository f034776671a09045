//! The ring all-reduce schedule, as pure functions (no I/O).
//!
//! The buffer is cut into `world` segments. In reduce-scatter round `s` rank `r` sends
//! segment `(r - s) mod n` to its right neighbour and adds the segment `(r - s - 1) mod n`
//! it receives from its left one; after `n - 1` rounds rank `r` holds the full sum of
//! segment `(r + 1) mod n`. All-gather then circulates the finished segments: in round
//! `s` rank `r` sends segment `(r + 1 - s) mod n` and overwrites segment `(r - s) mod n`.
//! Each finished segment is computed once, by one rank, and copied byte for byte to the
//! others, so every replica ends with identical bytes.

use std::ops::Range;

/// Splits `len` elements into `world` contiguous segments whose sizes differ by at most
/// one; segments may be empty when `len < world`.
pub fn segments(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world)
        .map(|i| (i * len / world)..((i + 1) * len / world))
        .collect()
}

/// Segment rank `rank` sends in reduce-scatter round `round`.
pub fn reduce_scatter_send(rank: usize, round: usize, world: usize) -> usize {
    (rank + world - round % world) % world
}

/// Segment rank `rank` receives (and adds) in reduce-scatter round `round`.
pub fn reduce_scatter_recv(rank: usize, round: usize, world: usize) -> usize {
    (rank + 2 * world - round % world - 1) % world
}

/// Segment rank `rank` sends in all-gather round `round`.
pub fn all_gather_send(rank: usize, round: usize, world: usize) -> usize {
    (rank + 1 + world - round % world) % world
}

/// Segment rank `rank` receives (and overwrites) in all-gather round `round`.
pub fn all_gather_recv(rank: usize, round: usize, world: usize) -> usize {
    (rank + world - round % world) % world
}

/// Splits a segment into sub-chunks of at most `max` elements (at least one chunk, which
/// may be empty, so every round exchanges at least one message).
pub fn sub_chunks(seg: Range<usize>, max: usize) -> Vec<Range<usize>> {
    let max = max.max(1);
    if seg.is_empty() {
        return vec![seg];
    }
    let mut out = Vec::with_capacity(seg.len().div_ceil(max));
    let mut start = seg.start;
    while start < seg.end {
        let end = (start + max).min(seg.end);
        out.push(start..end);
        start = end;
    }
    out
}

/// Runs the whole ring in memory over `bufs` (one per rank), exactly as the network
/// version does. Used to test the schedule and as the oracle for the networked ring.
pub fn simulate(bufs: &mut [Vec<f32>]) {
    let n = bufs.len();
    if n <= 1 {
        return;
    }
    let segs = segments(bufs[0].len(), n);
    for round in 0..n - 1 {
        let sent: Vec<Vec<f32>> = (0..n)
            .map(|r| bufs[r][segs[reduce_scatter_send(r, round, n)].clone()].to_vec())
            .collect();
        for r in 0..n {
            let left = (r + n - 1) % n;
            let seg = segs[reduce_scatter_recv(r, round, n)].clone();
            for (d, s) in bufs[r][seg].iter_mut().zip(&sent[left]) {
                *d += *s;
            }
        }
    }
    for round in 0..n - 1 {
        let sent: Vec<Vec<f32>> = (0..n)
            .map(|r| bufs[r][segs[all_gather_send(r, round, n)].clone()].to_vec())
            .collect();
        for r in 0..n {
            let left = (r + n - 1) % n;
            let seg = segs[all_gather_recv(r, round, n)].clone();
            bufs[r][seg].copy_from_slice(&sent[left]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn sends_match_receives() {
        // What the left neighbour sends in a round is what this rank expects to receive.
        for n in 1usize..8 {
            for r in 0..n {
                let left = (r + n - 1) % n;
                for s in 0..n.saturating_sub(1) {
                    assert_eq!(
                        reduce_scatter_send(left, s, n),
                        reduce_scatter_recv(r, s, n)
                    );
                    assert_eq!(all_gather_send(left, s, n), all_gather_recv(r, s, n));
                }
                // After reduce-scatter, rank r owns segment r+1: the one it sends first
                // in all-gather.
                assert_eq!(all_gather_send(r, 0, n), (r + 1) % n);
            }
        }
    }

    #[test]
    fn simulated_ring_equals_naive_sum_and_replicas_agree() {
        let mut rng = Rng::new(4);
        for world in 1..=6 {
            for len in [0usize, 1, 2, 3, 5, 7, 64, 1000] {
                let mut bufs: Vec<Vec<f32>> = (0..world)
                    .map(|_| {
                        (0..len)
                            .map(|_| (rng.below(2000) as f32 - 1000.0) / 8.0)
                            .collect()
                    })
                    .collect();
                // Small dyadic values: every partial sum is exact, so order cannot matter.
                let naive: Vec<f32> = (0..len).map(|i| bufs.iter().map(|b| b[i]).sum()).collect();
                simulate(&mut bufs);
                for b in &bufs {
                    assert_eq!(b, &naive, "world {world} len {len}");
                }
            }
        }
    }

    #[test]
    fn sub_chunks_cover_the_segment() {
        assert_eq!(sub_chunks(0..10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(sub_chunks(3..3, 4), vec![3..3]);
    }
}
