//! `--set KEY=VALUE` command-line overrides.
//!
//! Keys: `stage.NAME.param[.sub...]`, `recipe.KEY`, `sweep.NAME...`,
//! `executor.KEY[...]`, and the
//! shorthand `NAME.param` for `stage.NAME.param`. The value is parsed as a
//! TOML value, or taken as a string when it is not valid TOML (so
//! `--set data.root=/mnt/rexgct` works). Each argument becomes a source text
//! `<--set #N>` so errors about the value point into the argument itself.

use std::ops::Range;

use super::error::RecipeError;
use super::source::{Origin, SourceId, SourceMap};
use super::tree::{Entry, Node, NodeValue, Table, parse_value};
use stage_api::params::did_you_mean;

/// Apply `sets` in order on the merged recipe tree.
pub(crate) fn apply_sets(
    sources: &mut SourceMap,
    root: &mut Table,
    sets: &[String],
    rank: usize,
) -> Result<(), RecipeError> {
    for (i, arg) in sets.iter().enumerate() {
        let id = sources.add(format!("<--set #{}>", i + 1).into(), arg.clone());
        sources.set_rank(id, rank + i);
        let over = parse_set(sources, id, root)?;
        root.merge(over);
    }
    Ok(())
}

/// One `KEY=VALUE` argument as a nested table rooted at the document top.
fn parse_set(sources: &SourceMap, id: SourceId, root: &Table) -> Result<Table, RecipeError> {
    let arg = sources.text(id);
    let whole = Origin::new(id, 0..arg.len());
    let Some(eq) = arg.find('=') else {
        return Err(RecipeError::at(
            sources,
            &whole,
            format!("invalid `--set` argument `{arg}`: expected `KEY=VALUE`"),
        )
        .with_help("e.g. `--set stage.grpo.steps=10` or `--set data.root=/mnt/rexgct`"));
    };
    let mut segments = key_segments(sources, id, 0..eq)?;
    let (value_text, value_start) = trim_with_offset(&arg[eq + 1..], eq + 1);
    let value = parse_value(sources, id, value_start, value_text).unwrap_or_else(|| Node {
        origin: Origin::new(id, value_start..value_start + value_text.len()),
        value: NodeValue::Scalar(toml::Value::String(value_text.to_string())),
    });

    let first = segments[0].0.as_str();
    if !matches!(first, "stage" | "recipe" | "sweep" | "executor") {
        // Shorthand: `NAME.param` means `stage.NAME.param`.
        let span = segments[0].1.clone();
        segments.insert(0, ("stage".to_string(), span.start..span.start));
    }
    match segments[0].0.as_str() {
        "stage" => {
            let Some((name, span)) = segments.get(1) else {
                return Err(RecipeError::at(sources, &Origin::new(id, 0..eq), "`--set stage` needs a stage name")
                    .with_help("write `--set stage.NAME.PARAM=VALUE`"));
            };
            let stages = root.get("stage").and_then(Node::as_table);
            let known = stages.is_some_and(|t| t.get(name).is_some());
            if !known {
                let names: Vec<&str> = stages.map(|t| t.keys().collect()).unwrap_or_default();
                let hint = did_you_mean(name, names.iter().copied()).map(|b| format!("did you mean `{b}`?"));
                return Err(RecipeError::at(
                    sources,
                    &Origin::new(id, span.clone()),
                    format!("`--set` names unknown stage `{name}`"),
                )
                .with_help_opt(hint.or_else(|| Some(format!("stages in this recipe: {}", names.join(", "))))));
            }
            if segments.len() < 3 {
                return Err(RecipeError::at(sources, &Origin::new(id, 0..eq), "`--set` cannot replace a whole stage")
                    .with_help(format!("set one parameter: `--set {name}.PARAM=VALUE`")));
            }
        }
        "recipe" => {
            if segments.get(1).is_some_and(|(k, _)| k == "extends") {
                return Err(RecipeError::at(
                    sources,
                    &Origin::new(id, 0..eq),
                    "`recipe.extends` cannot be set with `--set`",
                )
                .with_help("write a small recipe that extends the other one instead"));
            }
            if segments.len() < 2 {
                return Err(RecipeError::at(sources, &Origin::new(id, 0..eq), "`--set recipe` needs a key")
                    .with_help("e.g. `--set recipe.seed=3`"));
            }
        }
        "executor" => {
            if segments.len() < 2 {
                return Err(RecipeError::at(sources, &Origin::new(id, 0..eq), "`--set executor` needs a key")
                    .with_help("e.g. `--set executor.partition=gpu`"));
            }
        }
        _ => {
            if segments.len() < 2 {
                return Err(RecipeError::at(sources, &Origin::new(id, 0..eq), "`--set sweep` needs a sweep name")
                    .with_help("e.g. `--set sweep.rewards.stage=grpo`"));
            }
        }
    }

    // Build `{a = {b = {c = value}}}` from the innermost key outwards.
    let mut node = value;
    for (key, span) in segments.into_iter().rev() {
        let key_origin = Origin::new(id, span);
        let mut table = Table::default();
        table.entries.insert(key, Entry { key: key_origin.clone(), value: node });
        node = Node { origin: key_origin, value: NodeValue::Table(table) };
    }
    match node.value {
        NodeValue::Table(table) => Ok(table),
        // `segments` is never empty, so the loop always wraps a table.
        _ => Ok(Table::default()),
    }
}

/// Split `a.b.c` into segments with their byte spans; empty segments are an error.
fn key_segments(
    sources: &SourceMap,
    id: SourceId,
    key: Range<usize>,
) -> Result<Vec<(String, Range<usize>)>, RecipeError> {
    let text = &sources.text(id)[key.clone()];
    let mut out = Vec::new();
    let mut start = key.start;
    for part in text.split('.') {
        let (trimmed, offset) = trim_with_offset(part, start);
        if trimmed.is_empty() {
            return Err(RecipeError::at(
                sources,
                &Origin::new(id, key.clone()),
                format!("invalid `--set` key `{}`: empty key segment", text.trim()),
            )
            .with_help("keys are dotted names, e.g. `stage.grpo.reward_weights.format`"));
        }
        out.push((trimmed.to_string(), offset..offset + trimmed.len()));
        start += part.len() + 1;
    }
    Ok(out)
}

fn trim_with_offset(s: &str, offset: usize) -> (&str, usize) {
    let lead = s.len() - s.trim_start().len();
    (s.trim(), offset + lead)
}
