use kiln::{DType, Device, GeluApproximation, Tensor};
use proptest::prelude::*;

use crate::harness::{CaseResult, Expect, V, check};
use crate::operands::{Spec, build, paired, partner, scalar, spec};
use crate::oracles::{broadcast, device_v, float_v};

// ----- elementwise, activations ----------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct ElementwiseCase {
    a: Spec,
    b: Spec,
    swap: bool,
    param: f64,
    param2: f64,
}

pub(crate) fn elementwise_case() -> impl Strategy<Value = ElementwiseCase> {
    (spec(0..=6), partner(), any::<bool>(), scalar(), scalar()).prop_map(
        |(a, p, swap, param, param2)| {
            let b = paired(&a, p);
            ElementwiseCase {
                a,
                b,
                swap,
                param,
                param2,
            }
        },
    )
}

/// Whether the dtypes of a broadcast binary op work together (16-bit
/// operands are promoted to the wider float, f32 with f64 is refused).
fn binary_dtypes_v(a: &Tensor, b: &Tensor) -> V {
    let (da, db) = (a.dtype(), b.dtype());
    if da == DType::U32 || db == DType::U32 {
        return V::Invalid;
    }
    if da == db {
        return float_v(a).and(float_v(b));
    }
    if da.is_half() || db.is_half() {
        return if a.device() == Device::Cpu {
            V::Valid
        } else {
            V::Maybe
        };
    }
    V::Invalid
}

type BinaryFn = fn(&Tensor, &Tensor) -> kiln::Result<Tensor>;
type UnaryFn = Box<dyn Fn(&Tensor) -> kiln::Result<Tensor>>;

pub(crate) fn elementwise(case: ElementwiseCase) -> CaseResult {
    let (a, b) = (build(&case.a)?, build(&case.b)?);
    let (a, b) = if case.swap { (b, a) } else { (a, b) };
    let shape = broadcast(a.dims(), b.dims());
    let v = device_v(&[&a, &b]).and(binary_dtypes_v(&a, &b));
    let leaves = [&a, &b];
    let binary: [(&'static str, BinaryFn); 4] = [
        ("add", Tensor::add),
        ("sub", Tensor::sub),
        ("mul", Tensor::mul),
        ("div", Tensor::div),
    ];
    for (label, op) in binary {
        check(label, Expect::new(shape.clone(), v), &leaves, || op(&a, &b))?;
    }

    let same = Some(a.dims().to_vec());
    let v = float_v(&a);
    let (p, q) = (case.param, case.param2);
    let unary: [(&'static str, UnaryFn, V); 16] = [
        ("neg", Box::new(Tensor::neg), V::Valid),
        ("exp", Box::new(Tensor::exp), V::Valid),
        ("log", Box::new(Tensor::log), V::Valid),
        ("sqrt", Box::new(Tensor::sqrt), V::Valid),
        ("powf", Box::new(move |x| x.powf(p)), V::Valid),
        (
            "clamp",
            Box::new(move |x| x.clamp(p, q)),
            V::from(!p.is_nan() && !q.is_nan()),
        ),
        ("add_scalar", Box::new(move |x| x.add_scalar(p)), V::Valid),
        ("mul_scalar", Box::new(move |x| x.mul_scalar(p)), V::Valid),
        ("relu", Box::new(Tensor::relu), V::Valid),
        (
            "leaky_relu",
            Box::new(move |x| x.leaky_relu(p)),
            V::from(p.is_finite()),
        ),
        ("tanh", Box::new(Tensor::tanh), V::Valid),
        ("sigmoid", Box::new(Tensor::sigmoid), V::Valid),
        (
            "gelu",
            Box::new(|x| x.gelu(GeluApproximation::None)),
            V::Valid,
        ),
        (
            "gelu",
            Box::new(|x| x.gelu(GeluApproximation::Tanh)),
            V::Valid,
        ),
        ("softmax", Box::new(|t: &Tensor| t.softmax(-1)), V::Valid),
        (
            "log_softmax",
            Box::new(|t: &Tensor| t.log_softmax(-1)),
            V::Valid,
        ),
    ];
    for (label, op, op_v) in unary {
        let shape = if op_v == V::Invalid {
            None
        } else {
            same.clone()
        };
        check(label, Expect::new(shape, v.and(op_v)), &[&a], || op(&a))?;
    }

    // Dropout: p in [0, 1].
    for p in [0.0, 0.5, 1.0, case.param.abs().min(2.0), case.param] {
        let p_v = V::from((0.0..=1.0).contains(&p));
        check(
            "dropout",
            Expect::new(same.clone(), v.and(p_v)),
            &[&a],
            || a.dropout(p, case.a.seed),
        )?;
    }
    Ok(())
}
