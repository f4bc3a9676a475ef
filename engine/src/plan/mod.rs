//! Planning: the stage graph and its one order, ALL key derivation
//! ([`components`]), which stages a run selects, and for each whether it is
//! cached or must run, and why.

pub mod canonical;
pub mod components;
pub mod device;
pub mod graph;
pub mod key;
pub mod memory;
pub mod planner;
pub mod selection;

#[cfg(test)]
mod fixtures;

pub use graph::{DagError, StageGraph};
pub use key::KeyComponents;
pub use planner::{Action, Plan, PlannedStage, make_plan};
pub use selection::{SelectOptions, Selection};
