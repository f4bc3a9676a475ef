//! Qwen2.5-VL and Qwen2-VL on tch (libtorch): config, checkpoint IO, the one
//! checkpoint loader (`pretrained`), device/dtype choice, vision towers and
//! text decoder named after their HF modules (`qwen2_5_vl`, `qwen2_vl`),
//! image processor, tokenizer + chat template, batched generation, and the
//! `init_model` stage.
// serde_json's json! macro needs a deeper limit for the HF config literal.
#![recursion_limit = "256"]

pub mod activation_checkpointing;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod init_model;
pub mod memory;
pub mod model;
pub mod nn;
pub mod pretrained;
pub mod processor;
pub mod qwen2_5_vl;
pub mod qwen2_vl;
pub mod threads;
pub mod training;

pub use config::{ModelType, Qwen25VlConfig, VisionTowerConfig};
pub use device::DeviceChoice;
pub use error::ModelError;
pub use init_model::InitModel;
pub use model::{Batch, Qwen25Vl, VisionTower};
pub use pretrained::Pretrained;
pub use threads::ThreadsGuard;
pub use training::LogitsSpan;
