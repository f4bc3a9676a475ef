//! Run-time CUDA for a CPU-linked binary.
//!
//! The default build links the CPU part of libtorch (see docs/libtorch.md).
//! libtorch's CUDA kernels live in `libtorch_cuda.so` and register themselves
//! when that library is loaded, so if a CUDA build of the same libtorch
//! version is reachable (its `lib/` on `LD_LIBRARY_PATH`, or the file named by
//! `PIPELINE_LIBTORCH_CUDA`), loading it globally before the first tch call
//! makes CUDA devices available — one binary for CPU and GPU machines.

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW, Symbol};

/// Try to load `libtorch_cuda.so`; returns what was loaded, or why not.
pub fn load_cuda_backend() -> Result<String, String> {
    let name = std::env::var("PIPELINE_LIBTORCH_CUDA").unwrap_or_else(|_| "libtorch_cuda.so".to_string());
    // SAFETY: loading libtorch_cuda runs its static initialisers, which only
    // register CUDA kernels with the already-loaded libtorch of the same version.
    match unsafe { Library::open(Some(&name), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(lib) => {
            // Keep it loaded for the life of the process: the registered
            // kernels point into it.
            std::mem::forget(lib);
            Ok(name)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Total memory of the first visible CUDA device in MiB, from the driver
/// API (`cuDeviceTotalMem_v2` of libcuda: no context is created, so it costs
/// the device nothing); `None` when the driver is missing or answers an error.
pub fn cuda_device_memory_mb() -> Option<u64> {
    type CuInit = unsafe extern "C" fn(flags: u32) -> i32;
    type CuDeviceGet = unsafe extern "C" fn(device: *mut i32, ordinal: i32) -> i32;
    type CuDeviceTotalMem = unsafe extern "C" fn(bytes: *mut usize, device: i32) -> i32;
    // SAFETY: libcuda's initialisers only set up the driver; the three
    // functions below have these C signatures in every CUDA 11+ driver, and
    // the library stays loaded while they are called.
    unsafe {
        let lib = Library::open(Some("libcuda.so.1"), RTLD_NOW).ok()?;
        let init: Symbol<CuInit> = lib.get(b"cuInit\0").ok()?;
        let device_get: Symbol<CuDeviceGet> = lib.get(b"cuDeviceGet\0").ok()?;
        let total_mem: Symbol<CuDeviceTotalMem> = lib.get(b"cuDeviceTotalMem_v2\0").ok()?;
        if init(0) != 0 {
            return None;
        }
        let mut device = 0i32;
        if device_get(&mut device, 0) != 0 {
            return None;
        }
        let mut bytes = 0usize;
        if total_mem(&mut bytes, device) != 0 {
            return None;
        }
        Some((bytes >> 20) as u64)
    }
}
