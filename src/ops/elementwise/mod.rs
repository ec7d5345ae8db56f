//! Elementwise arithmetic: broadcast binary ops (add, sub, mul, div) and
//! pointwise maps (neg, exp, log, sqrt, powf, clamp, scalar add/mul).
//!
//! Pointwise maps share one pattern, also used by the activations: a
//! [`Pointwise`] function knows its value and its derivative, so one forward
//! kernel and one backward kernel (dL/dx = dL/dy · f'(x)) serve them all.

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::autocast::{self, AutocastOp};
use crate::autograd::Backward;
use crate::error::Result;
use crate::ops::broadcast_shape;
use crate::profile;
use crate::storage::{CpuStorage, Float, Storage};
use crate::tensor::{Tensor, check_operands, same_device};
use crate::{float_or_half_slice2, float_slice, float_slice2};

/// The four broadcast arithmetic ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }

    #[inline]
    pub(crate) fn apply<T: Float>(self, x: T, y: T) -> T {
        match self {
            BinaryOp::Add => x + y,
            BinaryOp::Sub => x - y,
            BinaryOp::Mul => x * y,
            BinaryOp::Div => x / y,
        }
    }
}

/// A scalar function applied to every element, with its derivative.
pub(crate) trait Pointwise: Copy + Send + Sync + 'static {
    fn name(self) -> &'static str;
    fn value<T: Float>(self, x: T) -> T;
    /// f'(x).
    fn derivative<T: Float>(self, x: T) -> T;
    /// The same function as a CUDA kernel and op code.
    fn cuda(self) -> cuda::CudaPointwise;

    /// Its row in the autocast table, if it has one (exp and log do).
    fn autocast_op(self) -> Option<AutocastOp> {
        None
    }

    /// y = f(x) over a whole slice on the CPU; see `backward_slices` for why
    /// an enum with many variants overrides it.
    fn forward_slices<T: Float>(self, x: &[T]) -> Vec<T> {
        cpu::map(x, |e| self.value(e))
    }

    /// dL/dx = dL/dy · f'(x) over whole slices on the CPU. An enum with a
    /// large `derivative` keeps its per-element `match` inside the loop (the
    /// compiler does not unswitch it), which costs a branch per element;
    /// implementors with many variants override this with one loop per
    /// variant (see the activations).
    fn backward_slices<T: Float>(self, x: &[T], grad: &[T]) -> Vec<T> {
        cpu::zip_map(x, grad, |e, g| g * self.derivative(e))
    }
}

/// The pointwise maps of this family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Powf(f64),
    Clamp { min: f64, max: f64 },
    AddScalar(f64),
    MulScalar(f64),
}

impl Pointwise for UnaryOp {
    fn autocast_op(self) -> Option<AutocastOp> {
        match self {
            UnaryOp::Exp => Some(AutocastOp::Exp),
            UnaryOp::Log => Some(AutocastOp::Log),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Powf(_) => "powf",
            UnaryOp::Clamp { .. } => "clamp",
            UnaryOp::AddScalar(_) => "add_scalar",
            UnaryOp::MulScalar(_) => "mul_scalar",
        }
    }

    fn cuda(self) -> cuda::CudaPointwise {
        let (op, a, b) = match self {
            UnaryOp::Neg => (0, 0.0, 0.0),
            UnaryOp::Exp => (1, 0.0, 0.0),
            UnaryOp::Log => (2, 0.0, 0.0),
            UnaryOp::Sqrt => (3, 0.0, 0.0),
            UnaryOp::Powf(p) => (4, p, 0.0),
            UnaryOp::Clamp { min, max } => (5, min, max),
            UnaryOp::AddScalar(c) => (6, c, 0.0),
            UnaryOp::MulScalar(c) => (7, c, 0.0),
        };
        cuda::CudaPointwise {
            file: "elementwise.cu",
            forward: "unary_forward",
            backward: "unary_backward",
            op,
            a: a as f32,
            b: b as f32,
        }
    }

    #[inline]
    fn value<T: Float>(self, x: T) -> T {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Powf(p) => x.powf(T::from_f64(p)),
            // PyTorch's order: max first, so min > max gives max; NaN stays NaN.
            UnaryOp::Clamp { min, max } => {
                if x.is_nan() {
                    x
                } else {
                    x.max(T::from_f64(min)).min(T::from_f64(max))
                }
            }
            UnaryOp::AddScalar(c) => x + T::from_f64(c),
            UnaryOp::MulScalar(c) => x * T::from_f64(c),
        }
    }

    #[inline]
    fn derivative<T: Float>(self, x: T) -> T {
        match self {
            UnaryOp::Neg => -T::ONE,
            // d/dx eˣ = eˣ
            UnaryOp::Exp => x.exp(),
            // d/dx ln x = 1/x
            UnaryOp::Log => T::ONE / x,
            // d/dx √x = 1/(2√x)
            UnaryOp::Sqrt => T::from_f64(0.5) / x.sqrt(),
            // d/dx xᵖ = p·xᵖ⁻¹
            UnaryOp::Powf(p) => T::from_f64(p) * x.powf(T::from_f64(p - 1.0)),
            // 1 inside [min, max] (ends included, as PyTorch), 0 outside
            UnaryOp::Clamp { min, max } => {
                if x >= T::from_f64(min) && x <= T::from_f64(max) {
                    T::ONE
                } else {
                    T::ZERO
                }
            }
            UnaryOp::AddScalar(_) => T::ONE,
            UnaryOp::MulScalar(c) => T::from_f64(c),
        }
    }
}

/// Applies a pointwise function, recording its backward.
pub(crate) fn pointwise<F: Pointwise>(x: &Tensor, f: F) -> Result<Tensor> {
    if let Some(op) = f.autocast_op() {
        return autocast::in_float32(op, x, |x| pointwise_in_own_dtype(x, f));
    }
    pointwise_in_own_dtype(x, f)
}

/// `pointwise` in x's dtype (16-bit values computed in f32).
fn pointwise_in_own_dtype<F: Pointwise>(x: &Tensor, f: F) -> Result<Tensor> {
    let op = f.name();
    let _profile = profile::op(op, x.device());
    check_operands(op, &[x])?;
    let out = match &*x.storage() {
        Storage::Cpu(s) => Storage::Cpu(match s.map_half_chunks(|v| f.forward_slices(v)) {
            Some(out) => out,
            None => float_slice!(op, s, |v| CpuStorage::from(f.forward_slices(v))),
        }),
        Storage::Cuda(s) => Storage::Cuda(cuda::pointwise_forward(f.cuda(), s)?),
    };
    Ok(Tensor::from_op(out, x.shape().clone(), &[x], |_| {
        PointwiseBackward { f }
    }))
}

/// dL/dx = dL/dy · f'(x), one fused kernel.
pub(crate) fn pointwise_backward<F: Pointwise>(x: &Tensor, grad: &Tensor, f: F) -> Result<Tensor> {
    let op = f.name();
    check_operands(op, &[x, grad])?;
    let dx = match (&*x.storage(), &*grad.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(gs)) => {
            let chunked = xs.zip_half_chunks(gs, |xv, gv| f.backward_slices(xv, gv));
            Storage::Cpu(match chunked {
                Some(out) => out,
                None => float_slice2!(op, xs, gs, |xv, gv| {
                    CpuStorage::from(f.backward_slices(xv, gv))
                }),
            })
        }
        (Storage::Cuda(xs), Storage::Cuda(gs)) => {
            Storage::Cuda(cuda::pointwise_backward(f.cuda(), xs, gs)?)
        }
        _ => unreachable!("check_operands put both operands on one device"),
    };
    Ok(Tensor::from_result(dx, x.shape().clone()))
}

struct PointwiseBackward<F> {
    f: F,
}

impl<F: Pointwise> Backward for PointwiseBackward<F> {
    fn name(&self) -> &'static str {
        self.f.name()
    }
    // dL/dx = dL/dy · f'(x)
    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(pointwise_backward(&inputs[0], grad, self.f)?)])
    }
}

fn binary(lhs: &Tensor, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let name = op.name();
    // bf16 + f32 computes in f32, as PyTorch promotes (devices checked
    // first, so that a mismatch is reported under this op's name).
    if let Some(common) = autocast::promoted(lhs.dtype(), rhs.dtype()) {
        same_device(name, &[lhs, rhs])?;
        return binary(&lhs.to_dtype(common)?, &rhs.to_dtype(common)?, op);
    }
    let _profile = profile::op(name, lhs.device());
    check_operands(name, &[lhs, rhs])?;
    let out_shape = broadcast_shape(name, lhs.shape(), rhs.shape())?;
    let out = match (&*lhs.storage(), &*rhs.storage()) {
        // Same-shape 16-bit operands: a chunk at a time, no full f32 copies.
        (Storage::Cpu(a), Storage::Cpu(b)) if lhs.dims() == rhs.dims() && a.dtype().is_half() => {
            let same_shape =
                |x: &[f32], y: &[f32]| cpu::binary(op, x, &[x.len()], y, &[y.len()], &[x.len()]);
            Storage::Cpu(
                a.zip_half_chunks(b, same_shape)
                    .expect("check_operands gave both one dtype"),
            )
        }
        (Storage::Cpu(a), Storage::Cpu(b)) => {
            Storage::Cpu(float_or_half_slice2!(name, a, b, |av, bv| {
                CpuStorage::from(cpu::binary(
                    op,
                    av,
                    lhs.dims(),
                    bv,
                    rhs.dims(),
                    out_shape.dims(),
                ))
            }))
        }
        (Storage::Cuda(a), Storage::Cuda(b)) => Storage::Cuda(cuda::binary(
            op,
            a,
            lhs.shape(),
            b,
            rhs.shape(),
            &out_shape,
        )?),
        _ => unreachable!("check_operands put both operands on one device"),
    };
    Ok(Tensor::from_op(out, out_shape, &[lhs, rhs], |_| {
        BinaryBackward { op }
    }))
}

struct BinaryBackward {
    op: BinaryOp,
}

impl Backward for BinaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    // a ± b differentiates to ±1: only a product or quotient needs a and b.
    fn reads_input_values(&self) -> bool {
        matches!(self.op, BinaryOp::Mul | BinaryOp::Div)
    }

    fn backward(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        let (da, db) = match self.op {
            // d(a+b) = da + db
            BinaryOp::Add => (grad.clone(), grad.clone()),
            // d(a-b) = da - db
            BinaryOp::Sub => (grad.clone(), grad.neg()?),
            // d(a·b) = b·da + a·db
            BinaryOp::Mul => (grad.mul(b)?, grad.mul(a)?),
            // d(a/b) = da/b - a/b²·db
            BinaryOp::Div => {
                let da = grad.div(b)?;
                let db = da.mul(a)?.div(b)?.neg()?;
                (da, db)
            }
        };
        // Broadcast dims of an input receive the sum of their gradients.
        let da = a
            .requires_grad()
            .then(|| da.sum_to_shape(a.shape()))
            .transpose()?;
        let db = b
            .requires_grad()
            .then(|| db.sum_to_shape(b.shape()))
            .transpose()?;
        Ok(vec![da, db])
    }
}

impl Tensor {
    /// self + rhs, broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Add)
    }

    /// self - rhs, broadcasting.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Sub)
    }

    /// self · rhs elementwise, broadcasting.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Mul)
    }

    /// self / rhs elementwise, broadcasting.
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Div)
    }

    pub fn neg(&self) -> Result<Tensor> {
        pointwise(self, UnaryOp::Neg)
    }

    pub fn exp(&self) -> Result<Tensor> {
        pointwise(self, UnaryOp::Exp)
    }

    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        pointwise(self, UnaryOp::Log)
    }

    pub fn sqrt(&self) -> Result<Tensor> {
        pointwise(self, UnaryOp::Sqrt)
    }

    /// selfᵖ for a scalar exponent.
    pub fn powf(&self, exponent: f64) -> Result<Tensor> {
        pointwise(self, UnaryOp::Powf(exponent))
    }

    /// Limits every value to [min, max] as PyTorch's `clamp`: min(max(x,
    /// min), max), so min > max sets every value to max; NaN stays NaN.
    pub fn clamp(&self, min: f64, max: f64) -> Result<Tensor> {
        if min.is_nan() || max.is_nan() {
            return Err(crate::Error::invalid(
                "clamp",
                format!(
                    "bounds must not be NaN (PyTorch would make every value NaN), got min {min} and max {max}"
                ),
            ));
        }
        pointwise(self, UnaryOp::Clamp { min, max })
    }

    /// self + c.
    pub fn add_scalar(&self, c: f64) -> Result<Tensor> {
        pointwise(self, UnaryOp::AddScalar(c))
    }

    /// self · c.
    pub fn mul_scalar(&self, c: f64) -> Result<Tensor> {
        pointwise(self, UnaryOp::MulScalar(c))
    }
}
