//! Where the stages of a run execute. The scheduler ([`crate::run::scheduler`])
//! is the same for every backend; a [`Backend`] decides how much may run at
//! once and turns one ready stage into a published (or reused) action
//! record, called from a worker thread of the scheduler. It sees the run
//! only through a narrow [`RunCtx`] (cache, recipe directory, progress,
//! cancellation), never the scheduler itself.
//!
//! * [`local`]: in this process, within this machine's cores, memory and
//!   CUDA devices.
//! * [`slurm`]: one `sbatch` job per stage running `pipeline exec-stage`
//!   ([`crate::worker`]) against a shared cache, with its own settings
//!   ([`slurm::config::SlurmConfig`]).

pub mod interface;
pub mod local;
pub mod slurm;

use crate::env::EngineEnv;
use crate::recipe::{ExecutorKind, Recipe};

pub use interface::{Backend, ReadyStage, RunCtx};
pub use local::LocalBackend;
pub use slurm::SlurmBackend;

/// The environment plans are made in for stages run by `kind`: under Slurm
/// each stage sees the GPUs its job gets (keys depend on the device class),
/// not this host's.
pub fn planning_env(recipe: &Recipe, env: &EngineEnv, kind: ExecutorKind) -> EngineEnv {
    match kind {
        ExecutorKind::Local => env.clone(),
        ExecutorKind::Slurm => slurm::planning_env(recipe, env),
    }
}
