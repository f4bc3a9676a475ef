//! Evaluation, consistency judge and report stages.
//!
//! - [`Eval`] (`kind = "eval"`): a checkpoint on a Parquet split ->
//!   predictions + metrics ([`metrics`] holds the pure scoring logic).
//! - [`Judge`] (`kind = "judge"`): reasoning-answer consistency.
//! - [`ReportStage`] (`kind = "report"`): tables, plots and examples of many
//!   evals side by side (the binary's `pipeline report RUN_A RUN_B ...`
//!   renders the same report for several runs).

pub mod dataset;
pub mod eval;
pub mod general;
pub mod judge;
pub mod metrics;
pub mod plots;
pub mod predictions;
pub mod prompt;
pub mod report;

pub use eval::Eval;
pub use general::GeneralVqa;
pub use judge::Judge;
pub use report::ReportStage;
