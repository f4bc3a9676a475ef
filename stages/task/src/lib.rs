//! The VQA task contract: what the data stages write, the training stages
//! learn from and the evaluation stages score. Nothing here is a stage; it is
//! the agreement between them, kept in one place so they cannot drift apart.
//!
//! - [`schema`]: the Parquet layout of `parquet_export` (column names, the
//!   Hugging Face `Image` struct, the boxes list, the HF feature declarations).
//! - [`dataset`]: [`VqaRow`], the row every reader sees, the reader of a
//!   split (Parquet or `save_to_disk`) and the row writer.
//! - [`columns`]: typed access to Arrow columns with located errors (what
//!   every reader, ours and the HF benchmark readers', is built from).
//! - [`hf_disk`]: the `datasets` `save_to_disk` layout (Arrow IPC stream
//!   shards, `state.json`, `dataset_info.json`), read and written.
//! - [`prompt`]: the think / no-think instructions and [`PromptVariant`].
//! - [`completion`]: the ONE format rule of a completion (eval metric, GRPO
//!   format reward and judge all call it) and the parser behind it.
//! - [`answer`]: answer extraction and per-item scoring ([`Scorer`]).
//! - [`benchmark`]: the general-VQA benchmark metrics as lmms-eval computes
//!   them (ChartQA relaxed accuracy, TextVQA VQA accuracy and its answer
//!   normalisation).
//!
//! Pure Rust (no tch): every consumer and its tests use it without a model.

pub mod answer;
pub mod benchmark;
pub mod columns;
pub mod completion;
pub mod dataset;
pub mod hf_disk;
pub mod prompt;
pub mod schema;

pub use answer::{AnswerMatch, ExtractFailure, ItemScore, Outcome, Scorer};
pub use completion::{Completion, ResponseFormat};
pub use dataset::{VqaRow, read_split};
pub use prompt::PromptVariant;
