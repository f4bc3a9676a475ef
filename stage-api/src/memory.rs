//! A stage's predicted memory ([`MemoryEstimate`]): what `pipeline plan`
//! shows per rank, what local admission and Slurm's `--mem` use, and what
//! the planner compares with the GPU's memory.
//!
//! Memory comes in two pools: the accelerator's (`gpu`, only for a stage
//! that runs on CUDA) and the host's. Each pool holds [`MemoryTerm`]s alive
//! for the whole stage (weights, optimizer state) and [`Phase`]s whose
//! terms live only while the phase runs (a training micro-batch's
//! activations, generation's KV cache); a pool's peak is its resident terms
//! plus its largest phase.

use serde::Serialize;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;

/// One named amount of memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryTerm {
    /// What it is: `weights`, `optimizer moments`, `KV cache`, ...
    pub name: String,
    pub bytes: u64,
    /// How it was computed (the formula with its numbers).
    pub formula: String,
    /// The setting that shrinks it, as the recipe writes it (e.g.
    /// `batch_size`, `gradient_checkpointing = true`).
    pub fix: Option<String>,
}

impl MemoryTerm {
    pub fn new(name: impl Into<String>, bytes: u64, formula: impl Into<String>) -> Self {
        Self { name: name.into(), bytes, formula: formula.into(), fix: None }
    }

    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Terms alive only while one part of the stage runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phase {
    pub name: String,
    pub terms: Vec<MemoryTerm>,
}

impl Phase {
    pub fn new(name: impl Into<String>, terms: Vec<MemoryTerm>) -> Self {
        Self { name: name.into(), terms }
    }

    pub fn bytes(&self) -> u64 {
        self.terms.iter().map(|t| t.bytes).sum()
    }
}

/// One memory pool of one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MemoryPool {
    /// Alive for the whole stage.
    pub resident: Vec<MemoryTerm>,
    /// One at a time.
    pub phases: Vec<Phase>,
}

impl MemoryPool {
    pub fn resident_bytes(&self) -> u64 {
        self.resident.iter().map(|t| t.bytes).sum()
    }

    /// The phase with the most memory, if any.
    pub fn peak_phase(&self) -> Option<&Phase> {
        self.phases.iter().max_by_key(|p| p.bytes())
    }

    /// Resident terms plus the largest phase.
    pub fn peak_bytes(&self) -> u64 {
        self.resident_bytes() + self.peak_phase().map_or(0, Phase::bytes)
    }

    /// The largest single term at the peak (resident or of the peak phase).
    pub fn biggest_term(&self) -> Option<&MemoryTerm> {
        let phase = self.peak_phase().map(|p| p.terms.as_slice()).unwrap_or(&[]);
        self.resident.iter().chain(phase).max_by_key(|t| t.bytes)
    }

    /// Add `other`'s terms and phases (phases of the same name are joined).
    pub fn absorb(&mut self, other: MemoryPool) {
        self.resident.extend(other.resident);
        for phase in other.phases {
            match self.phases.iter_mut().find(|p| p.name == phase.name) {
                Some(p) => p.terms.extend(phase.terms),
                None => self.phases.push(phase),
            }
        }
    }
}

/// A prediction for one rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPrediction {
    /// The accelerator's memory; `None` when the stage runs on the CPU (then
    /// everything is in `host`).
    pub gpu: Option<MemoryPool>,
    pub host: MemoryPool,
    /// Assumptions the numbers rest on (sequence lengths, ...).
    pub notes: Vec<String>,
}

impl MemoryPrediction {
    /// A prediction for a stage on the CPU: the device terms go to the host.
    pub fn on_cpu(device: MemoryPool, host: MemoryPool, notes: Vec<String>) -> Self {
        let mut all = device;
        all.absorb(host);
        Self { gpu: None, host: all, notes }
    }

    pub fn on_gpu(device: MemoryPool, host: MemoryPool, notes: Vec<String>) -> Self {
        Self { gpu: Some(device), host, notes }
    }

    pub fn gpu_peak_bytes(&self) -> Option<u64> {
        self.gpu.as_ref().map(MemoryPool::peak_bytes)
    }

    pub fn host_peak_bytes(&self) -> u64 {
        self.host.peak_bytes()
    }
}

/// What a stage kind says about its memory at plan time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum MemoryEstimate {
    /// The kind has no model: its fixed [`Resources::memory_mb`](crate::Resources) stands.
    NotModelled,
    /// The kind models it but an input is not readable yet (e.g. "unknown
    /// until `sft` runs"); admission uses the fixed `memory_mb` until then.
    Unknown {
        reason: String,
    },
    Predicted(MemoryPrediction),
}

impl MemoryEstimate {
    pub fn prediction(&self) -> Option<&MemoryPrediction> {
        match self {
            MemoryEstimate::Predicted(p) => Some(p),
            _ => None,
        }
    }
}

/// `12.3G` (GiB, one decimal); below 1 GiB `412.5M` (MiB), so small
/// models do not read as `0.0G`.
pub fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 { format!("{:.1}M", bytes as f64 / MIB as f64) } else { format!("{:.1}G", bytes as f64 / GIB) }
}

/// Bytes rounded up to whole MiB (what `--mem` and admission count).
pub fn mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, gib: u64) -> MemoryTerm {
        MemoryTerm::new(name, gib << 30, "")
    }

    #[test]
    fn the_peak_is_the_resident_terms_plus_the_largest_phase() {
        let pool = MemoryPool {
            resident: vec![t("weights", 16), t("moments", 40)],
            phases: vec![
                Phase::new("train", vec![t("activations", 6), t("logits", 3)]),
                Phase::new("gen", vec![t("kv", 8)]),
            ],
        };
        assert_eq!(pool.peak_bytes(), 65 << 30);
        assert_eq!(pool.peak_phase().unwrap().name, "train");
        assert_eq!(pool.biggest_term().unwrap().name, "moments");
        assert_eq!(gib(pool.peak_bytes()), "65.0G");
        assert_eq!(mib_ceil((1 << 20) + 1), 2);
        assert_eq!(gib(3 << 19), "1.5M");
        assert_eq!(gib(1 << 30), "1.0G");
    }

    #[test]
    fn a_cpu_prediction_puts_every_term_in_host_memory() {
        let device = MemoryPool { resident: vec![t("weights", 1)], phases: vec![Phase::new("train", vec![t("a", 2)])] };
        let host = MemoryPool { resident: vec![t("data", 1)], phases: vec![Phase::new("train", vec![t("batch", 1)])] };
        let p = MemoryPrediction::on_cpu(device, host, vec![]);
        assert!(p.gpu.is_none());
        assert_eq!(p.host_peak_bytes(), 5 << 30, "phases of one name add up");
    }
}
