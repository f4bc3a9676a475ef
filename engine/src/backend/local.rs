//! The local backend: a ready stage runs in the scheduler's worker thread,
//! within this machine's cores, memory and CUDA devices, through
//! [`run_and_publish`] (lock, staging dir, rayon pool, publish). A
//! data-parallel stage's ranks 1.. are child processes of this binary
//! ([`LocalPeers`]) reading the stage's job spec.

use anyhow::Context as _;
use pipeline_cache::ActionRecord;

use super::interface::{Backend, ReadyStage, RunCtx};
use crate::jobspec::spec_path;
use crate::run::ranks::LocalPeers;
use crate::run::resources::{Capacity, ResourcePool};
use crate::run::stage_run::{Ranks, StageRun, run_and_publish};
use crate::workspace::StageStatus;

/// Stages run in threads of this process, within this machine's resources.
pub struct LocalBackend;

impl Backend for LocalBackend {
    fn resource_pool(&self, capacity: Capacity) -> ResourcePool {
        ResourcePool::new(capacity)
    }

    fn execute(&self, ctx: &RunCtx<'_>, stage: &ReadyStage<'_>) -> anyhow::Result<(ActionRecord, StageStatus)> {
        let id = stage.planned.id.as_str();
        let world_size = stage.planned.ranks;
        // Ranks 1.. are processes of this binary reading the stage's job spec;
        // the grant's threads are shared among the ranks.
        let threads = (stage.grant.threads / world_size.max(1)).max(1);
        let peers = if world_size > 1 {
            let cwd = std::env::current_dir().context("reading the current directory")?;
            stage.job_spec(ctx, cwd, world_size)?.write(ctx.cache)?;
            Some(LocalPeers {
                exe: std::env::current_exe().context("locating the running `pipeline` binary")?,
                cache_dir: ctx.cache.root().to_path_buf(),
                key: stage.key.hex(),
                threads,
                devices: stage.grant.cuda_devices(),
                log: stage.origin.log.clone(),
            })
        } else {
            None
        };
        let run = StageRun {
            id,
            kind: &stage.planned.kind,
            stage: stage.decl.stage.as_ref(),
            components: stage.components,
            key: stage.key,
            forced: stage.planned.forced,
            inputs: &stage.inputs,
            recipe_dir: ctx.recipe_dir,
            threads,
            device: stage.grant.device,
            memory_mb: stage.grant.memory_mb,
            origin: &stage.origin,
            ranks: match &peers {
                Some(launcher) => Ranks::Spawn { world_size, launcher },
                None => Ranks::Single,
            },
        };
        let notice = |line: &str| ctx.progress.println(line);
        let result = run_and_publish(ctx.cache, &run, ctx.progress.stage_sink(id), ctx.cancel.clone(), &notice);
        if peers.is_some() {
            let _ = std::fs::remove_file(spec_path(ctx.cache, &stage.key));
        }
        result
    }
}
