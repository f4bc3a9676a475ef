//! Stage `report`: every eval (and its judge, and the training runs) of a
//! recipe side by side in `report.md` + `plots/*.png` and a self-contained
//! `report.html` (PNG plots and gallery images embedded as base64, opens
//! offline). Deterministic given its inputs: no timestamps, sorted keys,
//! byte-reproducible PNGs.
//!
//! Inputs: `evals` (many `eval` outputs), optional `judges` (many `judge`
//! outputs; matched to evals by the digest of the predictions they judged)
//! and optional `train` (many SFT/GRPO outputs with `metrics.jsonl`).
//!
//! Train-side accuracy: an eval whose split (recorded in its metrics.json
//! `source`) is one of `side_splits` (default `train`, `val`) and that
//! scored the same model with the same prompt as another eval becomes a
//! "`<split>` acc" column of that eval's row instead of a row of its own.
//!
//! Deltas are only taken between evals of the same dataset (`source.dataset`
//! in metrics.json): a CT eval is never compared with a general-VQA eval.
//! `prompt_tables` lay evals out like the paper's Table 1 (models x think /
//! no think on one dataset), `benchmark_tables` like its Table 2 (models x
//! ChartQA / TextVQA, sample-weighted average, Δ vs the base model).
//!
//! The same [`Report`] renders `pipeline report RUN_A RUN_B ...` (the
//! binary's `report compare`): every eval and training run then carries its
//! run's label as a `group`, and tables show the runs as row groups.
//!
//! One module per step: [`load`] (outputs on disk -> runs), [`tables`] and
//! [`figures`] (runs -> cells and plots), [`model`] (the [`Report`] they make
//! up), [`markdown`] and [`html`] (the two renderings; HTML through a
//! minijinja template with autoescape), [`stage`] (the stage kind and the
//! files it writes). [`params`] are the recipe's settings.

pub mod figures;
pub mod html;
pub mod load;
pub mod markdown;
pub mod model;
pub mod params;
pub mod stage;
pub mod tables;

#[cfg(test)]
pub(crate) mod fixtures;

pub use load::{EvalRun, Example, TrainRun, attach_judge, load_eval, load_train};
pub use model::Report;
pub use params::{BenchmarkTableSpec, PromptTableSpec, ReportParams, TableSpec};
pub use stage::ReportStage;
