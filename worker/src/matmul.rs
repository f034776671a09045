//! The matrix product of the dense layers, split across the worker's compute threads.
//!
//! candle-core's own `matmul` hands every GEMM to rayon, and on this project's 2-core
//! machine the second thread made the large MLP *slower* (BENCHMARKS.md). Here a product
//! `a · b` is cut into contiguous blocks of output rows, one per thread, and each block is
//! an ordinary single-threaded call of the `gemm` kernels candle uses (AVX-512 where the
//! CPU has it, picked at run time). A block writes only its own rows of the result.
//!
//! **The result does not depend on the thread count.** For all but small matrices `gemm`
//! blocks the reduction dimension by a size that depends on k and the cache sizes only,
//! and each output element is one FMA chain over k in that order, so cutting the rows
//! changes which thread computes an element, not how. Small products take other paths
//! (`gemm` 0.19: a fixed k block of 512 when both sides are at most 64, a horizontal
//! kernel when the output has at most 256 elements), so a product is only split when
//! every piece stays clear of them: more than 64 rows a piece and at least 16 columns.
//! `split_rows_is_bit_identical` pins this, including a shape that broke a looser rule.
//!
//! This is the crate's only `unsafe`: `gemm::gemm` takes raw pointers and strides. The
//! bounds it relies on are checked before the call (see [`span`]).
#![allow(unsafe_code)]

use candle_core::{DType, Layout, Storage, Tensor, WithDType};

use crate::WorkerError;

/// Fewest output rows a thread is given: above gemm's small-matrix threshold (64).
const MIN_ROWS_PER_THREAD: usize = 65;

/// Fewest output columns for a split (with ≥ 65 rows a piece, the piece then has more
/// than 256 outputs and never takes gemm's horizontal small-output kernel).
const MIN_SPLIT_COLS: usize = 16;

/// Products with fewer multiply-adds than this stay on one thread: about 70 µs of work
/// at this machine's single-core GEMM speed, where starting a scoped thread costs tens of
/// microseconds. (The seed MLP's products are all below it.)
const MIN_SPLIT_MACS: usize = 1 << 23;

/// A read-only strided view of a `rows × cols` matrix inside a slice. Element (i, j) is
/// `data[offset + i·rs + j·cs]`; construction checks that every element is in bounds.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows × cols` matrix filling `data`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Result<Self, WorkerError> {
        if data.len() != rows * cols {
            return Err(WorkerError::Plan(format!(
                "a {rows}×{cols} matrix needs {} values, got {}",
                rows * cols,
                data.len()
            )));
        }
        Self::strided(data, 0, rows, cols, cols, 1)
    }

    /// A view with explicit offset and strides.
    pub fn strided(
        data: &'a [T],
        offset: usize,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Result<Self, WorkerError> {
        // Checked: with huge strides the furthest index could wrap past the bound.
        let last = if rows == 0 || cols == 0 {
            Some(0)
        } else {
            (rows - 1)
                .checked_mul(rs)
                .zip((cols - 1).checked_mul(cs))
                .and_then(|(r, c)| r.checked_add(c))
                .and_then(|x| x.checked_add(offset))
                .and_then(|x| x.checked_add(1))
        };
        if last.is_none_or(|l| l > data.len())
            || rs > isize::MAX as usize
            || cs > isize::MAX as usize
        {
            return Err(WorkerError::Plan(format!(
                "a {rows}×{cols} view (offset {offset}, strides {rs}, {cs}) reaches past its \
                 {} stored values",
                data.len()
            )));
        }
        Ok(MatRef {
            data,
            offset,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// The transpose, as a view of the same storage.
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// The element types [`gemm_into`] accepts (gemm panics on others).
pub trait GemmFloat: WithDType + 'static + private::Sealed {}
impl GemmFloat for f32 {}
impl GemmFloat for f64 {}
mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`), where `dst` is `a.rows × b.cols`
/// row-major, on up to `threads` threads.
pub fn gemm_into<T: GemmFloat>(
    dst: &mut [T],
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
    threads: usize,
) -> Result<(), WorkerError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(WorkerError::Plan(format!(
            "matmul shape mismatch: {m}×{k} times {}×{n}",
            b.rows
        )));
    }
    if dst.len() != m * n {
        return Err(WorkerError::Plan(format!(
            "matmul output holds {} values, a {m}×{n} product needs {}",
            dst.len(),
            m * n
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum.
        if !accumulate {
            dst.fill(T::zero());
        }
        return Ok(());
    }
    // Rows [r, r + rows) of the product into `out` (rows × n, row-major).
    let block = |r: usize, out: &mut [T]| {
        let rows = out.len() / n;
        // SAFETY: `MatRef` construction proved that every element (i, j) of `a` and `b`
        // is inside its slice; rows r..r+rows of `a` are a sub-view (r + rows ≤ m), so
        // every address gemm forms is in bounds. Strides fit in isize (checked there).
        // `out` is exactly rows×n, row-major (row stride n, column stride 1), borrowed
        // mutably by this call alone. gemm computes out = alpha·out + beta·(a·b), reading
        // `out` only when `read_dst` is set; `Parallelism::None` keeps it on this thread.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.data.as_ptr().add(a.offset + r * a.rs),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr().add(b.offset),
                b.cs as isize,
                b.rs as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    let threads = if m.saturating_mul(n).saturating_mul(k) < MIN_SPLIT_MACS || n < MIN_SPLIT_COLS {
        1
    } else {
        threads.min(m / MIN_ROWS_PER_THREAD).max(1)
    };
    if threads == 1 {
        block(0, dst);
    } else {
        // Even pieces: the first m % threads get one row more, so every piece has at
        // least m / threads ≥ MIN_ROWS_PER_THREAD rows (a ceil-sized split could leave
        // a short last piece on gemm's small-matrix path).
        let (base, extra) = (m / threads, m % threads);
        std::thread::scope(|s| {
            let mut rest: &mut [T] = dst;
            let mut row = 0;
            let mut first = None;
            for t in 0..threads {
                let rows = base + usize::from(t < extra);
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(rows * n);
                rest = tail;
                if t == 0 {
                    first = Some(piece);
                } else {
                    let block = &block;
                    s.spawn(move || block(row, piece));
                }
                row += rows;
            }
            if let Some(piece) = first {
                block(0, piece);
            }
        });
    }
    Ok(())
}

/// Runs `f` on a CPU tensor's values viewed as a matrix (a 2-D tensor of dtype `T`).
pub fn with_view<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(MatRef<'_, T>) -> Result<R, WorkerError>,
) -> Result<R, WorkerError> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(WorkerError::Plan("matmul runs on CPU tensors only".into()));
    };
    f(view(cpu.as_slice::<T>()?, layout)?)
}

/// Runs `f` on a contiguous CPU tensor's values, in row-major order.
pub fn with_contiguous<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R, WorkerError>,
) -> Result<R, WorkerError> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(WorkerError::Plan("expected a CPU tensor".into()));
    };
    match layout.contiguous_offsets() {
        Some((lo, hi)) => f(&cpu.as_slice::<T>()?[lo..hi]),
        None => Err(WorkerError::Plan("expected a contiguous tensor".into())),
    }
}

fn view<'a, T>(data: &'a [T], layout: &Layout) -> Result<MatRef<'a, T>, WorkerError> {
    let (&[rows, cols], &[rs, cs]) = (layout.dims(), layout.stride()) else {
        return Err(WorkerError::Plan(format!(
            "matmul needs 2-D operands, got shape {:?}",
            layout.dims()
        )));
    };
    MatRef::strided(data, layout.start_offset(), rows, cols, rs, cs)
}

/// `a · b` for 2-D f32 or f64 tensors on the CPU, on up to `threads` threads. Accepts any
/// strides, so `t.t()` needs no copy.
pub fn matmul(a: &Tensor, b: &Tensor, threads: usize) -> Result<Tensor, WorkerError> {
    fn product<T: GemmFloat>(
        a: &Tensor,
        b: &Tensor,
        threads: usize,
    ) -> Result<Tensor, WorkerError> {
        let (dst, rows, cols) = with_view::<T, _>(a, |a| {
            with_view::<T, _>(b, |b| {
                let mut dst = vec![T::zero(); a.rows * b.cols];
                gemm_into(&mut dst, a, b, false, threads)?;
                Ok((dst, a.rows, b.cols))
            })
        })?;
        Ok(Tensor::from_vec(dst, (rows, cols), a.device())?)
    }
    match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => product::<f32>(a, b, threads),
        (DType::F64, DType::F64) => product::<f64>(a, b, threads),
        (x, y) => Err(WorkerError::Plan(format!(
            "matmul supports f32 and f64 operands of one dtype, got {x:?} and {y:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn flat<T: WithDType>(t: &Tensor) -> Vec<T> {
        t.flatten_all().unwrap().to_vec1::<T>().unwrap()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
    }

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_the_naive_product_with_transposed_views() {
        let (m, k, n) = (37, 129, 65);
        let a: Vec<f64> = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0)
            .collect();
        let b: Vec<f64> = (0..k * n)
            .map(|i| ((i * 104_729) % 97) as f64 / 48.0 - 1.0)
            .collect();
        let want = naive(&a, &b, m, k, n);
        let ta = Tensor::from_slice(&a, (m, k), &Device::Cpu).unwrap();
        let tb = Tensor::from_slice(&b, (k, n), &Device::Cpu).unwrap();
        let got: Vec<f64> = flat(&matmul(&ta, &tb, 1).unwrap());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9, "{g} vs {w}");
        }
        // (bᵀ·aᵀ)ᵀ through strided (transposed) views, in f32.
        let ta32 = ta.to_dtype(DType::F32).unwrap();
        let tb32 = tb.to_dtype(DType::F32).unwrap();
        let bt_at = matmul(&tb32.t().unwrap(), &ta32.t().unwrap(), 3).unwrap();
        let got32: Vec<f32> = flat(&bt_at.t().unwrap());
        for (g, w) in got32.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-3, "{g} vs {w}");
        }
        // Agrees with candle's own product exactly in f64 up to rounding.
        let candle: Vec<f64> = flat(&ta.matmul(&tb).unwrap());
        for (c, o) in candle.iter().zip(&got) {
            assert!((c - o).abs() < 1e-9);
        }
    }

    #[test]
    fn narrowed_views_and_bad_shapes() {
        let a = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        // Rows 1..3 of a: a view with a start offset.
        let rows = a.narrow(0, 1, 2).unwrap();
        let eye = Tensor::eye(6, DType::F32, &Device::Cpu).unwrap();
        let got = matmul(&rows, &eye, 2).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got[0], vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        assert_eq!(got[1], vec![12.0, 13.0, 14.0, 15.0, 16.0, 17.0]);
        let err = matmul(&a, &a, 1).unwrap_err().to_string();
        assert!(err.contains("shape mismatch"), "{err}");
        let empty = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
        let z = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            matmul(&empty, &z, 2).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0.0; 2]; 3]
        );
    }

    #[test]
    fn split_rows_is_bit_identical() {
        // The shapes of the large MLP's products (forward, weight gradient through a
        // transposed view, input gradient), with ragged sizes too.
        let mut seed = 7u64;
        let mut fill = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        let dev = Device::Cpu;
        // 200 rows in 4 pieces of 50 fell into gemm's small-matrix path and differed in the
        // last bits when pieces could be 32 rows.
        // (196, 784, 64) on 3 threads: a ceil split left a 64-row last piece, which gemm
        // blocks differently (k = 784 > 512).
        for &(m, k, n) in &[
            (256, 784, 1024),
            (200, 3000, 16),
            (197, 1333, 129),
            (196, 784, 64),
        ] {
            assert!(
                m * k * n >= MIN_SPLIT_MACS,
                "{m}x{k}x{n} would not be split"
            );
            let a = Tensor::from_vec(fill(m * k), (m, k), &dev).unwrap();
            let b = Tensor::from_vec(fill(k * n), (k, n), &dev).unwrap();
            let d = Tensor::from_vec(fill(m * n), (m, n), &dev).unwrap();
            let cases = [
                (a.clone(), b.clone()),
                (a.t().unwrap(), d.clone()),
                (d, b.t().unwrap()),
            ];
            for (x, y) in &cases {
                let one: Vec<f32> = flat(&matmul(x, y, 1).unwrap());
                for t in [2, 3, 4] {
                    let many: Vec<f32> = flat(&matmul(x, y, t).unwrap());
                    assert!(
                        same_bits(&one, &many),
                        "{m}x{k}x{n} with {t} threads differs from 1 thread"
                    );
                }
            }
        }
    }

    /// The same property over random shapes that qualify for a split (including ragged
    /// row counts and thread counts that do not divide them).
    #[test]
    fn split_is_bit_identical_for_random_shapes() {
        let mut state = 99u64;
        let mut below = |lo: usize, hi: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + ((state >> 33) as usize) % (hi - lo)
        };
        let dev = Device::Cpu;
        let mut tested = 0;
        while tested < 25 {
            let (m, k, n) = (below(130, 700), below(1, 3000), below(16, 400));
            if m * k * n < MIN_SPLIT_MACS {
                continue;
            }
            tested += 1;
            let a: Vec<f32> = (0..m * k)
                .map(|i| (i * 7919 % 1013) as f32 / 1013.0 - 0.5)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| (i * 104_729 % 997) as f32 / 997.0 - 0.5)
                .collect();
            let ta = Tensor::from_vec(a, (m, k), &dev).unwrap();
            let tb = Tensor::from_vec(b, (k, n), &dev).unwrap();
            let one: Vec<f32> = flat(&matmul(&ta, &tb, 1).unwrap());
            for threads in [2, 3, 5] {
                let many: Vec<f32> = flat(&matmul(&ta, &tb, threads).unwrap());
                assert!(same_bits(&one, &many), "{m}x{k}x{n} with {threads} threads");
            }
        }
    }
}
