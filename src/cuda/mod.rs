//! kiln's CUDA backend: device discovery, NVRTC compilation of kernels/,
//! a caching allocator, and kernel launches with `#[repr(C)]` parameter
//! structs. The driver library is loaded at run time, so kiln builds and
//! runs on machines without CUDA; asking for a device there is an error.

mod alloc;
pub mod compile;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};

use alloc::Allocator;
pub use alloc::MemoryStats;

use crate::error::{Error, Result};
use crate::storage::CpuStorage;
use crate::tensor::DType;

fn cuda_error(op: &'static str, what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda {
        op,
        msg: format!("{what}: {e:?}"),
    }
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Fill every new device buffer with 0xFF bytes (NaN as f32), so a kernel
/// that forgets to write an element is caught by the parity tests.
pub fn set_poison_allocations(enabled: bool) {
    POISON.store(enabled, Ordering::Relaxed);
}

/// True if the CUDA driver library can be loaded (says nothing about devices).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices; 0 where there is no driver.
pub fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// One GPU: its context, the stream every kernel runs on, compiled modules
/// and the allocator.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    /// e.g. "sm_90", the architecture kernels are compiled for.
    arch: String,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    allocator: Allocator,
}

/// The device with `ordinal`, initialised on first use. Errors (never
/// panics) when the driver is missing or the ordinal does not exist.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let devices = DEVICES.get_or_init(Default::default);
    let mut devices = devices.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(device) = devices.get(&ordinal) {
        return Ok(device.clone());
    }
    if !driver_available() {
        return Err(Error::Cuda {
            op: "cuda",
            msg: format!(
                "no CUDA driver found (libcuda.so could not be loaded), so cuda:{ordinal} is unavailable; \
                 run on a machine with an NVIDIA GPU and driver, or use Device::Cpu"
            ),
        });
    }
    let count = device_count();
    if ordinal >= count {
        return Err(Error::Cuda {
            op: "cuda",
            msg: format!(
                "cuda:{ordinal} requested but {count} CUDA device(s) found; use Device::Cpu or a valid ordinal"
            ),
        });
    }
    let context =
        CudaContext::new(ordinal).map_err(|e| cuda_error("cuda", "creating the context", e))?;
    let name = context
        .name()
        .map_err(|e| cuda_error("cuda", "reading the device name", e))?;
    let (major, minor) = context
        .compute_capability()
        .map_err(|e| cuda_error("cuda", "reading the compute capability", e))?;
    let stream = context.default_stream();
    let device = Arc::new(CudaDevice {
        ordinal,
        name,
        arch: format!("sm_{major}{minor}"),
        context,
        stream,
        modules: Mutex::default(),
        functions: Mutex::default(),
        allocator: Allocator::default(),
    });
    devices.insert(ordinal, device.clone());
    Ok(device)
}

impl CudaDevice {
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compute capability as an NVRTC architecture, e.g. "sm_90".
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn memory_stats(&self) -> MemoryStats {
        self.allocator.stats()
    }

    /// Waits for every queued kernel and copy.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("synchronize", "stream synchronize", e))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn bind(&self, op: &'static str) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(|e| cuda_error(op, "binding the CUDA context", e))
    }

    /// `kernel` from `kernels/<file>`, compiling the file on first use.
    fn function(&self, file: &'static str, kernel: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(file, kernel))
        {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile::ptx_for(file, &self.arch)?;
                    let module = self.context.load_module(ptx).map_err(|e| {
                        cuda_error(
                            "cuda",
                            &format!("loading kernels/{file} (PTX newer than the driver?)"),
                            e,
                        )
                    })?;
                    modules.insert(file, module.clone());
                    module
                }
            }
        };
        let function = module.load_function(kernel).map_err(|e| {
            cuda_error(
                "cuda",
                &format!("kernel {kernel} not found in kernels/{file}"),
                e,
            )
        })?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((file, kernel), function.clone());
        Ok(function)
    }

    /// Launches `kernel` of `kernels/<file>` with one by-value parameter
    /// struct (mirrored in the .cu file), asynchronously on the device's stream.
    pub fn launch<P: KernelParams>(
        &self,
        file: &'static str,
        kernel: &'static str,
        config: LaunchConfig,
        params: P,
    ) -> Result<()> {
        if config.grid_dim.0 == 0 || config.block_dim.0 == 0 {
            return Ok(());
        }
        self.bind(kernel)?;
        let function = self.function(file, kernel)?;
        let mut builder = self.stream.launch_builder(&function);
        builder.arg(&params);
        // SAFETY: `P` mirrors the kernel's parameter struct (KernelParams'
        // contract); every pointer in it refers to live device buffers that
        // outlive the launch on this stream.
        unsafe { builder.launch(config) }.map_err(|e| cuda_error(kernel, "kernel launch", e))?;
        Ok(())
    }
}

/// A `#[repr(C)]` struct passed by value to a kernel; declare one with
/// [`kernel_params!`](crate::kernel_params), which mirrors it field by field
/// from the struct of the same name in the .cu file.
pub trait KernelParams: DeviceRepr + Copy {}

/// Declares `#[repr(C)]` kernel parameter structs usable with `CudaDevice::launch`.
#[macro_export]
#[doc(hidden)]
macro_rules! kernel_params {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        $vis struct $name { $($(#[$fmeta])* pub $field: $ty),* }
        // SAFETY: a #[repr(C)] struct of plain data (device pointers as u64,
        // sizes, scalars), laid out exactly like its mirror in the .cu file.
        unsafe impl cudarc::driver::DeviceRepr for $name {}
        impl $crate::cuda::KernelParams for $name {}
    };
}

/// A 1-D launch for `n` elements with grid-stride loops: 256 threads a
/// block, at most 65 535 · 8 blocks (enough to fill any current GPU).
pub fn launch_1d(n: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    let blocks = n.div_ceil(THREADS).clamp(1, 65_535 * 8);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Device memory of one tensor: a pooled block and what it holds.
pub struct CudaStorage {
    ptr: CUdeviceptr,
    class: usize,
    dtype: DType,
    len: usize,
    device: Arc<CudaDevice>,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({} x {} on cuda:{})",
            self.len, self.dtype, self.device.ordinal
        )
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        self.device.allocator.free(self.ptr, self.class);
    }
}

impl CudaStorage {
    /// `len` elements of `dtype`, uninitialised (kernels write every element;
    /// with [`set_poison_allocations`] every new buffer starts as NaN bytes).
    pub fn alloc(device: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        device.bind("alloc")?;
        let bytes = len * dtype.size_in_bytes();
        let (ptr, class) = device
            .allocator
            .allocate(
                bytes,
                // SAFETY: a plain allocation in the bound context.
                |b| unsafe { cudarc::driver::result::malloc_sync(b) },
                // SAFETY: blocks on the free list are referenced by no tensor.
                |p| unsafe {
                    let _ = cudarc::driver::result::free_sync(p);
                },
            )
            .map_err(|e| Error::Cuda {
                op: "alloc",
                msg: format!(
                    "out of device memory allocating {bytes} bytes on cuda:{} ({:?}): {e:?}",
                    device.ordinal,
                    device.memory_stats()
                ),
            })?;
        let storage = CudaStorage {
            ptr,
            class,
            dtype,
            len,
            device: device.clone(),
        };
        if POISON.load(Ordering::Relaxed) && class > 0 {
            // SAFETY: the block holds `class` bytes; ordered on the stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, class, device.stream.cu_stream())
            }
            .map_err(|e| cuda_error("alloc", "poisoning memset", e))?;
        }
        Ok(storage)
    }

    /// `len` zeros of `dtype`.
    pub fn zeros(device: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let storage = Self::alloc(device, dtype, len)?;
        let bytes = len * dtype.size_in_bytes();
        if bytes > 0 {
            // SAFETY: the block holds at least `bytes`; queued on the stream like every kernel.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    storage.ptr,
                    0,
                    bytes,
                    device.stream.cu_stream(),
                )
            }
            .map_err(|e| cuda_error("zeros", "memset", e))?;
        }
        Ok(storage)
    }

    /// Copies host values to a new device buffer.
    pub fn from_cpu(device: &Arc<CudaDevice>, cpu: &CpuStorage) -> Result<Self> {
        let storage = Self::alloc(device, cpu.dtype(), cpu.len())?;
        if !cpu.is_empty() {
            let stream = device.stream.cu_stream();
            // SAFETY: sizes match; the synchronize below keeps the host slice
            // alive until the copy has finished.
            let copied = unsafe {
                match cpu {
                    CpuStorage::F32(v) => {
                        cudarc::driver::result::memcpy_htod_async(storage.ptr, v, stream)
                    }
                    CpuStorage::F64(v) => {
                        cudarc::driver::result::memcpy_htod_async(storage.ptr, v, stream)
                    }
                    CpuStorage::U32(v) => {
                        cudarc::driver::result::memcpy_htod_async(storage.ptr, v, stream)
                    }
                }
            };
            copied.map_err(|e| cuda_error("to_device", "host to device copy", e))?;
            device.synchronize()?;
        }
        Ok(storage)
    }

    /// Copies the values back to the host (waits for queued kernels).
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        self.device.bind("to_cpu")?;
        let stream = self.device.stream.cu_stream();
        fn read<T: Default + Clone>(
            s: &CudaStorage,
            stream: cudarc::driver::sys::CUstream,
        ) -> Result<Vec<T>> {
            let mut host = vec![T::default(); s.len];
            if s.len > 0 {
                // SAFETY: the block holds `len` values of T; synchronised below before `host` is read.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host, s.ptr, stream) }
                    .map_err(|e| cuda_error("to_cpu", "device to host copy", e))?;
                s.device.synchronize()?;
            }
            Ok(host)
        }
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(read(self, stream)?),
            DType::F64 => CpuStorage::F64(read(self, stream)?),
            DType::U32 => CpuStorage::U32(read(self, stream)?),
            other => return Err(Error::unsupported_dtype("to_cpu", other)),
        })
    }

    /// A device-side copy.
    pub fn try_clone(&self) -> Result<Self> {
        let copy = Self::alloc(&self.device, self.dtype, self.len)?;
        let bytes = self.len * self.dtype.size_in_bytes();
        if bytes > 0 {
            // SAFETY: both blocks hold `bytes`; ordered on the stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    copy.ptr,
                    self.ptr,
                    bytes,
                    self.device.stream.cu_stream(),
                )
            }
            .map_err(|e| cuda_error("clone", "device to device copy", e))?;
        }
        Ok(copy)
    }

    /// The device address, for kernel parameter structs.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }
}

/// CUDA kernels compute in f32; other float dtypes are refused with a hint.
pub fn require_f32(op: &'static str, storages: &[&CudaStorage]) -> Result<()> {
    for s in storages {
        if s.dtype != DType::F32 {
            return Err(Error::DType {
                op,
                msg: format!(
                    "CUDA kernels compute in f32, got {}; convert with .to_dtype(DType::F32)",
                    s.dtype
                ),
            });
        }
    }
    Ok(())
}
