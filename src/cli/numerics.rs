//! `[recipe] numerics = "reproducible"`: pin libtorch's kernel selection for
//! this whole process before anything computes with it. ATen, MKL and
//! oneDNN read their variables once, at their first use, and silently
//! ignore later changes (docs/numerics.md), so this runs first in `main`,
//! before the CUDA backend is loaded and before any thread exists.
//!
//! `pipeline run` takes the mode from the recipe, `exec-stage` (a Slurm job
//! or a data-parallel rank) from its job spec, so neither relies on
//! inheriting the submitting process's environment.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;

use anyhow::Context as _;
use pipeline_cache::Cache;
use pipeline_engine::jobspec::{JobSpec, spec_path};
use pipeline_engine::numerics::Numerics;
use pipeline_engine::recipe::load_recipe;
use stage_api::Registry;

use super::args::Command;
use super::exit::UsageError;

/// The numerics a command's stages will run with (`None`: it runs no stage,
/// or its recipe/spec does not load — the command reports that itself).
fn numerics_of(cmd: &Command, registry: &Registry) -> Option<Numerics> {
    match cmd {
        Command::Run(args) => load_recipe(&args.recipe.recipe, &args.recipe.sets, registry).ok().map(|r| r.numerics),
        Command::ExecStage { key, cache, .. } => {
            let key = key.parse().ok()?;
            let cache = Cache::open(&cache.cache_dir).ok()?;
            let spec = JobSpec::read(&spec_path(&cache, &key)).ok()?;
            // Only libtorch stages record numerics in their key.
            spec.components.numerics
        }
        _ => None,
    }
}

/// Set the pinned environment for this process. Changing the environment is
/// only sound while the process has one thread; otherwise (a library loaded
/// before `main` started one) re-execute this binary with the environment
/// set, which also covers variables read at load time.
pub fn pin_process(cmd: &Command, registry: &Registry) -> anyhow::Result<()> {
    let Some(numerics) = numerics_of(cmd, registry) else { return Ok(()) };
    let changes = numerics.process_env().map_err(|e| UsageError(e.to_string()))?;
    if changes.is_empty() {
        return Ok(());
    }
    if threads_of_this_process() == Some(1) {
        for (name, value) in &changes {
            // SAFETY: this process has a single thread (checked just above),
            // so nothing reads the environment concurrently.
            unsafe { std::env::set_var(name, value) };
        }
        tracing::debug!("numerics = reproducible: set {changes:?}");
        return Ok(());
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("pipeline"));
    tracing::debug!("numerics = reproducible: re-executing with {changes:?}");
    let err = std::process::Command::new("/proc/self/exe").arg0(arg0).args(args).envs(changes.iter().copied()).exec();
    Err(err).context("re-executing `pipeline` with the pinned numerics environment")
}

/// Threads of this process (Linux: entries of /proc/self/task).
fn threads_of_this_process() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}
