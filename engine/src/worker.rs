//! `pipeline exec-stage <key>`: the worker side of a job spec. Run by a
//! Slurm job on any node that mounts the cache, or as rank 1.. of a
//! data-parallel stage. It loads `<cache>/jobs/<key>.json`, instantiates the
//! kind from its own registry, recomputes the key with the same derivation
//! as the planner ([`crate::plan::components`]) and refuses to run when
//! that key differs from the expected one. Then it runs and publishes
//! through [`crate::run::stage_run`], exactly as the local backend does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context as _, bail};
use pipeline_cache::{Cache, Digest};
use stage_api::{Artifact, Device, DistInfo, LogProgress, Registry};

use crate::env::EngineEnv;
use crate::jobspec::{JobSpec, META_SLURM_JOB, jobs_dir, spec_path};
use crate::plan::components::{job_components, published_input};
use crate::plan::key::{InputDigest, explain_change};
use crate::run::stage_run::{Ranks, RunOrigin, StageRun, cached_artifact, run_and_publish, run_peer};
use crate::workspace::StageStatus;

/// Threads for a stage inside a Slurm allocation: what Slurm gave the task,
/// else what the stage asked for, else every core this process may use.
fn allocated_threads(asked: usize) -> usize {
    let from_env = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<usize>().ok());
    from_env("SLURM_CPUS_PER_TASK")
        .or_else(|| if asked == 0 { from_env("SLURM_CPUS_ON_NODE") } else { None })
        .filter(|n| *n > 0)
        .unwrap_or(if asked > 0 { asked } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) })
}

/// Where an `exec-stage` process sits in a data-parallel stage, when the
/// local executor started it (`--rank ...`); under `srun` these come from
/// Slurm's environment instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankArgs {
    pub rank: Option<usize>,
    pub world_size: Option<usize>,
    pub rendezvous: Option<PathBuf>,
    /// Threads of this rank (default: the Slurm allocation or the spec's).
    pub threads: Option<usize>,
    /// `cpu` or `cuda:N` (default: from the spec's device class).
    pub device: Option<String>,
}

/// The rank of this process from flags or, for a multi-rank spec, from the
/// Slurm task environment (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_JOB_ID`).
fn dist_info(args: &RankArgs, spec: &JobSpec, cache: &Cache) -> anyhow::Result<Option<DistInfo>> {
    let token = spec.key.hex();
    match (args.rank, args.world_size, &args.rendezvous) {
        (Some(rank), Some(world_size), Some(dir)) if rank < world_size => {
            Ok(Some(DistInfo { rank, world_size, rendezvous: dir.clone(), token }))
        }
        (None, None, None) if spec.ranks > 1 => {
            let var = |name: &str| -> anyhow::Result<String> {
                std::env::var(name).with_context(|| {
                    format!(
                        "stage `{}` runs as {} ranks but `{name}` is not set: start it with srun",
                        spec.stage_id, spec.ranks
                    )
                })
            };
            let number = |name: &str| -> anyhow::Result<usize> {
                var(name)?.trim().parse().with_context(|| format!("`{name}` is not a number"))
            };
            let (rank, world_size, job) = (number("SLURM_PROCID")?, number("SLURM_NTASKS")?, var("SLURM_JOB_ID")?);
            if world_size != spec.ranks || rank >= world_size {
                bail!(
                    "stage `{}` wants {} ranks but this task is {rank} of {world_size} (SLURM_PROCID/SLURM_NTASKS)",
                    spec.stage_id,
                    spec.ranks
                );
            }
            // One directory per job: a resubmitted job never meets stale files.
            let rendezvous = jobs_dir(cache).join(format!("{token}.rendezvous")).join(job.trim());
            std::fs::create_dir_all(&rendezvous).with_context(|| format!("creating {}", rendezvous.display()))?;
            Ok(Some(DistInfo { rank, world_size, rendezvous, token }))
        }
        (None, None, None) => Ok(None),
        _ => bail!("--rank (below --world-size), --world-size and --rendezvous go together"),
    }
}

/// What `exec-stage` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// This process was rank 0 (or the only one): the record under `key`.
    Published { stage_id: String, key: Digest, files: usize, status: StageStatus },
    /// This process was rank `rank` > 0; `ran` is false when rank 0 found
    /// the outputs published meanwhile and gave the run up.
    Peer { stage_id: String, rank: usize, ran: bool },
}

/// `pipeline exec-stage <key>`: run the stage described by
/// `<cache>/jobs/<key>.json`; `cancel` is set on Ctrl-C / SIGTERM.
pub fn exec_stage(
    key: &str,
    cache_dir: &Path,
    registry: &Registry,
    env: &EngineEnv,
    rank_args: &RankArgs,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<WorkerOutcome> {
    let key: Digest = key.parse().with_context(|| format!("`{key}` is not a cache key (64 hex digits)"))?;
    let cache = Cache::open(cache_dir).with_context(|| format!("opening the cache at {}", cache_dir.display()))?;
    let spec = JobSpec::read(&spec_path(&cache, &key))?;
    if spec.key != key {
        bail!("job spec for {} names key {}", key.short(), spec.key.short());
    }
    let id = spec.stage_id.as_str();
    if let Err(e) = std::env::set_current_dir(&spec.cwd) {
        tracing::warn!("cannot enter the submitting directory {}: {e}", spec.cwd.display());
    }
    let kind = registry.get(&spec.components.kind).with_context(|| {
        format!(
            "stage `{id}`: this `pipeline` has no stage kind `{}` (a different binary submitted it)",
            spec.components.kind
        )
    })?;
    let stage = kind
        .configure_canonical(spec.components.params.clone())
        .map_err(|e| anyhow::anyhow!("stage `{id}`: params do not load in this binary: {e}"))?;

    // Recompute the key from what this process sees (its kind version and
    // params canonicalisation, the upstream records in the cache, external
    // inputs): a different binary or different data on the node would
    // otherwise publish wrong outputs under the key.
    let mut inputs: BTreeMap<String, Vec<Artifact>> = BTreeMap::new();
    let mut digests: BTreeMap<String, Vec<InputDigest>> = BTreeMap::new();
    for (name, refs) in &spec.inputs {
        for r in refs {
            let record = cache.lookup(&r.record)?.with_context(|| {
                format!(
                    "stage `{id}`: input `{name}`: the output of `{}` (key {}) is not in the cache at {} — is the cache on a filesystem this node shares?",
                    r.stage,
                    r.record.short(),
                    cache.root().display()
                )
            })?;
            let digest = published_input(id, name, &r.stage, r.output.as_deref(), &record)?;
            inputs.entry(name.clone()).or_default().push(cached_artifact(
                &cache,
                &r.record,
                &r.stage,
                r.output.as_deref(),
            ));
            digests.entry(name.clone()).or_default().push(digest);
        }
    }
    let components =
        job_components(kind.as_ref(), stage.as_ref(), &spec.recipe_dir, &spec.components, digests, &cache)?;
    let recomputed = components.key();
    if recomputed != key {
        bail!(
            "stage `{id}`: refusing to run: this process computes key {} but {} expected {} ({}); submit and run with the same `pipeline` binary and data",
            recomputed.short(),
            spec.tool_version,
            key.short(),
            explain_change(id, &spec.components, &components)
        );
    }

    let dist = dist_info(rank_args, &spec, &cache)?;
    if dist.is_some() && !kind.distributed() {
        bail!("stage `{id}` (kind `{}`) runs as one process, not as ranks", kind.kind());
    }
    let device = match rank_args.device.as_deref() {
        Some("cpu") => Device::Cpu,
        Some(d) => match d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n < env.cuda_devices => Device::Cuda(n),
            _ => bail!("--device `{d}`: expected `cpu` or `cuda:N` with N below {}", env.cuda_devices),
        },
        None => stage_device(id, spec.components.device_class.as_deref(), env)?,
    };
    let job_id = std::env::var("SLURM_JOB_ID").ok();
    let log = std::env::var("PIPELINE_JOB_LOG").map(PathBuf::from).unwrap_or_default();
    let mut meta = serde_json::Map::new();
    if let Some(job) = &job_id {
        meta.insert(META_SLURM_JOB.into(), job.clone().into());
    }
    let origin = RunOrigin {
        recipe_name: spec.recipe_name.clone(),
        recipe_path: spec.recipe_path.clone(),
        recipe_digest: spec.recipe_digest.clone(),
        git_revision: spec.git_revision.clone(),
        run_id: spec.run_id.clone(),
        log,
        meta,
    };
    let threads = rank_args.threads.unwrap_or_else(|| allocated_threads(spec.threads));
    let run = StageRun {
        id,
        kind: kind.kind(),
        stage: stage.as_ref(),
        components: &components,
        key,
        forced: spec.forced,
        inputs: &inputs,
        recipe_dir: &spec.recipe_dir,
        threads,
        device,
        memory_mb: spec.memory_mb,
        origin: &origin,
        ranks: match &dist {
            Some(d) => Ranks::Launched(d),
            None => Ranks::Single,
        },
    };
    let rank = dist.as_ref().map(|d| format!(" rank {}/{}", d.rank, d.world_size)).unwrap_or_default();
    tracing::info!(
        "exec-stage `{id}` (kind {}, key {}){rank} job {} threads {threads}",
        kind.kind(),
        key.short(),
        job_id.as_deref().unwrap_or("-")
    );
    if let Some(d) = dist.as_ref().filter(|d| d.rank > 0) {
        let ran = run_peer(&cache, &run, d, cancel)?;
        return Ok(WorkerOutcome::Peer { stage_id: id.to_string(), rank: d.rank, ran });
    }
    let notice = |line: &str| tracing::info!("{line}");
    let (record, status) = run_and_publish(&cache, &run, Arc::new(LogProgress::default()), cancel, &notice)?;
    Ok(WorkerOutcome::Published {
        stage_id: id.to_string(),
        key: record.key,
        files: record.manifest.files.len(),
        status,
    })
}

/// The device of a stage run by `exec-stage` from its key's device class.
fn stage_device(id: &str, class: Option<&str>, env: &EngineEnv) -> anyhow::Result<Device> {
    Ok(match class {
        Some("cuda") if env.cuda_devices == 0 => bail!(
            "stage `{id}` needs a CUDA device but this job sees none (CUDA_VISIBLE_DEVICES={}); request one with `gpus` in [executor.stage.{id}]",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
        ),
        Some("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobspec::{JOB_SPEC_FORMAT, JobInput};
    use crate::plan::components::artifact_digest;
    use crate::plan::key::KeyComponents;
    use stage_api::{InputSpec, StageContext, StageKind};

    /// Writes its `text` param after the upstream's `out.txt`.
    struct Append<const V: u32>;
    #[derive(Debug, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct AppendParams {
        /// Appended text.
        text: String,
        /// Unset by default (TOML could not carry the `null`).
        note: Option<String>,
    }
    impl<const V: u32> StageKind for Append<V> {
        type Params = AppendParams;
        const KIND: &'static str = "append";
        const VERSION: u32 = V;
        const SUMMARY: &'static str = "test kind";
        fn inputs() -> &'static [InputSpec] {
            const I: &[InputSpec] = &[InputSpec::optional("up", "upstream")];
            I
        }
        fn run(p: &AppendParams, ctx: &mut StageContext) -> anyhow::Result<()> {
            let before = match ctx.optional_input("up")? {
                Some(dir) => std::fs::read_to_string(dir.join("out.txt"))?,
                None => String::new(),
            };
            std::fs::write(ctx.output_dir().join("out.txt"), before + &p.text)?;
            Ok(())
        }
    }

    /// A spec for an `append` stage reading `upstream` (published under `up_key`).
    fn spec_reading(cache: &Cache, up_key: Digest, text: &str) -> JobSpec {
        let up = cache.lookup(&up_key).unwrap().unwrap();
        let digest = artifact_digest("a", &up, None).unwrap();
        let mut inputs = BTreeMap::new();
        inputs.insert("up".to_string(), vec![InputDigest { stage: "a".into(), output: None, digest, pending: false }]);
        let components = KeyComponents {
            kind: "append".into(),
            version: 1,
            params: serde_json::json!({"text": text, "note": null}),
            inputs,
            external: vec![],
            seed: 7,
            device_class: None,
            unkeyed: Vec::new(),
            numerics: None,
        };
        let mut job_inputs = BTreeMap::new();
        job_inputs.insert("up".to_string(), vec![JobInput { stage: "a".into(), output: None, record: up_key }]);
        JobSpec {
            format: JOB_SPEC_FORMAT,
            key: components.key(),
            stage_id: "b".into(),
            components,
            inputs: job_inputs,
            forced: false,
            threads: 1,
            memory_mb: 10,
            // exec-stage enters this directory: keep the test process where it is.
            cwd: std::env::current_dir().unwrap(),
            recipe_dir: ".".into(),
            recipe_name: "r".into(),
            recipe_path: "r.toml".into(),
            recipe_digest: "d".into(),
            git_revision: None,
            run_id: "run".into(),
            tool_version: "test".into(),
            ranks: 1,
        }
    }

    #[test]
    fn exec_stage_rebuilds_the_stage_and_refuses_a_different_binary() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let cache = Cache::open(&root).unwrap();
        // An upstream output, published the usual way.
        let staging = cache.staging_dir("a").unwrap();
        std::fs::write(staging.path().join("out.txt"), "up+").unwrap();
        let up_key = Digest::of_bytes(b"upstream");
        cache.publish(&up_key, staging, serde_json::json!({})).unwrap();

        let env = EngineEnv { cuda_devices: 0, stage_gpus: None, cores: 1, memory_mb: 64, gpu_memory_mb: None };
        let spec = spec_reading(&cache, up_key, "b");
        spec.write(&cache).unwrap();
        // A binary whose `append` is another version computes another key: refused.
        let newer = Registry::new().register::<Append<2>>();
        let run = |key: &Digest, registry: &Registry| {
            exec_stage(&key.hex(), &root, registry, &env, &RankArgs::default(), Arc::new(AtomicBool::new(false)))
        };
        let err = run(&spec.key, &newer).unwrap_err().to_string();
        assert!(err.contains("refusing to run") && err.contains("code version bumped 1 -> 2"), "{err}");
        assert!(cache.lookup(&spec.key).unwrap().is_none());

        let same = Registry::new().register::<Append<1>>();
        let outcome = run(&spec.key, &same).unwrap();
        assert_eq!(
            outcome,
            WorkerOutcome::Published { stage_id: "b".into(), key: spec.key, files: 2, status: StageStatus::Ran }
        );
        let record = cache.lookup(&spec.key).unwrap().expect("published");
        let out = std::fs::read_to_string(cache.artifact_dir(&record.key).join("out.txt")).unwrap();
        assert_eq!(out, "up+b");
        assert_eq!(record.meta["stage"], "b");
        let prov = crate::provenance::Provenance::read(&cache.artifact_dir(&record.key)).unwrap();
        assert_eq!((prov.key, prov.run_id), (spec.key.hex(), "run".to_string()));

        // A key the spec does not hold is an error, not a run.
        let mut wrong = spec_reading(&cache, up_key, "c");
        wrong.key = Digest::of_bytes(b"other");
        wrong.write(&cache).unwrap();
        let err = run(&wrong.key, &same).unwrap_err().to_string();
        assert!(err.contains("refusing to run"), "{err}");
    }
}
