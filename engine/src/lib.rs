//! The pipeline engine: recipe TOML -> typed stages -> DAG -> scheduler ->
//! content-addressed cache. It knows nothing about medicine or any stage kind.

pub mod context;
pub mod params;
pub mod registry;
pub mod stage;

pub use context::{Artifact, LogProgress, MetricsSink, ProgressSink, StageContext, StageContextBuilder};
pub use params::ParamError;
pub use registry::Registry;
pub use stage::{
    ConfiguredStage, Device, DeviceRequest, DynStageKind, InputSpec, OutputSpec, Resources, StageDoc, StageKind,
};

// Re-exported so stage crates derive params with the same versions.
pub use schemars;
