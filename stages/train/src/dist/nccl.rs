//! The CUDA collective: gradients are summed with NCCL directly on the
//! device (one flat buffer per call, on the legacy default stream that tch
//! kernels use, so it is ordered after the backward pass and before the
//! optimizer step). Rank 0 creates the NCCL id and the TCP group carries it
//! to the others; small host gathers (metrics, rewards) stay on TCP.
//! libnccl and libcuda are loaded at run time (cudarc `dynamic-loading`),
//! so a binary built with the `nccl` feature still runs on CPU-only hosts.

use anyhow::{Context as _, bail};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use tch::{Kind, Tensor};

use super::collective::Collective;
use super::tcp::Tcp;

pub struct Nccl {
    tcp: Tcp,
    comm: sys::ncclComm_t,
    device: usize,
}

// The communicator is only used from the thread that owns the Nccl value.
unsafe impl Send for Nccl {}

impl Nccl {
    pub fn new(mut tcp: Tcp, device: usize) -> anyhow::Result<Self> {
        let (rank, world) = (tcp.rank(), tcp.world_size());
        let mine = if rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let ids = tcp.all_gather_bytes(&mine).context("sharing the NCCL id")?;
        let bytes = &ids[0];
        if bytes.len() != 128 {
            bail!("rank 0 sent an NCCL id of {} bytes", bytes.len());
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(bytes) {
            *d = *s as _;
        }
        // Make `device` current for NCCL (tch selects devices per tensor).
        let _ = Tensor::zeros([1], (Kind::Float, tch::Device::Cuda(device)));
        let mut comm = std::ptr::null_mut();
        unsafe { nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
        Ok(Self { tcp, comm, device })
    }
}

fn nccl_type(kind: Kind) -> anyhow::Result<sys::ncclDataType_t> {
    Ok(match kind {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        Kind::Double => sys::ncclDataType_t::ncclFloat64,
        other => bail!("NCCL all-reduce of {other:?} tensors is not supported"),
    })
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> anyhow::Result<()> {
        let Some(first) = tensors.first() else { return Ok(()) };
        let kind = first.kind();
        if tensors.iter().any(|t| t.kind() != kind || t.device() != tch::Device::Cuda(self.device)) {
            bail!("NCCL all-reduce needs tensors of one kind on cuda:{}", self.device);
        }
        let flat = Tensor::cat(&tensors.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
        let count = flat.numel();
        let ptr = flat.data_ptr();
        unsafe {
            nccl::all_reduce(
                ptr,
                ptr,
                count,
                nccl_type(kind)?,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| anyhow::anyhow!("ncclAllReduce of {count} values: {e:?}"))?;
        let mut offset = 0i64;
        tch::no_grad(|| {
            for t in tensors {
                let n = t.numel() as i64;
                t.shallow_clone().copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
        });
        Ok(())
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        self.tcp.all_gather_bytes(bytes)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}
