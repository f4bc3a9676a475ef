//! The narrow interface between the scheduler and a backend: a
//! [`ReadyStage`] (its final key, granted resources, inputs and origin)
//! and a [`RunCtx`] (cache, recipe directory, progress, cancellation) go
//! in; an action record comes out. A backend never sees the scheduler.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use pipeline_cache::{ActionRecord, Cache, Digest};
use stage_api::Artifact;

use crate::jobspec::{JOB_SPEC_FORMAT, JobInput, JobSpec};
use crate::plan::{KeyComponents, PlannedStage};
use crate::recipe::StageDecl;
use crate::run::progress::RunProgress;
use crate::run::resources::{Capacity, Grant, ResourcePool};
use crate::run::stage_run::RunOrigin;
use crate::workspace::StageStatus;

/// What a backend may use of the run it serves.
pub struct RunCtx<'a> {
    pub cache: &'a Cache,
    /// Where the recipe's relative paths resolve ([`crate::recipe::Recipe::dir`]).
    pub recipe_dir: &'a Path,
    /// Lines for the user, and a progress sink per stage.
    pub progress: &'a dyn RunProgress,
    /// Set on Ctrl-C / SIGTERM: running stages are told to stop.
    pub cancel: &'a Arc<AtomicBool>,
}

/// A stage whose upstreams are done and whose key is final.
pub struct ReadyStage<'a> {
    pub planned: &'a PlannedStage,
    pub decl: &'a StageDecl,
    /// What the scheduler granted (threads, device, memory).
    pub grant: Grant,
    pub components: &'a KeyComponents,
    pub key: Digest,
    /// Input name -> read-only artifact directories.
    pub inputs: BTreeMap<String, Vec<Artifact>>,
    /// Final records of the upstream stages it reads.
    pub upstream: &'a HashMap<String, ActionRecord>,
    pub origin: RunOrigin,
}

/// Where ready stages run.
pub trait Backend: Send + Sync {
    /// Admission control for the scheduler.
    fn resource_pool(&self, capacity: Capacity) -> ResourcePool;
    /// Produce the stage's record; `StageStatus::Cached` when it was reused.
    fn execute(&self, ctx: &RunCtx<'_>, stage: &ReadyStage<'_>) -> anyhow::Result<(ActionRecord, StageStatus)>;
}

impl ReadyStage<'_> {
    /// The job spec another process (`pipeline exec-stage`) runs this stage
    /// from, as `ranks` processes started in `cwd`.
    pub fn job_spec(&self, ctx: &RunCtx<'_>, cwd: PathBuf, ranks: usize) -> anyhow::Result<JobSpec> {
        let id = self.planned.id.as_str();
        let mut inputs: BTreeMap<String, Vec<JobInput>> = BTreeMap::new();
        for (name, refs) in &self.decl.inputs {
            for r in refs {
                let record = self
                    .upstream
                    .get(&r.stage)
                    .with_context(|| format!("stage `{id}`: upstream `{}` has no output record", r.stage))?;
                inputs.entry(name.clone()).or_default().push(JobInput {
                    stage: r.stage.clone(),
                    output: r.output.clone(),
                    record: record.key,
                });
            }
        }
        Ok(JobSpec {
            format: JOB_SPEC_FORMAT,
            key: self.key,
            stage_id: id.to_string(),
            components: self.components.clone(),
            inputs,
            forced: self.planned.forced,
            threads: self.grant.threads,
            memory_mb: self.grant.memory_mb,
            cwd,
            recipe_dir: ctx.recipe_dir.to_path_buf(),
            recipe_name: self.origin.recipe_name.clone(),
            recipe_path: self.origin.recipe_path.clone(),
            recipe_digest: self.origin.recipe_digest.clone(),
            git_revision: self.origin.git_revision.clone(),
            run_id: self.origin.run_id.clone(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            ranks,
        })
    }
}
