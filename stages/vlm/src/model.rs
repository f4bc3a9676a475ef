//! The conditional-generation model: HF `Qwen2_5_VLForConditionalGeneration`
//! (`lm_head`) and the `Qwen2_5_VLModel` it wraps (`visual`,
//! `language_model`, `get_rope_index`), flattened into one struct
//! ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)).
//! Parameters are held by HF name so training can pick what to optimise. A
//! Qwen2-VL checkpoint (HF `Qwen2VLForConditionalGeneration`,
//! [modeling_qwen2_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py))
//! is the same model with its own vision tower; a plain Qwen2 causal-LM
//! checkpoint is the same model without one. Which tower exists is decided
//! by `config.model_type` (through the config's `vision`).

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use stage_api::derive_seed;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointError};
use crate::config::{CONFIG_FILE, Qwen25VlConfig, VisionTowerConfig};
use crate::error::ModelError;
use crate::nn::param;
use crate::qwen2_5_vl::{self, KvCache, TextModel, rope_index};
use crate::qwen2_vl;

/// One batch of model inputs (already tokenised and processed).
pub struct Batch<'a> {
    /// (batch, len) int64 token ids, left padded.
    pub input_ids: &'a Tensor,
    /// (batch, len) int64, 1 = real token, 0 = padding.
    pub attention_mask: &'a Tensor,
    /// (patches, 1176) processor output of every image in the batch, in order.
    pub pixel_values: Option<&'a Tensor>,
    /// (t, h, w) patch grid per image.
    pub image_grid_thw: &'a [[i64; 3]],
}

/// State carried from prefill to decode steps.
pub struct DecodeState {
    pub cache: KvCache,
    /// (batch, past) bool: which cached keys are real tokens.
    pub key_valid: Tensor,
    /// (batch,) mRoPE delta: decode position = cache length + delta.
    pub rope_deltas: Tensor,
}

impl DecodeState {
    /// Repeat each row `n` times (a group of sampled completions per prompt).
    pub fn repeat_rows(&mut self, n: i64) {
        self.cache.repeat_rows(n);
        self.key_valid = self.key_valid.repeat_interleave_self_int(n, 0, None);
        self.rope_deltas = self.rope_deltas.repeat_interleave_self_int(n, 0, None);
    }
}

/// The `model.visual` of a VL checkpoint, by architecture.
pub enum VisionTower {
    /// HF `Qwen2_5_VisionTransformerPretrainedModel`.
    Qwen2_5Vl(qwen2_5_vl::VisionTransformer),
    /// HF `Qwen2VisionTransformerPretrainedModel`.
    Qwen2Vl(qwen2_vl::VisionTransformer),
}

impl VisionTower {
    fn load(params: &BTreeMap<String, Tensor>, config: &VisionTowerConfig) -> Result<Self, ModelError> {
        Ok(match config {
            VisionTowerConfig::Qwen2_5Vl(v) => Self::Qwen2_5Vl(qwen2_5_vl::VisionTransformer::load(params, v)?),
            VisionTowerConfig::Qwen2Vl(v) => Self::Qwen2Vl(qwen2_vl::VisionTransformer::load(params, v)?),
        })
    }

    fn param_shapes(config: &VisionTowerConfig, out: &mut BTreeMap<String, Vec<i64>>) {
        match config {
            VisionTowerConfig::Qwen2_5Vl(v) => qwen2_5_vl::VisionTransformer::param_shapes(v, out),
            VisionTowerConfig::Qwen2Vl(v) => qwen2_vl::VisionTransformer::param_shapes(v, out),
        }
    }

    /// Image features (sum of t*h*w/4 over images, text hidden size).
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<Tensor, ModelError> {
        match self {
            Self::Qwen2_5Vl(v) => v.forward(pixel_values, grids),
            Self::Qwen2Vl(v) => v.forward(pixel_values, grids),
        }
    }

    /// The temporal mRoPE step between an image grid's frames in this
    /// architecture's `get_rope_index`.
    fn rope_frame_step(&self) -> i64 {
        match self {
            Self::Qwen2_5Vl(_) => 0,
            Self::Qwen2Vl(_) => qwen2_vl::ROPE_FRAME_STEP,
        }
    }
}

/// Qwen2.5-VL (or Qwen2-VL, or Qwen2) for conditional generation (see the module docs).
pub struct Qwen25Vl {
    pub config: Qwen25VlConfig,
    /// Every parameter by HF name (shared storage with the modules below).
    pub params: BTreeMap<String, Tensor>,
    /// `model.visual`; None for a text-only (Qwen2 causal LM) checkpoint.
    pub visual: Option<VisionTower>,
    /// `model.language_model`.
    pub language_model: TextModel,
    /// `lm_head.weight`, or `embed_tokens` itself when the config ties them.
    pub lm_head: Tensor,
    pub device: Device,
    pub kind: Kind,
}

/// Names and shapes of every parameter a config implies.
pub fn param_shapes(config: &Qwen25VlConfig) -> BTreeMap<String, Vec<i64>> {
    let mut out = BTreeMap::new();
    if let Some(v) = &config.vision {
        VisionTower::param_shapes(v, &mut out);
    }
    TextModel::param_shapes(&config.text, &mut out);
    if !config.text.tie_word_embeddings {
        out.insert("lm_head.weight".into(), vec![config.text.vocab_size, config.text.hidden_size]);
    }
    out
}

/// A CPU f32 tensor of N(0, std²) samples (Box–Muller over a ChaCha8 stream).
fn normal_tensor(shape: &[i64], std: f64, seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut values = Vec::with_capacity(n as usize);
    while values.len() < n as usize {
        // u1 in (0, 1] keeps ln finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = std::f64::consts::TAU * u2;
        values.push((r * theta.cos()) as f32);
        values.push((r * theta.sin()) as f32);
    }
    values.truncate(n as usize);
    Tensor::from_slice(&values).reshape(shape)
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<i64>>, ModelError> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous();
    Ok(Vec::<Vec<i64>>::try_from(&t)?)
}

impl Qwen25Vl {
    /// Load `config.json` and the safetensors of an HF checkpoint directory.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self, ModelError> {
        let config = Qwen25VlConfig::from_file(&dir.join(CONFIG_FILE))?;
        Self::load_weights(config, dir, kind, device)
    }

    /// Load the safetensors of `dir` (mmapped, one tensor in flight) for a
    /// config already read from it, checking names and shapes.
    pub fn load_weights(config: Qwen25VlConfig, dir: &Path, kind: Kind, device: Device) -> Result<Self, ModelError> {
        let mut params = checkpoint::load_dir(dir, kind, device)?;
        // Tied checkpoints may still carry lm_head (older exports): drop it.
        if config.text.tie_word_embeddings {
            params.remove("lm_head.weight");
        }
        checkpoint::check_keys(dir, &params, &param_shapes(&config))?;
        Self::from_params(config, params)
    }

    pub fn from_params(config: Qwen25VlConfig, params: BTreeMap<String, Tensor>) -> Result<Self, ModelError> {
        let any = params.values().next().ok_or_else(|| ModelError::MissingParam("(no parameters)".into()))?;
        let (device, kind) = (any.device(), any.kind());
        let visual = config.vision.as_ref().map(|v| VisionTower::load(&params, v)).transpose()?;
        let language_model = TextModel::load(&params, &config.text)?;
        let lm_head = if config.text.tie_word_embeddings {
            language_model.embed_tokens.shallow_clone()
        } else {
            param(&params, "lm_head.weight")?
        };
        Ok(Self { visual, language_model, lm_head, config, params, device, kind })
    }

    /// Random init like HF `_init_weights` (normal(0, initializer_range) for
    /// matrices, zeros for biases, ones for norms), reproducible from `seed`.
    /// Each tensor draws from its own ChaCha stream keyed by (seed, name), not
    /// from libtorch's process-global generator, so concurrent users of that
    /// generator (other threads, other stages) cannot change the weights.
    pub fn random(config: Qwen25VlConfig, seed: i64, kind: Kind, device: Device) -> Result<Self, ModelError> {
        let std = config.raw.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        let mut params = BTreeMap::new();
        for (name, shape) in param_shapes(&config) {
            let t = if name.ends_with(".bias") {
                Tensor::zeros(&shape, (Kind::Float, Device::Cpu))
            } else if name.contains("norm") || name.contains("ln_q") {
                Tensor::ones(&shape, (Kind::Float, Device::Cpu))
            } else {
                normal_tensor(&shape, std, derive_seed(seed as u64, &name))
            };
            params.insert(name, t.to_kind(kind).to_device(device));
        }
        Self::from_params(config, params)
    }

    /// Save as an HF checkpoint (weights + config.json) into `dir`. Text-only
    /// models get `Qwen2ForCausalLM` names (`model.layers.*`) back.
    pub fn save(&self, dir: &Path, kind: Kind, max_shard_bytes: u64) -> Result<Vec<String>, ModelError> {
        let mut files = if self.config.is_text_only() {
            let renamed: BTreeMap<String, Tensor> =
                self.params.iter().map(|(k, v)| (checkpoint::text_only_name(k), v.shallow_clone())).collect();
            checkpoint::save_dir(dir, &renamed, kind, max_shard_bytes)?
        } else {
            checkpoint::save_dir(dir, &self.params, kind, max_shard_bytes)?
        };
        let mut raw = self.config.raw.clone();
        let dtype = match kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        if let Some(o) = raw.as_object_mut() {
            o.insert("torch_dtype".into(), dtype.into());
        }
        let path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&raw).map_err(|e| ModelError::Input(e.to_string()))?;
        std::fs::write(&path, text + "\n")
            .map_err(|e| CheckpointError::File { path: path.clone(), message: e.to_string() })?;
        files.push(CONFIG_FILE.into());
        Ok(files)
    }

    /// Set `requires_grad` on parameters whose HF name matches `pattern`
    /// (and clear it on the rest). Returns the selected names.
    pub fn set_trainable(&self, pattern: &str) -> Result<Vec<String>, ModelError> {
        let names = checkpoint::select_names(self.params.keys(), pattern)
            .map_err(|e| ModelError::Input(format!("trainable pattern {pattern:?}: {e}")))?;
        for (name, t) in &self.params {
            let _ = t.set_requires_grad(names.binary_search(name).is_ok());
        }
        Ok(names)
    }

    fn check_batch(&self, batch: &Batch) -> Result<(), ModelError> {
        let s = batch.input_ids.size();
        if s.len() != 2 || batch.attention_mask.size() != s {
            return Err(ModelError::Input(format!(
                "input_ids {s:?} and attention_mask {:?} must both be (batch, len)",
                batch.attention_mask.size()
            )));
        }
        let vocab = self.config.text.vocab_size;
        let (lo, hi) = (batch.input_ids.min().int64_value(&[]), batch.input_ids.max().int64_value(&[]));
        if lo < 0 || hi >= vocab {
            return Err(ModelError::Input(format!("token ids must be in 0..{vocab}, got range {lo}..={hi}")));
        }
        Ok(())
    }

    /// Input embeddings with image features scattered into the image pad
    /// tokens, plus mRoPE positions and deltas.
    fn prepare(&self, batch: &Batch) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        self.check_batch(batch)?;
        let ids = batch.input_ids.to_device(self.device);
        let mut embeds = self.language_model.embed(&ids);
        let rows = to_rows(batch.input_ids)?;
        let mask = to_rows(batch.attention_mask)?;
        let r = match (&self.visual, &self.config.vision, &self.config.tokens) {
            (Some(visual), Some(vcfg), Some(tokens)) => {
                let n_pad = ids.eq(tokens.image_token_id).sum(Kind::Int64).int64_value(&[]);
                let ms = vcfg.spatial_merge_size();
                let expected: i64 = batch.image_grid_thw.iter().map(|g| g[0] * g[1] * g[2] / (ms * ms)).sum();
                if n_pad != expected {
                    return Err(ModelError::Input(format!(
                        "{n_pad} image pad tokens in input_ids but image_grid_thw {:?} needs {expected}",
                        batch.image_grid_thw
                    )));
                }
                if let Some(pv) = batch.pixel_values {
                    let feats = visual.forward(&pv.to_device(self.device), batch.image_grid_thw)?;
                    let mask = ids.eq(tokens.image_token_id).unsqueeze(-1).expand_as(&embeds);
                    embeds = embeds.masked_scatter(&mask, &feats.to_kind(embeds.kind()));
                } else if expected > 0 {
                    return Err(ModelError::Input("image_grid_thw given without pixel_values".into()));
                }
                let (image, start) = (tokens.image_token_id, tokens.vision_start_token_id);
                rope_index(&rows, &mask, batch.image_grid_thw, image, start, ms, visual.rope_frame_step())
            }
            _ => {
                if batch.pixel_values.is_some() || !batch.image_grid_thw.is_empty() {
                    return Err(ModelError::Input(
                        "this is a text-only checkpoint (no vision tower): it cannot take images".into(),
                    ));
                }
                // Token ids are >= 0 (checked above): -1 never marks an image,
                // so every position is the 1D `cumsum(mask) - 1` of HF.
                rope_index(&rows, &mask, &[], -1, -1, 1, 0)
            }
        }
        .map_err(ModelError::Input)?;
        let (b, l) = (rows.len() as i64, rows.first().map(Vec::len).unwrap_or(0) as i64);
        let flat: Vec<i64> = r.ids.iter().flatten().flatten().copied().collect();
        let pos = Tensor::from_slice(&flat).view([3, b, l]).to_device(self.device);
        let deltas = Tensor::from_slice(&r.deltas).to_device(self.device);
        Ok((embeds, pos, deltas))
    }

    /// `lm_head`: hidden states -> vocabulary logits.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(&self.lm_head, None::<&Tensor>)
    }

    /// Full-sequence logits (batch, len, vocab): the training / parity forward.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor, ModelError> {
        let (logits, _) = self.prefill(batch, false)?;
        Ok(logits)
    }

    /// Logits (batch, n, vocab) of the last `n` positions only: a training
    /// loss over completions needs no logits for the prompt (and the vocab
    /// projection of every prompt position is the largest tensor of a step).
    pub fn forward_last(&self, batch: &Batch, n: i64) -> Result<Tensor, ModelError> {
        let (embeds, pos, _) = self.prepare(batch)?;
        let key_valid = batch.attention_mask.to_device(self.device).ne(0);
        let hidden = self.language_model.forward(&embeds, &pos, &key_valid, &mut KvCache::default());
        let len = hidden.size()[1];
        let n = n.clamp(1, len);
        Ok(self.logits(&hidden.narrow(1, len - n, n)))
    }

    /// Run the prompt; returns logits (all positions, or only the last when
    /// `last_only`) and the state for decoding.
    pub fn prefill(&self, batch: &Batch, last_only: bool) -> Result<(Tensor, DecodeState), ModelError> {
        let (embeds, pos, deltas) = self.prepare(batch)?;
        let key_valid = batch.attention_mask.to_device(self.device).ne(0);
        let mut cache = KvCache::default();
        let hidden = self.language_model.forward(&embeds, &pos, &key_valid, &mut cache);
        let hidden = if last_only { hidden.narrow(1, hidden.size()[1] - 1, 1) } else { hidden };
        let logits = self.logits(&hidden);
        Ok((logits, DecodeState { cache, key_valid, rope_deltas: deltas }))
    }

    /// One decode step for `tokens` (batch,) -> logits (batch, vocab).
    pub fn decode_step(&self, tokens: &Tensor, state: &mut DecodeState) -> Tensor {
        let b = tokens.size()[0];
        let past = state.cache.len();
        let embeds = self.language_model.embed(&tokens.view([b, 1]).to_device(self.device));
        let pos = (&state.rope_deltas + past).view([1, b, 1]).expand([3, b, 1], false);
        state.key_valid = Tensor::cat(&[&state.key_valid, &Tensor::ones([b, 1], (Kind::Bool, self.device))], 1);
        let hidden = self.language_model.forward(&embeds, &pos, &state.key_valid, &mut state.cache);
        self.logits(&hidden).squeeze_dim(1)
    }
}
