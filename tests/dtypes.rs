//! 16-bit floats (f16, bf16) as storage: conversions that round to nearest
//! even exactly as the `half` crate does, `to_dtype` with its gradient,
//! shape ops, arithmetic and checkpoints that keep the dtype, promotion with
//! f32 operands, and device copies. Autocast is tested in tests/autocast.rs.

use std::collections::BTreeMap;

use kiln::checkpoint;
use kiln::storage::CpuStorage;
use kiln::{DType, Device, Tensor, bf16, f16};
use rayon::prelude::*;

/// Converts every f32 bit pattern with kiln and compares it with `half`'s
/// scalar conversion `reference`, bit for bit (a NaN need only stay NaN:
/// its payload may differ).
fn check_every_f32<H: Copy + Send + Sync>(
    dtype: DType,
    reference: fn(f32) -> H,
    unwrap: fn(&CpuStorage) -> Option<&[H]>,
    bits: fn(H) -> u16,
    is_nan: fn(H) -> bool,
) {
    const CHUNK: u64 = 1 << 22;
    let mismatches: u64 = (0..(1u64 << 32) / CHUNK)
        .into_par_iter()
        .map(|chunk| {
            let values: Vec<f32> = (chunk * CHUNK..(chunk + 1) * CHUNK)
                .map(|b| f32::from_bits(b as u32))
                .collect();
            let converted = CpuStorage::F32(values.clone()).converted(dtype);
            let converted = unwrap(&converted).expect("converted to the asked dtype");
            let same = |got: H, expected: H| {
                bits(got) == bits(expected) || is_nan(got) && is_nan(expected)
            };
            values
                .iter()
                .zip(converted)
                .filter(|&(&x, &got)| !same(got, reference(x)))
                .count() as u64
        })
        .sum();
    assert_eq!(
        mismatches, 0,
        "{dtype}: {mismatches} f32 values converted differently"
    );
}

fn bf16_values(s: &CpuStorage) -> Option<&[bf16]> {
    match s {
        CpuStorage::BF16(v) => Some(v),
        _ => None,
    }
}

fn f16_values(s: &CpuStorage) -> Option<&[f16]> {
    match s {
        CpuStorage::F16(v) => Some(v),
        _ => None,
    }
}

#[test]
fn f32_to_bf16_equals_half_on_every_f32_bit_pattern() {
    check_every_f32(
        DType::BF16,
        bf16::from_f32,
        bf16_values,
        bf16::to_bits,
        bf16::is_nan,
    );
}

#[test]
fn f32_to_f16_equals_half_on_every_f32_bit_pattern() {
    check_every_f32(
        DType::F16,
        f16::from_f32,
        f16_values,
        f16::to_bits,
        f16::is_nan,
    );
}

#[test]
fn ties_round_to_even_and_nan_and_infinities_are_kept() {
    // bf16 keeps 8 significant bits: 1 + 2⁻⁸ is halfway between 1 and
    // 1 + 2⁻⁷ (ties to the even 1), 1 + 3·2⁻⁸ halfway between 1 + 2⁻⁷ and
    // 1 + 2⁻⁶ (ties to the even 1 + 2⁻⁶). f16 keeps 11: the same at 2⁻¹¹.
    let cases = [
        (DType::BF16, 1.0 + 2f32.powi(-8), 1.0),
        (DType::BF16, 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-6)),
        (DType::F16, 1.0 + 2f32.powi(-11), 1.0),
        (DType::F16, 1.0 + 3.0 * 2f32.powi(-11), 1.0 + 2f32.powi(-9)),
        // Above f16's largest finite value (65504) by more than half an ulp.
        (DType::F16, 65520.0, f32::INFINITY),
        (DType::BF16, f32::NEG_INFINITY, f32::NEG_INFINITY),
    ];
    for (dtype, x, expected) in cases {
        let rounded = Tensor::from_vec(vec![x], [1])
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            rounded.to_vec::<f32>().unwrap(),
            vec![expected],
            "{x} as {dtype}"
        );
    }
    for dtype in [DType::F16, DType::BF16] {
        let nan = Tensor::from_vec(vec![f32::NAN], [1])
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        assert!(nan.to_f64_vec()[0].is_nan(), "NaN as {dtype}");
    }
}

#[test]
fn to_dtype_is_differentiable_and_the_gradient_comes_back_in_the_source_dtype() {
    for (source, via) in [
        (DType::F32, DType::BF16),
        (DType::F32, DType::F16),
        (DType::F64, DType::BF16),
        (DType::F64, DType::F32),
    ] {
        let x = Tensor::from_vec(vec![0.5f64, -1.25, 3.0], [3])
            .unwrap()
            .to_dtype(source)
            .unwrap()
            .requires_grad_();
        let weights = Tensor::from_vec(vec![2.0f32, -3.0, 0.25], [3]).unwrap();
        // L = Σ w · f32(via(x)): dL/dx = w, converted back to x's dtype.
        let y = x.to_dtype(via).unwrap().to_dtype(DType::F32).unwrap();
        let grads = y
            .mul(&weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads.get(&x).expect("x has a gradient");
        assert_eq!(dx.dtype(), source, "{source} via {via}");
        assert_eq!(dx.to_f64_vec(), vec![2.0, -3.0, 0.25], "{source} via {via}");
    }
}

#[test]
fn sixteen_bit_tensors_keep_their_dtype_through_shape_ops_and_arithmetic() {
    let values: Vec<bf16> = (0..6).map(|i| bf16::from_f32(i as f32 - 2.5)).collect();
    let x = Tensor::from_vec(values.clone(), [2, 3]).unwrap();
    assert_eq!(x.dtype(), DType::BF16);
    assert_eq!(x.to_vec::<bf16>().unwrap(), values);
    // Shape ops copy values of any dtype.
    let t = x.transpose(0, 1).unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    assert_eq!(t.to_f64_vec(), vec![-2.5, 0.5, -1.5, 1.5, -0.5, 2.5]);
    let joined = Tensor::cat(&[&x, &x], 0).unwrap();
    assert_eq!(joined.dims(), &[4, 3]);
    assert_eq!(
        joined.narrow(0, 2, 2).unwrap().to_vec::<bf16>().unwrap(),
        values
    );
    // Arithmetic keeps the dtype and computes each value in f32: e^x rounded
    // once to bf16, not after every step of the exponential.
    let sum = x.add(&x).unwrap();
    assert_eq!(sum.dtype(), DType::BF16);
    assert_eq!(sum.to_f64_vec(), vec![-5.0, -3.0, -1.0, 1.0, 3.0, 5.0]);
    let exp = x.exp().unwrap();
    assert_eq!(exp.dtype(), DType::BF16);
    let expected: Vec<f64> = values
        .iter()
        .map(|v| bf16::from_f32(v.to_f32().exp()).to_f64())
        .collect();
    assert_eq!(exp.to_f64_vec(), expected);
    // A 16-bit operand with an f32 one promotes to f32, as PyTorch; f32 with
    // f64 stays an error that says what to do.
    let half = Tensor::from_vec(vec![f16::from_f32(1.0)], [1]).unwrap();
    let promoted = half.to_dtype(DType::F32).unwrap().add(&half).unwrap();
    assert_eq!(promoted.dtype(), DType::F32);
    assert_eq!(promoted.to_f64_vec(), vec![2.0]);
    let err = half
        .to_dtype(DType::F32)
        .unwrap()
        .add(&half.to_dtype(DType::F64).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("f64") && err.contains("to_dtype"), "{err}");
    // Creation in a 16-bit dtype rounds like a conversion.
    let filled = Tensor::full(1.0 + 2f64.powi(-8), [2], DType::BF16, Device::Cpu).unwrap();
    assert_eq!(filled.to_f64_vec(), vec![1.0, 1.0]);
}

#[test]
fn checkpoints_keep_f16_and_bf16_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("kiln-dtypes-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("half.safetensors");
    let bf: Vec<bf16> = [0.1f32, -2.0, 1e30, f32::INFINITY]
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let hf: Vec<f16> = [0.1f32, -2.0, 65504.0, 6e-8]
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let tensors = vec![
        (
            "w_bf16".to_string(),
            Tensor::from_vec(bf.clone(), [2, 2]).unwrap(),
        ),
        (
            "w_f16".to_string(),
            Tensor::from_vec(hf.clone(), [4]).unwrap(),
        ),
    ];
    checkpoint::save(&path, &tensors, &BTreeMap::new()).unwrap();
    let loaded = checkpoint::load(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let w = &loaded.tensors["w_bf16"];
    assert_eq!((w.dtype(), w.dims()), (DType::BF16, &[2, 2][..]));
    assert_eq!(w.to_vec::<bf16>().unwrap(), bf);
    let w = &loaded.tensors["w_f16"];
    assert_eq!(w.dtype(), DType::F16);
    assert_eq!(w.to_vec::<f16>().unwrap(), hf);
}

#[test]
fn a_bf16_state_dict_in_safetensors_format_loads() {
    // What PyTorch's `safetensors.torch.save_file` writes for a bf16 tensor:
    // the BF16 dtype and little-endian 16-bit words.
    let words: Vec<u16> = [1.0f32, -0.5, 3.0]
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![3], &bytes).unwrap();
    let file = safetensors::serialize([("fc.bias", view)], None).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-dtypes-torch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state_dict.safetensors");
    std::fs::write(&path, file).unwrap();
    let loaded = checkpoint::load(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let bias = &loaded.tensors["fc.bias"];
    assert_eq!(bias.dtype(), DType::BF16);
    assert_eq!(bias.to_f64_vec(), vec![1.0, -0.5, 3.0]);
}

#[test]
fn zeros_and_randn_in_sixteen_bit_dtypes() {
    for dtype in [DType::F16, DType::BF16] {
        let z = Tensor::zeros([2, 3], dtype, Device::Cpu).unwrap();
        assert_eq!((z.dtype(), z.to_f64_vec()), (dtype, vec![0.0; 6]));
        let r = Tensor::randn([64], dtype, Device::Cpu, &mut kiln::Rng::seed(3)).unwrap();
        let widened = r.to_dtype(DType::F32).unwrap();
        // Every value is exactly representable in the 16-bit type.
        assert_eq!(
            widened.to_dtype(dtype).unwrap().to_f64_vec(),
            r.to_f64_vec()
        );
    }
}
