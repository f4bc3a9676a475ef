//! From the merged `[stage.*]` tables to [`StageDecl`]s: kinds, seeds,
//! input references, params, the dependency order, and sweep expansion.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::decl::{InputRef, StageDecl};
use super::error::RecipeError;
use super::order::stable_topo_order;
use super::source::{Origin, SourceMap};
use super::sweep::{SweepDef, check_name};
use super::tree::{Node, NodeValue, Table};
use stage_api::Registry;
use stage_api::params::{ParamError, did_you_mean};
use stage_api::{ConfiguredStage, DynStageKind};

/// Keys of a stage table that are neither inputs nor params.
pub(crate) const RESERVED_KEYS: &[&str] = &["kind", "seed", "after"];

/// A reference as written: `stage`, `stage.output`, `stage@variant(.output)`.
#[derive(Debug, Clone)]
struct RawRef {
    /// Index of the referenced stage table.
    stage: usize,
    /// Pinned variant label (`grpo@all`), not expanded.
    variant: Option<String>,
    output: Option<String>,
    origin: Origin,
}

/// One stage table with its sweep variant (if any) applied.
struct Instance {
    /// Own sweep variant name; `None` when the stage is not swept.
    variant: Option<String>,
    seed: u64,
    after: Vec<RawRef>,
    /// Input name -> (declared `many`, references).
    inputs: BTreeMap<String, (bool, Vec<RawRef>)>,
    configured: Arc<dyn ConfiguredStage>,
}

struct StageSpec {
    name: String,
    header: Origin,
    kind: Arc<dyn DynStageKind>,
    /// Index into the sweeps when this stage is swept.
    sweep: Option<usize>,
    /// One per variant of its sweep, or exactly one.
    instances: Vec<Instance>,
}

/// Parse a seed: a non-negative integer.
pub(crate) fn seed_value(sources: &SourceMap, node: &Node, what: &str) -> Result<u64, RecipeError> {
    match node.value {
        NodeValue::Scalar(toml::Value::Integer(n)) if n >= 0 => Ok(n as u64),
        _ => Err(RecipeError::at(
            sources,
            &node.origin,
            format!("`{what}` must be a non-negative integer, found {}", describe(node)),
        )),
    }
}

/// `integer -3`, `string "x"`, `array`: what a user wrote, for messages.
fn describe(node: &Node) -> String {
    match &node.value {
        NodeValue::Scalar(toml::Value::String(s)) => format!("string {}", toml::Value::String(s.clone())),
        NodeValue::Scalar(v) => format!("{} {v}", v.type_str()),
        _ => node.type_name().to_string(),
    }
}

pub(crate) fn build_stages(
    sources: &SourceMap,
    stages: &Table,
    sweeps: &[SweepDef],
    recipe_seed: u64,
    registry: &Registry,
) -> Result<Vec<StageDecl>, RecipeError> {
    let ordered = stages.in_order(sources);
    let names: Vec<&str> = ordered.iter().map(|(name, _)| *name).collect();
    let mut specs: Vec<StageSpec> = Vec::with_capacity(ordered.len());
    for (name, entry) in &ordered {
        check_name(sources, &entry.key, name, "stage")?;
        let Some(table) = entry.value.as_table() else {
            return Err(RecipeError::at(
                sources,
                &entry.value.origin,
                format!("stage `{name}` must be a table, found {}", entry.value.type_name()),
            )
            .with_help(format!("declare it as `[stage.{name}]` with `kind = \"...\"`")));
        };
        let header = entry.value.origin.clone();
        let kind = stage_kind(sources, name, table, &header, registry)?;
        let sweep = sweeps.iter().position(|s| s.stage == *name);
        let mut instances = Vec::new();
        match sweep {
            Some(si) => {
                for variant in &sweeps[si].variants {
                    let mut merged = table.clone();
                    merged.merge(variant.overrides.clone());
                    let ctx = InstanceCtx { sources, name, variant: Some(&variant.name), kind: &kind, header: &header };
                    instances.push(parse_instance(&ctx, &merged, &names, recipe_seed)?);
                }
            }
            None => {
                let ctx = InstanceCtx { sources, name, variant: None, kind: &kind, header: &header };
                instances.push(parse_instance(&ctx, table, &names, recipe_seed)?);
            }
        }
        specs.push(StageSpec { name: name.to_string(), header, kind, sweep, instances });
    }
    let order = dependency_order(sources, &specs)?;
    expand(sources, &specs, sweeps, &order)
}

fn stage_kind(
    sources: &SourceMap,
    name: &str,
    table: &Table,
    header: &Origin,
    registry: &Registry,
) -> Result<Arc<dyn DynStageKind>, RecipeError> {
    let Some(kind_node) = table.get("kind") else {
        return Err(RecipeError::at(sources, header, format!("stage `{name}` has no `kind`")).with_help(format!(
            "add `kind = \"...\"`; registered kinds: {}",
            registry.kinds().collect::<Vec<_>>().join(", ")
        )));
    };
    let Some(kind) = kind_node.as_str() else {
        return Err(RecipeError::at(
            sources,
            &kind_node.origin,
            format!("`kind` of stage `{name}` must be a string, found {}", describe(kind_node)),
        ));
    };
    registry.get(kind).cloned().ok_or_else(|| {
        let err =
            RecipeError::at(sources, &kind_node.origin, format!("unknown stage kind `{kind}` for stage `{name}`"));
        match did_you_mean(kind, registry.kinds()) {
            Some(best) => err.with_help(format!("did you mean `{best}`?")),
            None => err.with_help(format!("registered kinds: {}", registry.kinds().collect::<Vec<_>>().join(", "))),
        }
    })
}

struct InstanceCtx<'a> {
    sources: &'a SourceMap,
    name: &'a str,
    variant: Option<&'a str>,
    kind: &'a Arc<dyn DynStageKind>,
    header: &'a Origin,
}

impl InstanceCtx<'_> {
    /// `stage `grpo@all` (kind `grpo`)` for messages.
    fn who(&self) -> String {
        match self.variant {
            Some(v) => format!("stage `{}@{v}` (kind `{}`)", self.name, self.kind.kind()),
            None => format!("stage `{}` (kind `{}`)", self.name, self.kind.kind()),
        }
    }
}

fn parse_instance(
    ctx: &InstanceCtx<'_>,
    table: &Table,
    names: &[&str],
    recipe_seed: u64,
) -> Result<Instance, RecipeError> {
    let sources = ctx.sources;
    let seed = match table.get("seed") {
        Some(node) => seed_value(sources, node, &format!("stage.{}.seed", ctx.name))?,
        None => recipe_seed,
    };
    let mut after = Vec::new();
    if let Some(node) = table.get("after") {
        let NodeValue::Array(items) = &node.value else {
            return Err(RecipeError::at(
                sources,
                &node.origin,
                format!("`after` of stage `{}` must be a list of stage names, found {}", ctx.name, describe(node)),
            )
            .with_help("e.g. `after = [\"prepare\"]`"));
        };
        for item in items {
            let r = parse_ref(ctx, item, names, "after")?;
            if r.output.is_some() {
                return Err(RecipeError::at(sources, &item.origin, "`after` names stages, not outputs")
                    .with_help(format!("write `\"{}\"`", names[r.stage])));
            }
            after.push(r);
        }
    }

    let specs = ctx.kind.inputs();
    let mut inputs = BTreeMap::new();
    for spec in specs {
        let Some(node) = table.get(spec.name) else {
            if spec.optional {
                continue;
            }
            let example =
                if spec.many { format!("{} = [\"STAGE\"]", spec.name) } else { format!("{} = \"STAGE\"", spec.name) };
            return Err(RecipeError::at(
                sources,
                ctx.header,
                format!("{} is missing required input `{}`", ctx.who(), spec.name),
            )
            .with_help(format!("add `{example}` ({})", spec.doc)));
        };
        let refs = match (&node.value, spec.many) {
            (NodeValue::Array(items), true) => {
                if items.is_empty() && !spec.optional {
                    return Err(RecipeError::at(
                        sources,
                        &node.origin,
                        format!("input `{}` of {} needs at least one stage", spec.name, ctx.who()),
                    ));
                }
                items.iter().map(|item| parse_ref(ctx, item, names, spec.name)).collect::<Result<Vec<_>, _>>()?
            }
            (NodeValue::Scalar(toml::Value::String(s)), true) => {
                return Err(RecipeError::at(
                    sources,
                    &node.origin,
                    format!("input `{}` of {} takes a list of stages, found a single string", spec.name, ctx.who()),
                )
                .with_help(format!("write `{} = [\"{s}\"]`", spec.name)));
            }
            (NodeValue::Array(_), false) => {
                return Err(RecipeError::at(
                    sources,
                    &node.origin,
                    format!("input `{}` of {} takes one stage, found a list", spec.name, ctx.who()),
                )
                .with_help("only inputs declared `many` accept lists; sweeps expand a single reference for you"));
            }
            (_, false) => vec![parse_ref(ctx, node, names, spec.name)?],
            (_, true) => {
                return Err(RecipeError::at(
                    sources,
                    &node.origin,
                    format!(
                        "input `{}` of {} must be a list of stage references, found {}",
                        spec.name,
                        ctx.who(),
                        describe(node)
                    ),
                ));
            }
        };
        inputs.insert(spec.name.to_string(), (spec.many, refs));
    }

    let mut params = table.clone();
    for key in RESERVED_KEYS.iter().chain(specs.iter().map(|s| &s.name)) {
        params.remove(key);
    }
    let configured = ctx.kind.configure(params.to_toml()).map_err(|e| param_error(ctx, &params, e))?;
    let given: Vec<&str> = inputs.keys().map(String::as_str).collect();
    configured.validate_inputs(&given).map_err(|e| param_error(ctx, &params, e))?;
    Ok(Instance { variant: ctx.variant.map(str::to_string), seed, after, inputs, configured: Arc::from(configured) })
}

fn parse_ref(ctx: &InstanceCtx<'_>, node: &Node, names: &[&str], input: &str) -> Result<RawRef, RecipeError> {
    let sources = ctx.sources;
    let Some(text) = node.as_str() else {
        return Err(RecipeError::at(
            sources,
            &node.origin,
            format!("input `{input}` of {} must reference a stage, found {}", ctx.who(), describe(node)),
        )
        .with_help("write `\"STAGE\"` or `\"STAGE.OUTPUT\"`"));
    };
    let (stage_part, output) = match text.split_once('.') {
        Some((s, o)) => (s, Some(o)),
        None => (text, None),
    };
    let (stage_name, variant) = match stage_part.split_once('@') {
        Some((s, v)) => (s, Some(v)),
        None => (stage_part, None),
    };
    if stage_name.is_empty() || output.is_some_and(str::is_empty) || variant.is_some_and(str::is_empty) {
        return Err(RecipeError::at(sources, &node.origin, format!("invalid stage reference `{text}`"))
            .with_help("write `\"STAGE\"` or `\"STAGE.OUTPUT\"`"));
    }
    let Some(stage) = names.iter().position(|n| *n == stage_name) else {
        let err = RecipeError::at(
            sources,
            &node.origin,
            format!("input `{input}` of {} references unknown stage `{stage_name}`", ctx.who()),
        );
        return Err(match did_you_mean(stage_name, names.iter().copied()) {
            Some(best) => err.with_help(format!("did you mean `{best}`?")),
            None => err.with_help(format!("stages in this recipe: {}", names.join(", "))),
        });
    };
    Ok(RawRef {
        stage,
        variant: variant.map(str::to_string),
        output: output.map(str::to_string),
        origin: node.origin.clone(),
    })
}

/// serde's own messages for a value of the wrong shape: those point at the
/// value; everything else (unknown keys, `validate()` errors) at the key.
fn is_value_error(message: &str) -> bool {
    ["invalid type", "invalid value", "invalid length", "unknown variant"].iter().any(|p| message.starts_with(p))
}

fn param_error(ctx: &InstanceCtx<'_>, params: &Table, mut err: ParamError) -> RecipeError {
    let sources = ctx.sources;
    // The toml deserializer appends "\nin `key`"; our location says that already.
    if let Some(first) = err.message.lines().find(|l| !l.trim().is_empty()) {
        err.message = first.trim_end().to_string();
    }
    let message = if err.message.starts_with("unknown parameter") {
        format!("{} for {}", err.message, ctx.who())
    } else if err.path.is_empty() {
        format!("{}: {}", ctx.who(), err.message)
    } else {
        format!("parameter `{}` of {}: {}", err.path.join("."), ctx.who(), err.message)
    };
    let err_path = err.path.clone();
    let mut hint = err.hint.clone();
    if hint.is_none()
        && let [key] = err.path.as_slice()
    {
        let inputs = ctx.kind.inputs().iter().map(|s| s.name);
        hint = did_you_mean(key, inputs).map(|b| format!("did you mean input `{b}`?"));
    }
    match locate_path(params, &err.path) {
        Some((key, value)) => {
            let at = if is_value_error(&err.message) { value } else { key };
            RecipeError::at(sources, at, message).with_help_opt(hint)
        }
        None => {
            let err = RecipeError::at(sources, ctx.header, message).with_help_opt(hint);
            if err_path.is_empty() {
                err
            } else {
                err.with_note("the parameter is not set in the recipe, so its default is used")
            }
        }
    }
}

/// Key and value origins of a param path (`["reward_weights", "format"]`,
/// array indices as numbers).
fn locate_path<'t>(table: &'t Table, path: &[String]) -> Option<(&'t Origin, &'t Origin)> {
    let (first, rest) = path.split_first()?;
    let entry = table.entry(first)?;
    let (mut key, mut node) = (&entry.key, &entry.value);
    for seg in rest {
        match &node.value {
            NodeValue::Table(t) => {
                let e = t.entry(seg)?;
                key = &e.key;
                node = &e.value;
            }
            NodeValue::Array(items) => {
                node = items.get(seg.parse::<usize>().ok()?)?;
                key = &node.origin;
            }
            NodeValue::Scalar(_) => return None,
        }
    }
    Some((key, &node.origin))
}

/// Stage indices in dependency order (ties keep declaration order); a
/// cycle is an error pointing at the reference that closes it.
fn dependency_order(sources: &SourceMap, specs: &[StageSpec]) -> Result<Vec<usize>, RecipeError> {
    // deps[x] = (upstream stage, where x references it), in recipe order.
    let deps: Vec<Vec<(usize, &Origin)>> = specs
        .iter()
        .map(|spec| {
            let mut d: Vec<(usize, &Origin)> = Vec::new();
            for inst in &spec.instances {
                let refs = inst.inputs.values().flat_map(|(_, refs)| refs).chain(&inst.after);
                for r in refs {
                    if !d.iter().any(|(u, _)| *u == r.stage) {
                        d.push((r.stage, &r.origin));
                    }
                }
            }
            d.sort_by_key(|(_, o)| sources.order_key(o));
            d
        })
        .collect();
    let upstreams: Vec<Vec<usize>> = deps.iter().map(|d| d.iter().map(|(u, _)| *u).collect()).collect();
    stable_topo_order(&upstreams).map_err(|_| cycle_error(sources, specs, &deps))
}

/// The first dependency cycle a depth-first walk in declaration order
/// meets, as an error at the reference that closes it.
fn cycle_error(sources: &SourceMap, specs: &[StageSpec], deps: &[Vec<(usize, &Origin)>]) -> RecipeError {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        x: usize,
        deps: &[Vec<(usize, &Origin)>],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
    ) -> Option<(Vec<usize>, Origin)> {
        marks[x] = Mark::Active;
        stack.push(x);
        for (u, origin) in &deps[x] {
            match marks[*u] {
                Mark::Active => {
                    let start = stack.iter().position(|s| s == u).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(*u);
                    return Some((cycle, (*origin).clone()));
                }
                Mark::New => {
                    if let Some(found) = visit(*u, deps, marks, stack) {
                        return Some(found);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks[x] = Mark::Done;
        None
    }

    let mut marks = vec![Mark::New; specs.len()];
    for x in 0..specs.len() {
        if marks[x] == Mark::New
            && let Some((cycle, origin)) = visit(x, deps, &mut marks, &mut Vec::new())
        {
            let path: Vec<String> = cycle.iter().map(|i| format!("`{}`", specs[*i].name)).collect();
            let (last, first) = (cycle[cycle.len() - 2], cycle[cycle.len() - 1]);
            return RecipeError::at(sources, &origin, format!("dependency cycle: {}", path.join(" -> ")))
                .with_note("`a -> b` means stage `a` takes input from (or runs after) stage `b`")
                .with_help(format!(
                    "stage `{}` cannot depend on `{}`: remove one reference of the cycle",
                    specs[last].name, specs[first].name
                ));
        }
    }
    // Unreachable: the topological sort found a cycle.
    RecipeError::new("dependency cycle between stages")
}

/// Variant choice per sweep for one stage instance: `(sweep index, variant index)`.
type Assignment = Vec<(usize, usize)>;

fn label(sweeps: &[SweepDef], a: &Assignment) -> Option<String> {
    if a.is_empty() {
        None
    } else {
        Some(a.iter().map(|(s, v)| sweeps[*s].variants[*v].name.as_str()).collect::<Vec<_>>().join("+"))
    }
}

fn stage_id(name: &str, label: Option<&str>) -> String {
    match label {
        Some(l) => format!("{name}@{l}"),
        None => name.to_string(),
    }
}

/// Every combination of variants over `vary` (sweep indices, ascending).
fn assignments(sweeps: &[SweepDef], vary: &[usize]) -> Vec<Assignment> {
    let mut out: Vec<Assignment> = vec![Vec::new()];
    for &s in vary {
        out = out
            .into_iter()
            .flat_map(|a| {
                (0..sweeps[s].variants.len()).map(move |v| {
                    let mut a = a.clone();
                    a.push((s, v));
                    a
                })
            })
            .collect();
    }
    out
}

/// Two assignments agree on every sweep they share.
fn consistent(a: &Assignment, b: &Assignment) -> bool {
    a.iter().all(|(s, v)| b.iter().all(|(t, w)| s != t || v == w))
}

fn expand(
    sources: &SourceMap,
    specs: &[StageSpec],
    sweeps: &[SweepDef],
    order: &[usize],
) -> Result<Vec<StageDecl>, RecipeError> {
    // Which sweeps a stage varies with: its own, plus those of every stage
    // it takes a single (not `many`, not pinned) input from.
    let mut vary: Vec<Vec<usize>> = vec![Vec::new(); specs.len()];
    for &x in order {
        let mut v: Vec<usize> = specs[x].sweep.into_iter().collect();
        for inst in &specs[x].instances {
            for (many, refs) in inst.inputs.values() {
                for r in refs.iter().filter(|r| !*many && r.variant.is_none()) {
                    v.extend(vary[r.stage].iter().copied());
                }
            }
        }
        v.sort_unstable();
        v.dedup();
        vary[x] = v;
    }
    let all: Vec<Vec<Assignment>> = vary.iter().map(|v| assignments(sweeps, v)).collect();

    let mut out = Vec::new();
    for &x in order {
        let spec = &specs[x];
        for a in &all[x] {
            let inst = match spec.sweep {
                Some(own) => {
                    let v = a.iter().find(|(s, _)| *s == own).map_or(0, |(_, v)| *v);
                    &spec.instances[v]
                }
                None => &spec.instances[0],
            };
            debug_assert!(spec.sweep.is_none() || inst.variant.is_some());
            let variant = label(sweeps, a);
            let resolve = |r: &RawRef| resolve_ref(sources, specs, sweeps, &all, r, a);
            let mut inputs = BTreeMap::new();
            for (name, (_, refs)) in &inst.inputs {
                let mut resolved = Vec::new();
                for r in refs {
                    for id in resolve(r)? {
                        let (loc, _) = sources.locate(&r.origin);
                        resolved.push(InputRef { stage: id, output: r.output.clone(), loc });
                    }
                }
                inputs.insert(name.clone(), resolved);
            }
            let mut after = Vec::new();
            for r in &inst.after {
                after.extend(resolve(r)?);
            }
            let (loc, _) = sources.locate(&spec.header);
            out.push(StageDecl {
                id: stage_id(&spec.name, variant.as_deref()),
                name: spec.name.clone(),
                variant,
                kind: spec.kind.clone(),
                stage: inst.configured.clone(),
                inputs,
                after,
                seed: inst.seed,
                loc,
            });
        }
    }
    Ok(out)
}

/// The upstream stage ids one reference stands for in the instance with
/// assignment `a`, checking a named output exists.
fn resolve_ref(
    sources: &SourceMap,
    specs: &[StageSpec],
    sweeps: &[SweepDef],
    all: &[Vec<Assignment>],
    r: &RawRef,
    a: &Assignment,
) -> Result<Vec<String>, RecipeError> {
    let up = &specs[r.stage];
    let chosen: Vec<&Assignment> = match &r.variant {
        Some(pinned) => {
            let found = all[r.stage].iter().find(|b| label(sweeps, b).as_deref() == Some(pinned.as_str()));
            match found {
                Some(b) => vec![b],
                None => {
                    let labels: Vec<String> = all[r.stage].iter().filter_map(|b| label(sweeps, b)).collect();
                    let err =
                        RecipeError::at(sources, &r.origin, format!("stage `{}` has no variant `{pinned}`", up.name));
                    return Err(if labels.is_empty() {
                        err.with_help(format!("`{}` is not swept: write `\"{}\"`", up.name, up.name))
                    } else {
                        let hint = did_you_mean(pinned, labels.iter().map(String::as_str));
                        err.with_help(match hint {
                            Some(b) => format!("did you mean `{b}`?"),
                            None => format!("variants: {}", labels.join(", ")),
                        })
                    });
                }
            }
        }
        None => all[r.stage].iter().filter(|b| consistent(b, a)).collect(),
    };
    let mut ids = Vec::with_capacity(chosen.len());
    for b in chosen {
        if let Some(output) = &r.output {
            let inst = match up.sweep {
                Some(own) => &up.instances[b.iter().find(|(s, _)| *s == own).map_or(0, |(_, v)| *v)],
                None => &up.instances[0],
            };
            let outputs = inst.configured.outputs();
            if !outputs.is_empty() && !outputs.iter().any(|o| &o.name == output) {
                let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
                let err = RecipeError::at(
                    sources,
                    &r.origin,
                    format!("stage `{}` (kind `{}`) has no output `{output}`", up.name, up.kind.kind()),
                );
                return Err(match did_you_mean(output, names.iter().copied()) {
                    Some(best) => err.with_help(format!("did you mean `{}.{best}`?", up.name)),
                    None => err.with_help(format!("its outputs: {}", names.join(", "))),
                });
            }
        }
        ids.push(stage_id(&up.name, label(sweeps, b).as_deref()));
    }
    Ok(ids)
}
