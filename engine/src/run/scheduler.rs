//! Runs a [`Plan`]: one scheduling loop (dependencies, `--jobs`,
//! `--keep-going`, cancellation, run summary) over a [`Backend`] that
//! executes each ready stage from a worker thread with its own log file.
//! The stage's final key is derived here, once its upstreams have
//! published ([`final_components`]); the run index and the `outputs/` links
//! are kept up to date as stages finish.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use pipeline_cache::{ActionRecord, Cache};
use stage_api::{Artifact, DeviceRequest, MemoryEstimate, Resources};

use super::progress::RunProgress;
use super::resources::{Capacity, Grant};
use super::stage_run::{RunOrigin, cached_artifact};
use crate::backend::interface::{Backend, ReadyStage, RunCtx};
use crate::env::EngineEnv;
use crate::index::{IndexEntry, RunIndex, file_safe, now_unix_ms};
use crate::plan::components::final_components;
use crate::plan::memory::{UpstreamOutput, plan_device, plan_view_inputs, predict, resources_with};
use crate::plan::{Action, KeyComponents, Plan, PlannedStage, StageGraph};
use crate::provenance::{git_revision, rfc3339};
use crate::recipe::{Recipe, StageDecl};
use crate::stage_log::{StageLogs, log_key, stage_span};
use crate::workspace::{RunStatus, RunSummary, StageStatus, StageSummary, Workspace};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Maximum stages running at once.
    pub jobs: usize,
    /// Keep running independent branches after a failure.
    pub keep_going: bool,
}

/// Everything a run needs besides the plan.
pub struct Scheduler<'a> {
    pub recipe: &'a Recipe,
    pub graph: &'a StageGraph,
    pub cache: &'a Cache,
    pub env: &'a EngineEnv,
    pub workspace: &'a Workspace,
    pub progress: Arc<dyn RunProgress>,
    /// Set on Ctrl-C / SIGTERM: no new stage starts, running ones are told.
    pub cancel: Arc<AtomicBool>,
    /// Where ready stages run (this process, or Slurm jobs).
    pub backend: &'a dyn Backend,
}

/// The result of a run.
#[derive(Debug)]
pub struct RunOutcome {
    pub summary: RunSummary,
    pub summary_path: PathBuf,
    pub run_dir: PathBuf,
}

enum State {
    Waiting,
    Running,
    Done { record: ActionRecord, status: StageStatus, duration_s: f64 },
    Failed { error: String, duration_s: f64 },
    Skipped(String),
    NotSelected,
}

/// What a stage's worker thread reports.
struct Finished {
    record: ActionRecord,
    components: KeyComponents,
    status: StageStatus,
}

struct Job<'p> {
    planned: &'p PlannedStage,
    decl: &'p StageDecl,
    grant: Grant,
    /// Final records of the upstream stages this one reads.
    upstream: HashMap<String, ActionRecord>,
    log_path: PathBuf,
}

impl Scheduler<'_> {
    /// The planned resources, or, when the plan could not predict the
    /// memory because an input was still to come, a prediction from the
    /// upstreams' published outputs (they are all done by now).
    fn resources_now(
        &self,
        planned: &PlannedStage,
        decl: &StageDecl,
        upstreams: &[usize],
        states: &[State],
        stages: &[PlannedStage],
    ) -> Resources {
        if !matches!(planned.memory, MemoryEstimate::Unknown { .. }) {
            return planned.resources;
        }
        let published: HashMap<&str, (&ActionRecord, &PlannedStage)> = upstreams
            .iter()
            .filter_map(|&u| match &states[u] {
                State::Done { record, .. } => Some((stages[u].id.as_str(), (record, &stages[u]))),
                _ => None,
            })
            .collect();
        let inputs = plan_view_inputs(decl, &|up: &str| {
            published.get(up).map(|(rec, p)| {
                UpstreamOutput::Published(self.cache.artifact_dir(&rec.key), p.plan_output.facts.clone())
            })
        });
        let (estimate, _) = predict(decl, &inputs, planned.ranks, plan_device(&planned.device), self.recipe.dir());
        if let Some(p) = estimate.prediction() {
            tracing::info!(
                "stage `{}`: predicted memory per rank now that its inputs exist: host {}{}",
                planned.id,
                stage_api::memory::gib(p.host_peak_bytes()),
                p.gpu_peak_bytes().map(|g| format!(", GPU {}", stage_api::memory::gib(g))).unwrap_or_default()
            );
        }
        resources_with(decl.stage.resources(), &estimate, planned.ranks)
    }

    pub fn run(&self, plan: &Plan, opts: &RunOptions) -> anyhow::Result<RunOutcome> {
        let started = chrono::Utc::now();
        let clock = Instant::now();
        let (run_id, run_dir) = self.workspace.create_run_dir(&self.recipe.name).with_context(|| {
            format!("creating a run directory under {}", self.workspace.root.join("runs").display())
        })?;
        let logs_dir = self.cache.root().join("logs").join(&run_id);
        let index = RunIndex::new(self.cache.root(), &self.recipe.name);
        let git_rev = git_revision(self.recipe.dir());
        let ctx = RunCtx {
            cache: self.cache,
            recipe_dir: self.recipe.dir(),
            progress: self.progress.as_ref(),
            cancel: &self.cancel,
        };
        let decls: HashMap<&str, &StageDecl> = self.recipe.stages.iter().map(|s| (s.id.as_str(), s)).collect();

        let n = plan.stages.len();
        let pos: HashMap<&str, usize> = plan.stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
        let mut upstreams: Vec<Vec<usize>> = Vec::with_capacity(n);
        for s in &plan.stages {
            let ups = self.graph.upstream(&s.id)?;
            upstreams.push(ups.iter().filter_map(|u| pos.get(u).copied()).collect());
        }
        let mut states: Vec<State> = plan
            .stages
            .iter()
            .map(|s| match s.action {
                Action::NotSelected => State::NotSelected,
                _ => State::Waiting,
            })
            .collect();
        let mut logs: Vec<Option<PathBuf>> = vec![None; n];

        // Stages the plan found cached are done before anything starts.
        for (i, s) in plan.stages.iter().enumerate() {
            if let (Action::Cached, Some(record)) = (s.action, &s.record) {
                self.finish_ok(&index, &run_id, s, record, &s.components);
                self.progress.println(&format!("cached  {}", s.id));
                states[i] = State::Done { record: record.clone(), status: StageStatus::Cached, duration_s: 0.0 };
            }
        }

        let mut pool = self.backend.resource_pool(Capacity {
            cores: self.env.cores,
            memory_mb: self.env.memory_mb,
            cuda_devices: self.env.cuda_devices,
            jobs: opts.jobs,
        });
        let mut any_failed = false;
        let (tx, rx) = mpsc::channel::<(usize, Grant, f64, anyhow::Result<Finished>)>();

        std::thread::scope(|scope| -> anyhow::Result<()> {
            loop {
                let stopping = self.cancel.load(Ordering::SeqCst) || (any_failed && !opts.keep_going);
                // Dependents of failed stages will never run (after a
                // cancellation they are simply not run).
                for i in 0..n {
                    if !self.cancel.load(Ordering::SeqCst)
                        && matches!(states[i], State::Waiting)
                        && let Some(&bad) = upstreams[i]
                            .iter()
                            .find(|&&u| matches!(states[u], State::Failed { .. } | State::Skipped(_)))
                    {
                        states[i] = State::Skipped(format!("upstream `{}` failed", plan.stages[bad].id));
                    }
                }
                if !stopping {
                    for i in 0..n {
                        if !matches!(states[i], State::Waiting)
                            || !upstreams[i].iter().all(|&u| matches!(states[u], State::Done { .. }))
                        {
                            continue;
                        }
                        let planned = &plan.stages[i];
                        let Some(decl) = decls.get(planned.id.as_str()).copied() else {
                            bail!("stage `{}` is planned but not in the recipe", planned.id);
                        };
                        let device = match &planned.device {
                            Ok(d) => *d,
                            Err(e) => {
                                states[i] = State::Failed { error: e.clone(), duration_s: 0.0 };
                                any_failed = true;
                                self.progress.println(&format!("FAILED  {}: {e}", planned.id));
                                continue;
                            }
                        };
                        let ranks = planned.ranks;
                        if device == DeviceRequest::Cuda && !pool.is_cluster() && ranks > self.env.cuda_devices {
                            let error = format!(
                                "stage `{}` runs as {ranks} ranks on CUDA, one device each, but this machine has {}",
                                planned.id, self.env.cuda_devices
                            );
                            self.progress.println(&format!("FAILED  {}: {error}", planned.id));
                            states[i] = State::Failed { error, duration_s: 0.0 };
                            any_failed = true;
                            continue;
                        }
                        let resources = self.resources_now(planned, decl, &upstreams[i], &states, &plan.stages);
                        let Some(grant) = pool.try_acquire_ranks(&resources, device, ranks) else { continue };
                        let mut upstream = HashMap::new();
                        for &u in &upstreams[i] {
                            if let State::Done { record, .. } = &states[u] {
                                upstream.insert(plan.stages[u].id.clone(), record.clone());
                            }
                        }
                        let log_path = logs_dir.join(format!("{}.log", file_safe(&planned.id)));
                        if let Err(e) = StageLogs::global().open(&log_key(&run_id, &planned.id), &log_path) {
                            tracing::warn!("cannot open stage log {}: {e}", log_path.display());
                        }
                        logs[i] = Some(log_path.clone());
                        states[i] = State::Running;
                        self.progress.println(&format!("run     {}  ({})", planned.id, planned.reason));
                        let job = Job { planned, decl, grant, upstream, log_path };
                        let tx = tx.clone();
                        let git_rev = git_rev.clone();
                        let run_id = run_id.clone();
                        let ctx = &ctx;
                        scope.spawn(move || {
                            let t0 = Instant::now();
                            let result = self.run_stage(ctx, &job, &run_id, git_rev);
                            let _ = tx.send((i, job.grant, t0.elapsed().as_secs_f64(), result));
                        });
                    }
                }
                if pool.running() == 0 {
                    break;
                }
                let (i, grant, duration_s, result) = match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(msg) => msg,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => bail!("stage worker channel closed"),
                };
                pool.release(&grant);
                let planned = &plan.stages[i];
                match result {
                    Ok(done) => {
                        self.finish_ok(&index, &run_id, planned, &done.record, &done.components);
                        let verb = if done.status == StageStatus::Ran { "done  " } else { "cached" };
                        self.progress.println(&format!("{verb}  {}  {:.1}s", planned.id, duration_s));
                        states[i] = State::Done { record: done.record, status: done.status, duration_s };
                    }
                    Err(e) => {
                        let chain = error_chain(&e);
                        StageLogs::global().write_line(&log_key(&run_id, &planned.id), &format!("error: {chain}"));
                        let log = logs[i].as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default();
                        self.progress.println(&format!(
                            "FAILED  {}  (log: {log})\n  {}",
                            planned.id,
                            chain.replace('\n', "\n  ")
                        ));
                        states[i] = State::Failed { error: chain, duration_s };
                        any_failed = true;
                    }
                }
                StageLogs::global().close(&log_key(&run_id, &planned.id));
            }
            Ok(())
        })?;

        let cancelled = self.cancel.load(Ordering::SeqCst);
        let stages: Vec<StageSummary> = plan
            .stages
            .iter()
            .zip(states)
            .enumerate()
            .map(|(i, (planned, state))| {
                let mut s = StageSummary {
                    id: planned.id.clone(),
                    kind: planned.kind.clone(),
                    status: StageStatus::NotRun,
                    key: None,
                    reason: planned.reason.clone(),
                    duration_s: 0.0,
                    log: logs[i].clone(),
                    output: None,
                    error: None,
                };
                match state {
                    State::Done { record, status, duration_s } => {
                        s.status = status;
                        s.key = Some(record.key.hex());
                        s.duration_s = duration_s;
                        s.output = Some(self.cache.artifact_dir(&record.key));
                    }
                    State::Failed { error, duration_s } => {
                        s.status = StageStatus::Failed;
                        s.error = Some(error);
                        s.duration_s = duration_s;
                    }
                    State::Skipped(why) => {
                        s.status = StageStatus::Skipped;
                        s.error = Some(why);
                    }
                    State::NotSelected => s.status = StageStatus::NotSelected,
                    State::Waiting | State::Running => s.status = StageStatus::NotRun,
                }
                s
            })
            .collect();
        let status = if cancelled {
            RunStatus::Cancelled
        } else if stages
            .iter()
            .any(|s| matches!(s.status, StageStatus::Failed | StageStatus::Skipped | StageStatus::NotRun))
        {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
        let summary = RunSummary {
            run_id,
            recipe: self.recipe.name.clone(),
            recipe_path: self.recipe.path.clone(),
            recipe_digest: self.recipe.digest.clone(),
            started: rfc3339(started),
            finished: rfc3339(chrono::Utc::now()),
            duration_s: clock.elapsed().as_secs_f64(),
            status,
            stages,
        };
        let summary_path =
            summary.write(&run_dir).with_context(|| format!("writing the run summary in {}", run_dir.display()))?;
        Ok(RunOutcome { summary, summary_path, run_dir })
    }

    /// Book-keeping for a stage whose outputs exist: the run index entry
    /// and the `outputs/` link (both best effort: the outputs are safe in the cache).
    fn finish_ok(
        &self,
        index: &RunIndex,
        run_id: &str,
        planned: &PlannedStage,
        record: &ActionRecord,
        comps: &KeyComponents,
    ) {
        let entry = IndexEntry {
            key: record.key,
            components: comps.clone(),
            recorded_unix_ms: now_unix_ms(),
            run_id: run_id.to_string(),
        };
        if let Err(e) = index.put(&planned.id, &entry) {
            tracing::warn!("cannot update the run index for `{}`: {e}", planned.id);
        }
        let target = self.cache.artifact_dir(&record.key);
        if let Err(e) = self.workspace.link_output(&self.recipe.name, &planned.id, &target) {
            tracing::warn!("cannot link outputs of `{}`: {e}", planned.id);
        }
    }

    /// Runs in the stage's worker thread: the final key, then the backend.
    fn run_stage(
        &self,
        ctx: &RunCtx<'_>,
        job: &Job<'_>,
        run_id: &str,
        git_rev: Option<String>,
    ) -> anyhow::Result<Finished> {
        let id = &job.planned.id;
        let span = stage_span(run_id, id);
        let _entered = span.enter();
        let components = final_components(self.recipe, job.decl, self.cache, self.env, &job.upstream)?;
        let key = components.key();
        let mut inputs: BTreeMap<String, Vec<Artifact>> = BTreeMap::new();
        for (name, refs) in &job.decl.inputs {
            for r in refs {
                let record =
                    job.upstream.get(&r.stage).ok_or_else(|| anyhow!("upstream `{}` has no output record", r.stage))?;
                inputs.entry(name.clone()).or_default().push(cached_artifact(
                    self.cache,
                    &record.key,
                    &r.stage,
                    r.output.as_deref(),
                ));
            }
        }
        let ready = ReadyStage {
            planned: job.planned,
            decl: job.decl,
            grant: job.grant,
            components: &components,
            key,
            inputs,
            upstream: &job.upstream,
            origin: RunOrigin {
                recipe_name: self.recipe.name.clone(),
                recipe_path: self.recipe.path.clone(),
                recipe_digest: self.recipe.digest.clone(),
                git_revision: git_rev,
                run_id: run_id.to_string(),
                log: job.log_path.clone(),
                meta: serde_json::Map::new(),
            },
        };
        let (record, status) = self.backend.execute(ctx, &ready)?;
        Ok(Finished { record, components, status })
    }
}

/// `error`, then one "caused by" line per source.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut lines = vec![e.to_string()];
    lines.extend(e.chain().skip(1).map(|c| format!("caused by: {c}")));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local::LocalBackend;
    use crate::plan::{Selection, make_plan};
    use stage_api::{InputSpec, LogProgress, ProgressSink, Registry, StageContext, StageKind};

    /// Run-level lines go nowhere; stage progress to the log.
    struct Quiet;
    impl RunProgress for Quiet {
        fn stage_sink(&self, _stage_id: &str) -> Arc<dyn ProgressSink> {
            Arc::new(LogProgress::default())
        }
        fn println(&self, _line: &str) {}
    }

    struct Boom;
    #[derive(Debug, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct BoomParams {
        /// Panic instead of writing.
        panic: bool,
        /// Written to out.txt.
        text: String,
    }
    impl StageKind for Boom {
        type Params = BoomParams;
        const KIND: &'static str = "boom";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        fn inputs() -> &'static [InputSpec] {
            const I: &[InputSpec] = &[InputSpec::optional("up", "upstream")];
            I
        }
        fn run(p: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
            assert!(!p.panic, "deliberate panic");
            let upstream = match ctx.optional_input("up")? {
                Some(dir) => std::fs::read_to_string(dir.join("out.txt"))?,
                None => String::new(),
            };
            std::fs::write(ctx.output_dir().join("out.txt"), upstream + &p.text)?;
            Ok(())
        }
    }

    /// Plan and run `src` on a CPU-only machine; returns the first stage's
    /// plan warnings and the run summary.
    fn run_recipe(registry: &Registry, src: &str, dir: &Path, opts: &RunOptions) -> (String, RunSummary) {
        let recipe = crate::recipe::load_recipe_str(src, &dir.join("r.toml"), &[], registry).unwrap();
        let graph = StageGraph::from_recipe(&recipe).unwrap();
        let cache = Cache::open(&dir.join("cache")).unwrap();
        let env = EngineEnv { cuda_devices: 0, stage_gpus: None, cores: 2, memory_mb: 1024, gpu_memory_mb: None };
        let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env).unwrap();
        let warnings = plan.stages[0].warnings.join("; ");
        let workspace = Workspace { root: dir.to_path_buf() };
        let exec = Scheduler {
            recipe: &recipe,
            graph: &graph,
            cache: &cache,
            env: &env,
            workspace: &workspace,
            progress: Arc::new(Quiet),
            cancel: Arc::new(AtomicBool::new(false)),
            backend: &LocalBackend,
        };
        (warnings, exec.run(&plan, opts).unwrap().summary)
    }

    fn run(src: &str, dir: &Path) -> RunSummary {
        let registry = Registry::new().register::<Boom>();
        run_recipe(&registry, src, dir, &RunOptions { jobs: 2, keep_going: true }).1
    }

    fn status(s: &RunSummary, id: &str) -> StageStatus {
        s.stages.iter().find(|x| x.id == id).unwrap().status
    }

    #[test]
    fn a_panicking_stage_is_a_failure_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let src = "[recipe]\nname = \"p\"\n[stage.bad]\nkind = \"boom\"\npanic = true\n[stage.after]\nkind = \"boom\"\nup = \"bad\"\n[stage.ok]\nkind = \"boom\"\ntext = \"hi\"\n";
        let s = run(src, dir.path());
        assert_eq!(s.status, RunStatus::Failed);
        assert_eq!(status(&s, "bad"), StageStatus::Failed);
        assert_eq!(status(&s, "after"), StageStatus::Skipped);
        assert_eq!(status(&s, "ok"), StageStatus::Ran);
        let bad = s.stages.iter().find(|x| x.id == "bad").unwrap();
        assert!(bad.error.as_deref().unwrap().contains("panicked: deliberate panic"), "{bad:?}");
    }

    #[test]
    fn identical_upstream_output_lets_downstream_reuse_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let src = "[recipe]\nname = \"c\"\n[stage.a]\nkind = \"boom\"\ntext = \"same\"\n[stage.b]\nkind = \"boom\"\nup = \"a\"\ntext = \"!\"\n";
        let first = run(src, dir.path());
        assert_eq!((status(&first, "a"), status(&first, "b")), (StageStatus::Ran, StageStatus::Ran));
        // Drop a's record only: a reruns, produces the same bytes, and b is
        // then found in the cache (its key depends on a's content, not on a's run).
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let a_key: pipeline_cache::Digest = first.stages[0].key.as_deref().unwrap().parse().unwrap();
        cache.remove_record(&a_key).unwrap();
        let second = run(src, dir.path());
        assert_eq!((status(&second, "a"), status(&second, "b")), (StageStatus::Ran, StageStatus::Cached));
        let out = std::fs::read_to_string(second.stages[1].output.as_ref().unwrap().join("out.txt")).unwrap();
        assert_eq!(out, "same!");
    }

    #[test]
    fn a_missing_named_output_fails_the_reader_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = "[recipe]\nname = \"m\"\n[stage.a]\nkind = \"boom\"\n[stage.b]\nkind = \"boom\"\nup = \"a.train\"\n";
        let s = run(src, dir.path());
        assert_eq!(status(&s, "a"), StageStatus::Ran);
        let b = s.stages.iter().find(|x| x.id == "b").unwrap();
        assert_eq!(b.status, StageStatus::Failed);
        let err = b.error.as_deref().unwrap();
        assert!(err.contains("stage `b`: input `up`") && err.contains("stage `a` has no output `train`"), "{err}");
    }

    /// Asks for a CUDA device; records which device it got.
    struct Gpu;
    impl StageKind for Gpu {
        type Params = BoomParams;
        const KIND: &'static str = "gpu";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        fn resources(_p: &Self::Params) -> stage_api::Resources {
            stage_api::Resources { cpu: 1, device: DeviceRequest::Cuda, memory_mb: 1, libtorch: false }
        }
        fn run(_p: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
            std::fs::write(ctx.output_dir().join("device.txt"), format!("{:?}", ctx.device()))?;
            Ok(())
        }
    }

    #[test]
    fn cuda_without_a_gpu_fails_the_stage_unless_cpu_fallback_is_allowed() {
        let registry = Registry::new().register::<Gpu>();
        for (fallback, expect) in [(false, StageStatus::Failed), (true, StageStatus::Ran)] {
            let dir = tempfile::tempdir().unwrap();
            let src =
                format!("[recipe]\nname = \"g\"\nallow_cpu_fallback = {fallback}\n[stage.train]\nkind = \"gpu\"\n");
            let opts = RunOptions { jobs: 1, keep_going: false };
            let (warning, summary) = run_recipe(&registry, &src, dir.path(), &opts);
            assert_eq!(summary.stages[0].status, expect, "{summary:?}");
            if fallback {
                assert!(warning.contains("running on the CPU"), "{warning}");
                let out = summary.stages[0].output.as_ref().unwrap().join("device.txt");
                assert_eq!(std::fs::read_to_string(out).unwrap(), "Cpu");
            } else {
                assert!(warning.contains("stage `train` requests a CUDA device"), "{warning}");
                assert!(summary.stages[0].error.as_deref().unwrap().contains("stage `train` requests a CUDA device"));
            }
        }
    }

    /// Fails on its first attempt; every attempt counts itself in the resume dir.
    struct Flaky;
    impl StageKind for Flaky {
        type Params = BoomParams;
        const KIND: &'static str = "flaky";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        fn run(_p: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
            let counter = ctx.resume_dir()?.join("attempts");
            let attempts = std::fs::read_to_string(&counter).map(|s| s.len()).unwrap_or(0) + 1;
            std::fs::write(&counter, "x".repeat(attempts))?;
            anyhow::ensure!(attempts > 1, "first attempt fails");
            std::fs::write(ctx.output_dir().join("out.txt"), attempts.to_string())?;
            Ok(())
        }
    }

    #[test]
    fn resume_dir_survives_a_failed_attempt_and_is_removed_after_publishing() {
        let registry = Registry::new().register::<Flaky>();
        let dir = tempfile::tempdir().unwrap();
        let src = "[recipe]\nname = \"f\"\n[stage.train]\nkind = \"flaky\"\n";
        let opts = RunOptions { jobs: 1, keep_going: false };
        let (_, first) = run_recipe(&registry, src, dir.path(), &opts);
        assert_eq!(first.stages[0].status, StageStatus::Failed);
        let resume_root = dir.path().join("cache/resume");
        assert_eq!(std::fs::read_dir(&resume_root).unwrap().count(), 1, "state of the failed attempt is kept");
        let (_, second) = run_recipe(&registry, src, dir.path(), &opts);
        assert_eq!(second.stages[0].status, StageStatus::Ran);
        let out = second.stages[0].output.as_ref().unwrap().join("out.txt");
        assert_eq!(std::fs::read_to_string(out).unwrap(), "2", "the second attempt saw the first one's state");
        assert_eq!(std::fs::read_dir(&resume_root).unwrap().count(), 0, "removed once published");
    }
}
