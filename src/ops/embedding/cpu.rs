//! CPU kernels for indexing: row selection (`index_select`, which `embedding`
//! is), `gather`, and their backward scatter-adds. Forward kernels only move
//! values, so they are generic over every element type; the scatter-adds sum
//! gradients and need a float.

use rayon::prelude::*;

use crate::ops::shape::contiguous_strides;
use crate::storage::Float;

/// Below this many output elements a copy runs on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// out[o, j, i] = src[o, indices[j], i] for a source viewed as [outer, dim_size, inner].
/// Every index must already be known to be < `dim_size`.
pub fn index_select<T: Copy + Default + Send + Sync>(
    src: &[T],
    outer: usize,
    dim_size: usize,
    inner: usize,
    indices: &[u32],
) -> Vec<T> {
    let picked = indices.len();
    let mut out = vec![T::default(); outer * picked * inner];
    if out.is_empty() {
        return out;
    }
    // Output row (o, j) of `inner` values is a straight copy of source row (o, indices[j]).
    let copy_row = |(row, out_row): (usize, &mut [T])| {
        let (o, j) = (row / picked, row % picked);
        let start = (o * dim_size + indices[j] as usize) * inner;
        out_row.copy_from_slice(&src[start..start + inner]);
    };
    if out.len() < PARALLEL_THRESHOLD {
        out.chunks_mut(inner).enumerate().for_each(copy_row);
    } else {
        out.par_chunks_mut(inner).enumerate().for_each(copy_row);
    }
    out
}

/// The backward of `index_select`: dx[o, indices[j], i] += dy[o, j, i], zero
/// elsewhere. Repeated indices accumulate (an embedding row used twice gets
/// both gradients). Parallel over `outer`, whose blocks of dx are disjoint.
pub fn index_add<T: Float>(
    dy: &[T],
    outer: usize,
    dim_size: usize,
    inner: usize,
    indices: &[u32],
) -> Vec<T> {
    index_add_skipping(dy, outer, dim_size, inner, indices, None)
}

/// `index_add` leaving out every j with indices[j] = `skipped` (embedding's
/// padding_idx), whose entries of dx then stay zero.
pub fn index_add_skipping<T: Float>(
    dy: &[T],
    outer: usize,
    dim_size: usize,
    inner: usize,
    indices: &[u32],
    skipped: Option<u32>,
) -> Vec<T> {
    let picked = indices.len();
    let mut dx = vec![T::ZERO; outer * dim_size * inner];
    if inner == 0 || dim_size == 0 {
        return dx;
    }
    let add_block = |(o, dx_block): (usize, &mut [T])| {
        for (j, &index) in indices.iter().enumerate() {
            if Some(index) == skipped {
                continue;
            }
            let src = &dy[(o * picked + j) * inner..(o * picked + j + 1) * inner];
            let dst = &mut dx_block[index as usize * inner..(index as usize + 1) * inner];
            for (d, &g) in dst.iter_mut().zip(src) {
                *d += g;
            }
        }
    };
    if outer > 1 && dy.len() >= PARALLEL_THRESHOLD {
        dx.par_chunks_mut(dim_size * inner)
            .enumerate()
            .for_each(add_block);
    } else {
        dx.chunks_mut(dim_size * inner)
            .enumerate()
            .for_each(add_block);
    }
    dx
}

/// The plain per-element form of `index_add`, kept to test the fast one.
pub fn index_add_reference<T: Float>(
    dy: &[T],
    outer: usize,
    dim_size: usize,
    inner: usize,
    indices: &[u32],
) -> Vec<T> {
    let picked = indices.len();
    let mut dx = vec![T::ZERO; outer * dim_size * inner];
    for o in 0..outer {
        for (j, &index) in indices.iter().enumerate() {
            for i in 0..inner {
                dx[(o * dim_size + index as usize) * inner + i] += dy[(o * picked + j) * inner + i];
            }
        }
    }
    dx
}

/// For every element of `index` (row-major), the flat offset in the source of
/// the element `gather` reads: the element's own coordinates, except along
/// `dim` where the coordinate is the index value. Forward and backward of
/// `gather` share this map (read through it, or scatter-add through it).
pub fn gather_source_offsets(
    src_dims: &[usize],
    index_dims: &[usize],
    index: &[u32],
    dim: usize,
) -> Vec<usize> {
    let src_strides = contiguous_strides(src_dims);
    let rank = index_dims.len();
    let mut offsets = Vec::with_capacity(index.len());
    let mut coord = vec![0usize; rank];
    for &position_along_dim in index {
        let offset = (0..rank)
            .map(|d| {
                let c = if d == dim {
                    position_along_dim as usize
                } else {
                    coord[d]
                };
                c * src_strides[d]
            })
            .sum();
        offsets.push(offset);
        // Odometer step to the next element of `index`.
        for d in (0..rank).rev() {
            coord[d] += 1;
            if coord[d] < index_dims[d] {
                break;
            }
            coord[d] = 0;
        }
    }
    offsets
}

/// out[k] = src[offsets[k]].
pub fn gather<T: Copy>(src: &[T], offsets: &[usize]) -> Vec<T> {
    offsets.iter().map(|&o| src[o]).collect()
}

/// The backward of `gather`: dx[offsets[k]] += dy[k], zero elsewhere
/// (offsets may repeat, so this is a scatter-add).
pub fn scatter_add<T: Float>(dy: &[T], offsets: &[usize], src_len: usize) -> Vec<T> {
    let mut dx = vec![T::ZERO; src_len];
    for (&o, &g) in offsets.iter().zip(dy) {
        dx[o] += g;
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_add_matches_reference_with_repeats_serial_and_parallel() {
        // Small (one thread) and large (rayon over outer) problems.
        for &(outer, dim_size, inner, picked) in &[(3, 5, 2, 7), (8, 11, 97, 53)] {
            let indices: Vec<u32> = (0..picked)
                .map(|j| ((j * 7 + 3) % dim_size) as u32)
                .collect();
            let dy: Vec<f64> = (0..outer * picked * inner)
                .map(|k| ((k * 37) % 101) as f64 / 13.0 - 3.0)
                .collect();
            assert_eq!(
                index_add(&dy, outer, dim_size, inner, &indices),
                index_add_reference(&dy, outer, dim_size, inner, &indices)
            );
        }
    }

    #[test]
    fn index_select_serial_and_parallel_agree_with_direct_indexing() {
        for &(outer, dim_size, inner, picked) in &[(2, 4, 3, 5), (5, 9, 301, 40)] {
            let indices: Vec<u32> = (0..picked)
                .map(|j| ((j * 5 + 1) % dim_size) as u32)
                .collect();
            let src: Vec<f32> = (0..outer * dim_size * inner).map(|k| k as f32).collect();
            let out = index_select(&src, outer, dim_size, inner, &indices);
            assert_eq!(out.len(), outer * picked * inner);
            for o in 0..outer {
                for (j, &index) in indices.iter().enumerate() {
                    for i in 0..inner {
                        let want = src[(o * dim_size + index as usize) * inner + i];
                        assert_eq!(out[(o * picked + j) * inner + i], want);
                    }
                }
            }
        }
    }

    #[test]
    fn gather_offsets_follow_pytorch_semantics_with_a_smaller_index() {
        // src [2, 3], dim 1, index [2, 2]: out[i][j] = src[i][index[i][j]].
        let src = [10, 11, 12, 20, 21, 22];
        let index = [2, 0, 1, 1];
        let offsets = gather_source_offsets(&[2, 3], &[2, 2], &index, 1);
        assert_eq!(gather(&src, &offsets), vec![12, 10, 21, 21]);
        // dim 0: out[i][j] = src[index[i][j]][j].
        let offsets = gather_source_offsets(&[2, 3], &[1, 3], &[1, 0, 1], 0);
        assert_eq!(gather(&src, &offsets), vec![20, 11, 22]);
    }

    #[test]
    fn scatter_add_accumulates_repeated_offsets() {
        assert_eq!(
            scatter_add(&[1.0, 2.0, 4.0], &[2, 0, 2], 3),
            vec![2.0, 0.0, 5.0]
        );
    }
}
