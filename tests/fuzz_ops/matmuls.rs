use kiln::DType;
use kiln::ops::gemm::GemmKernel;
use proptest::prelude::*;

use crate::harness::{CaseResult, Expect, check};
use crate::operands::{Spec, build, paired, partner, related, spec};
use crate::oracles::{broadcast, cast_operands_v, gemm_shape, matmul_shape};

// ----- matrix products -------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct MatmulCase {
    a: Spec,
    b: Spec,
    w: Spec,
    bias: Spec,
    ta: bool,
    tb: bool,
    relation: u8,
    bias_kind: u8,
    n: usize,
    seed: u64,
    kernel: usize,
    autocast: Option<DType>,
}

pub(crate) fn autocast_choice() -> impl Strategy<Value = Option<DType>> {
    prop_oneof![
        6 => Just(None),
        1 => Just(Some(DType::BF16)),
        1 => Just(Some(DType::F16)),
    ]
}

pub(crate) fn matmul_case() -> impl Strategy<Value = MatmulCase> {
    (
        (spec(0..=5), partner(), partner(), partner()),
        any::<bool>(),
        any::<bool>(),
        0u8..8,
        0u8..6,
        0usize..5,
        any::<u64>(),
        0usize..4,
        autocast_choice(),
    )
        .prop_map(
            |((a, b, w, bias), ta, tb, relation, bias_kind, n, seed, kernel, autocast)| {
                let b = paired(&a, b);
                let w = paired(&a, w);
                let bias = paired(&a, bias);
                MatmulCase {
                    a,
                    b,
                    w,
                    bias,
                    ta,
                    tb,
                    relation,
                    bias_kind,
                    n,
                    seed,
                    kernel,
                    autocast,
                }
            },
        )
}

/// The second operand of op(a) @ op(b): inner dims that match (or, for
/// relation 6, do not) and a batch related to a's.
fn matmul_rhs(a: &[usize], case: &MatmulCase) -> Vec<usize> {
    if case.relation == 7 || a.len() < 2 {
        return case.b.dims.clone();
    }
    let r = a.len();
    let k = if case.ta { a[r - 2] } else { a[r - 1] } + usize::from(case.relation == 6);
    let batch = related(&a[..r - 2], &[], case.relation % 6, case.seed);
    let mut dims = batch;
    if case.tb {
        dims.extend([case.n, k]);
    } else {
        dims.extend([k, case.n]);
    }
    dims
}

pub(crate) fn matmuls(case: MatmulCase) -> CaseResult {
    let a = build(&case.a)?;
    let b = build(&Spec {
        dims: matmul_rhs(&case.a.dims, &case),
        ..case.b.clone()
    })?;
    let _autocast = case.autocast.map(kiln::autocast);
    let v = cast_operands_v(&[&a, &b], case.autocast);
    let leaves = [&a, &b];
    let (ta, tb) = (case.ta, case.tb);
    check(
        "gemm",
        Expect::new(gemm_shape(a.dims(), b.dims(), ta, tb), v),
        &leaves,
        || a.gemm(&b, ta, tb),
    )?;
    let kernel = GemmKernel::ALL[case.kernel];
    check(
        "gemm_with",
        Expect::new(gemm_shape(a.dims(), b.dims(), ta, tb), v),
        &leaves,
        || a.gemm_with(&b, ta, tb, kernel),
    )?;
    check(
        "matmul",
        Expect::new(matmul_shape(a.dims(), b.dims()), v),
        &leaves,
        || a.matmul(&b),
    )?;
    check(
        "matmul_nt",
        Expect::new(gemm_shape(a.dims(), b.dims(), false, true), v),
        &leaves,
        || a.matmul_nt(&b),
    )?;

    // linear: weight [out, in] (in matching x's last dim unless relation
    // 6), and a bias [out], a broadcastable one, or anything.
    let x_in = a.dims().last().copied().unwrap_or(0);
    let w_dims = match case.relation {
        7 => case.w.dims.clone(),
        6 => vec![case.n, x_in + 1],
        _ => vec![case.n, x_in],
    };
    let w = build(&Spec {
        dims: w_dims,
        ..case.w.clone()
    })?;
    let bias = match case.bias_kind {
        0 => None,
        1..=3 => Some(build(&Spec {
            dims: vec![case.n],
            ..case.bias.clone()
        })?),
        4 => Some(build(&Spec {
            dims: vec![1],
            ..case.bias.clone()
        })?),
        _ => Some(build(&case.bias)?),
    };
    let mut operands = vec![&a, &w];
    operands.extend(bias.as_ref());
    // A vector x [in] gives [out] (F.linear's 1-D rule) before the bias.
    let product = match a.dims() {
        &[width] => gemm_shape(&[1, width], w.dims(), false, true).map(|mut s| {
            if s[0] == 1 {
                s.remove(0);
            }
            s
        }),
        dims => gemm_shape(dims, w.dims(), false, true),
    };
    let shape = product.and_then(|s| match &bias {
        Some(bias) => broadcast(&s, bias.dims()),
        None => Some(s),
    });
    let v = cast_operands_v(&operands, case.autocast);
    check("linear", Expect::new(shape, v), &operands, || {
        a.linear(&w, bias.as_ref())
    })?;
    Ok(())
}
