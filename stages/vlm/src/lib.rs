//! Qwen2.5-VL on tch (libtorch): config, checkpoint IO, vision tower, text
//! decoder with multimodal RoPE, image processor, tokenizer + chat template,
//! batched generation, and the `init_model` stage.
// serde_json's json! macro needs a deeper limit for the HF config literal.
#![recursion_limit = "256"]

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod init_model;
pub mod layers;
pub mod model;
pub mod processor;
pub mod resize;
pub mod rope_index;
pub mod text;
pub mod vision;

pub use config::Qwen25VlConfig;
pub use init_model::InitModel;
pub use model::{Batch, ModelError, Qwen25Vl};
