//! `scaled_dot_product_attention` on CUDA against the CPU: every option of
//! the general path (S ≠ L, Ev ≠ E, causal with L ≠ S, float mask with its
//! gradient, bool mask with a fully masked row, explicit scale with k and v
//! broadcast, dropout with the same seed), rows wider than a block, and
//! 16-bit operands. Tolerances as the other attention checks (norm.rs):
//! f32 reductions summed in another order than the CPU's.

use kiln::{AttentionDropout, AttentionMask, AttentionOptions, DType, Tensor};

use crate::common::{check_op, check_op_16bit, cuda_or_skip, randn};

const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-4;

fn sdpa(t: &[Tensor], options: &AttentionOptions) -> kiln::Result<Tensor> {
    Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], options)
}

/// q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev] from `seed`.
fn qkv(b: usize, h: usize, l: usize, s: usize, e: usize, ev: usize, seed: u64) -> Vec<Tensor> {
    vec![
        randn(&[b, h, l, e], seed),
        randn(&[b, h, s, e], seed + 1),
        randn(&[b, h, s, ev], seed + 2),
    ]
}

#[test]
fn general_attention_matches_cpu() {
    let Some(dev) = cuda_or_skip("scaled_dot_product_attention") else {
        return;
    };
    // Odd lengths, and rows of 300 keys: wider than the 256-thread block.
    for (l, s, seed) in [(7, 13, 71), (37, 300, 74)] {
        check_op(
            &format!("sdpa L {l} S {s} Ev 5"),
            dev,
            &qkv(2, 3, l, s, 8, 5, seed),
            |t| sdpa(t, &AttentionOptions::default()),
            ATOL,
            RTOL,
        );
    }
    for (l, s) in [(5, 11), (11, 5)] {
        check_op(
            &format!("sdpa causal L {l} S {s}"),
            dev,
            &qkv(2, 2, l, s, 8, 3, 77),
            |t| sdpa(t, &AttentionOptions::causal()),
            ATOL,
            RTOL,
        );
    }
    // The fused causal kernels at a scale other than 1/√E.
    let scaled_causal = AttentionOptions {
        scale: Some(0.3),
        ..AttentionOptions::causal()
    };
    check_op(
        "sdpa fused causal scale 0.3",
        dev,
        &qkv(2, 3, 19, 19, 8, 8, 78),
        |t| sdpa(t, &scaled_causal),
        ATOL,
        RTOL,
    );
    let options = AttentionOptions {
        scale: Some(-0.7),
        ..AttentionOptions::default()
    };
    check_op(
        "sdpa scale -0.7, k and v [1, H, S, E]",
        dev,
        &[
            randn(&[3, 2, 9, 6], 80),
            randn(&[1, 2, 10, 6], 81),
            randn(&[1, 2, 10, 4], 82),
        ],
        |t| sdpa(t, &options),
        ATOL,
        RTOL,
    );
}

#[test]
fn masked_attention_matches_cpu() {
    let Some(dev) = cuda_or_skip("scaled_dot_product_attention masks") else {
        return;
    };
    // A float mask [B, 1, L, S] with a gradient, -inf entries and a fully
    // masked row (row 2) included.
    let (l, s) = (6, 9);
    let mask: Vec<f32> = randn(&[2, 1, l, s], 90)
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let row = (i / s) % l;
            if row == 2 || m < -1.0 {
                f32::NEG_INFINITY
            } else {
                m
            }
        })
        .collect();
    let mut inputs = qkv(2, 3, l, s, 8, 4, 91);
    inputs.push(Tensor::from_vec(mask, [2, 1, l, s]).unwrap());
    check_op(
        "sdpa float mask",
        dev,
        &inputs,
        |t| {
            let options = AttentionOptions {
                mask: Some(AttentionMask::Float(t[3].clone())),
                ..AttentionOptions::default()
            };
            sdpa(t, &options)
        },
        ATOL,
        RTOL,
    );
    // A bool [L, S] mask, fully masked row 0 included.
    let bits: Vec<u32> = (0..l * s)
        .map(|i| u32::from(i >= s && (i * 7) % 5 != 0))
        .collect();
    let bools = Tensor::from_indices(bits, [l, s]).unwrap();
    check_op(
        "sdpa bool mask",
        dev,
        &qkv(2, 3, l, s, 8, 4, 94),
        |t| {
            let options = AttentionOptions {
                mask: Some(AttentionMask::Bool(bools.to_device(t[0].device())?)),
                ..AttentionOptions::default()
            };
            sdpa(t, &options)
        },
        ATOL,
        RTOL,
    );
}

#[test]
fn attention_dropout_matches_cpu() {
    let Some(dev) = cuda_or_skip("scaled_dot_product_attention dropout") else {
        return;
    };
    // The seed fixes the mask on both devices: same output, same gradients.
    for is_causal in [false, true] {
        let options = AttentionOptions {
            is_causal,
            dropout: Some(AttentionDropout { p: 0.25, seed: 7 }),
            ..AttentionOptions::default()
        };
        check_op(
            &format!("sdpa dropout 0.25 causal {is_causal}"),
            dev,
            &qkv(2, 3, 13, 17, 8, 5, 97),
            |t| sdpa(t, &options),
            ATOL,
            RTOL,
        );
    }
}

#[test]
fn sixteen_bit_general_attention_matches_cpu() {
    let Some(dev) = cuda_or_skip("sixteen_bit_scaled_dot_product_attention") else {
        return;
    };
    // Both devices widen to f32 and round the output once.
    for (dtype, rtol) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
        check_op_16bit(
            "sdpa causal L 9 S 14",
            dev,
            &qkv(2, 2, 9, 14, 8, 6, 101),
            dtype,
            |t| sdpa(t, &AttentionOptions::causal()),
            1e-3,
            rtol,
        );
    }
}
