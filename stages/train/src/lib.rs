//! Training stages on the Qwen2.5-VL model of stages-vlm: supervised
//! fine-tuning (`sft`) and GRPO (`grpo`) with weighted rewards.

pub mod advantages;
pub mod dist;
pub mod grpo;
pub mod memory;
pub mod optim;
pub mod policy_loss;
pub mod prompt;
pub mod resume;
pub mod rewards;
pub mod rollout;
pub mod sft;
pub mod trainer;

pub use grpo::Grpo;
pub use sft::Sft;
