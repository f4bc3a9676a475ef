//! What a memory prediction reads and assumes at plan time: the model's
//! `config.json` and `preprocessor_config.json` (a published checkpoint or
//! the stand-in of one still to come), the process's own host memory, and
//! the assumed question length.

use std::path::Path;

use stage_api::{MemoryPrediction, MemoryTerm};

use crate::config::{CONFIG_FILE, Qwen25VlConfig};
use crate::processor::ImageProcessor;

/// Characters of a question block with its options (the `vqa` stage's
/// question and seven classes are ≈ 280); an assumption, not data.
pub const QUESTION_CHARS: u64 = 320;

/// Host memory of a model stage's process before it loads anything: the
/// binary, libtorch and its CPU kernels, tokenizer and allocator pools.
/// CPU: measured, 152–156 MiB (`docs/benchmarks.md`, the memory probe's
/// baseline after a warm-up run). CUDA:
/// assumed (libtorch_cuda, cuBLAS and cuDNN kernels and the CUDA context's
/// host side; unmeasured).
pub const RUNTIME_CPU_BYTES: u64 = 160 << 20;
pub const RUNTIME_CUDA_BYTES: u64 = 4 << 30;

/// The process's own host memory.
pub fn runtime_term(cuda: bool) -> MemoryTerm {
    if cuda {
        MemoryTerm::new("runtime", RUNTIME_CUDA_BYTES, "libtorch + CUDA libraries and context (assumed)")
    } else {
        MemoryTerm::new("runtime", RUNTIME_CPU_BYTES, "libtorch and the process (measured baseline)")
    }
}

/// Bytes staged in host memory while a checkpoint is written: one shard
/// (`max_shard_mb`) or the whole model if smaller.
pub fn save_shard_bytes(model_bytes: u64, max_shard_mb: u64) -> u64 {
    model_bytes.min(max_shard_mb.saturating_mul(1 << 20))
}

/// What the model's files say that memory depends on.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub config: Qwen25VlConfig,
    /// The processor's pixel bound per image.
    pub max_pixels: u64,
    pub patch_size: u64,
    pub merge_size: u64,
    pub temporal_patch_size: u64,
}

impl ModelFacts {
    /// Read `dir/config.json` and `dir/preprocessor_config.json` (release
    /// defaults when absent); errors name the file.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let config = Qwen25VlConfig::from_file(&dir.join(CONFIG_FILE)).map_err(|e| e.to_string())?;
        let p = ImageProcessor::from_checkpoint(dir).map_err(|e| e.to_string())?;
        Ok(Self {
            config,
            max_pixels: p.max_pixels as u64,
            patch_size: p.patch_size as u64,
            merge_size: p.merge_size as u64,
            temporal_patch_size: p.temporal_patch_size as u64,
        })
    }

    /// Values per vision patch (3 × temporal × patch²: 1176).
    pub fn patch_dim(&self) -> u64 {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// The name of the CPU allocator allowance (see [`add_cpu_allocator_retention`]).
pub const RETENTION: &str = "allocator retention (glibc)";

/// Share of a phase's transient bytes glibc keeps resident after they are
/// freed (its dynamic mmap threshold serves freed tensor sizes from the heap,
/// which returns memory only from the top). Fitted on the memory probe's
/// runs (docs/benchmarks.md: 0.24–1.07 of the peak phase, GRPO highest);
/// with `MALLOC_MMAP_THRESHOLD_` fixed the retention disappears.
pub const GLIBC_RETENTION: f64 = 0.5;

/// On the CPU, add to every phase the heap glibc is expected to retain, so
/// admission and `--mem` count resident memory, not only live tensors.
pub fn add_cpu_allocator_retention(pred: &mut MemoryPrediction) {
    if pred.gpu.is_some() {
        return;
    }
    for phase in &mut pred.host.phases {
        let bytes = (phase.bytes() as f64 * GLIBC_RETENTION) as u64;
        phase.terms.push(MemoryTerm::new(
            RETENTION,
            bytes,
            format!("{GLIBC_RETENTION} × the phase: freed heap glibc keeps (measured 0.24–1.07)"),
        ));
    }
}
