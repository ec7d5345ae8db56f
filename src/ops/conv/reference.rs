//! The definitions of the convolution kernels as plain direct loops, groups
//! included: slow, obviously correct, and independent of the im2col + GEMM
//! kernels they check (in unit tests and benchmarks).

use super::ConvGeometry;
use crate::storage::Float;

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

/// y[n, o, oh, ow] = b[o] + Σ_{c,i,j} x[n, g·Cg + c, oh·s − p + i·d, ow·s − p + j·d] · W[o, c, i, j]
/// over the Cg channels c of o's group g (pixels outside x count as zero).
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
    let (in_g, out_g) = (g.in_channels_per_group(), g.out_channels_per_group());
    let mut y = vec![T::ZERO; g.batch * out_c * out_h * out_w];
    for n in 0..g.batch {
        for o in 0..out_c {
            for oh in 0..out_h {
                for ow in 0..out_w {
                    let mut acc = bias.map_or(T::ZERO, |b| b[o]);
                    let first_c = o / out_g * in_g;
                    for c in 0..in_g {
                        for i in 0..kh {
                            for j in 0..kw {
                                if let Some((ih, iw)) = input_pixel(g, oh, ow, i, j) {
                                    acc += x[((n * in_c + first_c + c) * in_h + ih) * in_w + iw]
                                        * weight[((o * in_g + c) * kh + i) * kw + j];
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

/// dx[n, g·Cg + c, oh·s − p + i·d, ow·s − p + j·d] += dy[n, o, oh, ow] · W[o, c, i, j]
/// (g: o's group): each output's gradient flows back to the pixels it read.
pub fn conv2d_backward_data_reference<T: Float>(
    g: &ConvGeometry,
    dy: &[T],
    weight: &[T],
) -> Vec<T> {
    let [in_h, in_w] = g.in_size;
    let [out_h, out_w] = g.out_size;
    let [kh, kw] = g.kernel;
    let (in_c, out_c) = (g.in_channels, g.out_channels);
    let (in_g, out_g) = (g.in_channels_per_group(), g.out_channels_per_group());
    let mut dx = vec![T::ZERO; g.batch * in_c * in_h * in_w];
    for n in 0..g.batch {
        for o in 0..out_c {
            for oh in 0..out_h {
                for ow in 0..out_w {
                    let grad = dy[((n * out_c + o) * out_h + oh) * out_w + ow];
                    let first_c = o / out_g * in_g;
                    for c in 0..in_g {
                        for i in 0..kh {
                            for j in 0..kw {
                                if let Some((ih, iw)) = input_pixel(g, oh, ow, i, j) {
                                    dx[((n * in_c + first_c + c) * in_h + ih) * in_w + iw] +=
                                        grad * weight[((o * in_g + c) * kh + i) * kw + j];
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

/// dW[o, c, i, j] = Σ_{n,oh,ow} dy[n, o, oh, ow] · x[n, g·Cg + c, oh·s − p + i·d, ow·s − p + j·d]
/// (g: o's group).
pub fn conv2d_backward_weight_reference<T: Float>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Vec<T> {
    let [in_h, in_w] = g.in_size;
    let [out_h, out_w] = g.out_size;
    let [kh, kw] = g.kernel;
    let (in_c, out_c) = (g.in_channels, g.out_channels);
    let (in_g, out_g) = (g.in_channels_per_group(), g.out_channels_per_group());
    let mut dw = vec![T::ZERO; out_c * in_g * kh * kw];
    for o in 0..out_c {
        let first_c = o / out_g * in_g;
        for c in 0..in_g {
            for i in 0..kh {
                for j in 0..kw {
                    let mut acc = T::ZERO;
                    for n in 0..g.batch {
                        for oh in 0..out_h {
                            for ow in 0..out_w {
                                if let Some((ih, iw)) = input_pixel(g, oh, ow, i, j) {
                                    acc += dy[((n * out_c + o) * out_h + oh) * out_w + ow]
                                        * x[((n * in_c + first_c + c) * in_h + ih) * in_w + iw];
                                }
                            }
                        }
                    }
                    dw[((o * in_g + c) * kh + i) * kw + j] = acc;
                }
            }
        }
    }
    dw
}

/// conv_transpose2d by its own definition, independent of conv2d: every input
/// pixel x[n, ci, h, w] adds x · W[ci, c, i, j] to the output pixel
/// y[n, g·Cout_g + c, h·s − p + i·d, w·s − p + j·d] (dropped when outside y;
/// g is ci's group, c runs over the group's Cout_g channels), plus b.
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
                    // x channel ci of group ci / (x_c/G) writes that group's y channels.
                    let y_g = y_c / g.groups;
                    let first_co = ci / (x_c / g.groups) * y_g;
                    for co_in_group in 0..y_g {
                        let co = first_co + co_in_group;
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
                                        value
                                            * weight[((ci * y_g + co_in_group) * kh + i) * kw + j];
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
