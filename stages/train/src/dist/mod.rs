//! Data-parallel training: the collectives the ranks of a stage use to stay
//! one model. Every rank holds the full model and takes its shard of each
//! global batch; after the backward pass the gradients are summed across
//! ranks (each rank's loss is already scaled by the *global* normaliser), so
//! every rank takes the same optimizer step as a single process would.
//!
//! Backends behind [`Collective`]: [`Single`] (one process), [`tcp::Tcp`]
//! (CPU tensors over TCP through rank 0: tests, CPU clusters) and, with the
//! `nccl` feature, `nccl::Nccl` for CUDA tensors (gathers of small host data
//! still go over TCP). The engine launches the ranks and hands each a
//! [`DistInfo`]; [`connect`] picks the backend for the stage's device.

mod collective;
pub mod tcp;

#[cfg(feature = "nccl")]
pub mod nccl;

use anyhow::{Context as _, bail};
use stage_api::StageContext;

pub use collective::{
    Collective, Single, all_gather_f64, all_gather_json, all_reduce_f64, all_reduce_grads, ensure_grads, shard,
};

/// The collective of a stage run: [`Single`] unless the engine started it as
/// one of several ranks, then TCP for CPU tensors or NCCL for CUDA ones.
pub fn connect(ctx: &StageContext, device: tch::Device) -> anyhow::Result<Box<dyn Collective>> {
    let Some(dist) = ctx.dist() else { return Ok(Box::new(Single)) };
    let cancelled = || ctx.is_cancelled();
    let tcp = tcp::Tcp::connect(dist, tcp::CONNECT_TIMEOUT, &cancelled)
        .with_context(|| format!("rank {} of {}: meeting the other ranks", dist.rank, dist.world_size))?;
    tracing::info!("rank {} of {} connected ({})", dist.rank, dist.world_size, backend_name(device));
    match device {
        tch::Device::Cpu => Ok(Box::new(tcp)),
        #[cfg(feature = "nccl")]
        tch::Device::Cuda(i) => Ok(Box::new(nccl::Nccl::new(tcp, i)?)),
        #[cfg(not(feature = "nccl"))]
        tch::Device::Cuda(_) => bail!(
            "data-parallel training on CUDA needs NCCL: build with `cargo build --release --features nccl` (or run the ranks on the CPU)"
        ),
        other => bail!("no collective backend for device {other:?}"),
    }
}

fn backend_name(device: tch::Device) -> &'static str {
    match device {
        tch::Device::Cpu => "tcp",
        _ => "nccl",
    }
}
