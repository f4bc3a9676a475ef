//! `pipeline run`: plan, pick the backend, run, and say how it went.

use std::process::ExitCode;

use pipeline_engine::EngineEnv;
use pipeline_engine::backend::{Backend, LocalBackend, SlurmBackend, slurm};
use pipeline_engine::plan::{Action, Selection, make_plan};
use pipeline_engine::recipe::ExecutorKind;
use pipeline_engine::run::scheduler::{RunOptions, Scheduler};
use pipeline_engine::workspace::{RunStatus, StageStatus, Workspace};
use stage_api::Registry;

use super::args::RunArgs;
use super::load::{env_for, load};
use super::progress::for_terminal;
use super::signals::cancel_flag;

/// `pipeline run`.
pub fn run(args: RunArgs, registry: &Registry, env: &EngineEnv, quiet: bool) -> anyhow::Result<ExitCode> {
    let (recipe, graph, cache) = load(&args.recipe, registry)?;
    let kind = args.executor.map_or(recipe.executor.kind, ExecutorKind::from);
    let env = &env_for(&recipe, env, Some(kind));
    let selection = Selection::build(&recipe, &graph, &args.select.options())?;
    let plan = make_plan(&recipe, &graph, &cache, &selection, env)?;
    for s in plan.stages.iter().filter(|s| s.action != Action::NotSelected) {
        for w in &s.warnings {
            tracing::warn!("stage `{}`: {w}", s.id);
        }
    }
    let workspace = Workspace::locate(args.workspace.as_deref(), recipe.dir());
    let progress = for_terminal(quiet);
    let backend: Box<dyn Backend> = match kind {
        ExecutorKind::Local => Box::new(LocalBackend),
        ExecutorKind::Slurm => Box::new(SlurmBackend::new(&recipe.executor)?),
    };
    let scheduler = Scheduler {
        recipe: &recipe,
        graph: &graph,
        cache: &cache,
        env,
        workspace: &workspace,
        progress,
        cancel: cancel_flag(),
        backend: backend.as_ref(),
    };
    let default_jobs = if kind == ExecutorKind::Slurm { slurm::DEFAULT_JOBS } else { env.cores };
    let jobs = args.jobs.unwrap_or(default_jobs).max(1);
    let outcome = scheduler.run(&plan, &RunOptions { jobs, keep_going: args.keep_going })?;
    let s = &outcome.summary;
    let line = format!(
        "{}: {} ran, {} cached, {} failed, {} skipped, {} not run in {:.1}s; summary: {}",
        s.recipe,
        s.count(StageStatus::Ran),
        s.count(StageStatus::Cached),
        s.count(StageStatus::Failed),
        s.count(StageStatus::Skipped),
        s.count(StageStatus::NotRun),
        s.duration_s,
        outcome.summary_path.display()
    );
    match s.status {
        RunStatus::Succeeded => {
            if !quiet {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RunStatus::Failed => {
            eprintln!("{line}");
            for st in s.stages.iter().filter(|st| st.status == StageStatus::Failed) {
                let log = st.log.as_ref().map(|l| format!(" (log: {})", l.display())).unwrap_or_default();
                eprintln!("error: stage `{}` failed{log}", st.id);
                for l in st.error.as_deref().unwrap_or("").lines() {
                    eprintln!("  {l}");
                }
            }
            Ok(ExitCode::FAILURE)
        }
        RunStatus::Cancelled => {
            eprintln!("cancelled; {line}");
            Ok(ExitCode::from(130))
        }
    }
}
