//! Grouped convolutions on the CPU: each group runs as its own groups = 1
//! problem through the ordinary im2col + GEMM kernels of `cpu.rs`.
//!
//! Why split rather than teach every kernel about groups: the kernels batch
//! several images into one GEMM with one weight, and a group's images share
//! their weight block, so a group is exactly such a problem once its channels
//! are gathered. Gathering copies the input once (im2col already copies it
//! kh·kw times), and the groups are independent, so they run in parallel.
//!
//! Layouts: an image [N, G·Cg, H, W] is [N, G, Cg·H·W] in memory; group g's
//! part is [N, Cg·H·W] (one block of each image). The weight [G·Og, Cg, kh, kw]
//! (and dW) is group-major, so group g's weight is one contiguous block.

use rayon::prelude::*;

use super::ConvGeometry;

/// Group `group`'s part of data laid out [batch, groups, len]: [batch, len].
fn group_part<T: Copy>(data: &[T], groups: usize, len: usize, group: usize) -> Vec<T> {
    data.chunks(groups * len)
        .flat_map(|image| &image[group * len..][..len])
        .copied()
        .collect()
}

/// The inverse of [`group_part`]: per-group parts [batch, len] laid back
/// out as [batch, groups, len].
fn interleave_groups<T: Copy>(parts: &[Vec<T>], len: usize) -> Vec<T> {
    let batch = parts.first().map_or(0, |p| p.len() / len.max(1));
    let mut out = Vec::with_capacity(batch * parts.len() * len);
    for n in 0..batch {
        for part in parts {
            out.extend_from_slice(&part[n * len..][..len]);
        }
    }
    out
}

/// The per-image lengths of one group: (input image, output grid).
fn group_lengths(one: &ConvGeometry) -> (usize, usize) {
    (
        one.in_channels * one.in_pixels(),
        one.out_channels * one.out_positions(),
    )
}

/// The block of `values` (the weight, or a per-channel bias) that belongs to `group`.
fn block<T>(values: &[T], block_len: usize, group: usize) -> &[T] {
    &values[group * block_len..][..block_len]
}

/// The kernel `run` (forward or backward-data) group by group: group k's
/// `input` part [N, in_len] with its weight block and `bias_channels`
/// biases gives its part [N, out_len] of the output.
fn by_group<I: Copy + Send + Sync, W: Sync, O: Copy + Send>(
    g: &ConvGeometry,
    input: &[I],
    (in_len, out_len): (usize, usize),
    weight: &[W],
    bias: Option<&[W]>,
    bias_channels: usize,
    run: impl Fn(&ConvGeometry, &[I], &[W], Option<&[W]>) -> Vec<O> + Sync,
) -> Vec<O> {
    let one = g.single_group();
    let weight_len = one.weight_shape().numel();
    let parts: Vec<Vec<O>> = (0..g.groups)
        .into_par_iter()
        .map(|k| {
            let input_k = group_part(input, g.groups, in_len, k);
            let b_k = bias.map(|b| block(b, bias_channels, k));
            run(&one, &input_k, block(weight, weight_len, k), b_k)
        })
        .collect();
    interleave_groups(&parts, out_len)
}

/// conv2d's forward, group by group: y_g = conv(x_g, W_g) + b_g.
pub(super) fn forward<I: Copy + Send + Sync, W: Sync, O: Copy + Send>(
    g: &ConvGeometry,
    x: &[I],
    weight: &[W],
    bias: Option<&[W]>,
    run: impl Fn(&ConvGeometry, &[I], &[W], Option<&[W]>) -> Vec<O> + Sync,
) -> Vec<O> {
    let one = g.single_group();
    let (image_len, grid_len) = group_lengths(&one);
    by_group(
        g,
        x,
        (image_len, grid_len),
        weight,
        bias,
        one.out_channels,
        run,
    )
}

/// The backward-data kernel, group by group: dx_g = convᵀ(dy_g, W_g) + b_g
/// (b is per input channel: conv_transpose2d's bias).
pub(super) fn backward_data<I: Copy + Send + Sync, W: Sync, O: Copy + Send>(
    g: &ConvGeometry,
    dy: &[I],
    weight: &[W],
    bias: Option<&[W]>,
    run: impl Fn(&ConvGeometry, &[I], &[W], Option<&[W]>) -> Vec<O> + Sync,
) -> Vec<O> {
    let one = g.single_group();
    let (image_len, grid_len) = group_lengths(&one);
    by_group(
        g,
        dy,
        (grid_len, image_len),
        weight,
        bias,
        one.in_channels,
        run,
    )
}

/// The backward-weight kernel, group by group: dW_g = Σ_n dy_{n,g} · im2col(x_{n,g})ᵀ,
/// the blocks of dW in group order.
pub(super) fn backward_weight<I: Copy + Send + Sync, O: Copy + Send>(
    g: &ConvGeometry,
    x: &[I],
    dy: &[I],
    run: impl Fn(&ConvGeometry, &[I], &[I]) -> Vec<O> + Sync,
) -> Vec<O> {
    let one = g.single_group();
    let (image_len, grid_len) = group_lengths(&one);
    let parts: Vec<Vec<O>> = (0..g.groups)
        .into_par_iter()
        .map(|k| {
            let x_k = group_part(x, g.groups, image_len, k);
            let dy_k = group_part(dy, g.groups, grid_len, k);
            run(&one, &x_k, &dy_k)
        })
        .collect();
    parts.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_parts_interleave_back_to_the_original() {
        // [batch 2, groups 3, len 2]
        let data: Vec<u32> = (0..12).collect();
        let parts: Vec<Vec<u32>> = (0..3).map(|g| group_part(&data, 3, 2, g)).collect();
        assert_eq!(parts[1], [2, 3, 8, 9]);
        assert_eq!(interleave_groups(&parts, 2), data);
    }
}
