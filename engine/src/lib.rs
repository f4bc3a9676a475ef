//! The pipeline engine: recipe TOML -> typed stages -> DAG -> scheduler ->
//! content-addressed cache. It knows nothing about medicine or any stage kind.

pub mod context;
pub mod params;
pub mod recipe;
pub mod registry;
pub mod stage;

pub use context::{Artifact, DistInfo, LogProgress, MetricsSink, ProgressSink, StageContext, StageContextBuilder};
pub use params::ParamError;
pub use registry::Registry;
pub use stage::{
    ConfiguredStage, Device, DeviceRequest, DynStageKind, InputSpec, OutputSpec, Resources, StageDoc, StageKind,
};

// Re-exported so stage crates derive params with the same versions.
pub use schemars;

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
