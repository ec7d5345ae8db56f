use kiln::{DType, Tensor};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::harness::{CaseResult, Expect, V, check};
use crate::operands::{Fill, Spec, build, float_dtype, scalar, spec, spec_with};
use crate::oracles::{device_v, operands_v};

// ----- normalisation -----------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct NormCase {
    x: Spec,
    params: [Option<Spec>; 4],
    wrong_len: [bool; 4],
    param_dtype_same: bool,
    training: bool,
    momentum: f64,
    eps: f64,
    /// layer_norm_over's normalized_shape: the last `trailing` dims of x,
    /// changed as `ns_kind` says (see `normalized_shape`).
    trailing: usize,
    ns_kind: u8,
}

pub(crate) fn norm_case() -> impl Strategy<Value = NormCase> {
    let param = || prop::option::weighted(0.7, spec_with(Just(vec![]), float_dtype()));
    (
        spec(0..=5),
        [param(), param(), param(), param()],
        [
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        ],
        prop::bool::weighted(0.8),
        any::<bool>(),
        prop_oneof![6 => 0.0..1.0f64, 1 => scalar()],
        prop_oneof![6 => Just(1e-5f64), 2 => scalar()],
        (0usize..=3, 0u8..8),
    )
        .prop_map(
            |(
                mut x,
                params,
                wrong_len,
                param_dtype_same,
                training,
                momentum,
                eps,
                (trailing, ns_kind),
            )| {
                // Mostly [N, C, H, W], as batch norm takes.
                if x.seed % 4 != 0 {
                    x.dims.resize(4, 2);
                }
                NormCase {
                    x,
                    params,
                    wrong_len,
                    param_dtype_same,
                    training,
                    momentum,
                    eps,
                    trailing,
                    ns_kind,
                }
            },
        )
}

/// The trailing `count` dims of `dims` (all of them when fewer), changed
/// as `kind` says: 0 one dim more than x has; 1 the last one larger; 2
/// none at all; otherwise as they are.
pub(crate) fn normalized_shape(dims: &[usize], count: usize, kind: u8) -> Vec<usize> {
    let mut shape = dims[dims.len().saturating_sub(count)..].to_vec();
    match kind {
        0 => shape.insert(0, dims.len().min(2) + 1),
        1 => {
            if let Some(last) = shape.last_mut() {
                *last += 1;
            }
        }
        2 => shape.clear(),
        _ => {}
    }
    shape
}

pub(crate) fn normalisations(case: NormCase) -> CaseResult {
    let x = build(&case.x)?;
    let dims = x.dims().to_vec();
    let channels = dims.get(1).copied().unwrap_or(1);
    let last = dims.last().copied().unwrap_or(1);
    // Parameters are f32 beside a 16-bit x, else in x's dtype (unless drawn otherwise).
    let param_dtype = |spec: &Spec| {
        if !case.param_dtype_same {
            spec.dtype
        } else if x.dtype().is_half() || x.dtype() == DType::U32 {
            DType::F32
        } else {
            x.dtype()
        }
    };
    let make = |i: usize, len: usize| -> Result<Option<Tensor>, TestCaseError> {
        case.params[i]
            .as_ref()
            .map(|spec| {
                build(&Spec {
                    dims: vec![len + usize::from(case.wrong_len[i])],
                    dtype: param_dtype(spec),
                    cuda: if case.param_dtype_same {
                        case.x.cuda
                    } else {
                        spec.cuda
                    },
                    fill: Fill::Unit,
                    // Running statistics are buffers, not parameters.
                    grad: spec.grad && i >= 2,
                    ..spec.clone()
                })
            })
            .transpose()
    };
    // Running statistics mostly come as a pair.
    let mean = make(0, channels)?;
    let var = match (&mean, case.x.seed % 8) {
        (Some(_), 1..) if case.params[1].is_none() => make(0, channels)?,
        _ => make(1, channels)?,
    };
    let [weight, bias] = [make(2, channels)?, make(3, channels)?];

    // batch_norm2d
    let mut operands = vec![&x];
    operands.extend([&mean, &var, &weight, &bias].into_iter().flatten());
    let params_fit = [&mean, &var, &weight, &bias]
        .iter()
        .all(|p| p.as_ref().is_none_or(|p| p.dims() == [channels]));
    let per_channel = dims.first().copied().unwrap_or(0) * dims.iter().skip(2).product::<usize>();
    let running = mean.is_some() == var.is_some();
    let mode_ok = if case.training {
        per_channel > 1
    } else {
        mean.is_some() && var.is_some()
    };
    let args_v = V::from(
        dims.len() == 4
            && params_fit
            && running
            && mode_ok
            && case.eps.is_finite()
            && case.eps >= 0.0
            && case.momentum.is_finite(),
    );
    let dtype_v = if x.dtype() == DType::U32 {
        V::Invalid
    } else if !case.param_dtype_same || x.dtype().is_half() {
        // 16-bit x with f32 statistics: supported on the CPU, some kernels on CUDA.
        operands_v(&operands[1..]).and(if case.param_dtype_same {
            V::Valid
        } else {
            V::Maybe
        })
    } else {
        operands_v(&operands)
    };
    let v = args_v.and(dtype_v).and(device_v(&operands));
    check(
        "batch_norm2d",
        Expect::new(Some(dims.clone()), v),
        &operands,
        || {
            x.batch_norm2d(
                mean.as_ref(),
                var.as_ref(),
                weight.as_ref(),
                bias.as_ref(),
                case.training,
                case.momentum,
                case.eps,
            )
        },
    )?;

    // layer_norm over the last dim, with weight and bias of that length.
    let [weight, bias] = [make(2, last)?, make(3, last)?];
    let mut operands = vec![&x];
    operands.extend([&weight, &bias].into_iter().flatten());
    let fits = !dims.is_empty()
        && last > 0
        && [&weight, &bias]
            .iter()
            .all(|p| p.as_ref().is_none_or(|p| p.dims() == [last]));
    let v = layer_norm_v(&x, &operands, fits, case.eps);
    check(
        "layer_norm",
        Expect::new(Some(dims.clone()), v),
        &operands,
        || x.layer_norm(weight.as_ref(), bias.as_ref(), case.eps),
    )?;

    // layer_norm_over the trailing dims, with weight and bias of their shape.
    let shape = normalized_shape(&dims, case.trailing, case.ns_kind);
    let make_shaped = |i: usize| -> Result<Option<Tensor>, TestCaseError> {
        case.params[i]
            .as_ref()
            .map(|spec| {
                let mut param_dims = shape.clone();
                if case.wrong_len[i] {
                    param_dims.insert(0, 1);
                }
                build(&Spec {
                    dims: param_dims,
                    dtype: param_dtype(spec),
                    cuda: if case.param_dtype_same {
                        case.x.cuda
                    } else {
                        spec.cuda
                    },
                    fill: Fill::Unit,
                    ..spec.clone()
                })
            })
            .transpose()
    };
    let [weight, bias] = [make_shaped(2)?, make_shaped(3)?];
    let mut operands = vec![&x];
    operands.extend([&weight, &bias].into_iter().flatten());
    // A normalized_shape holding a 0 is refused (kiln's documented choice).
    let fits = !shape.is_empty()
        && dims.ends_with(&shape)
        && shape.iter().product::<usize>() > 0
        && [&weight, &bias]
            .iter()
            .all(|p| p.as_ref().is_none_or(|p| p.dims() == &shape[..]));
    let v = layer_norm_v(&x, &operands, fits, case.eps);
    check(
        "layer_norm_over",
        Expect::new(Some(dims.clone()), v),
        &operands,
        || x.layer_norm_over(&shape, weight.as_ref(), bias.as_ref(), case.eps),
    )?;
    Ok(())
}

/// What layer_norm and layer_norm_over accept: shapes that `fit`, a finite
/// eps ≥ 0, float operands of one dtype (a 16-bit x widens its parameters,
/// so any mix may do) on one device.
fn layer_norm_v(x: &Tensor, operands: &[&Tensor], fits: bool, eps: f64) -> V {
    V::from(fits && eps.is_finite() && eps >= 0.0)
        .and(if x.dtype().is_half() {
            V::Maybe
        } else {
            operands_v(operands)
        })
        .and(device_v(operands))
        .and(V::from(x.dtype() != DType::U32))
}
