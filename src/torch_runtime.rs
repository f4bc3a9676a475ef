//! Run-time CUDA for a CPU-linked binary.
//!
//! The default build links the CPU part of libtorch (see docs/libtorch.md).
//! libtorch's CUDA kernels live in `libtorch_cuda.so` and register themselves
//! when that library is loaded, so if a CUDA build of the same libtorch
//! version is reachable (its `lib/` on `LD_LIBRARY_PATH`, or the file named by
//! `PIPELINE_LIBTORCH_CUDA`), loading it globally before the first tch call
//! makes CUDA devices available — one binary for CPU and GPU machines.

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

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
