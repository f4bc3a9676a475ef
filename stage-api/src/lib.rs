//! The Stage API: the only thing a stage crate imports from the pipeline.
//!
//! A stage kind implements [`StageKind`] (typed params, declared inputs and
//! outputs, resources, `run`) and receives a [`StageContext`] (read-only
//! inputs, an output directory published atomically, a resume directory,
//! seeded RNG streams, a sized thread pool, the device, progress, metrics,
//! cancellation, and [`DistInfo`] for data-parallel ranks). The engine
//! plans and runs stages through the type-erased [`DynStageKind`] /
//! [`ConfiguredStage`] that a [`Registry`] hands out, so it never names a
//! kind, and stage crates never see the engine, the cache or the CLI.

pub mod context;
pub mod dist;
pub mod memory;
pub mod param_error;
pub mod params;
pub mod plan;
pub mod ranges;
pub mod registry;
pub mod resources;
pub mod stage;

pub use context::{Artifact, LogProgress, MetricsSink, ProgressSink, StageContext, StageContextBuilder, derive_seed};
pub use dist::{DistInfo, RENDEZVOUS_ABANDONED, host_name};
pub use memory::{MemoryEstimate, MemoryPool, MemoryPrediction, MemoryTerm, Phase};
pub use params::ParamError;
pub use plan::{InputSource, PendingInput, PlanFacts, PlanInput, PlanInputs, PlanOutput, PlanView};
pub use registry::Registry;
pub use resources::{Device, DeviceRequest, Resources};
pub use stage::{ConfiguredStage, DynStageKind, InputSpec, OutputSpec, StageDoc, StageKind, configure_params};

// Re-exported so stage crates derive params with the same versions.
pub use schemars;
