//! What a running stage sees: read-only inputs, an output directory that the
//! engine publishes atomically, a resume directory that outlives failed
//! attempts, seeded RNG streams, a sized rayon pool, the device, progress
//! and metrics sinks, and notes for the run's provenance.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dist::DistInfo;
use crate::resources::Device;

/// One resolved input reference: the upstream stage id, the output name (if
/// the reference named one) and the read-only directory holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub stage: String,
    pub output: Option<String>,
    pub path: PathBuf,
}

/// Receives progress of a stage. The engine plugs in an indicatif bar on a
/// TTY and plain log lines otherwise.
pub trait ProgressSink: Send + Sync {
    /// Start (or restart) a phase with `total` units (0 = unknown).
    fn start(&self, phase: &str, total: u64);
    fn advance(&self, units: u64);
    fn message(&self, msg: &str);
    fn finish(&self);
}

/// Logs progress through `tracing` at most every 10%.
#[derive(Default)]
pub struct LogProgress {
    state: Mutex<(String, u64, u64, u64)>, // phase, total, done, last logged decile
}

impl ProgressSink for LogProgress {
    fn start(&self, phase: &str, total: u64) {
        if let Ok(mut s) = self.state.lock() {
            *s = (phase.to_string(), total, 0, 0);
        }
        tracing::info!(phase, total, "started");
    }
    fn advance(&self, units: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.2 += units;
            if let Some(decile) = (s.2 * 10).checked_div(s.1)
                && decile > s.3
            {
                s.3 = decile;
                tracing::info!(phase = %s.0, done = s.2, total = s.1, "progress");
            }
        }
    }
    fn message(&self, msg: &str) {
        tracing::info!("{msg}");
    }
    fn finish(&self) {}
}

/// Appends one JSON object per line to `metrics.jsonl` in the stage's output.
pub struct MetricsSink {
    file: Mutex<Option<File>>,
    path: PathBuf,
}

impl MetricsSink {
    fn new(path: PathBuf) -> Self {
        Self { file: Mutex::new(None), path }
    }

    /// Record one metrics row (e.g. `{"step": 3, "loss": 0.4}`).
    pub fn record(&self, row: &serde_json::Value) -> anyhow::Result<()> {
        let mut guard = self.file.lock().map_err(|_| anyhow::anyhow!("metrics sink poisoned"))?;
        if guard.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .with_context(|| format!("opening {}", self.path.display()))?;
            *guard = Some(f);
        }
        if let Some(f) = guard.as_mut() {
            serde_json::to_writer(&mut *f, row)?;
            f.write_all(b"\n")?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The context handed to [`StageKind::run`](crate::StageKind::run).
pub struct StageContext {
    stage_id: String,
    inputs: BTreeMap<String, Vec<Artifact>>,
    output_dir: PathBuf,
    scratch_dir: PathBuf,
    resume_dir: PathBuf,
    recipe_dir: PathBuf,
    seed: u64,
    pool: Arc<rayon::ThreadPool>,
    device: Device,
    progress: Arc<dyn ProgressSink>,
    metrics: MetricsSink,
    notes: Mutex<serde_json::Map<String, serde_json::Value>>,
    cancel: Arc<AtomicBool>,
    dist: Option<DistInfo>,
}

impl StageContext {
    pub fn builder(stage_id: impl Into<String>, output_dir: impl Into<PathBuf>) -> StageContextBuilder {
        StageContextBuilder::new(stage_id.into(), output_dir.into())
    }

    pub fn stage_id(&self) -> &str {
        &self.stage_id
    }

    /// The single artifact bound to input `name`.
    pub fn input(&self, name: &str) -> anyhow::Result<&Path> {
        match self.inputs.get(name).map(Vec::as_slice) {
            Some([one]) => Ok(&one.path),
            Some([]) | None => bail!("stage `{}` has no input `{name}`", self.stage_id),
            Some(many) => bail!("stage `{}` input `{name}` has {} artifacts, expected one", self.stage_id, many.len()),
        }
    }

    /// The single artifact bound to `name`, if the optional input was given.
    pub fn optional_input(&self, name: &str) -> anyhow::Result<Option<&Path>> {
        match self.inputs.get(name) {
            None => Ok(None),
            Some(_) => self.input(name).map(Some),
        }
    }

    /// All artifacts bound to input `name` (a `many` input), in recipe order.
    pub fn inputs(&self, name: &str) -> &[Artifact] {
        self.inputs.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Directory to fill with outputs (published atomically on success).
    pub fn output_dir(&self) -> &Path {
        &self.output_dir
    }

    /// Create (if needed) and return the named output sub-directory.
    pub fn output(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.output_dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Private scratch space, deleted after the stage (never published).
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch_dir
    }

    /// Restart state of this stage run: the same directory for every attempt
    /// at the same stage key, kept when an attempt fails or is killed, removed
    /// by the engine once the outputs are published. A long stage writes
    /// checkpoints here (atomically) and picks up the newest on start. The
    /// directory is created on first call.
    pub fn resume_dir(&self) -> anyhow::Result<&Path> {
        std::fs::create_dir_all(&self.resume_dir)
            .with_context(|| format!("creating resume dir {}", self.resume_dir.display()))?;
        Ok(&self.resume_dir)
    }

    /// Directory of the recipe file (relative paths in params resolve here).
    pub fn recipe_dir(&self) -> &Path {
        &self.recipe_dir
    }

    /// Resolve a path param: absolute as is, relative against the recipe dir.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() { path.to_path_buf() } else { self.recipe_dir.join(path) }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// An independent, reproducible RNG stream: the same (seed, stream name)
    /// gives the same numbers on every machine.
    pub fn rng(&self, stream: &str) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(derive_seed(self.seed, stream))
    }

    pub fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn progress(&self) -> &dyn ProgressSink {
        self.progress.as_ref()
    }

    pub fn metrics(&self) -> &MetricsSink {
        &self.metrics
    }

    /// Record a fact about this run that is not part of its result (where
    /// it resumed from, how long its steps took): the engine writes the
    /// notes into `provenance.json` (`notes.<key>`), which stays out of the
    /// artifact's digest, so two runs with the same result publish the same
    /// artifact. Outputs must not hold such facts. A later note replaces an
    /// earlier one with the same key.
    pub fn note(&self, key: &str, value: impl Into<serde_json::Value>) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.insert(key.to_string(), value.into());
        }
    }

    /// The notes recorded so far (see [`note`](Self::note)).
    pub fn notes(&self) -> serde_json::Map<String, serde_json::Value> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Set when the stage runs as one of several data-parallel ranks.
    pub fn dist(&self) -> Option<&DistInfo> {
        self.dist.as_ref()
    }

    /// True for a single-process run and for rank 0, the rank whose outputs
    /// are published (the others' output directories are discarded).
    pub fn is_main_rank(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.rank == 0)
    }

    /// True once the run was interrupted: long loops should stop early.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Error out if cancelled (use at loop heads).
    pub fn check_cancelled(&self) -> anyhow::Result<()> {
        if self.is_cancelled() {
            bail!("stage `{}` cancelled", self.stage_id);
        }
        Ok(())
    }
}

/// A seed for a named stream, derived with blake3 so streams never collide.
pub fn derive_seed(seed: u64, stream: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(stream.as_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Builds a [`StageContext`]; used by the engine and by stage unit tests.
pub struct StageContextBuilder {
    stage_id: String,
    output_dir: PathBuf,
    scratch_dir: Option<PathBuf>,
    resume_dir: Option<PathBuf>,
    recipe_dir: PathBuf,
    inputs: BTreeMap<String, Vec<Artifact>>,
    seed: u64,
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    device: Device,
    progress: Option<Arc<dyn ProgressSink>>,
    cancel: Option<Arc<AtomicBool>>,
    dist: Option<DistInfo>,
}

impl StageContextBuilder {
    fn new(stage_id: String, output_dir: PathBuf) -> Self {
        Self {
            stage_id,
            output_dir,
            scratch_dir: None,
            resume_dir: None,
            recipe_dir: PathBuf::from("."),
            inputs: BTreeMap::new(),
            seed: 0,
            threads: 1,
            pool: None,
            device: Device::Cpu,
            progress: None,
            cancel: None,
            dist: None,
        }
    }
    /// Bind one artifact to input `name` (call repeatedly for `many` inputs).
    pub fn input(mut self, name: &str, stage: &str, output: Option<&str>, path: impl Into<PathBuf>) -> Self {
        self.inputs.entry(name.to_string()).or_default().push(Artifact {
            stage: stage.to_string(),
            output: output.map(str::to_string),
            path: path.into(),
        });
        self
    }
    pub fn scratch_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.scratch_dir = Some(dir.into());
        self
    }
    /// Where the stage keeps restart state (default: `<output_dir>.resume`).
    pub fn resume_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.resume_dir = Some(dir.into());
        self
    }
    pub fn recipe_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.recipe_dir = dir.into();
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }
    pub fn pool(mut self, pool: Arc<rayon::ThreadPool>) -> Self {
        self.pool = Some(pool);
        self
    }
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
    pub fn progress(mut self, progress: Arc<dyn ProgressSink>) -> Self {
        self.progress = Some(progress);
        self
    }
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
    /// Run as one rank of a data-parallel group.
    pub fn dist(mut self, dist: Option<DistInfo>) -> Self {
        self.dist = dist;
        self
    }

    pub fn build(self) -> anyhow::Result<StageContext> {
        std::fs::create_dir_all(&self.output_dir)
            .with_context(|| format!("creating output dir {}", self.output_dir.display()))?;
        let scratch_dir = match self.scratch_dir {
            Some(d) => d,
            None => self.output_dir.with_extension("scratch"),
        };
        std::fs::create_dir_all(&scratch_dir)
            .with_context(|| format!("creating scratch dir {}", scratch_dir.display()))?;
        let resume_dir = self.resume_dir.unwrap_or_else(|| self.output_dir.with_extension("resume"));
        let pool = match self.pool {
            Some(p) => p,
            None => Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(self.threads)
                    .thread_name(|i| format!("stage-worker-{i}"))
                    .build()
                    .context("building the stage thread pool")?,
            ),
        };
        let metrics = MetricsSink::new(self.output_dir.join("metrics.jsonl"));
        Ok(StageContext {
            stage_id: self.stage_id,
            inputs: self.inputs,
            output_dir: self.output_dir,
            scratch_dir,
            resume_dir,
            recipe_dir: self.recipe_dir,
            seed: self.seed,
            pool,
            device: self.device,
            progress: self.progress.unwrap_or_else(|| Arc::new(LogProgress::default())),
            metrics,
            notes: Mutex::new(serde_json::Map::new()),
            cancel: self.cancel.unwrap_or_default(),
            dist: self.dist,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn rng_streams_are_reproducible_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StageContext::builder("s", dir.path().join("out")).seed(17).build().unwrap();
        let a: u64 = ctx.rng("a").random();
        let a2: u64 = ctx.rng("a").random();
        let b: u64 = ctx.rng("b").random();
        assert_eq!(a, a2);
        assert_ne!(a, b);
    }

    #[test]
    fn input_lookup_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StageContext::builder("s", dir.path().join("out"))
            .input("data", "up", None, "/x")
            .input("evals", "e1", None, "/e1")
            .input("evals", "e2", Some("test"), "/e2")
            .build()
            .unwrap();
        assert_eq!(ctx.input("data").unwrap(), Path::new("/x"));
        assert!(ctx.input("missing").unwrap_err().to_string().contains("no input `missing`"));
        assert!(ctx.input("evals").unwrap_err().to_string().contains("2 artifacts"));
        assert_eq!(ctx.inputs("evals").len(), 2);
    }

    #[test]
    fn notes_keep_the_last_value_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StageContext::builder("s", dir.path().join("out")).build().unwrap();
        assert!(ctx.notes().is_empty());
        ctx.note("resumed_from_step", 3);
        ctx.note("timing", serde_json::json!({"steps": 2}));
        ctx.note("resumed_from_step", 6);
        let notes = ctx.notes();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes["resumed_from_step"], 6);
        assert_eq!(notes["timing"]["steps"], 2);
    }

    #[test]
    fn metrics_rows_append_as_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StageContext::builder("s", dir.path().join("out")).build().unwrap();
        ctx.metrics().record(&serde_json::json!({"step": 1, "loss": 0.5})).unwrap();
        ctx.metrics().record(&serde_json::json!({"step": 2, "loss": 0.25})).unwrap();
        let text = std::fs::read_to_string(ctx.metrics().path()).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
