//! Training stages on the Qwen2.5-VL model of stages-vlm: supervised
//! fine-tuning (`sft`). GRPO is the next stage to land here (issue 6).

pub mod optim;
pub mod sft;

pub use sft::Sft;
