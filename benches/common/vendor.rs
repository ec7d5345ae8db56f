//! Vendor baselines for the benchmarks: cuBLAS SGEMM and cuDNN convolution
//! and batch norm, run on kiln's own CUDA tensors. They are yardsticks only:
//! the engine (`src/`) never calls them.
//!
//! Precision: everything is f32 with TF32 off, because kiln's kernels compute
//! in plain f32 and a baseline that rounds its inputs to TF32 (10-bit
//! mantissa) would win by computing less precisely, not by better kernels.
//! cuBLAS runs in `CUBLAS_DEFAULT_MATH`, which never lowers f32 below its
//! requested precision. cuDNN runs in `CUDNN_FMA_MATH`: its *default* math
//! type allows TF32 tensor cores on Ampere and later, FMA math does not.
//!
//! Ordering: every call is queued on kiln's stream (`device.stream()`), so it
//! is ordered with kiln's kernels and copies, and one device sync after a
//! timed loop covers both.
//!
//! Failure: a missing library or a failed call is an `Err` naming the call;
//! the bench prints it and goes on without that baseline. cudarc panics when
//! asked for a library that is absent, so each constructor probes first.
//! Wrong shapes or dtypes are bench bugs and panic.

// Each bench uses only some of these baselines.
#![allow(dead_code)]

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys as cublas;
use cudarc::cudnn::sys as cudnn;
use kiln::cuda::CudaDevice;
use kiln::{DType, Device, Rng, Tensor};

/// Why a baseline is unavailable (library not found, or a call failed): the
/// bench prints it and goes on.
pub type VendorResult<T> = std::result::Result<T, String>;

/// Host scalars for the libraries' `alpha`/`beta` arguments.
static ONE: f32 = 1.0;
static ZERO: f32 = 0.0;

/// The largest cuDNN workspace an algorithm may ask for.
const MAX_WORKSPACE_BYTES: usize = 1 << 30;

/// PyTorch's `BatchNorm2d` defaults, which kiln's batch norm follows.
const BN_EPSILON: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

fn cublas_check(call: &str, status: cublas::cublasStatus_t) -> VendorResult<()> {
    match status {
        cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        failure => Err(format!("{call} failed: {failure:?}")),
    }
}

fn cudnn_check(call: &str, status: cudnn::cudnnStatus_t) -> VendorResult<()> {
    match status {
        cudnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS => Ok(()),
        failure => Err(format!("{call} failed: {failure:?}")),
    }
}

/// The stream of a real GPU (the vendor libraries do not run on the emulator).
fn stream(device: &CudaDevice) -> VendorResult<&std::sync::Arc<cudarc::driver::CudaStream>> {
    device
        .stream()
        .ok_or_else(|| format!("{} has no CUDA stream for vendor libraries", device.name()))
}

/// Makes `device`'s context current on this thread: the libraries run on
/// whatever context is current.
fn bind(device: &CudaDevice) -> VendorResult<()> {
    stream(device)?.context().bind_to_thread().map_err(|e| {
        format!(
            "binding the CUDA context of cuda:{}: {e:?}",
            device.ordinal()
        )
    })
}

/// The device address of `t`'s data, asserting it is an f32 tensor on
/// cuda:`ordinal` with `dims`.
fn f32_data(what: &str, t: &Tensor, ordinal: usize, dims: &[usize]) -> *mut c_void {
    device_data(what, t, DType::F32, ordinal, dims)
}

fn device_data(
    what: &str,
    t: &Tensor,
    dtype: DType,
    ordinal: usize,
    dims: &[usize],
) -> *mut c_void {
    assert_eq!(t.dtype(), dtype, "{what}: dtype");
    assert_eq!(t.device(), Device::Cuda(ordinal), "{what}: device");
    assert_eq!(t.dims(), dims, "{what}: shape");
    t.cuda_ptr().expect("a CUDA tensor has a device address") as *mut c_void
}

fn to_c_int(what: &str, value: usize) -> i32 {
    i32::try_from(value).unwrap_or_else(|_| panic!("{what} = {value} does not fit a C int"))
}

// ----- cuBLAS ---------------------------------------------------------------

/// A cuBLAS handle on kiln's stream, for f32 matrix products.
pub struct Cublas {
    device: Arc<CudaDevice>,
    handle: cublas::cublasHandle_t,
}

impl Cublas {
    /// Loads cuBLAS and creates a handle on kiln's stream for `device`.
    pub fn new(device: &Arc<CudaDevice>) -> VendorResult<Self> {
        // SAFETY: only tries to dlopen the library; calls nothing in it.
        if !unsafe { cublas::is_culib_present() } {
            return Err("cuBLAS not found (libcublas.so could not be loaded)".into());
        }
        bind(device)?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer and the device's context is current.
        cublas_check("cublasCreate", unsafe {
            cublas::cublasCreate_v2(&mut handle)
        })?;
        // From here on, Drop destroys the handle whatever fails next.
        let blas = Cublas {
            device: device.clone(),
            handle,
        };
        let stream = stream(device)?.cu_stream() as cublas::cudaStream_t;
        // SAFETY: a live handle and a stream of the current context, which
        // `blas.device` keeps alive as long as the handle.
        cublas_check("cublasSetStream", unsafe {
            cublas::cublasSetStream_v2(handle, stream)
        })?;
        // SAFETY: a live handle.
        cublas_check("cublasSetMathMode", unsafe {
            cublas::cublasSetMathMode(handle, cublas::cublasMath_t::CUBLAS_DEFAULT_MATH)
        })?;
        Ok(blas)
    }

    /// cuBLAS's version number, e.g. 130000 for 13.0.0.
    fn version(&self) -> VendorResult<i32> {
        let mut version = 0;
        // SAFETY: a live handle and a valid out-pointer.
        cublas_check("cublasGetVersion", unsafe {
            cublas::cublasGetVersion_v2(self.handle, &mut version)
        })?;
        Ok(version)
    }

    /// C[b] = op(A[b]) · op(B[b]) for row-major kiln tensors: a [batch, M, K]
    /// (or [batch, K, M] when `trans_a`), b [batch, K, N] (or [batch, N, K]
    /// when `trans_b`), c [batch, M, N]. All three may instead be rank 2 (one
    /// matrix each). Panics on tensors that are not CUDA f32 of matching shapes.
    pub fn sgemm(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        trans_a: bool,
        trans_b: bool,
    ) -> VendorResult<()> {
        let p = self.plan("sgemm", DType::F32, (a, b, c), trans_a, trans_b)?;
        // SAFETY: a live handle on kiln's stream; a, b and c are live device
        // buffers of batch·M·K, batch·K·N and batch·M·N f32 (asserted by
        // `plan`) that stay alive until the queued work is done, because the
        // caller holds them and kiln's allocator reuses memory in stream
        // order; alpha and beta are host scalars (the default pointer mode).
        cublas_check("cublasSgemmStridedBatched", unsafe {
            cublas::cublasSgemmStridedBatched(
                self.handle,
                op(trans_b),
                op(trans_a),
                p.n,
                p.m,
                p.k,
                &ONE,
                p.b as *const f32,
                p.ldb_first,
                p.stride_b,
                p.a as *const f32,
                p.lda_second,
                p.stride_a,
                &ZERO,
                p.c as *mut f32,
                p.n,
                p.stride_c,
                p.batch,
            )
        })
    }

    /// As `sgemm` for bf16 or f16 tensors (one format for a, b and c),
    /// accumulated in f32 (`cublasGemmStridedBatchedEx` with
    /// CUBLAS_COMPUTE_32F): the baseline of kiln's tensor-core rung.
    pub fn gemm_16bit(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        trans_a: bool,
        trans_b: bool,
    ) -> VendorResult<()> {
        let dtype = a.dtype();
        let data_type = match dtype {
            DType::BF16 => cublas::cudaDataType::CUDA_R_16BF,
            DType::F16 => cublas::cudaDataType::CUDA_R_16F,
            other => panic!("gemm_16bit: {other} is not a 16-bit float"),
        };
        let p = self.plan("gemm_16bit", dtype, (a, b, c), trans_a, trans_b)?;
        // SAFETY: as in `sgemm`, for 16-bit buffers of the same element
        // counts; alpha and beta are f32 host scalars, as the f32 compute
        // type requires.
        cublas_check("cublasGemmStridedBatchedEx", unsafe {
            cublas::cublasGemmStridedBatchedEx(
                self.handle,
                op(trans_b),
                op(trans_a),
                p.n,
                p.m,
                p.k,
                &ONE as *const f32 as *const c_void,
                p.b,
                data_type,
                p.ldb_first,
                p.stride_b,
                p.a,
                data_type,
                p.lda_second,
                p.stride_a,
                &ZERO as *const f32 as *const c_void,
                p.c,
                data_type,
                p.n,
                p.stride_c,
                p.batch,
                cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        })
    }

    /// The arguments of one cuBLAS call for row-major kiln tensors a [batch,
    /// M, K] (or [batch, K, M] when `trans_a`), b [batch, K, N] (or [batch,
    /// N, K] when `trans_b`), c [batch, M, N], all of `dtype` (or all rank
    /// 2). Panics on tensors that are not CUDA tensors of matching shapes.
    fn plan(
        &self,
        what: &str,
        dtype: DType,
        (a, b, c): (&Tensor, &Tensor, &Tensor),
        trans_a: bool,
        trans_b: bool,
    ) -> VendorResult<GemmCall> {
        let ordinal = self.device.ordinal();
        assert_eq!(a.rank(), b.rank(), "{what}: ranks of a and b");
        let (batch, a_rows, a_cols) = as_matrices("a", a);
        let (b_batch, b_rows, b_cols) = as_matrices("b", b);
        assert_eq!(batch, b_batch, "{what}: batch sizes of a and b");
        let (m, k) = if trans_a {
            (a_cols, a_rows)
        } else {
            (a_rows, a_cols)
        };
        let (b_k, n) = if trans_b {
            (b_cols, b_rows)
        } else {
            (b_rows, b_cols)
        };
        assert_eq!(k, b_k, "{what}: op(a) is {m}x{k} but op(b) is {b_k}x{n}");
        let c_dims = if a.rank() == 2 {
            vec![m, n]
        } else {
            vec![batch, m, n]
        };
        let call = GemmCall {
            a: device_data(what, a, dtype, ordinal, a.dims()),
            b: device_data(what, b, dtype, ordinal, b.dims()),
            c: device_data(what, c, dtype, ordinal, &c_dims),
            // The row-major trick. cuBLAS is column-major, and a row-major
            // R×C matrix is, byte for byte, its C×R transpose in column-major
            // with leading dimension C (its row length). So cuBLAS sees our
            // C (M×N) as Cᵀ (N×M, ld N), and we ask it for Cᵀ = op(B)ᵀ ·
            // op(A)ᵀ: m' = N, n' = M, k' = K, B first and A second.
            // - First operand, op(B)ᵀ (N×K). b's bytes read column-major are
            //   b_storedᵀ with ld = b's row length: Bᵀ (N×K) when b is [K, N],
            //   so no transpose; B_stored (N×K) transposed when b is [N, K].
            //   Hence transa' = trans_b, lda = b_cols.
            // - Second operand, op(A)ᵀ (K×M): by the same reasoning transb' =
            //   trans_a, ldb = a_cols.
            // - ldc = N; the batch strides are whole matrices.
            // cuBLAS's bounds hold: lda = N ≥ m' untransposed, = K ≥ k'
            // transposed; ldb = K ≥ k' untransposed, = M ≥ n' transposed.
            m: to_c_int("n' (M)", m),
            n: to_c_int("m' (N)", n),
            k: to_c_int("k' (K)", k),
            ldb_first: to_c_int("lda' (row length of b)", b_cols),
            lda_second: to_c_int("ldb' (row length of a)", a_cols),
            stride_a: (m * k) as i64,
            stride_b: (k * n) as i64,
            stride_c: (m * n) as i64,
            batch: to_c_int("batch", batch),
        };
        bind(&self.device)?;
        Ok(call)
    }
}

/// The arguments of one strided-batched cuBLAS GEMM (see `Cublas::plan`).
struct GemmCall {
    a: *mut c_void,
    b: *mut c_void,
    c: *mut c_void,
    m: i32,
    n: i32,
    k: i32,
    ldb_first: i32,
    lda_second: i32,
    stride_a: i64,
    stride_b: i64,
    stride_c: i64,
    batch: i32,
}

fn op(transpose: bool) -> cublas::cublasOperation_t {
    if transpose {
        cublas::cublasOperation_t::CUBLAS_OP_T
    } else {
        cublas::cublasOperation_t::CUBLAS_OP_N
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed only here.
        unsafe { cublas::cublasDestroy_v2(self.handle) };
    }
}

/// (batch, rows, cols) of a rank-2 (batch 1) or rank-3 tensor.
fn as_matrices(what: &str, t: &Tensor) -> (usize, usize, usize) {
    match *t.dims() {
        [rows, cols] => (1, rows, cols),
        [batch, rows, cols] => (batch, rows, cols),
        ref dims => panic!("sgemm: {what} must be rank 2 or 3, got {dims:?}"),
    }
}

// ----- cuDNN handle and descriptors -----------------------------------------

/// A cuDNN handle on kiln's stream.
struct CudnnHandle {
    device: Arc<CudaDevice>,
    raw: cudnn::cudnnHandle_t,
}

impl CudnnHandle {
    /// Loads cuDNN, checks that it exports `symbols` (a cuDNN without them
    /// would make cudarc panic at the first call), and creates a handle on
    /// kiln's stream.
    fn new(device: &Arc<CudaDevice>, symbols: &[&str]) -> VendorResult<Self> {
        // SAFETY: only tries to dlopen the library; calls nothing in it.
        if !unsafe { cudnn::is_culib_present() } {
            return Err("cuDNN not found (libcudnn.so could not be loaded)".into());
        }
        for symbol in symbols {
            // SAFETY: the library is present (probed above); looking a symbol
            // up calls nothing, and the pointer type is never used.
            let found = unsafe { cudnn::culib().get::<unsafe extern "C" fn()>(symbol.as_bytes()) };
            if found.is_err() {
                return Err(format!("this cuDNN does not export {symbol}"));
            }
        }
        bind(device)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and the device's context is current.
        cudnn_check("cudnnCreate", unsafe { cudnn::cudnnCreate(&mut raw) })?;
        // From here on, Drop destroys the handle whatever fails next.
        let handle = CudnnHandle {
            device: device.clone(),
            raw,
        };
        let stream = stream(device)?.cu_stream() as cudnn::cudaStream_t;
        // SAFETY: a live handle and a stream of the current context, which
        // `handle.device` keeps alive as long as the handle.
        cudnn_check("cudnnSetStream", unsafe {
            cudnn::cudnnSetStream(raw, stream)
        })?;
        Ok(handle)
    }

    fn ordinal(&self) -> usize {
        self.device.ordinal()
    }

    fn bind(&self) -> VendorResult<()> {
        bind(&self.device)
    }
}

impl Drop for CudnnHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed only here.
        unsafe { cudnn::cudnnDestroy(self.raw) };
    }
}

/// An f32 NCHW tensor descriptor.
struct TensorDesc(cudnn::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn empty() -> VendorResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer.
        cudnn_check("cudnnCreateTensorDescriptor", unsafe {
            cudnn::cudnnCreateTensorDescriptor(&mut raw)
        })?;
        Ok(TensorDesc(raw))
    }

    fn nchw(dims: [usize; 4]) -> VendorResult<Self> {
        let desc = Self::empty()?;
        let [n, c, h, w] = dims.map(|d| to_c_int("tensor dim", d));
        // SAFETY: a live descriptor.
        cudnn_check("cudnnSetTensor4dDescriptor", unsafe {
            cudnn::cudnnSetTensor4dDescriptor(
                desc.0,
                cudnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                cudnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
                n,
                c,
                h,
                w,
            )
        })?;
        Ok(desc)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created in `empty`, destroyed only here.
        unsafe { cudnn::cudnnDestroyTensorDescriptor(self.0) };
    }
}

/// An f32 filter descriptor [O, C, kh, kw].
struct FilterDesc(cudnn::cudnnFilterDescriptor_t);

impl FilterDesc {
    fn new(dims: [usize; 4]) -> VendorResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer.
        cudnn_check("cudnnCreateFilterDescriptor", unsafe {
            cudnn::cudnnCreateFilterDescriptor(&mut raw)
        })?;
        let desc = FilterDesc(raw);
        let [o, c, kh, kw] = dims.map(|d| to_c_int("filter dim", d));
        // SAFETY: a live descriptor. Note the argument order: data type
        // before format here, the reverse of cudnnSetTensor4dDescriptor.
        cudnn_check("cudnnSetFilter4dDescriptor", unsafe {
            cudnn::cudnnSetFilter4dDescriptor(
                raw,
                cudnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
                cudnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                o,
                c,
                kh,
                kw,
            )
        })?;
        Ok(desc)
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        unsafe { cudnn::cudnnDestroyFilterDescriptor(self.0) };
    }
}

/// A 2-D cross-correlation descriptor (what PyTorch and kiln call
/// convolution), f32 compute, FMA math (no TF32).
struct ConvDesc(cudnn::cudnnConvolutionDescriptor_t);

impl ConvDesc {
    fn new(stride: [usize; 2], padding: [usize; 2], dilation: [usize; 2]) -> VendorResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer.
        cudnn_check("cudnnCreateConvolutionDescriptor", unsafe {
            cudnn::cudnnCreateConvolutionDescriptor(&mut raw)
        })?;
        let desc = ConvDesc(raw);
        let [stride_h, stride_w] = stride.map(|s| to_c_int("stride", s));
        let [pad_h, pad_w] = padding.map(|p| to_c_int("padding", p));
        let [dilation_h, dilation_w] = dilation.map(|d| to_c_int("dilation", d));
        // SAFETY: a live descriptor.
        cudnn_check("cudnnSetConvolution2dDescriptor", unsafe {
            cudnn::cudnnSetConvolution2dDescriptor(
                raw,
                pad_h,
                pad_w,
                stride_h,
                stride_w,
                dilation_h,
                dilation_w,
                cudnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                cudnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
        })?;
        // SAFETY: a live descriptor.
        cudnn_check("cudnnSetConvolutionMathType", unsafe {
            cudnn::cudnnSetConvolutionMathType(raw, cudnn::cudnnMathType_t::CUDNN_FMA_MATH)
        })?;
        Ok(desc)
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        unsafe { cudnn::cudnnDestroyConvolutionDescriptor(self.0) };
    }
}

/// The first (fastest: cuDNN sorts by time) of `results` that ran, used FMA
/// math and fits `MAX_WORKSPACE_BYTES`; `fields` reads (status, math type,
/// workspace bytes) from one result.
fn fastest_usable<P: Copy>(
    call: &str,
    results: &[P],
    fields: impl Fn(&P) -> (cudnn::cudnnStatus_t, cudnn::cudnnMathType_t, usize),
) -> VendorResult<P> {
    results
        .iter()
        .copied()
        .find(|result| {
            let (status, math, bytes) = fields(result);
            status == cudnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && math == cudnn::cudnnMathType_t::CUDNN_FMA_MATH
                && bytes <= MAX_WORKSPACE_BYTES
        })
        .ok_or_else(|| {
            format!(
                "{call}: none of {} algorithms ran with FMA math in {} MiB of workspace",
                results.len(),
                MAX_WORKSPACE_BYTES >> 20
            )
        })
}

/// Room for every algorithm cuDNN has in one direction (8 at most today).
const ALGO_SLOTS: usize = 16;

// ----- cuDNN convolution ----------------------------------------------------

/// One convolution (NCHW f32, cross-correlation as in PyTorch and kiln), with
/// cuDNN's algorithms picked once by timing them all
/// (`cudnnFindConvolution*Algorithm`) and a workspace kept for the fastest.
pub struct CudnnConv {
    handle: CudnnHandle,
    x_desc: TensorDesc,
    w_desc: FilterDesc,
    y_desc: TensorDesc,
    conv_desc: ConvDesc,
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    y_shape: [usize; 4],
    forward_algo: cudnn::cudnnConvolutionFwdAlgo_t,
    backward_data_algo: cudnn::cudnnConvolutionBwdDataAlgo_t,
    backward_filter_algo: cudnn::cudnnConvolutionBwdFilterAlgo_t,
    /// Shared by the three directions: as large as the largest one needs.
    workspace: Option<Tensor>,
    workspace_bytes: usize,
}

impl CudnnConv {
    /// x [N, C, H, W], w [O, C, kh, kw], stride/padding/dilation as [h, w].
    /// The output shape cuDNN computes is checked against PyTorch's formula.
    pub fn new(
        device: &Arc<CudaDevice>,
        x_shape: [usize; 4],
        w_shape: [usize; 4],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
    ) -> VendorResult<Self> {
        let handle = CudnnHandle::new(
            device,
            &[
                "cudnnFindConvolutionForwardAlgorithm",
                "cudnnFindConvolutionBackwardDataAlgorithm",
                "cudnnFindConvolutionBackwardFilterAlgorithm",
                "cudnnConvolutionForward",
                "cudnnConvolutionBackwardData",
                "cudnnConvolutionBackwardFilter",
            ],
        )?;
        assert_eq!(x_shape[1], w_shape[1], "CudnnConv: channels of x and w");
        let x_desc = TensorDesc::nchw(x_shape)?;
        let w_desc = FilterDesc::new(w_shape)?;
        let conv_desc = ConvDesc::new(stride, padding, dilation)?;

        let mut out = [0i32; 4];
        // SAFETY: live descriptors and four valid out-pointers.
        cudnn_check("cudnnGetConvolution2dForwardOutputDim", unsafe {
            cudnn::cudnnGetConvolution2dForwardOutputDim(
                conv_desc.0,
                x_desc.0,
                w_desc.0,
                &mut out[0],
                &mut out[1],
                &mut out[2],
                &mut out[3],
            )
        })?;
        let y_shape = out.map(|d| d as usize);
        let expected = conv_output_shape(x_shape, w_shape, stride, padding, dilation);
        if Some(y_shape) != expected {
            return Err(format!(
                "cuDNN computes output {y_shape:?} for x {x_shape:?}, w {w_shape:?}, \
                 stride {stride:?}, padding {padding:?}, dilation {dilation:?}; expected {expected:?}"
            ));
        }
        let y_desc = TensorDesc::nchw(y_shape)?;

        // cudnnFind* run every algorithm on buffers they allocate themselves
        // and return the results sorted by time.
        handle.bind()?;
        let mut returned = 0;
        // SAFETY: all-zero bytes are a valid perf result (every enum in it has
        // a 0 variant); cuDNN overwrites the first `returned` entries.
        let mut forward: [cudnn::cudnnConvolutionFwdAlgoPerf_t; ALGO_SLOTS] =
            unsafe { std::mem::zeroed() };
        // SAFETY: live handle and descriptors; `forward` has ALGO_SLOTS entries.
        cudnn_check("cudnnFindConvolutionForwardAlgorithm", unsafe {
            cudnn::cudnnFindConvolutionForwardAlgorithm(
                handle.raw,
                x_desc.0,
                w_desc.0,
                conv_desc.0,
                y_desc.0,
                ALGO_SLOTS as i32,
                &mut returned,
                forward.as_mut_ptr(),
            )
        })?;
        let forward = fastest_usable(
            "cudnnFindConvolutionForwardAlgorithm",
            &forward[..returned as usize],
            |p| (p.status, p.mathType, p.memory),
        )?;

        // SAFETY: as for `forward`.
        let mut backward_data: [cudnn::cudnnConvolutionBwdDataAlgoPerf_t; ALGO_SLOTS] =
            unsafe { std::mem::zeroed() };
        // SAFETY: live handle and descriptors; `backward_data` has ALGO_SLOTS entries.
        cudnn_check("cudnnFindConvolutionBackwardDataAlgorithm", unsafe {
            cudnn::cudnnFindConvolutionBackwardDataAlgorithm(
                handle.raw,
                w_desc.0,
                y_desc.0,
                conv_desc.0,
                x_desc.0,
                ALGO_SLOTS as i32,
                &mut returned,
                backward_data.as_mut_ptr(),
            )
        })?;
        let backward_data = fastest_usable(
            "cudnnFindConvolutionBackwardDataAlgorithm",
            &backward_data[..returned as usize],
            |p| (p.status, p.mathType, p.memory),
        )?;

        // SAFETY: as for `forward`.
        let mut backward_filter: [cudnn::cudnnConvolutionBwdFilterAlgoPerf_t; ALGO_SLOTS] =
            unsafe { std::mem::zeroed() };
        // SAFETY: live handle and descriptors; `backward_filter` has ALGO_SLOTS entries.
        cudnn_check("cudnnFindConvolutionBackwardFilterAlgorithm", unsafe {
            cudnn::cudnnFindConvolutionBackwardFilterAlgorithm(
                handle.raw,
                x_desc.0,
                y_desc.0,
                conv_desc.0,
                w_desc.0,
                ALGO_SLOTS as i32,
                &mut returned,
                backward_filter.as_mut_ptr(),
            )
        })?;
        let backward_filter = fastest_usable(
            "cudnnFindConvolutionBackwardFilterAlgorithm",
            &backward_filter[..returned as usize],
            |p| (p.status, p.mathType, p.memory),
        )?;

        let workspace_bytes = forward
            .memory
            .max(backward_data.memory)
            .max(backward_filter.memory);
        let workspace = (workspace_bytes > 0)
            .then(|| {
                let words = workspace_bytes.div_ceil(4);
                Tensor::zeros([words], DType::F32, Device::Cuda(device.ordinal())).map_err(|e| {
                    format!("allocating {workspace_bytes} bytes of cuDNN workspace: {e}")
                })
            })
            .transpose()?;

        Ok(CudnnConv {
            handle,
            x_desc,
            w_desc,
            y_desc,
            conv_desc,
            x_shape,
            w_shape,
            y_shape,
            forward_algo: forward.algo,
            backward_data_algo: backward_data.algo,
            backward_filter_algo: backward_filter.algo,
            workspace,
            workspace_bytes,
        })
    }

    pub fn y_shape(&self) -> [usize; 4] {
        self.y_shape
    }

    /// The workspace pointer (null when no algorithm needs one).
    fn workspace(&self) -> *mut c_void {
        self.workspace.as_ref().map_or(std::ptr::null_mut(), |w| {
            w.cuda_ptr().expect("the workspace lives on the device") as *mut c_void
        })
    }

    /// y = conv(x, w).
    pub fn forward(&self, x: &Tensor, w: &Tensor, y: &Tensor) -> VendorResult<()> {
        let ordinal = self.handle.ordinal();
        let x_data = f32_data("conv forward x", x, ordinal, &self.x_shape);
        let w_data = f32_data("conv forward w", w, ordinal, &self.w_shape);
        let y_data = f32_data("conv forward y", y, ordinal, &self.y_shape);
        self.handle.bind()?;
        // SAFETY: live handle and descriptors matching the buffers' shapes
        // (asserted above); the buffers and the workspace stay alive until the
        // queued work is done (the caller and `self` hold them; kiln's
        // allocator reuses memory in stream order); alpha/beta are host f32.
        cudnn_check("cudnnConvolutionForward", unsafe {
            cudnn::cudnnConvolutionForward(
                self.handle.raw,
                (&ONE as *const f32).cast(),
                self.x_desc.0,
                x_data,
                self.w_desc.0,
                w_data,
                self.conv_desc.0,
                self.forward_algo,
                self.workspace(),
                self.workspace_bytes,
                (&ZERO as *const f32).cast(),
                self.y_desc.0,
                y_data,
            )
        })
    }

    /// dx = the gradient of conv(x, w) with respect to x, given dy [y_shape].
    ///
    /// This is also conv_transpose2d's forward pass, and the benches use it
    /// so: conv_transpose2d(input [N, Cin, H, W], weight [Cin, Cout, kh, kw])
    /// is backward_data of the convolution whose x is the transposed conv's
    /// output [N, Cout, H', W'] and whose w is that same weight (O = Cin,
    /// C = Cout), with dy = input. Build it with
    /// `CudnnConv::new(device, output_shape, weight_shape, stride, padding, dilation)`:
    /// its `y_shape()` is then the input shape (output_padding lives in the
    /// chosen output shape).
    pub fn backward_data(&self, w: &Tensor, dy: &Tensor, dx: &Tensor) -> VendorResult<()> {
        let ordinal = self.handle.ordinal();
        let w_data = f32_data("conv backward_data w", w, ordinal, &self.w_shape);
        let dy_data = f32_data("conv backward_data dy", dy, ordinal, &self.y_shape);
        let dx_data = f32_data("conv backward_data dx", dx, ordinal, &self.x_shape);
        self.handle.bind()?;
        // SAFETY: as in `forward`. Argument order per cuDNN: (handle, alpha,
        // wDesc, w, dyDesc, dy, convDesc, algo, workspace, bytes, beta, dxDesc, dx).
        cudnn_check("cudnnConvolutionBackwardData", unsafe {
            cudnn::cudnnConvolutionBackwardData(
                self.handle.raw,
                (&ONE as *const f32).cast(),
                self.w_desc.0,
                w_data,
                self.y_desc.0,
                dy_data,
                self.conv_desc.0,
                self.backward_data_algo,
                self.workspace(),
                self.workspace_bytes,
                (&ZERO as *const f32).cast(),
                self.x_desc.0,
                dx_data,
            )
        })
    }

    /// dw = the gradient of conv(x, w) with respect to w, given x and dy.
    pub fn backward_filter(&self, x: &Tensor, dy: &Tensor, dw: &Tensor) -> VendorResult<()> {
        let ordinal = self.handle.ordinal();
        let x_data = f32_data("conv backward_filter x", x, ordinal, &self.x_shape);
        let dy_data = f32_data("conv backward_filter dy", dy, ordinal, &self.y_shape);
        let dw_data = f32_data("conv backward_filter dw", dw, ordinal, &self.w_shape);
        self.handle.bind()?;
        // SAFETY: as in `forward`. Argument order per cuDNN: (handle, alpha,
        // xDesc, x, dyDesc, dy, convDesc, algo, workspace, bytes, beta, dwDesc, dw).
        cudnn_check("cudnnConvolutionBackwardFilter", unsafe {
            cudnn::cudnnConvolutionBackwardFilter(
                self.handle.raw,
                (&ONE as *const f32).cast(),
                self.x_desc.0,
                x_data,
                self.y_desc.0,
                dy_data,
                self.conv_desc.0,
                self.backward_filter_algo,
                self.workspace(),
                self.workspace_bytes,
                (&ZERO as *const f32).cast(),
                self.w_desc.0,
                dw_data,
            )
        })
    }
}

/// PyTorch's output shape, (in + 2·pad − dil·(k − 1) − 1) / stride + 1 per
/// spatial dim; None if the kernel does not fit.
fn conv_output_shape(
    x: [usize; 4],
    w: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
) -> Option<[usize; 4]> {
    let out = |d: usize| {
        let span = dilation[d] * (w[2 + d] - 1) + 1;
        (x[2 + d] + 2 * padding[d])
            .checked_sub(span)
            .map(|room| room / stride[d] + 1)
    };
    Some([x[0], w[0], out(0)?, out(1)?])
}

// ----- cuDNN batch norm -----------------------------------------------------

/// Batch norm over [N, C, H, W] in training mode (`CUDNN_BATCHNORM_SPATIAL`),
/// eps 1e-5, momentum 0.1, keeping the batch mean and inverse standard
/// deviation from the forward pass for the backward pass.
pub struct CudnnBatchNorm {
    handle: CudnnHandle,
    x_desc: TensorDesc,
    /// [1, C, 1, 1], derived by cuDNN from `x_desc`.
    param_desc: TensorDesc,
    shape: [usize; 4],
    running_mean: Tensor,
    running_var: Tensor,
    saved_mean: Tensor,
    saved_inv_std: Tensor,
}

impl CudnnBatchNorm {
    /// Running mean 0 and variance 1, as PyTorch starts.
    pub fn new(device: &Arc<CudaDevice>, shape: [usize; 4]) -> VendorResult<Self> {
        let handle = CudnnHandle::new(
            device,
            &[
                "cudnnDeriveBNTensorDescriptor",
                "cudnnBatchNormalizationForwardTraining",
                "cudnnBatchNormalizationBackward",
            ],
        )?;
        let x_desc = TensorDesc::nchw(shape)?;
        let param_desc = TensorDesc::empty()?;
        // SAFETY: live descriptors.
        cudnn_check("cudnnDeriveBNTensorDescriptor", unsafe {
            cudnn::cudnnDeriveBNTensorDescriptor(
                param_desc.0,
                x_desc.0,
                cudnn::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
            )
        })?;
        let device = Device::Cuda(device.ordinal());
        let channel_buffer = |value: f64| {
            Tensor::full(value, [shape[1]], DType::F32, device)
                .map_err(|e| format!("allocating batch-norm statistics: {e}"))
        };
        Ok(CudnnBatchNorm {
            handle,
            x_desc,
            param_desc,
            shape,
            running_mean: channel_buffer(0.0)?,
            running_var: channel_buffer(1.0)?,
            saved_mean: channel_buffer(0.0)?,
            saved_inv_std: channel_buffer(0.0)?,
        })
    }

    /// y = (x − mean) / sqrt(var + eps) · gamma + beta with the batch's own
    /// per-channel mean and (biased) variance; updates the running statistics
    /// (running = 0.9 · running + 0.1 · batch, cuDNN's exponential average
    /// factor being PyTorch's momentum) and saves mean and 1/sqrt(var + eps).
    pub fn forward_training(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
    ) -> VendorResult<()> {
        let ordinal = self.handle.ordinal();
        let channels = [self.shape[1]];
        let x_data = f32_data("batchnorm x", x, ordinal, &self.shape);
        let gamma_data = f32_data("batchnorm gamma", gamma, ordinal, &channels);
        let beta_data = f32_data("batchnorm beta", beta, ordinal, &channels);
        let y_data = f32_data("batchnorm y", y, ordinal, &self.shape);
        let running_mean = f32_data("running mean", &self.running_mean, ordinal, &channels);
        let running_var = f32_data("running var", &self.running_var, ordinal, &channels);
        let saved_mean = f32_data("saved mean", &self.saved_mean, ordinal, &channels);
        let saved_inv_std = f32_data("saved inv std", &self.saved_inv_std, ordinal, &channels);
        self.handle.bind()?;
        // SAFETY: live handle and descriptors matching the buffers' shapes
        // (asserted above); the buffers stay alive until the queued work is
        // done (the caller and `self` hold them); alpha/beta are host f32.
        cudnn_check("cudnnBatchNormalizationForwardTraining", unsafe {
            cudnn::cudnnBatchNormalizationForwardTraining(
                self.handle.raw,
                cudnn::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                (&ONE as *const f32).cast(),
                (&ZERO as *const f32).cast(),
                self.x_desc.0,
                x_data,
                self.x_desc.0,
                y_data,
                self.param_desc.0,
                gamma_data,
                beta_data,
                BN_MOMENTUM,
                running_mean,
                running_var,
                BN_EPSILON,
                saved_mean,
                saved_inv_std,
            )
        })
    }

    /// dx, dgamma and dbeta from dy, for the x of the latest
    /// `forward_training` (whose saved statistics it reuses).
    pub fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        dx: &Tensor,
        dgamma: &Tensor,
        dbeta: &Tensor,
    ) -> VendorResult<()> {
        let ordinal = self.handle.ordinal();
        let channels = [self.shape[1]];
        let x_data = f32_data("batchnorm backward x", x, ordinal, &self.shape);
        let dy_data = f32_data("batchnorm backward dy", dy, ordinal, &self.shape);
        let gamma_data = f32_data("batchnorm backward gamma", gamma, ordinal, &channels);
        let dx_data = f32_data("batchnorm backward dx", dx, ordinal, &self.shape);
        let dgamma_data = f32_data("batchnorm backward dgamma", dgamma, ordinal, &channels);
        let dbeta_data = f32_data("batchnorm backward dbeta", dbeta, ordinal, &channels);
        let saved_mean = f32_data("saved mean", &self.saved_mean, ordinal, &channels);
        let saved_inv_std = f32_data("saved inv std", &self.saved_inv_std, ordinal, &channels);
        self.handle.bind()?;
        // SAFETY: as in `forward_training`. Argument order per cuDNN: (handle,
        // mode, alphaDataDiff, betaDataDiff, alphaParamDiff, betaParamDiff,
        // xDesc, x, dyDesc, dy, dxDesc, dx, paramDesc, scale, dScale, dBias,
        // epsilon, savedMean, savedInvVariance).
        cudnn_check("cudnnBatchNormalizationBackward", unsafe {
            cudnn::cudnnBatchNormalizationBackward(
                self.handle.raw,
                cudnn::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                (&ONE as *const f32).cast(),
                (&ZERO as *const f32).cast(),
                (&ONE as *const f32).cast(),
                (&ZERO as *const f32).cast(),
                self.x_desc.0,
                x_data,
                self.x_desc.0,
                dy_data,
                self.x_desc.0,
                dx_data,
                self.param_desc.0,
                gamma_data,
                dgamma_data,
                dbeta_data,
                BN_EPSILON,
                saved_mean,
                saved_inv_std,
            )
        })
    }
}

// ----- smoke test -----------------------------------------------------------

/// Largest error allowed, relative to the largest reference value. f32
/// accumulation over these small sums stays near 1e-7; a wrong leading
/// dimension or stride is off by O(1); TF32 rounding (about 5e-4 per input)
/// would most likely exceed it too.
const SMOKE_TOLERANCE: f64 = 2e-5;

/// Checks each baseline once against a plain f64 loop on small shapes that
/// are not multiples of any tile and differ in every dimension (so a swapped
/// dimension or a wrong leading dimension shows). One entry per baseline:
/// `Ok` with the library version, the algorithms and the largest relative
/// error, or `Err` saying what is unavailable or wrong. A bench prints the
/// lines and uses only the baselines that passed.
pub fn smoke_test(device: &Arc<CudaDevice>) -> Vec<(&'static str, VendorResult<String>)> {
    vec![
        ("cuBLAS sgemm", smoke_sgemm(device)),
        ("cuDNN conv", smoke_conv(device)),
        ("cuDNN batch norm", smoke_batch_norm(device)),
    ]
}

/// Random N(0, 1) values: (host copy for the reference, device tensor).
fn random_input(
    device: &CudaDevice,
    dims: &[usize],
    seed: u64,
) -> VendorResult<(Vec<f32>, Tensor)> {
    let host = Tensor::randn(dims, DType::F32, Device::Cpu, &mut Rng::seed(seed))
        .map_err(|e| e.to_string())?;
    let values = host.to_vec::<f32>().map_err(|e| e.to_string())?;
    let on_device = host
        .to_device(Device::Cuda(device.ordinal()))
        .map_err(|e| e.to_string())?;
    Ok((values, on_device))
}

/// An output buffer filled with NaN, so an element the library skips fails
/// the comparison.
fn poisoned_output(device: &CudaDevice, dims: &[usize]) -> VendorResult<Tensor> {
    Tensor::full(f64::NAN, dims, DType::F32, Device::Cuda(device.ordinal()))
        .map_err(|e| e.to_string())
}

/// max |actual − expected| / max |expected|, or an error naming the first
/// element past the tolerance (a NaN from the poison included).
fn compare(what: &str, actual: &Tensor, expected: &[f64]) -> VendorResult<f64> {
    let actual = actual.to_vec::<f32>().map_err(|e| e.to_string())?;
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected
        .iter()
        .fold(f64::MIN_POSITIVE, |m, e| m.max(e.abs()));
    let mut worst = 0f64;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let error = (f64::from(a) - e).abs() / scale;
        if error.is_nan() || error > SMOKE_TOLERANCE {
            return Err(format!(
                "{what}: element {i} is {a}, expected {e:.6} (relative error {error:.2e}, \
                 tolerance {SMOKE_TOLERANCE:.0e})"
            ));
        }
        worst = worst.max(error);
    }
    Ok(worst)
}

fn smoke_sgemm(device: &Arc<CudaDevice>) -> VendorResult<String> {
    let blas = Cublas::new(device)?;
    let (m, n, k) = (5, 7, 11);
    let mut worst = 0f64;
    // (batch, trans_a, trans_b): every transpose pair with a batch of 3,
    // then one product of rank-2 tensors (no batch dimension).
    let cases = [
        (Some(3), false, false),
        (Some(3), true, false),
        (Some(3), false, true),
        (Some(3), true, true),
        (None, true, false),
    ];
    for (seed, &(batch, trans_a, trans_b)) in cases.iter().enumerate() {
        let lead = |rows, cols| match batch {
            Some(batch) => vec![batch, rows, cols],
            None => vec![rows, cols],
        };
        let a_dims = if trans_a { lead(k, m) } else { lead(m, k) };
        let b_dims = if trans_b { lead(n, k) } else { lead(k, n) };
        let (a_host, a) = random_input(device, &a_dims, 2 * seed as u64)?;
        let (b_host, b) = random_input(device, &b_dims, 2 * seed as u64 + 1)?;
        let c = poisoned_output(device, &lead(m, n))?;
        blas.sgemm(&a, &b, &c, trans_a, trans_b)?;
        let mut expected = Vec::new();
        for batch_index in 0..batch.unwrap_or(1) {
            let a_at = |i: usize, p: usize| {
                let offset = batch_index * m * k;
                f64::from(a_host[offset + if trans_a { p * m + i } else { i * k + p }])
            };
            let b_at = |p: usize, j: usize| {
                let offset = batch_index * k * n;
                f64::from(b_host[offset + if trans_b { j * k + p } else { p * n + j }])
            };
            for i in 0..m {
                for j in 0..n {
                    expected.push((0..k).map(|p| a_at(i, p) * b_at(p, j)).sum());
                }
            }
        }
        let what = format!("sgemm trans_a={trans_a} trans_b={trans_b} dims {a_dims:?}");
        worst = worst.max(compare(&what, &c, &expected)?);
    }
    Ok(format!(
        "cuBLAS {}, {} products, max relative error {worst:.1e}",
        blas.version()?,
        cases.len()
    ))
}

fn smoke_conv(device: &Arc<CudaDevice>) -> VendorResult<String> {
    let (x_shape, w_shape) = ([2, 3, 9, 8], [4, 3, 3, 2]);
    let (stride, padding, dilation) = ([2, 1], [1, 2], [1, 2]);
    let conv = CudnnConv::new(device, x_shape, w_shape, stride, padding, dilation)?;
    let y_shape = conv.y_shape();
    let (x_host, x) = random_input(device, &x_shape, 10)?;
    let (w_host, w) = random_input(device, &w_shape, 11)?;
    let (dy_host, dy) = random_input(device, &y_shape, 12)?;
    let (y, dx, dw) = (
        poisoned_output(device, &y_shape)?,
        poisoned_output(device, &x_shape)?,
        poisoned_output(device, &w_shape)?,
    );
    conv.forward(&x, &w, &y)?;
    conv.backward_data(&w, &dy, &dx)?;
    conv.backward_filter(&x, &dy, &dw)?;

    // One pass over every (output pixel, filter tap) pair that lands inside
    // the image accumulates all three: y += x·w, dx += dy·w, dw += dy·x.
    let [batch, channels, height, width] = x_shape;
    let [outputs, _, kernel_h, kernel_w] = w_shape;
    let [_, _, out_h, out_w] = y_shape;
    let mut y_ref = vec![0f64; y_shape.iter().product()];
    let mut dx_ref = vec![0f64; x_shape.iter().product()];
    let mut dw_ref = vec![0f64; w_shape.iter().product()];
    for n in 0..batch {
        for o in 0..outputs {
            for oh in 0..out_h {
                for ow in 0..out_w {
                    let yi = ((n * outputs + o) * out_h + oh) * out_w + ow;
                    for c in 0..channels {
                        for i in 0..kernel_h {
                            for j in 0..kernel_w {
                                let ih = (oh * stride[0] + i * dilation[0]).checked_sub(padding[0]);
                                let iw = (ow * stride[1] + j * dilation[1]).checked_sub(padding[1]);
                                let (Some(ih), Some(iw)) = (ih, iw) else {
                                    continue;
                                };
                                if ih >= height || iw >= width {
                                    continue;
                                }
                                let xi = ((n * channels + c) * height + ih) * width + iw;
                                let wi = ((o * channels + c) * kernel_h + i) * kernel_w + j;
                                y_ref[yi] += f64::from(x_host[xi]) * f64::from(w_host[wi]);
                                dx_ref[xi] += f64::from(dy_host[yi]) * f64::from(w_host[wi]);
                                dw_ref[wi] += f64::from(dy_host[yi]) * f64::from(x_host[xi]);
                            }
                        }
                    }
                }
            }
        }
    }
    let worst = compare("conv forward", &y, &y_ref)?
        .max(compare("conv backward_data", &dx, &dx_ref)?)
        .max(compare("conv backward_filter", &dw, &dw_ref)?);
    Ok(format!(
        "cuDNN {}, algorithms {:?} / {:?} / {:?}, workspace {} bytes, max relative error {worst:.1e}",
        // SAFETY: the library is loaded (CudnnConv::new succeeded); takes no arguments.
        unsafe { cudnn::cudnnGetVersion() },
        conv.forward_algo,
        conv.backward_data_algo,
        conv.backward_filter_algo,
        conv.workspace_bytes
    ))
}

fn smoke_batch_norm(device: &Arc<CudaDevice>) -> VendorResult<String> {
    let shape = [3, 4, 5, 6];
    let bn = CudnnBatchNorm::new(device, shape)?;
    let channels = [shape[1]];
    let (x_host, x) = random_input(device, &shape, 20)?;
    let (gamma_host, gamma) = random_input(device, &channels, 21)?;
    let (beta_host, beta) = random_input(device, &channels, 22)?;
    let (dy_host, dy) = random_input(device, &shape, 23)?;
    let y = poisoned_output(device, &shape)?;
    let (dx, dgamma, dbeta) = (
        poisoned_output(device, &shape)?,
        poisoned_output(device, &channels)?,
        poisoned_output(device, &channels)?,
    );
    bn.forward_training(&x, &gamma, &beta, &y)?;
    bn.backward(&x, &dy, &gamma, &dx, &dgamma, &dbeta)?;

    let [batch, c_count, height, width] = shape;
    let plane = height * width;
    let count = (batch * plane) as f64;
    let index = |n: usize, c: usize, p: usize| (n * c_count + c) * plane + p;
    let mut y_ref = vec![0f64; x_host.len()];
    let mut dx_ref = vec![0f64; x_host.len()];
    let (mut dgamma_ref, mut dbeta_ref) = (vec![0f64; c_count], vec![0f64; c_count]);
    let (mut running_mean_ref, mut running_var_ref) = (vec![0f64; c_count], vec![0f64; c_count]);
    for c in 0..c_count {
        let positions = || (0..batch).flat_map(move |n| (0..plane).map(move |p| index(n, c, p)));
        let mean = positions().map(|i| f64::from(x_host[i])).sum::<f64>() / count;
        let var = positions()
            .map(|i| (f64::from(x_host[i]) - mean).powi(2))
            .sum::<f64>()
            / count;
        let inv_std = 1.0 / (var + BN_EPSILON).sqrt();
        let x_hat = |i: usize| (f64::from(x_host[i]) - mean) * inv_std;
        let gamma_c = f64::from(gamma_host[c]);
        // dL/dgamma = Σ dy·x̂, dL/dbeta = Σ dy,
        // dL/dx = gamma·inv_std/m · (m·dy − Σ dy − x̂·Σ dy·x̂), m = `count`.
        let dbeta_c: f64 = positions().map(|i| f64::from(dy_host[i])).sum();
        let dgamma_c: f64 = positions().map(|i| f64::from(dy_host[i]) * x_hat(i)).sum();
        for i in positions() {
            y_ref[i] = x_hat(i) * gamma_c + f64::from(beta_host[c]);
            dx_ref[i] = gamma_c * inv_std / count
                * (count * f64::from(dy_host[i]) - dbeta_c - x_hat(i) * dgamma_c);
        }
        dgamma_ref[c] = dgamma_c;
        dbeta_ref[c] = dbeta_c;
        // From running mean 0 and variance 1; the variance takes the
        // unbiased estimate, as PyTorch's does.
        running_mean_ref[c] = BN_MOMENTUM * mean;
        running_var_ref[c] = (1.0 - BN_MOMENTUM) + BN_MOMENTUM * var * count / (count - 1.0);
    }
    let worst = compare("batchnorm y", &y, &y_ref)?
        .max(compare("batchnorm dx", &dx, &dx_ref)?)
        .max(compare("batchnorm dgamma", &dgamma, &dgamma_ref)?)
        .max(compare("batchnorm dbeta", &dbeta, &dbeta_ref)?)
        .max(compare(
            "batchnorm running mean",
            &bn.running_mean,
            &running_mean_ref,
        )?)
        .max(compare(
            "batchnorm running var",
            &bn.running_var,
            &running_var_ref,
        )?);
    Ok(format!(
        "cuDNN {}, max relative error {worst:.1e}",
        // SAFETY: the library is loaded (CudnnBatchNorm::new succeeded); takes no arguments.
        unsafe { cudnn::cudnnGetVersion() }
    ))
}
