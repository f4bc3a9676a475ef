//! Running one configured stage into a staging directory and publishing it:
//! the one code path behind the local executor's worker threads and
//! `pipeline exec-stage` (a Slurm job). Takes the key's cache lock, reuses a
//! record another process published meanwhile, writes `provenance.json`,
//! and publishes through the cache (action record written last).
//!
//! A data-parallel stage runs as several ranks: rank 0 goes through
//! [`run_and_publish`] (lock, run, publish); ranks 1.. go through
//! [`run_peer`] (run, discard their outputs). Rank 0 either starts the
//! peers itself once it knows the stage must run ([`Ranks::Spawn`], the
//! local executor) or was started next to them ([`Ranks::Launched`], `srun`).

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context as _, bail};
use pipeline_cache::{ActionRecord, Cache, Digest};

use crate::plan::key::KeyComponents;
use crate::provenance::{Provenance, rfc3339};
use crate::workspace::StageStatus;
use stage_api::DistInfo;
use stage_api::host_name;
use stage_api::{Artifact, ProgressSink, StageContext};
use stage_api::{ConfiguredStage, Device};

/// Where a stage run comes from (for provenance and the action record).
#[derive(Debug, Clone)]
pub struct RunOrigin {
    pub recipe_name: String,
    pub recipe_path: PathBuf,
    pub recipe_digest: String,
    pub git_revision: Option<String>,
    pub run_id: String,
    /// The log this stage writes to.
    pub log: PathBuf,
    /// Extra fields for the action record's `meta` (e.g. the Slurm job id).
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// Everything needed to run one stage whose key is final.
pub struct StageRun<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub stage: &'a dyn ConfiguredStage,
    pub components: &'a KeyComponents,
    pub key: Digest,
    /// Run even if the key is cached.
    pub forced: bool,
    /// Input name -> artifacts, in recipe order.
    pub inputs: &'a BTreeMap<String, Vec<Artifact>>,
    pub recipe_dir: &'a Path,
    pub threads: usize,
    pub device: Device,
    pub memory_mb: u64,
    pub origin: &'a RunOrigin,
    pub ranks: Ranks<'a>,
}

/// How many processes run the stage, and who starts them.
#[derive(Clone, Copy)]
pub enum Ranks<'a> {
    /// This process alone.
    Single,
    /// This process is rank 0 of a group started by someone else (`srun`).
    Launched(&'a DistInfo),
    /// This process is rank 0 and starts ranks 1.. once the stage must run.
    Spawn { world_size: usize, launcher: &'a dyn PeerLauncher },
}

impl Ranks<'_> {
    pub fn world_size(&self) -> usize {
        match self {
            Ranks::Single => 1,
            Ranks::Launched(d) => d.world_size,
            Ranks::Spawn { world_size, .. } => *world_size,
        }
    }
}

/// Starts ranks 1.. of a data-parallel stage.
pub trait PeerLauncher: Sync {
    fn launch(&self, dist: &DistInfo) -> anyhow::Result<Box<dyn PeerGroup>>;
}

/// The running peers of rank 0.
pub trait PeerGroup: Send {
    /// A peer that has already failed (checked while rank 0 runs).
    fn failure(&mut self) -> Option<String>;
    /// Rank 0 finished (`ok`) or failed: wait for the peers or stop them.
    fn finish(self: Box<Self>, ok: bool) -> anyhow::Result<()>;
}

pub use stage_api::RENDEZVOUS_ABANDONED;

/// The published output `output` (whole output dir when `None`) of `stage`,
/// whose action record has key `key`, as a stage input.
pub fn cached_artifact(cache: &Cache, key: &Digest, stage: &str, output: Option<&str>) -> Artifact {
    let mut path = cache.artifact_dir(key);
    if let Some(out) = output {
        path = path.join(out);
    }
    Artifact { stage: stage.to_string(), output: output.map(str::to_string), path }
}

/// Told when the key is being produced by someone else (we wait for them).
pub type WaitNotice<'a> = &'a dyn Fn(&str);

/// Lock the key, reuse a published record or run the stage and publish it.
/// Worker threads of the stage's rayon pool inherit the caller's tracing span.
pub fn run_and_publish(
    cache: &Cache,
    run: &StageRun<'_>,
    progress: Arc<dyn ProgressSink>,
    cancel: Arc<AtomicBool>,
    on_wait: WaitNotice<'_>,
) -> anyhow::Result<(ActionRecord, StageStatus)> {
    let id = run.id;
    let key = run.key;
    // Another process (on this host or another one sharing the cache) may be
    // producing the same key: wait for it, then reuse its record.
    let _lock = match cache.try_lock(&key)? {
        Some(lock) => lock,
        None => {
            let holder = cache.lock_holder(&key).ok().flatten();
            let who = holder.map(|h| h.to_string()).unwrap_or_else(|| "another process".to_string());
            on_wait(&format!("wait    {id}  (key {} is being produced by {who})", key.short()));
            cache.lock(&key, None).with_context(|| format!("locking cache key {} of stage `{id}`", key.short()))?
        }
    };
    if !run.forced
        && let Some(record) = cache.lookup(&key)?
    {
        tracing::info!("outputs already in the cache (key {})", key.short());
        if let Ranks::Launched(dist) = run.ranks {
            abandon(dist);
        }
        return Ok((record, StageStatus::Cached));
    }
    let staging = cache.staging_dir(id)?;
    let scratch = cache.staging_dir(&format!("{id}.scratch"))?;
    // Restart state of an earlier failed attempt at this key is picked up,
    // unless the user asked for a fresh run.
    if run.forced {
        cache.remove_resume_dir(&key)?;
    }

    let started = chrono::Utc::now();
    let clock = Instant::now();
    // Ranks 1.. start now that the stage must run; a peer that fails stops rank 0.
    let (dist, mut peers, rendezvous) = match run.ranks {
        Ranks::Single => (None, None, None),
        Ranks::Launched(d) => (Some(d.clone()), None, None),
        Ranks::Spawn { world_size, launcher } => {
            let dir = cache.staging_dir(&format!("{id}.rendezvous"))?;
            let d = DistInfo { rank: 0, world_size, rendezvous: dir.path().to_path_buf(), token: key.hex() };
            let peers = launcher.launch(&d).with_context(|| format!("starting the ranks of stage `{id}`"))?;
            (Some(d), Some(peers), Some(dir))
        }
    };
    let stage_cancel = Arc::new(AtomicBool::new(false));
    let done = AtomicBool::new(false);
    let outcome = std::thread::scope(|scope| {
        let watcher = peers.as_mut().map(|p| {
            let (done, stage_cancel, cancel) = (&done, stage_cancel.clone(), cancel.clone());
            scope.spawn(move || watch_peers(p.as_mut(), done, &stage_cancel, &cancel))
        });
        let flag = if watcher.is_some() { stage_cancel.clone() } else { cancel.clone() };
        let outcome = run_stage(run, staging.path(), scratch.path(), cache.resume_dir(&key), dist, progress, flag);
        done.store(true, Ordering::Relaxed);
        let failure = watcher.and_then(|w| w.join().ok().flatten());
        match (outcome, failure) {
            (Err(e), Some(peer)) => Err(e.context(format!("stage `{id}`: {peer}"))),
            (Ok(_), Some(peer)) => Err(anyhow::anyhow!("stage `{id}`: {peer}")),
            (outcome, None) => outcome,
        }
    });
    let notes = if let Some(peers) = peers {
        let finished = peers.finish(outcome.is_ok());
        let notes = outcome?;
        finished.with_context(|| format!("stage `{id}`: a rank failed"))?;
        notes
    } else {
        outcome?
    };
    drop(rendezvous);
    let c = run.components;
    let provenance = Provenance {
        recipe_path: run.origin.recipe_path.clone(),
        recipe_digest: run.origin.recipe_digest.clone(),
        git_revision: run.origin.git_revision.clone(),
        stage_id: id.to_string(),
        kind: run.kind.to_string(),
        version: c.version,
        key: key.hex(),
        params: c.params.clone(),
        inputs: c.inputs.clone(),
        external_inputs: c.external.clone(),
        seed: c.seed,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        host: host_name(),
        threads: run.threads,
        ranks: run.ranks.world_size(),
        device: match run.device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(i) => format!("cuda:{i}"),
        },
        memory_mb: run.memory_mb,
        started: rfc3339(started),
        finished: rfc3339(chrono::Utc::now()),
        duration_s: clock.elapsed().as_secs_f64(),
        run_id: run.origin.run_id.clone(),
        notes,
    };
    provenance.write(staging.path()).with_context(|| format!("writing provenance of stage `{id}`"))?;
    let mut meta = serde_json::Map::new();
    meta.insert("recipe".into(), run.origin.recipe_name.clone().into());
    meta.insert("stage".into(), id.into());
    meta.insert("kind".into(), run.kind.into());
    meta.insert("log".into(), run.origin.log.display().to_string().into());
    meta.extend(run.origin.meta.clone());
    let record = cache
        .publish(&key, staging, serde_json::Value::Object(meta))
        .with_context(|| format!("publishing outputs of stage `{id}`"))?;
    tracing::info!("published {} files ({} bytes)", record.manifest.files.len(), record.manifest.total_size());
    // The outputs are safe: restart state is no longer needed (best effort).
    if let Err(e) = cache.remove_resume_dir(&key) {
        tracing::warn!("cannot remove the resume dir of stage `{id}`: {e}");
    }
    Ok((record, StageStatus::Ran))
}

/// Build the stage's context and run it (rank `dist.rank` when set); a
/// panic becomes an error. Returns the notes the stage made for its
/// provenance.
fn run_stage(
    run: &StageRun<'_>,
    staging: &Path,
    scratch: &Path,
    resume_dir: PathBuf,
    dist: Option<DistInfo>,
    progress: Arc<dyn ProgressSink>,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let span_for_pool = tracing::Span::current();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(run.threads.max(1))
        .spawn_handler(move |thread| {
            let span = span_for_pool.clone();
            std::thread::Builder::new()
                .name(format!("stage-worker-{}", thread.index()))
                .spawn(move || span.in_scope(|| thread.run()))?;
            Ok(())
        })
        .build()
        .context("building the stage thread pool")?;
    let mut builder = StageContext::builder(run.id, staging)
        .scratch_dir(scratch)
        .resume_dir(resume_dir)
        .recipe_dir(run.recipe_dir)
        .seed(run.components.seed)
        .pool(Arc::new(pool))
        .device(run.device)
        .progress(progress)
        .cancel_flag(cancel)
        .dist(dist);
    for (name, artifacts) in run.inputs {
        for a in artifacts {
            builder = builder.input(name, &a.stage, a.output.as_deref(), &a.path);
        }
    }
    let mut ctx = builder.build()?;
    let rank = ctx.dist().map(|d| format!(" rank {}/{}", d.rank, d.world_size)).unwrap_or_default();
    tracing::info!(key = %run.key.short(), threads = run.threads, device = ?run.device, "running {}{rank}", run.kind);
    let outcome = catch_unwind(AssertUnwindSafe(|| run.stage.run(&mut ctx)));
    ctx.progress().finish();
    let notes = ctx.notes();
    drop(ctx); // closes metrics.jsonl and joins the pool before publishing
    match outcome {
        Ok(Ok(())) => Ok(notes),
        Ok(Err(e)) => Err(e.context(format!("stage `{}` ({}) failed", run.id, run.kind))),
        Err(panic) => bail!("stage `{}` ({}) panicked: {}", run.id, run.kind, panic_message(&*panic)),
    }
}

/// While rank 0 runs: stop it when a peer fails or the run is cancelled.
/// Returns the peer failure, if any.
fn watch_peers(
    peers: &mut dyn PeerGroup,
    done: &AtomicBool,
    stage_cancel: &AtomicBool,
    cancel: &AtomicBool,
) -> Option<String> {
    while !done.load(Ordering::Relaxed) {
        if cancel.load(Ordering::Relaxed) {
            stage_cancel.store(true, Ordering::Relaxed);
        }
        if let Some(failure) = peers.failure() {
            stage_cancel.store(true, Ordering::Relaxed);
            return Some(failure);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// Tell peers started next to rank 0 that it will not run the stage.
fn abandon(dist: &DistInfo) {
    let _ = std::fs::create_dir_all(&dist.rendezvous);
    let _ = std::fs::write(dist.rendezvous.join(RENDEZVOUS_ABANDONED), b"");
}

/// Rank `dist.rank` > 0 of a data-parallel stage: run with rank 0 and its
/// other peers, without the key's lock (rank 0 holds it), and discard the
/// outputs (rank 0 publishes). Returns `false` when rank 0 gave the run up
/// because the outputs were published meanwhile.
pub fn run_peer(cache: &Cache, run: &StageRun<'_>, dist: &DistInfo, cancel: Arc<AtomicBool>) -> anyhow::Result<bool> {
    let id = run.id;
    let staging = cache.staging_dir(&format!("{id}.rank{}", dist.rank))?;
    let scratch = cache.staging_dir(&format!("{id}.rank{}.scratch", dist.rank))?;
    let progress: Arc<dyn ProgressSink> = Arc::new(stage_api::LogProgress::default());
    let outcome = run_stage(
        run,
        staging.path(),
        scratch.path(),
        cache.resume_dir(&run.key),
        Some(dist.clone()),
        progress,
        cancel,
    );
    match outcome {
        Ok(_) => Ok(true),
        Err(_) if dist.rendezvous.join(RENDEZVOUS_ABANDONED).exists() => {
            tracing::info!("rank 0 found the outputs of `{id}` published: nothing to do");
            Ok(false)
        }
        Err(e) => Err(e.context(format!("rank {} of {}", dist.rank, dist.world_size))),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
