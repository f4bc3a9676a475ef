//! Recipes: TOML files that declare stages, their params and inputs, and
//! sweeps, turned into a topologically sorted list of configured stages.
//!
//! Every mistake is reported with file, line and column (see
//! [`RecipeError`]); values that came from an `extends` file or a `--set`
//! argument point at where they were written. The format is documented in
//! `docs/recipes.md`.

mod build;
mod decl;
pub mod docs;
mod error;
mod executor;
mod load;
pub mod names;
pub mod order;
mod overrides;
mod source;
mod sweep;
mod tree;

use std::path::{Path, PathBuf};

pub use decl::{ExecutorConfig, ExecutorKind, InputRef, Recipe, StageDecl, StageOverride, SweepInfo};
pub use docs::{render_stage_reference, update_stage_reference};
pub use error::RecipeError;
pub use load::MAX_RECIPE_BYTES;
pub use source::SourceLoc;

use source::{Origin, SourceMap};
use stage_api::Registry;
use stage_api::params::did_you_mean;

use crate::numerics::{self, Numerics, NumericsMode};
use tree::{Node, Table};

/// Read, merge, override and check a recipe file.
pub fn load_recipe(path: &Path, sets: &[String], registry: &Registry) -> Result<Recipe, RecipeError> {
    let src = load::read_recipe_file(path, MAX_RECIPE_BYTES)
        .map_err(|e| RecipeError::new(format!("cannot read recipe `{}`: {e}", path.display())))?;
    load_recipe_str(&src, path, sets, registry)
}

/// Like [`load_recipe`] with the top file's text given; `virtual_path`
/// names it in errors and anchors relative `extends` paths.
pub fn load_recipe_str(
    src: &str,
    virtual_path: &Path,
    sets: &[String],
    registry: &Registry,
) -> Result<Recipe, RecipeError> {
    if src.len() as u64 > MAX_RECIPE_BYTES {
        return Err(RecipeError::new(format!(
            "cannot read recipe `{}`: {}",
            virtual_path.display(),
            load::ReadError::TooLarge
        )));
    }
    let mut sources = SourceMap::default();
    let top = sources.add(virtual_path.to_path_buf(), src.to_string());
    let mut files = Vec::new();
    let mut root = load::load_chain(&mut sources, top, &mut files)?;
    overrides::apply_sets(&mut sources, &mut root, sets, files.len())?;

    let mut canonical = String::new();
    root.write_canonical(&mut canonical);
    let digest = blake3::hash(canonical.as_bytes()).to_hex().to_string();

    check_top_level(&sources, &root)?;
    let header = parse_header(&sources, root.get("recipe"), virtual_path)?;
    let Some(stage_node) = root.get("stage") else {
        return Err(RecipeError::at(&sources, &Origin::new(top, 0..0), "the recipe declares no stages")
            .with_help("add a stage: `[stage.NAME]` with `kind = \"...\"`"));
    };
    let Some(stage_table) = stage_node.as_table() else {
        return Err(RecipeError::at(
            &sources,
            &stage_node.origin,
            format!("`stage` must be a table, found {}", stage_node.type_name()),
        )
        .with_help("declare stages as `[stage.NAME]` tables"));
    };
    let sweeps = sweep::parse_sweeps(&sources, root.get("sweep"), stage_table)?;
    let stages = build::build_stages(&sources, stage_table, &sweeps, header.seed, registry)?;
    let executor = executor::parse_executor(&sources, root.get("executor"), &stages)?;

    let dir = match virtual_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(Recipe {
        name: header.name,
        path: virtual_path.to_path_buf(),
        dir,
        seed: header.seed,
        allow_cpu_fallback: header.allow_cpu_fallback,
        numerics: header.numerics,
        description: header.description,
        digest,
        stages,
        sweeps: sweeps
            .iter()
            .map(|s| SweepInfo {
                name: s.name.clone(),
                stage: s.stage.clone(),
                variants: s.variants.iter().map(|v| v.name.clone()).collect(),
            })
            .collect(),
        files,
        executor,
    })
}

/// Select stages by a CLI argument: a table name selects all its variants
/// (`grpo` -> `grpo@a`, `grpo@b`), an exact id selects one, and
/// `name@part` selects the variants whose id contains that variant part
/// (`eval@a` -> `eval@a+x`, `eval@a+y`).
pub fn resolve_stage_selector<'r>(recipe: &'r Recipe, selector: &str) -> Result<Vec<&'r StageDecl>, RecipeError> {
    if let Some(exact) = recipe.stage(selector) {
        return Ok(vec![exact]);
    }
    let by_name: Vec<&StageDecl> = recipe.stages.iter().filter(|s| s.name == selector).collect();
    if !by_name.is_empty() {
        return Ok(by_name);
    }
    if let Some((name, parts)) = selector.split_once('@') {
        let wanted: Vec<&str> = parts.split('+').collect();
        let partial: Vec<&StageDecl> = recipe
            .stages
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| s.variant.as_deref().is_some_and(|v| wanted.iter().all(|w| v.split('+').any(|p| p == *w))))
            .collect();
        if !partial.is_empty() {
            return Ok(partial);
        }
    }
    let mut candidates: Vec<&str> = recipe.stages.iter().map(|s| s.id.as_str()).collect();
    candidates.extend(recipe.stages.iter().map(|s| s.name.as_str()));
    candidates.dedup();
    let err = RecipeError::new(format!("no stage `{selector}` in recipe `{}`", recipe.name));
    Err(match did_you_mean(selector, candidates.iter().copied()) {
        Some(best) => err.with_help(format!("did you mean `{best}`?")),
        None => err.with_help(format!(
            "stages: {}",
            recipe.stages.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(", ")
        )),
    })
}

const TOP_LEVEL: &[&str] = &["recipe", "stage", "sweep", "executor"];
const RECIPE_KEYS: &[&str] =
    &["name", "seed", "extends", "allow_cpu_fallback", "numerics", "numerics_threads", "description"];

fn check_top_level(sources: &SourceMap, root: &Table) -> Result<(), RecipeError> {
    for (key, entry) in root.in_order(sources) {
        if !TOP_LEVEL.contains(&key) {
            let what = if entry.value.as_table().is_some() { "table" } else { "key" };
            let hint =
                did_you_mean(key, TOP_LEVEL.iter().copied()).map(|b| format!("did you mean `[{b}]`?")).unwrap_or_else(
                    || "a recipe has `[recipe]`, `[stage.NAME]`, `[sweep.NAME]` and `[executor]` tables".to_string(),
                );
            return Err(
                RecipeError::at(sources, &entry.key, format!("unknown top-level {what} `{key}`")).with_help(hint)
            );
        }
    }
    Ok(())
}

struct Header {
    name: String,
    seed: u64,
    allow_cpu_fallback: bool,
    numerics: Numerics,
    description: Option<String>,
}

fn parse_header(sources: &SourceMap, node: Option<&Node>, path: &Path) -> Result<Header, RecipeError> {
    let default_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut header = Header {
        name: default_name,
        seed: 0,
        allow_cpu_fallback: false,
        numerics: Numerics::default(),
        description: None,
    };
    let Some(node) = node else {
        names::check_recipe_name(sources, None, &header.name)?;
        return Ok(header);
    };
    let Some(table) = node.as_table() else {
        return Err(RecipeError::at(
            sources,
            &node.origin,
            format!("`recipe` must be a table, found {}", node.type_name()),
        ));
    };
    let mut name_origin = None;
    for (key, entry) in table.in_order(sources) {
        let value = &entry.value;
        let expected = |what: &str| {
            RecipeError::at(
                sources,
                &value.origin,
                format!("`recipe.{key}` must be {what}, found {}", value.type_name()),
            )
        };
        match key {
            "name" => {
                header.name = value.as_str().ok_or_else(|| expected("a string"))?.to_string();
                name_origin = Some(&value.origin);
            }
            "description" => header.description = Some(value.as_str().ok_or_else(|| expected("a string"))?.to_string()),
            "seed" => header.seed = build::seed_value(sources, value, "recipe.seed")?,
            "allow_cpu_fallback" => match value.to_toml() {
                toml::Value::Boolean(b) => header.allow_cpu_fallback = b,
                _ => return Err(expected("`true` or `false`")),
            },
            "numerics" => {
                header.numerics.mode = match value.to_toml() {
                    toml::Value::String(s) if s == "fast" => NumericsMode::Fast,
                    toml::Value::String(s) if s == "reproducible" => NumericsMode::Reproducible,
                    other => {
                        return Err(RecipeError::at(
                            sources,
                            &value.origin,
                            format!("`recipe.numerics` must be \"fast\" or \"reproducible\", found {other}"),
                        ));
                    }
                }
            }
            "numerics_threads" => match value.to_toml() {
                toml::Value::Integer(n) if (1..=numerics::MAX_THREADS as i64).contains(&n) => {
                    header.numerics.threads = n as usize
                }
                other => {
                    return Err(RecipeError::at(
                        sources,
                        &value.origin,
                        format!(
                            "`recipe.numerics_threads` must be an integer from 1 to {}, found {other}",
                            numerics::MAX_THREADS
                        ),
                    ));
                }
            },
            _ => {
                let hint = did_you_mean(key, RECIPE_KEYS.iter().copied())
                    .map(|b| format!("did you mean `{b}`?"))
                    .unwrap_or_else(|| format!("`[recipe]` accepts: {}", RECIPE_KEYS.join(", ")));
                return Err(
                    RecipeError::at(sources, &entry.key, format!("unknown key `{key}` in `[recipe]`")).with_help(hint)
                );
            }
        }
    }
    names::check_recipe_name(sources, name_origin, &header.name)?;
    Ok(header)
}

#[cfg(test)]
mod tests;
