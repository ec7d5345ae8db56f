//! CPU convolution kernels, all described by a [`ConvGeometry`] in conv2d
//! terms (see `mod.rs` for how conv_transpose2d maps onto them).
//!
//! Why im2col + GEMM: a convolution is a matrix product in disguise. Copy,
//! for one image, every input pixel each kernel tap reads into a matrix
//! cols [C·kh·kw, Ho·Wo] (im2col); then y = W [O, C·kh·kw] · cols. The copy
//! costs kh·kw times the input in memory traffic, but it turns the arithmetic
//! (which dominates: 2·O·C·kh·kw flops per output pixel) into one packed, SIMD
//! GEMM from the `gemm` crate, an order of magnitude faster than direct loops
//! (`benches/kernels.rs` measures the gap). The backward pass reuses the same
//! two primitives: dL/dx scatters Wᵀ · dL/dy back through col2im, the exact
//! adjoint of im2col, and dL/dW is dL/dy · colsᵀ.
//!
//! The direct-loop `*_reference` functions (reference.rs, re-exported here)
//! state each kernel's definition plainly; the unit tests (cpu_tests.rs)
//! check the fast kernels against them.
//!
//! Grouped problems (groups > 1) are split into one groups = 1 problem per
//! group by `cpu_groups.rs` before they reach the kernels below.

use std::ops::Range;

use rayon::prelude::*;

use super::{ConvGeometry, cpu_groups};
use crate::ops::gemm::cpu::{Mat, gemm_into, worth_all_threads};
use crate::storage::{Float, Stored};

pub use super::reference::{
    conv_transpose2d_reference, conv2d_backward_data_reference, conv2d_backward_weight_reference,
    conv2d_reference,
};

/// The weight gradient packs im2col matrices of several images side by side;
/// this bounds that buffer (in elements, 4 MiB of f32): chunks whose columns
/// stay in cache for the GEMM that reads them, one buffer for all chunks
/// (a whole DCGAN batch's 16 MiB of columns, zeroed, written and read back
/// from memory, cost more than the GEMM's shorter inner dimension does).
const WEIGHT_GRAD_CHUNK_COLS: usize = 1 << 20;

// ----- the three kernels and the bias gradient ------------------------------

/// Forward: y_n = W · im2col(x_n) + b, for x [N, C, H, W], W [O, C, kh, kw],
/// b [O]; returns y [N, O, Ho, Wo]. Also conv_transpose2d's dL/dx.
///
/// A 16-bit x is widened row by row as its columns are built, and y is
/// rounded as it is laid out: no whole f32 copy of either is made. The
/// weight and bias are given already widened (they are parameter-sized).
pub fn conv2d_forward<S: Stored>(
    g: &ConvGeometry,
    x: &[S],
    weight: &[S::Computed],
    bias: Option<&[S::Computed]>,
) -> Vec<S> {
    if g.groups > 1 {
        check_lengths(g, Some(x.len()), Some(weight.len()), None);
        return cpu_groups::forward(g, x, weight, bias, conv2d_forward);
    }
    forward_in_chunks(g, x, weight, bias, CHUNK_COLS)
}

/// [`conv2d_forward`] with image chunks of at most `max_cols` column elements.
fn forward_in_chunks<S: Stored>(
    g: &ConvGeometry,
    x: &[S],
    weight: &[S::Computed],
    bias: Option<&[S::Computed]>,
    max_cols: usize,
) -> Vec<S> {
    let (rows, positions) = (g.col_rows(), g.out_positions());
    let image_len = g.in_channels * g.in_pixels();
    check_lengths(g, Some(x.len()), Some(weight.len()), None);
    assert!(
        bias.is_none_or(|b| b.len() == g.out_channels),
        "conv2d_forward: bias length"
    );
    if is_dense(g) {
        // y [N, O] = x [N, C·kh·kw] · Wᵀ (+ b)
        let mut y = vec![<S::Computed>::ZERO; g.batch * g.out_channels];
        if let Some(bias) = bias {
            y.chunks_mut(g.out_channels)
                .for_each(|row| row.copy_from_slice(bias));
        }
        gemm_into(
            &mut y,
            Mat::row_major(&S::computed(x), g.batch, rows),
            Mat::row_major(weight, g.out_channels, rows).transposed(),
            bias.is_some(),
            worth_all_threads(g.batch * g.out_channels * rows),
        );
        return S::from_computed(y);
    }
    let mut y = vec![S::narrow(<S::Computed>::ZERO); g.batch * g.out_channels * positions];
    // Chunks of images: cols [C·kh·kw, n·Ho·Wo] of a few images side by
    // side (about L2-sized), one GEMM y_rows [O, n·Ho·Wo] = W · cols, then
    // each image's [O, Ho·Wo] block copied out. One image at a time made
    // the GEMM thin (N = Ho·Wo = 64 on DCGAN's D2) and re-packed W per image.
    let images_per_chunk = images_per_chunk(g, max_cols);
    let grid_len = g.out_channels * positions;
    let scratch_len = (rows + g.out_channels) * images_per_chunk * positions;
    let macs = g.out_channels * rows * images_per_chunk * positions;
    for_each_chunk(
        &mut y,
        images_per_chunk * grid_len,
        scratch_len,
        macs,
        |chunk, y_chunk, scratch, parallel| {
            let first = chunk * images_per_chunk;
            let images = y_chunk.len() / grid_len;
            let width = images * positions;
            let (cols, y_rows) = scratch.split_at_mut(rows * width);
            let y_rows = &mut y_rows[..g.out_channels * width];
            im2col_batch_into(g, &x[first * image_len..(first + images) * image_len], cols);
            gemm_into(
                y_rows,
                Mat::row_major(weight, g.out_channels, rows),
                Mat::row_major(cols, rows, width),
                false,
                parallel,
            );
            rows_as_grid(g, y_rows, bias, y_chunk);
        },
    );
    y
}

/// Backward-data: dx_n = col2im(Wᵀ · dy_n) + b, for dy [N, O, Ho, Wo]; returns
/// dx [N, C, H, W]. Also conv_transpose2d's forward, where b is its bias [C]
/// (conv2d's own dL/dx passes none).
///
/// A 16-bit dy is widened as it is rearranged for the GEMM, and each image
/// of dx is summed in f32 and rounded once, as it is finished.
pub fn conv2d_backward_data<S: Stored>(
    g: &ConvGeometry,
    dy: &[S],
    weight: &[S::Computed],
    bias: Option<&[S::Computed]>,
) -> Vec<S> {
    if g.groups > 1 {
        check_lengths(g, None, Some(weight.len()), Some(dy.len()));
        return cpu_groups::backward_data(g, dy, weight, bias, conv2d_backward_data);
    }
    backward_data_in_chunks(g, dy, weight, bias, CHUNK_COLS)
}

/// [`conv2d_backward_data`] with image chunks of at most `max_cols` column elements.
fn backward_data_in_chunks<S: Stored>(
    g: &ConvGeometry,
    dy: &[S],
    weight: &[S::Computed],
    bias: Option<&[S::Computed]>,
    max_cols: usize,
) -> Vec<S> {
    let (rows, positions, pixels) = (g.col_rows(), g.out_positions(), g.in_pixels());
    let grid_len = g.out_channels * positions;
    check_lengths(g, None, Some(weight.len()), Some(dy.len()));
    assert!(
        bias.is_none_or(|b| b.len() == g.in_channels),
        "conv2d_backward_data: bias length"
    );
    if is_dense(g) {
        // dx [N, C·kh·kw] = dy [N, O] · W (+ b[c] on every pixel of channel c)
        let mut dx = vec![<S::Computed>::ZERO; g.batch * g.in_channels * pixels];
        if let Some(bias) = bias {
            for (plane, &b) in dx.chunks_mut(pixels).zip(bias.iter().cycle()) {
                plane.fill(b);
            }
        }
        gemm_into(
            &mut dx,
            Mat::row_major(&S::computed(dy), g.batch, g.out_channels),
            Mat::row_major(weight, g.out_channels, rows),
            bias.is_some(),
            worth_all_threads(g.batch * g.out_channels * rows),
        );
        return S::from_computed(dx);
    }
    let mut dx = vec![S::narrow(<S::Computed>::ZERO); g.batch * g.in_channels * pixels];
    // Chunks of images: cols [C·kh·kw, n·Ho·Wo] = Wᵀ · dy of a few images
    // as one GEMM (per image it would be a thin product far below the GEMM's
    // peak), then col2im of each image's segment while the columns are still
    // in cache (one GEMM over the whole batch wrote 16 MiB of columns on
    // DCGAN's D2 that col2im then read back from memory).
    let image_len = g.in_channels * pixels;
    let images_per_chunk = images_per_chunk(g, max_cols);
    let dy_rows_len = g.out_channels * images_per_chunk * positions;
    // Columns, dy's rows and (for a 16-bit dx) one image summed in f32.
    let scratch_len = rows * images_per_chunk * positions + dy_rows_len + image_len;
    let macs = g.out_channels * rows * images_per_chunk * positions;
    for_each_chunk(
        &mut dx,
        images_per_chunk * image_len,
        scratch_len,
        macs,
        |chunk, dx_chunk, scratch, parallel| {
            let first = chunk * images_per_chunk;
            let images = dx_chunk.len() / image_len;
            let width = images * positions;
            let (cols, rest) = scratch.split_at_mut(rows * images_per_chunk * positions);
            let cols = &mut cols[..rows * width];
            let (dy_rows, wide_image) = rest.split_at_mut(dy_rows_len);
            let dy_rows = &mut dy_rows[..g.out_channels * width];
            grid_as_rows_into(
                g,
                &dy[first * grid_len..(first + images) * grid_len],
                dy_rows,
            );
            gemm_into(
                cols,
                Mat::row_major(weight, g.out_channels, rows).transposed(),
                Mat::row_major(dy_rows, g.out_channels, width),
                false,
                parallel,
            );
            for (n, dx_n) in dx_chunk.chunks_mut(image_len).enumerate() {
                let sum_into = |image: &mut [S::Computed]| {
                    match bias {
                        Some(bias) => {
                            for (plane, &b) in image.chunks_mut(pixels).zip(bias) {
                                plane.fill(b);
                            }
                        }
                        None => image.fill(<S::Computed>::ZERO),
                    }
                    col2im_add(g, &cols[n * positions..], width, image);
                };
                match S::as_computed_mut(dx_n) {
                    Some(dx_n) => sum_into(dx_n),
                    None => {
                        sum_into(&mut *wide_image);
                        S::narrow_slice(wide_image, dx_n);
                    }
                }
            }
        },
    );
    dx
}

/// Images per chunk: as many as keep a chunk's columns, C·kh·kw × n·Ho·Wo,
/// within `max_cols` elements, at least one.
fn images_per_chunk(g: &ConvGeometry, max_cols: usize) -> usize {
    (max_cols / (g.col_rows() * g.out_positions()).max(1)).clamp(1, g.batch.max(1))
}

/// Column elements per chunk of the forward and backward-data passes
/// (1 MiB of f32, an L2's worth on current x86-64 cores; the GEMM gets
/// n·Ho·Wo ≥ 256 columns on every DCGAN layer).
const CHUNK_COLS: usize = 1 << 18;

/// y_rows [O, n·Ho·Wo] (image after image along each row) laid out as the
/// output grid [n, O, Ho·Wo], plus the bias of each channel: the inverse
/// of [`grid_as_rows_into`].
fn rows_as_grid<S: Stored>(
    g: &ConvGeometry,
    rows: &[S::Computed],
    bias: Option<&[S::Computed]>,
    grid: &mut [S],
) {
    let positions = g.out_positions();
    let width = rows.len() / g.out_channels;
    for (n, image) in grid.chunks_mut(g.out_channels * positions).enumerate() {
        for (o, plane) in image.chunks_mut(positions).enumerate() {
            let src = &rows[o * width + n * positions..][..positions];
            match bias {
                Some(bias) => {
                    let b = bias[o];
                    plane
                        .iter_mut()
                        .zip(src)
                        .for_each(|(d, &v)| *d = S::narrow(v + b));
                }
                None => S::narrow_slice(src, plane),
            }
        }
    }
}

/// The im2col columns of images [n, C, H, W] side by side, on one thread,
/// into `cols` [C·kh·kw, n·Ho·Wo]: row (c, i, j) holds tap (i, j) of
/// channel c, image after image.
fn im2col_batch_into<S: Stored>(g: &ConvGeometry, images: &[S], cols: &mut [S::Computed]) {
    let width = cols.len() / g.col_rows();
    for (row, cols_row) in cols.chunks_mut(width.max(1)).enumerate() {
        im2col_batch_row(g, images, row, cols_row);
    }
}

/// Row `row` of a batch's columns: tap (i, j) of channel c for each image in turn.
fn im2col_batch_row<S: Stored>(
    g: &ConvGeometry,
    images: &[S],
    row: usize,
    cols_row: &mut [S::Computed],
) {
    let image_len = g.in_channels * g.in_pixels();
    let (c, i, j) = tap_of_row(g, row);
    let window = TapWindow::new(g, [i, j]);
    for (n, segment) in cols_row.chunks_mut(g.out_positions()).enumerate() {
        let plane = &images[n * image_len + c * g.in_pixels()..][..g.in_pixels()];
        window.gather(g, plane, segment);
    }
}

/// An output grid [n, O, Ho·Wo] as rows [O, n·Ho·Wo], image after image
/// along each row (the layout of a batch's im2col columns), on one thread,
/// into `rows` (as long as `grid`).
fn grid_as_rows_into<S: Stored>(g: &ConvGeometry, grid: &[S], rows: &mut [S::Computed]) {
    let width = grid.len() / g.out_channels;
    for (o, row) in rows.chunks_mut(width.max(1)).enumerate() {
        grid_row(g, grid, o, row);
    }
}

/// Row o of [`grid_as_rows_into`]: channel o of each image in turn.
fn grid_row<S: Stored>(g: &ConvGeometry, grid: &[S], o: usize, row: &mut [S::Computed]) {
    let positions = g.out_positions();
    for (n, segment) in row.chunks_mut(positions).enumerate() {
        S::widen_slice(
            &grid[(n * g.out_channels + o) * positions..][..positions],
            segment,
        );
    }
}

/// Backward-weight: dW = Σ_n dy_n · im2col(x_n)ᵀ, for x [N, C, H, W] and
/// dy [N, O, Ho, Wo]; returns dW [O, C, kh, kw]. Also conv_transpose2d's
/// dL/dW, with its dL/dy as `x` and its x as `dy`.
///
/// The sum over the batch is folded into the GEMM itself rather than done as
/// per-thread partial sums: the im2col matrices of all images are laid side by
/// side as cols [C·kh·kw, N·Ho·Wo], dy is rearranged to [O, N·Ho·Wo], and one
/// product dy · colsᵀ does the reduction along its long inner dimension. That
/// is what GEMM is best at, it is deterministic (no thread-order-dependent
/// sums), and it is the same single-GEMM formulation a GPU kernel uses. The
/// price is memory for all the columns at once, so very large batches are
/// processed in chunks, accumulated into dW one after another.
///
/// 16-bit x and dy are widened as they are packed into the columns and
/// rows, a chunk at a time; dW is summed in f32 and rounded once.
pub fn conv2d_backward_weight<S: Stored>(g: &ConvGeometry, x: &[S], dy: &[S]) -> Vec<S> {
    if g.groups > 1 {
        check_lengths(g, Some(x.len()), None, Some(dy.len()));
        return cpu_groups::backward_weight(g, x, dy, conv2d_backward_weight);
    }
    if is_dense(g) {
        // dW [O, C·kh·kw] = dyᵀ [O, N] · x [N, C·kh·kw]
        check_lengths(g, Some(x.len()), None, Some(dy.len()));
        let rows = g.col_rows();
        let mut dw = vec![<S::Computed>::ZERO; g.out_channels * rows];
        gemm_into(
            &mut dw,
            Mat::row_major(&S::computed(dy), g.batch, g.out_channels).transposed(),
            Mat::row_major(&S::computed(x), g.batch, rows),
            false,
            worth_all_threads(g.batch * g.out_channels * rows),
        );
        return S::from_computed(dw);
    }
    backward_weight_in_chunks(g, x, dy, WEIGHT_GRAD_CHUNK_COLS)
}

/// A dense layer in disguise: one output position whose window is the whole
/// unpadded input (DCGAN's last discriminator conv, and the conv mirrored by
/// its first generator convT). Then an image's im2col column is the image
/// itself, and the whole batch is one GEMM instead of N tiny ones behind a
/// row-by-row im2col (which took 4.5 ms for 0.5 MFLOP on that layer).
fn is_dense(g: &ConvGeometry) -> bool {
    g.out_size == [1, 1] && g.padding == [0, 0] && g.dilation == [1, 1] && g.kernel == g.in_size
}

/// `conv2d_backward_weight` with im2col buffers of at most `max_cols` elements
/// (at least one image's worth).
fn backward_weight_in_chunks<S: Stored>(
    g: &ConvGeometry,
    x: &[S],
    dy: &[S],
    max_cols: usize,
) -> Vec<S> {
    check_lengths(g, Some(x.len()), None, Some(dy.len()));
    let (rows, positions) = (g.col_rows(), g.out_positions());
    let (image_len, grid_len) = (g.in_channels * g.in_pixels(), g.out_channels * positions);
    // The GEMM packs a transposed operand through strided reads, which is
    // slow for a long one: transpose whichever of cols [C·kh·kw, N·P] and
    // dy [O, N·P] is smaller. With more taps than output channels (DCGAN's
    // D2: 1024 vs 128) that is dy, so dWᵀ = cols · dyᵀ is computed (as
    // dW = dy · colsᵀ it spent half its time packing cols); otherwise
    // (D1: 16 taps, 64 channels) dW = dy · colsᵀ directly.
    let transposed_out = rows > g.out_channels;
    let zero = <S::Computed>::ZERO;
    let mut dw = vec![zero; g.out_channels * rows];
    let images_per_chunk = images_per_chunk(g, max_cols);
    // One buffer each for every chunk's columns and rearranged dy.
    let mut cols = vec![zero; rows * images_per_chunk * positions];
    let mut dy_rows = vec![zero; g.out_channels * images_per_chunk * positions];
    let mut first = 0;
    while first < g.batch {
        let images = images_per_chunk.min(g.batch - first);
        let width = images * positions;
        let x_chunk = &x[first * image_len..(first + images) * image_len];
        let dy_chunk = &dy[first * grid_len..(first + images) * grid_len];
        // cols row (c, i, j) = tap (i, j) of channel c, image after image.
        let cols = &mut cols[..rows * width];
        cols.par_chunks_mut(width)
            .enumerate()
            .for_each(|(row, cols_row)| im2col_batch_row(g, x_chunk, row, cols_row));
        // dy [N, O, P] → [O, N·P], matching the columns.
        let dy_rows = &mut dy_rows[..g.out_channels * width];
        dy_rows
            .par_chunks_mut(width)
            .enumerate()
            .for_each(|(o, row)| grid_row(g, dy_chunk, o, row));
        let cols = Mat::row_major(cols, rows, width);
        let dy_rows = Mat::row_major(dy_rows, g.out_channels, width);
        let (a, b) = if transposed_out {
            (cols, dy_rows.transposed())
        } else {
            (dy_rows, cols.transposed())
        };
        let macs = g.out_channels * rows * width;
        gemm_into(&mut dw, a, b, first > 0, worth_all_threads(macs));
        first += images;
    }
    // The columns are the step's largest buffer: free them before dW's copy.
    drop((cols, dy_rows));
    if !transposed_out {
        return S::from_computed(dw);
    }
    // dw holds dWᵀ [C·kh·kw, O]: lay it out as dW [O, C·kh·kw].
    let mut out = vec![S::narrow(zero); g.out_channels * rows];
    for (o, out_row) in out.chunks_mut(rows).enumerate() {
        for (r, v) in out_row.iter_mut().enumerate() {
            *v = S::narrow(dw[r * g.out_channels + o]);
        }
    }
    out
}

/// dL/db[c] = Σ_{n,p} dy[n, c, p] for dy [batch, channels, pixels], summed in f64.
pub fn bias_grad<S: Stored>(dy: &[S], batch: usize, channels: usize, pixels: usize) -> Vec<S> {
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let mut total = 0f64;
            for n in 0..batch {
                let plane = &dy[(n * channels + c) * pixels..][..pixels];
                total += plane.iter().map(|v| v.widen().to_f64()).sum::<f64>();
            }
            S::narrow(<S::Computed>::from_f64(total))
        })
        .collect()
}

// ----- im2col / col2im ------------------------------------------------------

/// Kernels take plain slices; a slice whose length does not fit the
/// geometry is a caller's bug, reported here before any indexing.
fn check_lengths(
    g: &ConvGeometry,
    image: Option<usize>,
    weight: Option<usize>,
    grid: Option<usize>,
) {
    let expected = [
        ("input image", image, g.input_shape().numel()),
        ("weight", weight, g.weight_shape().numel()),
        ("output grid", grid, g.output_shape().numel()),
    ];
    for (what, given, len) in expected {
        if let Some(given) = given {
            assert_eq!(
                given, len,
                "conv kernel: {what} has the wrong length for {g:?}"
            );
        }
    }
}

/// The (channel, kernel row, kernel column) of im2col row `row`.
fn tap_of_row(g: &ConvGeometry, row: usize) -> (usize, usize, usize) {
    let taps = g.kernel[0] * g.kernel[1];
    (row / taps, (row % taps) / g.kernel[1], row % g.kernel[1])
}

/// The output positions o in 0..out_len whose input index o·stride + offset − pad
/// falls inside 0..in_len (offset = tap · dilation).
fn valid_outputs(
    out_len: usize,
    stride: usize,
    offset: usize,
    pad: usize,
    in_len: usize,
) -> Range<usize> {
    let first = pad.saturating_sub(offset).div_ceil(stride);
    let end = if in_len + pad > offset {
        ((in_len + pad - offset - 1) / stride + 1).min(out_len)
    } else {
        0
    };
    first.min(end)..end
}

/// Where one tap (i, j) reads the input: the output rows and columns whose
/// pixel falls inside the image, and the input pixel of the first of them.
/// It is the same for every channel and image, so the im2col and col2im
/// loops work it out once per tap, not once per image (its divisions cost
/// more than copying a small layer's 8×8 window).
struct TapWindow {
    rows: Range<usize>,
    cols: Range<usize>,
    /// The input (row, column) that output (rows.start, cols.start) reads.
    first_pixel: [usize; 2],
}

impl TapWindow {
    fn new(g: &ConvGeometry, tap: [usize; 2]) -> Self {
        let offset = [tap[0] * g.dilation[0], tap[1] * g.dilation[1]];
        let valid = |axis: usize| {
            valid_outputs(
                g.out_size[axis],
                g.stride[axis],
                offset[axis],
                g.padding[axis],
                g.in_size[axis],
            )
        };
        let (rows, cols) = (valid(0), valid(1));
        // Unused when a range is empty (and the subtraction could underflow).
        let first = |range: &Range<usize>, axis: usize| {
            if range.is_empty() {
                0
            } else {
                range.start * g.stride[axis] + offset[axis] - g.padding[axis]
            }
        };
        let first_pixel = [first(&rows, 0), first(&cols, 1)];
        TapWindow {
            rows,
            cols,
            first_pixel,
        }
    }

    /// The input row read by output row oh (oh in `rows`).
    fn input_row(&self, g: &ConvGeometry, oh: usize) -> usize {
        self.first_pixel[0] + (oh - self.rows.start) * g.stride[0]
    }

    /// One im2col row: out[oh, ow] = plane[oh·s − p + i·d, ow·s − p + j·d],
    /// zero where that falls outside the plane.
    fn gather<S: Stored>(&self, g: &ConvGeometry, plane: &[S], out: &mut [S::Computed]) {
        let [out_w, in_w] = [g.out_size[1], g.in_size[1]];
        let zero = <S::Computed>::ZERO;
        let cols = self.cols.clone();
        if cols.is_empty() {
            out.fill(zero);
            return;
        }
        out[..self.rows.start * out_w].fill(zero);
        out[self.rows.end * out_w..].fill(zero);
        for oh in self.rows.clone() {
            let src = &plane[self.input_row(g, oh) * in_w + self.first_pixel[1]..];
            let dst = &mut out[oh * out_w..(oh + 1) * out_w];
            dst[..cols.start].fill(zero);
            dst[cols.end..].fill(zero);
            strided_map(g.stride[1], src, &mut dst[cols.clone()], |d, v| {
                *d = v.widen()
            });
        }
    }

    /// The adjoint of `gather`: plane[ih, iw] += cols_row[oh, ow] for every
    /// output position that reads a pixel of the plane.
    fn scatter_add<T: Float>(&self, g: &ConvGeometry, cols_row: &[T], plane: &mut [T]) {
        let [out_w, in_w] = [g.out_size[1], g.in_size[1]];
        if self.cols.is_empty() {
            return;
        }
        for oh in self.rows.clone() {
            let start = self.input_row(g, oh) * in_w + self.first_pixel[1];
            let src = &cols_row[oh * out_w..(oh + 1) * out_w][self.cols.clone()];
            strided_map_mut(g.stride[1], &mut plane[start..], src, |d, v| *d += v);
        }
    }
}

/// f(dst[k], src[k·stride]) for every k in dst.
#[inline(always)]
fn strided_map<S: Copy, D>(stride: usize, src: &[S], dst: &mut [D], f: impl Fn(&mut D, S)) {
    dst.iter_mut()
        .zip(src.iter().step_by(stride))
        .for_each(|(d, &v)| f(d, v));
}

/// f(dst[k·stride], src[k]) for every k in src: [`strided_map`] with the
/// stride on the destination side.
#[inline(always)]
fn strided_map_mut<T: Copy>(stride: usize, dst: &mut [T], src: &[T], f: impl Fn(&mut T, T)) {
    dst.iter_mut()
        .step_by(stride)
        .zip(src)
        .for_each(|(d, &v)| f(d, v));
}

/// The adjoint of `im2col`: image[c, ih, iw] += cols[(c, i, j), (oh, ow)]
/// for every tap and position that reads that pixel.
///
/// Row r of the columns is cols[r·row_stride..][..Ho·Wo]: `row_stride` is
/// Ho·Wo for one image's own matrix, or N·Ho·Wo for image n's segment of a
/// batch's columns laid side by side (cols starting at n·Ho·Wo).
fn col2im_add<T: Float>(g: &ConvGeometry, cols: &[T], row_stride: usize, image: &mut [T]) {
    let positions = g.out_positions();
    let taps = g.kernel[0] * g.kernel[1];
    let windows: Vec<TapWindow> = (0..taps)
        .map(|t| TapWindow::new(g, [t / g.kernel[1], t % g.kernel[1]]))
        .collect();
    for row in 0..g.col_rows() {
        let cols_row = &cols[row * row_stride..][..positions];
        let plane = &mut image[(row / taps) * g.in_pixels()..][..g.in_pixels()];
        windows[row % taps].scatter_add(g, cols_row, plane);
    }
}

// ----- GEMM and batch parallelism -------------------------------------------

/// Runs `per_chunk(i, out_i, scratch, parallel)` on each chunk of `out`
/// (`chunk_len` elements each, the last possibly shorter) with a scratch
/// buffer of `scratch_len`. With at least as many chunks as threads, chunks
/// run in parallel and each GEMM is single-threaded; otherwise chunks run
/// in turn and each GEMM (of `macs_per_chunk` multiply-adds) uses the threads.
fn for_each_chunk<O: Send, T: Float>(
    out: &mut [O],
    chunk_len: usize,
    scratch_len: usize,
    macs_per_chunk: usize,
    per_chunk: impl Fn(usize, &mut [O], &mut [T], bool) + Send + Sync,
) {
    if chunk_len == 0 {
        return;
    }
    let chunks = out.len().div_ceil(chunk_len);
    let threads = rayon::current_num_threads();
    if threads > 1 && chunks >= threads {
        // Two tasks per thread, each a run of chunks with one scratch buffer:
        // rayon's for_each_init makes a buffer per stolen job, and zeroing a
        // fresh megabyte for every chunk cost a tenth of D2's forward.
        let per_task = chunks.div_ceil(2 * threads);
        out.par_chunks_mut(per_task * chunk_len)
            .enumerate()
            .for_each(|(task, run)| {
                let mut scratch = vec![T::ZERO; scratch_len];
                for (k, out_i) in run.chunks_mut(chunk_len).enumerate() {
                    per_chunk(task * per_task + k, out_i, &mut scratch, false);
                }
            });
    } else {
        let parallel = worth_all_threads(macs_per_chunk);
        let mut scratch = vec![T::ZERO; scratch_len];
        for (i, out_i) in out.chunks_mut(chunk_len).enumerate() {
            per_chunk(i, out_i, &mut scratch, parallel);
        }
    }
}

#[cfg(test)]
#[path = "cpu_tests.rs"]
mod tests;
