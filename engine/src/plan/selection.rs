//! Which stages a run considers (`--until`, `--from`) and which it must
//! re-run whatever the cache holds (`--force`, `--force-downstream`).

use std::collections::{BTreeMap, BTreeSet};

use super::graph::StageGraph;
use crate::recipe::{Recipe, RecipeError, resolve_stage_selector};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fixtures::{RECIPE, load};

    #[test]
    fn selection_flags() {
        let recipe = load(RECIPE, &[]);
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
