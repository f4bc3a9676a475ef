//! The stage DAG: edges from input references and `after`, selection
//! helpers (`--until`, `--from`, forcing) and rendering for `pipeline dag`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed, Walker};

use crate::recipe::Recipe;
use crate::recipe::order::stable_topo_order;

/// A problem with the shape of the graph.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagError {
    #[error("stage `{stage}` depends on unknown stage `{upstream}`")]
    UnknownUpstream { stage: String, upstream: String },
    #[error("stage `{0}` is declared twice")]
    Duplicate(String),
    #[error("dependency cycle through stage `{0}`")]
    Cycle(String),
    #[error("unknown stage `{0}`")]
    UnknownStage(String),
}

/// Stages (by resolved id) and their dependency edges, upstream -> downstream.
#[derive(Debug, Clone)]
pub struct StageGraph {
    graph: DiGraph<String, ()>,
    index: BTreeMap<String, NodeIndex>,
    /// Topological order, ties broken by declaration order (see [`stable_topo_order`]).
    order: Vec<NodeIndex>,
}

impl StageGraph {
    /// Build from `(stage id, upstream ids)` in declaration order.
    pub fn new(nodes: impl IntoIterator<Item = (String, Vec<String>)>) -> Result<Self, DagError> {
        let nodes: Vec<(String, Vec<String>)> = nodes.into_iter().collect();
        let mut graph = DiGraph::new();
        let mut index = BTreeMap::new();
        for (id, _) in &nodes {
            let ix = graph.add_node(id.clone());
            if index.insert(id.clone(), ix).is_some() {
                return Err(DagError::Duplicate(id.clone()));
            }
        }
        for (id, ups) in &nodes {
            let to = index[id];
            let mut seen = BTreeSet::new();
            for up in ups {
                let from = *index
                    .get(up)
                    .ok_or_else(|| DagError::UnknownUpstream { stage: id.clone(), upstream: up.clone() })?;
                // Two inputs from the same upstream are one dependency.
                if seen.insert(up) {
                    graph.add_edge(from, to, ());
                }
            }
        }
        let deps: Vec<Vec<usize>> = graph
            .node_indices()
            .map(|ix| graph.neighbors_directed(ix, Direction::Incoming).map(|u| u.index()).collect())
            .collect();
        let order = stable_topo_order(&deps)
            .map_err(|stuck| DagError::Cycle(graph[NodeIndex::new(stuck)].clone()))?
            .into_iter()
            .map(NodeIndex::new)
            .collect();
        Ok(Self { graph, index, order })
    }

    /// Build from a parsed recipe: one edge per input reference and `after`.
    /// The recipe's stages are already in [the one topological
    /// order](crate::recipe::order), which therefore comes back unchanged.
    pub fn from_recipe(recipe: &Recipe) -> Result<Self, DagError> {
        Self::new(
            recipe.stages.iter().map(|s| (s.id.clone(), s.dependencies().into_iter().map(str::to_string).collect())),
        )
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// Stage ids in topological order.
    pub fn topo_order(&self) -> Vec<&str> {
        self.order.iter().map(|&ix| self.graph[ix].as_str()).collect()
    }

    fn node(&self, id: &str) -> Result<NodeIndex, DagError> {
        self.index.get(id).copied().ok_or_else(|| DagError::UnknownStage(id.to_string()))
    }

    /// Direct upstream stages of `id`, sorted.
    pub fn upstream(&self, id: &str) -> Result<Vec<&str>, DagError> {
        self.neighbours(id, Direction::Incoming)
    }

    /// Direct downstream stages of `id`, sorted.
    pub fn downstream(&self, id: &str) -> Result<Vec<&str>, DagError> {
        self.neighbours(id, Direction::Outgoing)
    }

    fn neighbours(&self, id: &str, dir: Direction) -> Result<Vec<&str>, DagError> {
        let mut v: Vec<&str> =
            self.graph.neighbors_directed(self.node(id)?, dir).map(|ix| self.graph[ix].as_str()).collect();
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// `ids` and everything they (transitively) depend on.
    pub fn with_ancestors<S: AsRef<str>>(&self, ids: &[S]) -> Result<BTreeSet<String>, DagError> {
        let mut out = BTreeSet::new();
        let rev = Reversed(&self.graph);
        for id in ids {
            let start = self.node(id.as_ref())?;
            for ix in Dfs::new(rev, start).iter(rev) {
                out.insert(self.graph[ix].clone());
            }
        }
        Ok(out)
    }

    /// `ids` and everything that (transitively) depends on them.
    pub fn with_descendants<S: AsRef<str>>(&self, ids: &[S]) -> Result<BTreeSet<String>, DagError> {
        let mut out = BTreeSet::new();
        for id in ids {
            let start = self.node(id.as_ref())?;
            for ix in Dfs::new(&self.graph, start).iter(&self.graph) {
                out.insert(self.graph[ix].clone());
            }
        }
        Ok(out)
    }

    /// Graphviz `dot`; `label` gives the text under each stage id (e.g. its kind).
    pub fn to_dot(&self, label: impl Fn(&str) -> String) -> String {
        let mut s = String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n");
        for &ix in &self.order {
            let id = &self.graph[ix];
            let extra = label(id);
            let text = if extra.is_empty() { id.clone() } else { format!("{id}\\n{extra}") };
            let _ = writeln!(s, "  \"{}\" [label=\"{}\"];", escape_dot(id), escape_dot(&text).replace("\\\\n", "\\n"));
        }
        for &ix in &self.order {
            let mut downs: Vec<&String> =
                self.graph.neighbors_directed(ix, Direction::Outgoing).map(|d| &self.graph[d]).collect();
            downs.sort();
            downs.dedup();
            for d in downs {
                let _ = writeln!(s, "  \"{}\" -> \"{}\";", escape_dot(&self.graph[ix]), escape_dot(d));
            }
        }
        s.push_str("}\n");
        s
    }

    /// Plain text: one line per stage in topological order with its upstreams.
    pub fn to_text(&self, label: impl Fn(&str) -> String) -> String {
        let width = self.order.iter().map(|&ix| self.graph[ix].len()).max().unwrap_or(0);
        let mut s = String::new();
        for &ix in &self.order {
            let id = &self.graph[ix];
            let ups = self.upstream(id).unwrap_or_default();
            let extra = label(id);
            let arrow = if ups.is_empty() { String::new() } else { format!(" <- {}", ups.join(", ")) };
            let _ = writeln!(s, "{id:<width$}  {extra}{arrow}");
        }
        s
    }
}

fn escape_dot(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diamond() -> StageGraph {
        // a -> b -> d, a -> c -> d, e alone
        StageGraph::new([
            ("a".to_string(), vec![]),
            ("b".to_string(), vec!["a".to_string()]),
            ("c".to_string(), vec!["a".to_string(), "a".to_string()]),
            ("d".to_string(), vec!["b".to_string(), "c".to_string()]),
            ("e".to_string(), vec![]),
        ])
        .unwrap()
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn topo_order_is_stable_and_respects_edges() {
        let g = diamond();
        assert_eq!(g.topo_order(), vec!["a", "b", "c", "d", "e"]);
        assert_eq!(g.upstream("d").unwrap(), vec!["b", "c"]);
        assert_eq!(g.downstream("a").unwrap(), vec!["b", "c"]);
    }

    #[test]
    fn ancestors_and_descendants() {
        let g = diamond();
        assert_eq!(g.with_ancestors(&["b"]).unwrap(), set(&["a", "b"]));
        assert_eq!(g.with_ancestors(&["d"]).unwrap(), set(&["a", "b", "c", "d"]));
        assert_eq!(g.with_descendants(&["b"]).unwrap(), set(&["b", "d"]));
        assert_eq!(g.with_descendants(&["e"]).unwrap(), set(&["e"]));
        assert_eq!(g.with_ancestors(&["zz"]).unwrap_err(), DagError::UnknownStage("zz".into()));
    }

    #[test]
    fn cycles_unknown_upstreams_and_duplicates_are_errors() {
        let cyc = StageGraph::new([("a".to_string(), vec!["b".to_string()]), ("b".to_string(), vec!["a".to_string()])]);
        assert!(matches!(cyc.unwrap_err(), DagError::Cycle(_)));
        let unknown = StageGraph::new([("a".to_string(), vec!["nope".to_string()])]);
        assert_eq!(unknown.unwrap_err().to_string(), "stage `a` depends on unknown stage `nope`");
        let dup = StageGraph::new([("a".to_string(), vec![]), ("a".to_string(), vec![])]);
        assert_eq!(dup.unwrap_err(), DagError::Duplicate("a".into()));
    }

    #[test]
    fn dot_and_text_render_every_edge() {
        let g = diamond();
        let dot = g.to_dot(|id| if id == "a" { "files".into() } else { String::new() });
        assert!(dot.contains("\"a\" [label=\"a\\nfiles\"];"), "{dot}");
        for edge in ["\"a\" -> \"b\"", "\"a\" -> \"c\"", "\"b\" -> \"d\"", "\"c\" -> \"d\""] {
            assert!(dot.contains(edge), "missing {edge} in {dot}");
        }
        assert_eq!(dot.matches("->").count(), 4, "duplicate input edges collapse: {dot}");
        let text = g.to_text(|_| "k".into());
        assert!(text.lines().any(|l| l.starts_with("d ") && l.ends_with("<- b, c")), "{text}");
    }
}
