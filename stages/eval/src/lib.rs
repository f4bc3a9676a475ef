//! Evaluation, consistency judge and report stages.
//!
//! - [`Eval`] (`kind = "eval"`): a checkpoint (or a model served behind an
//!   OpenAI-compatible API, [`served`]) on a Parquet split -> predictions +
//!   metrics (per-item scoring is the task contract's, `stages_task::answer`;
//!   [`metrics`] aggregates).
//! - [`Judge`] (`kind = "judge"`): reasoning-answer consistency.
//! - [`ReportStage`] (`kind = "report"`): tables, plots and examples of many
//!   evals side by side (the binary's `pipeline report RUN_A RUN_B ...`
//!   renders the same report for several runs).
//! - [`GeneralVqa`] (`kind = "general_vqa"`): a synthetic general-VQA set.
//!
//! [`artifacts`] names the files these stages exchange; no stage module
//! imports another for a name. [`chat_api`] is the one OpenAI-compatible
//! client (the eval's `http` backend and the judge's).

pub mod artifacts;
pub mod chat_api;
pub mod eval;
pub mod general;
pub mod judge;
pub mod memory;
pub mod metrics;
pub mod plots;
pub mod predictions;
pub mod report;
pub mod served;

pub use eval::Eval;
pub use general::GeneralVqa;
pub use judge::Judge;
pub use report::ReportStage;
