use kiln::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::sync::atomic::Ordering;

use crate::harness::{CASE_ON_CUDA, CUDA_TENSORS, cuda_present, valid};

// ----- generators ----------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Fill {
    /// Uniform in [-3, 3).
    Normal,
    /// Uniform in [0, 1): probabilities.
    Unit,
    /// Normal values with NaN, +∞ and −∞ sprinkled in.
    Special,
    /// Up to ±1e30: beyond f16's range.
    Huge,
}

/// How to make one operand.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub(crate) dims: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) cuda: bool,
    pub(crate) fill: Fill,
    pub(crate) seed: u64,
    pub(crate) grad: bool,
}

/// SplitMix64: the operands' values come from their seed alone.
pub(crate) fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn values(n: usize, fill: Fill, seed: u64) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|i| {
            let u = (mix(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            match fill {
                Fill::Normal => 6.0 * u - 3.0,
                Fill::Unit => u,
                Fill::Special if i % 3 == 0 => {
                    [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][(seed as usize + i / 3) % 3]
                }
                Fill::Special => 6.0 * u - 3.0,
                Fill::Huge => (2.0 * u - 1.0) * 1e30,
            }
        })
        .collect()
}

pub(crate) fn indices(n: usize, bound: u32, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| (mix(&mut state) % u64::from(bound.max(1))) as u32)
        .collect()
}

/// The largest dim size for each rank, so that no tensor exceeds ~700 values.
pub(crate) const MAX_DIM: [usize; 7] = [2, 6, 6, 5, 4, 3, 3];

pub(crate) fn dim_size(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 3 => Just(1usize), 8 => 2..=max]
}

pub(crate) fn dims(ranks: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<usize>> {
    ranks.prop_flat_map(|rank| prop::collection::vec(dim_size(MAX_DIM[rank]), rank))
}

pub(crate) fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        8 => Just(DType::F32),
        2 => Just(DType::F64),
        1 => Just(DType::BF16),
        1 => Just(DType::F16),
        1 => Just(DType::U32),
    ]
}

pub(crate) fn float_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        8 => Just(DType::F32),
        2 => Just(DType::F64),
        1 => Just(DType::BF16),
        1 => Just(DType::F16),
    ]
}

pub(crate) fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        6 => Just(Fill::Normal),
        1 => Just(Fill::Unit),
        2 => Just(Fill::Special),
        1 => Just(Fill::Huge),
    ]
}

pub(crate) fn spec_with(
    dims: impl Strategy<Value = Vec<usize>>,
    dtype: impl Strategy<Value = DType>,
) -> impl Strategy<Value = Spec> {
    (
        dims,
        dtype,
        prop::bool::weighted(0.3),
        fill(),
        any::<u64>(),
        prop::bool::weighted(0.5),
    )
        .prop_map(|(dims, dtype, cuda, fill, seed, grad)| Spec {
            dims,
            dtype,
            cuda,
            fill,
            seed,
            grad,
        })
}

pub(crate) fn spec(ranks: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Spec> {
    spec_with(dims(ranks), dtype())
}

/// A scalar argument: mostly ordinary, sometimes NaN, ±∞, 0 or enormous.
pub(crate) fn scalar() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -3.0..3.0f64,
        1 => Just(0.0),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(1e300),
    ]
}

/// A dim or index argument: mostly small, sometimes far out of range.
pub(crate) fn index_arg() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0..4usize,
        4 => 4..8usize,
        1 => Just(usize::MAX),
        1 => Just(usize::MAX / 2 + 1),
    ]
}

/// Makes the operand `spec` describes: a leaf that requires grad if asked
/// (and a float), on `cuda:0` if asked and present.
pub(crate) fn build(spec: &Spec) -> Result<Tensor, TestCaseError> {
    build_indices(spec, 8)
}

/// `build`, with u32 values below `bound`.
pub(crate) fn build_indices(spec: &Spec, bound: u32) -> Result<Tensor, TestCaseError> {
    let n: usize = spec.dims.iter().product();
    valid("build", || {
        let t = if spec.dtype == DType::U32 {
            Tensor::from_indices(indices(n, bound, spec.seed), spec.dims.clone())?
        } else {
            Tensor::from_vec(values(n, spec.fill, spec.seed), spec.dims.clone())?
                .to_dtype(spec.dtype)?
        };
        // f64 has no place on a CUDA device (see `shapes` for the check).
        let t = if spec.cuda && cuda_present() && spec.dtype != DType::F64 {
            CUDA_TENSORS.fetch_add(1, Ordering::Relaxed);
            CASE_ON_CUDA.store(true, Ordering::Relaxed);
            t.to_device(Device::Cuda(0))?
        } else {
            t
        };
        Ok(if spec.grad && spec.dtype.is_float() {
            t.requires_grad_()
        } else {
            t
        })
    })
}

/// A shape related to `base` as `relation` says: 0–2 the same; 3–5 a
/// broadcast partner (some leading dims dropped, some dims set to 1); 6 one
/// dim two larger; otherwise `other` unchanged.
pub(crate) fn related(base: &[usize], other: &[usize], relation: u8, seed: u64) -> Vec<usize> {
    match relation {
        0..=2 => base.to_vec(),
        3..=5 => {
            let drop = (seed % (base.len() as u64 + 1)) as usize;
            base[drop..]
                .iter()
                .enumerate()
                .map(|(i, &d)| if (seed >> (8 + i)) & 1 == 1 { 1 } else { d })
                .collect()
        }
        6 if !base.is_empty() => {
            let mut dims = base.to_vec();
            let i = (seed % base.len() as u64) as usize;
            dims[i] += 2;
            dims
        }
        _ => other.to_vec(),
    }
}

/// A second operand drawn for another: its own spec, the relation of its
/// shape to the other's (see `related`) with a seed, and whether it takes
/// the other's dtype and device.
pub(crate) type Partner = (Spec, u8, u64, bool, bool);

/// A `Partner`, usually of the same dtype and device.
pub(crate) fn partner() -> impl Strategy<Value = Partner> {
    (
        spec(0..=6),
        0u8..8,
        any::<u64>(),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.85),
    )
}

/// The spec of `a`'s partner.
pub(crate) fn paired(a: &Spec, (mut b, relation, seed, same_dtype, same_device): Partner) -> Spec {
    b.dims = related(&a.dims, &b.dims, relation, seed);
    if same_dtype {
        b.dtype = a.dtype;
    }
    if same_device {
        b.cuda = a.cuda;
    }
    b
}
