//! Resource accounting for the scheduler: which ready stage may start now
//! without oversubscribing cores, CUDA devices or memory (or, on a
//! cluster, how many jobs may be in flight).

use stage_api::{Device, DeviceRequest, Resources};

/// What the machine offers (computed once per run by the binary / engine).
#[derive(Debug, Clone)]
pub struct Capacity {
    pub cores: usize,
    pub memory_mb: u64,
    pub cuda_devices: usize,
    /// Maximum concurrently running stages (`--jobs`).
    pub jobs: usize,
}

/// The resources granted to one running stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub threads: usize,
    /// The first (rank 0's) device.
    pub device: Device,
    pub memory_mb: u64,
    /// Every CUDA device held, one bit per device index (data-parallel
    /// stages hold one per rank; empty for the CPU and on a cluster).
    pub cuda_mask: u64,
}

impl Grant {
    /// The CUDA devices held, in index order.
    pub fn cuda_devices(&self) -> Vec<usize> {
        (0..64).filter(|i| self.cuda_mask & (1 << i) != 0).collect()
    }
}

/// Book-keeping of what running stages hold.
#[derive(Debug)]
pub struct ResourcePool {
    cap: Capacity,
    cores_used: usize,
    memory_used: u64,
    cuda_busy: Vec<bool>,
    running: usize,
    /// Resources belong to a cluster scheduler: only `jobs` is enforced.
    jobs_only: bool,
}

impl ResourcePool {
    pub fn new(cap: Capacity) -> Self {
        let cap = Capacity { cores: cap.cores.max(1), jobs: cap.jobs.max(1), ..cap };
        Self {
            cuda_busy: vec![false; cap.cuda_devices],
            cap,
            cores_used: 0,
            memory_used: 0,
            running: 0,
            jobs_only: false,
        }
    }

    /// Admission when a cluster scheduler (Slurm) owns the resources: at most
    /// `jobs` stages in flight; grants pass the stage's own request through
    /// (`threads` 0 = a whole node, `Cuda(0)` = the job's first visible GPU).
    pub fn jobs_only(jobs: usize) -> Self {
        let cap = Capacity { cores: 1, memory_mb: 0, cuda_devices: 0, jobs: jobs.max(1) };
        Self { jobs_only: true, ..Self::new(cap) }
    }

    /// Resources belong to a cluster scheduler (see [`jobs_only`](Self::jobs_only)).
    pub fn is_cluster(&self) -> bool {
        self.jobs_only
    }

    pub fn running(&self) -> usize {
        self.running
    }

    /// Grant `res` (with the device already resolved to Cpu or Cuda) if it
    /// fits next to what is running. A stage asking for more cores or memory
    /// than the machine has gets the whole machine when it runs alone, so a
    /// large estimate delays a stage instead of failing it.
    pub fn try_acquire(&mut self, res: &Resources, device: DeviceRequest) -> Option<Grant> {
        self.try_acquire_ranks(res, device, 1)
    }

    /// [`try_acquire`](Self::try_acquire) for a stage of `ranks` processes:
    /// on CUDA it holds one free device per rank (all or none); the threads
    /// are shared by the ranks.
    pub fn try_acquire_ranks(&mut self, res: &Resources, device: DeviceRequest, ranks: usize) -> Option<Grant> {
        if self.running >= self.cap.jobs {
            return None;
        }
        if self.jobs_only {
            self.running += 1;
            let device = if device == DeviceRequest::Cuda { Device::Cuda(0) } else { Device::Cpu };
            return Some(Grant { threads: res.cpu, device, memory_mb: res.memory_mb, cuda_mask: 0 });
        }
        let wanted = if res.cpu == 0 { self.cap.cores } else { res.cpu.min(self.cap.cores) };
        let memory = res.memory_mb.min(self.cap.memory_mb);
        if self.running > 0
            && (self.cores_used + wanted > self.cap.cores || self.memory_used + memory > self.cap.memory_mb)
        {
            return None;
        }
        let mut cuda_mask = 0u64;
        let device = match device {
            DeviceRequest::Cuda => {
                let free: Vec<usize> = self
                    .cuda_busy
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| !**b)
                    .map(|(i, _)| i)
                    .take(ranks.max(1))
                    .collect();
                if free.len() < ranks.max(1) || free.iter().any(|&i| i >= 64) {
                    return None;
                }
                for &i in &free {
                    self.cuda_busy[i] = true;
                    cuda_mask |= 1 << i;
                }
                Device::Cuda(free[0])
            }
            DeviceRequest::Cpu | DeviceRequest::Auto => Device::Cpu,
        };
        self.cores_used += wanted;
        self.memory_used += memory;
        self.running += 1;
        Some(Grant { threads: wanted, device, memory_mb: memory, cuda_mask })
    }

    pub fn release(&mut self, grant: &Grant) {
        if self.jobs_only {
            self.running = self.running.saturating_sub(1);
            return;
        }
        self.cores_used = self.cores_used.saturating_sub(grant.threads);
        self.memory_used = self.memory_used.saturating_sub(grant.memory_mb);
        self.running = self.running.saturating_sub(1);
        for i in grant.cuda_devices() {
            if let Some(slot) = self.cuda_busy.get_mut(i) {
                *slot = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cores: usize, memory_mb: u64, cuda: usize, jobs: usize) -> ResourcePool {
        ResourcePool::new(Capacity { cores, memory_mb, cuda_devices: cuda, jobs })
    }

    fn cpu(n: usize, mem: u64) -> Resources {
        Resources { cpu: n, device: DeviceRequest::Cpu, memory_mb: mem, libtorch: false }
    }

    #[test]
    fn cores_are_not_oversubscribed() {
        let mut p = pool(4, 10_000, 0, 8);
        let a = p.try_acquire(&cpu(3, 10), DeviceRequest::Cpu).unwrap();
        assert_eq!(a.threads, 3);
        assert!(p.try_acquire(&cpu(2, 10), DeviceRequest::Cpu).is_none());
        let b = p.try_acquire(&cpu(1, 10), DeviceRequest::Cpu).unwrap();
        p.release(&a);
        assert!(p.try_acquire(&cpu(2, 10), DeviceRequest::Cpu).is_some());
        p.release(&b);
    }

    #[test]
    fn oversized_stage_gets_whole_machine_only_when_alone() {
        let mut p = pool(2, 1000, 0, 4);
        let small = p.try_acquire(&cpu(1, 10), DeviceRequest::Cpu).unwrap();
        assert!(p.try_acquire(&cpu(16, 5000), DeviceRequest::Cpu).is_none());
        p.release(&small);
        let big = p.try_acquire(&cpu(16, 5000), DeviceRequest::Cpu).unwrap();
        assert_eq!((big.threads, big.memory_mb), (2, 1000));
        assert!(p.try_acquire(&cpu(1, 1), DeviceRequest::Cpu).is_none());
        // cpu = 0 means "all cores"
        p.release(&big);
        assert_eq!(p.try_acquire(&cpu(0, 1), DeviceRequest::Cpu).unwrap().threads, 2);
    }

    #[test]
    fn memory_and_jobs_limit_concurrency() {
        let mut p = pool(8, 1000, 0, 2);
        let a = p.try_acquire(&cpu(1, 600), DeviceRequest::Cpu).unwrap();
        assert!(p.try_acquire(&cpu(1, 600), DeviceRequest::Cpu).is_none(), "memory");
        let _b = p.try_acquire(&cpu(1, 100), DeviceRequest::Cpu).unwrap();
        assert!(p.try_acquire(&cpu(1, 1), DeviceRequest::Cpu).is_none(), "jobs");
        p.release(&a);
        assert!(p.try_acquire(&cpu(1, 1), DeviceRequest::Cpu).is_some());
    }

    #[test]
    fn each_cuda_device_is_held_by_one_stage() {
        let mut p = pool(8, 10_000, 2, 8);
        let res = Resources { cpu: 1, device: DeviceRequest::Cuda, memory_mb: 1, libtorch: false };
        let a = p.try_acquire(&res, DeviceRequest::Cuda).unwrap();
        let b = p.try_acquire(&res, DeviceRequest::Cuda).unwrap();
        assert_eq!((a.device, b.device), (Device::Cuda(0), Device::Cuda(1)));
        assert!(p.try_acquire(&res, DeviceRequest::Cuda).is_none());
        p.release(&b);
        assert_eq!(p.try_acquire(&res, DeviceRequest::Cuda).unwrap().device, Device::Cuda(1));
    }

    #[test]
    fn a_data_parallel_stage_holds_one_device_per_rank_or_waits() {
        let mut p = pool(8, 10_000, 4, 8);
        let res = Resources { cpu: 1, device: DeviceRequest::Cuda, memory_mb: 1, libtorch: false };
        let one = p.try_acquire(&res, DeviceRequest::Cuda).unwrap();
        let three = p.try_acquire_ranks(&res, DeviceRequest::Cuda, 3).unwrap();
        assert_eq!((three.device, three.cuda_devices()), (Device::Cuda(1), vec![1, 2, 3]));
        assert!(p.try_acquire(&res, DeviceRequest::Cuda).is_none(), "all four held");
        p.release(&one);
        assert!(p.try_acquire_ranks(&res, DeviceRequest::Cuda, 2).is_none(), "one free device is not two");
        p.release(&three);
        assert_eq!(p.try_acquire_ranks(&res, DeviceRequest::Cuda, 4).unwrap().cuda_devices(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_cluster_pool_counts_jobs_only() {
        let mut p = ResourcePool::jobs_only(2);
        let big = Resources { cpu: 0, device: DeviceRequest::Cuda, memory_mb: 1 << 20, libtorch: false };
        let a = p.try_acquire(&big, DeviceRequest::Cuda).unwrap();
        assert_eq!((a.threads, a.device, a.memory_mb), (0, Device::Cuda(0), 1 << 20));
        let b = p.try_acquire(&cpu(64, 10), DeviceRequest::Cpu).unwrap();
        assert_eq!((b.threads, b.device), (64, Device::Cpu));
        assert!(p.try_acquire(&cpu(1, 1), DeviceRequest::Cpu).is_none(), "jobs");
        p.release(&a);
        assert!(p.try_acquire(&cpu(1, 1), DeviceRequest::Cpu).is_some());
    }
}
