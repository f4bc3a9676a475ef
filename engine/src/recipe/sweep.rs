//! `[sweep.NAME]` tables: one stage expanded into named variants.
//!
//! ```toml
//! [sweep.rewards]
//! stage = "grpo"
//! variants = { no_validity = { reward_weights = { validity = 0.0 } }, all = {} }
//! # or: variants = [ { name = "no_validity", reward_weights = { validity = 0.0 } }, { name = "all" } ]
//! ```

use super::error::RecipeError;
use super::source::{Origin, SourceMap};
use super::tree::{Node, NodeValue, Table};
use stage_api::params::did_you_mean;

#[derive(Debug, Clone)]
pub(crate) struct SweepDef {
    pub name: String,
    /// The swept stage (a stage table name).
    pub stage: String,
    pub variants: Vec<VariantDef>,
}

#[derive(Debug, Clone)]
pub(crate) struct VariantDef {
    pub name: String,
    /// Deep-merged into the swept stage's table.
    pub overrides: Table,
}

const SWEEP_KEYS: &[&str] = &["stage", "variants"];

/// Parse all sweeps in declaration order, checking they name known stages
/// and that no stage is swept twice.
pub(crate) fn parse_sweeps(
    sources: &SourceMap,
    sweeps: Option<&Node>,
    stages: &Table,
) -> Result<Vec<SweepDef>, RecipeError> {
    let Some(node) = sweeps else { return Ok(Vec::new()) };
    let Some(table) = node.as_table() else {
        return Err(RecipeError::at(
            sources,
            &node.origin,
            format!("`sweep` must be a table, found {}", node.type_name()),
        )
        .with_help("declare sweeps as `[sweep.NAME]` tables"));
    };
    let mut out: Vec<(SweepDef, Origin)> = Vec::new();
    for (name, entry) in table.in_order(sources) {
        check_name(sources, &entry.key, name, "sweep")?;
        let sweep = parse_one(sources, name, &entry.value, stages)?;
        let stage_origin = entry.value.as_table().and_then(|t| t.get("stage")).map(|n| n.origin.clone());
        let stage_origin = stage_origin.unwrap_or_else(|| entry.value.origin.clone());
        if let Some((first, _)) = out.iter().find(|(s, _)| s.stage == sweep.stage) {
            return Err(RecipeError::at(
                sources,
                &stage_origin,
                format!("stage `{}` is swept twice (by `{}` and `{}`)", sweep.stage, first.name, sweep.name),
            )
            .with_help("merge the variants into one sweep, or sweep a copy of the stage"));
        }
        out.push((sweep, stage_origin));
    }
    Ok(out.into_iter().map(|(s, _)| s).collect())
}

fn parse_one(sources: &SourceMap, name: &str, node: &Node, stages: &Table) -> Result<SweepDef, RecipeError> {
    let Some(table) = node.as_table() else {
        return Err(RecipeError::at(
            sources,
            &node.origin,
            format!("sweep `{name}` must be a table, found {}", node.type_name()),
        ));
    };
    for (key, entry) in table.in_order(sources) {
        if !SWEEP_KEYS.contains(&key) {
            let hint = did_you_mean(key, SWEEP_KEYS.iter().copied()).map(|b| format!("did you mean `{b}`?"));
            return Err(RecipeError::at(sources, &entry.key, format!("unknown key `{key}` in sweep `{name}`"))
                .with_help(hint.unwrap_or_else(|| "a sweep has `stage` and `variants`".to_string())));
        }
    }
    let Some(stage_node) = table.get("stage") else {
        return Err(RecipeError::at(sources, &node.origin, format!("sweep `{name}` has no `stage`"))
            .with_help("name the stage to expand: `stage = \"grpo\"`"));
    };
    let Some(stage) = stage_node.as_str() else {
        return Err(RecipeError::at(
            sources,
            &stage_node.origin,
            format!("`stage` of sweep `{name}` must be a stage name, found {}", stage_node.type_name()),
        ));
    };
    if stages.get(stage).is_none() {
        let hint = did_you_mean(stage, stages.keys()).map(|b| format!("did you mean `{b}`?"));
        return Err(RecipeError::at(
            sources,
            &stage_node.origin,
            format!("sweep `{name}` names unknown stage `{stage}`"),
        )
        .with_help_opt(hint));
    }
    let Some(variants_node) = table.get("variants") else {
        return Err(RecipeError::at(sources, &node.origin, format!("sweep `{name}` has no `variants`"))
            .with_help("e.g. `variants = { low = { lr = 1e-6 }, high = { lr = 1e-5 } }`"));
    };
    let variants = parse_variants(sources, name, variants_node)?;
    Ok(SweepDef { name: name.to_string(), stage: stage.to_string(), variants })
}

fn parse_variants(sources: &SourceMap, sweep: &str, node: &Node) -> Result<Vec<VariantDef>, RecipeError> {
    let mut out: Vec<VariantDef> = Vec::new();
    match &node.value {
        NodeValue::Table(table) => {
            for (name, entry) in table.in_order(sources) {
                check_name(sources, &entry.key, name, "variant")?;
                let Some(overrides) = entry.value.as_table() else {
                    return Err(RecipeError::at(
                        sources,
                        &entry.value.origin,
                        format!(
                            "variant `{name}` of sweep `{sweep}` must be a table of parameter overrides, found {}",
                            entry.value.type_name()
                        ),
                    )
                    .with_help(format!("write `{name} = {{}}` for a variant without overrides")));
                };
                out.push(VariantDef { name: name.to_string(), overrides: overrides.clone() });
            }
        }
        NodeValue::Array(items) => {
            for item in items {
                let Some(table) = item.as_table() else {
                    return Err(RecipeError::at(
                        sources,
                        &item.origin,
                        format!("variants of sweep `{sweep}` must be tables, found {}", item.type_name()),
                    )
                    .with_help("write `{ name = \"low\", lr = 1e-6 }`"));
                };
                let mut overrides = table.clone();
                let Some(name_entry) = overrides.remove("name") else {
                    return Err(RecipeError::at(
                        sources,
                        &item.origin,
                        format!("a variant of sweep `{sweep}` has no `name`"),
                    )
                    .with_help("variant names become stage ids like `grpo@NAME`"));
                };
                let Some(name) = name_entry.value.as_str() else {
                    return Err(RecipeError::at(
                        sources,
                        &name_entry.value.origin,
                        format!("variant `name` must be a string, found {}", name_entry.value.type_name()),
                    ));
                };
                check_name(sources, &name_entry.value.origin, name, "variant")?;
                if out.iter().any(|v| v.name == name) {
                    return Err(RecipeError::at(
                        sources,
                        &name_entry.value.origin,
                        format!("variant `{name}` appears twice in sweep `{sweep}`"),
                    ));
                }
                out.push(VariantDef { name: name.to_string(), overrides });
            }
        }
        _ => {
            return Err(RecipeError::at(
                sources,
                &node.origin,
                format!(
                    "`variants` of sweep `{sweep}` must be a table or an array of tables, found {}",
                    node.type_name()
                ),
            ));
        }
    }
    if out.is_empty() {
        return Err(RecipeError::at(sources, &node.origin, format!("sweep `{sweep}` has no variants")));
    }
    for variant in &out {
        if let Some(entry) = variant.overrides.entry("kind") {
            return Err(RecipeError::at(
                sources,
                &entry.key,
                format!("variant `{}` of sweep `{sweep}` changes `kind`", variant.name),
            )
            .with_help("a sweep varies parameters of one stage kind; declare another stage instead"));
        }
    }
    Ok(out)
}

/// Stage, sweep and variant names become parts of stage ids
/// (`stage@variant+variant`, `stage.output`), so they are restricted to
/// letters, digits, `_` and `-`.
pub(crate) fn check_name(sources: &SourceMap, origin: &Origin, name: &str, what: &str) -> Result<(), RecipeError> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(RecipeError::at(sources, origin, format!("invalid {what} name `{name}`"))
            .with_help("use letters, digits, `_` and `-` only (`.`, `@` and `+` separate parts of stage ids)"))
    }
}
