//! The `pipeline` command line: argument structs, commands, printing,
//! signal handling and progress bars (the libraries have no CLI).
//!
//! * [`args`]: the engine's commands as clap structs; [`execute`] runs one.
//! * [`run`], [`plan`], [`cache`], [`kinds`], [`exec_stage`]: the commands.
//! * [`numerics`]: `[recipe] numerics`, applied to the process first thing.
//! * [`load`]: recipe, graph, cache and planning environment, as most
//!   commands need them; [`exit`]: exit codes; [`signals`]: Ctrl-C;
//!   [`progress`]: the engine's `RunProgress` on a console.
//! * [`model`], [`inspect`], [`report_compare`]: the model tools, NIfTI
//!   inspection and run comparison.

pub mod args;
pub mod cache;
pub mod exec_stage;
pub mod exit;
pub mod inspect;
pub mod kinds;
pub mod load;
pub mod model;
pub mod numerics;
pub mod plan;
pub mod progress;
pub mod report_compare;
pub mod run;
pub mod signals;

use std::process::ExitCode;

use pipeline_engine::EngineEnv;
use pipeline_engine::worker::RankArgs;
use stage_api::Registry;

use args::Command;

/// Run one engine command; `quiet` (`-q`) drops the per-stage progress lines.
pub fn execute(cmd: Command, registry: &Registry, env: &EngineEnv, quiet: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run(args) => run::run(args, registry, env, quiet),
        Command::Plan { recipe, select, json } => plan::plan(&recipe, &select, json, registry, env),
        Command::Dag { recipe, sets, dot } => plan::dag(&recipe, &sets, dot, registry),
        Command::Status(args) => plan::status(&args, registry, env),
        Command::Why { recipe, stage } => plan::why(&recipe, &stage, registry, env),
        Command::Show { recipe, stage } => plan::show(&recipe, &stage, registry, env),
        Command::Gc { recipes, dry_run, max_size, cache } => {
            cache::gc(recipes, dry_run, max_size, &cache, registry, env)
        }
        Command::Verify { cache } => cache::verify(&cache),
        Command::Clean { recipe, stages, all, sets, cache } => {
            cache::clean(recipe, stages, all, &sets, &cache, registry, env)
        }
        Command::ExecStage { key, cache, rank, world_size, rendezvous, threads, device } => {
            let ranks = RankArgs { rank, world_size, rendezvous, threads, device };
            exec_stage::run(&key, &cache.cache_dir, &ranks, registry, env)
        }
        Command::Kinds { reference: true, .. } => Ok(kinds::reference(registry)),
        Command::Kinds { doc: Some(path), write, .. } => kinds::check_doc(&path, write, registry),
        Command::Kinds { .. } => kinds::list(registry),
    }
}
