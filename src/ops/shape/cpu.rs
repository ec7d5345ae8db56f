//! CPU copies behind the shape ops. Generic over the element type: shape ops
//! move values and never compute with them, so they serve every dtype.

use rayon::prelude::*;

/// out[i_perm] = src[i]: the element at multi-index (i0..in) of the output is
/// the element at (i_perm[0]..) of the source, where output dim d is source dim perm[d].
pub fn permute<T: Copy + Send + Sync>(src: &[T], src_dims: &[usize], perm: &[usize]) -> Vec<T> {
    if src.is_empty() {
        return Vec::new();
    }
    let rank = src_dims.len();
    let src_strides = contiguous_strides(src_dims);
    let out_dims: Vec<usize> = perm.iter().map(|&p| src_dims[p]).collect();
    // Trailing dims the permutation leaves in place are contiguous in both
    // tensors: they move as whole blocks (a head split [B, T, H, D] →
    // [B, H, T, D] copies runs of D values).
    let kept = (0..rank).rev().take_while(|&d| perm[d] == d).count();
    let moved = rank - kept;
    let block: usize = src_dims[moved..].iter().product();
    if moved == 0 || block == 0 {
        return src.to_vec();
    }
    // Stride in the source for a step along each moved output dim.
    let walk: Vec<usize> = perm[..moved].iter().map(|&p| src_strides[p]).collect();
    let mut out = vec![src[0]; src.len()];
    // One task per index of the first output dim, an odometer within it.
    let slab = out.len() / out_dims[0];
    out.par_chunks_mut(slab)
        .enumerate()
        .with_min_len((1 << 15) / slab.max(1) + 1)
        .for_each(|(first, slab)| {
            let mut index = vec![0usize; moved];
            let mut offset = first * walk[0];
            for dst in slab.chunks_mut(block) {
                dst.copy_from_slice(&src[offset..offset + block]);
                odometer_step(
                    &mut index[1..],
                    &out_dims[1..moved],
                    &walk[1..],
                    &mut offset,
                );
            }
        });
    out
}

/// Copies `len` entries along the middle dim starting at `start`, for every
/// (outer, inner) position of a tensor viewed as [outer, dim, inner].
pub fn narrow<T: Copy>(
    src: &[T],
    outer: usize,
    dim: usize,
    inner: usize,
    start: usize,
    len: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = o * dim * inner + start * inner;
        out.extend_from_slice(&src[base..base + len * inner]);
    }
    out
}

/// Concatenation along the middle dim of tensors viewed as [outer, dim_i, inner].
pub fn cat<T: Copy>(parts: &[(&[T], usize)], outer: usize, inner: usize) -> Vec<T> {
    let total: usize = parts.iter().map(|(_, d)| d).sum();
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (values, dim) in parts {
            let chunk = dim * inner;
            out.extend_from_slice(&values[o * chunk..(o + 1) * chunk]);
        }
    }
    out
}

/// Expands `src` (rank-aligned to `out_dims`, size-1 dims repeated) to `out_dims`.
pub fn broadcast<T: Copy>(src: &[T], src_dims: &[usize], out_dims: &[usize]) -> Vec<T> {
    let rank = out_dims.len();
    let pad = rank - src_dims.len();
    let src_strides = contiguous_strides(src_dims);
    // A broadcast dim is walked with stride 0.
    let walk: Vec<usize> = (0..rank)
        .map(|d| {
            if d < pad || src_dims[d - pad] == 1 {
                0
            } else {
                src_strides[d - pad]
            }
        })
        .collect();
    let numel: usize = out_dims.iter().product();
    let mut out = Vec::with_capacity(numel);
    let mut index = vec![0usize; rank];
    let mut offset = 0usize;
    for _ in 0..numel {
        out.push(src[offset]);
        odometer_step(&mut index, out_dims, &walk, &mut offset);
    }
    out
}

/// Advances a multi-index over `dims` (last dim fastest) by one, keeping
/// `offset` = Σ index[d]·walk[d] up to date without recomputing it.
fn odometer_step(index: &mut [usize], dims: &[usize], walk: &[usize], offset: &mut usize) {
    for d in (0..dims.len()).rev() {
        index[d] += 1;
        *offset += walk[d];
        if index[d] < dims[d] {
            return;
        }
        *offset -= walk[d] * dims[d];
        index[d] = 0;
    }
}

pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    /// out[i] = src[j] where j is i's multi-index read through `perm`, one element at a time.
    fn naive_permute(src: &[u32], dims: &[usize], perm: &[usize]) -> Vec<u32> {
        let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        let strides = contiguous_strides(dims);
        (0..src.len())
            .map(|mut flat| {
                let mut offset = 0;
                for d in (0..out_dims.len()).rev() {
                    offset += (flat % out_dims[d]) * strides[perm[d]];
                    flat /= out_dims[d];
                }
                src[offset]
            })
            .collect()
    }

    #[test]
    fn block_permute_matches_the_definition() {
        let cases: [(&[usize], &[usize]); 6] = [
            (&[2, 3, 4, 5], &[0, 2, 1, 3]),
            (&[32, 16, 4, 8], &[0, 2, 1, 3]),
            (&[3, 4, 5], &[2, 0, 1]),
            (&[3, 4, 5], &[0, 1, 2]),
            (&[6, 1, 7], &[1, 0, 2]),
            (&[0, 3], &[1, 0]),
        ];
        for (dims, perm) in cases {
            let src: Vec<u32> = (0..dims.iter().product::<usize>() as u32).collect();
            assert_eq!(
                permute(&src, dims, perm),
                naive_permute(&src, dims, perm),
                "{dims:?} by {perm:?}"
            );
        }
    }
}
