use kiln::{BceWithLogitsOptions, CrossEntropyOptions, DType, Reduction, Tensor};
use proptest::prelude::*;

use crate::harness::{CaseResult, Expect, V, check, valid};
use crate::operands::{
    Fill, Partner, Spec, build, build_indices, dims, dtype, paired, partner, scalar, spec,
    spec_with,
};
use crate::oracles::{broadcast, device_v, float_v, operands_v};

#[derive(Clone, Debug)]
pub(crate) struct LossCase {
    x: Spec,
    t: Partner,
    ids: Spec,
    weight: Spec,
    bound_extra: u32,
    reduction: Reduction,
    flatten: bool,
    /// The options of cross_entropy_with, bce_with_logits_with and
    /// embedding_with.
    options: LossOptions,
}

#[derive(Clone, Debug)]
struct LossOptions {
    /// Class weights [C] (or another length when `wrong_len`).
    class_weight: Option<Spec>,
    wrong_len: bool,
    /// 0: none; 1: the first target's class; 2: a class beyond C; 3: u32::MAX.
    ignore: u8,
    smoothing: f64,
    /// bce's element weight and pos_weight, each related to the input's shape.
    bce_weight: Option<Partner>,
    pos_weight: Option<(Spec, u8)>,
    /// 0: none; 1: 0; 2: −1; 3: V − 1; 4: V; 5: −V; 6: −V − 1; 7: isize::MIN.
    padding: u8,
}

fn reduction_choice() -> impl Strategy<Value = Reduction> {
    prop_oneof![
        2 => Just(Reduction::Mean),
        2 => Just(Reduction::Sum),
        1 => Just(Reduction::None),
    ]
}

fn loss_options() -> impl Strategy<Value = LossOptions> {
    (
        prop::option::weighted(0.4, spec_with(Just(vec![]), dtype())),
        prop::bool::weighted(0.15),
        0u8..4,
        prop_oneof![4 => Just(0.0f64), 3 => 0.0..=1.0f64, 1 => Just(1.0), 1 => scalar()],
        prop::option::weighted(0.4, partner()),
        prop::option::weighted(0.3, (spec_with(Just(vec![]), dtype()), 0u8..6)),
        0u8..8,
    )
        .prop_map(
            |(class_weight, wrong_len, ignore, smoothing, bce_weight, pos_weight, padding)| {
                LossOptions {
                    class_weight,
                    wrong_len,
                    ignore,
                    smoothing,
                    bce_weight,
                    pos_weight,
                    padding,
                }
            },
        )
}

pub(crate) fn loss_case() -> impl Strategy<Value = LossCase> {
    (
        spec(0..=4),
        partner(),
        spec_with(
            dims(0..=3),
            prop_oneof![6 => Just(DType::U32), 1 => dtype()],
        ),
        spec_with(prop_oneof![4 => dims(2..=2), 1 => dims(1..=3)], dtype()),
        prop_oneof![4 => Just(0u32), 1 => 1u32..3],
        reduction_choice(),
        prop::bool::weighted(0.7),
        loss_options(),
    )
        .prop_map(
            |(x, t, ids, weight, bound_extra, reduction, flatten, options)| LossCase {
                x,
                t,
                ids,
                weight,
                bound_extra,
                reduction,
                flatten,
                options,
            },
        )
}

/// A loss's shape: rank 0 when reduced, `unreduced` for `Reduction::None`.
fn loss_shape(reduction: Reduction, unreduced: &[usize]) -> Option<Vec<usize>> {
    Some(if reduction == Reduction::None {
        unreduced.to_vec()
    } else {
        Vec::new()
    })
}

pub(crate) fn losses(case: LossCase) -> CaseResult {
    let reduction = case.reduction;
    // A mean over nothing is an error (PyTorch's NaN); a sum or None is not.
    let mean_ok = |count: usize| reduction != Reduction::Mean || count > 0;
    let x = build(&case.x)?;
    let mut target_spec = paired(&case.x, case.t.clone());
    if case.flatten {
        target_spec.fill = Fill::Unit;
    }
    let t = build(&target_spec)?;
    let operands = [&x, &t];
    let same = x.dims() == t.dims();
    let v = operands_v(&operands).and(V::from(same && mean_ok(x.numel())));
    // mse broadcasts a target of another shape against the input (PyTorch's rule).
    let joint = broadcast(x.dims(), t.dims());
    let mse_mean_ok = joint
        .as_ref()
        .is_some_and(|d| mean_ok(d.iter().product::<usize>()));
    let mse_v = operands_v(&operands).and(V::from(joint.is_some() && mse_mean_ok));
    check(
        "mse_loss",
        Expect::new(
            joint.as_deref().and_then(|j| loss_shape(reduction, j)),
            mse_v,
        ),
        &operands,
        || x.mse_loss(&t, reduction),
    )?;
    // Any real target, as PyTorch's (no [0, 1] check).
    check(
        "bce_with_logits",
        Expect::new(loss_shape(reduction, x.dims()), v),
        &operands,
        || x.bce_with_logits(&t, reduction),
    )?;
    let rows = x.dims().first().copied().unwrap_or(0);
    let kl_v = operands_v(&operands).and(V::from(same && x.rank() > 0 && mean_ok(rows)));
    check(
        "gaussian_kl",
        Expect::new(loss_shape(reduction, &[rows]), kl_v),
        &operands,
        || Tensor::gaussian_kl(&x, &t, reduction),
    )?;

    // bce_with_logits_with: an element weight and a pos_weight that must
    // broadcast to the input's shape (not beyond it), and take no gradient.
    let options = &case.options;
    let bce_weight = match &options.bce_weight {
        Some(p) => {
            let spec = paired(&case.x, p.clone());
            // Mostly without a gradient (one is refused).
            let grad = spec.grad && spec.seed.is_multiple_of(3);
            Some(build(&Spec { grad, ..spec })?)
        }
        None => None,
    };
    let pos_weight = match &options.pos_weight {
        Some((spec, kind)) => {
            let last = x.dims().last().copied().unwrap_or(1);
            let dims = match kind {
                0 | 1 => vec![last],
                2 => vec![1],
                3 => vec![last + 1],
                4 => x.dims().to_vec(),
                _ => spec.dims.clone(),
            };
            let same = *kind < 5;
            Some(build(&Spec {
                dims,
                dtype: if same { case.x.dtype } else { spec.dtype },
                cuda: if same { case.x.cuda } else { spec.cuda },
                grad: spec.grad && *kind == 5,
                ..spec.clone()
            })?)
        }
        None => None,
    };
    let mut bce_operands = vec![&x, &t];
    bce_operands.extend(bce_weight.iter().chain(&pos_weight));
    let constants_fit = bce_weight
        .iter()
        .chain(&pos_weight)
        .all(|w| broadcast(x.dims(), w.dims()).as_deref() == Some(x.dims()) && !w.requires_grad());
    let bce_v = operands_v(&bce_operands).and(V::from(same && mean_ok(x.numel()) && constants_fit));
    let bce_options = BceWithLogitsOptions {
        reduction,
        weight: bce_weight.clone(),
        pos_weight: pos_weight.clone(),
    };
    check(
        "bce_with_logits_with",
        Expect::new(loss_shape(reduction, x.dims()), bce_v),
        &operands,
        || x.bce_with_logits_with(&t, &bce_options),
    )?;

    // cross_entropy: logits [C], [N, C] or [N, C, d1, …] (x flattened to rank 2 when
    // asked), targets of their shape without the class dim.
    let logits = if case.flatten && x.rank() >= 1 {
        let classes = x.dims()[1..].iter().product::<usize>();
        valid("reshape", || x.reshape([rows, classes]))?
    } else {
        x.clone()
    };
    // Classes along dim 1, or dim 0 of unbatched logits [C].
    let classes = match logits.dims() {
        [c] => *c,
        dims => dims.get(1).copied().unwrap_or(0),
    };
    let targets = build_indices(
        &Spec {
            dims: if case.flatten {
                vec![rows]
            } else {
                case.ids.dims.clone()
            },
            ..case.ids.clone()
        },
        classes as u32 + case.bound_extra,
    )?;
    let target_values = if targets.dtype() == DType::U32 {
        targets.to_f64_vec()
    } else {
        Vec::new()
    };
    let in_range =
        targets.dtype() == DType::U32 && target_values.iter().all(|&i| (i as usize) < classes);
    // PyTorch's shapes: [C] with a rank-0 target, [N, C, d1, …] with [N, d1, …].
    let target_dims: Option<Vec<usize>> = match logits.dims() {
        [] => None,
        [_] => Some(Vec::new()),
        [n, _, rest @ ..] => Some(std::iter::once(*n).chain(rest.iter().copied()).collect()),
    };
    let shape_fits = target_dims.as_deref() == Some(targets.dims());
    let fits = shape_fits && in_range && mean_ok(targets.numel());
    let v = float_v(&logits)
        .and(device_v(&[&logits, &targets]))
        .and(V::from(fits));
    check(
        "cross_entropy",
        Expect::new(loss_shape(reduction, targets.dims()), v),
        &[&x],
        || logits.cross_entropy(&targets, reduction),
    )?;

    // cross_entropy_with: class weights [C] (no gradient), an ignore_index
    // that may lie beyond C, label smoothing in [0, 1].
    let class_weight = match &options.class_weight {
        Some(spec) => Some(build(&Spec {
            dims: vec![classes + usize::from(options.wrong_len)],
            // Mostly the logits' dtype and device, and mostly no gradient.
            dtype: if spec.seed % 4 == 0 {
                spec.dtype
            } else {
                logits.dtype()
            },
            cuda: if spec.seed % 5 == 0 {
                spec.cuda
            } else {
                case.x.cuda
            },
            fill: Fill::Unit,
            grad: spec.grad && spec.seed % 3 == 0,
            ..spec.clone()
        })?),
        None => None,
    };
    let ignore_index = match options.ignore {
        1 => Some(target_values.first().map_or(0, |&t| t as u32)),
        2 => Some(classes as u32 + 1),
        3 => Some(u32::MAX),
        _ => None,
    };
    let counted: Vec<f64> = target_values
        .iter()
        .copied()
        .filter(|&t| Some(t as u32) != ignore_index)
        .collect();
    let counted_in_range =
        targets.dtype() == DType::U32 && counted.iter().all(|&i| (i as usize) < classes);
    let weight_v = match &class_weight {
        Some(w) => {
            operands_v(&[&logits, w]).and(V::from(w.dims() == [classes] && !w.requires_grad()))
        }
        None => V::Valid,
    };
    let smoothing = options.smoothing;
    // Logits with no classes are refused whenever there is a target, also
    // when every target is ignored (PyTorch returns 0 or NaN there).
    let has_classes = V::from(classes > 0 || target_values.is_empty());
    let with_v = float_v(&logits)
        .and(device_v(&[&logits, &targets]))
        .and(weight_v)
        .and(V::from(
            shape_fits
                && counted_in_range
                && mean_ok(counted.len())
                && (0.0..=1.0).contains(&smoothing),
        ))
        .and(has_classes);
    // A fresh reshape: backward through cross_entropy released the last one.
    let logits = if case.flatten && x.rank() >= 1 {
        valid("reshape", || x.reshape([rows, classes]))?
    } else {
        x.clone()
    };
    let ce_options = CrossEntropyOptions {
        reduction,
        weight: class_weight.clone(),
        ignore_index,
        label_smoothing: smoothing,
    };
    let mut ce_leaves = vec![&x];
    ce_leaves.extend(&class_weight);
    check(
        "cross_entropy_with",
        Expect::new(loss_shape(reduction, targets.dims()), with_v),
        &ce_leaves,
        || logits.cross_entropy_with(&targets, &ce_options),
    )?;

    // embedding: rows of weight [V, E] picked by u32 ids of any shape.
    let weight = build(&case.weight)?;
    let vocab = weight.dims()[0];
    let ids = build_indices(&case.ids, vocab as u32 + case.bound_extra)?;
    let ids_ok =
        ids.dtype() == DType::U32 && ids.to_f64_vec().iter().all(|&i| (i as usize) < vocab);
    let shape = (weight.rank() == 2).then(|| {
        let mut out = ids.dims().to_vec();
        out.push(weight.dims()[1]);
        out
    });
    let v = float_v(&weight)
        .and(device_v(&[&weight, &ids]))
        .and(V::from(ids_ok));
    check(
        "embedding",
        Expect::new(shape.clone(), v),
        &[&weight],
        || Tensor::embedding(&ids, &weight),
    )?;

    // embedding_with: a padding_idx in [−V, V) (negative from the end).
    let signed_vocab = vocab as isize;
    let padding_idx = match options.padding {
        0 => None,
        1 => Some(0),
        2 => Some(-1),
        3 => Some(signed_vocab - 1),
        4 => Some(signed_vocab),
        5 => Some(-signed_vocab),
        6 => Some(-signed_vocab - 1),
        _ => Some(isize::MIN),
    };
    let padding_ok = padding_idx.is_none_or(|p| -signed_vocab <= p && p < signed_vocab);
    let out = check(
        "embedding_with",
        Expect::new(shape, v.and(V::from(padding_ok))),
        &[&weight],
        || Tensor::embedding_with(&ids, &weight, padding_idx),
    )?;
    // The padding row gets no gradient (PyTorch's rule), the others theirs.
    if let (Some(_), Some(p)) = (out, padding_idx)
        && weight.requires_grad()
        && ids.numel() > 0
    {
        let row = if p < 0 {
            (signed_vocab + p) as usize
        } else {
            p as usize
        };
        let loss = valid("embedding_with (padding row gradient)", || {
            Tensor::embedding_with(&ids, &weight, padding_idx)?.sum_all()
        })?;
        let grads = valid("backward", || loss.backward())?;
        if let Some(grad) = grads.get(&weight) {
            let width = weight.dims()[1];
            let g = grad.to_f64_vec();
            prop_assert!(
                g[row * width..(row + 1) * width].iter().all(|&v| v == 0.0),
                "embedding_with: padding row {} got a gradient",
                row
            );
        }
    }
    Ok(())
}
