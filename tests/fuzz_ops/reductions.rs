use kiln::DType;
use proptest::prelude::*;

use crate::harness::{CaseResult, Expect, V, check, check_backward, probe};
use crate::operands::{Spec, build, index_arg, related, spec};
use crate::oracles::{float_v, reduced};

// ----- reductions ------------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct ReduceCase {
    x: Spec,
    reduce: Vec<usize>,
    keepdim: bool,
    dim: usize,
    target: Spec,
    relation: u8,
    seed: u64,
}

pub(crate) fn reduce_case() -> impl Strategy<Value = ReduceCase> {
    (
        spec(0..=6),
        prop::collection::vec(0usize..8, 0..4),
        any::<bool>(),
        index_arg(),
        spec(0..=6),
        0u8..8,
        any::<u64>(),
    )
        .prop_map(
            |(x, reduce, keepdim, dim, target, relation, seed)| ReduceCase {
                x,
                reduce,
                keepdim,
                dim,
                target,
                relation,
                seed,
            },
        )
}

pub(crate) fn reductions(case: ReduceCase) -> CaseResult {
    let x = build(&case.x)?;
    let dims = x.dims().to_vec();
    let rank = dims.len();
    let v = float_v(&x);
    // A 0-d tensor takes dim 0 as one of size 1, as PyTorch's.
    let in_range = case.reduce.iter().all(|&d| d < rank.max(1));
    let mut unique = case.reduce.clone();
    unique.sort_unstable();
    unique.dedup();
    // PyTorch's meaning: no dims reduces them all; a repeated dim is an error.
    let repeated = unique.len() != case.reduce.len();
    if case.reduce.is_empty() || rank == 0 {
        unique = (0..rank).collect();
    }
    let shape = (in_range && !repeated).then(|| reduced(&dims, &unique, case.keepdim));
    let keepdim = case.keepdim;
    check("sum", Expect::new(shape.clone(), v), &[&x], || {
        x.sum(&case.reduce, keepdim)
    })?;
    let count: usize = unique.iter().filter_map(|&d| dims.get(d)).product();
    check(
        "mean",
        Expect::new(shape, v.and(V::from(count > 0))),
        &[&x],
        || x.mean(&case.reduce, keepdim),
    )?;
    check("sum_all", Expect::new(Some(vec![]), v), &[&x], || {
        x.sum_all()
    })?;
    check(
        "mean_all",
        Expect::new(Some(vec![]), v.and(V::from(x.numel() > 0))),
        &[&x],
        || x.mean_all(),
    )?;

    let dim = case.dim;
    let max_v = v.and(V::from(dim < rank.max(1) && (rank == 0 || dims[dim] > 0)));
    let max_shape = if rank == 0 {
        (dim == 0).then(Vec::new)
    } else {
        (dim < rank).then(|| reduced(&dims, &[dim], keepdim))
    };
    check("max", Expect::new(max_shape.clone(), max_v), &[&x], || {
        x.max(dim, keepdim)
    })?;
    let both = probe(
        "max_with_indices",
        Expect::new(max_shape.clone(), max_v).v,
        || x.max_with_indices(dim, keepdim),
    )?;
    if let (Some((values, argmax)), Some(shape)) = (both, max_shape) {
        prop_assert_eq!(values.dims(), &shape[..]);
        prop_assert_eq!(argmax.dims(), &shape[..]);
        prop_assert_eq!(argmax.dtype(), DType::U32);
        check_backward("max_with_indices", &values, &[&x])?;
    }

    // sum_to_shape: the inverse of broadcasting x's shape from `target`.
    let target = related(&dims, &case.target.dims, case.relation, case.seed);
    let pad = rank.checked_sub(target.len());
    let fits = pad.is_some_and(|pad| {
        target
            .iter()
            .enumerate()
            .all(|(i, &t)| t == dims[pad + i] || t == 1)
    });
    let target_v = if target == dims { V::Valid } else { v };
    check(
        "sum_to_shape",
        Expect::new(fits.then(|| target.clone()), target_v),
        &[&x],
        || x.sum_to_shape(&kiln::Shape::new(target.clone())),
    )?;
    Ok(())
}
