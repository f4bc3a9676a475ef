//! The cache commands: `gc`, `verify` and `clean`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use bytesize::ByteSize;
use pipeline_cache::GcOptions;
use pipeline_engine::EngineEnv;
use pipeline_engine::index::RunIndex;
use pipeline_engine::plan::{PlannedStage, Selection, StageGraph, make_plan};
use pipeline_engine::recipe::load_recipe;
use stage_api::Registry;

use super::args::CacheArgs;
use super::exit::UsageError;
use super::load::{env_for, open_cache};
use super::plan::selected;

/// `pipeline verify`: rehash every blob; corrupt ones are quarantined.
pub fn verify(cache: &CacheArgs) -> anyhow::Result<ExitCode> {
    let cache = open_cache(&cache.cache_dir)?;
    let report = cache.verify().context("verifying the cache")?;
    println!("checked {} blobs ({})", report.blobs_checked, ByteSize(report.bytes_checked));
    for c in &report.corrupt {
        let digest = c.digest.map(|d| d.hex()).unwrap_or_else(|| "?".into());
        println!("corrupt blob {digest}: {} (moved to {})", c.path.display(), c.quarantined_to.display());
    }
    for r in &report.records_removed {
        println!("dropped record {r} (its outputs will be recomputed)");
    }
    if report.is_clean() {
        println!("cache is clean");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} corrupt blob(s), {} record(s) dropped", report.corrupt.len(), report.records_removed.len());
        Ok(ExitCode::FAILURE)
    }
}

/// Every `*.toml` under `dir`, sorted.
fn recipe_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `pipeline gc`: keep the outputs the recipes reference, drop the rest.
pub fn gc(
    recipes: Vec<PathBuf>,
    dry_run: bool,
    max_size: Option<String>,
    cache_args: &CacheArgs,
    registry: &Registry,
    env: &EngineEnv,
) -> anyhow::Result<ExitCode> {
    let max_size = max_size.as_deref().map(parse_size).transpose()?;
    let explicit = !recipes.is_empty();
    let files = if explicit { recipes } else { recipe_files(Path::new("recipes")) };
    let cache = open_cache(&cache_args.cache_dir)?;
    let mut keep = BTreeSet::new();
    let mut loaded = 0;
    for file in &files {
        let recipe = match load_recipe(file, &[], registry) {
            Ok(r) => r,
            // A base file meant only for `extends` may not load on its own.
            Err(e) if !explicit => {
                tracing::warn!(
                    "gc: skipping {} (does not load: {})",
                    file.display(),
                    e.to_string().lines().next().unwrap_or("")
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let graph = StageGraph::from_recipe(&recipe)?;
        let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
        keep.extend(plan.stages.iter().filter_map(|s| s.record.as_ref().map(|r| r.key)));
        loaded += 1;
    }
    if loaded == 0 {
        return Err(UsageError(
            "gc: no recipe loaded, so nothing would be kept; name the recipes to keep (or use `pipeline clean --all`)"
                .into(),
        )
        .into());
    }
    let report = cache.gc(&keep, &GcOptions { dry_run, max_size }).context("collecting garbage")?;
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "kept {} outputs of {loaded} recipe(s); {verb} {} record(s) ({} evicted for --max-size), {} blob(s), {} freed; {} remain",
        keep.len(),
        report.records_removed.len(),
        report.evicted.len(),
        report.blobs_removed,
        ByteSize(report.bytes_freed),
        ByteSize(report.bytes_remaining)
    );
    if !report.skipped_locked.is_empty() {
        println!("{} record(s) spared: in use by a running process", report.skipped_locked.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// `pipeline clean`: forget the outputs of some (or all) stages.
pub fn clean(
    recipe: Option<PathBuf>,
    stages: Vec<String>,
    all: bool,
    sets: &[String],
    cache_args: &CacheArgs,
    registry: &Registry,
    env: &EngineEnv,
) -> anyhow::Result<ExitCode> {
    let cache = open_cache(&cache_args.cache_dir)?;
    let Some(recipe_path) = recipe else {
        if !all {
            bail!(UsageError("clean: name a recipe and stages, or pass --all".into()));
        }
        let records = cache.records().context("listing cache records")?;
        for r in &records {
            cache.remove_record(&r.key).with_context(|| format!("removing record {}", r.key))?;
        }
        println!("removed {} record(s); run `pipeline gc` to free their blobs", records.len());
        return Ok(ExitCode::SUCCESS);
    };
    if stages.is_empty() && !all {
        bail!(UsageError("clean: name the stages to clean, or pass --all for every stage of the recipe".into()));
    }
    let recipe = load_recipe(&recipe_path, sets, registry)?;
    let graph = StageGraph::from_recipe(&recipe)?;
    let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
    let index = RunIndex::new(cache.root(), &recipe.name);
    let targets: Vec<&PlannedStage> = if all {
        plan.stages.iter().collect()
    } else {
        let mut v = Vec::new();
        for sel in &stages {
            v.extend(selected(&recipe, &plan, sel)?);
        }
        v
    };
    let mut removed = 0;
    for s in targets {
        if let Some(rec) = &s.record {
            cache.remove_record(&rec.key).with_context(|| format!("removing the record of `{}`", s.id))?;
            removed += 1;
            println!("cleaned {}", s.id);
        }
        index.remove(&s.id).with_context(|| format!("removing the run index entry of `{}`", s.id))?;
    }
    println!("removed {removed} record(s); run `pipeline gc` to free their blobs");
    Ok(ExitCode::SUCCESS)
}

/// `--max-size` values: `10G`, `500MiB`, `1.5 TB`, or plain bytes.
fn parse_size(text: &str) -> Result<u64, UsageError> {
    text.trim()
        .parse::<ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| UsageError(format!("--max-size `{text}`: expected a size like 10G or 500MiB ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("500MiB").unwrap(), 500 * 1024 * 1024);
        assert!(parse_size("lots").unwrap_err().to_string().contains("--max-size `lots`"));
    }
}
