//! The Qwen2.5-VL text decoder, one struct per HF module of
//! [`modeling_qwen2_5_vl.py`](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py):
//! a Qwen2 decoder with multimodal RoPE and a KV cache (plain 1D RoPE when
//! all three position rows are equal, as for text-only inputs).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::config::TextConfig;
use crate::error::ModelError;
use crate::nn::{Linear, Mlp, RmsNorm, inv_freq, param, rotate_half};

/// Keys/values of past positions, per layer: (batch, kv_heads, past, head_dim).
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.layers.first().map(|(k, _)| k.size()[2]).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Repeat every row `n` times (row i -> rows i*n .. i*n+n): prefill once,
    /// then sample a group of completions.
    pub fn repeat_rows(&mut self, n: i64) {
        for (k, v) in &mut self.layers {
            *k = k.repeat_interleave_self_int(n, 0, None);
            *v = v.repeat_interleave_self_int(n, 0, None);
        }
    }
    /// Keep only the given batch rows.
    pub fn select_rows(&mut self, rows: &Tensor) {
        for (k, v) in &mut self.layers {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }
}

/// HF `Qwen2_5_VLRotaryEmbedding`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py))
/// together with the section selection of `apply_multimodal_rotary_pos_emb`,
/// done once per forward instead of once per layer: the rotary dims are split
/// in `mrope_section` parts taken from the t, h and w position rows.
pub struct RotaryEmbedding {
    pub head_dim: i64,
    pub rope_theta: f64,
    /// Rotary dims given to (t, h, w); text-only configs use [head_dim / 2, 0, 0].
    pub mrope_section: [i64; 3],
}

impl RotaryEmbedding {
    /// cos/sin (batch, 1, len, head_dim) for mRoPE position ids (3, batch, len), in f32.
    pub fn forward(&self, position_ids: &Tensor) -> (Tensor, Tensor) {
        let freq = inv_freq(self.head_dim, self.rope_theta, position_ids.device());
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * freq.view([1, 1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // (3, B, L, hd)
        let sec = self.mrope_section;
        let sections = [sec[0], sec[1], sec[2], sec[0], sec[1], sec[2]];
        let pick = |t: &Tensor| {
            let mut parts = Vec::with_capacity(6);
            let mut start = 0;
            // Text-only configs use [head_dim / 2, 0, 0]: skip the empty sections.
            for (i, &len) in sections.iter().enumerate().filter(|(_, l)| **l > 0) {
                parts.push(t.get(i as i64 % 3).narrow(-1, start, len));
                start += len;
            }
            Tensor::cat(&parts, -1).unsqueeze(1)
        };
        (pick(&emb.cos()), pick(&emb.sin()))
    }
}

/// Attention of one new token per row over the cache, written out as two
/// matmuls, used on CUDA. Decode steps change the key length every step and
/// the fused CUDA SDPA backends re-plan for each new shape (tens of ms per
/// step, measured: 13 vs 240 tokens/s); on CPU the SDPA kernel is faster.
fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, kv_heads: i64, scale: f64) -> Tensor {
    let (b, heads, _, d) = q.size4().unwrap_or((0, 0, 0, 0));
    let groups = heads / kv_heads;
    // Query heads h = kv * groups + g share key/value head kv (HF repeat_kv).
    let q = q.reshape([b, kv_heads, groups, d]);
    let kind = q.kind();
    // Softmax in f32 like the fused kernels do for half precision.
    let scores = q.matmul(&k.transpose(2, 3)).to_kind(Kind::Float) * scale; // (b, kv, groups, keys)
    let scores = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
    let probs = scores.softmax(-1, Kind::Float).to_kind(kind);
    probs.matmul(v).reshape([b, heads, 1, d])
}

/// HF `Qwen2_5_VLAttention`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)):
/// grouped-query attention with multimodal RoPE; q/k/v with biases, o without.
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
}

impl Attention {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str, cfg: &TextConfig) -> Result<Self, ModelError> {
        Ok(Self {
            q_proj: Linear::load(params, &format!("{prefix}.q_proj"), true)?,
            k_proj: Linear::load(params, &format!("{prefix}.k_proj"), true)?,
            v_proj: Linear::load(params, &format!("{prefix}.v_proj"), true)?,
            o_proj: Linear::load(params, &format!("{prefix}.o_proj"), false)?,
            num_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x` (batch, len, hidden) -> (batch, len, hidden). `cos`/`sin` come from
    /// [`RotaryEmbedding`], `mask` (batch, 1, len, past + len) is true where a
    /// query may attend. `past` holds this layer's cached keys/values, which
    /// are returned extended by this step's.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: Option<&(Tensor, Tensor)>,
    ) -> (Tensor, (Tensor, Tensor)) {
        let size = x.size();
        let (b, len) = (size[0], size[1]);
        let (heads, kv_heads, hd) = (self.num_heads, self.num_key_value_heads, self.head_dim);
        let scale = (hd as f64).powf(-0.5);
        let q = self.q_proj.forward(x).view([b, len, heads, hd]).transpose(1, 2);
        let k = self.k_proj.forward(x).view([b, len, kv_heads, hd]).transpose(1, 2);
        let v = self.v_proj.forward(x).view([b, len, kv_heads, hd]).transpose(1, 2);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let (k, v) = match past {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2), Tensor::cat(&[pv, &v], 2)),
        };
        let a = if len == 1 && x.device().is_cuda() {
            decode_attention(&q, &k, &v, mask, kv_heads, scale)
        } else {
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, scale, kv_heads != heads)
        };
        let a = a.transpose(1, 2).reshape([b, len, heads * hd]);
        (self.o_proj.forward(&a), (k, v))
    }
}

/// HF `Qwen2_5_VLDecoderLayer`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)):
/// pre-norm self-attention and gated MLP (`Qwen2MLP`, no biases), each residual.
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str, cfg: &TextConfig) -> Result<Self, ModelError> {
        Ok(Self {
            self_attn: Attention::load(params, &format!("{prefix}.self_attn"), cfg)?,
            mlp: Mlp::load(params, &format!("{prefix}.mlp"), false)?,
            input_layernorm: RmsNorm::load(params, &format!("{prefix}.input_layernorm"), cfg.rms_norm_eps)?,
            post_attention_layernorm: RmsNorm::load(
                params,
                &format!("{prefix}.post_attention_layernorm"),
                cfg.rms_norm_eps,
            )?,
        })
    }

    /// See [`Attention::forward`]; returns the new hidden states and the layer's keys/values.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: Option<&(Tensor, Tensor)>,
    ) -> (Tensor, (Tensor, Tensor)) {
        let (a, kv) = self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask, past);
        // `a + b`, not `+=`: in-place adds would break autograd (x feeds the norm backward).
        let x = x + a;
        let x = &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x));
        (x, kv)
    }
}

/// HF `Qwen2_5_VLTextModel`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)),
/// the `model.language_model` of a checkpoint (`model` of a Qwen2 causal LM).
pub struct TextModel {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub rotary_emb: RotaryEmbedding,
}

impl TextModel {
    pub const PREFIX: &str = "model.language_model";

    pub fn load(params: &BTreeMap<String, Tensor>, cfg: &TextConfig) -> Result<Self, ModelError> {
        let p = Self::PREFIX;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(params, &format!("{p}.layers.{i}"), cfg))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            embed_tokens: param(params, &format!("{p}.embed_tokens.weight"))?,
            layers,
            norm: RmsNorm::load(params, &format!("{p}.norm"), cfg.rms_norm_eps)?,
            rotary_emb: RotaryEmbedding {
                head_dim: cfg.head_dim(),
                rope_theta: cfg.rope_theta,
                mrope_section: cfg.mrope_section,
            },
        })
    }

    /// Expected parameter names and shapes (without `lm_head`, which belongs
    /// to the conditional-generation model).
    pub fn param_shapes(cfg: &TextConfig, out: &mut BTreeMap<String, Vec<i64>>) {
        let p = Self::PREFIX;
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        out.insert(format!("{p}.embed_tokens.weight"), vec![cfg.vocab_size, h]);
        out.insert(format!("{p}.norm.weight"), vec![h]);
        for l in 0..cfg.num_hidden_layers {
            let l = format!("{p}.layers.{l}");
            out.insert(format!("{l}.input_layernorm.weight"), vec![h]);
            out.insert(format!("{l}.post_attention_layernorm.weight"), vec![h]);
            for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                out.insert(format!("{l}.self_attn.{name}.weight"), vec![rows, h]);
                out.insert(format!("{l}.self_attn.{name}.bias"), vec![rows]);
            }
            out.insert(format!("{l}.self_attn.o_proj.weight"), vec![h, q]);
            out.insert(format!("{l}.mlp.gate_proj.weight"), vec![i, h]);
            out.insert(format!("{l}.mlp.up_proj.weight"), vec![i, h]);
            out.insert(format!("{l}.mlp.down_proj.weight"), vec![h, i]);
        }
    }

    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Run the decoder over `embeds` (batch, len, hidden) at mRoPE positions
    /// `position_ids` (3, batch, len). `key_valid` (batch, past + len) marks
    /// non-padding keys. Appends this step's keys/values to `cache`.
    /// Returns the final-normed hidden states.
    pub fn forward(&self, embeds: &Tensor, position_ids: &Tensor, key_valid: &Tensor, cache: &mut KvCache) -> Tensor {
        let size = embeds.size();
        let len = size[1];
        let past = cache.len();
        let kind = embeds.kind();
        let device = embeds.device();
        let (cos, sin) = self.rotary_emb.forward(position_ids);
        let (cos, sin) = (cos.to_kind(kind), sin.to_kind(kind));
        // Causal over padded positions, keys restricted to real tokens; the
        // diagonal stays open so padded query rows never attend to nothing
        // (an all-masked row would give NaNs that leak through 0 * NaN).
        let q_pos = Tensor::arange_start(past, past + len, (Kind::Int64, device)).view([len, 1]);
        let k_pos = Tensor::arange(past + len, (Kind::Int64, device)).view([1, past + len]);
        let causal = k_pos.le_tensor(&q_pos);
        let diag = k_pos.eq_tensor(&q_pos);
        let mask = (causal.unsqueeze(0).logical_and(&key_valid.unsqueeze(1))).logical_or(&diag.unsqueeze(0));
        let mask = mask.unsqueeze(1); // (B, 1, len, past+len)

        let fresh = cache.layers.is_empty();
        let mut x = embeds.shallow_clone();
        for (li, layer) in self.layers.iter().enumerate() {
            let past_kv = if fresh { None } else { cache.layers.get(li) };
            let (out, (k, v)) = layer.forward(&x, &cos, &sin, &mask, past_kv);
            if fresh {
                cache.layers.push((k, v));
            } else {
                cache.layers[li] = (k, v);
            }
            x = out;
        }
        self.norm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn decode_attention_matches_sdpa_with_gqa_and_padding() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let (b, heads, kv, keys, d) = (2, 4, 2, 5, 8);
        let q = Tensor::randn([b, heads, 1, d], opts);
        let k = Tensor::randn([b, kv, keys, d], opts);
        let v = Tensor::randn([b, kv, keys, d], opts);
        // Row 1 has two padded keys.
        let valid =
            Tensor::from_slice(&[true, true, true, true, true, false, false, true, true, true]).view([b, 1, 1, keys]);
        let fast = decode_attention(&q, &k, &v, &valid, kv, 0.3);
        let reference = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&valid), 0.0, false, 0.3, true);
        let diff = (fast - reference).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }
}
