//! The generated part of `docs/recipes.md`: every registered stage kind
//! with its inputs and params (name, type, default, description), rendered
//! from the kinds' declarations and params JSON schemas so it cannot drift.

use serde_json::Value;

use stage_api::Registry;
use stage_api::StageDoc;

pub const BEGIN_MARKER: &str = "<!-- BEGIN GENERATED STAGE REFERENCE -->";
pub const END_MARKER: &str = "<!-- END GENERATED STAGE REFERENCE -->";

/// Markdown reference of every registered stage kind, sorted by kind.
pub fn render_stage_reference(registry: &Registry) -> String {
    let mut out = String::new();
    for kind in registry.iter() {
        render_kind(&mut out, &kind.doc());
    }
    out
}

/// `doc` with the text between the markers replaced by
/// [`render_stage_reference`] (markers appended at the end when missing).
/// Afterwards [`generated_section`] returns exactly the rendered text.
pub fn update_stage_reference(doc: &str, registry: &Registry) -> String {
    let rendered = render_stage_reference(registry);
    match section_bounds(doc) {
        Some((start, end)) => format!("{}{rendered}{}", &doc[..start], &doc[end..]),
        None => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{doc}{sep}{BEGIN_MARKER}\n{rendered}{END_MARKER}\n")
        }
    }
}

/// The text between the line holding the begin marker and the end marker.
pub fn generated_section(doc: &str) -> Option<&str> {
    section_bounds(doc).map(|(s, e)| &doc[s..e])
}

fn section_bounds(doc: &str) -> Option<(usize, usize)> {
    let begin = doc.find(BEGIN_MARKER)?;
    let after_begin = begin + BEGIN_MARKER.len();
    let start = doc[after_begin..].find('\n').map_or(doc.len(), |i| after_begin + i + 1);
    let end = start + doc[start..].find(END_MARKER)?;
    Some((start, end))
}

fn render_kind(out: &mut String, doc: &StageDoc) {
    out.push_str(&format!("### `{}` (version {})\n\n{}\n\n", doc.kind, doc.version, doc.summary));
    if doc.distributed {
        out.push_str(
            "Runs data-parallel: `[executor.stage.<id>] ranks = N` starts N processes that split each global batch \
             (see [scaling](scaling.md#data-parallel-training)).\n\n",
        );
    }
    if doc.inputs.is_empty() {
        out.push_str("Inputs: none.\n\n");
    } else {
        out.push_str("| input | takes | description |\n|---|---|---|\n");
        for input in doc.inputs {
            let takes = match (input.many, input.optional) {
                (true, true) => "list of stages, optional",
                (true, false) => "list of stages",
                (false, true) => "one stage, optional",
                (false, false) => "one stage",
            };
            out.push_str(&format!("| `{}` | {takes} | {} |\n", input.name, cell(input.doc)));
        }
        out.push('\n');
    }
    let mut rows = Vec::new();
    let defs = doc.params_schema.get("$defs").cloned().unwrap_or(Value::Null);
    collect_params(&doc.params_schema, &defs, "", &mut rows, 0);
    if rows.is_empty() {
        out.push_str("Params: none.\n\n");
    } else {
        out.push_str("| param | type | default | description |\n|---|---|---|---|\n");
        for row in rows {
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                row.name,
                cell(&row.ty),
                cell(&row.default),
                cell(&row.description)
            ));
        }
        out.push('\n');
    }
}

struct ParamRow {
    name: String,
    ty: String,
    default: String,
    description: String,
}

/// One row per property; properties of nested tables follow as `a.b`.
fn collect_params(schema: &Value, defs: &Value, prefix: &str, rows: &mut Vec<ParamRow>, depth: usize) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return };
    let mut names: Vec<&String> = props.keys().collect();
    names.sort();
    for name in names {
        let prop = &props[name];
        let resolved = resolve_ref(prop, defs);
        let description = prop
            .get("description")
            .or_else(|| resolved.get("description"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let default = prop.get("default").map_or_else(|| "required".to_string(), |d| format!("`{}`", inline_toml(d)));
        let full = format!("{prefix}{name}");
        rows.push(ParamRow { name: full.clone(), ty: type_name(prop, defs), default, description });
        if depth < 3 && resolved.get("properties").is_some() {
            collect_params(resolved, defs, &format!("{full}."), rows, depth + 1);
        }
    }
}

fn resolve_ref<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| defs.get(name))
        .unwrap_or(schema)
}

/// A short, recipe-oriented type: `integer`, `float`, `string`, `bool`,
/// `list of string`, `table`, `"a" \| "b"`, `integer or none`.
fn type_name(schema: &Value, defs: &Value) -> String {
    let schema = resolve_ref(schema, defs);
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values.iter().map(inline_toml).collect::<Vec<_>>().join(" or ");
    }
    if let Some(c) = schema.get("const") {
        return inline_toml(c);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let mut names: Vec<String> = Vec::new();
            let mut nullable = false;
            for alt in alts {
                let n = type_name(alt, defs);
                if n == "none" {
                    nullable = true;
                } else if !names.contains(&n) {
                    names.push(n);
                }
            }
            let joined = names.join(" or ");
            return if nullable { format!("{joined} (optional)") } else { joined };
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let nullable = types.contains(&"null");
    let names: Vec<String> = types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| match *t {
            "integer" => "integer".to_string(),
            "number" => "float".to_string(),
            "boolean" => "bool".to_string(),
            "string" => "string".to_string(),
            "array" => match schema.get("items") {
                Some(items) => format!("list of {}", type_name(items, defs)),
                None => "list".to_string(),
            },
            "object" => match schema.get("additionalProperties") {
                Some(v) if v.is_object() => format!("table of {}", type_name(v, defs)),
                _ => "table".to_string(),
            },
            other => other.to_string(),
        })
        .collect();
    match (names.is_empty(), nullable) {
        (true, true) => "none".to_string(),
        (true, false) => "any".to_string(),
        (false, true) => format!("{} (optional)", names.join(" or ")),
        (false, false) => names.join(" or "),
    }
}

/// A JSON default written the way it would appear in a recipe.
fn inline_toml(v: &Value) -> String {
    match v {
        Value::Null => "none".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => toml::Value::String(s.clone()).to_string(),
        Value::Array(items) => format!("[{}]", items.iter().map(inline_toml).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            if map.is_empty() {
                return "{}".to_string();
            }
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys.iter().map(|k| format!("{k} = {}", inline_toml(&map[*k]))).collect();
            format!("{{ {} }}", inner.join(", "))
        }
    }
}

/// Markdown table cells cannot hold `|` or newlines.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use stage_api::StageContext;
    use stage_api::{InputSpec, StageKind};
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, Default)]
    #[serde(rename_all = "lowercase")]
    enum Window {
        #[default]
        Wide,
        Lung,
    }

    #[derive(Debug, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct Weights {
        /// Weight of the format reward.
        format: f64,
    }
    impl Default for Weights {
        fn default() -> Self {
            Self { format: 1.0 }
        }
    }

    #[derive(Debug, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct Params {
        /// Minimum box area in pixels | strict.
        box_min_area: u64,
        /// HU window.
        window: Window,
        /// Optional root.
        root: Option<String>,
        /// Names.
        names: Vec<String>,
        /// Reward weights.
        weights: Weights,
        /// Extra.
        extra: BTreeMap<String, f64>,
    }
    impl Default for Params {
        fn default() -> Self {
            Self {
                box_min_area: 1300,
                window: Window::Wide,
                root: None,
                names: vec!["a".into()],
                weights: Weights::default(),
                extra: BTreeMap::new(),
            }
        }
    }

    struct Demo;
    impl StageKind for Demo {
        type Params = Params;
        const KIND: &'static str = "demo";
        const VERSION: u32 = 2;
        const SUMMARY: &'static str = "A demo kind.";
        fn inputs() -> &'static [InputSpec] {
            const INPUTS: &[InputSpec] =
                &[InputSpec::one("input", "The volumes."), InputSpec::many("evals", "Evaluations to gather.")];
            INPUTS
        }
        fn run(_: &Params, _: &mut StageContext) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn renders_inputs_and_params_with_types_and_defaults() {
        let text = render_stage_reference(&Registry::new().register::<Demo>());
        assert!(text.starts_with("### `demo` (version 2)\n\nA demo kind.\n"), "{text}");
        assert!(text.contains("| `input` | one stage | The volumes. |"), "{text}");
        assert!(text.contains("| `evals` | list of stages | Evaluations to gather. |"), "{text}");
        assert!(
            text.contains("| `box_min_area` | integer | `1300` | Minimum box area in pixels \\| strict. |"),
            "{text}"
        );
        assert!(text.contains("| `window` | \"wide\" or \"lung\" | `\"wide\"` | HU window. |"), "{text}");
        assert!(text.contains("| `root` | string (optional) | `none` | Optional root. |"), "{text}");
        assert!(text.contains("| `names` | list of string | `[\"a\"]` | Names. |"), "{text}");
        assert!(text.contains("| `weights` | table | `{ format = 1.0 }` | Reward weights. |"), "{text}");
        assert!(text.contains("| `weights.format` | float |"), "{text}");
        assert!(text.contains("| `extra` | table of float | `{}` | Extra. |"), "{text}");
    }

    #[test]
    fn update_replaces_only_the_marked_section() {
        let registry = Registry::new().register::<Demo>();
        let doc = format!("# Recipes\n\nintro\n\n{BEGIN_MARKER}\nstale\n{END_MARKER}\n\nafter\n");
        let updated = update_stage_reference(&doc, &registry);
        assert!(updated.starts_with("# Recipes\n\nintro\n\n"));
        assert!(updated.ends_with(&format!("{END_MARKER}\n\nafter\n")));
        assert_eq!(generated_section(&updated), Some(render_stage_reference(&registry).as_str()));
        // Idempotent.
        assert_eq!(update_stage_reference(&updated, &registry), updated);
        // Missing markers: the section is appended.
        let appended = update_stage_reference("# Recipes\n", &registry);
        assert_eq!(generated_section(&appended), Some(render_stage_reference(&registry).as_str()));
    }
}
