//! Planning: which stages a run selects, their cache keys, and for each
//! whether it is cached or must run, and why.

pub mod canonical;
pub mod graph;
pub mod key;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::Context as _;
use pipeline_cache::{ActionRecord, Cache, Digest};

use crate::env::EngineEnv;
use crate::index::RunIndex;
use crate::plan::graph::StageGraph;
use crate::plan::key::{ExternalDigest, InputDigest, KeyComponents, artifact_digest, explain_change};
use crate::recipe::{Recipe, RecipeError, StageDecl, resolve_stage_selector};
use crate::run::resources::resolve_device;
use stage_api::{DeviceRequest, Resources};

/// Stage selection flags of `run`/`plan` (stage selectors as on the CLI).
#[derive(Debug, Clone, Default)]
pub struct SelectOptions {
    /// Run only these stages and what they need.
    pub until: Vec<String>,
    /// Force these stages and everything downstream; run what they need.
    pub from: Vec<String>,
    /// `Some(None)`: force every selected stage; `Some(Some(s))`: force `s`.
    pub force: Option<Option<String>>,
    /// Force these stages and everything downstream of them.
    pub force_downstream: Vec<String>,
}

/// The stages a run considers, and those it must re-run regardless of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub included: BTreeSet<String>,
    /// Stage id -> reason (e.g. "forced (--force)").
    pub forced: BTreeMap<String, String>,
}

fn resolve_ids(recipe: &Recipe, selectors: &[String]) -> Result<Vec<String>, RecipeError> {
    let mut out = Vec::new();
    for sel in selectors {
        for decl in resolve_stage_selector(recipe, sel)? {
            out.push(decl.id.clone());
        }
    }
    Ok(out)
}

impl Selection {
    pub fn all(graph: &StageGraph) -> Self {
        Self { included: graph.topo_order().into_iter().map(str::to_string).collect(), forced: BTreeMap::new() }
    }

    pub fn build(recipe: &Recipe, graph: &StageGraph, opts: &SelectOptions) -> anyhow::Result<Self> {
        let mut sel = Self::all(graph);
        if !opts.until.is_empty() {
            sel.included = graph.with_ancestors(&resolve_ids(recipe, &opts.until)?)?;
        }
        if !opts.from.is_empty() {
            let from = resolve_ids(recipe, &opts.from)?;
            let downstream: Vec<String> =
                graph.with_descendants(&from)?.into_iter().filter(|id| sel.included.contains(id)).collect();
            sel.included = graph.with_ancestors(&downstream)?;
            for id in downstream {
                sel.forced.insert(id, format!("forced (--from {})", opts.from.join(", ")));
            }
        }
        for x in &opts.force_downstream {
            let ids = resolve_ids(recipe, std::slice::from_ref(x))?;
            for id in graph.with_descendants(&ids)? {
                if sel.included.contains(&id) {
                    sel.forced.entry(id).or_insert_with(|| format!("forced (--force-downstream of {x})"));
                }
            }
        }
        match &opts.force {
            None => {}
            Some(None) => {
                for id in &sel.included {
                    sel.forced.entry(id.clone()).or_insert_with(|| "forced (--force)".to_string());
                }
            }
            Some(Some(s)) => {
                for id in resolve_ids(recipe, std::slice::from_ref(s))? {
                    if sel.included.contains(&id) {
                        sel.forced.entry(id).or_insert_with(|| "forced (--force)".to_string());
                    }
                }
            }
        }
        Ok(sel)
    }
}

/// What the run will do with a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cached,
    Run,
    /// Outside `--until` / `--from`.
    NotSelected,
}

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Cached => "cached",
            Action::Run => "run",
            Action::NotSelected => "skip",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub id: String,
    pub kind: String,
    pub components: KeyComponents,
    /// The key (provisional while an input is pending).
    pub key: Digest,
    pub action: Action,
    pub reason: String,
    pub forced: bool,
    /// The cached record when `action` is `Cached`.
    pub record: Option<ActionRecord>,
    pub resources: Resources,
    /// Data-parallel processes (`[executor.stage.<id>] ranks`; 1 for most stages).
    pub ranks: usize,
    /// The device the stage will get, or the reason it cannot run here.
    pub device: Result<DeviceRequest, String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// Topological order.
    pub stages: Vec<PlannedStage>,
}

impl Plan {
    pub fn stage(&self, id: &str) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.id == id)
    }
}

/// Directory relative params resolve against (`""` when the recipe path
/// has no parent component).
pub fn recipe_dir(recipe: &Recipe) -> PathBuf {
    if recipe.dir.as_os_str().is_empty() { PathBuf::from(".") } else { recipe.dir.clone() }
}

/// The digest an input reference gets while planning.
enum UpstreamDigest {
    /// The upstream's artifact (or named output) digest.
    Ready(Digest),
    /// The upstream will run: its planned key stands in.
    Pending(Digest),
    /// The upstream's record lacks the referenced output.
    Missing(String),
}

type UpstreamLookup<'l> = dyn Fn(&str, Option<&str>) -> Option<UpstreamDigest> + 'l;

fn digest_of(stage: &str, record: &ActionRecord, output: Option<&str>) -> UpstreamDigest {
    match artifact_digest(stage, record, output) {
        Ok(d) => UpstreamDigest::Ready(d),
        Err(e) => UpstreamDigest::Missing(e.to_string()),
    }
}

/// Input digests from upstream records (or keys of pending upstreams).
fn input_digests(
    decl: &StageDecl,
    lookup: &UpstreamLookup<'_>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Vec<InputDigest>> {
    let mut inputs = BTreeMap::new();
    for (name, refs) in &decl.inputs {
        let digests = refs
            .iter()
            .map(|r| {
                let (digest, pending) = match lookup(&r.stage, r.output.as_deref()) {
                    Some(UpstreamDigest::Ready(d)) => (d, false),
                    Some(UpstreamDigest::Pending(key)) => (key, true),
                    Some(UpstreamDigest::Missing(e)) => {
                        warnings.push(format!("input `{name}`: {e}"));
                        (Digest::of_bytes(format!("missing output {}.{:?}", r.stage, r.output).as_bytes()), false)
                    }
                    // Unreachable for a well-formed graph; keep the key distinct anyway.
                    None => (Digest::of_bytes(format!("unknown upstream {}", r.stage).as_bytes()), true),
                };
                InputDigest { stage: r.stage.clone(), output: r.output.clone(), digest, pending }
            })
            .collect();
        inputs.insert(name.clone(), digests);
    }
    inputs
}

/// Digests of external inputs (stat-cached by the cache, so free on rerun).
pub fn external_digests(
    cache: &Cache,
    paths: &[PathBuf],
    warnings: &mut Vec<String>,
) -> anyhow::Result<Vec<ExternalDigest>> {
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let digest = if path.exists() {
            let manifest =
                cache.hash_path(path).with_context(|| format!("hashing external input {}", path.display()))?;
            Some(manifest.tree_digest())
        } else {
            warnings.push(format!("external input {} does not exist", path.display()));
            None
        };
        out.push(ExternalDigest { path: path.clone(), digest });
    }
    Ok(out)
}

/// Key components of `decl` given its upstreams' state.
fn components(
    recipe: &Recipe,
    decl: &StageDecl,
    cache: &Cache,
    env: &EngineEnv,
    lookup: &UpstreamLookup<'_>,
    warnings: &mut Vec<String>,
) -> anyhow::Result<(KeyComponents, Result<DeviceRequest, String>)> {
    let resources = decl.stage.resources();
    let device = resolve_device(&decl.id, resources.device, env.cuda_for(&decl.id), recipe.allow_cpu_fallback)
        .map_err(|e| e.to_string());
    if let Err(e) = &device {
        warnings.push(e.clone());
    } else if resources.device == DeviceRequest::Cuda && device == Ok(DeviceRequest::Cpu) {
        warnings.push("CUDA requested but no GPU: running on the CPU (allow_cpu_fallback)".to_string());
    }
    let device_class = match (resources.device, &device) {
        (DeviceRequest::Cpu, _) => None,
        (_, Ok(DeviceRequest::Cuda)) | (_, Err(_)) => Some("cuda".to_string()),
        (_, Ok(_)) => Some("cpu".to_string()),
    };
    let external = external_digests(cache, &decl.stage.external_inputs(&recipe_dir(recipe)), warnings)
        .with_context(|| format!("planning stage `{}`", decl.id))?;
    let comps = KeyComponents {
        kind: decl.kind.kind().to_string(),
        version: decl.kind.version(),
        params: decl.stage.canonical_params(),
        inputs: input_digests(decl, lookup, warnings),
        external,
        seed: decl.seed,
        device_class,
    };
    Ok((comps, device))
}

/// Plan a run: keys for every stage, cached/run with a reason for the selected ones.
pub fn make_plan(
    recipe: &Recipe,
    graph: &StageGraph,
    cache: &Cache,
    selection: &Selection,
    env: &EngineEnv,
) -> anyhow::Result<Plan> {
    let index = RunIndex::new(cache.root(), &recipe.name);
    let decls: HashMap<&str, &StageDecl> = recipe.stages.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut planned: Vec<PlannedStage> = Vec::with_capacity(graph.len());
    let mut pos: HashMap<String, usize> = HashMap::new();
    for id in graph.topo_order() {
        let decl = decls.get(id).with_context(|| format!("stage `{id}` is in the graph but not in the recipe"))?;
        let mut warnings = Vec::new();
        let (comps, device) = {
            let lookup = |up: &str, output: Option<&str>| -> Option<UpstreamDigest> {
                let p = &planned[*pos.get(up)?];
                Some(match (&p.action, &p.record) {
                    (Action::Cached, Some(rec)) => digest_of(up, rec, output),
                    _ => UpstreamDigest::Pending(p.key),
                })
            };
            components(recipe, decl, cache, env, &lookup, &mut warnings)?
        };
        let key = comps.key();
        let forced = selection.forced.get(id);
        let (action, reason, record) = if !selection.included.contains(id) {
            (Action::NotSelected, "not selected".to_string(), None)
        } else if let Some(why) = forced {
            (Action::Run, why.clone(), None)
        } else if comps.has_pending_inputs() {
            let reason = match index.get(id) {
                None => "new stage".to_string(),
                Some(prev) => explain_change(id, &prev.components, &comps),
            };
            (Action::Run, reason, None)
        } else {
            match cache.lookup(&key).with_context(|| format!("looking up stage `{id}` in the cache"))? {
                Some(rec) => (Action::Cached, "up to date".to_string(), Some(rec)),
                None => {
                    let reason = match index.get(id) {
                        None => "new stage".to_string(),
                        Some(prev) if prev.key == key => "output missing or corrupt in cache".to_string(),
                        Some(prev) => explain_change(id, &prev.components, &comps),
                    };
                    (Action::Run, reason, None)
                }
            }
        };
        pos.insert(id.to_string(), planned.len());
        planned.push(PlannedStage {
            id: id.to_string(),
            kind: decl.kind.kind().to_string(),
            components: comps,
            key,
            action,
            reason,
            forced: forced.is_some(),
            record,
            resources: decl.stage.resources(),
            ranks: recipe.executor.slurm.stage_override(&decl.id, &decl.name).ranks.unwrap_or(1),
            device,
            warnings,
        });
    }
    Ok(Plan { stages: planned })
}

/// Recompute a stage's key components at run time, when every upstream
/// it reads has a final record.
pub fn final_components(
    recipe: &Recipe,
    decl: &StageDecl,
    cache: &Cache,
    env: &EngineEnv,
    records: &HashMap<String, ActionRecord>,
) -> anyhow::Result<KeyComponents> {
    // Every referenced upstream output must exist before the stage may start.
    for (name, refs) in &decl.inputs {
        for r in refs {
            let record = records
                .get(&r.stage)
                .with_context(|| format!("stage `{}`: upstream `{}` has no output record", decl.id, r.stage))?;
            artifact_digest(&r.stage, record, r.output.as_deref())
                .with_context(|| format!("stage `{}`: input `{name}`", decl.id))?;
        }
    }
    let mut warnings = Vec::new();
    let lookup = |up: &str, output: Option<&str>| -> Option<UpstreamDigest> {
        records.get(up).map(|r| digest_of(up, r, output))
    };
    let (comps, _) = components(recipe, decl, cache, env, &lookup, &mut warnings)?;
    if let Some(missing) = comps.missing_external().next() {
        anyhow::bail!("stage `{}`: external input {} does not exist", decl.id, missing.display());
    }
    if comps.has_pending_inputs() {
        anyhow::bail!("stage `{}` has an upstream without output", decl.id);
    }
    Ok(comps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stage_api::Registry;
    use stage_api::StageContext;
    use stage_api::{InputSpec, StageKind};
    use std::path::Path;

    /// A stage kind for planner tests: params only, one optional input.
    struct Echo;

    #[derive(Debug, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct EchoParams {
        /// A number.
        value: f64,
        /// A word.
        word: String,
    }

    impl StageKind for Echo {
        type Params = EchoParams;
        const KIND: &'static str = "echo";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        fn inputs() -> &'static [InputSpec] {
            const I: &[InputSpec] = &[InputSpec::optional("up", "upstream")];
            I
        }
        fn run(_p: &Self::Params, _ctx: &mut StageContext) -> anyhow::Result<()> {
            Ok(())
        }
    }

    const RECIPE: &str = r#"
[recipe]
name = "t"
seed = 5
[stage.a]
kind = "echo"
value = 1.5
word = "x"
[stage.b]
kind = "echo"
up = "a"
[stage.c]
kind = "echo"
up = "b"
[stage.d]
kind = "echo"
value = 2
"#;

    fn keys(src: &str, sets: &[&str], cache: &Cache) -> BTreeMap<String, Digest> {
        let registry = Registry::new().register::<Echo>();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let recipe = crate::recipe::load_recipe_str(src, Path::new("t.toml"), &sets, &registry).unwrap();
        let graph = StageGraph::from_recipe(&recipe).unwrap();
        let env = EngineEnv { cuda_devices: 0, stage_gpus: None, cores: 2, memory_mb: 1024, quiet: true };
        let plan = make_plan(&recipe, &graph, cache, &Selection::all(&graph), &env).unwrap();
        assert!(plan.stages.iter().all(|s| s.action == Action::Run && s.reason == "new stage"));
        plan.stages.iter().map(|s| (s.id.clone(), s.key)).collect()
    }

    #[test]
    fn keys_are_stable_order_free_and_change_only_downstream() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let base = keys(RECIPE, &[], &cache);
        assert_eq!(base, keys(RECIPE, &[], &cache));
        // Param order and `2` vs `2.0` do not matter.
        let reordered = RECIPE
            .replace("value = 1.5\nword = \"x\"", "word = \"x\"\nvalue = 1.5")
            .replace("value = 2\n", "value = 2.0\n");
        assert_ne!(reordered, RECIPE);
        assert_eq!(base, keys(&reordered, &[], &cache));
        // Changing b's param changes b and c only.
        let changed = keys(RECIPE, &["stage.b.word=y"], &cache);
        let differs: Vec<&str> = base.keys().filter(|id| base[*id] != changed[*id]).map(String::as_str).collect();
        assert_eq!(differs, vec!["b", "c"]);
        // The recipe seed reaches every stage.
        let reseeded = keys(RECIPE, &["recipe.seed=6"], &cache);
        assert!(base.keys().all(|id| base[id] != reseeded[id]));
    }

    #[test]
    fn selection_flags() {
        let registry = Registry::new().register::<Echo>();
        let recipe = crate::recipe::load_recipe_str(RECIPE, Path::new("t.toml"), &[], &registry).unwrap();
        let graph = StageGraph::from_recipe(&recipe).unwrap();
        let ids = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        let until = Selection::build(&recipe, &graph, &SelectOptions { until: vec!["b".into()], ..Default::default() })
            .unwrap();
        assert_eq!(ids(&until.included), vec!["a", "b"]);
        assert!(until.forced.is_empty());
        let from =
            Selection::build(&recipe, &graph, &SelectOptions { from: vec!["b".into()], ..Default::default() }).unwrap();
        assert_eq!(ids(&from.included), vec!["a", "b", "c"]);
        assert_eq!(from.forced.keys().cloned().collect::<Vec<_>>(), vec!["b", "c"]);
        let fd = Selection::build(
            &recipe,
            &graph,
            &SelectOptions { force_downstream: vec!["a".into()], ..Default::default() },
        )
        .unwrap();
        assert_eq!(fd.forced.keys().cloned().collect::<Vec<_>>(), vec!["a", "b", "c"]);
        assert_eq!(fd.forced["c"], "forced (--force-downstream of a)");
        let all =
            Selection::build(&recipe, &graph, &SelectOptions { force: Some(None), ..Default::default() }).unwrap();
        assert_eq!(all.forced.len(), 4);
        let err = Selection::build(&recipe, &graph, &SelectOptions { until: vec!["zz".into()], ..Default::default() })
            .unwrap_err();
        assert!(err.is::<RecipeError>(), "{err}");
    }
}
