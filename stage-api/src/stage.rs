//! The Stage API: the only seam between the engine and stage kinds.
//!
//! A stage kind implements [`StageKind`] (typed params, declared inputs and
//! outputs, resources, `run`). The engine only ever sees the type-erased
//! [`DynStageKind`] / [`ConfiguredStage`] objects that [`Registry`](crate::Registry)
//! hands out, so it never names a kind.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::StageContext;
use crate::memory::MemoryEstimate;
use crate::params::{ParamError, parse_params};
use crate::plan::{PlanOutput, PlanView};
use crate::resources::Resources;

/// A named input of a stage kind. In a recipe, the stage table key `name`
/// holds a reference `"stage"` (the whole output directory of that stage) or
/// `"stage.output"` (one named output), or a list of such references when
/// `many` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSpec {
    pub name: &'static str,
    pub doc: &'static str,
    /// Accept a list of references (e.g. a report gathering many evals).
    pub many: bool,
    /// The key may be absent from the recipe.
    pub optional: bool,
}

impl InputSpec {
    pub const fn one(name: &'static str, doc: &'static str) -> Self {
        Self { name, doc, many: false, optional: false }
    }
    pub const fn optional(name: &'static str, doc: &'static str) -> Self {
        Self { name, doc, many: false, optional: true }
    }
    pub const fn many(name: &'static str, doc: &'static str) -> Self {
        Self { name, doc, many: true, optional: false }
    }
}

/// A named output: a sub-directory of the stage's output directory that
/// downstream stages reference as `"stage.name"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub name: String,
    pub doc: String,
}

impl OutputSpec {
    pub fn new(name: impl Into<String>, doc: impl Into<String>) -> Self {
        Self { name: name.into(), doc: doc.into() }
    }
}

/// Documentation of a stage kind for `docs/recipes.md` and `--help`.
#[derive(Debug, Clone)]
pub struct StageDoc {
    pub kind: &'static str,
    pub version: u32,
    /// Runs as data-parallel ranks ([`StageKind::DISTRIBUTED`]).
    pub distributed: bool,
    pub summary: &'static str,
    pub inputs: &'static [InputSpec],
    /// JSON schema of the params (descriptions from doc comments, defaults).
    pub params_schema: serde_json::Value,
}

/// A stage kind, written once per kind with typed params.
///
/// Params are deserialized with serde from the stage's recipe table minus
/// `kind` and the input keys; use `#[serde(deny_unknown_fields, default)]`
/// and doc comments on every field (they become the recipe reference).
pub trait StageKind: Send + Sync + 'static {
    type Params: DeserializeOwned + Serialize + JsonSchema + Send + Sync + 'static;

    /// Name used as `kind = "..."` in recipes.
    const KIND: &'static str;
    /// Implementation version: bump whenever the outputs for the same inputs
    /// and params would change. Part of the cache key.
    const VERSION: u32;
    /// One line for docs and `pipeline kinds`.
    const SUMMARY: &'static str;
    /// The kind can run as several cooperating processes (data-parallel
    /// ranks, `[executor.stage.<id>] ranks = N`): `run` then reads
    /// [`StageContext::dist`] and only rank 0's outputs are published.
    const DISTRIBUTED: bool = false;

    /// Named inputs (static: the engine must know them before params parse).
    fn inputs() -> &'static [InputSpec] {
        &[]
    }

    /// Named outputs produced under the output directory.
    fn outputs(_params: &Self::Params) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn resources(_params: &Self::Params) -> Resources {
        Resources::default()
    }

    /// Predicted memory per rank, from what the plan knows of the inputs
    /// (e.g. the model config of a checkpoint input). When predicted, the
    /// host peak (times the ranks) replaces `resources().memory_mb` for
    /// admission and Slurm's `--mem`. Never part of the cache key.
    fn memory(_params: &Self::Params, _plan: &PlanView) -> MemoryEstimate {
        MemoryEstimate::NotModelled
    }

    /// What this stage's output will look like, for the plans of stages
    /// downstream, before it runs: a stand-in directory with the same layout
    /// (a `files` import: its source) and upper bounds on its data. Default:
    /// no stand-in, the inputs' facts passed on.
    fn plan_output(_params: &Self::Params, plan: &PlanView) -> PlanOutput {
        PlanOutput::pass_through(plan)
    }

    /// Files or directories outside the cache that this stage reads (e.g. a
    /// dataset root). Their content digests (stat-cached) enter the cache key,
    /// so editing them re-runs the stage. Relative paths are resolved against
    /// `recipe_dir`.
    fn external_inputs(_params: &Self::Params, _recipe_dir: &Path) -> Vec<PathBuf> {
        Vec::new()
    }

    /// JSON pointers (RFC 6901, e.g. `/http/url`) into the canonical params
    /// of settings that cannot change the stage's results — where a server
    /// is, how many requests are in flight, how long to wait, how often to
    /// retry. They are left out of the cache key (moving a server to another
    /// host reuses its results) and out of `why`'s params diff, but still
    /// reach [`StageKind::run`] and provenance. Declare nothing that could
    /// change an output byte.
    fn unkeyed_params(_params: &Self::Params) -> Vec<&'static str> {
        Vec::new()
    }

    /// Extra checks on params after deserialization (ranges, consistency).
    /// Return the offending key and a message.
    fn validate(_params: &Self::Params) -> Result<(), ParamError> {
        Ok(())
    }

    /// Checks that depend on which inputs the recipe binds: an optional input
    /// that one setting of the params needs and another has no use for.
    /// `given` names the inputs present. Return the param to blame.
    fn validate_inputs(_params: &Self::Params, _given: &[&str]) -> Result<(), ParamError> {
        Ok(())
    }

    /// Do the work: read `ctx` inputs, write into `ctx.output_dir()`.
    /// Anything written there is published atomically on success.
    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()>;
}

/// Type-erased stage kind held by the registry.
pub trait DynStageKind: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn doc(&self) -> StageDoc;
    fn inputs(&self) -> &'static [InputSpec];
    /// See [`StageKind::DISTRIBUTED`].
    fn distributed(&self) -> bool;
    /// Parse and validate params (the recipe table minus `kind` and inputs).
    fn configure(&self, params: toml::Table) -> Result<Box<dyn ConfiguredStage>, ParamError>;
    /// Rebuild a configured stage from its [`ConfiguredStage::canonical_params`]
    /// (how `pipeline exec-stage` recreates a stage in another process).
    fn configure_canonical(&self, params: serde_json::Value) -> Result<Box<dyn ConfiguredStage>, ParamError>;
}

/// A stage kind with parsed params: what the engine plans and runs.
pub trait ConfiguredStage: Send + Sync {
    /// Params with defaults filled in, as canonical JSON (for the cache key,
    /// `show` and provenance).
    fn canonical_params(&self) -> serde_json::Value;
    /// See [`StageKind::unkeyed_params`].
    fn unkeyed_params(&self) -> Vec<&'static str> {
        Vec::new()
    }
    fn outputs(&self) -> Vec<OutputSpec>;
    fn resources(&self) -> Resources;
    /// See [`StageKind::memory`].
    fn memory(&self, plan: &PlanView) -> MemoryEstimate;
    /// See [`StageKind::plan_output`].
    fn plan_output(&self, plan: &PlanView) -> PlanOutput;
    /// See [`StageKind::DISTRIBUTED`].
    fn distributed(&self) -> bool;
    fn external_inputs(&self, recipe_dir: &Path) -> Vec<PathBuf>;
    /// See [`StageKind::validate_inputs`].
    fn validate_inputs(&self, _given: &[&str]) -> Result<(), ParamError> {
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()>;
}

/// Params of kind `K` from a recipe table, exactly as the engine gets them:
/// unknown keys, declared ranges ([`crate::ranges`]) and types checked by
/// [`parse_params`], then [`StageKind::validate`]. Stage crates test their
/// params checks through it.
pub fn configure_params<K: StageKind>(table: toml::Table) -> Result<K::Params, ParamError> {
    let params: K::Params = parse_params::<K::Params>(table)?;
    K::validate(&params)?;
    Ok(params)
}

pub(crate) struct Erased<K: StageKind>(std::marker::PhantomData<K>);

impl<K: StageKind> Erased<K> {
    pub(crate) fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

struct Configured<K: StageKind> {
    params: K::Params,
}

impl<K: StageKind> DynStageKind for Erased<K> {
    fn kind(&self) -> &'static str {
        K::KIND
    }
    fn version(&self) -> u32 {
        K::VERSION
    }
    fn doc(&self) -> StageDoc {
        StageDoc {
            kind: K::KIND,
            version: K::VERSION,
            distributed: K::DISTRIBUTED,
            summary: K::SUMMARY,
            inputs: K::inputs(),
            params_schema: crate::params::schema_of::<K::Params>(),
        }
    }
    fn inputs(&self) -> &'static [InputSpec] {
        K::inputs()
    }
    fn distributed(&self) -> bool {
        K::DISTRIBUTED
    }
    fn configure(&self, params: toml::Table) -> Result<Box<dyn ConfiguredStage>, ParamError> {
        let params = configure_params::<K>(params)?;
        Ok(Box::new(Configured::<K> { params }))
    }
    fn configure_canonical(&self, params: serde_json::Value) -> Result<Box<dyn ConfiguredStage>, ParamError> {
        // The exact serde inverse of `canonical_params` (TOML has no null, so
        // `Option` params could not round-trip through `configure`).
        crate::ranges::check_json(&crate::params::schema_of::<K::Params>(), &params)?;
        let params: K::Params = serde_path_to_error::deserialize(params).map_err(|e| {
            let path = e.path().to_string();
            ParamError { path: vec![path], message: e.inner().to_string(), hint: None }
        })?;
        K::validate(&params)?;
        Ok(Box::new(Configured::<K> { params }))
    }
}

impl<K: StageKind> ConfiguredStage for Configured<K> {
    fn canonical_params(&self) -> serde_json::Value {
        // Serializing our own typed params cannot fail for serde-derived
        // structs; fall back to Null rather than panic.
        serde_json::to_value(&self.params).unwrap_or(serde_json::Value::Null)
    }
    fn unkeyed_params(&self) -> Vec<&'static str> {
        K::unkeyed_params(&self.params)
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        K::outputs(&self.params)
    }
    fn resources(&self) -> Resources {
        K::resources(&self.params)
    }
    fn memory(&self, plan: &PlanView) -> MemoryEstimate {
        K::memory(&self.params, plan)
    }
    fn plan_output(&self, plan: &PlanView) -> PlanOutput {
        K::plan_output(&self.params, plan)
    }
    fn distributed(&self) -> bool {
        K::DISTRIBUTED
    }
    fn external_inputs(&self, recipe_dir: &Path) -> Vec<PathBuf> {
        K::external_inputs(&self.params, recipe_dir)
    }
    fn validate_inputs(&self, given: &[&str]) -> Result<(), ParamError> {
        K::validate_inputs(&self.params, given)
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        K::run(&self.params, ctx)
    }
}
