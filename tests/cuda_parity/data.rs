//! Reduce, shape, embedding and dropout kernels. Tolerances (atol + rtol·|ref|):
//! copies (shape ops, gathers, max) must be exact, so 0 + 0; sums allow
//! atol 1e-4 + rtol 1e-5 (f32 block reductions add in another order than
//! the CPU's f64 accumulator); scatter-adds with atomics 1e-5 + 1e-5 (the
//! order of repeated additions varies); dropout masks must agree exactly
//! (atol 1e-6, the bound the mask check asks for, and rtol 0).

use kiln::Tensor;

use crate::common::{check_op, cuda_or_skip, randn};

const EXACT: (f64, f64) = (0.0, 0.0);
const SUM_TOL: (f64, f64) = (1e-4, 1e-5);
const ATOMIC_TOL: (f64, f64) = (1e-5, 1e-5);

/// Index values `(k · 7 + 3) mod bound`: repeats whenever count > bound.
fn indices(count: usize, bound: usize, shape: &[usize]) -> Tensor {
    let values = (0..count).map(|k| ((k * 7 + 3) % bound) as u32).collect();
    Tensor::from_indices(values, shape).unwrap()
}

#[test]
fn sum_and_mean_over_any_dims_match_cpu_with_both_sum_kernels() {
    let Some(dev) = cuda_or_skip("sum_and_mean") else {
        return;
    };
    let (atol, rtol) = SUM_TOL;
    // [37, 129] dim 1 takes the thread-per-output kernel (row shorter than a
    // block), [5, 1001] dim 1 the block-per-row one, dim 0 always the former.
    for (shape, dims) in [
        (vec![37, 129], vec![0]),
        (vec![37, 129], vec![1]),
        (vec![5, 1001], vec![1]),
        (vec![3, 7, 33], vec![0, 2]),
        (vec![3, 7, 33], vec![]),
    ] {
        let x = randn(&shape, 11);
        for keepdim in [false, true] {
            let what = format!("sum {shape:?} dims {dims:?} keepdim {keepdim}");
            let d = dims.clone();
            check_op(
                &what,
                dev,
                std::slice::from_ref(&x),
                |t| t[0].sum(&d, keepdim),
                atol,
                rtol,
            );
            let what = format!("mean {shape:?} dims {dims:?} keepdim {keepdim}");
            let d = dims.clone();
            check_op(
                &what,
                dev,
                std::slice::from_ref(&x),
                |t| t[0].mean(&d, keepdim),
                atol,
                rtol,
            );
        }
    }
    let x = randn(&[1001], 12);
    check_op(
        "sum_all",
        dev,
        std::slice::from_ref(&x),
        |t| t[0].sum_all(),
        atol,
        rtol,
    );
    check_op("mean_all", dev, &[x], |t| t[0].mean_all(), atol, rtol);
}

#[test]
fn max_values_argmax_and_gradient_match_cpu() {
    let Some(dev) = cuda_or_skip("max") else {
        return;
    };
    let (atol, rtol) = EXACT;
    for (shape, dim) in [(vec![37, 129], 0), (vec![37, 129], 1), (vec![3, 7, 33], 1)] {
        let x = randn(&shape, 13);
        let what = format!("max {shape:?} dim {dim}");
        check_op(
            &what,
            dev,
            std::slice::from_ref(&x),
            |t| t[0].max(dim, false),
            atol,
            rtol,
        );
        let (_, cpu_argmax) = x.max_with_indices(dim, true).unwrap();
        let (_, cuda_argmax) = x
            .to_device(dev)
            .unwrap()
            .max_with_indices(dim, true)
            .unwrap();
        assert_eq!(cuda_argmax.device(), dev, "{what}: argmax left the device");
        assert_eq!(
            cpu_argmax.to_indices().unwrap(),
            cuda_argmax.to_indices().unwrap(),
            "{what}: argmax"
        );
    }
}

#[test]
fn max_propagates_nan_and_picks_the_first_maximum_like_cpu() {
    let Some(dev) = cuda_or_skip("max_nan_and_ties") else {
        return;
    };
    // Row 0: a NaN after the maximum; row 1: the maximum 5 twice (first at 0).
    let x = Tensor::from_vec(vec![1.0f32, 9.0, f32::NAN, 2.0, 5.0, 0.0, 5.0, 1.0], [2, 4]).unwrap();
    let (cpu_values, cpu_argmax) = x.max_with_indices(1, false).unwrap();
    let (cuda_values, cuda_argmax) = x
        .to_device(dev)
        .unwrap()
        .max_with_indices(1, false)
        .unwrap();
    assert_eq!(
        cuda_argmax.to_indices().unwrap(),
        cpu_argmax.to_indices().unwrap()
    );
    assert_eq!(cuda_argmax.to_indices().unwrap(), vec![2, 0]);
    let (cpu, cuda) = (cpu_values.to_f64_vec(), cuda_values.to_f64_vec());
    assert!(
        cpu[0].is_nan() && cuda[0].is_nan(),
        "NaN must propagate: cpu {cpu:?}, cuda {cuda:?}"
    );
    assert_eq!(cuda[1], cpu[1]);
}

#[test]
fn permute_narrow_cat_and_broadcast_match_cpu_exactly() {
    let Some(dev) = cuda_or_skip("shape_ops") else {
        return;
    };
    let (atol, rtol) = EXACT;
    let x = randn(&[3, 5, 7, 11], 21);
    let one = std::slice::from_ref(&x);
    check_op(
        "permute",
        dev,
        one,
        |t| t[0].permute(&[2, 0, 3, 1]),
        atol,
        rtol,
    );
    check_op("transpose", dev, one, |t| t[0].transpose(1, 3), atol, rtol);
    let y = randn(&[37, 129], 22);
    check_op(
        "narrow dim 1",
        dev,
        std::slice::from_ref(&y),
        |t| t[0].narrow(1, 5, 100),
        atol,
        rtol,
    );
    check_op(
        "narrow dim 0",
        dev,
        &[y],
        |t| t[0].narrow(0, 36, 1),
        atol,
        rtol,
    );
    let parts = [
        randn(&[3, 5, 7], 23),
        randn(&[3, 2, 7], 24),
        randn(&[3, 11, 7], 25),
    ];
    check_op(
        "cat dim 1",
        dev,
        &parts,
        |t| Tensor::cat(&[&t[0], &t[1], &t[2]], 1),
        atol,
        rtol,
    );
    let rows = [randn(&[4, 129], 26), randn(&[33, 129], 27)];
    check_op(
        "cat dim 0",
        dev,
        &rows,
        |t| Tensor::cat(&[&t[0], &t[1]], 0),
        atol,
        rtol,
    );
    let same = [randn(&[5, 37], 28), randn(&[5, 37], 29)];
    check_op(
        "stack",
        dev,
        &same,
        |t| Tensor::stack(&[&t[0], &t[1]], 1),
        atol,
        rtol,
    );
    // Broadcast's backward sums, so its gradient gets the sum tolerance.
    let (sum_atol, sum_rtol) = SUM_TOL;
    let b = randn(&[7, 1, 5], 30);
    check_op(
        "broadcast_to",
        dev,
        &[b],
        |t| t[0].broadcast_to([2, 7, 33, 5]),
        sum_atol,
        sum_rtol,
    );
    let row = randn(&[1, 129], 31);
    check_op(
        "broadcast_to rows",
        dev,
        &[row],
        |t| t[0].broadcast_to([37, 129]),
        sum_atol,
        sum_rtol,
    );
}

#[test]
fn shape_ops_copy_u32_indices_bit_for_bit() {
    let Some(dev) = cuda_or_skip("shape_ops_u32") else {
        return;
    };
    let a = Tensor::from_indices((0..105).map(|k| k * 40_000_017).collect(), [3, 5, 7]).unwrap();
    let b = indices(42, 1000, &[3, 2, 7]);
    let (ga, gb) = (a.to_device(dev).unwrap(), b.to_device(dev).unwrap());
    let pairs = [
        (
            a.permute(&[2, 0, 1]).unwrap(),
            ga.permute(&[2, 0, 1]).unwrap(),
        ),
        (a.narrow(1, 1, 3).unwrap(), ga.narrow(1, 1, 3).unwrap()),
        (
            Tensor::cat(&[&a, &b], 1).unwrap(),
            Tensor::cat(&[&ga, &gb], 1).unwrap(),
        ),
        (
            b.narrow(1, 1, 1)
                .unwrap()
                .broadcast_to([4, 3, 6, 7])
                .unwrap(),
            gb.narrow(1, 1, 1)
                .unwrap()
                .broadcast_to([4, 3, 6, 7])
                .unwrap(),
        ),
    ];
    for (i, (cpu, cuda)) in pairs.iter().enumerate() {
        assert_eq!(cpu.dims(), cuda.dims(), "case {i}: shape");
        assert_eq!(
            cpu.to_indices().unwrap(),
            cuda.to_indices().unwrap(),
            "case {i}: values"
        );
    }
}

#[test]
fn embedding_index_select_and_gather_match_cpu_with_repeated_indices() {
    let Some(dev) = cuda_or_skip("embedding_family") else {
        return;
    };
    let (atol, rtol) = ATOMIC_TOL;
    // 65 ids over 37 rows: many rows are picked more than once.
    let weight = randn(&[37, 129], 41);
    let ids = indices(65, 37, &[5, 13]);
    check_op(
        "embedding",
        dev,
        &[weight, ids],
        |t| Tensor::embedding(&t[1], &t[0]),
        atol,
        rtol,
    );
    let x = randn(&[7, 37, 11], 42);
    let picked = indices(53, 37, &[53]);
    check_op(
        "index_select dim 1",
        dev,
        &[x.clone(), picked],
        |t| t[0].index_select(1, &t[1]),
        atol,
        rtol,
    );
    let picked = indices(9, 11, &[9]);
    check_op(
        "index_select dim 2",
        dev,
        &[x.clone(), picked],
        |t| t[0].index_select(2, &t[1]),
        atol,
        rtol,
    );
    // gather with an index smaller than the input outside dim (PyTorch allows it).
    let index = indices(7 * 20 * 9, 37, &[7, 20, 9]);
    check_op(
        "gather dim 1",
        dev,
        &[x.clone(), index],
        |t| t[0].gather(1, &t[1]),
        atol,
        rtol,
    );
    let index = indices(3 * 37 * 11, 7, &[3, 37, 11]);
    check_op(
        "gather dim 0",
        dev,
        &[x, index],
        |t| t[0].gather(0, &t[1]),
        atol,
        rtol,
    );
}

/// Runs an op on the CPU (false) or on CUDA (true).
type RunOnDevice<'a> = dyn Fn(bool) -> kiln::Result<Tensor> + 'a;

#[test]
fn out_of_range_ids_give_the_cpu_error_message_on_cuda() {
    let Some(dev) = cuda_or_skip("index_range_errors") else {
        return;
    };
    let weight = randn(&[10, 4], 51);
    let bad_ids = Tensor::from_indices(vec![1, 2, 3, 10, 4, 5], [2, 3]).unwrap();
    let on = |t: &Tensor| t.to_device(dev).unwrap();
    let cases: [(&str, Box<RunOnDevice>); 3] = [
        (
            "embedding",
            Box::new(|gpu| {
                let (i, w) = if gpu {
                    (on(&bad_ids), on(&weight))
                } else {
                    (bad_ids.clone(), weight.clone())
                };
                Tensor::embedding(&i, &w)
            }),
        ),
        (
            "index_select",
            Box::new(|gpu| {
                let i = bad_ids.reshape([6]).unwrap();
                let (i, w) = if gpu {
                    (on(&i), on(&weight))
                } else {
                    (i, weight.clone())
                };
                w.index_select(0, &i)
            }),
        ),
        (
            "gather",
            Box::new(|gpu| {
                let i = Tensor::from_indices(vec![0, 3, 4, 1], [2, 2]).unwrap();
                let w = weight.narrow(0, 0, 2).unwrap();
                let (i, w) = if gpu { (on(&i), on(&w)) } else { (i, w) };
                w.gather(1, &i)
            }),
        ),
    ];
    for (what, run) in &cases {
        let cpu = run(false)
            .expect_err("CPU must reject the bad id")
            .to_string();
        let cuda = run(true)
            .expect_err("CUDA must reject the bad id")
            .to_string();
        assert_eq!(cuda, cpu, "{what}: error message");
    }
}

#[test]
fn dropout_mask_and_gradient_equal_cpu_exactly() {
    let Some(dev) = cuda_or_skip("dropout") else {
        return;
    };
    for (shape, p, seed) in [
        (vec![37, 1001], 0.3, 42),
        (vec![129], 0.9, 7),
        (vec![5, 33], 0.05, 1),
    ] {
        let x = randn(&shape, 61);
        let what = format!("dropout {shape:?} p {p} seed {seed}");
        check_op(
            &what,
            dev,
            std::slice::from_ref(&x),
            |t| t[0].dropout(p, seed),
            1e-6,
            0.0,
        );
        let cpu = x.dropout(p, seed).unwrap();
        let cuda = x.to_device(dev).unwrap().dropout(p, seed).unwrap();
        let same_mask = cpu
            .to_f64_vec()
            .iter()
            .zip(cuda.to_f64_vec())
            .all(|(a, b)| (*a == 0.0) == (b == 0.0));
        assert!(same_mask, "{what}: the zeroed positions differ");
        // bf16 and f16: the same mask, each survivor scaled in f32 and
        // rounded once, as on the CPU.
        for dtype in [kiln::DType::BF16, kiln::DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            let cpu = x.dropout(p, seed).unwrap();
            let cuda = x.to_device(dev).unwrap().dropout(p, seed).unwrap();
            assert_eq!(cuda.dtype(), dtype);
            assert_eq!(cuda.to_f64_vec(), cpu.to_f64_vec(), "{what} {dtype}");
        }
    }
}

#[test]
fn sixteen_bit_tensors_round_trip_through_the_device_and_convert_like_the_cpu() {
    let Some(dev) = cuda_or_skip("16-bit storage") else {
        return;
    };
    let x = randn(&[3, 37], 81);
    for dtype in [kiln::DType::BF16, kiln::DType::F16] {
        let on_cpu = x.to_dtype(dtype).unwrap();
        // Converted on the device's side of the call, and copied there and back.
        let on_device = x.to_device(dev).unwrap().to_dtype(dtype).unwrap();
        assert_eq!(on_device.dtype(), dtype);
        assert_eq!(on_device.device(), dev);
        let back = on_device.to_device(kiln::Device::Cpu).unwrap();
        assert_eq!(back.to_f64_vec(), on_cpu.to_f64_vec(), "{dtype}");
        let widened = on_cpu
            .to_device(dev)
            .unwrap()
            .to_dtype(kiln::DType::F32)
            .unwrap();
        assert_eq!(widened.to_f64_vec(), on_cpu.to_f64_vec(), "{dtype} widened");
    }
}

/// The device's `convert_dtype` gives the CPU's bits (the `half` crate's) on
/// the values where rounding is delicate: ties of both formats, f16's
/// overflow edge and subnormals, f32 subnormals, zeros, infinities and NaNs.
#[test]
fn device_conversions_give_the_cpus_bits_on_ties_edges_and_specials() {
    let Some(dev) = cuda_or_skip("convert_dtype") else {
        return;
    };
    let mut values: Vec<f32> = vec![
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        65504.0,
        65519.996,
        65520.0,
        2f32.powi(-14),
        2f32.powi(-24),
        2f32.powi(-25),
        1.5 * 2f32.powi(-25),
        2f32.powi(-25) * (1.0 + 2f32.powi(-20)),
        3.0 * 2f32.powi(-25),
        1e-40,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::from_bits(0x7FC0_0000),
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFFC1_2345),
    ];
    let negated: Vec<f32> = values.iter().map(|v| -v).collect();
    values.extend(negated);
    values.extend(
        randn(&[1000], 90)
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v * 1e3),
    );
    let n = values.len();
    let x = Tensor::from_vec(values, [n]).unwrap();
    let bits = |t: &Tensor| -> Vec<u16> {
        match t.dtype() {
            kiln::DType::BF16 => t
                .to_vec::<kiln::bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            _ => t
                .to_vec::<kiln::f16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        }
    };
    for dtype in [kiln::DType::BF16, kiln::DType::F16] {
        let on_cpu = x.to_dtype(dtype).unwrap();
        let on_device = x.to_device(dev).unwrap().to_dtype(dtype).unwrap();
        assert_eq!(bits(&on_device), bits(&on_cpu), "{dtype}: f32 -> {dtype}");
        // And back: exact, NaNs included (compared as bits).
        let back = on_device.to_dtype(kiln::DType::F32).unwrap();
        let expected = on_cpu.to_dtype(kiln::DType::F32).unwrap();
        let as_bits = |t: &Tensor| -> Vec<u32> {
            t.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(as_bits(&back), as_bits(&expected), "{dtype} -> f32");
    }
}

/// The shape kernels copy 2-byte elements of bf16 and f16 tensors exactly as
/// the CPU's shape ops do.
#[test]
fn shape_ops_copy_sixteen_bit_values_bit_for_bit() {
    let Some(dev) = cuda_or_skip("16-bit shape copies") else {
        return;
    };
    for dtype in [kiln::DType::BF16, kiln::DType::F16] {
        let x = randn(&[3, 5, 7], 95).to_dtype(dtype).unwrap();
        let y = randn(&[3, 2, 7], 96).to_dtype(dtype).unwrap();
        type ShapeOp = fn(&Tensor, &Tensor) -> kiln::Result<Tensor>;
        let ops: [(&str, ShapeOp); 4] = [
            ("permute", |x, _| x.permute(&[2, 0, 1])),
            ("narrow", |x, _| x.narrow(1, 1, 3)),
            ("cat", |x, y| Tensor::cat(&[x, y], 1)),
            ("broadcast_to", |x, _| {
                x.narrow(1, 0, 1)?.broadcast_to([2, 3, 4, 7])
            }),
        ];
        for (name, op) in ops {
            let cpu = op(&x, &y).unwrap();
            let cuda = op(&x.to_device(dev).unwrap(), &y.to_device(dev).unwrap()).unwrap();
            assert_eq!(cuda.dtype(), dtype, "{name}");
            assert_eq!(cuda.dims(), cpu.dims(), "{name}");
            assert_eq!(cuda.to_f64_vec(), cpu.to_f64_vec(), "{dtype} {name}");
        }
    }
}
