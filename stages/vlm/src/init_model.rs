//! Stage `init_model`: a small Qwen2.5-VL (or, with `model_type =
//! "qwen2_vl"`, Qwen2-VL) with random weights and a byte-level BPE tokenizer
//! trained on the recipe's own text, saved in the HF checkpoint layout (so
//! the mini recipe needs no model hub).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stage_api::{InputSpec, ParamError, Resources, StageContext, StageKind};
use tch::{Device, Kind};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::chat::QWEN25_VL_CHAT_TEMPLATE;
use crate::config::Qwen25VlConfig;
use crate::model::Qwen25Vl;
use crate::processor::{ImageProcessor, PREPROCESSOR_CONFIG};

/// Qwen's special tokens (never split, skipped when decoding).
pub const SPECIAL_TOKENS: [&str; 7] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
];
/// Reasoning-format tags: single tokens, kept when decoding.
pub const FORMAT_TOKENS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

/// Text used when no `corpus` input is given: the prompt formats the
/// pipeline produces, so the tokenizer merges its frequent words.
const BUILTIN_CORPUS: &str = "You are a helpful assistant.\n\
What abnormality is visible in this chest CT slice? Options: A. airway abnormalities B. emphysema \
C. fibrosis-related changes D. pulmonary nodules/masses E. consolidation/atelectasis F. ground-glass opacity \
G. pleural effusion/thickening\n\
Your task: 1. Think through the question step by step, enclose your reasoning process in <think>...</think> tags. \
2. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags. \
3. No extra information or text outside of these tags.\n";

/// The `model_type` of `init_model` when a recipe names none.
const DEFAULT_MODEL_TYPE: &str = "qwen2_5_vl";

fn is_default_model_type(t: &str) -> bool {
    t == DEFAULT_MODEL_TYPE
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct InitModelParams {
    /// Architecture: "qwen2_5_vl" or "qwen2_vl" (full attention, LayerNorm +
    /// QuickGELU vision blocks: `window_size` and `fullatt_block_indexes` do
    /// not apply).
    // Left out of the params JSON at its default, so the cache keys of
    // recipes written before it existed do not move (the schema still
    // documents the default).
    #[serde(skip_serializing_if = "is_default_model_type")]
    #[schemars(extend("default" = DEFAULT_MODEL_TYPE))]
    pub model_type: String,
    /// Text model width.
    pub hidden_size: i64,
    /// Text MLP width.
    pub intermediate_size: i64,
    /// Text decoder layers.
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention); divides num_attention_heads.
    pub num_key_value_heads: i64,
    /// mRoPE rotary dims for (time, height, width); must sum to head_dim / 2.
    pub mrope_section: [i64; 3],
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Vision blocks.
    pub vision_depth: i64,
    pub vision_hidden_size: i64,
    pub vision_intermediate_size: i64,
    pub vision_num_heads: i64,
    /// Window side in pixels for window attention (multiple of 28).
    pub window_size: i64,
    /// Vision blocks that attend over the whole image.
    pub fullatt_block_indexes: Vec<i64>,
    /// BPE vocabulary size before the 11 added tokens.
    pub vocab_size: usize,
    /// Std of the normal init of weight matrices (HF initializer_range).
    pub initializer_range: f64,
    /// Image processor pixel bounds (multiples of 28x28 per visual token).
    pub min_pixels: usize,
    pub max_pixels: usize,
    /// Storage dtype of the weights: "float32" | "bfloat16".
    pub dtype: String,
    /// Largest safetensors shard, in MiB.
    pub max_shard_mb: u64,
}

impl Default for InitModelParams {
    fn default() -> Self {
        Self {
            model_type: DEFAULT_MODEL_TYPE.into(),
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            mrope_section: [2, 3, 3],
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            vision_depth: 2,
            vision_hidden_size: 32,
            vision_intermediate_size: 64,
            vision_num_heads: 2,
            window_size: 56,
            fullatt_block_indexes: vec![1],
            vocab_size: 512,
            initializer_range: 0.02,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 64,
            dtype: "float32".into(),
            max_shard_mb: 2048,
        }
    }
}

fn storage_kind(dtype: &str) -> Option<Kind> {
    match dtype {
        "float32" => Some(Kind::Float),
        "bfloat16" => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Every string value of a JSON document, depth first.
fn json_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

/// Training text from `*.txt` (lines) and `*.jsonl` (string values) under `dir`.
pub fn read_corpus(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading corpus dir {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "txt" || x == "jsonl") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut texts = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading corpus file {}", f.display()))?;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            if f.extension().is_some_and(|x| x == "jsonl") {
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: expected one JSON object per line", f.display(), n + 1))?;
                json_strings(&v, &mut texts);
            } else {
                texts.push(line.to_string());
            }
        }
    }
    if texts.is_empty() {
        bail!("corpus {} has no text in *.txt or *.jsonl files", dir.display());
    }
    Ok(texts)
}

/// Train a byte-level BPE on `texts` and add Qwen's special and format tokens.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> anyhow::Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .build()
        .into();
    tokenizer.train(&mut trainer, texts.iter()).map_err(|e| anyhow::anyhow!("training the BPE tokenizer: {e}"))?;
    let special: Vec<AddedToken> =
        SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true).normalized(false)).collect();
    tokenizer.add_special_tokens(&special);
    let format: Vec<AddedToken> = FORMAT_TOKENS.iter().map(|t| AddedToken::from(*t, false).normalized(false)).collect();
    tokenizer.add_tokens(&format);
    Ok(tokenizer)
}

/// Build the HF `config.json` for the params and tokenizer ids: Qwen2.5-VL,
/// or Qwen2-VL when `p.model_type` says so.
pub fn model_config(p: &InitModelParams, tok: &Tokenizer) -> anyhow::Result<Value> {
    let mut config = qwen2_5_vl_config(p, tok)?;
    if p.model_type == "qwen2_vl" {
        // The same text half and tokens; Qwen2VLVisionConfig for the tower.
        config["architectures"] = json!(["Qwen2VLForConditionalGeneration"]);
        config["model_type"] = "qwen2_vl".into();
        config["vision_config"] = json!({
            "depth": p.vision_depth,
            "embed_dim": p.vision_hidden_size,
            "hidden_size": p.hidden_size,
            "mlp_ratio": qwen2_vl_mlp_ratio(p),
            "num_heads": p.vision_num_heads,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_act": "quick_gelu",
            "initializer_range": p.initializer_range
        });
    }
    Ok(config)
}

/// Qwen2-VL sizes its vision MLP as `int(embed_dim * mlp_ratio)`.
fn qwen2_vl_mlp_ratio(p: &InitModelParams) -> f64 {
    p.vision_intermediate_size as f64 / p.vision_hidden_size as f64
}

fn qwen2_5_vl_config(p: &InitModelParams, tok: &Tokenizer) -> anyhow::Result<Value> {
    let id = |t: &str| tok.token_to_id(t).map(i64::from).with_context(|| format!("tokenizer lacks {t}"));
    Ok(json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": tok.get_vocab_size(true),
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": p.mrope_section},
        "tie_word_embeddings": p.tie_word_embeddings,
        "initializer_range": p.initializer_range,
        "attention_dropout": 0.0,
        "use_sliding_window": false,
        "sliding_window": 32768,
        "max_window_layers": p.num_hidden_layers,
        "use_cache": true,
        "torch_dtype": p.dtype,
        "bos_token_id": id("<|endoftext|>")?,
        "eos_token_id": id("<|im_end|>")?,
        "pad_token_id": id("<|endoftext|>")?,
        "image_token_id": id("<|image_pad|>")?,
        "video_token_id": id("<|video_pad|>")?,
        "vision_start_token_id": id("<|vision_start|>")?,
        "vision_end_token_id": id("<|vision_end|>")?,
        "vision_config": {
            "depth": p.vision_depth,
            "hidden_size": p.vision_hidden_size,
            "intermediate_size": p.vision_intermediate_size,
            "num_heads": p.vision_num_heads,
            "in_chans": 3,
            "out_hidden_size": p.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": p.window_size,
            "fullatt_block_indexes": p.fullatt_block_indexes,
            "tokens_per_second": 2,
            "hidden_act": "silu",
            "initializer_range": p.initializer_range
        }
    }))
}

/// The HF `config.json` of a plain Qwen2 causal LM (`Qwen2ForCausalLM`)
/// with the text half of `p`: what a text-only judge checkpoint carries.
pub fn text_model_config(p: &InitModelParams, tok: &Tokenizer) -> anyhow::Result<Value> {
    let id = |t: &str| tok.token_to_id(t).map(i64::from).with_context(|| format!("tokenizer lacks {t}"));
    Ok(json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": tok.get_vocab_size(true),
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": p.tie_word_embeddings,
        "initializer_range": p.initializer_range,
        "attention_dropout": 0.0,
        "use_sliding_window": false,
        "sliding_window": 32768,
        "max_window_layers": p.num_hidden_layers,
        "use_cache": true,
        "torch_dtype": p.dtype,
        "bos_token_id": id("<|endoftext|>")?,
        "eos_token_id": id("<|im_end|>")?,
        "pad_token_id": id("<|endoftext|>")?,
    }))
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Write tokenizer.json, tokenizer_config.json (with the chat template) and
/// chat_template.json.
pub fn write_tokenizer_files(dir: &Path, tok: &Tokenizer) -> anyhow::Result<()> {
    let path = dir.join("tokenizer.json");
    tok.save(&path, false).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": null,
            "unk_token": null,
            "model_max_length": 32768,
            "padding_side": "left",
            "chat_template": QWEN25_VL_CHAT_TEMPLATE,
        }),
    )?;
    write_json(&dir.join("chat_template.json"), &json!({"chat_template": QWEN25_VL_CHAT_TEMPLATE}))
}

pub struct InitModel;

impl StageKind for InitModel {
    type Params = InitModelParams;
    const KIND: &'static str = "init_model";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Create a small random Qwen2.5-VL (or Qwen2-VL) checkpoint (HF layout) with a BPE tokenizer trained on the corpus";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] =
            &[InputSpec::optional("corpus", "directory whose *.txt / *.jsonl files give tokenizer training text")];
        INPUTS
    }

    fn resources(_params: &Self::Params) -> Resources {
        Resources { cpu: 1, memory_mb: 512, ..Default::default() }
    }

    fn validate(p: &Self::Params) -> Result<(), ParamError> {
        let bad = |key: &str, msg: String| Err(ParamError::new(&[key], msg));
        if !matches!(p.model_type.as_str(), "qwen2_5_vl" | "qwen2_vl") {
            return bad("model_type", format!("expected \"qwen2_5_vl\" or \"qwen2_vl\", got {:?}", p.model_type));
        }
        if p.model_type == "qwen2_vl"
            && p.vision_hidden_size > 0
            && (p.vision_hidden_size as f64 * qwen2_vl_mlp_ratio(p)) as i64 != p.vision_intermediate_size
        {
            return bad(
                "vision_intermediate_size",
                "Qwen2-VL stores it as mlp_ratio = vision_intermediate_size / vision_hidden_size, \
                 which must give it back (int(vision_hidden_size * mlp_ratio))"
                    .into(),
            );
        }
        if storage_kind(&p.dtype).is_none() {
            return bad("dtype", format!("expected \"float32\" or \"bfloat16\", got {:?}", p.dtype));
        }
        if p.num_attention_heads <= 0 || p.hidden_size % p.num_attention_heads != 0 {
            return bad("num_attention_heads", "must be positive and divide hidden_size".into());
        }
        if p.num_key_value_heads <= 0 || p.num_attention_heads % p.num_key_value_heads != 0 {
            return bad("num_key_value_heads", "must be positive and divide num_attention_heads".into());
        }
        let half = p.hidden_size / p.num_attention_heads / 2;
        if p.mrope_section.iter().sum::<i64>() != half {
            return bad("mrope_section", format!("must sum to head_dim / 2 = {half}"));
        }
        if p.vision_num_heads <= 0
            || p.vision_hidden_size % p.vision_num_heads != 0
            || (p.vision_hidden_size / p.vision_num_heads) % 4 != 0
        {
            return bad(
                "vision_num_heads",
                "must divide vision_hidden_size into heads whose size is a multiple of 4".into(),
            );
        }
        if p.window_size <= 0 || p.window_size % 28 != 0 {
            return bad("window_size", "must be a positive multiple of 28".into());
        }
        if let Some(i) = p.fullatt_block_indexes.iter().find(|&&i| i < 0 || i >= p.vision_depth) {
            return bad("fullatt_block_indexes", format!("index {i} is outside 0..{}", p.vision_depth));
        }
        if p.vocab_size < 300 {
            return bad("vocab_size", "must be at least 300 (256 byte symbols + merges)".into());
        }
        if p.min_pixels > p.max_pixels || p.min_pixels < 28 * 28 {
            return bad("min_pixels", "must be >= 784 and <= max_pixels".into());
        }
        for (key, v) in [
            ("hidden_size", p.hidden_size),
            ("intermediate_size", p.intermediate_size),
            ("num_hidden_layers", p.num_hidden_layers),
            ("vision_depth", p.vision_depth),
            ("vision_intermediate_size", p.vision_intermediate_size),
        ] {
            if v <= 0 {
                return bad(key, "must be positive".into());
            }
        }
        Ok(())
    }

    fn run(p: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let texts = match ctx.optional_input("corpus")? {
            Some(dir) => read_corpus(dir)?,
            None => BUILTIN_CORPUS.lines().map(str::to_string).collect(),
        };
        ctx.progress().message(&format!("training a {}-token BPE on {} texts", p.vocab_size, texts.len()));
        let out: PathBuf = ctx.output_dir().to_path_buf();
        // The seed of the stage fixes the weights (tch's generator is global,
        // so the seed is derived per stage rather than drawn from it).
        let seed = stage_api::derive_seed(ctx.seed(), "init_model.weights") as i64 & i64::MAX;
        let model = write_checkpoint(p, &texts, seed, false, &out)?;
        tracing::info!(params = model.params.values().map(|t| t.numel()).sum::<usize>(), dir = %out.display(), "init_model wrote checkpoint");
        Ok(())
    }
}

/// Train the tokenizer on `texts`, draw random weights from `seed` and write
/// a checkpoint into `out`: Qwen2.5-VL, or with `text_only` a plain Qwen2
/// causal LM of the same text half (no vision tower, no image processor).
pub fn write_checkpoint(
    p: &InitModelParams,
    texts: &[String],
    seed: i64,
    text_only: bool,
    out: &Path,
) -> anyhow::Result<Qwen25Vl> {
    let tok = train_tokenizer(texts, p.vocab_size)?;
    let raw = if text_only { text_model_config(p, &tok)? } else { model_config(p, &tok)? };
    let config = Qwen25VlConfig::from_value(raw, &out.join("config.json")).context("building the model config")?;
    let model = Qwen25Vl::random(config, seed, Kind::Float, Device::Cpu)?;
    let kind = storage_kind(&p.dtype).context("dtype")?;
    model.save(out, kind, p.max_shard_mb * 1024 * 1024)?;
    write_tokenizer_files(out, &tok)?;
    if !text_only {
        let proc = ImageProcessor { min_pixels: p.min_pixels, max_pixels: p.max_pixels, ..Default::default() };
        write_json(&out.join(PREPROCESSOR_CONFIG), &proc.to_json())?;
    }
    let id = |t: &str| tok.token_to_id(t).map(i64::from);
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": id("<|endoftext|>"),
            "eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")],
            "pad_token_id": id("<|endoftext|>"),
            "do_sample": false,
        }),
    )?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatTokenizer, Message};
    use crate::model::Batch;

    #[test]
    fn writes_a_checkpoint_that_loads_and_runs() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        std::fs::create_dir_all(&corpus).unwrap();
        std::fs::write(
            corpus.join("qa.jsonl"),
            "{\"question\": \"Which lesion is visible?\", \"answer\": \"B\"}\n".repeat(5),
        )
        .unwrap();
        std::fs::write(corpus.join("notes.txt"), "ground-glass opacity in the right lobe\n").unwrap();
        let out = dir.path().join("out");
        let mut ctx = StageContext::builder("tiny", &out).input("corpus", "qa", None, &corpus).seed(5).build().unwrap();
        let params = InitModelParams { vocab_size: 300, ..Default::default() };
        InitModel::validate(&params).unwrap();
        InitModel::run(&params, &mut ctx).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.json",
            "preprocessor_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).exists(), "{f}");
        }
        let model = Qwen25Vl::load(&out, Kind::Float, Device::Cpu).unwrap();
        let tok = ChatTokenizer::load(&out, &model.config.eos_token_id).unwrap();
        // Format tags are single tokens; specials survive a round trip.
        assert_eq!(tok.encode("<answer>").unwrap().len(), 1);
        let text = tok.render(&[Message::text("user", "Which lesion?")], true).unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
        let enc = tok.encode_batch(&[text]).unwrap();
        let logits = tch::no_grad(|| {
            model.forward(&Batch {
                input_ids: &enc.input_ids,
                attention_mask: &enc.attention_mask,
                pixel_values: None,
                image_grid_thw: &[],
            })
        })
        .unwrap();
        assert_eq!(logits.size()[2], model.config.text.vocab_size);
        assert!(bool::try_from(logits.isfinite().all()).unwrap());
        // Same seed, same weights.
        let out2 = dir.path().join("out2");
        let mut ctx2 =
            StageContext::builder("tiny", &out2).input("corpus", "qa", None, &corpus).seed(5).build().unwrap();
        InitModel::run(&params, &mut ctx2).unwrap();
        let a = std::fs::read(out.join("model.safetensors")).unwrap();
        let b = std::fs::read(out2.join("model.safetensors")).unwrap();
        assert!(a == b, "init_model is not reproducible");
    }

    #[test]
    fn text_only_checkpoint_has_qwen2_names_and_generates() {
        use crate::generate::{GenerationConfig, generate};
        let dir = tempfile::tempdir().unwrap();
        let texts: Vec<String> = BUILTIN_CORPUS.lines().map(str::to_string).collect();
        let p = InitModelParams { vocab_size: 300, tie_word_embeddings: false, ..Default::default() };
        write_checkpoint(&p, &texts, 11, true, dir.path()).unwrap();
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!((cfg["model_type"].as_str(), cfg.get("vision_config")), (Some("qwen2"), None));
        assert!(!dir.path().join("preprocessor_config.json").exists());
        // Stored with HF Qwen2ForCausalLM names, no vision weights.
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let raw: Vec<String> =
            safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_string).collect();
        assert!(raw.contains(&"model.embed_tokens.weight".to_string()) && raw.contains(&"lm_head.weight".to_string()));
        assert!(raw.iter().all(|n| !n.contains("visual") && !n.contains("language_model")), "{raw:?}");

        let model = Qwen25Vl::load(dir.path(), Kind::Float, Device::Cpu).unwrap();
        assert!(model.visual.is_none() && model.config.is_text_only());
        let tok = ChatTokenizer::load(dir.path(), &model.config.eos_token_id).unwrap();
        let texts = [
            tok.render(&[Message::text("user", "Which lesion?")], true).unwrap(),
            tok.render(&[Message::text("user", "Is there an effusion in the left lung?")], true).unwrap(),
        ];
        let enc = tok.encode_batch(&texts).unwrap();
        let batch = Batch {
            input_ids: &enc.input_ids,
            attention_mask: &enc.attention_mask,
            pixel_values: None,
            image_grid_thw: &[],
        };
        let cfg = GenerationConfig { max_new_tokens: 5, stop_strings: vec![], ..Default::default() };
        let out = generate(&model, Some(&tok), &batch, &cfg).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| c.token_ids.len() == 5));
        // Images are refused with a clear error, not a shape panic.
        let grid = [[1i64, 2, 2]];
        let pv = tch::Tensor::zeros([4, 1176], (Kind::Float, Device::Cpu));
        let with_image = Batch { pixel_values: Some(&pv), image_grid_thw: &grid, ..batch };
        let e = model.forward(&with_image).err().unwrap().to_string();
        assert!(e.contains("text-only"), "{e}");
    }

    #[test]
    fn qwen2_vl_checkpoint_has_hf_qwen2_vl_names_and_runs_with_an_image() {
        use crate::generate::{GenerationConfig, generate};
        use crate::model::VisionTower;
        use crate::pretrained::Pretrained;
        let dir = tempfile::tempdir().unwrap();
        let texts: Vec<String> = BUILTIN_CORPUS.lines().map(str::to_string).collect();
        let p = InitModelParams { model_type: "qwen2_vl".into(), vocab_size: 300, ..Default::default() };
        InitModel::validate(&p).unwrap();
        write_checkpoint(&p, &texts, 13, false, dir.path()).unwrap();
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], "qwen2_vl");
        let vc = &cfg["vision_config"];
        assert_eq!((vc["embed_dim"].as_i64(), vc["mlp_ratio"].as_f64()), (Some(32), Some(2.0)));
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names = st.names();
        assert!(names.contains(&"model.visual.blocks.1.mlp.fc1.weight"));
        assert!(names.contains(&"model.visual.merger.ln_q.bias"));
        assert!(names.iter().all(|n| !n.contains("gate_proj") || n.contains("language_model")), "{names:?}");

        let Pretrained { model, tokenizer, processor } =
            Pretrained::load(dir.path(), Kind::Float, Device::Cpu).unwrap();
        assert!(matches!(model.visual, Some(VisionTower::Qwen2Vl(_))));
        let rgb: Vec<u8> = (0..60 * 40 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(60, 40, rgb).unwrap());
        let vis = processor.process(&[image]).unwrap();
        let text = tokenizer.render(&[Message::user_with_images(1, "Which lesion?")], true).unwrap();
        let text = ChatTokenizer::expand_image_pads(&text, &vis.tokens_per_image(processor.merge_size)).unwrap();
        let enc = tokenizer.encode_batch(&[text]).unwrap();
        let batch = Batch {
            input_ids: &enc.input_ids,
            attention_mask: &enc.attention_mask,
            pixel_values: Some(&vis.pixel_values),
            image_grid_thw: &vis.grid_thw,
        };
        let cfg = GenerationConfig { max_new_tokens: 4, stop_strings: vec![], ..Default::default() };
        let out = generate(&model, Some(&tokenizer), &batch, &cfg).unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].logprobs.iter().all(|l| l.is_finite()));
    }

    #[test]
    fn model_type_is_left_out_of_the_params_at_its_default() {
        // The cache key hashes the serialized params: recipes without the
        // key must keep the keys they had before it existed.
        let v = serde_json::to_value(InitModelParams::default()).unwrap();
        assert!(v.get("model_type").is_none(), "{v}");
        let v = serde_json::to_value(InitModelParams { model_type: "qwen2_vl".into(), ..Default::default() }).unwrap();
        assert_eq!(v["model_type"], "qwen2_vl");
    }

    #[test]
    fn bad_params_name_the_key() {
        let p = InitModelParams { mrope_section: [4, 4, 4], ..Default::default() };
        assert_eq!(InitModel::validate(&p).unwrap_err().path, vec!["mrope_section"]);
        let p = InitModelParams { dtype: "int8".into(), ..Default::default() };
        let e = InitModel::validate(&p).unwrap_err();
        assert_eq!(e.path, vec!["dtype"]);
        assert!(e.message.contains("int8"));
        let p = InitModelParams { model_type: "llava".into(), ..Default::default() };
        let e = InitModel::validate(&p).unwrap_err();
        assert_eq!(e.path, vec!["model_type"]);
        assert!(e.message.contains("llava") && e.message.contains("qwen2_vl"), "{}", e.message);
        let p = InitModelParams {
            model_type: "qwen2_vl".into(),
            vision_hidden_size: 48,
            vision_intermediate_size: 100,
            vision_num_heads: 3,
            ..Default::default()
        };
        InitModel::validate(&p).unwrap();
        // int(28 * (61 / 28)) = 60 in f64: the width would not survive the config.
        let p = InitModelParams { vision_hidden_size: 28, vision_intermediate_size: 61, vision_num_heads: 7, ..p };
        assert_eq!(InitModel::validate(&p).unwrap_err().path, vec!["vision_intermediate_size"]);
    }

    #[test]
    fn empty_corpus_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_corpus(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no text"), "{e}");
        std::fs::write(dir.path().join("bad.jsonl"), "not json\n").unwrap();
        let e = format!("{:#}", read_corpus(dir.path()).unwrap_err());
        assert!(e.contains("bad.jsonl:1"), "{e}");
    }
}
