//! The driver boundary: everything kiln asks of a CUDA device goes through
//! these few calls, answered by the real driver or by the CPU emulator.
//! Above this line — tensors, ops' launch glue, the caching allocator,
//! parameter structs, launch geometry — the code is the same for both.

use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUdeviceptr;

use super::KernelParams;
use super::emulator::Emulator;
use super::hardware::HardwareDriver;
use crate::error::{Error, Result};

pub(crate) enum Driver {
    Hardware(HardwareDriver),
    Emulated(Emulator),
}

fn emulator_error(op: &'static str, msg: String) -> Error {
    Error::Cuda { op, msg }
}

impl Driver {
    pub(crate) fn malloc(&self, bytes: usize) -> Result<CUdeviceptr> {
        match self {
            Driver::Hardware(h) => h.malloc(bytes),
            Driver::Emulated(e) => e.malloc(bytes).map_err(|m| emulator_error("alloc", m)),
        }
    }

    pub(crate) fn free(&self, ptr: CUdeviceptr) {
        match self {
            Driver::Hardware(h) => h.free(ptr),
            Driver::Emulated(e) => e.free(ptr),
        }
    }

    /// A pooled block of `class` bytes now backs a tensor of `live` bytes.
    /// The emulator always NaN-poisons the tensor's bytes and puts a canary
    /// around them; on the GPU the whole block is NaN-poisoned if `poison`.
    pub(crate) fn hand_out(
        &self,
        ptr: CUdeviceptr,
        class: usize,
        live: usize,
        poison: bool,
    ) -> Result<()> {
        match self {
            Driver::Hardware(h) if poison && class > 0 => h.memset(ptr, 0xFF, class),
            Driver::Hardware(_) => Ok(()),
            Driver::Emulated(e) => {
                e.hand_out(ptr, live);
                Ok(())
            }
        }
    }

    pub(crate) fn memset(&self, ptr: CUdeviceptr, value: u8, bytes: usize) -> Result<()> {
        match self {
            Driver::Hardware(h) => h.memset(ptr, value, bytes),
            // SAFETY: callers pass a block of at least `bytes`.
            Driver::Emulated(e) => unsafe {
                e.memset(ptr, value, bytes);
                Ok(())
            },
        }
    }

    /// Copies `src` into device memory at `dst` and waits for it.
    pub(crate) fn copy_to_device(&self, dst: CUdeviceptr, src: &[u8]) -> Result<()> {
        match self {
            Driver::Hardware(h) => h.copy_to_device(dst, src),
            // SAFETY: callers pass a block of at least `src.len()` bytes.
            Driver::Emulated(e) => unsafe {
                e.copy(dst, src.as_ptr() as u64, src.len());
                Ok(())
            },
        }
    }

    /// Copies device memory at `src` into `dst`, after every queued kernel.
    pub(crate) fn copy_to_host(&self, dst: &mut [u8], src: CUdeviceptr) -> Result<()> {
        match self {
            Driver::Hardware(h) => h.copy_to_host(dst, src),
            // SAFETY: callers pass a block of at least `dst.len()` bytes.
            Driver::Emulated(e) => unsafe {
                e.copy(dst.as_mut_ptr() as u64, src, dst.len());
                Ok(())
            },
        }
    }

    pub(crate) fn copy_on_device(
        &self,
        dst: CUdeviceptr,
        src: CUdeviceptr,
        bytes: usize,
    ) -> Result<()> {
        match self {
            Driver::Hardware(h) => h.copy_on_device(dst, src, bytes),
            // SAFETY: callers pass two blocks of at least `bytes`.
            Driver::Emulated(e) => unsafe {
                e.copy(dst, src, bytes);
                Ok(())
            },
        }
    }

    /// Waits for the queued work. The emulator runs each call to completion
    /// when it is made, so there is nothing to wait for.
    pub(crate) fn synchronize(&self) -> Result<()> {
        match self {
            Driver::Hardware(h) => h.synchronize(),
            Driver::Emulated(_) => Ok(()),
        }
    }

    pub(crate) fn launch<P: KernelParams>(
        &self,
        file: &'static str,
        kernel: &'static str,
        config: LaunchConfig,
        params: P,
    ) -> Result<()> {
        match self {
            Driver::Hardware(h) => h.launch(file, kernel, config, params),
            Driver::Emulated(e) => {
                // SAFETY: P is a #[repr(C)] struct of plain data (KernelParams'
                // contract), so its bytes can be read as the kernel will.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        &params as *const P as *const u8,
                        std::mem::size_of::<P>(),
                    )
                };
                e.launch(file, kernel, config, bytes)
                    .map_err(|msg| Error::Cuda {
                        op: kernel,
                        msg: format!("kernels/{file} {kernel} on the emulated device: {msg}"),
                    })
            }
        }
    }
}
