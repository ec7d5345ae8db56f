//! Automatic mixed precision: inside an [`autocast`] scope the ops that gain
//! from 16-bit inputs (the matrix products) take them, and the ops that need
//! f32's range or precision (exponentials, normalisations, reductions,
//! losses) take f32, whatever their inputs were — PyTorch's CUDA autocast
//! policy, written down once in [`AutocastOp::policy`].
//!
//! ```
//! use kiln::{DType, Device, Tensor};
//!
//! let x = Tensor::randn([4, 8], DType::F32, Device::Cpu, &mut kiln::Rng::seed(0))?;
//! let w = Tensor::randn([3, 8], DType::F32, Device::Cpu, &mut kiln::Rng::seed(1))?;
//! let _scope = kiln::autocast(DType::BF16);
//! let y = x.linear(&w, None)?; // bf16 inputs, f32 accumulation, bf16 out
//! assert_eq!(y.dtype(), DType::BF16);
//! let p = y.softmax(-1)?; // f32 policy: computed and returned in f32
//! assert_eq!(p.dtype(), DType::F32);
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! Outside a scope the table still decides one thing: an op on the f32 list
//! given 16-bit tensors computes in f32 (kiln has no 16-bit kernel for it)
//! and rounds its output back to the input's dtype, as PyTorch returns it.
//! Ops not in the table (elementwise arithmetic, activations, dropout, shape
//! ops) run in their inputs' dtype, reading and writing 16-bit directly and
//! computing each value in f32.
//!
//! The backward pass runs with autocast off: each rule sees the dtypes its
//! forward chose, and `to_dtype`'s rule brings every gradient back to its
//! tensor's dtype, so an f32 parameter's gradient is f32.

use std::cell::Cell;

use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::optim::{ForwardCopies, GradScaler};
use crate::tensor::{DType, Tensor};

thread_local! {
    /// The 16-bit dtype of the innermost live scope on this thread, if any.
    static AUTOCAST_DTYPE: Cell<Option<DType>> = const { Cell::new(None) };
}

/// While alive, ops on this thread follow the autocast table with `dtype`
/// as the lower precision. Restores the previous state on drop.
#[must_use = "autocast ends as soon as the guard is dropped"]
pub struct AutocastGuard {
    previous: Option<DType>,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        AUTOCAST_DTYPE.with(|d| d.set(self.previous));
    }
}

/// Starts an autocast scope on this thread with `dtype` (`DType::BF16` or
/// `DType::F16`) as the lower precision.
///
/// # Panics
/// If `dtype` is not a 16-bit float (use [`try_autocast`] to get an error).
pub fn autocast(dtype: DType) -> AutocastGuard {
    try_autocast(dtype).expect("autocast needs DType::BF16 or DType::F16")
}

/// [`autocast`], with an error instead of a panic for a dtype that is not
/// a 16-bit float.
pub fn try_autocast(dtype: DType) -> Result<AutocastGuard> {
    if !dtype.is_half() {
        return Err(Error::invalid(
            "autocast",
            format!("the lower precision must be bf16 or f16, not {dtype}"),
        ));
    }
    Ok(set(Some(dtype)))
}

/// Autocast off until the guard drops (the backward pass uses this).
pub(crate) fn suspend() -> AutocastGuard {
    set(None)
}

fn set(dtype: Option<DType>) -> AutocastGuard {
    AutocastGuard {
        previous: AUTOCAST_DTYPE.with(|d| d.replace(dtype)),
    }
}

/// The lower precision of the live autocast scope on this thread, if any.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST_DTYPE.with(|d| d.get())
}

/// What autocast does to an op's floating-point inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CastPolicy {
    /// f32 inputs are rounded to the scope's 16-bit dtype; the op reads
    /// 16-bit and accumulates in f32 (f64 inputs are left alone, as PyTorch).
    LowerPrecision,
    /// 16-bit inputs are widened to f32 and the op returns f32.
    Float32,
}

/// The ops autocast knows about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutocastOp {
    Matmul,
    Linear,
    Conv2d,
    ConvTranspose2d,
    Attention,
    Softmax,
    LogSoftmax,
    LayerNorm,
    Sum,
    Mean,
    Max,
    Exp,
    Log,
    Embedding,
    Loss,
}

impl AutocastOp {
    /// The autocast table.
    pub const fn policy(self) -> CastPolicy {
        use AutocastOp::*;
        match self {
            // Matrix products: where tensor cores and half the bytes pay.
            // Attention is PyTorch's scaled_dot_product_attention: 16-bit
            // in, its softmax accumulated in f32 inside the op.
            Matmul | Linear | Conv2d | ConvTranspose2d | Attention => CastPolicy::LowerPrecision,
            // Range or precision: exp overflows bf16's precision and f16's
            // range, normalisations and sums lose small terms, losses are
            // what the optimizer differentiates. (Batch norm is not here:
            // as in PyTorch it runs in x's dtype, with its statistics,
            // running statistics and parameters in f32 inside the op.)
            Softmax | LogSoftmax | LayerNorm | Sum | Mean | Exp | Log | Loss => CastPolicy::Float32,
            // Gathers and maxima lose nothing in 16-bit, but kiln has no
            // 16-bit kernel for them: they compute in f32 like the rest.
            Max | Embedding => CastPolicy::Float32,
        }
    }
}

/// `t` as the op `op` takes it under the current autocast state: see
/// [`CastPolicy`]. Tensors that are not floats pass through. A parameter
/// whose optimizer keeps a 16-bit copy of it (`optim::ForwardCopies`)
/// is cast by taking that copy.
pub(crate) fn cast_input(op: AutocastOp, t: &Tensor) -> Result<Tensor> {
    match (op.policy(), autocast_dtype()) {
        (CastPolicy::LowerPrecision, Some(half)) if t.dtype() == DType::F32 => {
            t.to_dtype_for_forward(half)
        }
        (CastPolicy::Float32, _) if t.dtype().is_half() => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// [`cast_input`] over an optional operand.
pub(crate) fn cast_optional(op: AutocastOp, t: Option<&Tensor>) -> Result<Option<Tensor>> {
    t.map(|t| cast_input(op, t)).transpose()
}

/// [`cast_input`] over the (input, weight, optional bias) of a layer op.
pub(crate) fn cast_layer_operands(
    op: AutocastOp,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    Ok((
        cast_input(op, x)?,
        cast_input(op, weight)?,
        cast_optional(op, bias)?,
    ))
}

/// The output of an f32-policy op whose main input had dtype `input`:
/// outside a scope a 16-bit input gets a 16-bit output back (the op only
/// computed in f32 for want of a 16-bit kernel); inside, f32 it stays.
pub(crate) fn finish_output(op: AutocastOp, out: Tensor, input: DType) -> Result<Tensor> {
    let restore = op.policy() == CastPolicy::Float32
        && autocast_dtype().is_none()
        && input.is_half()
        && out.dtype() == DType::F32;
    if restore {
        out.to_dtype(input)
    } else {
        Ok(out)
    }
}

/// Runs the f32-policy op `op` on one main input: a 16-bit `x` is widened,
/// `f` runs on it, and the output's dtype is fixed (see [`finish_output`]).
pub(crate) fn in_float32(
    op: AutocastOp,
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if !x.dtype().is_half() {
        return f(x);
    }
    let out = f(&widened(x)?)?;
    finish_output(op, out, x.dtype())
}

/// Whether any operand is 16-bit: an f32-policy op with several operands
/// then runs on their [`widened`] copies and passes its output through
/// [`finish_output`].
pub(crate) fn any_half(operands: &[Option<&Tensor>]) -> bool {
    operands.iter().flatten().any(|t| t.dtype().is_half())
}

/// A 16-bit tensor widened to f32 (differentiably); anything else as it is.
pub(crate) fn widened(t: &Tensor) -> Result<Tensor> {
    if t.dtype().is_half() {
        t.to_dtype(DType::F32)
    } else {
        Ok(t.clone())
    }
}

/// [`widened`] over an optional operand.
pub(crate) fn widened_optional(t: Option<&Tensor>) -> Result<Option<Tensor>> {
    t.map(widened).transpose()
}

/// The common float dtype of a binary op's operands when one is 16-bit
/// (PyTorch's promotion): the wider one, and f32 for bf16 with f16. f32
/// with f64 stays an error, as before mixed precision: kiln keeps f64 for
/// gradient checks, where a stray f32 operand is a mistake to report.
pub(crate) fn promoted(a: DType, b: DType) -> Option<DType> {
    if a == b || !a.is_float() || !b.is_float() || !(a.is_half() || b.is_half()) {
        return None;
    }
    Some(match (a, b) {
        (DType::F64, _) | (_, DType::F64) => DType::F64,
        _ => DType::F32,
    })
}

/// The precision a model trains and runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// f32 parameters, optimizer state and f32-policy ops; bf16 matrix
    /// products under autocast. bf16 has f32's range: no loss scaling.
    BF16,
    /// As BF16 with f16, whose range is small: the loss is scaled
    /// (see [`GradScaler`]).
    F16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::BF16, Precision::F16];

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::BF16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// Parses "f32", "bf16" or "f16".
    pub fn parse(name: &str) -> Result<Self> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::invalid(
                    "precision",
                    format!("unknown precision \"{name}\" (expected f32, bf16 or f16)"),
                )
            })
    }

    /// The autocast dtype, for the mixed precisions.
    pub fn lower_dtype(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::BF16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
        }
    }

    /// An autocast scope for this precision (none for f32): hold it over a
    /// forward pass.
    pub fn autocast(self) -> Option<AutocastGuard> {
        self.lower_dtype().map(autocast)
    }

    /// The forward copies an optimizer keeps for this precision: of the
    /// autocast dtype, rounded to nearest even, so they hold exactly what
    /// autocast's own cast gives (none for f32). See [`ForwardCopies`].
    pub fn forward_copies(self) -> Option<ForwardCopies> {
        self.lower_dtype().map(ForwardCopies::nearest_even)
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a training step needs for its precision: the autocast scope of its
/// forward and the loss scaler (enabled for f16 only).
#[derive(Clone, Debug)]
pub struct MixedPrecision {
    pub precision: Precision,
    pub scaler: GradScaler,
}

impl MixedPrecision {
    pub fn new(precision: Precision) -> Self {
        let scaler = match precision {
            Precision::F16 => GradScaler::new(Default::default()).expect("the defaults are valid"),
            Precision::F32 | Precision::BF16 => GradScaler::disabled(),
        };
        MixedPrecision { precision, scaler }
    }

    /// Plain f32 training.
    pub fn f32() -> Self {
        MixedPrecision::new(Precision::F32)
    }

    /// The scope to hold over the forward pass (none for f32).
    pub fn autocast(&self) -> Option<AutocastGuard> {
        self.precision.autocast()
    }

    /// Backward from `loss` (scaled for f16), unscaled gradients, and
    /// whether they are all finite: when not, skip the optimizer step (the
    /// scaler backs off at [`MixedPrecision::end_step`]).
    pub fn backward(&mut self, loss: &Tensor) -> Result<(GradStore, bool)> {
        let mut grads = self.scaler.scale(loss)?.backward()?;
        let finite = self.scaler.unscale(&mut grads)?;
        Ok((grads, finite))
    }

    /// Ends a training step (the scaler's update).
    pub fn end_step(&mut self) {
        self.scaler.update();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore_and_the_backward_pass_suspends_them() {
        assert_eq!(autocast_dtype(), None);
        {
            let _outer = autocast(DType::BF16);
            assert_eq!(autocast_dtype(), Some(DType::BF16));
            {
                let _inner = autocast(DType::F16);
                assert_eq!(autocast_dtype(), Some(DType::F16));
                let _off = suspend();
                assert_eq!(autocast_dtype(), None);
            }
            assert_eq!(autocast_dtype(), Some(DType::BF16));
        }
        assert_eq!(autocast_dtype(), None);
    }

    #[test]
    fn only_16_bit_floats_are_a_lower_precision() {
        for dtype in [DType::F32, DType::F64, DType::U32] {
            let err = try_autocast(dtype).err().unwrap().to_string();
            assert!(err.contains("bf16 or f16"), "{err}");
        }
        assert_eq!(autocast_dtype(), None);
    }

    #[test]
    fn precisions_parse_by_name_and_only_f16_scales_the_loss() {
        for p in Precision::ALL {
            assert_eq!(Precision::parse(p.name()).unwrap(), p);
            assert_eq!(
                MixedPrecision::new(p).scaler.is_enabled(),
                p == Precision::F16
            );
        }
        let err = Precision::parse("fp8").unwrap_err().to_string();
        assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
        assert_eq!(Precision::BF16.lower_dtype(), Some(DType::BF16));
        assert!(Precision::F32.autocast().is_none());
    }

    #[test]
    fn promotion_picks_the_wider_float() {
        use DType::*;
        assert_eq!(promoted(BF16, F32), Some(F32));
        assert_eq!(promoted(F16, BF16), Some(F32));
        assert_eq!(promoted(F32, F64), None);
        assert_eq!(promoted(BF16, F64), Some(F64));
        assert_eq!(promoted(F32, F32), None);
        assert_eq!(promoted(U32, F32), None);
    }
}
