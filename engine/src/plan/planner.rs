//! The plan of a run: every stage's key and, for the selected ones, whether
//! the cache has it or it must run, and why (the run index remembers the
//! key components of each stage's last run, so the reason can name what
//! changed).

use std::collections::HashMap;

use anyhow::Context as _;
use pipeline_cache::{ActionRecord, Cache, Digest};
use stage_api::{DeviceRequest, MemoryEstimate, PlanOutput, Resources};

use super::components::{Upstream, stage_components};
use super::graph::StageGraph;
use super::key::{KeyComponents, explain_change};
use super::memory::{GpuCapacity, UpstreamOutput, gpu_fit, plan_device, plan_view_inputs, predict, resources_with};
use super::selection::Selection;
use crate::env::EngineEnv;
use crate::index::RunIndex;
use crate::numerics::Numerics;
use crate::recipe::{Recipe, StageDecl};

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
    /// The kind's resources, `memory_mb` replaced by the predicted host
    /// peak of all ranks when there is a prediction.
    pub resources: Resources,
    /// Predicted memory per rank (never part of the key).
    pub memory: MemoryEstimate,
    /// How the GPU peak compares with the GPU's memory: `Ok(note)` fits,
    /// `Err(warning)` does not (also in `warnings`); `None`: nothing to compare.
    pub gpu_fit: Option<Result<String, String>>,
    /// What the stage said about its output before running (stand-in, facts).
    pub plan_output: PlanOutput,
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
    /// The GPU memory CUDA stages were checked against, if known.
    pub gpu_capacity: Option<GpuCapacity>,
}

impl Plan {
    pub fn stage(&self, id: &str) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.id == id)
    }
}

/// What the scheduler grants a stage: a stage whose key pins its thread
/// count (`[recipe] numerics_threads`) gets that many cores per rank, so
/// the threads it will run with do not fight over fewer cores.
fn planned_resources(numerics: Option<Numerics>, stage: Resources, ranks: usize) -> Resources {
    match numerics {
        Some(n) => Resources { cpu: n.threads * ranks.max(1), ..stage },
        None => stage,
    }
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
    let gpu = GpuCapacity::pick(recipe.executor.gpu_memory_gb, env.gpu_memory_mb);
    let mut planned: Vec<PlannedStage> = Vec::with_capacity(graph.len());
    let mut pos: HashMap<String, usize> = HashMap::new();
    for id in graph.topo_order() {
        let decl = decls.get(id).with_context(|| format!("stage `{id}` is in the graph but not in the recipe"))?;
        let mut warnings = Vec::new();
        let (comps, device) = {
            let upstream = |up: &str| -> Option<Upstream<'_>> {
                let p = &planned[*pos.get(up)?];
                Some(match (&p.action, &p.record) {
                    (Action::Cached, Some(rec)) => Upstream::Published(rec),
                    _ => Upstream::Pending(p.key),
                })
            };
            stage_components(recipe, decl, cache, env, &upstream, &mut warnings)?
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
        let ranks = recipe.executor.stage_override(&decl.id, &decl.name).ranks.unwrap_or(1);
        let inputs = plan_view_inputs(decl, &|up: &str| {
            let p = &planned[*pos.get(up)?];
            Some(match &p.record {
                Some(rec) => UpstreamOutput::Published(cache.artifact_dir(&rec.key), p.plan_output.facts.clone()),
                None => UpstreamOutput::Planned(p.plan_output.clone()),
            })
        });
        let (memory, plan_output) = predict(decl, &inputs, ranks, plan_device(&device), recipe.dir());
        let fit = gpu.as_ref().and_then(|cap| gpu_fit(&memory, cap));
        if let Some(Err(w)) = &fit {
            warnings.push(w.clone());
        }
        pos.insert(id.to_string(), planned.len());
        let resources = planned_resources(comps.numerics, decl.stage.resources(), ranks);
        planned.push(PlannedStage {
            id: id.to_string(),
            kind: decl.kind.kind().to_string(),
            components: comps,
            key,
            action,
            reason,
            forced: forced.is_some(),
            record,
            resources: resources_with(resources, &memory, ranks),
            memory,
            gpu_fit: fit,
            plan_output,
            ranks,
            device,
            warnings,
        });
    }
    Ok(Plan { stages: planned, gpu_capacity: gpu })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::plan::fixtures::{RECIPE, load};

    fn keys(src: &str, sets: &[&str], cache: &Cache) -> BTreeMap<String, Digest> {
        let recipe = load(src, sets);
        let graph = StageGraph::from_recipe(&recipe).unwrap();
        let env = EngineEnv { cuda_devices: 0, stage_gpus: None, cores: 2, memory_mb: 1024, gpu_memory_mb: None };
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
}
