//! Reading a recipe file and the chain of files it `extends`.

use std::path::{Path, PathBuf};

use super::error::RecipeError;
use super::source::{Origin, SourceId, SourceMap};
use super::tree::{Table, parse_document};

/// Parse source `top` and every file it extends (transitively), deep-merged
/// base first. Returns the merged tree; `files` receives the paths in
/// reading order (top first) and ranks are set so base files sort first.
pub(crate) fn load_chain(
    sources: &mut SourceMap,
    top: SourceId,
    files: &mut Vec<PathBuf>,
) -> Result<Table, RecipeError> {
    let mut chain: Vec<(SourceId, PathBuf)> = vec![(top, identity(sources.name(top)))];
    let mut docs: Vec<Table> = Vec::new();
    loop {
        let (id, _) = chain[chain.len() - 1].clone();
        let mut doc = parse_document(sources, id)?;
        let extends = take_extends(sources, &mut doc)?;
        docs.push(doc);
        let Some((rel, origin)) = extends else { break };
        let base_path = sources.name(id).parent().unwrap_or(Path::new("")).join(&rel);
        let base_identity = identity(&base_path);
        if let Some(pos) = chain.iter().position(|(_, p)| *p == base_identity) {
            let cycle: Vec<String> = chain[pos..]
                .iter()
                .map(|(sid, _)| sources.name(*sid).display().to_string())
                .chain(std::iter::once(base_path.display().to_string()))
                .collect();
            return Err(RecipeError::at(sources, &origin, format!("`extends` cycle: {}", cycle.join(" -> "))));
        }
        let text = std::fs::read_to_string(&base_path).map_err(|e| {
            RecipeError::at(sources, &origin, format!("cannot read extended recipe `{}`: {e}", base_path.display()))
                .with_help("`extends` is a path relative to the file that contains it")
        })?;
        let base_id = sources.add(base_path, text);
        chain.push((base_id, base_identity));
    }
    files.extend(chain.iter().map(|(id, _)| sources.name(*id).to_path_buf()));
    // Base files declare first: rank them before the files extending them.
    for (rank, (id, _)) in chain.iter().rev().enumerate() {
        sources.set_rank(*id, rank);
    }
    let mut merged = Table::default();
    for doc in docs.into_iter().rev() {
        merged.merge(doc);
    }
    Ok(merged)
}

/// Path used to recognise the same file reached twice (cycle detection).
fn identity(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Remove `recipe.extends` from a parsed file, returning its path and origin.
fn take_extends(sources: &SourceMap, doc: &mut Table) -> Result<Option<(String, Origin)>, RecipeError> {
    let Some(recipe) = doc.entries.get_mut("recipe") else { return Ok(None) };
    let super::tree::NodeValue::Table(recipe) = &mut recipe.value.value else { return Ok(None) };
    let Some(entry) = recipe.remove("extends") else { return Ok(None) };
    match entry.value.as_str() {
        Some(path) if !path.is_empty() => Ok(Some((path.to_string(), entry.value.origin))),
        _ => Err(RecipeError::at(
            sources,
            &entry.value.origin,
            format!("`extends` must be a path to a recipe file, found {}", entry.value.type_name()),
        )
        .with_help("write `extends = \"base.toml\"` (relative to this file)")),
    }
}
