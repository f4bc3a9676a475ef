//! The error of loading and running a model. Its own module (not `model.rs`)
//! so the HF modules under `qwen2_5_vl/` and the shared `nn` pieces can
//! return it without importing the model they are parts of.

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("parameter `{0}` missing")]
    MissingParam(String),
    #[error("invalid model input: {0}")]
    Input(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}
