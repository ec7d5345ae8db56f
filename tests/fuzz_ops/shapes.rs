use kiln::{DType, Device, Tensor};
use proptest::prelude::*;

use crate::harness::{CaseResult, Expect, V, check, cuda_present, probe, valid};
use crate::operands::{
    Partner, Spec, build, build_indices, dims, dtype, index_arg, paired, partner, spec,
};
use crate::oracles::{broadcast, device_v, numel_fits};

// ----- shape ops, conversions ---------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct ShapeCase {
    x: Spec,
    others: Vec<Partner>,
    args: [usize; 4],
    perm: Vec<usize>,
    perm_kind: u8,
    new_dims: Vec<usize>,
    reshape_kind: u8,
    dtype: DType,
}

pub(crate) fn shape_case() -> impl Strategy<Value = ShapeCase> {
    (
        spec(0..=6),
        prop::collection::vec(partner(), 0..3),
        [index_arg(), index_arg(), index_arg(), index_arg()],
        prop::collection::vec(0usize..7, 0..7),
        0u8..4,
        dims(0..=4),
        0u8..8,
        dtype(),
    )
        .prop_map(
            |(x, others, args, perm, perm_kind, new_dims, reshape_kind, dtype)| ShapeCase {
                x,
                others,
                args,
                perm,
                perm_kind,
                new_dims,
                reshape_kind,
                dtype,
            },
        )
}

pub(crate) fn shapes(case: ShapeCase) -> CaseResult {
    let x = build(&case.x)?;
    let dims = x.dims().to_vec();
    let rank = dims.len();
    let numel = x.numel();
    let [a, b, c, d] = case.args;

    // reshape: x's dims reordered or merged, or anything, or an element
    // count that overflows.
    let new_dims = match case.reshape_kind {
        0 => vec![numel],
        1 => dims.iter().rev().copied().collect(),
        2 => {
            let mut merged = vec![1usize];
            merged.extend(&dims);
            merged
        }
        3 => vec![usize::MAX, 2],
        4 => vec![1 << 32, 1 << 32, numel.min(1)],
        5 => vec![0, usize::MAX],
        _ => case.new_dims.clone(),
    };
    let reshape_ok = numel_fits(&new_dims) && new_dims.iter().product::<usize>() == numel;
    check(
        "reshape",
        Expect::new(reshape_ok.then(|| new_dims.clone()), V::Valid),
        &[&x],
        || x.reshape(new_dims.clone()),
    )?;

    let flatten_shape = (a <= b && b < rank).then(|| {
        let mut out = dims[..a].to_vec();
        out.push(dims[a..=b].iter().product());
        out.extend(&dims[b + 1..]);
        out
    });
    check(
        "flatten",
        Expect::new(flatten_shape, V::Valid),
        &[&x],
        || x.flatten(a, b),
    )?;
    let unsqueezed = (a <= rank).then(|| {
        let mut out = dims.clone();
        out.insert(a, 1);
        out
    });
    check(
        "unsqueeze",
        Expect::new(unsqueezed, V::Valid),
        &[&x],
        || x.unsqueeze(a),
    )?;
    // A dim of another size than 1 is left in place, as torch.squeeze(dim).
    let squeezed = (a < rank).then(|| {
        let mut out = dims.clone();
        if dims[a] == 1 {
            out.remove(a);
        }
        out
    });
    check("squeeze", Expect::new(squeezed, V::Valid), &[&x], || {
        x.squeeze(a)
    })?;

    // permute: a true permutation, a reversal, or whatever was drawn.
    let perm: Vec<usize> = match case.perm_kind {
        0 => (0..rank).rev().collect(),
        1 => {
            let mut p: Vec<usize> = (0..rank).collect();
            p.rotate_left(if rank > 0 { a % rank } else { 0 });
            p
        }
        _ => case.perm.clone(),
    };
    let mut sorted = perm.clone();
    sorted.sort_unstable();
    let is_perm = sorted == (0..rank).collect::<Vec<_>>();
    let permuted = is_perm.then(|| perm.iter().map(|&p| dims[p]).collect::<Vec<_>>());
    let out = check("permute", Expect::new(permuted, V::Valid), &[&x], || {
        x.permute(&perm)
    })?;
    matches_cpu("permute", &x, out, |x| x.permute(&perm))?;
    let transposed = (a < rank && b < rank).then(|| {
        let mut out = dims.clone();
        out.swap(a, b);
        out
    });
    let out = check(
        "transpose",
        Expect::new(transposed, V::Valid),
        &[&x],
        || x.transpose(a, b),
    )?;
    matches_cpu("transpose", &x, out, |x| x.transpose(a, b))?;

    // narrow(a, c, d), with c and d sometimes near usize::MAX.
    let narrowed = (a < rank && c.checked_add(d).is_some_and(|end| end <= dims[a])).then(|| {
        let mut out = dims.clone();
        out[a] = d;
        out
    });
    check("narrow", Expect::new(narrowed, V::Valid), &[&x], || {
        x.narrow(a, c, d)
    })?;

    // cat and stack with related operands.
    let mut parts = vec![x.clone()];
    for other in &case.others {
        parts.push(build(&paired(&case.x, other.clone()))?);
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    let same_dtype = parts.iter().all(|t| t.dtype() == x.dtype());
    let cat_shape = (a < rank
        && parts
            .iter()
            .all(|t| t.rank() == rank && (0..rank).all(|i| i == a || t.dims()[i] == dims[i])))
    .then(|| {
        let mut out = dims.clone();
        out[a] = parts.iter().map(|t| t.dims()[a]).sum();
        out
    });
    let parts_v = device_v(&refs).and(V::from(same_dtype));
    check("cat", Expect::new(cat_shape, parts_v), &refs, || {
        Tensor::cat(&refs, a)
    })?;
    check("cat", Expect::new(None, V::Invalid), &[], || {
        Tensor::cat(&[], 0)
    })?;
    let stack_shape = (a <= rank && parts.iter().all(|t| t.dims() == &dims[..])).then(|| {
        let mut out = dims.clone();
        out.insert(a, parts.len());
        out
    });
    check("stack", Expect::new(stack_shape, parts_v), &refs, || {
        Tensor::stack(&refs, a)
    })?;

    // broadcast_to: x's shape under extra leading dims and with its 1s
    // expanded, or another operand's shape.
    let target = match &case.others.first() {
        Some((other, relation, seed, _, _)) if *relation < 6 => {
            let mut t: Vec<usize> = vec![2; (*seed % 3) as usize];
            t.extend(
                dims.iter()
                    .map(|&s| if s == 1 { 1 + (*seed as usize % 3) } else { s }),
            );
            if *relation == 5 {
                t = other.dims.clone();
            }
            t
        }
        _ => case.new_dims.clone(),
    };
    let broadcastable = broadcast(&dims, &target).is_some_and(|joint| joint == target);
    // The CUDA kernel takes up to rank 6 (and says so).
    let rank_v = if x.device() == Device::Cpu || target.len() <= 6 {
        V::Valid
    } else {
        V::Maybe
    };
    let out = check(
        "broadcast_to",
        Expect::new(broadcastable.then(|| target.clone()), rank_v),
        &[&x],
        || x.broadcast_to(target.clone()),
    )?;
    matches_cpu("broadcast_to", &x, out, |x| x.broadcast_to(target.clone()))?;

    // index_select along a with a u32 vector (or something else).
    let ids_spec = Spec {
        dims: if d % 4 == 3 { vec![2, 2] } else { vec![d % 4] },
        dtype: if d % 7 == 6 { DType::F32 } else { DType::U32 },
        cuda: case.x.cuda ^ (c % 3 == 2),
        ..case.x.clone()
    };
    let bound = dims.get(a).map_or(3, |&s| s as u32 + (c % 2) as u32);
    let ids = build_indices(&ids_spec, bound)?;
    let ids_in_range = ids.dtype() == DType::U32
        && ids
            .to_f64_vec()
            .iter()
            .all(|&i| a < rank && (i as usize) < dims[a]);
    let selected = (a < rank && ids.rank() == 1).then(|| {
        let mut out = dims.clone();
        out[a] = ids.numel();
        out
    });
    let select_v = device_v(&[&x, &ids]).and(V::from(ids_in_range)).and(
        if x.device() == Device::Cpu || x.dtype() == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        },
    );
    check(
        "index_select",
        Expect::new(selected, select_v),
        &[&x],
        || x.index_select(a, &ids),
    )?;

    // gather along a with an index no larger than x outside a.
    let index_dims: Vec<usize> = dims
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if i == a {
                d % 4
            } else {
                s.saturating_sub(c % 2)
            }
        })
        .collect();
    let index_spec = Spec {
        dims: if b % 5 == 4 {
            vec![1; rank + 1]
        } else {
            index_dims
        },
        dtype: if d % 7 == 6 { DType::F32 } else { DType::U32 },
        ..case.x.clone()
    };
    let index = build_indices(&index_spec, bound)?;
    let index_in_range = index.dtype() == DType::U32
        && index
            .to_f64_vec()
            .iter()
            .all(|&i| a < rank && (i as usize) < dims[a]);
    let fits =
        a < rank && index.rank() == rank && (0..rank).all(|i| i == a || index.dims()[i] <= dims[i]);
    let gather_v = device_v(&[&x, &index]).and(V::from(index_in_range)).and(
        if x.device() == Device::Cpu || x.dtype() == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        },
    );
    check(
        "gather",
        Expect::new(fits.then(|| index.dims().to_vec()), gather_v),
        &[&x],
        || x.gather(a, &index),
    )?;

    // Conversions and accessors.
    let to = case.dtype;
    // Floats become u32 only when every value truncates into 0..2^32.
    let fits_u32 = !x.dtype().is_float()
        || x.to_f64_vec()
            .iter()
            .all(|&v| v > -1.0 && v < 2f64.powi(32));
    let to_v =
        V::from((to != DType::F64 || x.device() == Device::Cpu) && (to != DType::U32 || fits_u32));
    check(
        "to_dtype",
        Expect::new(Some(dims.clone()), to_v),
        &[&x],
        || x.to_dtype(to),
    )?;
    for (device, device_ok) in [
        (Device::Cpu, true),
        (Device::Cuda(0), cuda_present() && x.dtype() != DType::F64),
        (Device::Cuda(7), false),
    ] {
        check(
            "to_device",
            Expect::new(Some(dims.clone()), V::from(device_ok)),
            &[&x],
            || x.to_device(device),
        )?;
    }
    let ordinal = a.min(9);
    probe(
        "Device::cuda",
        V::from(ordinal < kiln::cuda::device_count()),
        || Device::cuda(ordinal),
    )?;
    let item = probe("item", V::from(numel == 1), || x.item())?;
    if let Some(value) = item {
        let expected = x.to_f64_vec()[0];
        prop_assert!(value.to_bits() == expected.to_bits() || value.is_nan() && expected.is_nan());
    }
    probe("to_vec", V::from(x.dtype() == DType::F32), || {
        x.to_vec::<f32>()
    })?;
    probe("to_vec", V::from(x.dtype() == DType::F64), || {
        x.to_vec::<f64>()
    })?;
    probe("to_indices", V::from(x.dtype() == DType::U32), || {
        x.to_indices()
    })?;
    probe("dim", V::from(a < rank), || x.dim(a))?;
    check(
        "zeros_like",
        Expect::new(Some(dims.clone()), V::Valid),
        &[],
        || x.zeros_like(),
    )?;
    let other = &parts[parts.len() - 1];
    let assign_v = V::from(
        other.dims() == &dims[..] && other.dtype() == x.dtype() && other.device() == x.device(),
    );
    probe("assign", assign_v, || x.detach().assign(other))?;
    probe("debug", V::Valid, || Ok(format!("{x:?}")))?;
    Ok(())
}

/// A copy made on CUDA holds exactly the values the CPU makes (NaN
/// included): shape ops move values, they compute nothing.
fn matches_cpu(
    label: &'static str,
    x: &Tensor,
    out: Option<Tensor>,
    on_cpu: impl FnOnce(&Tensor) -> kiln::Result<Tensor>,
) -> CaseResult {
    let Some(out) = out.filter(|_| x.device() != Device::Cpu) else {
        return Ok(());
    };
    let expected = valid(label, || on_cpu(&x.to_device(Device::Cpu)?))?;
    let bits = |t: &Tensor| -> Vec<u64> { t.to_f64_vec().iter().map(|v| v.to_bits()).collect() };
    prop_assert_eq!(
        bits(&out),
        bits(&expected),
        "{} on CUDA differs from the CPU",
        label
    );
    Ok(())
}
