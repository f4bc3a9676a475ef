//! Which device a stage gets on the machine it will run on: decided while
//! planning, because the device class enters the key and a stage that
//! cannot run here should say so before anything starts.

use stage_api::DeviceRequest;

/// Why a stage cannot run on this machine at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "stage `{stage}` requests a CUDA device but none is available; set `allow_cpu_fallback = true` in [recipe] to run it on the CPU"
    )]
    NoCuda { stage: String },
}

/// Resolve a stage's device request against the machine.
pub fn resolve_device(
    stage: &str,
    request: DeviceRequest,
    cuda_devices: usize,
    allow_cpu_fallback: bool,
) -> Result<DeviceRequest, DeviceError> {
    match request {
        DeviceRequest::Cpu => Ok(DeviceRequest::Cpu),
        DeviceRequest::Auto if cuda_devices > 0 => Ok(DeviceRequest::Cuda),
        DeviceRequest::Auto => Ok(DeviceRequest::Cpu),
        DeviceRequest::Cuda if cuda_devices > 0 => Ok(DeviceRequest::Cuda),
        DeviceRequest::Cuda if allow_cpu_fallback => Ok(DeviceRequest::Cpu),
        DeviceRequest::Cuda => Err(DeviceError::NoCuda { stage: stage.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_resolution() {
        assert_eq!(resolve_device("s", DeviceRequest::Auto, 0, false), Ok(DeviceRequest::Cpu));
        assert_eq!(resolve_device("s", DeviceRequest::Auto, 1, false), Ok(DeviceRequest::Cuda));
        assert_eq!(resolve_device("s", DeviceRequest::Cuda, 0, true), Ok(DeviceRequest::Cpu));
        let err = resolve_device("train_sft", DeviceRequest::Cuda, 0, false).unwrap_err();
        assert!(err.to_string().contains("stage `train_sft` requests a CUDA device"), "{err}");
    }
}
