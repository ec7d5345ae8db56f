use kiln::{DType, Device, Rng, Tensor};
use proptest::prelude::*;
use std::sync::atomic::Ordering;

use crate::harness::{CASE_ON_CUDA, CaseResult, Expect, V, check, cuda_present, probe};
use crate::operands::{Fill, dims, dtype, indices, scalar, values};
use crate::oracles::numel_fits;

// ----- construction ----------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct ConstructCase {
    dims: Vec<usize>,
    huge: u8,
    dtype: DType,
    cuda: bool,
    value: f64,
    start: f64,
    end: f64,
    step: f64,
    extra: usize,
    seed: u64,
}

pub(crate) fn construct_case() -> impl Strategy<Value = ConstructCase> {
    (
        dims(0..=6),
        0u8..8,
        dtype(),
        prop::bool::weighted(0.3),
        scalar(),
        scalar(),
        scalar(),
        scalar(),
        0usize..3,
        any::<u64>(),
    )
        .prop_map(
            |(dims, huge, dtype, cuda, value, start, end, step, extra, seed)| ConstructCase {
                dims,
                huge,
                dtype,
                cuda,
                value,
                start,
                end,
                step,
                extra,
                seed,
            },
        )
}

pub(crate) fn construction(case: ConstructCase) -> CaseResult {
    // A shape whose element count overflows now and then.
    let dims = match case.huge {
        0 => vec![usize::MAX, 2],
        1 => vec![1 << 32, 1 << 32],
        _ => case.dims.clone(),
    };
    let fits = numel_fits(&dims);
    let n = if fits { dims.iter().product() } else { 0 };
    let device = if case.cuda && cuda_present() {
        CASE_ON_CUDA.store(true, Ordering::Relaxed);
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let dtype = case.dtype;
    let on_cuda_v = match (device, dtype) {
        (Device::Cpu, _) => V::Valid,
        (_, DType::F64) => V::Invalid,
        _ => V::Maybe,
    };
    let shape = fits.then(|| dims.clone());

    let count = if fits { n + case.extra } else { case.extra };
    check(
        "from_vec",
        Expect::new(shape.clone().filter(|_| count == n), V::Valid),
        &[],
        || Tensor::from_vec(values(count, Fill::Normal, case.seed), dims.clone()),
    )?;
    check(
        "from_indices",
        Expect::new(shape.clone().filter(|_| count == n), V::Valid),
        &[],
        || Tensor::from_indices(indices(count, 5, case.seed), dims.clone()),
    )?;
    check("full", Expect::new(shape.clone(), on_cuda_v), &[], || {
        Tensor::full(case.value, dims.clone(), dtype, device)
    })?;
    check("zeros", Expect::new(shape.clone(), on_cuda_v), &[], || {
        Tensor::zeros(dims.clone(), dtype, device)
    })?;
    check("ones", Expect::new(shape.clone(), on_cuda_v), &[], || {
        Tensor::ones(dims.clone(), dtype, device)
    })?;
    let float = V::from(dtype.is_float());
    check(
        "randn",
        Expect::new(shape.clone(), on_cuda_v.and(float)),
        &[],
        || Tensor::randn(dims.clone(), dtype, device, &mut Rng::seed(case.seed)),
    )?;
    let range_v = V::from(case.start < case.value);
    let range_v = if case.start.is_finite() && case.value.is_finite() {
        range_v
    } else {
        range_v.and(V::Maybe)
    };
    check(
        "rand",
        Expect::new(shape, on_cuda_v.and(float).and(range_v)),
        &[],
        || {
            Tensor::rand(
                case.start,
                case.value,
                dims.clone(),
                dtype,
                device,
                &mut Rng::seed(case.seed),
            )
        },
    )?;
    let scalar_t = probe("scalar", V::Valid, || Ok(Tensor::scalar(case.value)))?;
    prop_assert_eq!(scalar_t.map(|t| t.rank()), Some(0));

    // arange: finite ranges of at most a few thousand steps must work;
    // infinite or NaN bounds and steps must not.
    let (start, end, step) = (case.start, case.end, case.step);
    let span = (end - start) / step;
    let finite = start.is_finite() && end.is_finite() && step.is_finite();
    let expect = if !finite || step == 0.0 || span < 0.0 || span >= (1u64 << 60) as f64 {
        // Non-finite, backwards, or more values than an allocation can hold.
        Expect::new(None, V::Invalid)
    } else if span <= 4096.0 {
        Expect::new(Some(vec![span.ceil() as usize]), on_cuda_v)
    } else {
        // Finite, but too many values to allocate in a test.
        return Ok(());
    };
    let out = check("arange", expect, &[], || {
        Tensor::arange(start, end, step, dtype, device)
    })?;
    if let Some(out) = out {
        prop_assert!(out.numel() <= 4097, "arange made {} values", out.numel());
    }

    // autocast accepts only 16-bit dtypes.
    let guard = probe("try_autocast", V::from(dtype.is_half()), || {
        kiln::try_autocast(dtype)
    })?;
    drop(guard);
    prop_assert_eq!(kiln::autocast_dtype(), None);
    Ok(())
}
