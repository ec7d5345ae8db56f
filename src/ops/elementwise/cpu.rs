//! CPU reference for elementwise ops: broadcast binary arithmetic and
//! pointwise maps. Large maps are split across rayon's threads.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::BinaryOp;
use crate::per_isa;
use crate::storage::Float;

/// Below this many elements a map runs on one thread (spawning costs more).
const PARALLEL_THRESHOLD: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// out[i] = f(x[i]).
pub fn map<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    filled(x.len(), |out| {
        if x.len() < PARALLEL_THRESHOLD {
            map_into(out, x, &f);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, v)| map_into(o, v, &f));
        }
    })
}

/// out[i] = f(x[i], y[i]) for equal-length slices.
pub fn zip_map<T: Float>(x: &[T], y: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    assert_eq!(x.len(), y.len(), "zip_map: operand lengths");
    filled(x.len(), |out| {
        if x.len() < PARALLEL_THRESHOLD {
            zip_into(out, x, y, &f);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .for_each(|(o, (a, b))| zip_into(o, a, b, &f));
        }
    })
}

/// A vector of `len` values written once each by `fill`, with no zero-fill
/// first: for a memory-bound op the zeroing was a whole extra pass over the
/// output (`add` on the GPT's [2048, 512] bias: 58% of copy bandwidth with
/// it). `fill` must write every element; the kernels here write the output
/// through zips with inputs of its own length, asserted by their callers, as
/// do the 16-bit converters of `half_float`.
pub(crate) fn filled<T: Copy>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialised out[..len] (see above), and T is plain data.
    unsafe { out.set_len(len) };
    out
}

per_isa! {
    /// out[i] = f(x[i]) over one chunk, vectorised for the CPU's widest unit.
    fn map_into / map_into_with<T, F>(out: &mut [MaybeUninit<T>], x: &[T], f: &F)
        where [T: Float, F: Fn(T) -> T]
    {
        assert_eq!(out.len(), x.len());
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(f(v));
        }
    }
}

per_isa! {
    /// out[i] = f(x[i], y[i]) over one chunk.
    fn zip_into / zip_into_with<T, F>(out: &mut [MaybeUninit<T>], x: &[T], y: &[T], f: &F)
        where [T: Float, F: Fn(T, T) -> T]
    {
        assert!(out.len() == x.len() && out.len() == y.len());
        for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
            o.write(f(a, b));
        }
    }
}

/// Broadcast binary op: `a` and `b` are rank-aligned to `out_dims` (missing
/// leading dims and size-1 dims repeat).
pub fn binary<T: Float>(
    op: BinaryOp,
    a: &[T],
    a_dims: &[usize],
    b: &[T],
    b_dims: &[usize],
    out_dims: &[usize],
) -> Vec<T> {
    // One arm per op, each with its own closure naming its variant as a
    // constant: the element loops are then compiled per op with no `match`
    // inside them (and vectorise).
    use BinaryOp::*;
    match op {
        Add => broadcast_zip(|x, y| Add.apply(x, y), a, a_dims, b, b_dims, out_dims),
        Sub => broadcast_zip(|x, y| Sub.apply(x, y), a, a_dims, b, b_dims, out_dims),
        Mul => broadcast_zip(|x, y| Mul.apply(x, y), a, a_dims, b, b_dims, out_dims),
        Div => broadcast_zip(|x, y| Div.apply(x, y), a, a_dims, b, b_dims, out_dims),
    }
}

/// out = f(a, b) with broadcasting; see [`binary`].
fn broadcast_zip<T: Float>(
    f: impl Fn(T, T) -> T + Sync + Send + Copy,
    a: &[T],
    a_dims: &[usize],
    b: &[T],
    b_dims: &[usize],
    out_dims: &[usize],
) -> Vec<T> {
    if a_dims == b_dims {
        return zip_map(a, b, f);
    }
    // An empty operand broadcasts only to an empty output (0 against 0 or 1).
    if out_dims.contains(&0) {
        return Vec::new();
    }
    if b.len() == 1 {
        let y = b[0];
        return map(a, move |x| f(x, y));
    }
    if a.len() == 1 {
        let x = a[0];
        return map(b, move |y| f(x, y));
    }
    // The common bias shape: one operand is the output's trailing dims,
    // repeated over the leading ones (x [B, T, E] + b [E]).
    if a_dims == out_dims && repeats_as_suffix(b_dims, out_dims) {
        return zip_repeating(a, b, f);
    }
    if b_dims == out_dims && repeats_as_suffix(a_dims, out_dims) {
        return zip_repeating(b, a, move |y, x| f(x, y));
    }
    let rank = out_dims.len();
    let a_walk = broadcast_strides(a_dims, rank);
    let b_walk = broadcast_strides(b_dims, rank);
    let numel: usize = out_dims.iter().product();
    let row = out_dims[rank - 1];
    let (a_step, b_step) = (a_walk[rank - 1], b_walk[rank - 1]);
    let mut out = Vec::with_capacity(numel);
    // Odometer over all dims but the last; the last dim is a tight inner loop.
    let mut index = vec![0usize; rank];
    let (mut a_off, mut b_off) = (0usize, 0usize);
    for _ in 0..numel / row {
        for j in 0..row {
            out.push(f(a[a_off + j * a_step], b[b_off + j * b_step]));
        }
        for d in (0..rank - 1).rev() {
            index[d] += 1;
            a_off += a_walk[d];
            b_off += b_walk[d];
            if index[d] < out_dims[d] {
                break;
            }
            a_off -= a_walk[d] * out_dims[d];
            b_off -= b_walk[d] * out_dims[d];
            index[d] = 0;
        }
    }
    out
}

/// True if `dims`, rank-aligned to `out_dims`, is all 1s followed by the
/// output's own trailing dims: its values repeat every `numel(dims)` outputs.
fn repeats_as_suffix(dims: &[usize], out_dims: &[usize]) -> bool {
    let pad = out_dims.len() - dims.len();
    let first_real = dims.iter().position(|&d| d != 1).unwrap_or(dims.len());
    dims[first_real..] == out_dims[pad + first_real..]
}

/// out[i] = f(full[i], repeating[i mod len]), across threads when large.
fn zip_repeating<T: Float>(
    full: &[T],
    repeating: &[T],
    f: impl Fn(T, T) -> T + Sync + Send,
) -> Vec<T> {
    let width = repeating.len();
    assert_eq!(full.len() % width, 0, "zip_repeating: ragged rows");
    let rows_per_task = (CHUNK / width).max(1);
    filled(full.len(), |out| {
        let rows = |(o, x): (&mut [MaybeUninit<T>], &[T])| {
            for (o, x) in o.chunks_mut(width).zip(x.chunks(width)) {
                zip_into(o, x, repeating, &f);
            }
        };
        if full.len() < PARALLEL_THRESHOLD {
            rows((out, full));
        } else {
            out.par_chunks_mut(rows_per_task * width)
                .zip(full.par_chunks(rows_per_task * width))
                .for_each(rows);
        }
    })
}

/// Strides of `dims` aligned to `rank` output dims, 0 where the dim is broadcast.
fn broadcast_strides(dims: &[usize], rank: usize) -> Vec<usize> {
    let pad = rank - dims.len();
    let strides = crate::ops::shape::contiguous_strides(dims);
    (0..rank)
        .map(|d| {
            if d < pad || dims[d - pad] == 1 {
                0
            } else {
                strides[d - pad]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// out[idx] = a[idx mod a_dims] ∘ b[idx mod b_dims], one multi-index at a time.
    fn naive(
        op: BinaryOp,
        a: &[f64],
        a_dims: &[usize],
        b: &[f64],
        b_dims: &[usize],
        out: &[usize],
    ) -> Vec<f64> {
        let at = |values: &[f64], dims: &[usize], index: &[usize]| {
            let pad = index.len() - dims.len();
            let flat = dims.iter().enumerate().fold(0, |flat, (d, &size)| {
                flat * size + if size == 1 { 0 } else { index[pad + d] }
            });
            values[flat]
        };
        let numel: usize = out.iter().product();
        (0..numel)
            .map(|mut flat| {
                let mut index = vec![0; out.len()];
                for d in (0..out.len()).rev() {
                    index[d] = flat % out[d];
                    flat /= out[d];
                }
                op.apply(at(a, a_dims, &index), at(b, b_dims, &index))
            })
            .collect()
    }

    #[test]
    fn every_broadcast_path_matches_the_definition() {
        // Same shape, scalar, trailing-suffix bias (both sides, big enough for
        // threads), and a middle broadcast that takes the general path.
        let cases: [(&[usize], &[usize], &[usize]); 6] = [
            (&[3, 4], &[3, 4], &[3, 4]),
            (&[3, 4], &[1], &[3, 4]),
            (&[64, 33, 40], &[40], &[64, 33, 40]),
            (&[1, 33, 40], &[64, 33, 40], &[64, 33, 40]),
            (&[5, 7, 6], &[5, 1, 6], &[5, 7, 6]),
            (&[2, 1, 3], &[4, 1], &[2, 4, 3]),
        ];
        for (a_dims, b_dims, out) in cases {
            let a: Vec<f64> = (0..a_dims.iter().product::<usize>())
                .map(|i| (i as f64 * 0.37).sin() + 2.0)
                .collect();
            let b: Vec<f64> = (0..b_dims.iter().product::<usize>())
                .map(|i| (i as f64 * 0.71).cos() + 2.0)
                .collect();
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
                assert_eq!(
                    binary(op, &a, a_dims, &b, b_dims, out),
                    naive(op, &a, a_dims, &b, b_dims, out),
                    "{op:?} {a_dims:?} with {b_dims:?}"
                );
            }
        }
    }

    /// Every vector unit gives the same bits as the baseline build, on
    /// values that exercise each branch-free trick (NaN, ±∞, ±0, subnormals,
    /// the clamp at |x| = 9, ties of the rounding in expm1).
    #[test]
    fn every_vector_unit_computes_the_same_bits() {
        use crate::ops::activation::Activation;
        use crate::ops::elementwise::Pointwise;
        use crate::simd::Isa;
        let mut x: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.003_7).collect();
        x.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            9.0,
            -9.0,
            20.0,
            -88.0,
            std::f32::consts::LN_2 * 0.25,
        ]);
        let grad: Vec<f32> = x.iter().map(|v| 1.0 - v * 0.5).collect();
        let bits = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
            // SAFETY: the kernels under test wrote every element.
            v.iter()
                .map(|e| unsafe { e.assume_init() }.to_bits())
                .collect()
        };
        for f in [
            Activation::GeluTanh,
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::Gelu,
        ] {
            let run = |isa: Isa| {
                let mut forward = vec![MaybeUninit::uninit(); x.len()];
                map_into_with(isa, &mut forward, &x, &|e| f.value(e));
                let mut backward = vec![MaybeUninit::uninit(); x.len()];
                zip_into_with(isa, &mut backward, &x, &grad, &|e, g| g * f.derivative(e));
                (bits(&forward), bits(&backward))
            };
            let baseline = run(Isa::Baseline);
            for isa in Isa::available() {
                assert!(
                    run(isa) == baseline,
                    "{f:?} on {}: bits differ from the baseline",
                    isa.name()
                );
            }
        }
    }
}
