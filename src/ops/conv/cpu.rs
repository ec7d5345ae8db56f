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
//! The direct-loop `*_reference` functions at the bottom state each kernel's
//! definition plainly; the unit tests check the fast kernels against them.

use std::ops::Range;

use rayon::prelude::*;

use super::ConvGeometry;
use crate::ops::gemm::cpu::{Mat, gemm_into, worth_all_threads};
use crate::storage::{Float, Stored};

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

// ----- references: the definitions, as direct loops -------------------------

/// The input pixel (ih, iw) that output position (oh, ow) reads through tap
/// (i, j), or None when it falls in the padding.
fn input_pixel(
    g: &ConvGeometry,
    oh: usize,
    ow: usize,
    i: usize,
    j: usize,
) -> Option<(usize, usize)> {
    let ih = (oh * g.stride[0] + i * g.dilation[0]) as isize - g.padding[0] as isize;
    let iw = (ow * g.stride[1] + j * g.dilation[1]) as isize - g.padding[1] as isize;
    let inside =
        (0..g.in_size[0] as isize).contains(&ih) && (0..g.in_size[1] as isize).contains(&iw);
    inside.then_some((ih as usize, iw as usize))
}

/// y[n, o, oh, ow] = b[o] + Σ_{c,i,j} x[n, c, oh·s − p + i·d, ow·s − p + j·d] · W[o, c, i, j]
/// (pixels outside x count as zero).
pub fn conv2d_reference<T: Float>(
    g: &ConvGeometry,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
) -> Vec<T> {
    let [in_h, in_w] = g.in_size;
    let [out_h, out_w] = g.out_size;
    let [kh, kw] = g.kernel;
    let (in_c, out_c) = (g.in_channels, g.out_channels);
    let mut y = vec![T::ZERO; g.batch * out_c * out_h * out_w];
    for n in 0..g.batch {
        for o in 0..out_c {
            for oh in 0..out_h {
                for ow in 0..out_w {
                    let mut acc = bias.map_or(T::ZERO, |b| b[o]);
                    for c in 0..in_c {
                        for i in 0..kh {
                            for j in 0..kw {
                                if let Some((ih, iw)) = input_pixel(g, oh, ow, i, j) {
                                    acc += x[((n * in_c + c) * in_h + ih) * in_w + iw]
                                        * weight[((o * in_c + c) * kh + i) * kw + j];
                                }
                            }
                        }
                    }
                    y[((n * out_c + o) * out_h + oh) * out_w + ow] = acc;
                }
            }
        }
    }
    y
}

/// dx[n, c, oh·s − p + i·d, ow·s − p + j·d] += dy[n, o, oh, ow] · W[o, c, i, j]:
/// each output's gradient flows back to the pixels it read.
pub fn conv2d_backward_data_reference<T: Float>(
    g: &ConvGeometry,
    dy: &[T],
    weight: &[T],
) -> Vec<T> {
    let [in_h, in_w] = g.in_size;
    let [out_h, out_w] = g.out_size;
    let [kh, kw] = g.kernel;
    let (in_c, out_c) = (g.in_channels, g.out_channels);
    let mut dx = vec![T::ZERO; g.batch * in_c * in_h * in_w];
    for n in 0..g.batch {
        for o in 0..out_c {
            for oh in 0..out_h {
                for ow in 0..out_w {
                    let grad = dy[((n * out_c + o) * out_h + oh) * out_w + ow];
                    for c in 0..in_c {
                        for i in 0..kh {
                            for j in 0..kw {
                                if let Some((ih, iw)) = input_pixel(g, oh, ow, i, j) {
                                    dx[((n * in_c + c) * in_h + ih) * in_w + iw] +=
                                        grad * weight[((o * in_c + c) * kh + i) * kw + j];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// dW[o, c, i, j] = Σ_{n,oh,ow} dy[n, o, oh, ow] · x[n, c, oh·s − p + i·d, ow·s − p + j·d].
pub fn conv2d_backward_weight_reference<T: Float>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Vec<T> {
    let [in_h, in_w] = g.in_size;
    let [out_h, out_w] = g.out_size;
    let [kh, kw] = g.kernel;
    let (in_c, out_c) = (g.in_channels, g.out_channels);
    let mut dw = vec![T::ZERO; out_c * in_c * kh * kw];
    for o in 0..out_c {
        for c in 0..in_c {
            for i in 0..kh {
                for j in 0..kw {
                    let mut acc = T::ZERO;
                    for n in 0..g.batch {
                        for oh in 0..out_h {
                            for ow in 0..out_w {
                                if let Some((ih, iw)) = input_pixel(g, oh, ow, i, j) {
                                    acc += dy[((n * out_c + o) * out_h + oh) * out_w + ow]
                                        * x[((n * in_c + c) * in_h + ih) * in_w + iw];
                                }
                            }
                        }
                    }
                    dw[((o * in_c + c) * kh + i) * kw + j] = acc;
                }
            }
        }
    }
    dw
}

/// conv_transpose2d by its own definition, independent of conv2d: every input
/// pixel x[n, ci, h, w] adds x · W[ci, co, i, j] to the output pixel
/// y[n, co, h·s − p + i·d, w·s − p + j·d] (dropped when outside y), plus b[co].
/// In `g`'s conv2d terms x is the output grid [N, out_channels, out_size] and
/// y the input image [N, in_channels, in_size].
pub fn conv_transpose2d_reference<T: Float>(
    g: &ConvGeometry,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
) -> Vec<T> {
    let [x_h, x_w] = g.out_size;
    let [y_h, y_w] = g.in_size;
    let [kh, kw] = g.kernel;
    let (x_c, y_c) = (g.out_channels, g.in_channels);
    let mut y = vec![T::ZERO; g.batch * y_c * y_h * y_w];
    for n in 0..g.batch {
        for co in 0..y_c {
            let b = bias.map_or(T::ZERO, |b| b[co]);
            y[(n * y_c + co) * y_h * y_w..][..y_h * y_w].fill(b);
        }
        for ci in 0..x_c {
            for h in 0..x_h {
                for w in 0..x_w {
                    let value = x[((n * x_c + ci) * x_h + h) * x_w + w];
                    for co in 0..y_c {
                        for i in 0..kh {
                            for j in 0..kw {
                                let yh = (h * g.stride[0] + i * g.dilation[0]) as isize
                                    - g.padding[0] as isize;
                                let yw = (w * g.stride[1] + j * g.dilation[1]) as isize
                                    - g.padding[1] as isize;
                                if (0..y_h as isize).contains(&yh)
                                    && (0..y_w as isize).contains(&yw)
                                {
                                    y[((n * y_c + co) * y_h + yh as usize) * y_w + yw as usize] +=
                                        value * weight[((ci * y_c + co) * kh + i) * kw + j];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::ops::conv::{Conv2dParams, ConvTranspose2dParams};
    use crate::tensor::Shape;

    fn random_values(len: usize, rng: &mut StdRng) -> Vec<f64> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn assert_close(what: &str, fast: &[f64], reference: &[f64], g: &ConvGeometry) {
        assert_eq!(fast.len(), reference.len(), "{what}: length for {g:?}");
        for (k, (a, b)) in fast.iter().zip(reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-10 * (1.0 + b.abs()),
                "{what}[{k}]: fast {a} vs reference {b} for {g:?}"
            );
        }
    }

    fn pick(rng: &mut StdRng, range: std::ops::RangeInclusive<usize>) -> [usize; 2] {
        [rng.random_range(range.clone()), rng.random_range(range)]
    }

    /// A random valid conv2d geometry with odd sizes, strides, padding and dilation.
    fn random_conv2d(rng: &mut StdRng) -> ConvGeometry {
        loop {
            let x = Shape::new([
                rng.random_range(1..=3),
                rng.random_range(1..=4),
                rng.random_range(1..=11),
                rng.random_range(1..=11),
            ]);
            let kernel = pick(rng, 1..=4);
            let weight = Shape::new([rng.random_range(1..=5), x.dims()[1], kernel[0], kernel[1]]);
            let params = Conv2dParams {
                stride: pick(rng, 1..=3),
                padding: pick(rng, 0..=2),
                dilation: pick(rng, 1..=3),
            };
            if let Ok(g) = ConvGeometry::for_conv2d(&x, &weight, params) {
                return g;
            }
        }
    }

    /// A random valid conv_transpose2d geometry, output_padding included.
    fn random_conv_transpose2d(rng: &mut StdRng) -> ConvGeometry {
        loop {
            let x = Shape::new([
                rng.random_range(1..=3),
                rng.random_range(1..=4),
                rng.random_range(1..=7),
                rng.random_range(1..=7),
            ]);
            let kernel = pick(rng, 1..=4);
            let weight = Shape::new([x.dims()[1], rng.random_range(1..=5), kernel[0], kernel[1]]);
            let stride = pick(rng, 1..=3);
            let dilation = pick(rng, 1..=3);
            let params = ConvTranspose2dParams {
                stride,
                padding: pick(rng, 0..=2),
                output_padding: [
                    rng.random_range(0..stride[0].max(dilation[0])),
                    rng.random_range(0..stride[1].max(dilation[1])),
                ],
                dilation,
            };
            if let Ok(g) = ConvGeometry::for_conv_transpose2d(&x, &weight, params) {
                return g;
            }
        }
    }

    /// Runs all four fast kernels and their references on random data for `g`.
    fn check_all_kernels(g: &ConvGeometry, rng: &mut StdRng) {
        let x = random_values(g.input_shape().numel(), rng);
        let w = random_values(g.weight_shape().numel(), rng);
        let dy = random_values(g.output_shape().numel(), rng);
        let b_out = random_values(g.out_channels, rng);
        let b_in = random_values(g.in_channels, rng);

        let fast = conv2d_forward(g, &x, &w, Some(&b_out));
        assert_close(
            "forward",
            &fast,
            &conv2d_reference(g, &x, &w, Some(&b_out)),
            g,
        );

        let fast = conv2d_backward_data(g, &dy, &w, None);
        assert_close(
            "backward_data",
            &fast,
            &conv2d_backward_data_reference(g, &dy, &w),
            g,
        );

        let fast = conv2d_backward_data(g, &dy, &w, Some(&b_in));
        let reference = conv_transpose2d_reference(g, &dy, &w, Some(&b_in));
        assert_close("transposed forward", &fast, &reference, g);

        let fast = conv2d_backward_weight(g, &x, &dy);
        assert_close(
            "backward_weight",
            &fast,
            &conv2d_backward_weight_reference(g, &x, &dy),
            g,
        );

        let pixels = g.out_positions();
        let reference: Vec<f64> = (0..g.out_channels)
            .map(|o| {
                (0..g.batch)
                    .map(|n| {
                        dy[(n * g.out_channels + o) * pixels..][..pixels]
                            .iter()
                            .sum::<f64>()
                    })
                    .sum()
            })
            .collect();
        assert_close(
            "bias_grad",
            &bias_grad(&dy, g.batch, g.out_channels, pixels),
            &reference,
            g,
        );
    }

    #[test]
    fn fast_conv2d_kernels_match_direct_loops_on_random_geometries() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..40 {
            let g = random_conv2d(&mut rng);
            check_all_kernels(&g, &mut rng);
        }
    }

    #[test]
    fn fast_conv_transpose2d_kernels_match_direct_loops_with_output_padding() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..40 {
            let g = random_conv_transpose2d(&mut rng);
            check_all_kernels(&g, &mut rng);
        }
    }

    #[test]
    fn dense_layer_convs_take_the_single_gemm_path_and_match_direct_loops() {
        // The window covers the whole unpadded input (any stride): one output
        // position, as in DCGAN's last D conv and first G convT.
        let mut rng = StdRng::seed_from_u64(5);
        for (x, w, stride) in [
            ([3, 4, 4, 4], [2, 4, 4, 4], [1, 1]),
            ([5, 2, 3, 2], [3, 2, 3, 2], [2, 3]),
            ([1, 1, 1, 1], [1, 1, 1, 1], [1, 1]),
        ] {
            let params = Conv2dParams {
                stride,
                ..Conv2dParams::default()
            };
            let g = ConvGeometry::for_conv2d(&Shape::new(x), &Shape::new(w), params).unwrap();
            assert!(is_dense(&g), "{g:?}");
            check_all_kernels(&g, &mut rng);
        }
        // convT from a 1×1 input with a full kernel: its mirror conv is dense.
        let params = ConvTranspose2dParams::default();
        let g = ConvGeometry::for_conv_transpose2d(
            &Shape::new([3, 5, 1, 1]),
            &Shape::new([5, 2, 4, 4]),
            params,
        )
        .unwrap();
        assert!(is_dense(&g), "{g:?}");
        check_all_kernels(&g, &mut rng);
    }

    #[test]
    fn forward_and_backward_data_are_adjoint() {
        // ⟨conv(x), dy⟩ = ⟨x, conv_backward_data(dy)⟩ for any x, dy: col2im is im2col's transpose.
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            let g = random_conv2d(&mut rng);
            let x = random_values(g.input_shape().numel(), &mut rng);
            let w = random_values(g.weight_shape().numel(), &mut rng);
            let dy = random_values(g.output_shape().numel(), &mut rng);
            let lhs: f64 = conv2d_forward(&g, &x, &w, None)
                .iter()
                .zip(&dy)
                .map(|(a, b)| a * b)
                .sum();
            let rhs: f64 = x
                .iter()
                .zip(conv2d_backward_data(&g, &dy, &w, None))
                .map(|(a, b)| a * b)
                .sum();
            assert!(
                (lhs - rhs).abs() <= 1e-10 * (1.0 + lhs.abs()),
                "{lhs} vs {rhs} for {g:?}"
            );
        }
    }

    /// 5 images [2, 5, 5] under a strided, padded 3×3 conv (col2im overlaps taps).
    fn five_strided_padded_images() -> (Shape, Shape, ConvGeometry) {
        let x = Shape::new([5, 2, 5, 5]);
        let weight = Shape::new([3, 2, 3, 3]);
        let params = Conv2dParams {
            stride: [2, 2],
            padding: [1, 1],
            dilation: [1, 1],
        };
        let g = ConvGeometry::for_conv2d(&x, &weight, params).unwrap();
        (x, weight, g)
    }

    #[test]
    fn forward_and_data_grad_in_image_chunks_match_the_references() {
        // 5 images, 2 per chunk: chunks of 2, 2 and 1, with and without bias,
        // strided and padded so that col2im overlaps taps.
        let (x, weight, g) = five_strided_padded_images();
        let mut rng = StdRng::seed_from_u64(9);
        let xv = random_values(x.numel(), &mut rng);
        let w = random_values(weight.numel(), &mut rng);
        let dy = random_values(g.output_shape().numel(), &mut rng);
        let out_bias = random_values(g.out_channels, &mut rng);
        let in_bias = random_values(g.in_channels, &mut rng);
        let two_images = 2 * g.col_rows() * g.out_positions();
        assert_eq!(images_per_chunk(&g, two_images), 2);
        for bias in [false, true] {
            let forward = forward_in_chunks(&g, &xv, &w, bias.then_some(&out_bias[..]), two_images);
            let expected = conv2d_reference(&g, &xv, &w, bias.then_some(&out_bias[..]));
            assert_close("forward in chunks", &forward, &expected, &g);
            let data =
                backward_data_in_chunks(&g, &dy, &w, bias.then_some(&in_bias[..]), two_images);
            let mut expected = conv2d_backward_data_reference(&g, &dy, &w);
            if bias {
                for (v, i) in expected.iter_mut().zip(0..) {
                    *v += in_bias[i / g.in_pixels() % g.in_channels];
                }
            }
            assert_close("backward-data in chunks", &data, &expected, &g);
        }
    }

    /// A bf16 x (or dy) is widened where the kernels read it and the output
    /// rounded where they write it: bit for bit the f32 kernels run on the
    /// widened values, then rounded, with chunks of 2, 2 and 1 images (the
    /// last chunk shorter, so the scratch buffers are only partly used).
    #[test]
    fn bf16_kernels_equal_the_f32_kernels_on_the_widened_values() {
        use crate::half_float::bf16;
        let (x, weight, g) = five_strided_padded_images();
        let mut rng = StdRng::seed_from_u64(11);
        let mut bf16_values = |len: usize| -> Vec<bf16> {
            let values = random_values(len, &mut rng);
            values.iter().map(|&v| bf16::from_f64(v)).collect()
        };
        let (xs, dys) = (
            bf16_values(x.numel()),
            bf16_values(g.output_shape().numel()),
        );
        let widen = |v: &[bf16]| -> Vec<f32> { v.iter().map(|h| h.to_f32()).collect() };
        let round = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&f| bf16::from_f32(f)).collect() };
        let w: Vec<f32> = widen(&bf16_values(weight.numel()));
        let out_bias: Vec<f32> = widen(&bf16_values(g.out_channels));
        let in_bias: Vec<f32> = widen(&bf16_values(g.in_channels));
        let two_images = 2 * g.col_rows() * g.out_positions();
        let (x32, dy32) = (widen(&xs), widen(&dys));
        for bias in [false, true] {
            let out_bias = bias.then_some(&out_bias[..]);
            let in_bias = bias.then_some(&in_bias[..]);
            assert_eq!(
                forward_in_chunks(&g, &xs, &w, out_bias, two_images),
                round(&forward_in_chunks(&g, &x32, &w, out_bias, two_images)),
                "forward"
            );
            assert_eq!(
                backward_data_in_chunks(&g, &dys, &w, in_bias, two_images),
                round(&backward_data_in_chunks(&g, &dy32, &w, in_bias, two_images)),
                "backward-data"
            );
        }
        assert_eq!(
            backward_weight_in_chunks(&g, &xs, &dys, two_images),
            round(&backward_weight_in_chunks(&g, &x32, &dy32, two_images)),
            "backward-weight"
        );
        assert_eq!(
            bias_grad(&dys, 5, g.out_channels, g.out_positions()),
            round(&bias_grad(&dy32, 5, g.out_channels, g.out_positions())),
            "bias gradient"
        );
    }

    #[test]
    fn weight_grad_reduced_in_batch_chunks_equals_one_chunk() {
        // 5 images with room for 2 per chunk: chunks of 2, 2 and 1 accumulate into dW.
        let x = Shape::new([5, 2, 3, 3]);
        let weight = Shape::new([3, 2, 2, 2]);
        let g = ConvGeometry::for_conv2d(&x, &weight, Conv2dParams::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let xv = random_values(x.numel(), &mut rng);
        let dy = random_values(g.output_shape().numel(), &mut rng);
        let reference = conv2d_backward_weight_reference(&g, &xv, &dy);
        let two_images = 2 * g.col_rows() * g.out_positions();
        let chunked = backward_weight_in_chunks(&g, &xv, &dy, two_images);
        assert_close("chunks of two images", &chunked, &reference, &g);
        assert_close(
            "one chunk",
            &conv2d_backward_weight(&g, &xv, &dy),
            &reference,
            &g,
        );
    }

    #[test]
    fn valid_outputs_matches_brute_force() {
        for out_len in 0..6 {
            for stride in 1..4 {
                for offset in 0..5 {
                    for pad in 0..4 {
                        for in_len in 0..7 {
                            let brute: Vec<usize> = (0..out_len)
                                .filter(|&o| {
                                    let i = (o * stride + offset) as isize - pad as isize;
                                    (0..in_len as isize).contains(&i)
                                })
                                .collect();
                            let fast: Vec<usize> =
                                valid_outputs(out_len, stride, offset, pad, in_len).collect();
                            assert_eq!(
                                fast, brute,
                                "out {out_len} s {stride} off {offset} p {pad} in {in_len}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f32_forward_matches_reference() {
        let x = Shape::new([3, 5, 9, 7]);
        let weight = Shape::new([6, 5, 3, 2]);
        let params = Conv2dParams {
            stride: [2, 1],
            padding: [1, 2],
            dilation: [1, 2],
        };
        let g = ConvGeometry::for_conv2d(&x, &weight, params).unwrap();
        let mut rng = StdRng::seed_from_u64(9);
        let xv: Vec<f32> = (0..x.numel())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let wv: Vec<f32> = (0..weight.numel())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let fast = conv2d_forward(&g, &xv, &wv, None);
        let reference = conv2d_reference(&g, &xv, &wv, None);
        for (a, b) in fast.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
