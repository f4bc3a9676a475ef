//! Where a model runs and in which dtype: the `device` and `dtype` params of
//! every stage that loads a checkpoint (eval, judge, SFT, GRPO), and the tch
//! device and kind they select.

use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{DeviceRequest, StageContext};
use tch::{Device, Kind};

/// Where the model runs (the engine's `DeviceRequest`, with a schema for the recipe docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    Auto,
    Cuda,
}

impl DeviceChoice {
    /// What the stage asks the engine for; the engine assigns the device.
    pub fn request(self) -> DeviceRequest {
        match self {
            DeviceChoice::Cpu => DeviceRequest::Cpu,
            DeviceChoice::Auto => DeviceRequest::Auto,
            DeviceChoice::Cuda => DeviceRequest::Cuda,
        }
    }
}

/// The `dtype` values a stage accepts, for messages.
pub const DTYPES: &str = "auto, float32, bfloat16 or float16";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("param `dtype`: expected {DTYPES}, got {0:?}")]
pub struct DtypeError(pub String);

/// A `dtype` param: `auto` (float32 on CPU, bfloat16 on CUDA), `float32`,
/// `bfloat16` or `float16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Auto,
    Float32,
    BFloat16,
    Float16,
}

impl FromStr for Dtype {
    type Err = DtypeError;
    fn from_str(s: &str) -> Result<Self, DtypeError> {
        Ok(match s {
            "auto" => Dtype::Auto,
            "float32" => Dtype::Float32,
            "bfloat16" => Dtype::BFloat16,
            "float16" => Dtype::Float16,
            other => return Err(DtypeError(other.to_string())),
        })
    }
}

impl Dtype {
    /// The tch kind of the weights and activations on `device`.
    pub fn kind(self, device: Device) -> Kind {
        match (self, device) {
            (Dtype::Auto, Device::Cpu) | (Dtype::Float32, _) => Kind::Float,
            (Dtype::Auto, _) | (Dtype::BFloat16, _) => Kind::BFloat16,
            (Dtype::Float16, _) => Kind::Half,
        }
    }
}

/// The tch device of the device the engine assigned a stage.
pub fn torch_device(device: stage_api::Device) -> Device {
    match device {
        stage_api::Device::Cpu => Device::Cpu,
        stage_api::Device::Cuda(i) => Device::Cuda(i),
    }
}

/// The tch device and kind of a stage: the engine's device, the `dtype` param.
pub fn device_and_kind(ctx: &StageContext, dtype: &str) -> Result<(Device, Kind), DtypeError> {
    let device = torch_device(ctx.device());
    Ok((device, dtype.parse::<Dtype>()?.kind(device)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_float32_on_cpu_and_bfloat16_on_cuda() {
        let kind = |d: &str, dev| d.parse::<Dtype>().map(|t| t.kind(dev));
        assert_eq!(kind("auto", Device::Cpu), Ok(Kind::Float));
        assert_eq!(kind("auto", Device::Cuda(0)), Ok(Kind::BFloat16));
        assert_eq!(kind("float32", Device::Cuda(1)), Ok(Kind::Float));
        assert_eq!(kind("bfloat16", Device::Cpu), Ok(Kind::BFloat16));
        assert_eq!(kind("float16", Device::Cpu), Ok(Kind::Half));
        let e = kind("fp16", Device::Cpu).unwrap_err().to_string();
        assert_eq!(e, "param `dtype`: expected auto, float32, bfloat16 or float16, got \"fp16\"");
    }

    #[test]
    fn device_choice_reads_lowercase_and_maps_to_requests() {
        let c: DeviceChoice = serde_json::from_str("\"cuda\"").unwrap();
        assert_eq!(c.request(), DeviceRequest::Cuda);
        assert_eq!(DeviceChoice::Auto.request(), DeviceRequest::Auto);
        assert!(serde_json::from_str::<DeviceChoice>("\"gpu\"").is_err());
        assert_eq!(torch_device(stage_api::Device::Cuda(2)), Device::Cuda(2));
    }
}
