//! What most commands start with: the recipe, its stage graph, the cache,
//! and the environment plans are made in.

use std::path::Path;

use anyhow::Context as _;
use pipeline_cache::Cache;
use pipeline_engine::EngineEnv;
use pipeline_engine::backend::planning_env;
use pipeline_engine::plan::StageGraph;
use pipeline_engine::recipe::{ExecutorKind, Recipe, load_recipe};
use stage_api::Registry;

use super::args::RecipeArgs;

pub fn open_cache(dir: &Path) -> anyhow::Result<Cache> {
    Cache::open(dir).with_context(|| format!("opening the cache at {}", dir.display()))
}

pub fn load(args: &RecipeArgs, registry: &Registry) -> anyhow::Result<(Recipe, StageGraph, Cache)> {
    let recipe = load_recipe(&args.recipe, &args.sets, registry)?;
    let graph = StageGraph::from_recipe(&recipe)?;
    let cache = open_cache(&args.cache.cache_dir)?;
    Ok((recipe, graph, cache))
}

/// The environment plans are made in for `executor` (default: the recipe's).
pub fn env_for(recipe: &Recipe, env: &EngineEnv, executor: Option<ExecutorKind>) -> EngineEnv {
    planning_env(recipe, env, executor.unwrap_or(recipe.executor.kind))
}
