//! The Qwen2 text decoder with multimodal RoPE and a KV cache (plain 1D RoPE
//! when all three position rows are equal, as for text-only inputs).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::config::TextConfig;
use crate::layers::{Linear, RmsNorm, SwiGlu, inv_freq, param, rotate_half};
use crate::model::ModelError;

struct Layer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp: SwiGlu,
}

pub struct TextModel {
    cfg: TextConfig,
    pub embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Tensor,
}

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

impl TextModel {
    pub fn load(params: &BTreeMap<String, Tensor>, cfg: &TextConfig) -> Result<Self, ModelError> {
        let p = "model.language_model";
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}.layers.{i}");
            layers.push(Layer {
                input_norm: RmsNorm::load(params, &format!("{l}.input_layernorm"), cfg.rms_norm_eps)?,
                post_norm: RmsNorm::load(params, &format!("{l}.post_attention_layernorm"), cfg.rms_norm_eps)?,
                q: Linear::load(params, &format!("{l}.self_attn.q_proj"), true)?,
                k: Linear::load(params, &format!("{l}.self_attn.k_proj"), true)?,
                v: Linear::load(params, &format!("{l}.self_attn.v_proj"), true)?,
                o: Linear::load(params, &format!("{l}.self_attn.o_proj"), false)?,
                mlp: SwiGlu::load(params, &format!("{l}.mlp"), false)?,
            });
        }
        let embed_tokens = param(params, &format!("{p}.embed_tokens.weight"))?;
        let lm_head =
            if cfg.tie_word_embeddings { embed_tokens.shallow_clone() } else { param(params, "lm_head.weight")? };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::load(params, &format!("{p}.norm"), cfg.rms_norm_eps)?,
            lm_head,
        })
    }

    pub fn param_shapes(cfg: &TextConfig, out: &mut BTreeMap<String, Vec<i64>>) {
        let p = "model.language_model";
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        out.insert(format!("{p}.embed_tokens.weight"), vec![cfg.vocab_size, h]);
        out.insert(format!("{p}.norm.weight"), vec![h]);
        if !cfg.tie_word_embeddings {
            out.insert("lm_head.weight".into(), vec![cfg.vocab_size, h]);
        }
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

    /// cos/sin (batch, 1, len, head_dim) for mRoPE position ids (3, batch, len):
    /// rotary dims are split in sections taken from the t, h and w positions.
    fn mrope(&self, position_ids: &Tensor) -> (Tensor, Tensor) {
        let hd = self.cfg.head_dim();
        let freq = inv_freq(hd, self.cfg.rope_theta, position_ids.device());
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * freq.view([1, 1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // (3, B, L, hd)
        let sec = self.cfg.mrope_section;
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

    /// Run the decoder over `embeds` (batch, len, hidden) at mRoPE positions
    /// `position_ids` (3, batch, len). `key_valid` (batch, past + len) marks
    /// non-padding keys. Appends this step's keys/values to `cache`.
    /// Returns the final-normed hidden states.
    pub fn forward(&self, embeds: &Tensor, position_ids: &Tensor, key_valid: &Tensor, cache: &mut KvCache) -> Tensor {
        let size = embeds.size();
        let (b, len) = (size[0], size[1]);
        let past = cache.len();
        let kind = embeds.kind();
        let device = embeds.device();
        let (cos, sin) = self.mrope(position_ids);
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

        let heads = self.cfg.num_attention_heads;
        let kv_heads = self.cfg.num_key_value_heads;
        let hd = self.cfg.head_dim();
        let scale = (hd as f64).powf(-0.5);
        let fresh = cache.layers.is_empty();
        let mut x = embeds.shallow_clone();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x);
            let q = layer.q.forward(&h).view([b, len, heads, hd]).transpose(1, 2);
            let k = layer.k.forward(&h).view([b, len, kv_heads, hd]).transpose(1, 2);
            let v = layer.v.forward(&h).view([b, len, kv_heads, hd]).transpose(1, 2);
            let q = &q * &cos + rotate_half(&q) * &sin;
            let k = &k * &cos + rotate_half(&k) * &sin;
            let (k, v) = if fresh {
                cache.layers.push((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            } else {
                let (pk, pv) = &cache.layers[li];
                let k = Tensor::cat(&[pk, &k], 2);
                let v = Tensor::cat(&[pv, &v], 2);
                cache.layers[li] = (k.shallow_clone(), v.shallow_clone());
                (k, v)
            };
            let a = if len == 1 && device.is_cuda() {
                decode_attention(&q, &k, &v, &mask, kv_heads, scale)
            } else {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, scale, kv_heads != heads)
            };
            let a = a.transpose(1, 2).reshape([b, len, heads * hd]);
            // Not `+=`: in-place adds would break autograd (x feeds the norm backward).
            x = &x + layer.o.forward(&a);
            x = &x + layer.mlp.forward(&layer.post_norm.forward(&x));
        }
        self.norm.forward(&x)
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(&self.lm_head, None::<&Tensor>)
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
