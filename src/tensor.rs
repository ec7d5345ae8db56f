//! `Tensor`: a cheap-to-clone handle (an `Arc`) to contiguous row-major
//! storage, its shape, dtype and device, and — when it came from an op on
//! tensors that need gradients — the op's node in the autodiff graph.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal, StandardUniform};
use rayon::prelude::*;

use crate::autograd::{self, Backward, Node};
use crate::error::{Error, Result};
use crate::storage::{CpuStorage, Element, Float, Storage, host_vec};

/// Element type of a tensor. `f32` is the working dtype everywhere, `f64`
/// exists on the CPU for gradcheck, `u32` holds indices. `f16`/`bf16` are
/// reserved for mixed precision: no op computes in them yet, and each says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    U32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }

    /// bf16 or f16: a storage dtype that ops compute in f32.
    pub fn is_half(self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        };
        f.write_str(name)
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl Device {
    /// The CUDA device `ordinal`, checked: an error (not a panic) that says
    /// so when there is no CUDA driver or no such device.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        crate::cuda::device(ordinal)?;
        Ok(Device::Cuda(ordinal))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The extent of each dimension, outermost first.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar of rank 0).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Number of elements, or None when the product of the non-zero dims
    /// overflows usize: no tensor of that shape could exist, while for a
    /// shape that passes every partial product (a stride, an outer count)
    /// fits as well.
    pub fn checked_numel(&self) -> Option<usize> {
        let nonzero = self
            .0
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |n, &d| n.checked_mul(d))?;
        Some(if self.0.contains(&0) { 0 } else { nonzero })
    }

    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.0[i + 1];
        }
        strides
    }

    /// Splits the shape around `dim` into (product before, size of dim, product after).
    pub fn split_at_dim(&self, dim: usize) -> (usize, usize, usize) {
        let outer = self.0[..dim].iter().product();
        let inner = self.0[dim + 1..].iter().product();
        (outer, self.0[dim], inner)
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}

impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}

impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(Vec::new())
    }
}

/// A tensor's identity: the key of its gradient in a `GradStore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Seeded random generator for `randn`, `rand` and initialisers: kiln has no
/// hidden global RNG, so every random tensor says where its randomness came from.
pub struct Rng(StdRng);

impl Rng {
    pub fn seed(seed: u64) -> Self {
        Rng(StdRng::seed_from_u64(seed))
    }

    /// A fresh 64-bit seed (for dropout masks, which are counter-based).
    pub fn next_u64(&mut self) -> u64 {
        rand::Rng::next_u64(&mut self.0)
    }

    pub(crate) fn inner(&mut self) -> &mut StdRng {
        &mut self.0
    }
}

/// An n-dimensional array; cloning is cheap (it shares the storage).
#[derive(Clone)]
pub struct Tensor(Arc<TensorInner>);

/// A tensor's values, shared by its handles (`detach`, `requires_grad_`)
/// and its views (`reshape`).
pub(crate) struct SharedStorage {
    values: RwLock<Storage>,
    /// A 16-bit copy of the values that an optimizer wrote beside its update
    /// for autocast's forward to use (see `optim::ForwardCopies`). Any other
    /// write to the values drops it, so it is never stale.
    forward_copy: Mutex<Option<Arc<SharedStorage>>>,
}

impl SharedStorage {
    pub(crate) fn new(values: Storage) -> Arc<Self> {
        Arc::new(SharedStorage {
            values: RwLock::new(values),
            forward_copy: Mutex::new(None),
        })
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Storage> {
        self.values.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The values to write in place; drops the forward copy, which they
    /// will no longer match.
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Storage> {
        self.take_forward_copy();
        self.values.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn take_forward_copy(&self) -> Option<Arc<SharedStorage>> {
        self.forward_copy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

struct TensorInner {
    id: TensorId,
    shape: Shape,
    dtype: DType,
    device: Device,
    /// Shared with `detach()`ed handles; written in place only by optimizers
    /// and running statistics (`Tensor::assign`).
    storage: Arc<SharedStorage>,
    requires_grad: bool,
    /// Set when the tensor came from an op on tensors that require grad.
    node: Option<Arc<Node>>,
    /// A handle kept by a node whose rule reads no values: same id, node and
    /// metadata, an empty storage (see `Backward::reads_input_values`).
    values_released: bool,
}

/// Dropping the last handle to a deep graph would recurse once per op and
/// overflow the stack; instead the graph is taken apart with an explicit stack.
impl Drop for TensorInner {
    fn drop(&mut self) {
        let Some(node) = self.node.take() else { return };
        let mut pending: Vec<Tensor> = match Arc::try_unwrap(node) {
            Ok(node) => node.into_inputs(),
            Err(_) => return,
        };
        while let Some(tensor) = pending.pop() {
            if let Ok(mut inner) = Arc::try_unwrap(tensor.0)
                && let Some(node) = inner.node.take()
                && let Ok(node) = Arc::try_unwrap(node)
            {
                pending.extend(node.into_inputs());
            }
        }
    }
}

impl Tensor {
    // ----- construction -------------------------------------------------

    /// Wraps CPU storage; fails if the element count does not fit the shape.
    pub(crate) fn from_cpu_storage(storage: CpuStorage, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if storage.len() != checked_numel("from_vec", &shape)? {
            return Err(Error::shape(
                "from_vec",
                format!(
                    "{} values cannot fill shape {shape} ({} elements)",
                    storage.len(),
                    shape.numel()
                ),
            ));
        }
        let dtype = storage.dtype();
        Ok(Self::from_storage(
            Storage::Cpu(storage),
            shape,
            dtype,
            Device::Cpu,
            false,
            None,
        ))
    }

    /// Wraps the result of a kernel that no graph needs to see (backward
    /// kernels, optimizer updates). The shape is the kernel's own invariant.
    pub(crate) fn from_cpu(storage: CpuStorage, shape: Shape) -> Self {
        debug_assert_eq!(storage.len(), shape.numel());
        Self::from_result(Storage::Cpu(storage), shape)
    }

    /// Like `from_cpu`, for storage on any device.
    pub(crate) fn from_result(storage: Storage, shape: Shape) -> Self {
        let (dtype, device) = (storage.dtype(), storage.device());
        Self::from_storage(storage, shape, dtype, device, false, None)
    }

    fn from_storage(
        storage: Storage,
        shape: Shape,
        dtype: DType,
        device: Device,
        requires_grad: bool,
        node: Option<Arc<Node>>,
    ) -> Self {
        crate::host_memory::keep_freed_memory();
        Tensor(Arc::new(TensorInner {
            id: TensorId::next(),
            shape,
            dtype,
            device,
            storage: SharedStorage::new(storage),
            requires_grad,
            node,
            values_released: false,
        }))
    }

    /// The result of an op: records `backward` (built lazily, only if needed)
    /// as the output's node when grad mode is on and an input requires grad.
    /// `make_backward` receives a detached handle to the output, for rules
    /// that are cheapest in terms of it (sigmoid, exp, softmax...).
    pub(crate) fn from_op<B: Backward + 'static>(
        storage: Storage,
        shape: Shape,
        inputs: &[&Tensor],
        make_backward: impl FnOnce(&Tensor) -> B,
    ) -> Self {
        Self::from_op_shared(SharedStorage::new(storage), shape, inputs, make_backward)
    }

    /// Like `from_op`, for outputs that share the storage of an input
    /// (`reshape`: contiguous data needs no copy to change shape).
    pub(crate) fn from_op_shared<B: Backward + 'static>(
        storage: Arc<SharedStorage>,
        shape: Shape,
        inputs: &[&Tensor],
        make_backward: impl FnOnce(&Tensor) -> B,
    ) -> Self {
        let (dtype, device) = {
            let s = storage.read();
            (s.dtype(), s.device())
        };
        let out = Tensor(Arc::new(TensorInner {
            id: TensorId::next(),
            shape,
            dtype,
            device,
            storage,
            requires_grad: false,
            node: None,
            values_released: false,
        }));
        let tracked = autograd::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad());
        if !tracked {
            return out;
        }
        let backward = make_backward(&out.detach());
        let reads_values = backward.reads_input_values();
        let inputs = inputs
            .iter()
            .map(|&t| {
                if reads_values {
                    t.clone()
                } else {
                    t.without_values()
                }
            })
            .collect();
        Tensor(Arc::new(TensorInner {
            id: out.0.id,
            shape: out.0.shape.clone(),
            dtype,
            device,
            storage: out.0.storage.clone(),
            requires_grad: true,
            node: Some(Arc::new(Node::new(Arc::new(backward), inputs))),
            values_released: false,
        }))
    }

    /// This tensor (same id, node, shape, dtype, device) without its values,
    /// for a node whose rule reads none: holding it keeps no memory alive.
    fn without_values(&self) -> Tensor {
        let empty = CpuStorage::from_f64_vec(Vec::new(), self.dtype());
        Tensor(Arc::new(TensorInner {
            id: self.0.id,
            shape: self.0.shape.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            storage: SharedStorage::new(Storage::Cpu(empty)),
            requires_grad: self.0.requires_grad,
            node: self.0.node.clone(),
            values_released: true,
        }))
    }

    pub(crate) fn shared_storage(&self) -> Arc<SharedStorage> {
        self.0.storage.clone()
    }

    /// A CPU tensor from values; `values.len()` must equal the shape's element count.
    pub fn from_vec<T: Element>(values: Vec<T>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_cpu_storage(T::wrap(values), shape)
    }

    /// A CPU tensor of indices (token ids, class targets).
    pub fn from_indices(values: Vec<u32>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_cpu_storage(CpuStorage::U32(values), shape)
    }

    /// A rank-0 tensor holding one value.
    pub fn scalar<T: Float>(value: T) -> Self {
        Self::from_cpu_storage(T::wrap(vec![value]), ()).expect("one value fills a scalar")
    }

    /// A tensor filled with `value`.
    pub fn full(value: f64, shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        Self::filled("full", value, shape.into(), dtype, device)
    }

    /// `full` under the name of the constructor the caller used.
    fn filled(
        op: &'static str,
        value: f64,
        shape: Shape,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let numel = checked_numel(op, &shape)?;
        let storage = CpuStorage::try_filled(op, value, numel, dtype)?;
        Self::from_cpu_storage(storage, shape)?.to_device(device)
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        checked_numel("zeros", &shape)?;
        match device {
            // Zeros are a memset on the device: no host buffer, no copy.
            Device::Cuda(ordinal) if matches!(dtype, DType::F32 | DType::U32) => {
                let cuda = crate::cuda::device(ordinal)?;
                let storage = crate::cuda::CudaStorage::zeros(&cuda, dtype, shape.numel())?;
                Ok(Self::from_result(Storage::Cuda(storage), shape))
            }
            _ => Self::filled("zeros", 0.0, shape, dtype, device),
        }
    }

    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        Self::filled("ones", 1.0, shape.into(), dtype, device)
    }

    /// Zeros with the shape, dtype and device of `self`.
    pub fn zeros_like(&self) -> Result<Self> {
        Self::zeros(self.shape().clone(), self.dtype(), self.device())
    }

    /// `[start, start + step, ...]` up to but excluding `end` (as PyTorch's `arange`).
    pub fn arange(start: f64, end: f64, step: f64, dtype: DType, device: Device) -> Result<Self> {
        let finite = start.is_finite() && end.is_finite() && step.is_finite();
        if !finite || step == 0.0 || (end - start) / step < 0.0 {
            return Err(Error::invalid(
                "arange",
                format!("cannot go from {start} to {end} in steps of {step}"),
            ));
        }
        let steps = ((end - start) / step).ceil();
        // The values are made as f64 first: beyond isize::MAX bytes of them
        // no allocation can succeed.
        if steps > (isize::MAX as usize / std::mem::size_of::<f64>()) as f64 {
            return Err(Error::invalid(
                "arange",
                format!("{start} to {end} in steps of {step} is {steps} values, too many to hold"),
            ));
        }
        let n = steps as usize;
        let values = (0..n).map(|i| start + i as f64 * step).collect();
        let storage = CpuStorage::from_f64_vec(values, dtype);
        Self::from_cpu_storage(storage, [n])?.to_device(device)
    }

    /// Standard normal samples N(0, 1) drawn from `rng`.
    pub fn randn(
        shape: impl Into<Shape>,
        dtype: DType,
        device: Device,
        rng: &mut Rng,
    ) -> Result<Self> {
        let shape = shape.into();
        if !dtype.is_float() {
            return Err(Error::unsupported_dtype("randn", dtype));
        }
        let numel = checked_numel("randn", &shape)?;
        let mut values = host_vec("randn", numel)?;
        values.extend((0..numel).map(|_| -> f64 { StandardNormal.sample(rng.inner()) }));
        let storage = CpuStorage::from_f64_vec(values, dtype);
        Self::from_cpu_storage(storage, shape)?.to_device(device)
    }

    /// Uniform samples in [low, high) drawn from `rng`.
    pub fn rand(
        low: f64,
        high: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: Device,
        rng: &mut Rng,
    ) -> Result<Self> {
        if low.is_nan() || high.is_nan() || low >= high {
            return Err(Error::invalid(
                "rand",
                format!("empty range [{low}, {high})"),
            ));
        }
        let shape = shape.into();
        if !dtype.is_float() {
            return Err(Error::unsupported_dtype("rand", dtype));
        }
        let numel = checked_numel("rand", &shape)?;
        let mut values = host_vec("rand", numel)?;
        values.extend((0..numel).map(|_| {
            let u: f64 = StandardUniform.sample(rng.inner());
            low + (high - low) * u
        }));
        let storage = CpuStorage::from_f64_vec(values, dtype);
        Self::from_cpu_storage(storage, shape)?.to_device(device)
    }

    // ----- properties ---------------------------------------------------

    pub fn id(&self) -> TensorId {
        self.0.id
    }

    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.0.shape.dims()
    }

    pub fn rank(&self) -> usize {
        self.0.shape.rank()
    }

    pub fn numel(&self) -> usize {
        self.0.shape.numel()
    }

    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    pub fn device(&self) -> Device {
        self.0.device
    }

    /// The device address of a CUDA tensor's data (None on the CPU), for
    /// handing kiln's memory to another library such as cuBLAS in the
    /// benchmarks. Valid while the tensor lives; work on it must be queued on
    /// the device's stream (`kiln::cuda::device(i)?.stream()`) to stay ordered
    /// with kiln's kernels.
    pub fn cuda_ptr(&self) -> Option<u64> {
        match &*self.storage() {
            Storage::Cuda(storage) => Some(storage.ptr()),
            Storage::Cpu(_) => None,
        }
    }

    /// True for leaves marked with `requires_grad()` and for op outputs that depend on one.
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }

    /// True if the tensor was not produced by a tracked op.
    pub fn is_leaf(&self) -> bool {
        self.0.node.is_none()
    }

    pub(crate) fn node(&self) -> Option<&Node> {
        self.0.node.as_deref()
    }

    /// The size of dimension `dim`, or an error naming `op` if out of range.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        self.dims().get(dim).copied().ok_or_else(|| {
            Error::invalid(
                "dim",
                format!("dim {dim} out of range for shape {}", self.shape()),
            )
        })
    }

    /// True when nothing but this handle can see the tensor's buffer: no
    /// other handle, no view or `detach()`ed copy of the storage, no op's
    /// output and no gradient wanted, so a running sum may be added into it.
    fn is_private_sum(&self) -> bool {
        Arc::strong_count(&self.0) == 1
            && Arc::strong_count(&self.0.storage) == 1
            && self.0.node.is_none()
            && !self.0.requires_grad
    }

    /// Adds `other` into this tensor's own buffer when nothing else can see
    /// it: this is the only handle, the storage is not shared with a view or
    /// a `detach()`ed copy, the tensor is no op's output and needs no
    /// gradient, and both are CPU float tensors of one shape and dtype.
    /// Returns false, changing nothing, otherwise. Gradient accumulation uses
    /// it to skip a new buffer per extra use of a tensor; the sum is the same
    /// `a + b` per element as `add`'s, so results are bit-identical.
    pub(crate) fn try_add_in_place(&self, other: &Tensor) -> bool {
        let unshared = self.is_private_sum();
        if !unshared || self.shape() != other.shape() || self.dtype() != other.dtype() {
            return false;
        }
        fn add_into<T: Float>(sum: &mut [T], addend: &[T]) {
            const CHUNK: usize = 1 << 15;
            sum.par_chunks_mut(CHUNK)
                .zip(addend.par_chunks(CHUNK))
                .for_each(|(s, a)| {
                    s.iter_mut()
                        .zip(a)
                        .for_each(|(s, a)| *s = std::ops::Add::add(*s, *a))
                });
        }
        let mut sum = self.storage_mut();
        let addend = other.storage();
        match (&mut *sum, &*addend) {
            (Storage::Cpu(CpuStorage::F32(s)), Storage::Cpu(CpuStorage::F32(a))) => add_into(s, a),
            (Storage::Cpu(CpuStorage::F64(s)), Storage::Cpu(CpuStorage::F64(a))) => add_into(s, a),
            _ => return false,
        }
        true
    }

    /// Adds `slice` into the region of this tensor's own buffer that
    /// `self.narrow(dim, start, len)` would read (len = slice's size along
    /// dim), under the same conditions as [`Tensor::try_add_in_place`] and
    /// with every other dim equal. Returns false, changing nothing, otherwise.
    /// Elements outside the region keep their values, as adding the zeros of
    /// a padded gradient would (up to the sign of a zero).
    pub(crate) fn try_add_slice_in_place(&self, slice: &Tensor, dim: usize, start: usize) -> bool {
        let unshared = self.is_private_sum();
        let (dims, part) = (self.dims(), slice.dims());
        let fits = dims.len() == part.len()
            && dim < dims.len()
            && start + part[dim] <= dims[dim]
            && (0..dims.len()).all(|d| d == dim || dims[d] == part[d]);
        if !unshared || !fits || self.dtype() != slice.dtype() {
            return false;
        }
        // Row-major: `outer` blocks, each a run of dims[dim]·inner elements
        // of which part[dim]·inner (from start·inner on) belong to the slice.
        let inner: usize = dims[dim + 1..].iter().product();
        let (row, run) = (dims[dim] * inner, part[dim] * inner);
        fn add_into<T: Float>(sum: &mut [T], addend: &[T], row: usize, run: usize, offset: usize) {
            if run == 0 {
                return;
            }
            sum.par_chunks_mut(row)
                .zip(addend.par_chunks(run))
                .with_min_len((1 << 15) / run + 1)
                .for_each(|(s, a)| {
                    s[offset..offset + run]
                        .iter_mut()
                        .zip(a)
                        .for_each(|(s, a)| *s = std::ops::Add::add(*s, *a))
                });
        }
        let mut sum = self.storage_mut();
        let addend = slice.storage();
        let offset = start * inner;
        match (&mut *sum, &*addend) {
            (Storage::Cpu(CpuStorage::F32(s)), Storage::Cpu(CpuStorage::F32(a))) => {
                add_into(s, a, row, run, offset)
            }
            (Storage::Cpu(CpuStorage::F64(s)), Storage::Cpu(CpuStorage::F64(a))) => {
                add_into(s, a, row, run, offset)
            }
            _ => return false,
        }
        true
    }

    pub(crate) fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        assert!(
            !self.0.values_released,
            "a backward rule read the values of an input it declared it does not read \
             (Backward::reads_input_values)"
        );
        self.0.storage.read()
    }

    pub(crate) fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write()
    }

    /// Hands `copy` (the values rounded to a 16-bit dtype) to autocast's
    /// forward, until the values are next written.
    pub(crate) fn set_forward_copy(&self, copy: Arc<SharedStorage>) {
        *self
            .0
            .storage
            .forward_copy
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(copy);
    }

    /// The 16-bit copy of this parameter that its optimizer wrote at its
    /// last update for autocast's forward (see `optim::ForwardCopies`), as
    /// a tensor outside the graph; `None` if there is none (no copies kept,
    /// no update yet, or the values were written since).
    pub fn forward_copy(&self) -> Option<Tensor> {
        let copy = self
            .0
            .storage
            .forward_copy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let dtype = copy.read().dtype();
        Some(Tensor(Arc::new(TensorInner {
            id: TensorId::next(),
            shape: self.0.shape.clone(),
            dtype,
            device: self.0.device,
            storage: copy,
            requires_grad: false,
            node: None,
            values_released: false,
        })))
    }

    /// The forward copy's storage, if there is one in `dtype`.
    pub(crate) fn forward_copy_storage(&self, dtype: DType) -> Option<Arc<SharedStorage>> {
        let slot = self
            .0
            .storage
            .forward_copy
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .filter(|copy| copy.read().dtype() == dtype)
            .cloned()
    }

    /// Runs `f` on the CPU storage: the CPU branch of every op goes through
    /// here, after the op has dispatched on the device.
    pub(crate) fn with_cpu<R>(&self, f: impl FnOnce(&CpuStorage) -> R) -> R {
        match &*self.storage() {
            Storage::Cpu(s) => f(s),
            Storage::Cuda(_) => panic!(
                "internal error: a CPU kernel was called on a CUDA tensor of shape {}",
                self.shape()
            ),
        }
    }

    /// The values on the host (a copy from the device for CUDA tensors).
    pub(crate) fn host_storage(&self) -> Result<CpuStorage> {
        self.storage().to_cpu()
    }

    // ----- autodiff handles --------------------------------------------

    /// A new leaf sharing this tensor's data that requires grad (a parameter).
    pub fn requires_grad_(self) -> Self {
        self.leaf_with(true)
    }

    /// A new leaf sharing this tensor's data, cut from the graph.
    pub fn detach(&self) -> Self {
        self.leaf_with(false)
    }

    fn leaf_with(&self, requires_grad: bool) -> Self {
        Tensor(Arc::new(TensorInner {
            id: TensorId::next(),
            shape: self.0.shape.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            storage: self.0.storage.clone(),
            requires_grad,
            node: None,
            values_released: false,
        }))
    }

    /// Overwrites this tensor's values in place with those of `src` (same
    /// shape, dtype, device). Used by optimizers and running statistics;
    /// every handle sharing the storage sees the change.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.shape() != self.shape() {
            return Err(Error::shape_mismatch("assign", self.shape(), src.shape()));
        }
        if src.dtype() != self.dtype() {
            return Err(Error::dtype_mismatch("assign", self.dtype(), src.dtype()));
        }
        if src.device() != self.device() {
            return Err(Error::DeviceMismatch {
                op: "assign",
                lhs: self.device(),
                rhs: src.device(),
            });
        }
        if Arc::ptr_eq(&self.0.storage, &src.0.storage) {
            return Ok(());
        }
        let new_values = src.storage().try_clone()?;
        *self.storage_mut() = new_values;
        Ok(())
    }

    // ----- conversion ---------------------------------------------------

    /// A copy on `device` (a cheap clone if already there). Differentiable:
    /// the gradient travels back to the source device.
    pub fn to_device(&self, device: Device) -> Result<Self> {
        if device == self.device() {
            return Ok(self.clone());
        }
        check_cuda_dtype("to_device", self.dtype(), device)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(self.host_storage()?),
            Device::Cuda(ordinal) => {
                let cuda = crate::cuda::device(ordinal)?;
                let host = self.host_storage()?;
                Storage::Cuda(crate::cuda::CudaStorage::from_cpu(&cuda, &host)?)
            }
        };
        let source = self.device();
        Ok(Tensor::from_op(
            storage,
            self.shape().clone(),
            &[self],
            |_| ToDeviceBackward { source },
        ))
    }

    /// A copy converted to `dtype`, rounding to nearest even (NaN and ±∞
    /// kept). Differentiable between float dtypes: the gradient is converted
    /// back to this tensor's dtype. 16-bit tensors (`F16`, `BF16`) are
    /// storage: ops compute in f32 or f64, so convert before computing.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        check_cuda_dtype("to_dtype", dtype, self.device())?;
        let _profile = crate::profile::op("to_dtype", self.device());
        if dtype == DType::U32 {
            self.check_fits_u32()?;
        }
        // f32 <-> 16-bit converts on the device; other pairs go through the host.
        let on_device = match &*self.storage() {
            Storage::Cuda(s) => crate::ops::shape::cuda::convert(s, dtype).transpose()?,
            Storage::Cpu(_) => None,
        };
        let storage = match (on_device, self.device()) {
            (Some(converted), _) => Storage::Cuda(converted),
            (None, Device::Cpu) => Storage::Cpu(self.host_storage()?.converted(dtype)),
            (None, Device::Cuda(ordinal)) => Storage::Cuda(crate::cuda::CudaStorage::from_cpu(
                &crate::cuda::device(ordinal)?,
                &self.host_storage()?.converted(dtype),
            )?),
        };
        let source = self.dtype();
        if !(source.is_float() && dtype.is_float()) {
            return Ok(Tensor::from_result(storage, self.shape().clone()));
        }
        Ok(Tensor::from_op(
            storage,
            self.shape().clone(),
            &[self],
            |_| ToDtypeBackward { source },
        ))
    }

    /// Float values become u32 by truncation toward zero, so each must lie
    /// in (−1, 2³²). Outside, PyTorch's conversion wraps or gives an
    /// unspecified value; kiln names the first such value instead.
    fn check_fits_u32(&self) -> Result<()> {
        if !self.dtype().is_float() {
            return Ok(());
        }
        let values = self.host_storage()?.to_f64_vec();
        let limit = 2f64.powi(32);
        match values.iter().position(|&v| !(v > -1.0 && v < limit)) {
            None => Ok(()),
            Some(index) => Err(Error::invalid(
                "to_dtype",
                format!(
                    "value {} at flat index {index} of shape {} cannot be held by u32 (truncated \
                     toward zero it must lie in 0..2^32; PyTorch would wrap it or give an \
                     unspecified value); clamp the values or pick valid indices first",
                    values[index],
                    self.shape()
                ),
            )),
        }
    }

    /// `to_dtype(dtype)` for autocast's forward: a parameter whose optimizer
    /// keeps a copy in `dtype` (see `optim::ForwardCopies`) gives that copy,
    /// with no conversion; the gradient flows to the parameter as through
    /// `to_dtype`.
    pub(crate) fn to_dtype_for_forward(&self, dtype: DType) -> Result<Self> {
        let source = self.dtype();
        match self.forward_copy_storage(dtype) {
            Some(copy) if source.is_float() && dtype != source => Ok(Tensor::from_op_shared(
                copy,
                self.shape().clone(),
                &[self],
                |_| ToDtypeBackward { source },
            )),
            _ => self.to_dtype(dtype),
        }
    }

    /// All values, in row-major order, as `T` (an error if the dtype differs).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let host = self.host_storage()?;
        T::slice(&host)
            .map(|v| v.to_vec())
            .ok_or_else(|| Error::DType {
                op: "to_vec",
                msg: format!("tensor has dtype {}, asked for {}", host.dtype(), T::DTYPE),
            })
    }

    /// All values converted to f64 (any dtype, any device).
    ///
    /// # Panics
    /// If copying from a CUDA device fails (a driver fault, not bad input).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self.host_storage() {
            Ok(host) => host.to_f64_vec(),
            Err(e) => panic!("to_f64_vec: {e}"),
        }
    }

    /// Index values of a u32 tensor.
    pub fn to_indices(&self) -> Result<Vec<u32>> {
        match self.host_storage()? {
            CpuStorage::U32(v) => Ok(v),
            other => Err(Error::DType {
                op: "to_indices",
                msg: format!("tensor has dtype {}, expected u32", other.dtype()),
            }),
        }
    }

    /// The single value of a one-element tensor, as f64.
    pub fn item(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "item",
                format!(
                    "item() needs exactly one element, tensor has shape {}",
                    self.shape()
                ),
            ));
        }
        Ok(self.to_f64_vec()[0])
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor(shape={}, dtype={}, device={}, requires_grad={}",
            self.shape(),
            self.dtype(),
            self.device(),
            self.requires_grad()
        )?;
        if let Some(node) = self.node() {
            write!(f, ", grad_fn={}", node.name())?;
        }
        let values = self.to_f64_vec();
        const SHOWN: usize = 8;
        let head: Vec<String> = values
            .iter()
            .take(SHOWN)
            .map(|v| format!("{v:.4}"))
            .collect();
        let more = if values.len() > SHOWN { ", ..." } else { "" };
        write!(f, ", values=[{}{more}])", head.join(", "))
    }
}

struct ToDtypeBackward {
    source: DType,
}

impl Backward for ToDtypeBackward {
    fn name(&self) -> &'static str {
        "to_dtype"
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx = dL/dy, converted back to x's dtype
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.to_dtype(self.source)?)])
    }
}

struct ToDeviceBackward {
    source: Device,
}

impl Backward for ToDeviceBackward {
    fn name(&self) -> &'static str {
        "to_device"
    }
    // Reads only the gradient: the inputs' values can go.
    fn reads_input_values(&self) -> bool {
        false
    }

    // dL/dx = dL/dy, moved back to x's device
    fn backward(&self, _inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.to_device(self.source)?)])
    }
}

/// No CUDA kernel takes f64, so no f64 tensor is let onto a CUDA device
/// (where every op would refuse it, under its kernel's name).
fn check_cuda_dtype(op: &'static str, dtype: DType, device: Device) -> Result<()> {
    if dtype == DType::F64 && device != Device::Cpu {
        return Err(Error::DType {
            op,
            msg: format!(
                "CUDA tensors hold f32, bf16 or f16 values or u32 indices, not f64 (asked for \
                 {device}); convert with .to_dtype(DType::F32) first"
            ),
        });
    }
    Ok(())
}

/// The element count of a caller's `shape`, or an error naming `op` when
/// its dims cannot be multiplied in a usize (see [`Shape::checked_numel`]).
pub(crate) fn checked_numel(op: &'static str, shape: &Shape) -> Result<usize> {
    shape.checked_numel().ok_or_else(|| {
        Error::shape(
            op,
            format!("shape {shape} has more elements than a usize can count"),
        )
    })
}

/// Checks that every operand shares one device; names the first two that differ.
pub(crate) fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let device = tensors[0].device();
    for t in &tensors[1..] {
        if t.device() != device {
            return Err(Error::DeviceMismatch {
                op,
                lhs: device,
                rhs: t.device(),
            });
        }
    }
    Ok(device)
}

/// The ops whose CUDA kernels take bf16 and f16 tensors.
const CUDA_SIXTEEN_BIT_OPS: &[&str] = &[
    "matmul",
    // conv.cu (conv_transpose2d runs conv2d's backward-data kernel)
    "conv2d",
    "conv_transpose2d",
    // batchnorm.cu: x and y in 16 bits, statistics and parameters in f32
    "batch_norm2d",
    // attention.cu: q, k, v, O and their gradients in 16 bits, P in f32
    "causal_attention",
    // matmul_nt then add on CUDA
    "linear",
    // elementwise.cu
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "exp",
    "log",
    "sqrt",
    "powf",
    "clamp",
    "add_scalar",
    "mul_scalar",
    // dropout.cu
    "dropout",
    // activation.cu
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "gelu_tanh",
];

/// Checks that every operand shares one float dtype.
pub(crate) fn same_float_dtype(op: &'static str, tensors: &[&Tensor]) -> Result<DType> {
    let dtype = tensors[0].dtype();
    // 16-bit tensors reach an op only where it has a path for them: the CPU
    // ones compute in f32 (see `autocast`); on CUDA, the ops of
    // CUDA_SIXTEEN_BIT_OPS have 16-bit kernels.
    let supported = match dtype {
        DType::F32 | DType::F64 => true,
        DType::F16 | DType::BF16 => {
            tensors[0].device() == Device::Cpu || CUDA_SIXTEEN_BIT_OPS.contains(&op)
        }
        DType::U32 => false,
    };
    if !supported {
        return Err(Error::unsupported_dtype(op, dtype));
    }
    for t in &tensors[1..] {
        if t.dtype() != dtype {
            return Err(Error::dtype_mismatch(op, dtype, t.dtype()));
        }
    }
    Ok(dtype)
}

/// Both checks at once, as every op's first line needs.
pub(crate) fn check_operands(op: &'static str, tensors: &[&Tensor]) -> Result<()> {
    same_device(op, tensors)?;
    same_float_dtype(op, tensors)?;
    Ok(())
}
