//! kiln's CUDA backend: device discovery, NVRTC compilation of kernels/,
//! a caching allocator, and kernel launches with `#[repr(C)]` parameter
//! structs. The driver library is loaded at run time, so kiln builds and
//! runs on machines without CUDA; asking for a device there is an error.
//!
//! With `KILN_CUDA=emulate`, `cuda:0` is instead an emulated device whose
//! driver calls run on the CPU (see [`emulator`]); everything in this module
//! above the driver boundary (`driver.rs`) is the same code for both.

mod alloc;
pub mod compile;
mod driver;
pub mod emulator;
mod hardware;
pub mod source;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig};

use alloc::Allocator;
pub use alloc::MemoryStats;
use driver::Driver;
use hardware::HardwareDriver;

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

/// Which device `cuda:N` means: the GPU (the default) or the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Hardware,
    Emulated,
}

/// The backend `KILN_CUDA` selects: unset, empty or `hardware` for the GPU,
/// `emulate` for the CPU emulator; anything else is an error.
pub fn backend() -> Result<Backend> {
    match std::env::var("KILN_CUDA").ok().as_deref().map(str::trim) {
        None | Some("") | Some("hardware") => Ok(Backend::Hardware),
        Some("emulate") => Ok(Backend::Emulated),
        Some(other) => Err(Error::Cuda {
            op: "cuda",
            msg: format!(
                "KILN_CUDA={other} is not a backend: unset it for the GPU, or set KILN_CUDA=emulate to run \
                 kernels on the CPU emulator"
            ),
        }),
    }
}

/// True if the CUDA driver library can be loaded (says nothing about devices).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices: 1 under the emulator, else 0 where there is no driver.
pub fn device_count() -> usize {
    match backend() {
        Ok(Backend::Emulated) => 1,
        Err(_) => 0,
        Ok(Backend::Hardware) => {
            if !driver_available() {
                return 0;
            }
            cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
        }
    }
}

/// One CUDA device, real or emulated: its driver, compiled kernels and allocator.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    /// e.g. "sm_90", the architecture kernels are compiled for.
    arch: String,
    driver: Driver,
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
    let device = Arc::new(match backend()? {
        Backend::Emulated => open_emulated(ordinal)?,
        Backend::Hardware => open_hardware(ordinal)?,
    });
    devices.insert(ordinal, device.clone());
    Ok(device)
}

fn open_emulated(ordinal: usize) -> Result<CudaDevice> {
    let fail = |msg: String| Error::Cuda { op: "cuda", msg };
    if ordinal != 0 {
        return Err(fail(format!(
            "cuda:{ordinal} requested but the emulator (KILN_CUDA=emulate) provides cuda:0 only"
        )));
    }
    let arch = emulator::emulated_arch().map_err(fail)?;
    let driver = emulator::Emulator::new().map_err(fail)?;
    Ok(CudaDevice {
        ordinal,
        name: format!("kiln CUDA emulator, {arch}, kernels compiled for the host CPU"),
        arch,
        driver: Driver::Emulated(driver),
        allocator: Allocator::default(),
    })
}

fn open_hardware(ordinal: usize) -> Result<CudaDevice> {
    if !driver_available() {
        return Err(Error::Cuda {
            op: "cuda",
            msg: format!(
                "no CUDA driver found (libcuda.so could not be loaded), so cuda:{ordinal} is unavailable; \
                 run on a machine with an NVIDIA GPU and driver, set KILN_CUDA=emulate to run kernels on \
                 the CPU emulator, or use Device::Cpu"
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
    let (driver, name, arch) = HardwareDriver::open(ordinal)?;
    Ok(CudaDevice {
        ordinal,
        name,
        arch,
        driver: Driver::Hardware(driver),
        allocator: Allocator::default(),
    })
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

    /// Whether the device has the bf16/f16 tensor cores of compute
    /// capability 8.0 and later (`mma.sync.m16n8k16`), as its arch says.
    pub fn has_tensor_cores(&self) -> bool {
        arch_has_tensor_cores(&self.arch)
    }

    /// An error for `op` unless the device has tensor cores: every kernel
    /// that issues `mma.sync` (the 16-bit GEMM and convolution) checks here
    /// before launching, rather than trapping on an older device.
    pub(crate) fn require_tensor_cores(&self, op: &'static str) -> Result<()> {
        if self.has_tensor_cores() {
            return Ok(());
        }
        Err(Error::Cuda {
            op,
            msg: format!(
                "16-bit {op} runs on tensor cores, which need compute capability 8.0 (sm_80) \
                 or newer; this device is {}: convert to f32 with .to_dtype(DType::F32)",
                self.arch
            ),
        })
    }

    /// Whether this device is the CPU emulator.
    pub fn is_emulated(&self) -> bool {
        matches!(self.driver, Driver::Emulated(_))
    }

    pub fn memory_stats(&self) -> MemoryStats {
        self.allocator.stats()
    }

    /// Waits for every queued kernel and copy.
    pub fn synchronize(&self) -> Result<()> {
        self.driver.synchronize()
    }

    /// The CUDA stream every kernel runs on, for code that calls other CUDA
    /// libraries in order with kiln's kernels; None on the emulator.
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.driver {
            Driver::Hardware(h) => Some(h.stream()),
            Driver::Emulated(_) => None,
        }
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
        self.driver.launch(file, kernel, config, params)
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
    /// with [`set_poison_allocations`], and always on the emulator, every new
    /// buffer starts as NaN bytes).
    pub fn alloc(device: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let bytes = len * dtype.size_in_bytes();
        let driver = &device.driver;
        let (ptr, class) = device
            .allocator
            .allocate(bytes, |b| driver.malloc(b), |p| driver.free(p))
            .map_err(|e| Error::Cuda {
                op: "alloc",
                msg: format!(
                    "out of device memory allocating {bytes} bytes on cuda:{} ({:?}): {e}",
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
        driver.hand_out(ptr, class, bytes, POISON.load(Ordering::Relaxed))?;
        Ok(storage)
    }

    /// `len` zeros of `dtype`.
    pub fn zeros(device: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let storage = Self::alloc(device, dtype, len)?;
        let bytes = len * dtype.size_in_bytes();
        if bytes > 0 {
            device.driver.memset(storage.ptr, 0, bytes)?;
        }
        Ok(storage)
    }

    /// Copies host values to a new device buffer.
    pub fn from_cpu(device: &Arc<CudaDevice>, cpu: &CpuStorage) -> Result<Self> {
        let storage = Self::alloc(device, cpu.dtype(), cpu.len())?;
        if !cpu.is_empty() {
            device.driver.copy_to_device(storage.ptr, cpu.as_bytes())?;
        }
        Ok(storage)
    }

    /// Copies the values back to the host (waits for queued kernels).
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        fn read<T: bytemuck::Pod + Default>(s: &CudaStorage) -> Result<Vec<T>> {
            let mut host = vec![T::default(); s.len];
            if s.len > 0 {
                s.device
                    .driver
                    .copy_to_host(bytemuck::cast_slice_mut(&mut host), s.ptr)?;
            }
            Ok(host)
        }
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(read(self)?),
            DType::F64 => CpuStorage::F64(read(self)?),
            DType::F16 => CpuStorage::F16(read(self)?),
            DType::BF16 => CpuStorage::BF16(read(self)?),
            DType::U32 => CpuStorage::U32(read(self)?),
        })
    }

    /// A device-side copy.
    pub fn try_clone(&self) -> Result<Self> {
        let copy = Self::alloc(&self.device, self.dtype, self.len)?;
        let bytes = self.len * self.dtype.size_in_bytes();
        if bytes > 0 {
            self.device
                .driver
                .copy_on_device(copy.ptr, self.ptr, bytes)?;
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

/// The codes of kernels/half.cuh for the float formats kernels read and write.
pub(crate) const FORMAT_BF16: u32 = 0;
pub(crate) const FORMAT_F16: u32 = 1;
pub(crate) const FORMAT_F32: u32 = 2;

/// The code kernels/half.cuh gives the one float format of `storages`
/// (KILN_F32, KILN_BF16, KILN_F16), for kernels that take any of the three;
/// other dtypes are refused with a hint.
pub(crate) fn float_format(op: &'static str, storages: &[&CudaStorage]) -> Result<u32> {
    let dtype = storages[0].dtype;
    if let Some(other) = storages.iter().find(|s| s.dtype != dtype) {
        return Err(Error::dtype_mismatch(op, dtype, other.dtype));
    }
    match dtype {
        DType::F32 => Ok(FORMAT_F32),
        DType::BF16 | DType::F16 => half_kind(op, dtype),
        other => Err(Error::DType {
            op,
            msg: format!(
                "CUDA kernels take f32, bf16 or f16 values, got {other}; convert with .to_dtype(DType::F32)"
            ),
        }),
    }
}

/// The code kernels/half.cuh gives a 16-bit format (KILN_BF16, KILN_F16).
pub(crate) fn half_kind(op: &'static str, dtype: DType) -> Result<u32> {
    match dtype {
        DType::BF16 => Ok(FORMAT_BF16),
        DType::F16 => Ok(FORMAT_F16),
        other => Err(Error::DType {
            op,
            msg: format!("expected a 16-bit operand (bf16 or f16), got {other}"),
        }),
    }
}

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

/// Whether an arch name "sm_<major><minor>" is compute capability 8.0 or later.
fn arch_has_tensor_cores(arch: &str) -> bool {
    arch.strip_prefix("sm_")
        .and_then(|digits| digits.get(..digits.len().saturating_sub(1)))
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major >= 8)
}

#[cfg(test)]
mod tests {
    use super::arch_has_tensor_cores;

    #[test]
    fn tensor_cores_start_at_compute_capability_8() {
        for (arch, expected) in [
            ("sm_70", false),
            ("sm_75", false),
            ("sm_80", true),
            ("sm_86", true),
            ("sm_90", true),
            ("sm_100", true),
            ("compute_90", false),
            ("sm_", false),
        ] {
            assert_eq!(arch_has_tensor_cores(arch), expected, "{arch}");
        }
    }
}
