//! The pipeline engine: a TOML recipe becomes typed stages, a DAG, a plan
//! with one cache key per stage, and a run whose outputs the
//! content-addressed cache (`pipeline-cache`) publishes. It names no stage
//! kind (the binary's [`stage_api::Registry`] does) and has no command line:
//! the `pipeline` binary parses arguments, prints, handles signals and draws
//! progress bars; the engine reports through [`run::progress::RunProgress`]
//! and is told to stop through a plain `Arc<AtomicBool>`.
//!
//! The rooms, in the order a recipe travels through them:
//! * [`recipe`]: TOML -> [`recipe::Recipe`] (`extends`, sweeps, `--set`,
//!   located errors), its stages in the one topological order.
//! * [`plan`]: the stage graph, ALL key derivation, what a run selects, and
//!   for each stage: cached or run, and why.
//! * [`run`]: the scheduler (dependencies, resources, `--jobs`,
//!   `--keep-going`, cancellation), and [`run::stage_run`], the one path
//!   that locks a key, runs a stage into staging and publishes it.
//! * [`backend`]: where a ready stage runs (this machine, or a Slurm job).
//! * [`jobspec`] + [`worker`]: a stage handed to another process as plain
//!   data, and `pipeline exec-stage` running it through the same stage_run.
//! * [`numerics`]: `[recipe] numerics`, the process-wide kernel pinning of
//!   libtorch stages (what the binary sets first, keys, provenance).
//! * [`workspace`], [`provenance`], [`index`], [`env`](mod@env), [`stage_log`]: what
//!   a run leaves for people and remembers for next time, the machine, and
//!   per-stage log files.

pub mod backend;
pub mod env;
pub mod index;
pub mod jobspec;
pub mod numerics;
pub mod plan;
pub mod provenance;
pub mod recipe;
pub mod run;
pub mod stage_log;
pub mod worker;
pub mod workspace;

pub use env::EngineEnv;
