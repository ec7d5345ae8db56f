//! CPU copies behind the shape ops. Generic over the element type: shape ops
//! move values and never compute with them, so they serve every dtype.

/// out[i_perm] = src[i]: the element at multi-index (i0..in) of the output is
/// the element at (i_perm[0]..) of the source, where output dim d is source dim perm[d].
pub fn permute<T: Copy>(src: &[T], src_dims: &[usize], perm: &[usize]) -> Vec<T> {
    let rank = src_dims.len();
    let src_strides = contiguous_strides(src_dims);
    let out_dims: Vec<usize> = perm.iter().map(|&p| src_dims[p]).collect();
    // Stride in the source for a step along each output dim.
    let walk: Vec<usize> = perm.iter().map(|&p| src_strides[p]).collect();
    let mut out = Vec::with_capacity(src.len());
    let mut index = vec![0usize; rank];
    let mut offset = 0usize;
    for _ in 0..src.len() {
        out.push(src[offset]);
        // Odometer increment of the output index, tracking the source offset.
        for d in (0..rank).rev() {
            index[d] += 1;
            offset += walk[d];
            if index[d] < out_dims[d] {
                break;
            }
            offset -= walk[d] * out_dims[d];
            index[d] = 0;
        }
    }
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
        for d in (0..rank).rev() {
            index[d] += 1;
            offset += walk[d];
            if index[d] < out_dims[d] {
                break;
            }
            offset -= walk[d] * out_dims[d];
            index[d] = 0;
        }
    }
    out
}

pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}
