//! The CPU kernels against the direct-loop references on random geometries
//! (groups, "same" padding and output_padding included), and the chunking,
//! dense and 16-bit paths against the plain ones.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::ops::conv::{Conv2dPadding, Conv2dParams, ConvTranspose2dParams};
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

/// A random valid conv2d geometry with odd sizes, strides, padding
/// (explicit, or "same" for stride 1), dilation and groups.
fn random_conv2d(rng: &mut StdRng) -> ConvGeometry {
    loop {
        let groups = rng.random_range(1..=3);
        let x = Shape::new([
            rng.random_range(1..=3),
            groups * rng.random_range(1..=3),
            rng.random_range(1..=11),
            rng.random_range(1..=11),
        ]);
        let kernel = pick(rng, 1..=4);
        let weight = Shape::new([
            groups * rng.random_range(1..=3),
            x.dims()[1] / groups,
            kernel[0],
            kernel[1],
        ]);
        let stride = pick(rng, 1..=3);
        let padding = if stride == [1, 1] && rng.random_range(0..3) == 0 {
            Conv2dPadding::Same
        } else {
            pick(rng, 0..=2).into()
        };
        let params = Conv2dParams {
            stride,
            padding,
            dilation: pick(rng, 1..=3),
            groups,
        };
        if let Ok(g) = ConvGeometry::for_conv2d(&x, &weight, params) {
            return g;
        }
    }
}

/// A random valid conv_transpose2d geometry, output_padding and groups included.
fn random_conv_transpose2d(rng: &mut StdRng) -> ConvGeometry {
    loop {
        let groups = rng.random_range(1..=3);
        let x = Shape::new([
            rng.random_range(1..=3),
            groups * rng.random_range(1..=3),
            rng.random_range(1..=7),
            rng.random_range(1..=7),
        ]);
        let kernel = pick(rng, 1..=4);
        let weight = Shape::new([x.dims()[1], rng.random_range(1..=3), kernel[0], kernel[1]]);
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
            groups,
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
        padding: [1, 1].into(),
        ..Conv2dParams::default()
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
        let data = backward_data_in_chunks(&g, &dy, &w, bias.then_some(&in_bias[..]), two_images);
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
        padding: [1, 2].into(),
        dilation: [1, 2],
        ..Conv2dParams::default()
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
