//! Qwen2.5-VL as HF transformers writes it
//! ([`modeling_qwen2_5_vl.py`](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py),
//! transformers 4.57.6): one struct per HF module, named after it without
//! the `Qwen2_5_VL` prefix, fields named after the module's attributes (so a
//! checkpoint name such as `model.visual.blocks.3.attn.qkv.weight` reads as a
//! path through these structs). The conditional-generation model that joins
//! the two towers is `Qwen25Vl` in `model.rs`, which imports these modules
//! (never the reverse).
//!
//! The text decoder, the patch embedding, the vision rotary and attention,
//! and for images `get_rope_index` are Qwen2-VL's too (HF's Qwen2.5-VL
//! classes inherit them); `crate::qwen2_vl` re-exports them beside its own
//! vision tower (LayerNorm + QuickGELU blocks, full attention everywhere).

pub mod rope_index;
pub mod text;
pub mod vision;

pub use rope_index::{RopeIndex, rope_index};
pub use text::{Attention, DecoderLayer, KvCache, RotaryEmbedding, TextModel};
pub use vision::{
    PatchEmbed, PatchMerger, VisionAttention, VisionBlock, VisionRotaryEmbedding, VisionTransformer, WindowIndex,
    window_index,
};
