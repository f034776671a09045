//! The ring all-reduce schedule and its reductions, as pure functions (no I/O).
//!
//! The buffer is cut into `world` segments. In reduce-scatter round `s` rank `r` sends
//! segment `(r - s) mod n` to its right neighbour and reduces into segment
//! `(r - s - 1) mod n` the one it receives from its left one; after `n - 1` rounds rank
//! `r` holds the full reduction of segment `(r + 1) mod n`. All-gather then circulates
//! the finished segments: in round `s` rank `r` sends segment `(r + 1 - s) mod n` and
//! overwrites segment `(r - s) mod n`. Each finished segment is computed once, by one
//! rank, and copied byte for byte to the others, so every replica ends with identical
//! bytes.
//!
//! [`rounds`] is the whole schedule of one rank; the networked engine
//! ([`crate::engine`]) and the in-memory oracle [`simulate`] both walk it, and both
//! reduce with the same [`Reduction`].

use std::ops::Range;

/// The two phases of a ring all-reduce. The discriminants are the wire codes (the same
/// numbers as the proto `Phase` enum, whose 0 is the gRPC stream's hello).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Each rank reduces what it receives into its own segment.
    ReduceScatter = 1,
    /// Each rank overwrites its segment with the finished one it receives.
    AllGather = 2,
}

impl Phase {
    /// The wire code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The phase of a wire code.
    pub fn from_code(code: u32) -> Option<Phase> {
        match code {
            1 => Some(Phase::ReduceScatter),
            2 => Some(Phase::AllGather),
            _ => None,
        }
    }
}

/// Identity of one chunk of one collective call; every transport carries it and checks
/// it on receive, so a stale, foreign or reordered message is an error, never mixed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// Training step the collective belongs to.
    pub step: u64,
    /// The collective call: see [`op_code`].
    pub op: u64,
    /// Phase of the ring.
    pub phase: Phase,
    /// Round within the phase, `0..world - 1`.
    pub round: u32,
    /// Sub-chunk within the round's segment.
    pub chunk: u32,
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {} op {} {:?} round {} chunk {}",
            self.step, self.op, self.phase, self.round, self.chunk
        )
    }
}

/// The `op` of a collective: its sequence number within the generation in the low 56
/// bits and the [`Reduction::CODE`] in the top 8, so two ranks that disagree on the
/// element type or the reduction fail the tag check instead of mixing bytes. The f32
/// sum has code 0, so its tags are the plain sequence numbers.
pub fn op_code(seq: u64, reduction: u8) -> u64 {
    (seq & ((1 << 56) - 1)) | (u64::from(reduction) << 56)
}

/// An element-wise, associative and commutative reduction the ring applies: the element
/// type travels as its little-endian bytes (the crate refuses big-endian hosts).
pub trait Reduction: 'static {
    /// The element type.
    type Elem: bytemuck::Pod + Default + Send + Sync + std::fmt::Debug + PartialEq;
    /// Carried in the top byte of every chunk's `op`; unique per reduction.
    const CODE: u8;
    /// `dst[i] = dst[i] ⊕ src[i]`; the slices have equal lengths.
    fn reduce(dst: &mut [Self::Elem], src: &[Self::Elem]);
}

/// Sum of f32 (IEEE addition: exact only where the partial sums are, but every replica
/// ends with the same bytes because each segment is reduced on one rank only).
#[derive(Debug, Clone, Copy, Default)]
pub struct SumF32;

impl Reduction for SumF32 {
    type Elem = f32;
    const CODE: u8 = 0;
    fn reduce(dst: &mut [f32], src: &[f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += *s);
    }
}

/// Sum in Z(2^32), wrapping: exact in any order.
#[derive(Debug, Clone, Copy, Default)]
pub struct WrappingSumU32;

impl Reduction for WrappingSumU32 {
    type Elem = u32;
    const CODE: u8 = 1;
    fn reduce(dst: &mut [u32], src: &[u32]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = d.wrapping_add(*s));
    }
}

/// Sum in Z(2^64), wrapping: exact in any order, so secure-aggregation masks cancel.
#[derive(Debug, Clone, Copy, Default)]
pub struct WrappingSumU64;

impl Reduction for WrappingSumU64 {
    type Elem = u64;
    const CODE: u8 = 2;
    fn reduce(dst: &mut [u64], src: &[u64]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = d.wrapping_add(*s));
    }
}

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

/// One round of one rank: the segment it sends to its right neighbour and the one it
/// receives from its left neighbour (reduced into, or overwritten, by `phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Phase of the ring.
    pub phase: Phase,
    /// Round within the phase.
    pub round: usize,
    /// Index of the segment sent.
    pub send: usize,
    /// Index of the segment received.
    pub recv: usize,
}

/// Every round of rank `rank` in a ring of `world`, in order: `world - 1` of
/// reduce-scatter, then `world - 1` of all-gather (none for a world of one).
pub fn rounds(rank: usize, world: usize) -> impl Iterator<Item = Round> {
    let per_phase = world.saturating_sub(1);
    let rs = (0..per_phase).map(move |round| Round {
        phase: Phase::ReduceScatter,
        round,
        send: reduce_scatter_send(rank, round, world),
        recv: reduce_scatter_recv(rank, round, world),
    });
    let ag = (0..per_phase).map(move |round| Round {
        phase: Phase::AllGather,
        round,
        send: all_gather_send(rank, round, world),
        recv: all_gather_recv(rank, round, world),
    });
    rs.chain(ag)
}

/// Splits `buf` into the segment to send (read) and the distinct segment to receive into
/// (written), so both halves of a round can run at once on one buffer without a copy.
///
/// # Panics
/// If the ranges overlap or lie outside `buf`; [`rounds`] never yields such a pair for
/// ranges from [`segments`] (a round's send and receive segments differ when
/// `world >= 2`).
pub fn split_send_recv<T>(
    buf: &mut [T],
    send: Range<usize>,
    recv: Range<usize>,
) -> (&[T], &mut [T]) {
    if send.end <= recv.start {
        let (a, b) = buf.split_at_mut(recv.start);
        (&a[send], &mut b[..recv.len()])
    } else {
        assert!(recv.end <= send.start, "ring segments overlap");
        let (a, b) = buf.split_at_mut(send.start);
        (&b[..send.len()], &mut a[recv])
    }
}

/// Runs the whole ring in memory over `bufs` (one per rank): every rank walks its
/// [`rounds`] in lockstep and reduces with `R`, exactly as [`crate::engine`] does over a
/// network. The oracle the networked ring and the engine's property tests are checked
/// against, bit for bit.
pub fn simulate<R: Reduction>(bufs: &mut [Vec<R::Elem>]) {
    let n = bufs.len();
    if n <= 1 {
        return;
    }
    let segs = segments(bufs[0].len(), n);
    let mut schedules: Vec<_> = (0..n).map(|r| rounds(r, n)).collect();
    for _ in 0..2 * (n - 1) {
        let step: Vec<Round> = schedules.iter_mut().filter_map(|s| s.next()).collect();
        let sent: Vec<Vec<R::Elem>> = (0..n)
            .map(|r| bufs[r][segs[step[r].send].clone()].to_vec())
            .collect();
        for r in 0..n {
            let left = (r + n - 1) % n;
            let dst = &mut bufs[r][segs[step[r].recv].clone()];
            match step[r].phase {
                Phase::ReduceScatter => R::reduce(dst, &sent[left]),
                Phase::AllGather => dst.copy_from_slice(&sent[left]),
            }
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
                let rs: Vec<Round> = rounds(r, n).collect();
                assert_eq!(rs.len(), 2 * (n - 1));
                assert!(rs.iter().all(|x| x.send != x.recv));
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
                simulate::<SumF32>(&mut bufs);
                for b in &bufs {
                    assert_eq!(b, &naive, "world {world} len {len}");
                }
            }
        }
    }

    #[test]
    fn reductions_match_their_definitions() {
        let mut a = [1.5f32, -2.0, 0.25];
        SumF32::reduce(&mut a, &[0.5, 2.0, 0.25]);
        assert_eq!(a, [2.0, 0.0, 0.5]);
        let mut u = [u32::MAX, 7];
        WrappingSumU32::reduce(&mut u, &[2, 3]);
        assert_eq!(u, [1, 10]);
        let mut w = [u64::MAX - 1, 5];
        WrappingSumU64::reduce(&mut w, &[3, u64::MAX]);
        assert_eq!(w, [1, 4]);
        // Distinct codes, and the f32 sum keeps the plain sequence number as its op.
        assert_eq!(op_code(9, SumF32::CODE), 9);
        assert_ne!(
            op_code(9, WrappingSumU32::CODE),
            op_code(9, WrappingSumU64::CODE)
        );
    }

    #[test]
    fn masks_cancel_in_the_simulated_wrapping_sum() {
        // Pairwise masks m_ij added by i and subtracted by j vanish in Z(2^64).
        let mut rng = Rng::new(11);
        let (world, len) = (4, 9);
        let plain: Vec<Vec<u64>> = (0..world)
            .map(|_| (0..len).map(|_| rng.below(1000)).collect())
            .collect();
        let mut bufs = plain.clone();
        for i in 0..world {
            for j in i + 1..world {
                let mask: Vec<u64> = (0..len).map(|_| rng.next_u64()).collect();
                for (x, m) in bufs[i].iter_mut().zip(&mask) {
                    *x = x.wrapping_add(*m);
                }
                for (x, m) in bufs[j].iter_mut().zip(&mask) {
                    *x = x.wrapping_sub(*m);
                }
            }
        }
        simulate::<WrappingSumU64>(&mut bufs);
        let naive: Vec<u64> = (0..len).map(|k| plain.iter().map(|b| b[k]).sum()).collect();
        for b in &bufs {
            assert_eq!(b, &naive);
        }
    }

    #[test]
    fn split_send_recv_gives_disjoint_halves() {
        let mut buf = [0, 1, 2, 3, 4, 5];
        let (s, r) = split_send_recv(&mut buf, 4..6, 0..2);
        assert_eq!(s, &[4, 5]);
        assert_eq!(r, &mut [0, 1]);
        let (s, r) = split_send_recv(&mut buf, 0..3, 3..6);
        assert_eq!(s, &[0, 1, 2]);
        assert_eq!(r, &mut [3, 4, 5]);
        let (s, r) = split_send_recv(&mut buf, 2..2, 1..2);
        assert!(s.is_empty());
        assert_eq!(r, &mut [1]);
    }

    #[test]
    fn sub_chunks_cover_the_segment() {
        assert_eq!(sub_chunks(0..10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(sub_chunks(3..3, 4), vec![3..3]);
    }
}
