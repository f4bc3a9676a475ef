//! `pipeline exec-stage <key>` (hidden): what a Slurm job or a rank of a
//! data-parallel stage runs; the engine's worker does the work, this
//! prints what happened.

use std::path::Path;
use std::process::ExitCode;

use pipeline_engine::EngineEnv;
use pipeline_engine::worker::{RankArgs, WorkerOutcome, exec_stage};
use pipeline_engine::workspace::StageStatus;
use stage_api::Registry;

use super::signals::cancel_flag;

pub fn run(
    key: &str,
    cache_dir: &Path,
    ranks: &RankArgs,
    registry: &Registry,
    env: &EngineEnv,
) -> anyhow::Result<ExitCode> {
    match exec_stage(key, cache_dir, registry, env, ranks, cancel_flag())? {
        WorkerOutcome::Peer { stage_id, rank, ran } => {
            println!("exec-stage: rank {rank} of `{stage_id}` {}", if ran { "done" } else { "not needed (cached)" });
        }
        WorkerOutcome::Published { stage_id, key, files, status } => {
            let verb = if status == StageStatus::Ran { "published" } else { "found cached" };
            println!("exec-stage: {verb} `{stage_id}` key {} ({files} files)", key.hex());
        }
    }
    Ok(ExitCode::SUCCESS)
}
