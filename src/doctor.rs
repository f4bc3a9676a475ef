//! `pipeline doctor`: what this machine offers the pipeline (libtorch,
//! threads, CUDA devices), checked by actually running a small forward and
//! backward pass on every device. Users run it before a long job.

use anyhow::{Context, Result, ensure};
use tch::{Device, Kind, Tensor};

/// One forward + backward on `device`; returns the gradient check error.
fn autograd_check(device: Device) -> Result<f64> {
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(device).set_requires_grad(true);
    let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0]).to_device(device);
    // y = sum(w * x^2) => dy/dx = 2 w x
    let y = (&w * &x * &x).sum(Kind::Float);
    y.backward();
    let grad = x.grad().to_device(Device::Cpu);
    let expected = Tensor::from_slice(&[1.0f32, -4.0, 12.0]);
    let err = (grad - expected).abs().max().double_value(&[]);
    Ok(err)
}

pub fn doctor() -> Result<()> {
    println!("pipeline {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch threads: {}", tch::get_num_threads());
    let cuda = tch::Cuda::device_count();
    println!(
        "cuda available: {} ({} device(s)), cudnn: {}",
        tch::Cuda::is_available(),
        cuda,
        tch::Cuda::cudnn_is_available()
    );
    let mut devices = vec![Device::Cpu];
    devices.extend((0..cuda).map(|i| Device::Cuda(i as usize)));
    for device in devices {
        let err = autograd_check(device).with_context(|| format!("autograd check on {device:?}"))?;
        ensure!(err < 1e-6, "autograd check on {device:?}: gradient off by {err}");
        // A bf16 matmul is what training uses on GPUs; f32 on CPU.
        let kind = if device.is_cuda() { Kind::BFloat16 } else { Kind::Float };
        let a = Tensor::ones([256, 256], (kind, device));
        let s = a.matmul(&a).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        ensure!((s - 256.0).abs() < 1e-3, "matmul check on {device:?}: mean {s}, expected 256");
        println!("{device:?}: ok (autograd, {kind:?} matmul)");
    }
    Ok(())
}
