//! What a loaded recipe is: the [`Recipe`], its stages ([`StageDecl`], sweeps
//! expanded, in dependency order) with their resolved input references,
//! and its `[executor]` table ([`ExecutorConfig`], parsed by `executor.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stage_api::{ConfiguredStage, DynStageKind};

use super::source::SourceLoc;
use crate::backend::slurm::config::SlurmConfig;

/// One resolved input reference of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    /// Resolved upstream stage id, including the variant (`"sft"`, `"grpo@all"`).
    pub stage: String,
    /// Named output of the upstream stage (`"split.train"` -> `train`), or
    /// `None` for its whole output directory.
    pub output: Option<String>,
    /// Where the reference was written.
    pub loc: SourceLoc,
}

/// One stage instance to plan and run (sweeps already expanded).
#[derive(Clone)]
pub struct StageDecl {
    /// `"slices"`, or `"grpo@no_validity"` for a sweep variant.
    pub id: String,
    /// The stage table name in the recipe (`"grpo"`).
    pub name: String,
    /// `"no_validity"`, or `"a+x"` where independent sweeps multiply.
    pub variant: Option<String>,
    pub kind: Arc<dyn DynStageKind>,
    /// Parsed and validated params.
    pub stage: Arc<dyn ConfiguredStage>,
    /// Input name -> references (exactly one for an input that is not `many`).
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    /// Ordering-only dependencies (stage ids), from `after = [...]`.
    pub after: Vec<String>,
    pub seed: u64,
    /// The `[stage.NAME]` header (or the inline table) declaring the stage.
    pub loc: SourceLoc,
}

impl std::fmt::Debug for StageDecl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageDecl")
            .field("id", &self.id)
            .field("kind", &self.kind.kind())
            .field("params", &self.stage.canonical_params())
            .field("inputs", &self.inputs)
            .field("after", &self.after)
            .field("seed", &self.seed)
            .finish()
    }
}

impl StageDecl {
    /// Ids of every stage this one depends on (data inputs, then `after`),
    /// without duplicates, in recipe order.
    pub fn dependencies(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let refs = self.inputs.values().flatten().map(|r| r.stage.as_str());
        for id in refs.chain(self.after.iter().map(String::as_str)) {
            if !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }
}

/// A sweep as declared (for `plan`/`show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepInfo {
    pub name: String,
    pub stage: String,
    pub variants: Vec<String>,
}

/// A loaded recipe: merged with its `extends` chain, `--set` applied,
/// params parsed, sweeps expanded, stages in dependency order.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub path: PathBuf,
    /// See [`Recipe::dir`].
    pub(super) dir: PathBuf,
    pub seed: u64,
    pub allow_cpu_fallback: bool,
    /// `numerics` and `numerics_threads`: how libtorch stages compute.
    pub numerics: crate::numerics::Numerics,
    pub description: Option<String>,
    /// blake3 (hex) of the merged, `--set`-applied recipe in canonical form.
    pub digest: String,
    /// Topologically sorted; ties keep declaration order.
    pub stages: Vec<StageDecl>,
    pub sweeps: Vec<SweepInfo>,
    /// This file and every file it extends (top first).
    pub files: Vec<PathBuf>,
    /// `[executor]`: where stages run (never part of a cache key).
    pub executor: ExecutorConfig,
}

impl Recipe {
    pub fn stage(&self, id: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.id == id)
    }

    /// Directory of the top recipe file (`.` when its path has none):
    /// relative paths in params, `external_inputs` and `[executor] log_dir`
    /// resolve here.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Which executor runs the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// Threads of this process, within this machine's cores, memory and GPUs.
    #[default]
    Local,
    /// One `sbatch` job per stage, against a cache on a shared filesystem.
    Slurm,
}

impl ExecutorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

/// The parsed `[executor]` table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecutorConfig {
    pub kind: ExecutorKind,
    /// Read even with `kind = "local"`, so `--executor slurm` finds them.
    pub slurm: SlurmConfig,
    /// `[executor.stage.<name or id>]` overrides.
    pub stages: BTreeMap<String, StageOverride>,
    /// `gpu_memory_gb`: the memory of one GPU where the stages run, in GiB;
    /// `plan` checks each CUDA stage's predicted per-rank peak against it
    /// (else against the local GPU's reported memory). Never in a key.
    pub gpu_memory_gb: Option<f64>,
}

impl ExecutorConfig {
    /// The override for a stage: its exact id wins over its name.
    pub fn stage_override(&self, id: &str, name: &str) -> StageOverride {
        self.stages.get(id).or_else(|| self.stages.get(name)).cloned().unwrap_or_default()
    }
}

/// `[executor.stage.<id>]`: how one stage runs: its data-parallel ranks
/// (both executors) and what its job asks Slurm for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StageOverride {
    /// Processes running the stage together (absent: 1).
    pub ranks: Option<usize>,
    pub cpus: Option<usize>,
    pub gpus: Option<usize>,
    pub mem_mb: Option<u64>,
    pub time: Option<String>,
}
