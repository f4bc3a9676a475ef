//! The pipeline engine: recipe TOML -> typed stages -> DAG -> scheduler ->
//! content-addressed cache. It knows nothing about medicine or any stage kind.

pub mod recipe;

// The Stage API lives in its own crate (stage crates import it alone); the
// engine uses it under the same module names.
pub use stage_api::{context, params, registry, stage};

pub use context::{Artifact, LogProgress, MetricsSink, ProgressSink, StageContext, StageContextBuilder};
pub use params::ParamError;
pub use registry::Registry;
pub use stage::{
    ConfiguredStage, Device, DeviceRequest, DynStageKind, InputSpec, OutputSpec, Resources, StageDoc, StageKind,
};
pub use stage_api::DistInfo;

pub mod canonical;
pub mod cli;
pub mod dag;
pub mod env;
pub mod executor;
pub mod index;
pub mod jobspec;
pub mod key;
pub mod plan;
pub mod progress;
pub mod provenance;
pub mod ranks;
pub mod schedule;
pub mod slurm;
pub mod stage_log;
pub mod stage_run;
pub mod workspace;

pub use cli::{Command, execute, exit_code_for};
pub use env::EngineEnv;
