//! What a stage may know about its inputs before it runs ([`PlanView`]),
//! and what it can say about its own output before it runs
//! ([`PlanOutput`]). Plans use this to predict memory; cache keys never do
//! (a key depends on input digests, not on what a plan read from a path).
//!
//! The engine fills a [`PlanView`] for every stage in the one topological
//! order: an input whose upstream is published points at the published
//! output; an input whose upstream will run points at the upstream's
//! [`PlanOutput::stand_in`] when it declared one (a `files` import names its
//! source, a fine-tuning stage its input checkpoint, whose config and tensor
//! shapes the output keeps), else it is pending.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::resources::DeviceRequest;

/// Known fact keys (see [`PlanFacts`]).
pub mod facts {
    /// Upper bound of the pixels (width × height) of any image in the data,
    /// e.g. from the `render` stage's resize bound.
    pub const MAX_IMAGE_PIXELS: &str = "max_image_pixels";
}

/// Upper bounds a stage states about its output before it runs (key ->
/// value; keys in [`facts`]). By default a stage passes on its inputs'
/// facts, so a bound declared by `render` reaches the training stages
/// through `vqa`, `split` and `parquet_export`. Merging keeps the larger
/// value: every fact is an upper bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanFacts(BTreeMap<String, u64>);

impl PlanFacts {
    pub fn get(&self, key: &str) -> Option<u64> {
        self.0.get(key).copied()
    }

    pub fn set(&mut self, key: &str, value: u64) {
        self.0.insert(key.to_string(), value);
    }

    /// Keep the larger value of every key (facts are upper bounds).
    pub fn merge(&mut self, other: &PlanFacts) {
        for (k, &v) in &other.0 {
            let slot = self.0.entry(k.clone()).or_insert(v);
            *slot = (*slot).max(v);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where an input's files can be read at plan time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "path")]
pub enum InputSource {
    /// The upstream's published output.
    Published(PathBuf),
    /// The upstream will run; this directory stands in for its output (same
    /// layout and shapes, see [`PlanOutput::stand_in`]).
    StandIn(PathBuf),
    /// The upstream will run and nothing stands in for it.
    Pending,
}

/// One input reference as the plan knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanInput {
    /// The upstream stage id.
    pub stage: String,
    pub source: InputSource,
    pub facts: PlanFacts,
}

/// The inputs of a stage at plan time, by input name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanInputs {
    inputs: BTreeMap<String, Vec<PlanInput>>,
}

/// An input the plan cannot read yet: which upstream must run first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInput {
    pub input: String,
    /// The upstream stage that has to run (empty when the input is not declared).
    pub stage: String,
}

impl std::fmt::Display for PendingInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.stage.is_empty() {
            write!(f, "input `{}` is not given", self.input)
        } else {
            write!(f, "unknown until `{}` runs", self.stage)
        }
    }
}

impl PlanInputs {
    pub fn new(inputs: BTreeMap<String, Vec<PlanInput>>) -> Self {
        Self { inputs }
    }

    /// The first reference of input `name`.
    pub fn get(&self, name: &str) -> Option<&PlanInput> {
        self.inputs.get(name).and_then(|refs| refs.first())
    }

    /// A readable directory for input `name` (published or stand-in), or
    /// the upstream stage that must run first.
    pub fn path(&self, name: &str) -> Result<&Path, PendingInput> {
        match self.get(name) {
            Some(PlanInput { source: InputSource::Published(p) | InputSource::StandIn(p), .. }) => Ok(p),
            Some(PlanInput { stage, .. }) => Err(PendingInput { input: name.into(), stage: stage.clone() }),
            None => Err(PendingInput { input: name.into(), stage: String::new() }),
        }
    }

    /// The published output of input `name` (stand-ins do not count: they
    /// share the layout of the output to come, not its data).
    pub fn published(&self, name: &str) -> Option<&Path> {
        match self.get(name) {
            Some(PlanInput { source: InputSource::Published(p), .. }) => Some(p),
            _ => None,
        }
    }

    /// The facts of every reference of input `name`, merged.
    pub fn facts(&self, name: &str) -> PlanFacts {
        let mut out = PlanFacts::default();
        for r in self.inputs.get(name).into_iter().flatten() {
            out.merge(&r.facts);
        }
        out
    }

    /// The facts of every input, merged (the default [`PlanOutput`]).
    pub fn all_facts(&self) -> PlanFacts {
        let mut out = PlanFacts::default();
        for r in self.inputs.values().flatten() {
            out.merge(&r.facts);
        }
        out
    }
}

/// Everything a stage sees at plan time.
#[derive(Debug, Clone)]
pub struct PlanView<'a> {
    pub inputs: &'a PlanInputs,
    /// Data-parallel ranks (`[executor.stage.<id>] ranks`; 1 for most stages).
    pub ranks: usize,
    /// The device the stage will get where it runs: `Cpu` or `Cuda` (a stage
    /// asking for `auto` is resolved by the planner; `Cuda` also when no GPU
    /// is here but the stage requires one).
    pub device: DeviceRequest,
    /// Relative paths in params resolve here.
    pub recipe_dir: &'a Path,
}

/// What a stage says about its output before it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanOutput {
    /// A directory that already holds what downstream plans read of this
    /// output (e.g. a checkpoint's `config.json`), with the same layout.
    pub stand_in: Option<PathBuf>,
    pub facts: PlanFacts,
}

impl PlanOutput {
    /// No stand-in; the inputs' facts passed on.
    pub fn pass_through(view: &PlanView) -> Self {
        Self { stand_in: None, facts: view.inputs.all_facts() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(stage: &str, source: InputSource, pixels: Option<u64>) -> PlanInput {
        let mut facts = PlanFacts::default();
        if let Some(p) = pixels {
            facts.set(facts::MAX_IMAGE_PIXELS, p);
        }
        PlanInput { stage: stage.into(), source, facts }
    }

    #[test]
    fn paths_come_from_published_outputs_and_stand_ins_only() {
        let inputs = PlanInputs::new(BTreeMap::from([
            ("model".to_string(), vec![input("base", InputSource::StandIn("/models/q".into()), None)]),
            ("data".to_string(), vec![input("export", InputSource::Pending, Some(10))]),
            ("more".to_string(), vec![input("a", InputSource::Published("/c/a".into()), Some(30))]),
        ]));
        assert_eq!(inputs.path("model").unwrap(), Path::new("/models/q"));
        assert_eq!(inputs.published("model"), None, "a stand-in is not the published output");
        assert_eq!(inputs.published("more"), Some(Path::new("/c/a")));
        let e = inputs.path("data").unwrap_err();
        assert_eq!(e.to_string(), "unknown until `export` runs");
        assert_eq!(inputs.path("nope").unwrap_err().to_string(), "input `nope` is not given");
        assert_eq!(inputs.facts("data").get(facts::MAX_IMAGE_PIXELS), Some(10));
        assert_eq!(inputs.all_facts().get(facts::MAX_IMAGE_PIXELS), Some(30), "merged by maximum");
    }
}
