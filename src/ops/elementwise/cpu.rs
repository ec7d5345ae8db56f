//! CPU reference for elementwise ops: broadcast binary arithmetic and
//! pointwise maps. Large maps are split across rayon's threads.

use rayon::prelude::*;

use super::BinaryOp;
use crate::storage::Float;

/// Below this many elements a map runs on one thread (spawning costs more).
const PARALLEL_THRESHOLD: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// out[i] = f(x[i]).
pub fn map<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if x.len() < PARALLEL_THRESHOLD {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, v)| o.iter_mut().zip(v).for_each(|(o, &v)| *o = f(v)));
    }
    out
}

/// out[i] = f(x[i], y[i]) for equal-length slices.
pub fn zip_map<T: Float>(x: &[T], y: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if x.len() < PARALLEL_THRESHOLD {
        for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
            *o = f(a, b);
        }
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = f(a, b);
                }
            });
    }
    out
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
    let f = move |x: T, y: T| op.apply(x, y);
    if a_dims == b_dims {
        return zip_map(a, b, f);
    }
    if b.len() == 1 {
        let y = b[0];
        return map(a, move |x| f(x, y));
    }
    if a.len() == 1 {
        let x = a[0];
        return map(b, move |y| f(x, y));
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
