//! Qwen2-VL as HF transformers writes it
//! ([`modeling_qwen2_vl.py`](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py),
//! transformers 4.57.6), `model_type = "qwen2_vl"`: the architecture of
//! MedVLM-R1 and Med-R1.
//!
//! Only the vision tower is its own (`vision`): LayerNorm + QuickGELU blocks,
//! full attention in every block (no window index), a LayerNorm patch merger.
//! The rest is shared with `qwen2_5_vl`, because HF's Qwen2.5-VL is defined
//! as a subclass of these modules:
//! - the text decoder `Qwen2VLTextModel` (`Qwen2VLDecoderLayer`,
//!   `Qwen2VLAttention`, `Qwen2VLRotaryEmbedding` with
//!   `apply_multimodal_rotary_pos_emb`, `Qwen2MLP`) is
//!   [`crate::qwen2_5_vl::TextModel`] and its parts;
//! - `PatchEmbed`, `VisionRotaryEmbedding` and `VisionAttention` are
//!   [`crate::qwen2_5_vl::PatchEmbed`], `VisionRotaryEmbedding`,
//!   `VisionAttention` (HF's `Qwen2_5_*` versions are these classes renamed);
//! - `Qwen2VLModel.get_rope_index` is [`crate::qwen2_5_vl::rope_index`] with
//!   a frame step of 1.

pub mod vision;

pub use crate::qwen2_5_vl::{
    Attention, DecoderLayer, KvCache, PatchEmbed, RotaryEmbedding, TextModel, VisionAttention, VisionRotaryEmbedding,
};
pub use vision::{PatchMerger, VisionBlock, VisionMlp, VisionTransformer};

/// The temporal position step between the frames of an image grid in
/// Qwen2-VL's `get_rope_index` (`t_index = arange(llm_grid_t)`).
pub const ROPE_FRAME_STEP: i64 = 1;
