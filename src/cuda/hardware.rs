//! The real driver: a CUDA context and stream through cudarc, kernels
//! compiled by NVRTC and loaded as PTX modules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

use super::{KernelParams, compile, cuda_error};
use crate::error::Result;

pub(crate) struct HardwareDriver {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl HardwareDriver {
    /// Opens device `ordinal` (the caller has checked it exists); returns
    /// the driver, the device's name and its arch (e.g. "sm_90").
    pub(crate) fn open(ordinal: usize) -> Result<(HardwareDriver, String, String)> {
        let context =
            CudaContext::new(ordinal).map_err(|e| cuda_error("cuda", "creating the context", e))?;
        let name = context
            .name()
            .map_err(|e| cuda_error("cuda", "reading the device name", e))?;
        let (major, minor) = context
            .compute_capability()
            .map_err(|e| cuda_error("cuda", "reading the compute capability", e))?;
        let arch = format!("sm_{major}{minor}");
        let stream = context.default_stream();
        let driver = HardwareDriver {
            context,
            stream,
            arch: arch.clone(),
            modules: Mutex::default(),
            functions: Mutex::default(),
        };
        Ok((driver, name, arch))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn bind(&self, op: &'static str) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(|e| cuda_error(op, "binding the CUDA context", e))
    }

    pub(crate) fn malloc(&self, bytes: usize) -> Result<CUdeviceptr> {
        self.bind("alloc")?;
        // SAFETY: a plain allocation in the bound context.
        unsafe { cudarc::driver::result::malloc_sync(bytes) }
            .map_err(|e| cuda_error("alloc", "cuMemAlloc", e))
    }

    pub(crate) fn free(&self, ptr: CUdeviceptr) {
        if self.bind("free").is_err() {
            return;
        }
        // SAFETY: blocks on the free list are referenced by no tensor.
        unsafe {
            let _ = cudarc::driver::result::free_sync(ptr);
        }
    }

    pub(crate) fn memset(&self, ptr: CUdeviceptr, value: u8, bytes: usize) -> Result<()> {
        self.bind("memset")?;
        // SAFETY: the caller's block holds `bytes`; ordered on the stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, value, bytes, self.stream.cu_stream())
        }
        .map_err(|e| cuda_error("memset", "cuMemsetD8Async", e))
    }

    pub(crate) fn copy_to_device(&self, dst: CUdeviceptr, src: &[u8]) -> Result<()> {
        self.bind("to_device")?;
        // SAFETY: the block holds `src.len()` bytes; the synchronize keeps
        // `src` alive until the copy is done.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_error("to_device", "host to device copy", e))?;
        self.synchronize()
    }

    pub(crate) fn copy_to_host(&self, dst: &mut [u8], src: CUdeviceptr) -> Result<()> {
        self.bind("to_cpu")?;
        // SAFETY: the block holds `dst.len()` bytes; synchronised before `dst` is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_error("to_cpu", "device to host copy", e))?;
        self.synchronize()
    }

    pub(crate) fn copy_on_device(
        &self,
        dst: CUdeviceptr,
        src: CUdeviceptr,
        bytes: usize,
    ) -> Result<()> {
        self.bind("clone")?;
        // SAFETY: both blocks hold `bytes`; ordered on the stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .map_err(|e| cuda_error("clone", "device to device copy", e))
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("synchronize", "stream synchronize", e))
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

    /// Queues `kernel` on the stream with one by-value parameter struct.
    pub(crate) fn launch<P: KernelParams>(
        &self,
        file: &'static str,
        kernel: &'static str,
        config: LaunchConfig,
        params: P,
    ) -> Result<()> {
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
