//! The Qwen2-VL vision tower, one struct per HF module of
//! [`modeling_qwen2_vl.py`](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py)
//! (transformers 4.57.6): what differs from Qwen2.5-VL's tower is here
//! (LayerNorm + QuickGELU blocks, full attention in every block, a LayerNorm
//! merger); the patch embedding, 2D rotary and attention are Qwen2.5-VL's
//! structs (see the module docs of `qwen2_vl`).

use std::collections::BTreeMap;

use tch::{Device, Tensor};

use crate::config::Qwen2VlVisionConfig;
use crate::error::ModelError;
use crate::nn::{LayerNorm, Linear, param, quick_gelu};
use crate::qwen2_5_vl::vision::{check_pixel_input, full_cu_seqlens, rot_pos_ids};
use crate::qwen2_5_vl::{PatchEmbed, VisionAttention, VisionRotaryEmbedding};

/// The eps of every vision LayerNorm (HF hard-codes it: `LayerNorm(embed_dim, eps=1e-6)`).
const LAYER_NORM_EPS: f64 = 1e-6;

/// HF `VisionMlp`
/// ([modeling_qwen2_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py)):
/// `fc2(quick_gelu(fc1(x)))`, both with biases (not the gated MLP of Qwen2.5-VL).
pub struct VisionMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl VisionMlp {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str) -> Result<Self, ModelError> {
        Ok(Self {
            fc1: Linear::load(params, &format!("{prefix}.fc1"), true)?,
            fc2: Linear::load(params, &format!("{prefix}.fc2"), true)?,
        })
    }

    /// `hidden_act = "quick_gelu"`, the only one `config.rs` accepts.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&quick_gelu(&self.fc1.forward(x)))
    }
}

/// HF `Qwen2VLVisionBlock`
/// ([modeling_qwen2_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py)):
/// pre-LayerNorm attention over the whole image and QuickGELU MLP, each residual.
pub struct VisionBlock {
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub attn: VisionAttention,
    pub mlp: VisionMlp,
}

impl VisionBlock {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str, cfg: &Qwen2VlVisionConfig) -> Result<Self, ModelError> {
        // HF `VisionAttention`: fused qkv and proj, both with biases.
        let attn = VisionAttention {
            qkv: Linear::load(params, &format!("{prefix}.attn.qkv"), true)?,
            proj: Linear::load(params, &format!("{prefix}.attn.proj"), true)?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        };
        Ok(Self {
            norm1: LayerNorm::load(params, &format!("{prefix}.norm1"), LAYER_NORM_EPS)?,
            norm2: LayerNorm::load(params, &format!("{prefix}.norm2"), LAYER_NORM_EPS)?,
            attn,
            mlp: VisionMlp::load(params, &format!("{prefix}.mlp"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, cu_seqlens: &[i64], cos: &Tensor, sin: &Tensor) -> Tensor {
        // `a + b`, not `+=`: in-place adds would break autograd.
        let x = x + self.attn.forward(&self.norm1.forward(x), cu_seqlens, cos, sin);
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}

/// HF `PatchMerger`
/// ([modeling_qwen2_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py)):
/// LayerNorm (eps 1e-6), concatenate each 2x2 block of patches, project to
/// the text width. `mlp_0` and `mlp_2` are entries 0 and 2 of HF's
/// `nn.Sequential(Linear, GELU, Linear)` (checkpoint `merger.mlp.0.*`,
/// `merger.mlp.2.*`); entry 1 is the exact (erf) GELU.
pub struct PatchMerger {
    pub ln_q: LayerNorm,
    pub mlp_0: Linear,
    pub mlp_2: Linear,
    /// Width of a merged token: embed_dim x merge unit (HF `hidden_size`).
    pub hidden_size: i64,
}

impl PatchMerger {
    fn load(params: &BTreeMap<String, Tensor>, prefix: &str, cfg: &Qwen2VlVisionConfig) -> Result<Self, ModelError> {
        Ok(Self {
            ln_q: LayerNorm::load(params, &format!("{prefix}.ln_q"), LAYER_NORM_EPS)?,
            mlp_0: Linear::load(params, &format!("{prefix}.mlp.0"), true)?,
            mlp_2: Linear::load(params, &format!("{prefix}.mlp.2"), true)?,
            hidden_size: cfg.embed_dim * cfg.merge_unit(),
        })
    }

    /// (patches, embed_dim) in merge-block order -> (patches / 4, hidden_size).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let merged = self.ln_q.forward(x).view([-1, self.hidden_size]);
        self.mlp_2.forward(&self.mlp_0.forward(&merged).gelu("none"))
    }
}

/// HF `Qwen2VisionTransformerPretrainedModel`
/// ([modeling_qwen2_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py)),
/// the `model.visual` of a Qwen2-VL checkpoint.
pub struct VisionTransformer {
    pub config: Qwen2VlVisionConfig,
    pub patch_embed: PatchEmbed,
    pub rotary_pos_emb: VisionRotaryEmbedding,
    pub blocks: Vec<VisionBlock>,
    pub merger: PatchMerger,
}

impl VisionTransformer {
    const PREFIX: &str = "model.visual";

    pub fn load(params: &BTreeMap<String, Tensor>, cfg: &Qwen2VlVisionConfig) -> Result<Self, ModelError> {
        let p = Self::PREFIX;
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::load(params, &format!("{p}.blocks.{i}"), cfg))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config: cfg.clone(),
            patch_embed: PatchEmbed { proj: param(params, &format!("{p}.patch_embed.proj.weight"))? },
            rotary_pos_emb: VisionRotaryEmbedding { dim: cfg.head_dim() / 2, theta: 10000.0 },
            blocks,
            merger: PatchMerger::load(params, &format!("{p}.merger"), cfg)?,
        })
    }

    /// Expected parameter names and shapes.
    pub fn param_shapes(cfg: &Qwen2VlVisionConfig, out: &mut BTreeMap<String, Vec<i64>>) {
        let p = Self::PREFIX;
        let (d, i) = (cfg.embed_dim, cfg.intermediate_size());
        let (t, ps) = (cfg.temporal_patch_size, cfg.patch_size);
        out.insert(format!("{p}.patch_embed.proj.weight"), vec![d, cfg.in_channels, t, ps, ps]);
        for b in 0..cfg.depth {
            let b = format!("{p}.blocks.{b}");
            for norm in ["norm1", "norm2"] {
                out.insert(format!("{b}.{norm}.weight"), vec![d]);
                out.insert(format!("{b}.{norm}.bias"), vec![d]);
            }
            for (name, shape) in
                [("attn.qkv", [3 * d, d]), ("attn.proj", [d, d]), ("mlp.fc1", [i, d]), ("mlp.fc2", [d, i])]
            {
                out.insert(format!("{b}.{name}.weight"), shape.to_vec());
                out.insert(format!("{b}.{name}.bias"), vec![shape[0]]);
            }
        }
        let m = d * cfg.merge_unit();
        out.insert(format!("{p}.merger.ln_q.weight"), vec![d]);
        out.insert(format!("{p}.merger.ln_q.bias"), vec![d]);
        out.insert(format!("{p}.merger.mlp.0.weight"), vec![m, m]);
        out.insert(format!("{p}.merger.mlp.0.bias"), vec![m]);
        out.insert(format!("{p}.merger.mlp.2.weight"), vec![cfg.hidden_size, m]);
        out.insert(format!("{p}.merger.mlp.2.bias"), vec![cfg.hidden_size]);
    }

    /// Rotation angles (patches, head_dim / 2) of every patch (HF `rot_pos_emb`).
    fn rot_pos_emb(&self, grids: &[[i64; 3]], n: i64, device: Device) -> Tensor {
        let pos =
            Tensor::from_slice(&rot_pos_ids(self.config.spatial_merge_size, grids)).view([n, 2]).to_device(device);
        self.rotary_pos_emb.forward(&pos)
    }

    /// Image features (sum of t*h*w/4 over images, hidden_size) in the order
    /// the image pad tokens appear. Every block attends within each image
    /// frame (HF `cu_seqlens`); there is no window reordering.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<Tensor, ModelError> {
        check_pixel_input(pixel_values, grids, self.config.patch_dim(), self.config.spatial_merge_size)?;
        let x = self.patch_embed.forward(pixel_values);
        let n = x.size()[0];
        let rot = self.rot_pos_emb(grids, n, pixel_values.device());
        let emb = Tensor::cat(&[&rot, &rot], -1);
        let (cos, sin) = (emb.cos().unsqueeze(1), emb.sin().unsqueeze(1));
        let cu_seqlens = full_cu_seqlens(grids);
        let mut x = x;
        for block in &self.blocks {
            x = block.forward(&x, &cu_seqlens, &cos, &sin);
        }
        Ok(self.merger.forward(&x))
    }
}
