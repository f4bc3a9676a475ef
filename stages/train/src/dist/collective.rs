//! The [`Collective`] trait the backends implement, the one-process
//! [`Single`], and what the training loop builds on it (gradient sums, host
//! gathers, sharding). Its own module so the backends (`tcp`, `nccl`) import
//! it without importing `dist`, which picks among them.

use anyhow::{Context as _, bail};
use tch::{Kind, Tensor};

/// What the ranks of a training stage do together. Every call is collective:
/// all ranks make the same calls in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sum `tensors` (same shapes and kinds on every rank) in place.
    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> anyhow::Result<()>;
    /// Every rank's `bytes`, in rank order.
    fn all_gather_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>>;
}

/// One process: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _tensors: &[Tensor]) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
}

/// Sum the gradients of `params` across ranks. Every trainable tensor must
/// have a gradient (all of them take part in every forward pass).
pub fn all_reduce_grads<'a>(comm: &mut dyn Collective, params: impl Iterator<Item = &'a Tensor>) -> anyhow::Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let grads: Vec<Tensor> = params.map(Tensor::grad).collect();
    if let Some(i) = grads.iter().position(|g| !g.defined()) {
        bail!("rank {}: trainable tensor #{i} got no gradient this step", comm.rank());
    }
    comm.all_reduce_sum(&grads)
}

/// Give every tensor a (zero) gradient if it has none yet, so all ranks
/// reduce the same tensors even when one had nothing to train on this step.
pub fn ensure_grads<'a>(params: impl Iterator<Item = &'a Tensor>) {
    for p in params {
        if !p.grad().defined() {
            (p * 0.0).sum(p.kind()).backward();
        }
    }
}

/// Sum of `values` across ranks (small host vectors: counts, metric sums).
pub fn all_reduce_f64(comm: &mut dyn Collective, values: &[f64]) -> anyhow::Result<Vec<f64>> {
    let parts = all_gather_f64(comm, values)?;
    let mut out = vec![0.0; values.len()];
    for part in &parts {
        if part.len() != out.len() {
            bail!("ranks reduced vectors of different lengths ({} vs {})", part.len(), out.len());
        }
        for (o, v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
    Ok(out)
}

/// Every rank's `values`, in rank order.
pub fn all_gather_f64(comm: &mut dyn Collective, values: &[f64]) -> anyhow::Result<Vec<Vec<f64>>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let parts = comm.all_gather_bytes(&bytes)?;
    parts
        .into_iter()
        .map(|p| {
            if p.len() % 8 != 0 {
                bail!("a rank sent {} bytes, not f64 values", p.len());
            }
            Ok(p.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
        })
        .collect()
}

/// Every rank's value of a serializable `T`, in rank order.
pub fn all_gather_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    comm: &mut dyn Collective,
    value: &T,
) -> anyhow::Result<Vec<T>> {
    let bytes = serde_json::to_vec(value)?;
    comm.all_gather_bytes(&bytes)?
        .iter()
        .map(|b| serde_json::from_slice(b).context("decoding another rank's data"))
        .collect()
}

/// The contiguous slice `[start, end)` of `n` items that rank `rank` of
/// `world` takes (the first `n % world` ranks take one more).
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Flatten tensors into one f32 CPU buffer (and back): the wire format of
/// the TCP backend.
pub(crate) fn flatten_f32(tensors: &[Tensor]) -> anyhow::Result<Vec<f32>> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let flat: Vec<Tensor> =
        tensors.iter().map(|t| t.to_device(tch::Device::Cpu).to_kind(Kind::Float).reshape([-1])).collect();
    Ok(Vec::<f32>::try_from(&Tensor::cat(&flat, 0))?)
}

pub(crate) fn unflatten_into(values: &[f32], tensors: &[Tensor]) -> anyhow::Result<()> {
    let total: i64 = tensors.iter().map(Tensor::numel).map(|n| n as i64).sum();
    if total != values.len() as i64 {
        bail!("reduced buffer holds {} values, the tensors {total}", values.len());
    }
    let mut offset = 0usize;
    tch::no_grad(|| {
        for t in tensors {
            let n = t.numel();
            let src = Tensor::from_slice(&values[offset..offset + n]).view(t.size().as_slice());
            t.shallow_clone().copy_(&src.to_kind(t.kind()).to_device(t.device()));
            offset += n;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_item_once_in_order() {
        for n in 0..12 {
            for world in 1..5 {
                let ranges: Vec<_> = (0..world).map(|r| shard(n, r, world)).collect();
                let flat: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(flat, (0..n).collect::<Vec<_>>(), "n {n} world {world}");
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn single_process_collectives_are_the_identity() {
        let mut one = Single;
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        one.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        assert_eq!(all_reduce_f64(&mut one, &[3.0]).unwrap(), vec![3.0]);
        assert_eq!(all_gather_json(&mut one, &"x".to_string()).unwrap(), vec!["x".to_string()]);
    }
}
