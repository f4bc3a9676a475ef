//! The Slurm executor backend: every ready stage becomes one `sbatch` job
//! running `pipeline exec-stage <key>` (this very binary) against the same
//! cache, which must be on a filesystem the compute nodes share.
//!
//! The submitting process only schedules, submits, polls and reads the
//! published action record; the job locks the key, runs the stage and
//! publishes through the cache exactly like the local executor (see
//! [`crate::worker`]). Jobs are followed with batched `squeue` polls and
//! `sacct`; lost jobs (node failure, preemption, vanished) are resubmitted,
//! failed ones reported with their log; an interrupted run `scancel`s its jobs.

pub mod commands;
pub mod config;
pub mod script;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use pipeline_cache::ActionRecord;
use stage_api::Resources;

use super::interface::{Backend, ReadyStage, RunCtx};
use crate::env::EngineEnv;
use crate::jobspec::{META_SLURM_JOB, jobs_dir};
use crate::recipe::{ExecutorConfig, Recipe};
use crate::run::resources::{Capacity, ResourcePool};
use crate::workspace::StageStatus;
use commands::SlurmCommands;
use config::SlurmConfig;
use script::{JobRequest, job_name, stage_gpus};
use watch::{JobBoard, JobWatch, WatchOptions};

/// Stages in flight at once when `--jobs` is not given: Slurm queues the rest.
pub const DEFAULT_JOBS: usize = 64;

pub struct SlurmBackend {
    cfg: SlurmConfig,
    /// The recipe's `[executor]` table, for its per-stage overrides.
    executor: ExecutorConfig,
    board: JobBoard,
    /// The `pipeline` binary jobs run (the one submitting them).
    exe: PathBuf,
    /// Working directory of jobs (the submitting one).
    cwd: PathBuf,
}

/// The engine environment for planning a Slurm run: each stage sees the GPUs
/// its job will be given, not this (submit) host's.
pub fn planning_env(recipe: &Recipe, env: &EngineEnv) -> EngineEnv {
    let gpus: BTreeMap<String, usize> = recipe
        .stages
        .iter()
        .map(|d| (d.id.clone(), stage_gpus(&recipe.executor.stage_override(&d.id, &d.name), &d.stage.resources())))
        .collect();
    // The submitting host's GPU says nothing about the nodes'.
    EngineEnv { stage_gpus: Some(gpus), gpu_memory_mb: None, ..env.clone() }
}

impl SlurmBackend {
    /// Stages as `[executor]` says (Slurm settings and per-stage
    /// overrides); jobs run this process's own executable from the current
    /// directory.
    pub fn new(executor: &ExecutorConfig) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the running `pipeline` binary")?;
        let cwd = std::env::current_dir().context("reading the current directory")?;
        Ok(Self::with_commands(executor, SlurmCommands::default(), exe, cwd))
    }

    pub fn with_commands(executor: &ExecutorConfig, cmds: SlurmCommands, exe: PathBuf, cwd: PathBuf) -> Self {
        let cfg = executor.slurm.clone();
        let interval = Duration::from_secs_f64(cfg.poll_interval_s);
        Self { board: JobBoard::new(cmds, interval), cfg, executor: executor.clone(), exe, cwd }
    }

    fn log_dir(&self, ctx: &RunCtx<'_>, run_id: &str) -> PathBuf {
        match &self.cfg.log_dir {
            Some(dir) if dir.is_absolute() => dir.clone(),
            Some(dir) => self.cwd.join(ctx.recipe_dir).join(dir),
            None => ctx.cache.root().join("logs").join(run_id).join("slurm"),
        }
    }
}

impl Backend for SlurmBackend {
    fn resource_pool(&self, capacity: Capacity) -> ResourcePool {
        ResourcePool::jobs_only(capacity.jobs)
    }

    fn execute(&self, ctx: &RunCtx<'_>, stage: &ReadyStage<'_>) -> anyhow::Result<(ActionRecord, StageStatus)> {
        let id = stage.planned.id.as_str();
        let key = stage.key;
        let cache = ctx.cache;
        // Published meanwhile (another run, or an earlier job of ours): nothing to submit.
        if !stage.planned.forced
            && let Some(record) = cache.lookup(&key)?
        {
            return Ok((record, StageStatus::Cached));
        }
        let spec = stage.job_spec(ctx, self.cwd.clone(), stage.planned.ranks)?;
        let spec_path = spec.write(cache)?;

        let log_dir = self.log_dir(ctx, &stage.origin.run_id);
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating the job log dir {}", log_dir.display()))?;
        let safe_id: String = id.chars().map(|c| if matches!(c, '/' | '%' | '\\') { '_' } else { c }).collect();
        let log_pattern = log_dir.join(format!("{safe_id}-%j.log"));
        let command = vec![
            self.exe.display().to_string(),
            "exec-stage".to_string(),
            key.hex(),
            "--cache-dir".to_string(),
            cache.root().display().to_string(),
        ];
        let request = JobRequest::for_stage(
            &self.cfg,
            &self.executor.stage_override(id, &stage.decl.name),
            // The grant carries the memory the scheduler admitted (re-predicted
            // once the upstreams exist, when the plan could not).
            &Resources { memory_mb: stage.grant.memory_mb, ..stage.planned.resources },
            log_pattern.clone(),
            self.cwd.clone(),
            command,
            job_name(&stage.origin.recipe_name, id),
        );
        let script_path = jobs_dir(cache).join(format!("{}.sbatch", key.hex()));
        std::fs::write(&script_path, request.script())
            .with_context(|| format!("writing the batch script {}", script_path.display()))?;

        let log_of = |job: &str| PathBuf::from(log_pattern.display().to_string().replace("%j", job));
        let submit = || {
            let job = self.board.cmds.submit(&script_path, &self.cfg.extra_args)?;
            let log = log_of(&job);
            tracing::info!("submitted Slurm job {job}; log {}", log.display());
            ctx.progress.println(&format!("submit  {id}  (Slurm job {job}, log {})", log.display()));
            Ok(job)
        };
        // A forced stage has an older record under its key: only one written
        // by this job counts.
        let forced = stage.planned.forced;
        let published = |job: &str| -> anyhow::Result<Option<ActionRecord>> {
            Ok(cache.lookup(&key)?.filter(|r| !forced || published_by(r) == Some(job)))
        };
        let notify = |line: &str| {
            tracing::warn!("{line}");
            ctx.progress.println(&format!("        {id}: {line}"));
        };
        let opts = WatchOptions { poll: self.board_interval(), max_resubmits: self.cfg.max_resubmits, vanish_polls: 3 };
        let watch = JobWatch {
            board: &self.board,
            opts: &opts,
            cancel: ctx.cancel,
            submit: &submit,
            published: &published,
            log_of: &log_of,
            notify: &notify,
        };
        let (record, job) = watch.run().with_context(|| format!("stage `{id}` on Slurm"))?;
        tracing::info!("Slurm job {job} done; log {}", log_of(&job).display());
        let ours = published_by(&record) == Some(job.as_str());
        // The spec and script served their purpose (failed ones stay for inspection).
        let _ = std::fs::remove_file(&spec_path);
        let _ = std::fs::remove_file(&script_path);
        Ok((record, if ours { StageStatus::Ran } else { StageStatus::Cached }))
    }
}

/// The Slurm job that published a record (none for local runs).
fn published_by(record: &ActionRecord) -> Option<&str> {
    record.meta.get(META_SLURM_JOB).and_then(|v| v.as_str())
}

impl SlurmBackend {
    fn board_interval(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.poll_interval_s)
    }
}
