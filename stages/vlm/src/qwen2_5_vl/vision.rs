//! The Qwen2.5-VL vision tower, one struct per HF module of
//! [`modeling_qwen2_5_vl.py`](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)
//! (transformers 4.57.6, the version the parity fixtures come from):
//! patch embedding, 2D rotary, window attention (with full-attention
//! blocks), gated-MLP blocks and the 2x2 patch merger.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::config::VisionConfig;
use crate::error::ModelError;
use crate::nn::{Linear, Mlp, RmsNorm, inv_freq, param, rotate_half};

/// HF `Qwen2_5_VisionPatchEmbed`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)).
pub struct PatchEmbed {
    /// `proj`: the Conv3d weight (hidden, 3, 2, 14, 14). The conv has stride =
    /// kernel, so it is applied as one matmul over the flattened (hidden,
    /// 1176) weight. Held as the parameter itself, not a view: a view taken
    /// at load would not follow a later `set_requires_grad`.
    pub proj: Tensor,
}

impl PatchEmbed {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str) -> Result<Self, ModelError> {
        Ok(Self { proj: param(params, &format!("{prefix}.proj.weight"))? })
    }

    /// (patches, 1176) processor rows -> (patches, hidden), in the weight's dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let weight = self.proj.view([self.proj.size()[0], -1]);
        pixel_values.to_kind(self.proj.kind()).matmul(&weight.transpose(0, 1))
    }
}

/// HF `Qwen2_5_VisionRotaryEmbedding`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)):
/// HF builds a table `outer(arange(max_side), inv_freq)` and indexes it with
/// the patch positions; multiplying the positions directly gives the same f32
/// products.
pub struct VisionRotaryEmbedding {
    /// Rotary dims per axis: head_dim / 2 (half rotate with the row, half with the column).
    pub dim: i64,
    pub theta: f64,
}

impl VisionRotaryEmbedding {
    /// (n, 2) integer (row, col) positions -> (n, dim) rotation angles.
    pub fn forward(&self, positions: &Tensor) -> Tensor {
        let freq = inv_freq(self.dim, self.theta, positions.device());
        (positions.to_kind(Kind::Float).unsqueeze(-1) * freq.view([1, 1, -1])).flatten(1, 2)
    }
}

/// HF `Qwen2_5_VLVisionAttention`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)):
/// fused qkv, 2D rotary in f32, attention within each `cu_seqlens` segment
/// (a window or a whole image).
pub struct VisionAttention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: i64,
    pub head_dim: i64,
}

impl VisionAttention {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str, cfg: &VisionConfig) -> Result<Self, ModelError> {
        Ok(Self {
            qkv: Linear::load(params, &format!("{prefix}.qkv"), true)?,
            proj: Linear::load(params, &format!("{prefix}.proj"), true)?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    pub fn forward(&self, x: &Tensor, cu_seqlens: &[i64], cos: &Tensor, sin: &Tensor) -> Tensor {
        let n = x.size()[0];
        let kind = x.kind();
        let qkv = self.qkv.forward(x).view([n, 3, self.num_heads, -1]).permute([1, 0, 2, 3]);
        // Rotary in f32 (HF `apply_rotary_pos_emb_vision` casts q/k up for this step).
        let rope = |t: Tensor| {
            let tf = t.to_kind(Kind::Float);
            (&tf * cos + rotate_half(&tf) * sin).to_kind(kind)
        };
        let q = rope(qkv.get(0));
        let k = rope(qkv.get(1));
        let v = qkv.get(2);
        // (heads, n, d) so each segment is a slice along dim 1.
        let (q, k, v) = (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1));
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(cu_seqlens.len());
        for pair in cu_seqlens.windows(2) {
            let (s, len) = (pair[0], pair[1] - pair[0]);
            let o = Tensor::scaled_dot_product_attention(
                &q.narrow(1, s, len).unsqueeze(0),
                &k.narrow(1, s, len).unsqueeze(0),
                &v.narrow(1, s, len).unsqueeze(0),
                None::<Tensor>,
                0.0,
                false,
                scale,
                false,
            );
            outs.push(o.squeeze_dim(0));
        }
        let o = Tensor::cat(&outs, 1).transpose(0, 1).reshape([n, -1]);
        self.proj.forward(&o)
    }
}

/// HF `Qwen2_5_VLVisionBlock`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)):
/// pre-norm attention and gated MLP (`Qwen2_5_VLMLP` with biases), each residual.
pub struct VisionBlock {
    pub norm1: RmsNorm,
    pub norm2: RmsNorm,
    pub attn: VisionAttention,
    pub mlp: Mlp,
}

impl VisionBlock {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str, cfg: &VisionConfig) -> Result<Self, ModelError> {
        Ok(Self {
            norm1: RmsNorm::load(params, &format!("{prefix}.norm1"), 1e-6)?,
            norm2: RmsNorm::load(params, &format!("{prefix}.norm2"), 1e-6)?,
            attn: VisionAttention::load(params, &format!("{prefix}.attn"), cfg)?,
            mlp: Mlp::load(params, &format!("{prefix}.mlp"), true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, cu_seqlens: &[i64], cos: &Tensor, sin: &Tensor) -> Tensor {
        // `a + b`, not `+=`: in-place adds would break autograd.
        let x = x + self.attn.forward(&self.norm1.forward(x), cu_seqlens, cos, sin);
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}

/// HF `Qwen2_5_VLPatchMerger`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)):
/// RMS-normalise, concatenate each 2x2 block of patches, project to the text
/// width. HF's `mlp` is `nn.Sequential(Linear, GELU, Linear)`: `mlp_0` and
/// `mlp_2` are its entries 0 and 2 (checkpoint names `merger.mlp.0.*`,
/// `merger.mlp.2.*`); entry 1, the exact (erf) GELU, has no parameters.
pub struct PatchMerger {
    pub ln_q: RmsNorm,
    pub mlp_0: Linear,
    pub mlp_2: Linear,
    /// Width of a merged token: vision hidden size x merge unit (HF `hidden_size`).
    pub hidden_size: i64,
}

impl PatchMerger {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str, cfg: &VisionConfig) -> Result<Self, ModelError> {
        Ok(Self {
            ln_q: RmsNorm::load(params, &format!("{prefix}.ln_q"), 1e-6)?,
            mlp_0: Linear::load(params, &format!("{prefix}.mlp.0"), true)?,
            mlp_2: Linear::load(params, &format!("{prefix}.mlp.2"), true)?,
            hidden_size: cfg.hidden_size * cfg.merge_unit(),
        })
    }

    /// (patches, hidden) in merge-block order -> (patches / 4, out_hidden).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let merged = self.ln_q.forward(x).view([-1, self.hidden_size]);
        self.mlp_2.forward(&self.mlp_0.forward(&merged).gelu("none"))
    }
}

/// HF `Qwen2_5_VisionTransformerPretrainedModel`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)),
/// the `model.visual` of a checkpoint.
pub struct VisionTransformer {
    pub config: VisionConfig,
    pub patch_embed: PatchEmbed,
    pub rotary_pos_emb: VisionRotaryEmbedding,
    pub blocks: Vec<VisionBlock>,
    pub merger: PatchMerger,
}

/// Window layout of a batch of images: the permutation of merged tokens that
/// groups them by window, and the cumulative patch counts of the windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowIndex {
    pub index: Vec<i64>,
    pub cu_seqlens: Vec<i64>,
}

/// HF `get_window_index`: windows of `window_size / merge / patch` merged
/// tokens per side, in raster order of windows, images one after another.
pub fn window_index(cfg: &VisionConfig, grids: &[[i64; 3]]) -> WindowIndex {
    let ms = cfg.spatial_merge_size;
    let win = cfg.window_size / ms / cfg.patch_size;
    let unit = cfg.merge_unit();
    let mut index = Vec::new();
    let mut cu = vec![0i64];
    let mut offset = 0i64;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / ms, w / ms);
        let (nwh, nww) = ((lh + win - 1) / win, (lw + win - 1) / win);
        for ti in 0..t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut count = 0;
                    for y in wy * win..((wy + 1) * win).min(lh) {
                        for x in wx * win..((wx + 1) * win).min(lw) {
                            index.push(offset + ti * lh * lw + y * lw + x);
                            count += 1;
                        }
                    }
                    let last = *cu.last().unwrap_or(&0);
                    // HF drops empty windows with unique_consecutive.
                    if count > 0 {
                        cu.push(last + count * unit);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    WindowIndex { index, cu_seqlens: cu }
}

/// The `pos_ids` of HF `rot_pos_emb`: (row, col) of every patch, in the
/// merge-block order the processor emits patches in (Qwen2-VL's too).
pub(crate) fn rot_pos_ids(ms: i64, grids: &[[i64; 3]]) -> Vec<i64> {
    let mut pos = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for by in 0..h / ms {
                for bx in 0..w / ms {
                    for dy in 0..ms {
                        for dx in 0..ms {
                            pos.push(by * ms + dy);
                            pos.push(bx * ms + dx);
                        }
                    }
                }
            }
        }
    }
    pos
}

/// HF `cu_seqlens` of the full-attention blocks: one segment per image frame
/// (every block of Qwen2-VL).
pub(crate) fn full_cu_seqlens(grids: &[[i64; 3]]) -> Vec<i64> {
    let mut full = vec![0i64];
    for &[t, h, w] in grids {
        for _ in 0..t {
            let last = *full.last().unwrap_or(&0);
            full.push(last + h * w);
        }
    }
    full
}

/// Check that `pixel_values` (N, `patch_dim`) and `grids` agree and that
/// every grid side is a positive multiple of the merge size (both towers).
pub(crate) fn check_pixel_input(
    pixel_values: &Tensor,
    grids: &[[i64; 3]],
    patch_dim: i64,
    ms: i64,
) -> Result<(), ModelError> {
    let size = pixel_values.size();
    let n: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    if size.len() != 2 || size[1] != patch_dim || size[0] != n {
        return Err(ModelError::Input(format!(
            "pixel_values has shape {size:?}, expected [{n}, {patch_dim}] for image_grid_thw {grids:?}"
        )));
    }
    if let Some(g) = grids.iter().find(|g| g[0] < 1 || g[1] % ms != 0 || g[2] % ms != 0 || g[1] < ms || g[2] < ms) {
        return Err(ModelError::Input(format!("image_grid_thw {g:?}: h and w must be positive multiples of {ms}")));
    }
    Ok(())
}

impl VisionTransformer {
    const PREFIX: &str = "model.visual";

    pub fn load(params: &BTreeMap<String, Tensor>, cfg: &VisionConfig) -> Result<Self, ModelError> {
        let p = Self::PREFIX;
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::load(params, &format!("{p}.blocks.{i}"), cfg))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config: cfg.clone(),
            patch_embed: PatchEmbed::load(params, &format!("{p}.patch_embed"))?,
            rotary_pos_emb: VisionRotaryEmbedding { dim: cfg.head_dim() / 2, theta: 10000.0 },
            blocks,
            merger: PatchMerger::load(params, &format!("{p}.merger"), cfg)?,
        })
    }

    /// Expected parameter names and shapes.
    pub fn param_shapes(cfg: &VisionConfig, out: &mut BTreeMap<String, Vec<i64>>) {
        let p = Self::PREFIX;
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (t, ps) = (cfg.temporal_patch_size, cfg.patch_size);
        out.insert(format!("{p}.patch_embed.proj.weight"), vec![d, cfg.in_chans, t, ps, ps]);
        for b in 0..cfg.depth {
            let b = format!("{p}.blocks.{b}");
            out.insert(format!("{b}.norm1.weight"), vec![d]);
            out.insert(format!("{b}.norm2.weight"), vec![d]);
            out.insert(format!("{b}.attn.qkv.weight"), vec![3 * d, d]);
            out.insert(format!("{b}.attn.qkv.bias"), vec![3 * d]);
            out.insert(format!("{b}.attn.proj.weight"), vec![d, d]);
            out.insert(format!("{b}.attn.proj.bias"), vec![d]);
            for (name, shape) in [("gate_proj", [i, d]), ("up_proj", [i, d]), ("down_proj", [d, i])] {
                out.insert(format!("{b}.mlp.{name}.weight"), shape.to_vec());
                out.insert(format!("{b}.mlp.{name}.bias"), vec![shape[0]]);
            }
        }
        let m = d * cfg.merge_unit();
        out.insert(format!("{p}.merger.ln_q.weight"), vec![d]);
        out.insert(format!("{p}.merger.mlp.0.weight"), vec![m, m]);
        out.insert(format!("{p}.merger.mlp.0.bias"), vec![m]);
        out.insert(format!("{p}.merger.mlp.2.weight"), vec![cfg.out_hidden_size, m]);
        out.insert(format!("{p}.merger.mlp.2.bias"), vec![cfg.out_hidden_size]);
    }

    /// Check that `pixel_values` (N, 1176) and `grids` agree.
    pub fn check_input(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<(), ModelError> {
        check_pixel_input(pixel_values, grids, self.config.patch_dim(), self.config.spatial_merge_size)
    }

    /// Rotation angles (patches, head_dim / 2) of every patch (HF `rot_pos_emb`).
    fn rot_pos_emb(&self, grids: &[[i64; 3]], n: i64, device: Device) -> Tensor {
        let pos =
            Tensor::from_slice(&rot_pos_ids(self.config.spatial_merge_size, grids)).view([n, 2]).to_device(device);
        self.rotary_pos_emb.forward(&pos)
    }

    /// Image features (sum of t*h*w/4 over images, out_hidden) in the order
    /// the image pad tokens appear.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<Tensor, ModelError> {
        self.check_input(pixel_values, grids)?;
        let device = pixel_values.device();
        let unit = self.config.merge_unit();
        let x = self.patch_embed.forward(pixel_values);
        let n = x.size()[0];
        let rot = self.rot_pos_emb(grids, n, device);

        // Group merged tokens by window (HF reorders with `window_index`, and back at the end).
        let win = window_index(&self.config, grids);
        let perm = Tensor::from_slice(&win.index).to_device(device);
        let x = x.view([n / unit, unit, -1]).index_select(0, &perm).view([n, -1]);
        let rot = rot.view([n / unit, unit, -1]).index_select(0, &perm).view([n, -1]);
        let emb = Tensor::cat(&[&rot, &rot], -1);
        let (cos, sin) = (emb.cos().unsqueeze(1), emb.sin().unsqueeze(1));

        let full = full_cu_seqlens(grids);
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let full_attention = self.config.fullatt_block_indexes.contains(&(i as i64));
            let cu_seqlens = if full_attention { &full } else { &win.cu_seqlens };
            x = block.forward(&x, cu_seqlens, &cos, &sin);
        }
        let merged = self.merger.forward(&x);
        let reverse = perm.argsort(0, false);
        Ok(merged.index_select(0, &reverse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(window: i64) -> VisionConfig {
        VisionConfig {
            depth: 1,
            hidden_size: 8,
            intermediate_size: 8,
            num_heads: 2,
            in_chans: 3,
            out_hidden_size: 8,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            window_size: window,
            fullatt_block_indexes: vec![],
            tokens_per_second: 2,
        }
    }

    #[test]
    fn window_index_matches_hf_for_a_ragged_grid() {
        // 6x4 patches -> 3x2 merged tokens; 2x2 windows -> windows
        // {0,1,2,3}, {4,5} (bottom row), cu in patches.
        let w = window_index(&cfg(56), &[[1, 6, 4]]);
        assert_eq!(w.index, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(w.cu_seqlens, vec![0, 16, 24]);
        // 4x6 patches -> 2x3 merged; windows {0,1,3,4}, {2,5}.
        let w = window_index(&cfg(56), &[[1, 4, 6], [1, 2, 2]]);
        assert_eq!(w.index, vec![0, 1, 3, 4, 2, 5, 6]);
        assert_eq!(w.cu_seqlens, vec![0, 16, 24, 28]);
    }

    #[test]
    fn rot_pos_ids_follow_merge_blocks() {
        let p = rot_pos_ids(2, &[[1, 2, 4]]);
        // First 2x2 block: (0,0),(0,1),(1,0),(1,1); second block starts at column 2.
        assert_eq!(&p[..8], &[0, 0, 0, 1, 1, 0, 1, 1]);
        assert_eq!(&p[8..10], &[0, 2]);
    }
}
