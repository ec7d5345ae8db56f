use kiln::Tensor;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

pub(crate) type CaseResult = Result<(), TestCaseError>;

// ----- tallies -----------------------------------------------------------

/// Outcomes of one op's calls, and of backward through its results.
#[derive(Clone, Copy, Default)]
pub(crate) struct Tally {
    pub(crate) calls: u64,
    /// Calls in cases that placed an operand on `cuda:0`.
    pub(crate) cuda_calls: u64,
    pub(crate) ok: u64,
    pub(crate) err: u64,
    pub(crate) panics: u64,
    pub(crate) backward_ok: u64,
    pub(crate) backward_err: u64,
    pub(crate) backward_panics: u64,
}

impl Tally {
    pub(crate) fn columns(&self) -> [u64; 8] {
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
pub(crate) static TALLIES: Mutex<Vec<(&'static str, Tally)>> = Mutex::new(Vec::new());

/// Tensors the harness placed on `cuda:0`.
pub(crate) static CUDA_TENSORS: AtomicUsize = AtomicUsize::new(0);

/// Whether the current case placed an operand on `cuda:0`.
pub(crate) static CASE_ON_CUDA: AtomicBool = AtomicBool::new(false);

pub(crate) fn record(label: &'static str, update: impl FnOnce(&mut Tally)) {
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

pub(crate) fn print_table() {
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
pub(crate) fn cuda_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| kiln::cuda::device_count() > 0)
}

// ----- expectations ------------------------------------------------------

/// What the arguments of a call entitle it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum V {
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
    pub(crate) fn and(self, other: V) -> V {
        self.max(other)
    }

    pub(crate) fn from(valid: bool) -> V {
        if valid { V::Valid } else { V::Invalid }
    }
}

/// The validity of a call and, when it succeeds, the shape it must return.
#[derive(Clone, Debug)]
pub(crate) struct Expect {
    pub(crate) v: V,
    pub(crate) shape: Option<Vec<usize>>,
}

impl Expect {
    /// `shape` is None when the shapes do not fit the op (the call must fail).
    pub(crate) fn new(shape: Option<Vec<usize>>, v: V) -> Self {
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
    pub(crate) fn any() -> Self {
        Expect {
            v: V::Maybe,
            shape: None,
        }
    }
}

/// The prefixes (besides the op's own name) an error may carry: composite
/// ops report the inner op that found the problem.
pub(crate) fn inner_names(label: &str) -> &'static [&'static str] {
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

pub(crate) fn names_op(label: &str, message: &str) -> bool {
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
pub(crate) static PANIC_LOCATION: Mutex<Option<String>> = Mutex::new(None);

/// Whether a probe is running: its panics are caught and reported.
pub(crate) static PROBING: AtomicBool = AtomicBool::new(false);

/// Inside a probe, records a panic's location instead of printing it: the
/// failure report names it, and shrinking does not flood the output. Other
/// panics (the verdict's) print as usual.
pub(crate) fn install_panic_hook() {
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

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
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
pub(crate) fn probe<T>(
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
pub(crate) fn valid<T>(
    label: &'static str,
    f: impl FnOnce() -> kiln::Result<T>,
) -> Result<T, TestCaseError> {
    probe(label, V::Valid, f)?.ok_or_else(|| TestCaseError::fail(format!("{label} failed")))
}

/// `probe` for an op returning a tensor: checks the shape, then backward
/// through the output when it requires grad.
pub(crate) fn check(
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
pub(crate) fn check_backward(label: &'static str, out: &Tensor, leaves: &[&Tensor]) -> CaseResult {
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
