//! The Qwen2.5-VL vision tower: patch embedding, 2D rotary, window attention
//! (with full-attention blocks), SwiGLU blocks and the 2x2 patch merger.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::config::VisionConfig;
use crate::layers::{Linear, RmsNorm, SwiGlu, inv_freq, param, rotate_half};
use crate::model::ModelError;

struct Block {
    norm1: RmsNorm,
    norm2: RmsNorm,
    qkv: Linear,
    proj: Linear,
    mlp: SwiGlu,
}

pub struct VisionTower {
    cfg: VisionConfig,
    /// Conv3d weight (hidden, 3, 2, 14, 14), applied flattened to (hidden,
    /// 1176): the conv has stride = kernel, so it is one matmul over patches.
    patch_weight: Tensor,
    blocks: Vec<Block>,
    merger_norm: RmsNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
}

/// Window layout of a batch of images: the permutation of merged tokens that
/// groups them by window, and the cumulative patch counts of the windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowIndex {
    pub index: Vec<i64>,
    pub cu_seqlens: Vec<i64>,
}

/// `get_window_index` of HF: windows of `window_size / merge / patch` merged
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

/// (h, w) rotary positions of every patch, in the merge-block order the
/// processor emits patches in.
fn patch_positions(ms: i64, grids: &[[i64; 3]]) -> Vec<i64> {
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

impl VisionTower {
    pub fn load(params: &BTreeMap<String, Tensor>, cfg: &VisionConfig) -> Result<Self, ModelError> {
        let p = "model.visual";
        // The parameter itself, not a view of it: a view taken now would not
        // follow a later `set_requires_grad` (the weight would never train).
        let patch_weight = param(params, &format!("{p}.patch_embed.proj.weight"))?;
        let mut blocks = Vec::new();
        for i in 0..cfg.depth {
            let b = format!("{p}.blocks.{i}");
            blocks.push(Block {
                norm1: RmsNorm::load(params, &format!("{b}.norm1"), 1e-6)?,
                norm2: RmsNorm::load(params, &format!("{b}.norm2"), 1e-6)?,
                qkv: Linear::load(params, &format!("{b}.attn.qkv"), true)?,
                proj: Linear::load(params, &format!("{b}.attn.proj"), true)?,
                mlp: SwiGlu::load(params, &format!("{b}.mlp"), true)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight,
            blocks,
            merger_norm: RmsNorm::load(params, &format!("{p}.merger.ln_q"), 1e-6)?,
            merger_fc1: Linear::load(params, &format!("{p}.merger.mlp.0"), true)?,
            merger_fc2: Linear::load(params, &format!("{p}.merger.mlp.2"), true)?,
        })
    }

    /// Expected parameter names and shapes.
    pub fn param_shapes(cfg: &VisionConfig, out: &mut BTreeMap<String, Vec<i64>>) {
        let p = "model.visual";
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
        let ms = self.cfg.spatial_merge_size;
        let size = pixel_values.size();
        let n: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if size.len() != 2 || size[1] != self.cfg.patch_dim() || size[0] != n {
            return Err(ModelError::Input(format!(
                "pixel_values has shape {size:?}, expected [{n}, {}] for image_grid_thw {grids:?}",
                self.cfg.patch_dim()
            )));
        }
        if let Some(g) = grids.iter().find(|g| g[0] < 1 || g[1] % ms != 0 || g[2] % ms != 0 || g[1] < ms || g[2] < ms) {
            return Err(ModelError::Input(format!("image_grid_thw {g:?}: h and w must be positive multiples of {ms}")));
        }
        Ok(())
    }

    /// Image features (sum of t*h*w/4 over images, out_hidden) in the order
    /// the image pad tokens appear.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<Tensor, ModelError> {
        self.check_input(pixel_values, grids)?;
        let device = pixel_values.device();
        let kind = self.patch_weight.kind();
        let unit = self.cfg.merge_unit();
        let weight = self.patch_weight.view([self.patch_weight.size()[0], -1]);
        let x = pixel_values.to_kind(kind).matmul(&weight.transpose(0, 1));
        let n = x.size()[0];

        // 2D rotary: half the head dims rotate with the row, half with the column.
        let head_dim = self.cfg.head_dim();
        let freq = inv_freq(head_dim / 2, 10000.0, device);
        let pos =
            Tensor::from_slice(&patch_positions(self.cfg.spatial_merge_size, grids)).view([n, 2]).to_device(device);
        let rot = (pos.to_kind(Kind::Float).unsqueeze(-1) * freq.view([1, 1, -1])).flatten(1, 2);

        let win = window_index(&self.cfg, grids);
        let perm = Tensor::from_slice(&win.index).to_device(device);
        let x = x.view([n / unit, unit, -1]).index_select(0, &perm).view([n, -1]);
        let rot = rot.view([n / unit, unit, -1]).index_select(0, &perm).view([n, -1]);
        let emb = Tensor::cat(&[&rot, &rot], -1);
        let (cos, sin) = (emb.cos().unsqueeze(1), emb.sin().unsqueeze(1));

        let mut full = vec![0i64];
        for &[t, h, w] in grids {
            for _ in 0..t {
                let last = *full.last().unwrap_or(&0);
                full.push(last + h * w);
            }
        }
        let mut x = x;
        for (i, blk) in self.blocks.iter().enumerate() {
            let cu = if self.cfg.fullatt_block_indexes.contains(&(i as i64)) { &full } else { &win.cu_seqlens };
            let h = self.attention(blk, &blk.norm1.forward(&x), cu, &cos, &sin);
            x = &x + h; // not `+=`: keep autograd intact
            x = &x + blk.mlp.forward(&blk.norm2.forward(&x));
        }
        let merged = self.merger_norm.forward(&x).view([n / unit, -1]);
        let merged = self.merger_fc2.forward(&self.merger_fc1.forward(&merged).gelu("none"));
        let reverse = perm.argsort(0, false);
        Ok(merged.index_select(0, &reverse))
    }

    fn attention(&self, blk: &Block, x: &Tensor, cu: &[i64], cos: &Tensor, sin: &Tensor) -> Tensor {
        let n = x.size()[0];
        let heads = self.cfg.num_heads;
        let kind = x.kind();
        let qkv = blk.qkv.forward(x).view([n, 3, heads, -1]).permute([1, 0, 2, 3]);
        // Rotary in f32 (HF casts q/k up for this step).
        let rope = |t: Tensor| {
            let tf = t.to_kind(Kind::Float);
            (&tf * cos + rotate_half(&tf) * sin).to_kind(kind)
        };
        let q = rope(qkv.get(0));
        let k = rope(qkv.get(1));
        let v = qkv.get(2);
        // (heads, n, d) so each window is a slice along dim 1.
        let (q, k, v) = (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1));
        let scale = (self.cfg.head_dim() as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(cu.len());
        for pair in cu.windows(2) {
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
        blk.proj.forward(&o)
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
    fn patch_positions_follow_merge_blocks() {
        let p = patch_positions(2, &[[1, 2, 4]]);
        // First 2x2 block: (0,0),(0,1),(1,0),(1,1); second block starts at column 2.
        assert_eq!(&p[..8], &[0, 0, 0, 1, 1, 0, 1, 1]);
        assert_eq!(&p[8..10], &[0, 2]);
    }
}
