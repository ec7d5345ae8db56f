//! A property-based fuzz of kiln's public API. Every op on `Tensor` and
//! every `nn` layer gets arguments drawn from valid and invalid regions:
//! mismatched, empty and rank-0 to rank-6 shapes, out-of-range dims and
//! indices, u32 and 16-bit tensors, f32 mixed with f64, NaN and ±∞ values,
//! and (where a CUDA device or the emulator is present) operands on
//! `cuda:0` mixed with CPU ones.
//!
//! The property: a call returns `Ok` with the documented shape (checked
//! wherever the shape follows from the arguments) or an `Err` whose message
//! starts with the op's name (for an op built from others, the name of the
//! inner op that found the problem); it never panics. Arguments the suite
//! knows to be valid must succeed and ones it knows to be invalid must fail.
//! When an input requires grad, the output is summed and `backward()` must
//! succeed too, giving each leaf a gradient of its own shape, dtype and
//! device.
//!
//! Per-op tallies print at the end as a markdown table
//! (`cargo test --release --test fuzz_ops -- --nocapture`).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use kiln::nn::init::Init;
use kiln::nn::{
    BatchNorm2d, BatchNorm2dOptions, CausalSelfAttention, Conv2d, ConvTranspose2d, Dropout,
    Embedding, Flatten, Gelu, KvCache, LayerNorm, LeakyRelu, Linear, Module, Relu, Sequential,
    Sigmoid, Tanh,
};
use kiln::ops::conv::{Conv2dForwardKernel, conv2d_forward_with_kernel};
use kiln::ops::gemm::GemmKernel;
use kiln::{
    AttentionDropout, AttentionMask, AttentionOptions, BceWithLogitsOptions, Conv2dPadding,
    Conv2dParams, ConvTranspose2dParams, CrossEntropyOptions, DType, Device, GeluApproximation,
    Reduction, Rng, Tensor,
};
use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};

type CaseResult = Result<(), TestCaseError>;

// ----- tallies -----------------------------------------------------------

/// Outcomes of one op's calls, and of backward through its results.
#[derive(Clone, Copy, Default)]
struct Tally {
    calls: u64,
    /// Calls in cases that placed an operand on `cuda:0`.
    cuda_calls: u64,
    ok: u64,
    err: u64,
    panics: u64,
    backward_ok: u64,
    backward_err: u64,
    backward_panics: u64,
}

impl Tally {
    fn columns(&self) -> [u64; 8] {
        [
            self.calls,
            self.cuda_calls,
            self.ok,
            self.err,
            self.panics,
            self.backward_ok,
            self.backward_err,
            self.backward_panics,
        ]
    }
}

/// Per-op tallies, in the order the ops were first called.
static TALLIES: Mutex<Vec<(&'static str, Tally)>> = Mutex::new(Vec::new());

/// Tensors the harness placed on `cuda:0`.
static CUDA_TENSORS: AtomicUsize = AtomicUsize::new(0);

/// Whether the current case placed an operand on `cuda:0`.
static CASE_ON_CUDA: AtomicBool = AtomicBool::new(false);

fn record(label: &'static str, update: impl FnOnce(&mut Tally)) {
    let mut tallies = TALLIES.lock().unwrap_or_else(|e| e.into_inner());
    let index = match tallies.iter().position(|(name, _)| *name == label) {
        Some(index) => index,
        None => {
            tallies.push((label, Tally::default()));
            tallies.len() - 1
        }
    };
    update(&mut tallies[index].1);
}

fn print_table() {
    let tallies = TALLIES.lock().unwrap_or_else(|e| e.into_inner());
    let mut table = String::from(
        "| op | calls | in cases with cuda:0 | Ok | Err | panics | backward Ok | backward Err | backward panics |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let row = |name: &str, columns: [u64; 8]| {
        let cells: Vec<String> = columns.iter().map(u64::to_string).collect();
        format!("| {name} | {} |\n", cells.join(" | "))
    };
    let mut total = [0u64; 8];
    for (name, tally) in tallies.iter() {
        table += &row(name, tally.columns());
        for (sum, value) in total.iter_mut().zip(tally.columns()) {
            *sum += value;
        }
    }
    table += &row("**total**", total);
    println!("\n{table}");
}

// ----- devices -----------------------------------------------------------

/// Whether `cuda:0` exists (a GPU, or the emulator under KILN_CUDA=emulate).
fn cuda_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| kiln::cuda::device_count() > 0)
}

// ----- expectations ------------------------------------------------------

/// What the arguments of a call entitle it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum V {
    /// Valid: the call must succeed.
    Valid,
    /// Valid or not depending on support this suite does not model (16-bit
    /// kernels on CUDA, dtype promotion, autocast, extreme hyper-parameters):
    /// success and a named error are both fine.
    Maybe,
    /// Invalid: the call must return an error.
    Invalid,
}

impl V {
    fn and(self, other: V) -> V {
        self.max(other)
    }

    fn from(valid: bool) -> V {
        if valid { V::Valid } else { V::Invalid }
    }
}

/// The validity of a call and, when it succeeds, the shape it must return.
#[derive(Clone, Debug)]
struct Expect {
    v: V,
    shape: Option<Vec<usize>>,
}

impl Expect {
    /// `shape` is None when the shapes do not fit the op (the call must fail).
    fn new(shape: Option<Vec<usize>>, v: V) -> Self {
        match shape {
            Some(shape) => Expect {
                v,
                shape: Some(shape),
            },
            None => Expect {
                v: V::Invalid,
                shape: None,
            },
        }
    }

    /// Success or a named error, with no shape to check.
    fn any() -> Self {
        Expect {
            v: V::Maybe,
            shape: None,
        }
    }
}

/// The prefixes (besides the op's own name) an error may carry: composite
/// ops report the inner op that found the problem.
fn inner_names(label: &str) -> &'static [&'static str] {
    match label {
        "flatten" | "unsqueeze" | "squeeze" => &["reshape"],
        "transpose" => &["permute"],
        "stack" => &["cat", "unsqueeze"],
        "matmul_nt" | "gemm" | "gemm_with" => &["matmul"],
        "linear" => &["matmul", "add"],
        "max_with_indices" => &["max"],
        "sum_all" => &["sum"],
        "mean_all" => &["mean"],
        "sum_to_shape" => &["sum", "reshape"],
        "conv2d_forward_with_kernel" => &["conv2d"],
        "causal_self_attention" => &["causal_attention", "narrow", "reshape", "permute"],
        "zeros" | "ones" | "full" | "arange" | "randn" | "rand" | "zeros_like" => {
            &["full", "from_vec", "to_device", "cuda"]
        }
        "from_indices" => &["from_vec"],
        "conv2d (groups, padding)" | "Conv2d (groups)" => &["conv2d"],
        "conv_transpose2d (groups)" | "ConvTranspose2d (groups)" => &["conv_transpose2d"],
        "cross_entropy_with" => &["cross_entropy"],
        "bce_with_logits_with" => &["bce_with_logits"],
        "layer_norm_over" | "LayerNorm (normalized_shape)" => &["layer_norm"],
        "embedding_with" | "embedding_with (padding row gradient)" | "Embedding (padding_idx)" => {
            &["embedding"]
        }
        "BatchNorm2d (config)" => &["batch_norm2d", "item", "assign"],
        "scaled_dot_product_attention" => &[
            "causal_attention",
            "matmul",
            "matmul_nt",
            "mul_scalar",
            "add",
            "softmax",
            "dropout",
            "to_dtype",
        ],
        // The fallible form of `autocast`.
        "try_autocast" => &["autocast"],
        "to_device" | "Device::cuda" => &["cuda"],
        "Linear::new"
        | "Conv2d::new"
        | "ConvTranspose2d::new"
        | "Embedding::new"
        | "BatchNorm2d::new"
        | "LayerNorm::new"
        | "CausalSelfAttention::new"
        | "Conv2d::new (groups)"
        | "ConvTranspose2d::new (groups)"
        | "BatchNorm2d::with_config"
        | "LayerNorm::with_normalized_shape"
        | "Embedding::with_padding_idx" => &[
            "Linear",
            "Conv2d",
            "ConvTranspose2d",
            "Embedding",
            "BatchNorm2d",
            "LayerNorm",
            "CausalSelfAttention",
            "Dropout",
            "init",
            "rand",
            "randn",
            "full",
            "from_vec",
            "mul_scalar",
            "add_scalar",
            "to_device",
            "cuda",
        ],
        "Linear" => &["linear", "matmul", "add", "unsqueeze", "squeeze"],
        "Conv2d" => &["conv2d"],
        "ConvTranspose2d" => &["conv_transpose2d"],
        "BatchNorm2d" => &["batch_norm2d", "item", "assign"],
        "LayerNorm" => &["layer_norm"],
        "Embedding" => &["embedding"],
        "Dropout" => &["dropout"],
        "CausalSelfAttention" | "CausalSelfAttention::forward_cached" => &[
            "CausalSelfAttention",
            "Linear",
            "linear",
            "matmul",
            "add",
            "causal_self_attention",
            "causal_attention",
            "narrow",
            "reshape",
            "permute",
            "cat",
            "mul_scalar",
            "softmax",
            "dropout",
            "unsqueeze",
            "squeeze",
        ],
        "Sequential" => &[
            "Linear",
            "linear",
            "matmul",
            "add",
            "relu",
            "leaky_relu",
            "tanh",
            "sigmoid",
            "gelu",
            "gelu_tanh",
            "flatten",
            "reshape",
            "dropout",
            "layer_norm",
            "unsqueeze",
            "squeeze",
        ],
        "Relu" => &["relu"],
        "LeakyRelu" => &["leaky_relu"],
        "Tanh" => &["tanh"],
        "Sigmoid" => &["sigmoid"],
        "Gelu" => &["gelu", "gelu_tanh"],
        "Flatten" => &["flatten", "reshape"],
        "gelu" => &["gelu_tanh"],
        _ => &[],
    }
}

fn names_op(label: &str, message: &str) -> bool {
    let starts = |name: &str| {
        message
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(':'))
    };
    // "Linear::new" may also say "Linear".
    let owner = label.split("::").next().unwrap_or(label);
    starts(label) || starts(owner) || inner_names(label).iter().any(|name| starts(name))
}

/// Where the last panic inside a probe happened (a kernel's on a rayon
/// thread included).
static PANIC_LOCATION: Mutex<Option<String>> = Mutex::new(None);

/// Whether a probe is running: its panics are caught and reported.
static PROBING: AtomicBool = AtomicBool::new(false);

/// Inside a probe, records a panic's location instead of printing it: the
/// failure report names it, and shrinking does not flood the output. Other
/// panics (the verdict's) print as usual.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if PROBING.load(Ordering::Relaxed) {
            let location = info.location().map(|l| l.to_string());
            *PANIC_LOCATION.lock().unwrap_or_else(|e| e.into_inner()) = location;
        } else {
            default(info);
        }
    }));
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    };
    match PANIC_LOCATION
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        Some(location) => format!("{message} (at {location})"),
        None => message,
    }
}

/// Runs `f` under `catch_unwind`, tallies the outcome under `label`, and
/// checks it against `v`: Some(value) on success, None on a well-named error.
fn probe<T>(
    label: &'static str,
    v: V,
    f: impl FnOnce() -> kiln::Result<T>,
) -> Result<Option<T>, TestCaseError> {
    PROBING.store(true, Ordering::Relaxed);
    let outcome = catch_unwind(AssertUnwindSafe(f));
    PROBING.store(false, Ordering::Relaxed);
    let on_cuda = CASE_ON_CUDA.load(Ordering::Relaxed);
    record(label, |t| {
        t.calls += 1;
        t.cuda_calls += u64::from(on_cuda);
    });
    match outcome {
        Err(payload) => {
            record(label, |t| t.panics += 1);
            let msg = panic_message(payload);
            Err(TestCaseError::fail(format!("{label} panicked: {msg}")))
        }
        Ok(Err(e)) => {
            record(label, |t| t.err += 1);
            let message = e.to_string();
            if !names_op(label, &message) {
                return Err(TestCaseError::fail(format!(
                    "{label}: the error does not name the op: {message}"
                )));
            }
            if v == V::Valid {
                return Err(TestCaseError::fail(format!(
                    "{label}: valid arguments were refused: {message}"
                )));
            }
            Ok(None)
        }
        Ok(Ok(value)) => {
            record(label, |t| t.ok += 1);
            if v == V::Invalid {
                return Err(TestCaseError::fail(format!(
                    "{label}: invalid arguments were accepted"
                )));
            }
            Ok(Some(value))
        }
    }
}

/// `probe` for a call that must succeed (the harness's own set-up).
fn valid<T>(label: &'static str, f: impl FnOnce() -> kiln::Result<T>) -> Result<T, TestCaseError> {
    probe(label, V::Valid, f)?.ok_or_else(|| TestCaseError::fail(format!("{label} failed")))
}

/// `probe` for an op returning a tensor: checks the shape, then backward
/// through the output when it requires grad.
fn check(
    label: &'static str,
    expect: Expect,
    leaves: &[&Tensor],
    f: impl FnOnce() -> kiln::Result<Tensor>,
) -> Result<Option<Tensor>, TestCaseError> {
    let Some(out) = probe(label, expect.v, f)? else {
        return Ok(None);
    };
    if let Some(shape) = &expect.shape {
        prop_assert_eq!(out.dims(), &shape[..], "{} returned the wrong shape", label);
    }
    check_backward(label, &out, leaves)?;
    Ok(Some(out))
}

/// Sums `out` to a scalar and runs backward; each leaf that gets a gradient
/// must get one of its own shape, dtype and device.
fn check_backward(label: &'static str, out: &Tensor, leaves: &[&Tensor]) -> CaseResult {
    if !out.requires_grad() || !out.dtype().is_float() {
        return Ok(());
    }
    let loss = valid("sum_all (a loss for backward)", || out.sum_all())?;
    PROBING.store(true, Ordering::Relaxed);
    let outcome = catch_unwind(AssertUnwindSafe(|| loss.backward()));
    PROBING.store(false, Ordering::Relaxed);
    let grads = match outcome {
        Err(payload) => {
            record(label, |t| t.backward_panics += 1);
            let msg = panic_message(payload);
            return Err(TestCaseError::fail(format!(
                "backward through {label} panicked: {msg}"
            )));
        }
        Ok(Err(e)) => {
            record(label, |t| t.backward_err += 1);
            return Err(TestCaseError::fail(format!(
                "backward through {label} failed: {e}"
            )));
        }
        Ok(Ok(grads)) => grads,
    };
    record(label, |t| t.backward_ok += 1);
    // The pass released the graph: a second one is an error, not a panic.
    probe("backward", V::Invalid, || loss.backward())?;
    for leaf in leaves.iter().filter(|t| t.requires_grad()) {
        if let Some(grad) = grads.get(leaf) {
            prop_assert_eq!(grad.dims(), leaf.dims(), "{} gradient shape", label);
            prop_assert_eq!(grad.dtype(), leaf.dtype(), "{} gradient dtype", label);
            prop_assert_eq!(grad.device(), leaf.device(), "{} gradient device", label);
        }
    }
    Ok(())
}

// ----- operand validity ----------------------------------------------------

/// A float tensor is fine on the CPU in every dtype; on CUDA f32 is, while
/// the 16-bit dtypes have kernels for some ops only (and f64 is never there).
fn float_v(t: &Tensor) -> V {
    match (t.dtype(), t.device()) {
        (DType::U32, _) => V::Invalid,
        (DType::F32, _) | (_, Device::Cpu) => V::Valid,
        _ => V::Maybe,
    }
}

fn device_v(ts: &[&Tensor]) -> V {
    V::from(ts.iter().all(|t| t.device() == ts[0].device()))
}

/// One device and one float dtype; a 16-bit dtype beside another float one
/// is promoted or widened by some ops and refused by others.
fn operands_v(ts: &[&Tensor]) -> V {
    let dtypes_v = if ts.iter().all(|t| t.dtype() == ts[0].dtype()) {
        ts.iter().map(|t| float_v(t)).fold(V::Valid, V::and)
    } else if ts.iter().any(|t| t.dtype() == DType::U32) {
        V::Invalid
    } else if ts.iter().any(|t| t.dtype().is_half()) {
        V::Maybe
    } else {
        V::Invalid
    };
    device_v(ts).and(dtypes_v)
}

/// `operands_v` inside an autocast scope, where f32 operands are cast to
/// 16 bits and f64 ones are not, so mixed float dtypes may meet promotion:
/// only a device mismatch or a u32 operand is certainly refused.
fn cast_operands_v(ts: &[&Tensor], autocast: Option<DType>) -> V {
    if autocast.is_none() {
        return operands_v(ts);
    }
    let u32_v = V::from(ts.iter().all(|t| t.dtype() != DType::U32));
    device_v(ts).and(u32_v).and(V::Maybe)
}

// ----- shape oracles (written independently of kiln's) ---------------------

fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |d: &[usize], i: usize| {
        let pad = rank - d.len();
        if i < pad { 1 } else { d[i - pad] }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

fn reduced(dims: &[usize], reduce: &[usize], keepdim: bool) -> Vec<usize> {
    dims.iter()
        .enumerate()
        .filter_map(|(d, &size)| match (reduce.contains(&d), keepdim) {
            (false, _) => Some(size),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect()
}

/// op(a) @ op(b) with batch broadcasting.
fn gemm_shape(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Option<Vec<usize>> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (l0, l1) = (a[a.len() - 2], a[a.len() - 1]);
    let (r0, r1) = (b[b.len() - 2], b[b.len() - 1]);
    let (m, k) = if ta { (l1, l0) } else { (l0, l1) };
    let (k2, n) = if tb { (r1, r0) } else { (r0, r1) };
    if k != k2 {
        return None;
    }
    let mut out = broadcast(&a[..a.len() - 2], &b[..b.len() - 2])?;
    out.extend([m, n]);
    Some(out)
}

/// PyTorch's `matmul`: a 1-D operand is a vector whose dim is added for the
/// product and removed from the result.
fn matmul_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    match (a.len(), b.len()) {
        (1, 1) => (a[0] == b[0]).then(Vec::new),
        (1, r) if r >= 2 => {
            let mut out = gemm_shape(&[1, a[0]], b, false, false)?;
            out.remove(out.len() - 2);
            Some(out)
        }
        (l, 1) if l >= 2 => {
            let mut out = gemm_shape(a, &[b[0], 1], false, false)?;
            out.pop();
            Some(out)
        }
        _ => gemm_shape(a, b, false, false),
    }
}

/// kiln's rule for a shape's element count: the product of its non-zero
/// dims must fit a usize.
fn numel_fits(dims: &[usize]) -> bool {
    dims.iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some()
}

// ----- generators ----------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fill {
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
struct Spec {
    dims: Vec<usize>,
    dtype: DType,
    cuda: bool,
    fill: Fill,
    seed: u64,
    grad: bool,
}

/// SplitMix64: the operands' values come from their seed alone.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn values(n: usize, fill: Fill, seed: u64) -> Vec<f64> {
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

fn indices(n: usize, bound: u32, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| (mix(&mut state) % u64::from(bound.max(1))) as u32)
        .collect()
}

/// The largest dim size for each rank, so that no tensor exceeds ~700 values.
const MAX_DIM: [usize; 7] = [2, 6, 6, 5, 4, 3, 3];

fn dim_size(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 3 => Just(1usize), 8 => 2..=max]
}

fn dims(ranks: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<usize>> {
    ranks.prop_flat_map(|rank| prop::collection::vec(dim_size(MAX_DIM[rank]), rank))
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        8 => Just(DType::F32),
        2 => Just(DType::F64),
        1 => Just(DType::BF16),
        1 => Just(DType::F16),
        1 => Just(DType::U32),
    ]
}

fn float_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        8 => Just(DType::F32),
        2 => Just(DType::F64),
        1 => Just(DType::BF16),
        1 => Just(DType::F16),
    ]
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        6 => Just(Fill::Normal),
        1 => Just(Fill::Unit),
        2 => Just(Fill::Special),
        1 => Just(Fill::Huge),
    ]
}

fn spec_with(
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

fn spec(ranks: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Spec> {
    spec_with(dims(ranks), dtype())
}

/// A scalar argument: mostly ordinary, sometimes NaN, ±∞, 0 or enormous.
fn scalar() -> impl Strategy<Value = f64> {
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
fn index_arg() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0..4usize,
        4 => 4..8usize,
        1 => Just(usize::MAX),
        1 => Just(usize::MAX / 2 + 1),
    ]
}

/// Makes the operand `spec` describes: a leaf that requires grad if asked
/// (and a float), on `cuda:0` if asked and present.
fn build(spec: &Spec) -> Result<Tensor, TestCaseError> {
    build_indices(spec, 8)
}

/// `build`, with u32 values below `bound`.
fn build_indices(spec: &Spec, bound: u32) -> Result<Tensor, TestCaseError> {
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
fn related(base: &[usize], other: &[usize], relation: u8, seed: u64) -> Vec<usize> {
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
type Partner = (Spec, u8, u64, bool, bool);

/// A `Partner`, usually of the same dtype and device.
fn partner() -> impl Strategy<Value = Partner> {
    (
        spec(0..=6),
        0u8..8,
        any::<u64>(),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.85),
    )
}

/// The spec of `a`'s partner.
fn paired(a: &Spec, (mut b, relation, seed, same_dtype, same_device): Partner) -> Spec {
    b.dims = related(&a.dims, &b.dims, relation, seed);
    if same_dtype {
        b.dtype = a.dtype;
    }
    if same_device {
        b.cuda = a.cuda;
    }
    b
}

// ----- elementwise, activations ----------------------------------------------

#[derive(Clone, Debug)]
struct ElementwiseCase {
    a: Spec,
    b: Spec,
    swap: bool,
    param: f64,
    param2: f64,
}

fn elementwise_case() -> impl Strategy<Value = ElementwiseCase> {
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

fn elementwise(case: ElementwiseCase) -> CaseResult {
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

// ----- reductions ------------------------------------------------------------

#[derive(Clone, Debug)]
struct ReduceCase {
    x: Spec,
    reduce: Vec<usize>,
    keepdim: bool,
    dim: usize,
    target: Spec,
    relation: u8,
    seed: u64,
}

fn reduce_case() -> impl Strategy<Value = ReduceCase> {
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

fn reductions(case: ReduceCase) -> CaseResult {
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

// ----- shape ops, conversions ---------------------------------------------

#[derive(Clone, Debug)]
struct ShapeCase {
    x: Spec,
    others: Vec<Partner>,
    args: [usize; 4],
    perm: Vec<usize>,
    perm_kind: u8,
    new_dims: Vec<usize>,
    reshape_kind: u8,
    dtype: DType,
}

fn shape_case() -> impl Strategy<Value = ShapeCase> {
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

fn shapes(case: ShapeCase) -> CaseResult {
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

// ----- construction ----------------------------------------------------------

#[derive(Clone, Debug)]
struct ConstructCase {
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

fn construct_case() -> impl Strategy<Value = ConstructCase> {
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

fn construction(case: ConstructCase) -> CaseResult {
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

// ----- matrix products -------------------------------------------------------

#[derive(Clone, Debug)]
struct MatmulCase {
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

fn autocast_choice() -> impl Strategy<Value = Option<DType>> {
    prop_oneof![
        6 => Just(None),
        1 => Just(Some(DType::BF16)),
        1 => Just(Some(DType::F16)),
    ]
}

fn matmul_case() -> impl Strategy<Value = MatmulCase> {
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

fn matmuls(case: MatmulCase) -> CaseResult {
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

// ----- convolutions ----------------------------------------------------------

#[derive(Clone, Debug)]
struct ConvCase {
    x: Spec,
    w: Spec,
    bias: Option<Spec>,
    size: [usize; 7],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    output_padding: [usize; 2],
    mutation: u8,
    kernel: usize,
    autocast: Option<DType>,
}

/// Beyond any image: it overflows usize arithmetic when doubled or multiplied.
const BIG: usize = usize::MAX / 2 + 1;

fn hyper(low: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        24 => low..=3usize,
        1 => Just(0usize),
        1 => Just(BIG),
        1 => Just(usize::MAX),
    ]
}

/// A size that is mostly positive.
fn extent(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 19 => 1..=max]
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        (
            spec_with(Just(vec![]), dtype()),
            partner(),
            prop::option::weighted(0.6, partner()),
        ),
        [
            extent(2),
            extent(3),
            extent(6),
            extent(6),
            extent(3),
            extent(3),
            extent(3),
        ],
        [hyper(1), hyper(1)],
        [hyper(0), hyper(0)],
        [hyper(1), hyper(1)],
        [0usize..3, 0..3],
        0u8..24,
        0usize..3,
        autocast_choice(),
    )
        .prop_map(
            |(
                (x, w, bias),
                size,
                stride,
                padding,
                dilation,
                output_padding,
                mutation,
                kernel,
                autocast,
            )| {
                let w = paired(&x, w);
                let bias = bias.map(|b| paired(&x, b));
                ConvCase {
                    x,
                    w,
                    bias,
                    size,
                    stride,
                    padding,
                    dilation,
                    output_padding,
                    mutation,
                    kernel,
                    autocast,
                }
            },
        )
}

/// conv2d's output [N, O, Ho, Wo], exactly (None if the arguments do not fit):
/// weight [O, C/groups, kh, kw] with O divisible by groups, and PyTorch's
/// padding "same" (stride 1, Ho = H) and "valid" (no padding).
fn conv2d_shape(
    x: &[usize],
    w: &[usize],
    bias: Option<&[usize]>,
    p: Conv2dParams,
) -> Option<Vec<usize>> {
    if x.len() != 4 || w.len() != 4 || x[1..].contains(&0) || w.contains(&0) {
        return None;
    }
    if p.groups == 0 || !w[0].is_multiple_of(p.groups) || w[1].checked_mul(p.groups) != Some(x[1]) {
        return None;
    }
    if p.stride.contains(&0) || p.dilation.contains(&0) || bias.is_some_and(|b| b != [w[0]]) {
        return None;
    }
    let padding = match p.padding {
        Conv2dPadding::Explicit(padding) => padding,
        Conv2dPadding::Valid => [0, 0],
        // The output is as large as the input.
        Conv2dPadding::Same if p.stride == [1, 1] => return Some(vec![x[0], w[0], x[2], x[3]]),
        Conv2dPadding::Same => return None,
    };
    let mut out = vec![x[0], w[0]];
    for d in 0..2 {
        let padded = x[2 + d] as u128 + 2 * padding[d] as u128;
        let reach = p.dilation[d] as u128 * (w[2 + d] as u128 - 1) + 1;
        if padded < reach {
            return None;
        }
        out.push(usize::try_from((padded - reach) / p.stride[d] as u128 + 1).ok()?);
    }
    Some(out)
}

/// conv_transpose2d's output [N, Cout, Ho, Wo], exactly: weight
/// [Cin, Cout/groups, kh, kw] with Cin divisible by groups.
fn conv_transpose2d_shape(
    x: &[usize],
    w: &[usize],
    bias: Option<&[usize]>,
    p: ConvTranspose2dParams,
) -> Option<Vec<usize>> {
    if x.len() != 4 || w.len() != 4 || x[1..].contains(&0) || w.contains(&0) || x[1] != w[0] {
        return None;
    }
    if p.groups == 0 || !w[0].is_multiple_of(p.groups) {
        return None;
    }
    let out_channels = w[1].checked_mul(p.groups)?;
    if p.stride.contains(&0) || p.dilation.contains(&0) || bias.is_some_and(|b| b != [out_channels])
    {
        return None;
    }
    let mut out = vec![x[0], out_channels];
    for d in 0..2 {
        if p.output_padding[d] >= p.stride[d] && p.output_padding[d] >= p.dilation[d] {
            return None;
        }
        let size = (x[2 + d] as i128 - 1) * p.stride[d] as i128 - 2 * p.padding[d] as i128
            + p.dilation[d] as i128 * (w[2 + d] as i128 - 1)
            + p.output_padding[d] as i128
            + 1;
        if size <= 0 {
            return None;
        }
        out.push(usize::try_from(size).ok()?);
    }
    Some(out)
}

fn convolutions(case: ConvCase) -> CaseResult {
    let [n, c, h, wd, o, kh, kw] = case.size;
    let mut x_dims = vec![n, c, h, wd];
    let mut w_dims = vec![o, c, kh, kw];
    let mut t_dims = vec![c, o, kh, kw];
    match case.mutation {
        0 => {
            x_dims.pop();
        }
        1 => x_dims.push(1),
        2 => {
            w_dims[1] += 1;
            t_dims[0] += 1;
        }
        3 => {
            w_dims.truncate(2);
            t_dims.truncate(3);
        }
        _ => {}
    }
    let x = build(&Spec {
        dims: x_dims,
        ..case.x.clone()
    })?;
    let w = build(&Spec {
        dims: w_dims,
        ..case.w.clone()
    })?;
    let t = build(&Spec {
        dims: t_dims,
        ..case.w.clone()
    })?;
    let bias_len = if case.mutation == 4 { o + 1 } else { o };
    let bias = match &case.bias {
        Some(spec) => Some(build(&Spec {
            dims: vec![bias_len],
            ..spec.clone()
        })?),
        None => None,
    };
    let extreme = [case.stride, case.padding, case.dilation]
        .iter()
        .flatten()
        .any(|&s| s >= BIG);
    let _autocast = case.autocast.map(kiln::autocast);
    let maybe_v = if extreme || case.autocast.is_some() {
        V::Maybe
    } else {
        V::Valid
    };
    let bias_dims = bias.as_ref().map(|b| b.dims());

    let params = Conv2dParams {
        stride: case.stride,
        padding: case.padding.into(),
        dilation: case.dilation,
        ..Conv2dParams::default()
    };
    let mut operands = vec![&x, &w];
    operands.extend(bias.as_ref());
    let v = cast_operands_v(&operands, case.autocast).and(maybe_v);
    let shape = conv2d_shape(x.dims(), w.dims(), bias_dims, params);
    check("conv2d", Expect::new(shape.clone(), v), &operands, || {
        x.conv2d(&w, bias.as_ref(), params)
    })?;
    let kernel = [
        Conv2dForwardKernel::Direct,
        Conv2dForwardKernel::ImplicitGemm,
        Conv2dForwardKernel::TensorCore,
    ][case.kernel];
    check(
        "conv2d_forward_with_kernel",
        Expect::new(
            shape,
            v.and(if case.autocast.is_some() {
                V::Maybe
            } else {
                V::Valid
            }),
        ),
        &[],
        || conv2d_forward_with_kernel(&x, &w, bias.as_ref(), params, kernel),
    )?;

    let params = ConvTranspose2dParams {
        stride: case.stride,
        padding: case.padding,
        output_padding: case.output_padding,
        dilation: case.dilation,
        ..ConvTranspose2dParams::default()
    };
    let mut operands = vec![&x, &t];
    operands.extend(bias.as_ref());
    let v = cast_operands_v(&operands, case.autocast).and(maybe_v);
    let shape = conv_transpose2d_shape(x.dims(), t.dims(), bias_dims, params);
    check("conv_transpose2d", Expect::new(shape, v), &operands, || {
        x.conv_transpose2d(&t, bias.as_ref(), params)
    })?;
    Ok(())
}

/// conv2d and conv_transpose2d with channel groups, and conv2d with
/// PyTorch's padding "same" and "valid".
#[derive(Clone, Debug)]
struct GroupConvCase {
    x: Spec,
    w: Spec,
    bias: Option<Spec>,
    groups: usize,
    /// [N, C/groups, O/groups, H, W, kh, kw]
    size: [usize; 7],
    stride: [usize; 2],
    padding: Conv2dPadding,
    dilation: [usize; 2],
    output_padding: [usize; 2],
    mutation: u8,
}

fn group_conv_case() -> impl Strategy<Value = GroupConvCase> {
    let padding = prop_oneof![
        2 => [0usize..3, 0..3].prop_map(Conv2dPadding::Explicit),
        2 => Just(Conv2dPadding::Same),
        1 => Just(Conv2dPadding::Valid),
        1 => Just(Conv2dPadding::Explicit([BIG, 0])),
    ];
    (
        (
            spec_with(Just(vec![]), dtype()),
            partner(),
            prop::option::weighted(0.6, partner()),
        ),
        prop_oneof![8 => 1usize..=4, 1 => Just(0usize), 1 => Just(usize::MAX)],
        [
            extent(2),
            extent(2),
            extent(2),
            extent(5),
            extent(5),
            extent(3),
            extent(3),
        ],
        [
            prop_oneof![12 => Just(1usize), 3 => Just(2usize), 1 => Just(0usize)],
            prop_oneof![12 => Just(1usize), 3 => Just(2usize), 1 => Just(0usize)],
        ],
        padding,
        [hyper(1), hyper(1)],
        [0usize..2, 0..2],
        0u8..16,
    )
        .prop_map(
            |((x, w, bias), groups, size, stride, padding, dilation, output_padding, mutation)| {
                let w = paired(&x, w);
                let bias = bias.map(|b| paired(&x, b));
                GroupConvCase {
                    x,
                    w,
                    bias,
                    groups,
                    size,
                    stride,
                    padding,
                    dilation,
                    output_padding,
                    mutation,
                }
            },
        )
}

fn grouped_convolutions(case: GroupConvCase) -> CaseResult {
    let [n, c, o, h, wd, kh, kw] = case.size;
    // Channels are multiples of the groups (of 1 when groups is 0 or huge).
    let g = if case.groups <= 4 {
        case.groups.max(1)
    } else {
        1
    };
    let (mut cin, mut cout) = (g * c, g * o);
    let (mut w_in, mut t_in) = (c, g * c);
    match case.mutation {
        // A channel count that is no multiple of the groups (or does not match).
        0 => cin += 1,
        1 => cout += 1,
        2 => w_in += 1,
        3 => t_in += 1,
        _ => {}
    }
    let x = build(&Spec {
        dims: vec![n, cin, h, wd],
        ..case.x.clone()
    })?;
    let w = build(&Spec {
        dims: vec![cout, w_in, kh, kw],
        ..case.w.clone()
    })?;
    let t = build(&Spec {
        dims: vec![if case.mutation == 3 { t_in } else { cin }, o, kh, kw],
        ..case.w.clone()
    })?;
    let bias_len = cout + usize::from(case.mutation == 4);
    let bias = match &case.bias {
        Some(spec) => Some(build(&Spec {
            dims: vec![bias_len],
            ..spec.clone()
        })?),
        None => None,
    };
    let extreme = case.dilation.iter().any(|&d| d >= BIG)
        || matches!(case.padding, Conv2dPadding::Explicit(p) if p.contains(&BIG));
    let maybe_v = if extreme { V::Maybe } else { V::Valid };
    let bias_dims = bias.as_ref().map(|b| b.dims());

    let params = Conv2dParams {
        stride: case.stride,
        padding: case.padding,
        dilation: case.dilation,
        groups: case.groups,
    };
    let mut operands = vec![&x, &w];
    operands.extend(bias.as_ref());
    let v = operands_v(&operands).and(maybe_v);
    let shape = conv2d_shape(x.dims(), w.dims(), bias_dims, params);
    check(
        "conv2d (groups, padding)",
        Expect::new(shape, v),
        &operands,
        || x.conv2d(&w, bias.as_ref(), params),
    )?;

    // The transposed op takes the explicit padding pair (none for the others).
    let padding = match case.padding {
        Conv2dPadding::Explicit(p) => p,
        _ => [0, 0],
    };
    let params = ConvTranspose2dParams {
        stride: case.stride,
        padding,
        output_padding: case.output_padding,
        dilation: case.dilation,
        groups: case.groups,
    };
    // conv_transpose2d's bias has Cout = groups·(weight dim 1) entries.
    let bias = match &case.bias {
        Some(spec) => Some(build(&Spec {
            dims: vec![g * o + usize::from(case.mutation == 4)],
            ..spec.clone()
        })?),
        None => None,
    };
    let mut operands = vec![&x, &t];
    operands.extend(bias.as_ref());
    let v = operands_v(&operands).and(maybe_v);
    let shape = conv_transpose2d_shape(x.dims(), t.dims(), bias.as_ref().map(|b| b.dims()), params);
    check(
        "conv_transpose2d (groups)",
        Expect::new(shape, v),
        &operands,
        || x.conv_transpose2d(&t, bias.as_ref(), params),
    )?;
    Ok(())
}

// ----- normalisation -----------------------------------------------------

#[derive(Clone, Debug)]
struct NormCase {
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

fn norm_case() -> impl Strategy<Value = NormCase> {
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
fn normalized_shape(dims: &[usize], count: usize, kind: u8) -> Vec<usize> {
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

fn normalisations(case: NormCase) -> CaseResult {
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
    let v = V::from(fits && case.eps.is_finite() && case.eps >= 0.0)
        .and(if x.dtype().is_half() {
            V::Maybe
        } else {
            operands_v(&operands)
        })
        .and(device_v(&operands))
        .and(V::from(x.dtype() != DType::U32));
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
    let v = V::from(fits && case.eps.is_finite() && case.eps >= 0.0)
        .and(if x.dtype().is_half() {
            V::Maybe
        } else {
            operands_v(&operands)
        })
        .and(device_v(&operands))
        .and(V::from(x.dtype() != DType::U32));
    check(
        "layer_norm_over",
        Expect::new(Some(dims.clone()), v),
        &operands,
        || x.layer_norm_over(&shape, weight.as_ref(), bias.as_ref(), case.eps),
    )?;
    Ok(())
}

// ----- attention, indexing, losses -----------------------------------------

#[derive(Clone, Debug)]
struct AttentionCase {
    q: Spec,
    k: Partner,
    v: Partner,
    n_head: usize,
    autocast: Option<DType>,
}

fn attention_case() -> impl Strategy<Value = AttentionCase> {
    (
        spec(2..=5),
        partner(),
        partner(),
        0usize..4,
        autocast_choice(),
    )
        .prop_map(|(mut q, k, v, n_head, autocast)| {
            if q.seed % 4 != 0 {
                q.dims.resize(4, 2);
            }
            AttentionCase {
                q,
                k,
                v,
                n_head,
                autocast,
            }
        })
}

fn attention(case: AttentionCase) -> CaseResult {
    let q = build(&case.q)?;
    // Mostly q's shape: attention takes no broadcasting.
    let like_q = |(spec, relation, seed, dtype, device): Partner| {
        let relation = if (3..=5).contains(&relation) {
            0
        } else {
            relation
        };
        paired(&case.q, (spec, relation, seed, dtype, device))
    };
    let k = build(&like_q(case.k.clone()))?;
    let v = build(&like_q(case.v.clone()))?;
    let _autocast = case.autocast.map(kiln::autocast);
    let cast_v = if case.autocast.is_some() {
        V::Maybe
    } else {
        V::Valid
    };
    let fits = q.rank() == 4 && k.dims() == q.dims() && v.dims() == q.dims() && q.dims()[3] > 0;
    let operands = [&q, &k, &v];
    check(
        "causal_attention",
        Expect::new(
            fits.then(|| q.dims().to_vec()),
            cast_operands_v(&operands, case.autocast),
        ),
        &operands,
        || Tensor::causal_attention(&q, &k, &v),
    )?;

    // Packed qkv [B, T, 3E], E = n_head·D from q [B, n_head, T, D] (or
    // whatever q's dims give).
    let n_head = case.n_head;
    let qkv_dims = match q.dims() {
        &[b, h, t, d] if !case.q.seed.is_multiple_of(5) => vec![b, t, 3 * h * d],
        dims => dims.to_vec(),
    };
    let n_head = if !case.q.seed.is_multiple_of(5) {
        q.dims().get(1).copied().unwrap_or(n_head)
    } else {
        n_head
    };
    let qkv = build(&Spec {
        dims: qkv_dims,
        ..case.q.clone()
    })?;
    let shape = match qkv.dims() {
        &[b, t, width]
            if n_head > 0 && width > 0 && width % 3 == 0 && (width / 3) % n_head == 0 =>
        {
            Some(vec![b, t, width / 3])
        }
        _ => None,
    };
    check(
        "causal_self_attention",
        Expect::new(shape, float_v(&qkv).and(cast_v)),
        &[&qkv],
        || qkv.causal_self_attention(n_head),
    )?;
    Ok(())
}

/// PyTorch's `F.scaled_dot_product_attention`: q [..., L, E], k [..., S, E],
/// v [..., S, Ev] with broadcasting batch dims, a float or boolean mask,
/// is_causal, an explicit scale and dropout on the weights.
#[derive(Clone, Debug)]
struct SdpaCase {
    q: Spec,
    k: Partner,
    v: Partner,
    mask: Option<Partner>,
    /// [L, S, E, Ev]
    size: [usize; 4],
    mutation: u8,
    mask_kind: u8,
    is_causal: bool,
    scale: Option<f64>,
    dropout: Option<f64>,
}

fn sdpa_case() -> impl Strategy<Value = SdpaCase> {
    (
        spec(2..=5),
        partner(),
        partner(),
        prop::option::weighted(0.5, partner()),
        [extent(4), extent(4), extent(3), extent(3)],
        0u8..16,
        0u8..8,
        prop::bool::weighted(0.3),
        prop::option::weighted(0.3, scalar()),
        prop::option::weighted(
            0.2,
            prop_oneof![3 => Just(0.0f64), 3 => 0.0..1.0f64, 1 => Just(1.0), 1 => scalar()],
        ),
    )
        .prop_map(
            |(q, k, v, mask, size, mutation, mask_kind, is_causal, scale, dropout)| SdpaCase {
                q,
                k,
                v,
                mask,
                size,
                mutation,
                mask_kind,
                is_causal,
                scale,
                dropout,
            },
        )
}

fn sdpa(case: SdpaCase) -> CaseResult {
    let [l, s, e, ev] = case.size;
    // q's batch dims (0 to 3 of them), and k's and v's related to them.
    let batch = case.q.dims[..case.q.dims.len() - 2].to_vec();
    let batch_of = |(spec, relation, seed, same_dtype, same_device): &Partner| {
        // Mostly broadcastable: a mismatched batch (relations 6, 7) one time in three.
        let relation = if *relation >= 6 && seed % 3 != 0 {
            0
        } else {
            *relation
        };
        let dims = related(&batch, &spec.dims, relation, *seed);
        // Relation 7 draws dims of any rank: keep at most 3 as batch dims.
        let dims = dims[..dims.len().min(3)].to_vec();
        Spec {
            dims,
            dtype: if *same_dtype {
                case.q.dtype
            } else {
                spec.dtype
            },
            cuda: if *same_device { case.q.cuda } else { spec.cuda },
            ..spec.clone()
        }
    };
    let with_tail = |mut spec: Spec, tail: &[usize]| {
        spec.dims.extend(tail);
        spec
    };
    let m = case.mutation;
    let q = build(&with_tail(
        Spec {
            dims: batch.clone(),
            ..case.q.clone()
        },
        &[l, e],
    ))?;
    let k_tail: &[usize] = match m {
        0 => &[s, e + 1],
        1 => &[e],
        _ => &[s, e],
    };
    let k = build(&with_tail(batch_of(&case.k), k_tail))?;
    let v_tail: &[usize] = match m {
        2 => &[s + 1, ev],
        _ => &[s, ev],
    };
    let v = build(&with_tail(batch_of(&case.v), v_tail))?;
    // The oracle reads the sizes off the operands as built.
    let ranks_fit = k.rank() >= 2 && v.rank() >= 2;
    let last2 = |t: &Tensor| {
        let d = t.dims();
        (
            d[..d.len().max(2) - 2].to_vec(),
            d[d.len().max(2) - 2],
            d[d.len() - 1],
        )
    };
    let (q_batch, _, _) = last2(&q);
    let weights = ranks_fit
        .then(|| {
            let ((k_batch, key_len, key_dim), (v_batch, value_len, _)) = (last2(&k), last2(&v));
            let joint = broadcast(&q_batch, &k_batch)?;
            broadcast(&joint, &v_batch)?;
            (key_dim == e && value_len == key_len).then(|| {
                let mut w = joint;
                w.extend([l, key_len]);
                w
            })
        })
        .flatten();
    let out_shape = weights.as_ref().map(|w| {
        let (v_batch, _, value_dim) = last2(&v);
        let mut out = broadcast(&w[..w.len() - 2], &v_batch).expect("checked above");
        out.extend([l, value_dim]);
        out
    });
    // One float dtype for q, k and v (no promotion) and one device.
    let same_dtype = [&k, &v].iter().all(|t| t.dtype() == q.dtype());
    let qkv_v = device_v(&[&q, &k, &v])
        .and(V::from(same_dtype))
        .and(float_v(&q));

    // The mask: the weights' shape, a broadcast partner of it, [L, S] or
    // something else; a float one mostly of q's dtype, a boolean one u32.
    let mask = match &case.mask {
        None => None,
        Some((spec, relation, seed, same_dtype, same_device)) => {
            let w = weights.clone().unwrap_or_else(|| vec![l, s]);
            let s = w[w.len() - 1];
            let dims = match case.mask_kind {
                0 => vec![l, s],
                1 => vec![s],
                2 => {
                    // A batch dim beyond the weights'.
                    let mut d = vec![2];
                    d.extend(&w);
                    d
                }
                _ => related(&w, &spec.dims, *relation, *seed),
            };
            let boolean = seed % 3 == 0;
            let dtype = match (boolean, *same_dtype) {
                (true, true) => DType::U32,
                (false, true) => case.q.dtype,
                _ => spec.dtype,
            };
            let spec = Spec {
                dims,
                dtype,
                cuda: if *same_device { case.q.cuda } else { spec.cuda },
                ..spec.clone()
            };
            let t = build_indices(&spec, 2)?;
            let fits = t.rank() >= 2
                && weights
                    .as_ref()
                    .is_some_and(|w| broadcast(w, t.dims()).as_ref() == Some(w));
            let kind_v = if boolean {
                V::from(t.dtype() == DType::U32)
            } else {
                V::from(t.dtype() == q.dtype())
            };
            let mask_v = kind_v
                .and(V::from(fits))
                .and(V::from(t.device() == q.device()));
            Some((
                if boolean {
                    AttentionMask::Bool(t.clone())
                } else {
                    AttentionMask::Float(t.clone())
                },
                t,
                mask_v,
            ))
        }
    };
    let options_v = V::from(
        !(case.is_causal && mask.is_some())
            && case.scale.is_none_or(f64::is_finite)
            && case.dropout.is_none_or(|p| (0.0..=1.0).contains(&p)),
    );
    let options = AttentionOptions {
        mask: mask.as_ref().map(|(m, _, _)| m.clone()),
        is_causal: case.is_causal,
        scale: case.scale,
        dropout: case.dropout.map(|p| AttentionDropout {
            p,
            seed: case.q.seed,
        }),
    };
    let mut leaves = vec![&q, &k, &v];
    let mut v_all = qkv_v.and(options_v);
    if let Some((_, t, mask_v)) = &mask {
        leaves.push(t);
        v_all = v_all.and(*mask_v);
    }
    check(
        "scaled_dot_product_attention",
        Expect::new(out_shape, v_all),
        &leaves,
        || Tensor::scaled_dot_product_attention(&q, &k, &v, &options),
    )?;
    Ok(())
}

#[derive(Clone, Debug)]
struct LossCase {
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

fn loss_case() -> impl Strategy<Value = LossCase> {
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

fn losses(case: LossCase) -> CaseResult {
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

// ----- nn layers -------------------------------------------------------------

#[derive(Clone, Debug)]
struct LayerCase {
    sizes: [usize; 4],
    n_head: usize,
    init_dtype: DType,
    init_cuda: bool,
    input: Spec,
    fit: u8,
    training: bool,
    p: f64,
    eps: f64,
    momentum: f64,
    seed: u64,
    config: LayerConfig,
}

/// The options of the layers' other constructors.
#[derive(Clone, Debug)]
struct LayerConfig {
    /// Conv2d / ConvTranspose2d channel groups.
    groups: usize,
    /// Conv2d's padding: 0 "same", 1 "valid", otherwise explicit.
    padding: u8,
    /// BatchNorm2d's affine and track_running_stats, and momentum None
    /// (a cumulative average) when `cumulative`.
    affine: bool,
    track: bool,
    cumulative: bool,
    /// LayerNorm's normalized_shape [2, a] (as `normalized_shape` changes it).
    ns_kind: u8,
    /// Embedding's padding_idx: as `LossOptions::padding`, less `None`.
    padding_idx: u8,
}

fn layer_config() -> impl Strategy<Value = LayerConfig> {
    (
        prop_oneof![3 => Just(1usize), 3 => 2usize..=3, 1 => Just(0usize)],
        0u8..4,
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.3),
        0u8..8,
        1u8..8,
    )
        .prop_map(
            |(groups, padding, affine, track, cumulative, ns_kind, padding_idx)| LayerConfig {
                groups,
                padding,
                affine,
                track,
                cumulative,
                ns_kind,
                padding_idx,
            },
        )
}

fn layer_case() -> impl Strategy<Value = LayerCase> {
    (
        [0usize..5, 0..5, 0..4, 0..4],
        0usize..3,
        prop_oneof![8 => Just(DType::F32), 1 => Just(DType::F64), 1 => Just(DType::BF16), 1 => Just(DType::U32)],
        prop::bool::weighted(0.3),
        spec(0..=4),
        0u8..8,
        any::<bool>(),
        prop_oneof![4 => 0.0..0.9f64, 1 => scalar()],
        prop_oneof![4 => Just(1e-5f64), 1 => scalar()],
        prop_oneof![4 => 0.0..1.0f64, 1 => scalar()],
        any::<u64>(),
        layer_config(),
    )
        .prop_map(
            |(
                sizes,
                n_head,
                init_dtype,
                init_cuda,
                input,
                fit,
                training,
                p,
                eps,
                momentum,
                seed,
                config,
            )| {
                LayerCase {
                    sizes,
                    n_head,
                    init_dtype,
                    init_cuda,
                    input,
                    fit,
                    training,
                    p,
                    eps,
                    momentum,
                    seed,
                    config,
                }
            },
        )
}

/// Runs `module` on `x` (with backward) and checks its state dict.
fn run_module(
    label: &'static str,
    module: &dyn Module,
    x: &Tensor,
    expect: Expect,
    training: bool,
) -> CaseResult {
    if training {
        module.train();
    } else {
        module.eval();
    }
    let parameters = module.parameters();
    let mut leaves: Vec<&Tensor> = parameters.iter().collect();
    leaves.push(x);
    check(label, expect, &leaves, || module.forward(x))?;
    let state = module.state_dict();
    prop_assert_eq!(
        module.num_parameters(),
        parameters.iter().map(Tensor::numel).sum::<usize>()
    );
    let loaded: std::collections::HashMap<String, Tensor> = state.into_iter().collect();
    probe("load_state_dict", V::Valid, || {
        module.load_state_dict(&loaded)
    })?;
    Ok(())
}

/// The input for a layer: `dims` (fitting the layer) unless `fit` is 0
/// (x as drawn) or 1 (its last dim one too large); in the layer's dtype
/// and device when `fit` > 3.
fn layer_input(case: &LayerCase, dims: Vec<usize>) -> Result<Tensor, TestCaseError> {
    let dims = match case.fit {
        0 => case.input.dims.clone(),
        1 => {
            let mut wrong = dims;
            if let Some(last) = wrong.last_mut() {
                *last += 1;
            }
            wrong
        }
        _ => dims,
    };
    let layer_typed = case.fit > 3;
    build(&Spec {
        dims,
        dtype: if layer_typed {
            case.init_dtype
        } else {
            case.input.dtype
        },
        cuda: if layer_typed {
            case.init_cuda
        } else {
            case.input.cuda
        },
        ..case.input.clone()
    })
}

fn layers(case: LayerCase) -> CaseResult {
    let [a, b, k0, k1] = case.sizes;
    let device = if case.init_cuda && cuda_present() {
        CASE_ON_CUDA.store(true, Ordering::Relaxed);
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let mut rng = Rng::seed(case.seed);
    let mut init = Init::new(&mut rng, device, case.init_dtype);
    let init_v = V::from(case.init_dtype.is_float()).and(if device == Device::Cpu {
        V::Valid
    } else {
        V::Maybe
    });
    // A forward is certainly valid for fitting f32 (or CPU f64) input beside
    // parameters of its dtype and device, certainly invalid for a u32 input
    // or one that does not fit, and otherwise up to dtype support.
    let forward_v = |x: &Tensor, fits: bool| {
        let same = x.dtype() == case.init_dtype && x.device() == device;
        if !fits || x.dtype() == DType::U32 {
            V::Invalid
        } else if same && float_v(x) == V::Valid && !x.dtype().is_half() {
            V::Valid
        } else {
            V::Maybe
        }
    };
    let n = 1 + case.seed as usize % 3;
    let training = case.training;

    // Linear
    let linear = probe("Linear::new", init_v, || {
        Linear::new(a, b, training, &mut init)
    })?;
    if let Some(layer) = &linear {
        let x = layer_input(&case, vec![n, a])?;
        let fits = x.dims().last() == Some(&a);
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = b;
        }
        let expect = Expect::new(fits.then_some(shape), forward_v(&x, fits));
        run_module("Linear", layer, &x, expect, training)?;
    }

    // Conv2d and ConvTranspose2d, kernel (k0, k1).
    let sizes_v = V::from(a > 0 && b > 0 && k0 > 0 && k1 > 0).and(init_v);
    let params = Conv2dParams {
        stride: [1 + case.seed as usize % 2, 1],
        padding: [k0 / 2, k1 / 2].into(),
        ..Conv2dParams::default()
    };
    let conv = probe("Conv2d::new", sizes_v, || {
        Conv2d::new(a, b, [k0, k1], params, !training, &mut init)
    })?;
    if let Some(layer) = &conv {
        let x = layer_input(&case, vec![n, a, 4, 3])?;
        let shape = conv2d_shape(x.dims(), layer.weight.dims(), None, params);
        let v = forward_v(&x, shape.is_some());
        run_module("Conv2d", layer, &x, Expect::new(shape, v), training)?;
    }
    let transpose_params = ConvTranspose2dParams {
        stride: [2, 1],
        padding: [0, 0],
        output_padding: [case.seed as usize % 2, 0],
        ..ConvTranspose2dParams::default()
    };
    let transpose = probe("ConvTranspose2d::new", sizes_v, || {
        ConvTranspose2d::new(a, b, [k0, k1], transpose_params, true, &mut init)
    })?;
    if let Some(layer) = &transpose {
        let x = layer_input(&case, vec![n, a, 3, 2])?;
        let shape = conv_transpose2d_shape(x.dims(), layer.weight.dims(), None, transpose_params);
        let v = forward_v(&x, shape.is_some());
        run_module(
            "ConvTranspose2d",
            layer,
            &x,
            Expect::new(shape, v),
            training,
        )?;
    }

    // BatchNorm2d with its options.
    let options_v =
        V::from((0.0..=1.0).contains(&case.momentum) && case.eps > 0.0 && case.eps.is_finite());
    let norm = probe("BatchNorm2d::new", V::from(a > 0).and(init_v), || {
        BatchNorm2d::new(a, &mut init)
    })?;
    let norm = match norm {
        Some(layer) => probe("BatchNorm2d::with_options", options_v, || {
            layer.with_options(case.momentum, case.eps)
        })?,
        None => None,
    };
    if let Some(layer) = &norm {
        let x = layer_input(&case, vec![n, a, 2, 1])?;
        let d = x.dims();
        let fits = d.len() == 4 && d[1] == a && (!training || d[0] * d[2] * d[3] > 1);
        // Its running statistics and parameters are in the init dtype.
        let stats_v = if case.init_dtype == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        };
        let expect = Expect::new(Some(d.to_vec()), forward_v(&x, fits).and(stats_v));
        run_module("BatchNorm2d", layer, &x, expect, training)?;
    }

    // LayerNorm over a last dim of a, with any eps.
    let eps = case.eps.abs();
    let layer_norm = probe("LayerNorm::new", V::from(a > 0).and(init_v), || {
        Ok(LayerNorm::new(a, &mut init)?.with_eps(eps))
    })?;
    if let Some(layer) = &layer_norm {
        let x = layer_input(&case, vec![n, 2, a])?;
        let fits = x.dims().last() == Some(&a) && eps.is_finite();
        let expect = Expect::new(Some(x.dims().to_vec()), forward_v(&x, fits));
        run_module("LayerNorm", layer, &x, expect, training)?;
    }

    // Embedding: a vocabulary of a, rows of b.
    let embedding = probe(
        "Embedding::new",
        V::from(a > 0 && b > 0).and(init_v),
        || Embedding::new(a, b, &mut init),
    )?;
    if let Some(layer) = &embedding {
        let ids_spec = Spec {
            dtype: if case.fit == 0 {
                case.input.dtype
            } else {
                DType::U32
            },
            cuda: if case.fit == 2 {
                case.input.cuda
            } else {
                case.init_cuda
            },
            ..case.input.clone()
        };
        let ids = build_indices(&ids_spec, a as u32 + u32::from(case.fit == 1))?;
        let in_range =
            ids.dtype() == DType::U32 && ids.to_f64_vec().iter().all(|&i| (i as usize) < a);
        let mut shape = ids.dims().to_vec();
        shape.push(b);
        let weight_v = if case.init_dtype == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        };
        let v = V::from(in_range)
            .and(device_v(&[&ids, &layer.weight]))
            .and(weight_v);
        run_module(
            "Embedding",
            layer,
            &ids,
            Expect::new(Some(shape), v),
            training,
        )?;
    }

    // Conv2d and ConvTranspose2d with groups (channels a·g in, b·g out) and
    // conv2d's padding "same" / "valid".
    let config = &case.config;
    let g = config.groups;
    let (cin, cout) = (a * g.max(1), b * g.max(1));
    // An odd channel count with groups 2 or 3 now and then.
    let cin = cin + usize::from(case.seed.is_multiple_of(7));
    let groups_v = V::from(g > 0 && cin % g.max(1) == 0 && cout % g.max(1) == 0);
    let sizes_v = V::from(cin > 0 && cout > 0 && k0 > 0 && k1 > 0)
        .and(groups_v)
        .and(init_v);
    let params = Conv2dParams {
        // Stride 2 now and then: "same" refuses it.
        stride: [1 + usize::from(case.seed.is_multiple_of(5)), 1],
        padding: match config.padding {
            0 => Conv2dPadding::Same,
            1 => Conv2dPadding::Valid,
            _ => [k0 / 2, k1 / 2].into(),
        },
        groups: g,
        ..Conv2dParams::default()
    };
    let grouped_conv = probe("Conv2d::new (groups)", sizes_v, || {
        Conv2d::new(cin, cout, [k0, k1], params, training, &mut init)
    })?;
    if let Some(layer) = &grouped_conv {
        prop_assert_eq!(layer.weight.dims(), &[cout, cin / g, k0, k1][..]);
        let x = layer_input(&case, vec![n, cin, 4, 3])?;
        let shape = conv2d_shape(x.dims(), layer.weight.dims(), None, params);
        let v = forward_v(&x, shape.is_some());
        run_module(
            "Conv2d (groups)",
            layer,
            &x,
            Expect::new(shape, v),
            training,
        )?;
    }
    let transpose_params = ConvTranspose2dParams {
        stride: [1 + case.seed as usize % 2, 2],
        output_padding: [0, 1],
        groups: g,
        ..ConvTranspose2dParams::default()
    };
    let grouped_transpose = probe("ConvTranspose2d::new (groups)", sizes_v, || {
        ConvTranspose2d::new(cin, cout, [k0, k1], transpose_params, !training, &mut init)
    })?;
    if let Some(layer) = &grouped_transpose {
        prop_assert_eq!(layer.weight.dims(), &[cin, cout / g, k0, k1][..]);
        let x = layer_input(&case, vec![n, cin, 2, 3])?;
        let shape = conv_transpose2d_shape(x.dims(), layer.weight.dims(), None, transpose_params);
        let v = forward_v(&x, shape.is_some());
        run_module(
            "ConvTranspose2d (groups)",
            layer,
            &x,
            Expect::new(shape, v),
            training,
        )?;
    }

    // BatchNorm2d::with_config: affine, track_running_stats, momentum None.
    let options = BatchNorm2dOptions {
        eps: case.eps,
        momentum: (!config.cumulative).then_some(case.momentum),
        affine: config.affine,
        track_running_stats: config.track,
    };
    let config_v = V::from(
        a > 0
            && options.momentum.is_none_or(|m| (0.0..=1.0).contains(&m))
            && case.eps > 0.0
            && case.eps.is_finite(),
    );
    // The affine parameters need a float dtype; running statistics alone
    // are buffers of any dtype (as PyTorch's); without either it makes no
    // tensor, so the init's dtype and device do not matter.
    let made_v = if config.affine {
        init_v
    } else if config.track && device != Device::Cpu {
        V::Maybe
    } else {
        V::Valid
    };
    let configured_norm = probe("BatchNorm2d::with_config", config_v.and(made_v), || {
        BatchNorm2d::with_config(a, options, &mut init)
    })?;
    if let Some(layer) = &configured_norm {
        prop_assert_eq!(layer.weight.is_some(), config.affine);
        prop_assert_eq!(layer.running_mean.is_some(), config.track);
        prop_assert_eq!(layer.parameters().len(), if config.affine { 2 } else { 0 });
        let x = layer_input(&case, vec![n, a, 2, 1])?;
        let d = x.dims();
        // Batch statistics in training, and in eval too without running ones.
        let batch_stats = training || !config.track;
        // With neither parameters nor running statistics nothing ties x to
        // `a` channels (PyTorch checks only the rank then).
        let channels_fit = d.len() == 4 && (d[1] == a || !(config.affine || config.track));
        let fits = channels_fit && (!batch_stats || d[0] * d[2] * d[3] > 1);
        let stats_v = if case.init_dtype == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        };
        let expect = Expect::new(Some(d.to_vec()), forward_v(&x, fits).and(stats_v));
        run_module("BatchNorm2d (config)", layer, &x, expect, training)?;
    }

    // LayerNorm::with_normalized_shape over the trailing [2, a] (or changed).
    let shape = normalized_shape(&[n, 2, a], 2, config.ns_kind);
    let shape_v = V::from(!shape.is_empty() && !shape.contains(&0));
    let shaped_norm = probe(
        "LayerNorm::with_normalized_shape",
        shape_v.and(init_v),
        || Ok(LayerNorm::with_normalized_shape(&shape, &mut init)?.with_eps(eps)),
    )?;
    if let Some(layer) = &shaped_norm {
        prop_assert_eq!(layer.normalized_shape(), &shape[..]);
        prop_assert_eq!(layer.weight.dims(), &shape[..]);
        let mut dims = vec![n];
        dims.extend(&shape);
        let x = layer_input(&case, dims)?;
        let fits = x.dims().ends_with(&shape) && eps.is_finite();
        let expect = Expect::new(Some(x.dims().to_vec()), forward_v(&x, fits));
        run_module("LayerNorm (normalized_shape)", layer, &x, expect, training)?;
    }

    // Embedding::with_padding_idx: the padding row starts at zero.
    let vocab = a as isize;
    let padding_idx = match config.padding_idx {
        1 => 0,
        2 => -1,
        3 => vocab - 1,
        4 => vocab,
        5 => -vocab,
        6 => -vocab - 1,
        _ => isize::MIN,
    };
    let padding_v = V::from(a > 0 && b > 0 && -vocab <= padding_idx && padding_idx < vocab);
    let padded_embedding = probe("Embedding::with_padding_idx", padding_v.and(init_v), || {
        Embedding::with_padding_idx(a, b, padding_idx, &mut init)
    })?;
    if let Some(layer) = &padded_embedding {
        let row = if padding_idx < 0 {
            (vocab + padding_idx) as usize
        } else {
            padding_idx as usize
        };
        prop_assert_eq!(layer.padding_idx, Some(row));
        let values = layer.weight.to_f64_vec();
        prop_assert!(values[row * b..(row + 1) * b].iter().all(|&v| v == 0.0));
        let ids = build_indices(
            &Spec {
                dtype: if case.fit == 0 {
                    case.input.dtype
                } else {
                    DType::U32
                },
                cuda: case.init_cuda,
                ..case.input.clone()
            },
            a as u32 + u32::from(case.fit == 1),
        )?;
        let in_range =
            ids.dtype() == DType::U32 && ids.to_f64_vec().iter().all(|&i| (i as usize) < a);
        let mut shape = ids.dims().to_vec();
        shape.push(b);
        let weight_v = if case.init_dtype == DType::F32 {
            V::Valid
        } else {
            V::Maybe
        };
        let v = V::from(in_range)
            .and(device_v(&[&ids, &layer.weight]))
            .and(weight_v);
        run_module(
            "Embedding (padding_idx)",
            layer,
            &ids,
            Expect::new(Some(shape), v),
            training,
        )?;
    }

    // CausalSelfAttention: E = a·n_head.
    let embd = a * case.n_head.max(1);
    let new_v = V::from(case.n_head > 0 && (0.0..1.0).contains(&case.p)).and(init_v);
    let attention = probe("CausalSelfAttention::new", new_v, || {
        CausalSelfAttention::new(embd, case.n_head, case.p, case.seed, &mut init)
    })?;
    if let Some(layer) = &attention {
        let x = layer_input(&case, vec![n, 1 + k0, embd])?;
        let fits = x.rank() == 3 && x.dims()[2] == embd;
        // E = 0 leaves no heads to split.
        let v = forward_v(&x, fits).and(if embd == 0 { V::Maybe } else { V::Valid });
        let expect = Expect::new(Some(x.dims().to_vec()), v);
        run_module("CausalSelfAttention", layer, &x, expect, training)?;
        // Generation: x as the prompt, then its first position once more.
        let mut cache = KvCache::default();
        let prompt = probe("CausalSelfAttention::forward_cached", v, || {
            kiln::no_grad_scope(|| layer.forward_cached(&x, &mut cache))
        })?;
        if let Some(prompt) = prompt {
            prop_assert_eq!(prompt.dims(), x.dims());
            prop_assert_eq!(cache.len(), x.dims()[1]);
            let step = valid("narrow", || x.narrow(1, 0, x.dims()[1].min(1)))?;
            let stepped = probe("CausalSelfAttention::forward_cached", v, || {
                kiln::no_grad_scope(|| layer.forward_cached(&step, &mut cache))
            })?;
            if stepped.is_some() {
                prop_assert_eq!(cache.len(), x.dims()[1] + step.dims()[1]);
            }
        }
    }

    // Dropout and the stateless modules, alone and in a Sequential.
    let dropout = probe(
        "Dropout::new",
        V::from((0.0..1.0).contains(&case.p)),
        || Dropout::new(case.p, case.seed),
    )?;
    let x = build(&case.input)?;
    let same = Some(x.dims().to_vec());
    if let Some(layer) = &dropout {
        // In eval mode, or with p = 0, dropout is the identity on any tensor.
        let v = if training && case.p > 0.0 {
            float_v(&x)
        } else {
            V::Valid
        };
        run_module("Dropout", layer, &x, Expect::new(same.clone(), v), training)?;
    }
    let slope = case.eps;
    let stateless: [(&'static str, Box<dyn Module>, V); 5] = [
        ("Relu", Box::new(Relu), V::Valid),
        (
            "LeakyRelu",
            Box::new(LeakyRelu(slope)),
            V::from(slope.is_finite()),
        ),
        ("Tanh", Box::new(Tanh), V::Valid),
        ("Sigmoid", Box::new(Sigmoid), V::Valid),
        ("Gelu", Box::new(Gelu(GeluApproximation::Tanh)), V::Valid),
    ];
    for (label, module, v) in stateless {
        let expect = Expect::new(same.clone(), v.and(float_v(&x)));
        run_module(label, module.as_ref(), &x, expect, training)?;
    }
    let flattened = if x.rank() > 1 {
        vec![x.dims()[0], x.dims()[1..].iter().product()]
    } else {
        x.dims().to_vec()
    };
    run_module(
        "Flatten",
        &Flatten,
        &x,
        Expect::new(Some(flattened), V::Valid),
        training,
    )?;
    let mut sequential = Sequential::new().with(Flatten).with(Relu);
    if let Some(layer) = linear {
        sequential.push(layer);
    }
    sequential.push(Gelu(GeluApproximation::None));
    run_module("Sequential", &sequential, &x, Expect::any(), training)?;

    // A state dict loaded into a layer of other sizes.
    if let (Some(source), Some(target)) = (&conv, &transpose) {
        let (from, to) = (source.state_dict(), target.state_dict());
        let same_shapes = from.len() == to.len()
            && from
                .iter()
                .zip(&to)
                .all(|((f, s), (t, d))| f == t && s.dims() == d.dims());
        let loaded: std::collections::HashMap<String, Tensor> = from.into_iter().collect();
        probe("load_state_dict", V::from(same_shapes), || {
            target.load_state_dict(&loaded)
        })?;
    }
    Ok(())
}

// ----- the suite -------------------------------------------------------------

/// Runs `property` on `cases` inputs drawn from `strategy`; a failure is
/// shrunk, saved to tests/proptest-regressions/fuzz_ops.txt and returned.
fn run_property<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> CaseResult,
) -> Option<String>
where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases,
        max_shrink_iters: 512,
        rng_seed: RngSeed::Fixed(0x6b69_6c6e),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/fuzz_ops.txt",
        ))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |case| {
        CASE_ON_CUDA.store(false, Ordering::Relaxed);
        property(case)
    });
    println!(
        "{name}: {cases} cases in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    match result {
        Ok(()) => None,
        Err(TestError::Fail(reason, input)) => {
            Some(format!("{name}: {reason}\n    minimal input: {input:?}"))
        }
        Err(TestError::Abort(reason)) => Some(format!("{name}: aborted: {reason}")),
    }
}

#[test]
fn every_public_op_returns_ok_or_a_named_error_and_never_panics() {
    install_panic_hook();
    if cuda_present() {
        println!("cuda:0 is present: operands are also placed on it and mixed with CPU ones");
    } else {
        println!(
            "skipped: mixed-device cases (no CUDA device; run with KILN_CUDA=emulate to include them)"
        );
    }
    let failures: Vec<String> = [
        run_property("elementwise", 2048, elementwise_case(), elementwise),
        run_property("reductions", 3072, reduce_case(), reductions),
        run_property("shapes", 2048, shape_case(), shapes),
        run_property("construction", 3072, construct_case(), construction),
        run_property("matmuls", 3072, matmul_case(), matmuls),
        run_property("convolutions", 3072, conv_case(), convolutions),
        run_property("normalisations", 3072, norm_case(), normalisations),
        run_property("attention", 2048, attention_case(), attention),
        run_property("sdpa", 1536, sdpa_case(), sdpa),
        run_property(
            "grouped convolutions",
            1536,
            group_conv_case(),
            grouped_convolutions,
        ),
        run_property("losses", 3072, loss_case(), losses),
        run_property("layers", 1536, layer_case(), layers),
    ]
    .into_iter()
    .flatten()
    .collect();
    print_table();
    println!(
        "tensors placed on cuda:0: {}",
        CUDA_TENSORS.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} properties failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
