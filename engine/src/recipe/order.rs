//! The one topological order of the pipeline: Kahn's algorithm that always
//! takes the earliest-declared ready node, so the order is deterministic
//! and follows the recipe wherever dependencies allow. The recipe loader
//! sorts stage tables with it and the stage graph
//! ([`crate::plan::graph::StageGraph`]) its expanded stages, so `plan`,
//! `dag` and the scheduler list stages in the order the recipe has them.

use std::collections::BTreeSet;

/// Nodes `0..deps.len()` in dependency order; `deps[x]` lists the nodes `x`
/// depends on (duplicates allowed). `Err(x)`: `x` is on or behind a cycle
/// (the earliest-declared such node).
pub fn stable_topo_order(deps: &[Vec<usize>]) -> Result<Vec<usize>, usize> {
    let n = deps.len();
    let mut indegree = vec![0usize; n];
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (x, ups) in deps.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for &u in ups.iter().filter(|&&u| u < n) {
            if seen.insert(u) {
                indegree[x] += 1;
                downstream[u].push(x);
            }
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&x| indegree[x] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(x) = ready.pop_first() {
        order.push(x);
        for &d in &downstream[x] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.insert(d);
            }
        }
    }
    match (0..n).find(|&x| indegree[x] > 0) {
        Some(stuck) => Err(stuck),
        None => Ok(order),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_nodes_keep_declaration_order() {
        // 0 <- 2, 1 alone, 3 <- 0: ties resolve by index.
        let deps = vec![vec![2], vec![], vec![], vec![0, 0]];
        assert_eq!(stable_topo_order(&deps), Ok(vec![1, 2, 0, 3]));
        // An order that is already topological comes back unchanged.
        let sorted = vec![vec![], vec![0], vec![0, 1], vec![]];
        assert_eq!(stable_topo_order(&sorted), Ok(vec![0, 1, 2, 3]));
    }

    #[test]
    fn a_cycle_names_its_earliest_node() {
        let deps = vec![vec![], vec![2], vec![1], vec![2]];
        assert_eq!(stable_topo_order(&deps), Err(1));
    }
}
