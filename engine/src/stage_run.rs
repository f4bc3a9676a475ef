//! Running one configured stage into a staging directory and publishing it:
//! the one code path behind the local executor's worker threads and
//! `pipeline exec-stage` (a Slurm job). Takes the key's cache lock, reuses a
//! record another process published meanwhile, writes `provenance.json`,
//! and publishes through the cache (action record written last).

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context as _, bail};
use pipeline_cache::{ActionRecord, Cache, Digest};

use crate::context::{Artifact, ProgressSink, StageContext};
use crate::key::KeyComponents;
use crate::provenance::{Provenance, host_name, rfc3339};
use crate::stage::{ConfiguredStage, Device};
use crate::workspace::StageStatus;

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
        return Ok((record, StageStatus::Cached));
    }
    let staging = cache.staging_dir(id)?;
    let scratch = cache.staging_dir(&format!("{id}.scratch"))?;
    // Restart state of an earlier failed attempt at this key is picked up,
    // unless the user asked for a fresh run.
    if run.forced {
        cache.remove_resume_dir(&key)?;
    }

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
    let mut builder = StageContext::builder(id, staging.path())
        .scratch_dir(scratch.path())
        .resume_dir(cache.resume_dir(&key))
        .recipe_dir(run.recipe_dir)
        .seed(run.components.seed)
        .pool(Arc::new(pool))
        .device(run.device)
        .progress(progress)
        .cancel_flag(cancel);
    for (name, artifacts) in run.inputs {
        for a in artifacts {
            builder = builder.input(name, &a.stage, a.output.as_deref(), &a.path);
        }
    }
    let mut ctx = builder.build()?;

    let started = chrono::Utc::now();
    let clock = Instant::now();
    tracing::info!(key = %key.short(), threads = run.threads, device = ?run.device, "running {}", run.kind);
    let outcome = catch_unwind(AssertUnwindSafe(|| run.stage.run(&mut ctx)));
    ctx.progress().finish();
    drop(ctx); // closes metrics.jsonl and joins the pool before publishing
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context(format!("stage `{id}` ({}) failed", run.kind))),
        Err(panic) => bail!("stage `{id}` ({}) panicked: {}", run.kind, panic_message(&*panic)),
    }
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
        device: match run.device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(i) => format!("cuda:{i}"),
        },
        memory_mb: run.memory_mb,
        started: rfc3339(started),
        finished: rfc3339(chrono::Utc::now()),
        duration_s: clock.elapsed().as_secs_f64(),
        run_id: run.origin.run_id.clone(),
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

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
