//! What the machine offers a run: cores, memory, CUDA devices. The binary
//! fills in the CUDA device count (the engine has no tch).

use std::collections::BTreeMap;

/// The machine as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEnv {
    pub cuda_devices: usize,
    /// Set when stages run elsewhere (Slurm): the CUDA devices each stage's
    /// job is given, by stage id. `None`: every stage sees `cuda_devices`.
    pub stage_gpus: Option<BTreeMap<String, usize>>,
    pub cores: usize,
    /// Memory available to stages, MiB.
    pub memory_mb: u64,
    /// Memory of one local GPU in MiB as the device reports it (filled by
    /// the binary); `None` without a GPU, or when stages run elsewhere.
    pub gpu_memory_mb: Option<u64>,
}

impl EngineEnv {
    /// Cores from the OS (respects cgroup limits), memory from
    /// `/proc/meminfo` (`MemAvailable`), with a conservative fallback. The
    /// binary sets `gpu_memory_mb` when it can ask the device.
    pub fn detect(cuda_devices: usize) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let memory_mb =
            std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| mem_available_mb(&text)).unwrap_or(4096);
        Self { cuda_devices, stage_gpus: None, cores, memory_mb, gpu_memory_mb: None }
    }

    /// CUDA devices stage `id` can use where it runs.
    pub fn cuda_for(&self, id: &str) -> usize {
        match &self.stage_gpus {
            Some(map) => map.get(id).copied().unwrap_or(0),
            None => self.cuda_devices,
        }
    }
}

fn mem_available_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(mem_available_mb(text), Some(20000));
        assert_eq!(mem_available_mb("MemTotal: 1 kB\n"), None);
        let env = EngineEnv::detect(0);
        assert!(env.cores >= 1 && env.memory_mb > 0);
    }
}
