//! Qwen2.5-VL and Qwen2-VL `config.json` as written by HF transformers, and
//! plain Qwen2 / Qwen2.5 causal-LM configs (`model_type = "qwen2"`, no
//! `vision_config`): the same decoder without a vision tower (the judge's
//! text-only models).
//!
//! Two layouts exist for both VL models: older checkpoints (e.g. the released 7B-Instruct) keep
//! the text-model fields at the top level; transformers >= 4.52 also writes a
//! `text_config` object. We read text fields from `text_config` when present,
//! else from the top level. Extra keys are ignored (HF writes dozens of
//! generation/bookkeeping keys); missing required keys and unsupported values
//! are errors that name the file and the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The model config of a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
}

/// The language model half (Qwen2 decoder with multimodal RoPE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Rotary dims given to (temporal, height, width); sums to head_dim / 2.
    pub mrope_section: [i64; 3],
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// The vision tower (ViT with window attention and a 2x2 patch merger).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub depth: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_heads: i64,
    pub in_chans: i64,
    /// Output width of the merger = the text model's hidden size.
    pub out_hidden_size: i64,
    pub patch_size: i64,
    pub spatial_merge_size: i64,
    pub temporal_patch_size: i64,
    /// Window side in pixels (112 = 4x4 merged tokens).
    pub window_size: i64,
    /// Blocks that attend over the whole image instead of windows.
    pub fullatt_block_indexes: Vec<i64>,
    pub tokens_per_second: i64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }
    /// Values per flattened patch: channels x temporal x patch x patch (1176).
    pub fn patch_dim(&self) -> i64 {
        self.in_chans * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    pub fn merge_unit(&self) -> i64 {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// The Qwen2-VL vision tower (HF `Qwen2VLVisionConfig`): a ViT of blocks
/// with LayerNorm and a QuickGELU MLP, full attention everywhere, and a
/// LayerNorm patch merger. Fields carry the HF names, which differ from Qwen2.5-VL's: the
/// ViT width is `embed_dim` and `hidden_size` is the merger's output (the
/// text model's width).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VlVisionConfig {
    pub depth: i64,
    /// ViT width.
    pub embed_dim: i64,
    /// Output width of the merger = the text model's hidden size.
    pub hidden_size: i64,
    /// MLP width = `int(embed_dim * mlp_ratio)` (HF truncates).
    pub mlp_ratio: f64,
    pub num_heads: i64,
    pub in_channels: i64,
    pub patch_size: i64,
    pub spatial_merge_size: i64,
    pub temporal_patch_size: i64,
}

impl Qwen2VlVisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.embed_dim / self.num_heads
    }
    /// `fc1` output width (HF `mlp_hidden_dim = int(embed_dim * mlp_ratio)`).
    pub fn intermediate_size(&self) -> i64 {
        (self.embed_dim as f64 * self.mlp_ratio) as i64
    }
    /// Values per flattened patch: channels x temporal x patch x patch (1176).
    pub fn patch_dim(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    pub fn merge_unit(&self) -> i64 {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// The vision tower of a VL checkpoint, by architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VisionTowerConfig {
    /// `qwen2_5_vl`: window attention, RMSNorm + gated-SiLU blocks.
    Qwen2_5Vl(VisionConfig),
    /// `qwen2_vl`: full attention, LayerNorm + QuickGELU blocks.
    Qwen2Vl(Qwen2VlVisionConfig),
}

impl VisionTowerConfig {
    /// Side of the square of patches merged into one visual token (2).
    pub fn spatial_merge_size(&self) -> i64 {
        match self {
            Self::Qwen2_5Vl(v) => v.spatial_merge_size,
            Self::Qwen2Vl(v) => v.spatial_merge_size,
        }
    }
    /// Values per processor row (1176).
    pub fn patch_dim(&self) -> i64 {
        match self {
            Self::Qwen2_5Vl(v) => v.patch_dim(),
            Self::Qwen2Vl(v) => v.patch_dim(),
        }
    }
}

/// The special tokens that place images in the text (VL checkpoints only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisionTokens {
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub vision_start_token_id: i64,
    pub vision_end_token_id: i64,
}

/// A Qwen2.5-VL or Qwen2-VL config, or a Qwen2 text config (`vision` and
/// `tokens` None).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen25VlConfig {
    /// Which architecture the checkpoint is: what the model dispatches on.
    pub model_type: ModelType,
    pub text: TextConfig,
    /// None for a text-only Qwen2 causal LM.
    pub vision: Option<VisionTowerConfig>,
    pub tokens: Option<VisionTokens>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Vec<i64>,
    /// The raw JSON, written back unchanged when saving a checkpoint.
    #[serde(skip)]
    pub raw: Value,
}

struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Field { path: self.path.to_path_buf(), field: field.to_string(), message: message.into() }
    }
    fn get<'v>(&self, obj: &'v Value, field: &str) -> Result<&'v Value, ConfigError> {
        obj.get(field).filter(|v| !v.is_null()).ok_or_else(|| self.err(field, "missing"))
    }
    fn int(&self, obj: &Value, field: &str) -> Result<i64, ConfigError> {
        self.get(obj, field)?.as_i64().ok_or_else(|| self.err(field, "expected an integer"))
    }
    fn int_or(&self, obj: &Value, field: &str, default: i64) -> Result<i64, ConfigError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.int(obj, field),
        }
    }
    fn float(&self, obj: &Value, field: &str) -> Result<f64, ConfigError> {
        self.get(obj, field)?.as_f64().ok_or_else(|| self.err(field, "expected a number"))
    }
    fn positive(&self, obj: &Value, field: &str) -> Result<i64, ConfigError> {
        let v = self.int(obj, field)?;
        if v <= 0 {
            return Err(self.err(field, format!("expected a positive integer, got {v}")));
        }
        Ok(v)
    }
}

/// The architectures this crate runs, by HF `config.json` `model_type`.
/// A new one is a variant here, its parsing below, and its modules beside
/// `qwen2_5_vl/` and `qwen2_vl/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelType {
    /// `qwen2_5_vl`: HF `Qwen2_5_VLForConditionalGeneration`.
    Qwen2_5Vl,
    /// `qwen2`: a Qwen2 / Qwen2.5 causal LM (HF `Qwen2ForCausalLM`), the
    /// Qwen2.5-VL text decoder without a vision tower.
    Qwen2,
    /// `qwen2_vl`: HF `Qwen2VLForConditionalGeneration` (e.g. MedVLM-R1,
    /// Med-R1): the same text decoder, a Qwen2-VL vision tower.
    Qwen2Vl,
}

impl ModelType {
    pub const ALL: [ModelType; 3] = [ModelType::Qwen2_5Vl, ModelType::Qwen2, ModelType::Qwen2Vl];

    /// The `model_type` string of `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Qwen2_5Vl => "qwen2_5_vl",
            ModelType::Qwen2 => "qwen2",
            ModelType::Qwen2Vl => "qwen2_vl",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// `"qwen2_5_vl", "qwen2", "qwen2_vl"`: for error messages.
    pub fn supported() -> String {
        Self::ALL.map(|t| format!("{:?}", t.name())).join(", ")
    }
}

impl Qwen25VlConfig {
    /// True for a plain Qwen2 causal LM (no vision tower).
    pub fn is_text_only(&self) -> bool {
        self.vision.is_none()
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        let raw: Value =
            serde_json::from_str(&text).map_err(|source| ConfigError::Json { path: path.into(), source })?;
        Self::from_value(raw, path)
    }

    /// Parse from JSON; `path` is only used in error messages.
    pub fn from_value(raw: Value, path: &Path) -> Result<Self, ConfigError> {
        let r = Reader { path };
        let model_type = match raw.get("model_type").and_then(Value::as_str) {
            Some(name) => ModelType::from_name(name).ok_or_else(|| {
                r.err("model_type", format!("unsupported {name:?}; supported: {}", ModelType::supported()))
            })?,
            None if raw.get("vision_config").is_some() => ModelType::Qwen2_5Vl,
            None => ModelType::Qwen2,
        };
        match model_type {
            ModelType::Qwen2 => Self::text_only(raw, path),
            ModelType::Qwen2_5Vl => Self::qwen2_5_vl(raw, path),
            ModelType::Qwen2Vl => Self::qwen2_vl(raw, path),
        }
    }

    /// A Qwen2.5-VL config (HF `Qwen2_5_VLConfig`).
    fn qwen2_5_vl(raw: Value, path: &Path) -> Result<Self, ConfigError> {
        let text = vl_text_config(&raw, path)?;
        let vr = Reader { path };
        let v = vr.get(&raw, "vision_config")?;
        let vact = v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if vact != "silu" {
            return Err(vr.err("vision_config.hidden_act", format!("only \"silu\" is supported, got {vact:?}")));
        }
        let fullatt = match v.get("fullatt_block_indexes") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_i64().ok_or_else(|| vr.err("vision_config.fullatt_block_indexes", "expected integers")))
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                return Err(vr.err("vision_config.fullatt_block_indexes", "missing (expected a list of block indexes)"));
            }
        };
        let vf = |field: &str| vision_positive(&vr, v, field);
        let vision = VisionConfig {
            depth: vf("depth")?,
            hidden_size: vf("hidden_size")?,
            intermediate_size: vf("intermediate_size")?,
            num_heads: vf("num_heads")?,
            in_chans: vr.int_or(v, "in_chans", 3)?,
            out_hidden_size: vf("out_hidden_size")?,
            patch_size: vf("patch_size")?,
            spatial_merge_size: vf("spatial_merge_size")?,
            temporal_patch_size: vf("temporal_patch_size")?,
            window_size: vf("window_size")?,
            fullatt_block_indexes: fullatt,
            tokens_per_second: vr.int_or(v, "tokens_per_second", 2)?,
        };
        if vision.out_hidden_size != text.hidden_size {
            return Err(vr.err("vision_config.out_hidden_size", format!("must equal hidden_size {}", text.hidden_size)));
        }
        if vision.window_size % (vision.patch_size * vision.spatial_merge_size) != 0 {
            return Err(vr.err("vision_config.window_size", "must be a multiple of patch_size * spatial_merge_size"));
        }
        if vision.hidden_size % vision.num_heads != 0 {
            return Err(vr.err("vision_config.num_heads", "must divide vision hidden_size"));
        }
        Self::vl(raw, path, ModelType::Qwen2_5Vl, text, VisionTowerConfig::Qwen2_5Vl(vision))
    }

    /// A Qwen2-VL config (HF `Qwen2VLConfig`): the text half and the special
    /// tokens as for Qwen2.5-VL; `vision_config` is `Qwen2VLVisionConfig`
    /// (`embed_dim`, `mlp_ratio`, `hidden_size` = the text width, no window
    /// fields). Absent `mlp_ratio`, `in_channels` and `hidden_act` take HF's
    /// defaults (4, 3, `quick_gelu`); the released checkpoints write
    /// `in_chans`, which transformers ignores in favour of `in_channels`.
    fn qwen2_vl(raw: Value, path: &Path) -> Result<Self, ConfigError> {
        let text = vl_text_config(&raw, path)?;
        let vr = Reader { path };
        let v = vr.get(&raw, "vision_config")?;
        let vact = v.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu");
        if vact != "quick_gelu" {
            return Err(vr.err("vision_config.hidden_act", format!("only \"quick_gelu\" is supported, got {vact:?}")));
        }
        let vf = |field: &str| vision_positive(&vr, v, field);
        let mlp_ratio = match v.get("mlp_ratio") {
            None | Some(Value::Null) => 4.0,
            Some(x) => x
                .as_f64()
                .filter(|r| *r > 0.0)
                .ok_or_else(|| vr.err("vision_config.mlp_ratio", "expected a positive number"))?,
        };
        let in_channels = match v.get("in_channels").filter(|x| !x.is_null()) {
            Some(_) => vf("in_channels")?,
            None => vr.int_or(v, "in_chans", 3)?,
        };
        let vision = Qwen2VlVisionConfig {
            depth: vf("depth")?,
            embed_dim: vf("embed_dim")?,
            hidden_size: vf("hidden_size")?,
            mlp_ratio,
            num_heads: vf("num_heads")?,
            in_channels,
            patch_size: vf("patch_size")?,
            spatial_merge_size: vf("spatial_merge_size")?,
            temporal_patch_size: vf("temporal_patch_size")?,
        };
        if vision.hidden_size != text.hidden_size {
            return Err(vr.err("vision_config.hidden_size", format!("must equal hidden_size {}", text.hidden_size)));
        }
        // The 2D rotary gives each of row and column a quarter of head_dim.
        if vision.embed_dim % vision.num_heads != 0 || vision.head_dim() % 4 != 0 {
            return Err(
                vr.err("vision_config.num_heads", "must divide embed_dim into heads whose size is a multiple of 4")
            );
        }
        if vision.intermediate_size() <= 0 {
            return Err(vr.err("vision_config.mlp_ratio", "embed_dim * mlp_ratio must be at least 1"));
        }
        Self::vl(raw, path, ModelType::Qwen2Vl, text, VisionTowerConfig::Qwen2Vl(vision))
    }

    /// The fields every VL config shares around its text and vision halves:
    /// the special token ids and bos/eos.
    fn vl(
        raw: Value,
        path: &Path,
        model_type: ModelType,
        text: TextConfig,
        vision: VisionTowerConfig,
    ) -> Result<Self, ConfigError> {
        let r = Reader { path };
        let t = text_object(&raw);
        let tok = |field: &str| -> Result<i64, ConfigError> {
            raw.get(field)
                .or_else(|| t.get(field))
                .and_then(Value::as_i64)
                .ok_or_else(|| r.err(field, "missing token id"))
        };
        let tokens = VisionTokens {
            image_token_id: tok("image_token_id")?,
            video_token_id: tok("video_token_id")?,
            vision_start_token_id: tok("vision_start_token_id")?,
            vision_end_token_id: tok("vision_end_token_id")?,
        };
        Ok(Self {
            model_type,
            tokens: Some(tokens),
            bos_token_id: raw.get("bos_token_id").or_else(|| t.get("bos_token_id")).and_then(Value::as_i64),
            eos_token_id: eos_ids(&raw, t),
            text,
            vision: Some(vision),
            raw,
        })
    }

    /// A plain Qwen2 / Qwen2.5 causal-LM config (HF `Qwen2Config`): every
    /// field at the top level, 1D RoPE, no vision tower.
    ///
    /// The decoder is the VL one: with text-only positions the three mRoPE
    /// axes carry the same position (HF `get_rope_index` expands the 1D
    /// `cumsum(mask) - 1` to 3 rows when there are no images), so
    /// `apply_multimodal_rotary_pos_emb` picks every frequency from identical
    /// rows and equals `apply_rotary_pos_emb` of `Qwen2Model`. The section
    /// `[head_dim / 2, 0, 0]` therefore loses nothing.
    fn text_only(raw: Value, path: &Path) -> Result<Self, ConfigError> {
        let r = Reader { path };
        let t = &raw;
        let act = t.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if act != "silu" {
            return Err(r.err("hidden_act", format!("only \"silu\" is supported, got {act:?}")));
        }
        if let Some(rope) = t.get("rope_scaling").filter(|v| !v.is_null()) {
            let rope_type =
                rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
            if rope_type != "default" {
                return Err(r.err(
                    "rope_scaling",
                    format!("only the default RoPE is supported for Qwen2 text checkpoints, got {rope_type:?}"),
                ));
            }
        }
        if t.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(r.err("use_sliding_window", "sliding-window attention is not supported (expected false)"));
        }
        let hidden_size = r.positive(t, "hidden_size")?;
        let heads = r.positive(t, "num_attention_heads")?;
        if hidden_size % heads != 0 {
            return Err(r.err("num_attention_heads", "must divide hidden_size"));
        }
        if let Some(hd) = t.get("head_dim").and_then(Value::as_i64)
            && hd != hidden_size / heads
        {
            return Err(r.err(
                "head_dim",
                format!(
                    "only head_dim = hidden_size / num_attention_heads = {} is supported, got {hd}",
                    hidden_size / heads
                ),
            ));
        }
        let head_dim = hidden_size / heads;
        if head_dim % 2 != 0 {
            return Err(r.err("num_attention_heads", "hidden_size / num_attention_heads must be even (RoPE)"));
        }
        let text = TextConfig {
            vocab_size: r.positive(t, "vocab_size")?,
            hidden_size,
            intermediate_size: r.positive(t, "intermediate_size")?,
            num_hidden_layers: r.positive(t, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: r.int_or(t, "num_key_value_heads", heads)?,
            rms_norm_eps: r.float(t, "rms_norm_eps")?,
            rope_theta: match t.get("rope_theta") {
                None | Some(Value::Null) => 10_000.0,
                Some(_) => r.float(t, "rope_theta")?,
            },
            mrope_section: [head_dim / 2, 0, 0],
            max_position_embeddings: r.int_or(t, "max_position_embeddings", 32_768)?,
            tie_word_embeddings: t.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        };
        if text.num_key_value_heads <= 0 || text.num_attention_heads % text.num_key_value_heads != 0 {
            return Err(r.err("num_key_value_heads", "must be positive and divide num_attention_heads"));
        }
        Ok(Self {
            model_type: ModelType::Qwen2,
            text,
            vision: None,
            tokens: None,
            bos_token_id: raw.get("bos_token_id").and_then(Value::as_i64),
            eos_token_id: eos_ids(&raw, &raw),
            raw,
        })
    }
}

/// Where a VL config keeps its text fields: `text_config` when present
/// (newer transformers), else the top level.
fn text_object(raw: &Value) -> &Value {
    match raw.get("text_config") {
        Some(tc @ Value::Object(_)) => tc,
        _ => raw,
    }
}

/// The text half of a Qwen2.5-VL or Qwen2-VL config: the same decoder
/// (HF `Qwen2_5_VLTextConfig` subclasses `Qwen2VLTextConfig`) with mRoPE
/// sections from `rope_scaling.mrope_section`.
fn vl_text_config(raw: &Value, path: &Path) -> Result<TextConfig, ConfigError> {
    let r = Reader { path };
    let t = text_object(raw);
    let act = t.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
    if act != "silu" {
        return Err(r.err("hidden_act", format!("only \"silu\" is supported, got {act:?}")));
    }
    // HF gives layers past `max_window_layers` sliding-window attention only then.
    if t.get("use_sliding_window").or_else(|| raw.get("use_sliding_window")).and_then(Value::as_bool) == Some(true) {
        return Err(r.err("use_sliding_window", "sliding-window attention is not supported (expected false)"));
    }
    let rope = t.get("rope_scaling").or_else(|| raw.get("rope_scaling")).or_else(|| t.get("rope_parameters"));
    let rope = rope.ok_or_else(|| {
        r.err("rope_scaling", "missing (expected {\"type\": \"mrope\", \"mrope_section\": [t, h, w]})")
    })?;
    let rope_type = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
    if !matches!(rope_type, "mrope" | "default") {
        return Err(r.err("rope_scaling.type", format!("only mrope is supported, got {rope_type:?}")));
    }
    let section = rope
        .get("mrope_section")
        .and_then(Value::as_array)
        .ok_or_else(|| r.err("rope_scaling.mrope_section", "missing (expected 3 integers)"))?;
    let section: Vec<i64> = section.iter().filter_map(Value::as_i64).collect();
    let mrope_section: [i64; 3] = section
        .as_slice()
        .try_into()
        .map_err(|_| r.err("rope_scaling.mrope_section", "expected exactly 3 integers"))?;
    let rope_theta = match t.get("rope_theta") {
        Some(_) => r.float(t, "rope_theta")?,
        None => rope.get("rope_theta").and_then(Value::as_f64).ok_or_else(|| r.err("rope_theta", "missing"))?,
    };
    let tie = raw
        .get("tie_word_embeddings")
        .or_else(|| t.get("tie_word_embeddings"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let text = TextConfig {
        vocab_size: r.positive(t, "vocab_size")?,
        hidden_size: r.positive(t, "hidden_size")?,
        intermediate_size: r.positive(t, "intermediate_size")?,
        num_hidden_layers: r.positive(t, "num_hidden_layers")?,
        num_attention_heads: r.positive(t, "num_attention_heads")?,
        num_key_value_heads: r.positive(t, "num_key_value_heads")?,
        rms_norm_eps: r.float(t, "rms_norm_eps")?,
        rope_theta,
        mrope_section,
        max_position_embeddings: r.int_or(t, "max_position_embeddings", 128_000)?,
        tie_word_embeddings: tie,
    };
    if text.hidden_size % text.num_attention_heads != 0 {
        return Err(r.err("num_attention_heads", "must divide hidden_size"));
    }
    if text.num_attention_heads % text.num_key_value_heads != 0 {
        return Err(r.err("num_key_value_heads", "must divide num_attention_heads"));
    }
    if 2 * mrope_section.iter().sum::<i64>() != text.head_dim() {
        return Err(r.err(
            "rope_scaling.mrope_section",
            format!("sections must sum to head_dim / 2 = {}", text.head_dim() / 2),
        ));
    }
    Ok(text)
}

/// A positive integer of `vision_config`, named `vision_config.<field>` in errors.
fn vision_positive(r: &Reader, v: &Value, field: &str) -> Result<i64, ConfigError> {
    r.positive(v, field).map_err(|_| r.err(&format!("vision_config.{field}"), "missing or not a positive integer"))
}

/// `eos_token_id` as a list (HF writes one id or several).
fn eos_ids(raw: &Value, text: &Value) -> Vec<i64> {
    match raw.get("eos_token_id").or_else(|| text.get("eos_token_id")) {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        Some(x) => x.as_i64().into_iter().collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_json() -> Value {
        serde_json::json!({
            "model_type": "qwen2_5_vl",
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
            "tie_word_embeddings": true,
            "image_token_id": 60, "video_token_id": 61, "vision_start_token_id": 58, "vision_end_token_id": 59,
            "eos_token_id": 57,
            "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                "in_chans": 3, "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]}
        })
    }

    #[test]
    fn parses_top_level_and_text_config_layouts() {
        let p = Path::new("config.json");
        let c = Qwen25VlConfig::from_value(tiny_json(), p).unwrap();
        assert_eq!(c.text.head_dim(), 8);
        assert_eq!(c.vision.as_ref().map(VisionTowerConfig::patch_dim), Some(1176));
        assert_eq!(c.eos_token_id, vec![57]);
        assert!(c.text.tie_word_embeddings);
        let mut nested = tiny_json();
        let obj = nested.as_object_mut().unwrap();
        let hidden = obj.remove("hidden_size").unwrap();
        obj.insert(
            "text_config".into(),
            serde_json::json!({"hidden_size": hidden, "vocab_size": 64,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "default", "type": "mrope", "mrope_section": [2, 1, 1]}}),
        );
        let c2 = Qwen25VlConfig::from_value(nested, p).unwrap();
        assert_eq!(c2.text, c.text);
    }

    pub(crate) fn tiny_text_json() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "rope_scaling": null,
            "use_sliding_window": false, "sliding_window": 4096, "tie_word_embeddings": false,
            "bos_token_id": 60, "eos_token_id": 61
        })
    }

    #[test]
    fn qwen2_text_configs_have_no_vision_and_1d_rope() {
        let p = Path::new("config.json");
        let c = Qwen25VlConfig::from_value(tiny_text_json(), p).unwrap();
        assert!(c.is_text_only() && c.tokens.is_none());
        assert_eq!(c.text.mrope_section, [4, 0, 0]);
        assert_eq!((c.text.head_dim(), c.eos_token_id.clone(), c.text.tie_word_embeddings), (8, vec![61], false));
        // No model_type and no vision_config reads as a text model too.
        let mut j = tiny_text_json();
        j.as_object_mut().unwrap().remove("model_type");
        assert!(Qwen25VlConfig::from_value(j, p).unwrap().is_text_only());
        for (key, value, needle) in [
            ("rope_scaling", serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "yarn"),
            ("use_sliding_window", serde_json::json!(true), "sliding-window"),
            ("head_dim", serde_json::json!(16), "head_dim"),
            ("model_type", serde_json::json!("llama"), "qwen2"),
        ] {
            let mut j = tiny_text_json();
            j[key] = value;
            let e = Qwen25VlConfig::from_value(j, p).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(needle), "{e}");
        }
        let vl = Qwen25VlConfig::from_value(tiny_json(), p).unwrap();
        assert!(!vl.is_text_only() && vl.tokens.is_some_and(|t| t.image_token_id == 60));
    }

    /// The layout of the released Qwen2-VL-2B-Instruct `config.json`
    /// (top-level text fields, `in_chans`, no vision `hidden_act`), shrunk.
    fn tiny_qwen2vl_json() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
            "use_sliding_window": false, "sliding_window": 32768, "max_window_layers": 28,
            "tie_word_embeddings": true, "bos_token_id": 56, "eos_token_id": 57,
            "vision_start_token_id": 58, "vision_end_token_id": 59, "vision_token_id": 62,
            "image_token_id": 60, "video_token_id": 61,
            "vision_config": {"depth": 2, "embed_dim": 16, "mlp_ratio": 4, "num_heads": 2, "in_chans": 3,
                "hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        })
    }

    #[test]
    fn qwen2_vl_configs_parse_in_both_layouts_with_hf_defaults() {
        let p = Path::new("config.json");
        let c = Qwen25VlConfig::from_value(tiny_qwen2vl_json(), p).unwrap();
        assert_eq!(c.model_type, ModelType::Qwen2Vl);
        let Some(VisionTowerConfig::Qwen2Vl(v)) = &c.vision else { panic!("{:?}", c.vision) };
        assert_eq!((v.embed_dim, v.intermediate_size(), v.head_dim(), v.in_channels), (16, 64, 8, 3));
        assert_eq!((v.hidden_size, v.patch_dim(), v.merge_unit()), (32, 1176, 4));
        assert_eq!(c.tokens.map(|t| (t.image_token_id, t.vision_start_token_id)), Some((60, 58)));
        assert_eq!((c.text.mrope_section, c.text.head_dim(), c.eos_token_id.clone()), ([2, 1, 1], 8, vec![57]));

        // transformers >= 4.52 nests the text fields under `text_config`.
        let mut nested = tiny_qwen2vl_json();
        let obj = nested.as_object_mut().unwrap();
        let mut text = serde_json::Map::new();
        for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "rope_scaling"] {
            text.insert(key.into(), obj.remove(key).unwrap());
        }
        text.extend(
            serde_json::json!({"num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "model_type": "qwen2_vl_text"})
            .as_object()
            .unwrap()
            .clone(),
        );
        obj.insert("text_config".into(), Value::Object(text));
        let c2 = Qwen25VlConfig::from_value(nested, p).unwrap();
        assert_eq!((c2.text, c2.vision, c2.tokens), (c.text.clone(), c.vision.clone(), c.tokens));

        // HF defaults: mlp_ratio 4, in_channels 3, hidden_act quick_gelu; a
        // fractional ratio truncates like HF's int().
        let mut j = tiny_qwen2vl_json();
        let vc = j["vision_config"].as_object_mut().unwrap();
        vc.remove("in_chans");
        vc.insert("mlp_ratio".into(), serde_json::json!(1.5));
        vc.insert("hidden_act".into(), "quick_gelu".into());
        let c3 = Qwen25VlConfig::from_value(j, p).unwrap();
        let Some(VisionTowerConfig::Qwen2Vl(v)) = &c3.vision else { panic!() };
        assert_eq!((v.intermediate_size(), v.in_channels), (24, 3));
    }

    #[test]
    fn qwen2_vl_bad_fields_name_the_field() {
        let p = Path::new("/ckpt/config.json");
        for (edit, needle) in [
            (serde_json::json!({"vision_config": {"hidden_act": "gelu"}}), "vision_config.hidden_act"),
            (serde_json::json!({"vision_config": {"hidden_size": 48}}), "vision_config.hidden_size"),
            (serde_json::json!({"vision_config": {"embed_dim": null}}), "vision_config.embed_dim"),
            (serde_json::json!({"vision_config": {"num_heads": 3}}), "vision_config.num_heads"),
            (serde_json::json!({"vision_config": {"mlp_ratio": "4"}}), "vision_config.mlp_ratio"),
            (serde_json::json!({"use_sliding_window": true}), "use_sliding_window"),
            (serde_json::json!({"image_token_id": null}), "image_token_id"),
            (serde_json::json!({"rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 1]}}), "mrope_section"),
        ] {
            let mut j = tiny_qwen2vl_json();
            for (k, v) in edit.as_object().unwrap() {
                match v {
                    Value::Object(o) => o.iter().for_each(|(k2, v2)| j[k][k2] = v2.clone()),
                    _ => j[k] = v.clone(),
                }
            }
            let e = Qwen25VlConfig::from_value(j, p).unwrap_err().to_string();
            assert!(e.contains("/ckpt/config.json") && e.contains(needle), "{needle}: {e}");
        }
        // A Qwen2.5-VL vision_config under model_type qwen2_vl is not silently accepted.
        let mut j = tiny_json();
        j["model_type"] = "qwen2_vl".into();
        let e = Qwen25VlConfig::from_value(j, p).unwrap_err().to_string();
        assert!(e.contains("vision_config.embed_dim"), "{e}");
    }

    #[test]
    fn missing_and_bad_fields_name_the_field() {
        let p = Path::new("/ckpt/config.json");
        let mut j = tiny_json();
        j.as_object_mut().unwrap().remove("num_key_value_heads");
        let e = Qwen25VlConfig::from_value(j, p).unwrap_err().to_string();
        assert!(e.contains("/ckpt/config.json") && e.contains("num_key_value_heads") && e.contains("missing"), "{e}");
        let mut j = tiny_json();
        j["rope_scaling"]["mrope_section"] = serde_json::json!([2, 2, 2]);
        let e = Qwen25VlConfig::from_value(j, p).unwrap_err().to_string();
        assert!(e.contains("mrope_section"), "{e}");
        let mut j = tiny_json();
        j["vision_config"].as_object_mut().unwrap().remove("window_size");
        let e = Qwen25VlConfig::from_value(j, p).unwrap_err().to_string();
        assert!(e.contains("vision_config.window_size"), "{e}");
    }
}
