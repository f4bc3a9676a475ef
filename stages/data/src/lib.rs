//! Data stages: from CT volumes and lesion masks to a VQA dataset that
//! training and evaluation read, plus readers of published datasets.
//!
//! The paper's construction, one stage per step: [`RexgctIndex`] (a
//! ReXGroundingCT-shaped root) or [`Phantom`] (a synthetic corpus for offline
//! runs) -> [`LesionSlices`] (2D boxes with area > 1300 px, <= 20 sampled
//! slices per lesion) -> [`Render`] (windowed RGB with the zoom-in patch) ->
//! [`Vqa`] (7-class multiple choice) -> [`Split`] (patient-level 8:2) ->
//! [`ParquetExport`] (HF-loadable Parquet or `save_to_disk` Arrow).
//! Published data comes in through [`HfVqa`] (ChartQA / TextVQA Parquet) and
//! [`HfDiskVqa`] (the released CT-RATE-VQA `save_to_disk` directories).
//! Supporting modules: [`nifti`] (NIfTI-1/2 IO), [`components`] (connected
//! components and box rules), [`jsonl`] (the hand-over files between these
//! stages) and [`inspect`] (what `pipeline inspect` prints).
pub mod components;
pub mod hf_disk_vqa;
pub mod hf_vqa;
pub mod inspect;
pub mod jsonl;
pub mod nifti;
pub mod parquet_export;
pub mod paths;
pub mod phantom;
pub mod render;
pub mod rexgct;
pub mod slices;
pub mod split;
pub mod vqa;
pub use hf_disk_vqa::HfDiskVqa;
pub use hf_vqa::HfVqa;
pub use parquet_export::ParquetExport;
pub use phantom::Phantom;
pub use render::Render;
pub use rexgct::RexgctIndex;
pub use slices::LesionSlices;
pub use split::Split;
pub use vqa::Vqa;
