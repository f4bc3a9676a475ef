//! Building blocks shared by the vision tower and the text decoder (and by
//! any later architecture of the family): `nn.Linear`, HF `Qwen2RMSNorm`,
//! the gated MLP, and the rotary-embedding helpers. Parameters are looked up
//! by their HF checkpoint name and held as shallow clones (same storage, same
//! autograd leaf), so training can select them by name.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::ModelError;

/// Fetch a parameter by HF name (a shallow clone: same storage, same autograd leaf).
pub fn param(params: &BTreeMap<String, Tensor>, name: &str) -> Result<Tensor, ModelError> {
    params.get(name).map(Tensor::shallow_clone).ok_or_else(|| ModelError::MissingParam(name.to_string()))
}

/// `torch.nn.Linear`: `x @ weight.T + bias`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(params: &BTreeMap<String, Tensor>, prefix: &str, bias: bool) -> Result<Self, ModelError> {
        Ok(Self {
            weight: param(params, &format!("{prefix}.weight"))?,
            bias: if bias { Some(param(params, &format!("{prefix}.bias"))?) } else { None },
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// HF `Qwen2RMSNorm`
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)):
/// normalise in f32 (f64 for f64 inputs, so gradient checks stay in double
/// precision), scale in the input dtype, as HF does.
pub struct RmsNorm {
    pub weight: Tensor,
    /// HF `variance_epsilon`.
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(params: &BTreeMap<String, Tensor>, prefix: &str, eps: f64) -> Result<Self, ModelError> {
        Ok(Self { weight: param(params, &format!("{prefix}.weight"))?, eps })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let calc = if kind == Kind::Double { Kind::Double } else { Kind::Float };
        let xf = x.to_kind(calc);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, calc);
        let normed = xf * (var + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

/// The gated SiLU MLP `down_proj(silu(gate_proj(x)) * up_proj(x))`: HF
/// `Qwen2_5_VLMLP` (vision blocks, with biases) and `Qwen2MLP` (decoder
/// layers, without), the same module up to the bias
/// ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py)).
/// Only `hidden_act = "silu"` exists here; `config.rs` rejects the others.
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(params: &BTreeMap<String, Tensor>, prefix: &str, bias: bool) -> Result<Self, ModelError> {
        Ok(Self {
            gate_proj: Linear::load(params, &format!("{prefix}.gate_proj"), bias)?,
            up_proj: Linear::load(params, &format!("{prefix}.up_proj"), bias)?,
            down_proj: Linear::load(params, &format!("{prefix}.down_proj"), bias)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// HF `rotate_half`: (x1, x2) -> (-x2, x1) over the two halves of the last dimension.
pub fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// `1 / theta^(arange(0, dim, 2) / dim)` computed in f32 exactly as HF does.
pub fn inv_freq(dim: i64, theta: f64, device: tch::Device) -> Tensor {
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
    Tensor::pow_scalar(theta, &exponent).reciprocal()
}

/// `torch.nn.LayerNorm` over the last dimension, with weight and bias (the
/// Qwen2-VL vision blocks and patch merger; Qwen2.5-VL uses RMSNorm there).
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(params: &BTreeMap<String, Tensor>, prefix: &str, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: param(params, &format!("{prefix}.weight"))?,
            bias: param(params, &format!("{prefix}.bias"))?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let width = self.weight.size();
        x.layer_norm(width.as_slice(), Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// HF `QuickGELUActivation` (`hidden_act = "quick_gelu"`): `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Tensor {
    x * (x * 1.702).sigmoid()
}
