//! Small building blocks shared by the vision tower and the text decoder.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::model::ModelError;

/// Fetch a parameter by HF name (a shallow clone: same storage, same autograd leaf).
pub fn param(params: &BTreeMap<String, Tensor>, name: &str) -> Result<Tensor, ModelError> {
    params.get(name).map(Tensor::shallow_clone).ok_or_else(|| ModelError::MissingParam(name.to_string()))
}

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

/// Qwen2RMSNorm: normalise in f32 (f64 for f64 inputs, so gradient checks
/// stay in double precision), scale in the input dtype (as HF does).
pub struct RmsNorm {
    pub weight: Tensor,
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

/// SwiGLU MLP: down(silu(gate(x)) * up(x)).
pub struct SwiGlu {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl SwiGlu {
    pub fn load(params: &BTreeMap<String, Tensor>, prefix: &str, bias: bool) -> Result<Self, ModelError> {
        Ok(Self {
            gate: Linear::load(params, &format!("{prefix}.gate_proj"), bias)?,
            up: Linear::load(params, &format!("{prefix}.up_proj"), bias)?,
            down: Linear::load(params, &format!("{prefix}.down_proj"), bias)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down.forward(&(self.gate.forward(x).silu() * self.up.forward(x)))
    }
}

/// Rotate the two halves of the last dimension: (x1, x2) -> (-x2, x1).
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
