//! What a stage needs from the scheduler ([`Resources`], [`DeviceRequest`])
//! and the device it is given ([`Device`]). Its own module so that the
//! context a stage runs in and the stage trait both use it without
//! importing each other.

use serde::Serialize;

/// Where a stage wants to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRequest {
    /// CPU only.
    #[default]
    Cpu,
    /// A CUDA device if one exists, else the CPU.
    Auto,
    /// A CUDA device; an error when none exists (unless the recipe allows fallback).
    Cuda,
}

/// What a stage needs from the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// CPU threads for the stage's rayon pool; 0 = all cores.
    pub cpu: usize,
    pub device: DeviceRequest,
    /// Peak host memory of the whole stage (all its ranks) in MiB: local
    /// admission (stages that would not fit are not co-scheduled) and Slurm's
    /// `--mem`. A kind's fixed value; the planner replaces it with the
    /// prediction of [`StageKind::memory`](crate::StageKind::memory) when
    /// there is one.
    pub memory_mb: u64,
    /// The stage computes with libtorch: the recipe's `numerics` setting
    /// applies to it (in reproducible mode its thread count is the recipe's
    /// `numerics_threads`, and the mode enters its cache key).
    pub libtorch: bool,
}

impl Default for Resources {
    fn default() -> Self {
        Self { cpu: 1, device: DeviceRequest::Cpu, memory_mb: 256, libtorch: false }
    }
}

/// The device a stage was given. Stages that use tch convert it with
/// `tch::Device::Cuda(i)` / `tch::Device::Cpu`; the engine itself has no tch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Resource class recorded in the cache key when results depend on it.
    pub fn class(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }
}
