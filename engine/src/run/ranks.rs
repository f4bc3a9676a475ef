//! Data-parallel ranks on this machine: the local executor runs rank 0 of a
//! stage in its own process and starts ranks 1.. as child processes of this
//! very binary (`pipeline exec-stage <key> --rank R ...`, the job spec the
//! Slurm executor also uses). A child's output goes to a log next to the
//! stage's log; a child that fails stops rank 0, and a failed rank 0 kills
//! the children.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::run::stage_run::{PeerGroup, PeerLauncher};
use stage_api::DistInfo;

/// How rank 0 starts its peers on this machine.
pub struct LocalPeers {
    /// The `pipeline` binary (this one).
    pub exe: PathBuf,
    pub cache_dir: PathBuf,
    /// Hex key of the stage (its job spec is `<cache>/jobs/<key>.json`).
    pub key: String,
    /// Threads of each rank.
    pub threads: usize,
    /// CUDA devices granted to the stage, one per rank (empty: CPU ranks).
    pub devices: Vec<usize>,
    /// Rank 0's log; rank r logs to `<stem>.rank<r>.log` beside it.
    pub log: PathBuf,
}

impl LocalPeers {
    fn rank_log(&self, rank: usize) -> PathBuf {
        let stem = self.log.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "stage".into());
        self.log.with_file_name(format!("{stem}.rank{rank}.log"))
    }

    /// The device of rank `rank`: `cuda:<n>` or `cpu`.
    fn device_arg(&self, rank: usize) -> String {
        match self.devices.get(rank) {
            Some(n) => format!("cuda:{n}"),
            None => "cpu".into(),
        }
    }
}

impl PeerLauncher for LocalPeers {
    fn launch(&self, dist: &DistInfo) -> anyhow::Result<Box<dyn PeerGroup>> {
        if !self.devices.is_empty() && self.devices.len() < dist.world_size {
            anyhow::bail!("{} ranks on CUDA need one device each, the stage holds {:?}", dist.world_size, self.devices);
        }
        let mut children = Vec::new();
        for rank in 1..dist.world_size {
            let log = self.rank_log(rank);
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let out = std::fs::File::create(&log).with_context(|| format!("creating rank log {}", log.display()))?;
            let err = out.try_clone().with_context(|| format!("opening rank log {}", log.display()))?;
            let child = Command::new(&self.exe)
                .arg("exec-stage")
                .arg(&self.key)
                .arg("--cache-dir")
                .arg(&self.cache_dir)
                .args(["--rank", &rank.to_string(), "--world-size", &dist.world_size.to_string()])
                .arg("--rendezvous")
                .arg(&dist.rendezvous)
                .args(["--threads", &self.threads.to_string(), "--device", &self.device_arg(rank)])
                .env("PIPELINE_JOB_LOG", &log)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .with_context(|| format!("starting rank {rank} ({})", self.exe.display()))?;
            tracing::info!("started rank {rank} of {} (pid {}), log {}", dist.world_size, child.id(), log.display());
            children.push(Peer { rank, child, log, exited: None });
        }
        Ok(Box::new(Peers { children }))
    }
}

struct Peer {
    rank: usize,
    child: Child,
    log: PathBuf,
    exited: Option<std::process::ExitStatus>,
}

impl Peer {
    fn describe_failure(&self, status: std::process::ExitStatus) -> String {
        let tail = std::fs::read_to_string(&self.log)
            .map(|t| t.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        format!("rank {} exited with {status} (log {}):\n{tail}", self.rank, self.log.display())
    }
}

struct Peers {
    children: Vec<Peer>,
}

impl PeerGroup for Peers {
    fn failure(&mut self) -> Option<String> {
        for p in &mut self.children {
            if p.exited.is_none()
                && let Ok(Some(status)) = p.child.try_wait()
            {
                p.exited = Some(status);
            }
            if let Some(status) = p.exited
                && !status.success()
            {
                return Some(p.describe_failure(status));
            }
        }
        None
    }

    fn finish(mut self: Box<Self>, ok: bool) -> anyhow::Result<()> {
        if !ok {
            return Ok(()); // dropping the group kills the ranks still running
        }
        // Rank 0 succeeded: its peers finish the same last step right after it.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut failures = Vec::new();
        for p in &mut self.children {
            while p.exited.is_none() {
                match p.child.try_wait() {
                    Ok(Some(status)) => p.exited = Some(status),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    _ => break,
                }
            }
            match p.exited {
                Some(status) if status.success() => {}
                Some(status) => failures.push(p.describe_failure(status)),
                None => {
                    let _ = p.child.kill();
                    p.exited = p.child.wait().ok();
                    failures.push(format!("rank {} did not exit after rank 0 finished (killed)", p.rank));
                }
            }
        }
        if failures.is_empty() { Ok(()) } else { anyhow::bail!("{}", failures.join("\n")) }
    }
}

impl Drop for Peers {
    /// Never leave a rank running behind a failed or interrupted stage.
    fn drop(&mut self) {
        for p in &mut self.children {
            if p.exited.is_none() && matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}
