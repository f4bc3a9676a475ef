//! The engine's commands (`run`, `plan`, `dag`, `status`, `why`, `show`,
//! `gc`, `verify`, `clean`, `kinds`) as a clap subcommand enum the
//! `pipeline` binary flattens into its own CLI.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context as _, bail};
use bytesize::ByteSize;
use clap::{Args, Subcommand};
use pipeline_cache::{Cache, GcOptions};

use crate::env::EngineEnv;
use crate::index::RunIndex;
use crate::plan::graph::{DagError, StageGraph};
use crate::plan::{Action, Plan, PlannedStage, SelectOptions, Selection, make_plan};
use crate::provenance::Provenance;
use crate::recipe::{ExecutorKind, Recipe, RecipeError, load_recipe, resolve_stage_selector};
use crate::run::progress;
use crate::run::scheduler::{Executor, LocalBackend, RunOptions, StageBackend, device_label};
use crate::workspace::{RunStatus, StageStatus, Workspace};
use stage_api::Registry;

/// A mistake in how the command was called (exit code 2, like recipe errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error: 2 for recipe and usage mistakes, 1 otherwise.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|e| e.is::<RecipeError>() || e.is::<UsageError>() || e.is::<DagError>());
    if usage { 2 } else { 1 }
}

#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Cache directory (default: `$PIPELINE_CACHE_DIR`, else `.pipeline/`).
    #[arg(long, env = "PIPELINE_CACHE_DIR", default_value = ".pipeline", value_name = "DIR")]
    pub cache_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RecipeArgs {
    /// Recipe file (TOML).
    pub recipe: PathBuf,
    /// Override a recipe value, e.g. `--set stage.grpo.beta=0.1` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Clone, Args, Default)]
pub struct SelectArgs {
    /// Re-run STAGE even if cached; without a value, re-run every selected
    /// stage. Write it after the recipe (`run r.toml --force`).
    #[arg(long, value_name = "STAGE", num_args = 0..=1, default_missing_value = "")]
    pub force: Option<String>,
    /// Re-run STAGE and everything downstream of it.
    #[arg(long, value_name = "STAGE")]
    pub force_downstream: Vec<String>,
    /// Run only STAGE and what it needs.
    #[arg(long, value_name = "STAGE")]
    pub until: Vec<String>,
    /// Re-run STAGE and everything downstream, plus what they need.
    #[arg(long, value_name = "STAGE")]
    pub from: Vec<String>,
}

impl SelectArgs {
    fn options(&self) -> SelectOptions {
        SelectOptions {
            until: self.until.clone(),
            from: self.from.clone(),
            force: self.force.as_ref().map(|s| if s.is_empty() { None } else { Some(s.clone()) }),
            force_downstream: self.force_downstream.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Maximum stages running at once (default: number of cores; with
    /// `--executor slurm`, jobs in flight, default 64).
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    /// Where stages run (default: the recipe's `[executor] kind`, else local).
    #[arg(long, value_enum, value_name = "KIND")]
    pub executor: Option<ExecutorKind>,
    /// After a failure, keep running stages that do not depend on it.
    #[arg(long)]
    pub keep_going: bool,
    /// Where `runs/` and `outputs/` go (default: the recipe's git repository, else the current directory).
    #[arg(long, env = "PIPELINE_WORKSPACE", value_name = "DIR")]
    pub workspace: Option<PathBuf>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run a recipe: reuse cached stages, run the rest.
    #[command(after_help = "Leaves behind:\n  \
        <workspace>/runs/<UTC time>-<recipe>/summary.json   every stage: status, key, reason, duration, log, error\n  \
        <workspace>/outputs/<recipe>/<stage id>             link to the stage's (read-only) output directory\n  \
        <cache>/logs/<run id>/<stage id>.log                 what each stage logged, and its error chain\n\
        Exit code: 0 all stages ok, 1 a stage failed, 2 recipe or usage error, 130 interrupted.")]
    Run(RunArgs),
    /// Show what `run` would do and why.
    Plan {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[command(flatten)]
        select: SelectArgs,
        /// Machine-readable plan: one JSON object per stage (id, kind,
        /// version, action, full key, provisional, reason, resources, warnings).
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph (text, or Graphviz with --dot).
    Dag {
        /// Recipe file (TOML).
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Graphviz dot output (`pipeline dag r.toml --dot | dot -Tsvg > dag.svg`).
        #[arg(long)]
        dot: bool,
    },
    /// Per stage: cached or not, key, last run, output size.
    Status(RecipeArgs),
    /// Explain why a stage would run (or is cached).
    Why {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Stage id or name (a name selects all its sweep variants).
        stage: String,
    },
    /// Params, key, inputs, outputs and provenance of a stage.
    Show {
        #[command(flatten)]
        recipe: RecipeArgs,
        stage: String,
    },
    /// Delete cached outputs no given recipe references.
    Gc {
        /// Recipes whose current outputs are kept (default: every `*.toml` under `recipes/`).
        recipes: Vec<PathBuf>,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Afterwards evict least recently used outputs until the cache is at most this big (e.g. `10G`).
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Re-hash every blob in the cache; corrupt ones are quarantined.
    Verify {
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Drop cached outputs of stages (or of every stage with --all).
    Clean {
        /// Recipe whose stages are named (not needed with --all alone).
        recipe: Option<PathBuf>,
        /// Stage ids or names.
        stages: Vec<String>,
        /// Every stage of the recipe; without a recipe, the whole cache.
        #[arg(long)]
        all: bool,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Run one stage from its job spec `<cache>/jobs/<KEY>.json` (what a
    /// Slurm job runs; not for direct use).
    #[command(hide = true)]
    ExecStage {
        /// The stage's cache key (64 hex digits).
        key: String,
        #[command(flatten)]
        cache: CacheArgs,
        /// This process's rank in a data-parallel stage (set by the local executor).
        #[arg(long, requires_all = ["world_size", "rendezvous"])]
        rank: Option<usize>,
        /// Ranks of the stage.
        #[arg(long)]
        world_size: Option<usize>,
        /// Directory where the ranks meet.
        #[arg(long)]
        rendezvous: Option<PathBuf>,
        /// Threads of this process.
        #[arg(long)]
        threads: Option<usize>,
        /// `cpu` or `cuda:N`.
        #[arg(long)]
        device: Option<String>,
    },
    /// List the registered stage kinds (or their full recipe reference).
    Kinds {
        /// Print the generated stage reference (Markdown) instead of the list.
        #[arg(long)]
        reference: bool,
        /// Check that FILE's generated stage-reference section matches the
        /// registry (exit 1 if it drifted); with --write, rewrite it instead.
        #[arg(long, value_name = "FILE")]
        doc: Option<PathBuf>,
        /// With --doc: rewrite the section in place.
        #[arg(long, requires = "doc")]
        write: bool,
    },
}

/// Run one engine command.
pub fn execute(cmd: Command, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run(args) => cmd_run(args, registry, env),
        Command::Plan { recipe, select, json } => {
            let (recipe_v, graph, cache) = load(&recipe, registry)?;
            let selection = Selection::build(&recipe_v, &graph, &select.options())?;
            let plan = make_plan(&recipe_v, &graph, &cache, &selection, &env_for(&recipe_v, env, None))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan_json(&plan))?);
            } else {
                print!("{}", render_plan(&plan));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { recipe, sets, dot } => {
            let recipe = load_recipe(&recipe, &sets, registry)?;
            let graph = StageGraph::from_recipe(&recipe)?;
            let kind_of = |id: &str| recipe.stage(id).map(|s| s.kind.kind().to_string()).unwrap_or_default();
            print!("{}", if dot { graph.to_dot(kind_of) } else { graph.to_text(kind_of) });
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => cmd_status(&args, registry, env),
        Command::Why { recipe, stage } => cmd_why(&recipe, &stage, registry, env),
        Command::Show { recipe, stage } => cmd_show(&recipe, &stage, registry, env),
        Command::Gc { recipes, dry_run, max_size, cache } => cmd_gc(recipes, dry_run, max_size, &cache, registry, env),
        Command::Verify { cache } => {
            let cache = open_cache(&cache.cache_dir)?;
            let report = cache.verify().context("verifying the cache")?;
            println!("checked {} blobs ({})", report.blobs_checked, ByteSize(report.bytes_checked));
            for c in &report.corrupt {
                let digest = c.digest.map(|d| d.hex()).unwrap_or_else(|| "?".into());
                println!("corrupt blob {digest}: {} (moved to {})", c.path.display(), c.quarantined_to.display());
            }
            for r in &report.records_removed {
                println!("dropped record {r} (its outputs will be recomputed)");
            }
            if report.is_clean() {
                println!("cache is clean");
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "{} corrupt blob(s), {} record(s) dropped",
                    report.corrupt.len(),
                    report.records_removed.len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Clean { recipe, stages, all, sets, cache } => {
            cmd_clean(recipe, stages, all, &sets, &cache, registry, env)
        }
        Command::ExecStage { key, cache, rank, world_size, rendezvous, threads, device } => {
            let ranks = crate::jobspec::RankArgs { rank, world_size, rendezvous, threads, device };
            crate::jobspec::exec_stage(&key, &cache.cache_dir, registry, env, &ranks)
        }
        Command::Kinds { reference: true, .. } => {
            print!("{}", crate::recipe::docs::render_stage_reference(registry));
            Ok(ExitCode::SUCCESS)
        }
        Command::Kinds { doc: Some(path), write, .. } => cmd_kinds_doc(&path, write, registry),
        Command::Kinds { .. } => {
            let width = registry.kinds().map(str::len).max().unwrap_or(0);
            let mut out = std::io::stdout().lock();
            for kind in registry.iter() {
                let ranks = if kind.distributed() { " [ranks]" } else { "" };
                let line =
                    writeln!(out, "{:<width$}  v{:<3} {}{ranks}", kind.kind(), kind.version(), kind.doc().summary);
                // `pipeline kinds | head`: a closed pipe ends the listing, it is not an error.
                if let Err(e) = line {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        break;
                    }
                    return Err(e.into());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Keep the generated part of the recipe reference in step with the registry.
fn cmd_kinds_doc(path: &Path, write: bool, registry: &Registry) -> anyhow::Result<ExitCode> {
    use crate::recipe::docs::{generated_section, render_stage_reference, update_stage_reference};
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(current) = generated_section(&text) else {
        anyhow::bail!(
            "{} has no generated stage-reference section (BEGIN/END GENERATED STAGE REFERENCE markers)",
            path.display()
        );
    };
    if current == render_stage_reference(registry) {
        println!("{}: stage reference up to date", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    if write {
        let updated = update_stage_reference(&text, registry);
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, updated).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        println!("{}: stage reference rewritten", path.display());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{}: the stage reference drifted from the registry; run `pipeline kinds --doc {} --write`",
            path.display(),
            path.display()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn open_cache(dir: &Path) -> anyhow::Result<Cache> {
    Cache::open(dir).with_context(|| format!("opening the cache at {}", dir.display()))
}

fn load(args: &RecipeArgs, registry: &Registry) -> anyhow::Result<(Recipe, StageGraph, Cache)> {
    let recipe = load_recipe(&args.recipe, &args.sets, registry)?;
    let graph = StageGraph::from_recipe(&recipe)?;
    let cache = open_cache(&args.cache.cache_dir)?;
    Ok((recipe, graph, cache))
}

/// The environment plans are made in: under Slurm each stage sees the GPUs
/// its job gets (keys depend on the device class), not this host's.
fn env_for(recipe: &Recipe, env: &EngineEnv, executor: Option<ExecutorKind>) -> EngineEnv {
    match executor.unwrap_or(recipe.executor.kind) {
        ExecutorKind::Local => env.clone(),
        ExecutorKind::Slurm => crate::backend::slurm::planning_env(recipe, env),
    }
}

/// Process-wide cancel flag, set by Ctrl-C / SIGTERM. A second signal exits at once.
pub(crate) fn cancel_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        let installed = ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("interrupted: waiting for running stages to stop (interrupt again to abort now)");
        });
        if let Err(e) = installed {
            tracing::warn!("cannot install the Ctrl-C handler: {e}");
        }
        flag
    })
    .clone()
}

fn cmd_run(args: RunArgs, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
    let (recipe, graph, cache) = load(&args.recipe, registry)?;
    let kind = args.executor.unwrap_or(recipe.executor.kind);
    let env = &env_for(&recipe, env, Some(kind));
    let selection = Selection::build(&recipe, &graph, &args.select.options())?;
    let plan = make_plan(&recipe, &graph, &cache, &selection, env)?;
    for s in plan.stages.iter().filter(|s| s.action != Action::NotSelected) {
        for w in &s.warnings {
            tracing::warn!("stage `{}`: {w}", s.id);
        }
    }
    let workspace = Workspace::locate(args.workspace.as_deref(), &crate::plan::recipe_dir(&recipe));
    let progress = progress::for_terminal(env.quiet);
    let backend: Box<dyn StageBackend> = match kind {
        ExecutorKind::Local => Box::new(LocalBackend),
        ExecutorKind::Slurm => Box::new(crate::backend::slurm::SlurmBackend::new(recipe.executor.slurm.clone())?),
    };
    let executor = Executor {
        recipe: &recipe,
        graph: &graph,
        cache: &cache,
        env,
        workspace: &workspace,
        progress,
        cancel: cancel_flag(),
        backend: backend.as_ref(),
    };
    let default_jobs = if kind == ExecutorKind::Slurm { crate::backend::slurm::DEFAULT_JOBS } else { env.cores };
    let jobs = args.jobs.unwrap_or(default_jobs).max(1);
    let outcome = executor.run(&plan, &RunOptions { jobs, keep_going: args.keep_going })?;
    let s = &outcome.summary;
    let line = format!(
        "{}: {} ran, {} cached, {} failed, {} skipped, {} not run in {:.1}s; summary: {}",
        s.recipe,
        s.count(StageStatus::Ran),
        s.count(StageStatus::Cached),
        s.count(StageStatus::Failed),
        s.count(StageStatus::Skipped),
        s.count(StageStatus::NotRun),
        s.duration_s,
        outcome.summary_path.display()
    );
    match s.status {
        RunStatus::Succeeded => {
            if !env.quiet {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RunStatus::Failed => {
            eprintln!("{line}");
            for st in s.stages.iter().filter(|st| st.status == StageStatus::Failed) {
                let log = st.log.as_ref().map(|l| format!(" (log: {})", l.display())).unwrap_or_default();
                eprintln!("error: stage `{}` failed{log}", st.id);
                for l in st.error.as_deref().unwrap_or("").lines() {
                    eprintln!("  {l}");
                }
            }
            Ok(ExitCode::FAILURE)
        }
        RunStatus::Cancelled => {
            eprintln!("cancelled; {line}");
            Ok(ExitCode::from(130))
        }
    }
}

fn resources_label(s: &PlannedStage) -> String {
    let cpu = if s.resources.cpu == 0 { "all".to_string() } else { s.resources.cpu.to_string() };
    let ranks = if s.ranks > 1 { format!(" ranks={}", s.ranks) } else { String::new() };
    format!("cpu={cpu} mem={}M dev={}{ranks}", s.resources.memory_mb, device_label(&s.device))
}

/// `plan --json`: what the table shows, plus the full keys.
pub fn plan_json(plan: &Plan) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = plan
        .stages
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "kind": s.kind,
                "version": s.components.version,
                "action": s.action.as_str(),
                "key": s.key.hex(),
                "provisional": s.components.has_pending_inputs(),
                "reason": s.reason,
                "resources": {
                    "cpu": s.resources.cpu,
                    "memory_mb": s.resources.memory_mb,
                    "device": device_label(&s.device),
                    "ranks": s.ranks,
                },
                "warnings": s.warnings,
            })
        })
        .collect();
    serde_json::json!({ "stages": stages })
}

/// The `plan` table.
pub fn render_plan(plan: &Plan) -> String {
    let rows: Vec<[String; 5]> = plan
        .stages
        .iter()
        .map(|s| [s.id.clone(), s.kind.clone(), s.action.as_str().to_string(), resources_label(s), s.reason.clone()])
        .collect();
    let header = ["STAGE", "KIND", "STATUS", "RESOURCES", "REASON"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, r: &[String; 5]| {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    };
    line(&mut out, &header);
    for (r, s) in rows.iter().zip(&plan.stages) {
        line(&mut out, r);
        if s.action != Action::NotSelected {
            for w in &s.warnings {
                let _ = writeln!(out, "  warning: {w}");
            }
        }
    }
    let count = |a: Action| plan.stages.iter().filter(|s| s.action == a).count();
    let _ = writeln!(
        out,
        "{} to run, {} cached, {} not selected",
        count(Action::Run),
        count(Action::Cached),
        count(Action::NotSelected)
    );
    out
}

fn unix_ms_label(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "?".into())
}

fn cmd_status(args: &RecipeArgs, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
    let (recipe, graph, cache) = load(args, registry)?;
    let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
    let index = RunIndex::new(cache.root(), &recipe.name);
    let width = plan.stages.iter().map(|s| s.id.len()).max().unwrap_or(5).max(5);
    println!("{:<width$}  {:<7} {:<16} {:<23} {:>10}", "STAGE", "CACHED", "KEY", "LAST RUN", "SIZE");
    for s in &plan.stages {
        let cached = if s.action == Action::Cached { "yes" } else { "no" };
        let last = index.get(&s.id).map(|e| unix_ms_label(e.recorded_unix_ms)).unwrap_or_else(|| "never".into());
        let size =
            s.record.as_ref().map(|r| ByteSize(r.manifest.total_size()).to_string()).unwrap_or_else(|| "-".into());
        let key = if s.components.has_pending_inputs() { format!("{}*", s.key.short()) } else { s.key.short() };
        println!("{:<width$}  {:<7} {:<16} {:<23} {:>10}", s.id, cached, key, last, size);
    }
    if plan.stages.iter().any(|s| s.components.has_pending_inputs()) {
        println!("* provisional key: an upstream stage has to run first");
    }
    Ok(ExitCode::SUCCESS)
}

fn selected<'p>(recipe: &Recipe, plan: &'p Plan, selector: &str) -> anyhow::Result<Vec<&'p PlannedStage>> {
    let decls = resolve_stage_selector(recipe, selector)?;
    Ok(decls.iter().filter_map(|d| plan.stage(&d.id)).collect())
}

fn cmd_why(args: &RecipeArgs, stage: &str, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
    let (recipe, graph, cache) = load(args, registry)?;
    let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
    let index = RunIndex::new(cache.root(), &recipe.name);
    for s in selected(&recipe, &plan, stage)? {
        println!("{}: {} ({})", s.id, s.action.as_str(), s.reason);
        println!("  key {}{}", s.key.hex(), if s.components.has_pending_inputs() { " (provisional)" } else { "" });
        match index.get(&s.id) {
            Some(prev) => println!(
                "  last run {} with key {} ({})",
                unix_ms_label(prev.recorded_unix_ms),
                prev.key.short(),
                prev.run_id
            ),
            None => println!("  never run with this recipe name"),
        }
        for (name, refs) in &s.components.inputs {
            for r in refs {
                let output = r.output.as_ref().map(|o| format!(".{o}")).unwrap_or_default();
                let pending = if r.pending { " (pending: upstream will run)" } else { "" };
                println!("  input {name} <- {}{output} {}{pending}", r.stage, r.digest.short());
            }
        }
        for e in &s.components.external {
            let d = e.digest.map(|d| d.short()).unwrap_or_else(|| "MISSING".into());
            println!("  external {} {d}", e.path.display());
        }
        for w in &s.warnings {
            println!("  warning: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_show(args: &RecipeArgs, stage: &str, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
    let (recipe, graph, cache) = load(args, registry)?;
    let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
    for s in selected(&recipe, &plan, stage)? {
        println!("stage {} (kind {} v{})", s.id, s.kind, s.components.version);
        println!("status: {} ({})", s.action.as_str(), s.reason);
        println!("key: {}", s.key.hex());
        println!("seed: {}", s.components.seed);
        println!("resources: {}", resources_label(s));
        println!("params: {}", serde_json::to_string_pretty(&crate::plan::canonical::normalize(&s.components.params))?);
        println!("inputs:");
        for (name, refs) in &s.components.inputs {
            for r in refs {
                let output = r.output.as_ref().map(|o| format!(".{o}")).unwrap_or_default();
                let pending = if r.pending { " (pending)" } else { "" };
                println!("  {name} <- {}{output}  {}{pending}", r.stage, r.digest.hex());
            }
        }
        for e in &s.components.external {
            let d = e.digest.map(|d| d.hex()).unwrap_or_else(|| "MISSING".into());
            println!("  external {}  {d}", e.path.display());
        }
        match &s.record {
            Some(rec) => {
                let dir = cache.artifact_dir(&rec.key);
                println!(
                    "outputs: {} ({} files, {})",
                    dir.display(),
                    rec.manifest.files.len(),
                    ByteSize(rec.manifest.total_size())
                );
                for f in &rec.manifest.files {
                    println!("  {:>10}  {}", ByteSize(f.size).to_string(), f.path);
                }
                match Provenance::read(&dir) {
                    Ok(p) => println!("provenance: {}", serde_json::to_string_pretty(&p)?),
                    Err(e) => println!("provenance: unavailable ({e})"),
                }
            }
            None => println!("outputs: not in the cache"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every `*.toml` under `dir`, sorted.
fn recipe_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn cmd_gc(
    recipes: Vec<PathBuf>,
    dry_run: bool,
    max_size: Option<String>,
    cache_args: &CacheArgs,
    registry: &Registry,
    env: &EngineEnv,
) -> anyhow::Result<ExitCode> {
    let max_size = max_size.as_deref().map(parse_size).transpose()?;
    let explicit = !recipes.is_empty();
    let files = if explicit { recipes } else { recipe_files(Path::new("recipes")) };
    let cache = open_cache(&cache_args.cache_dir)?;
    let mut keep = BTreeSet::new();
    let mut loaded = 0;
    for file in &files {
        let recipe = match load_recipe(file, &[], registry) {
            Ok(r) => r,
            // A base file meant only for `extends` may not load on its own.
            Err(e) if !explicit => {
                tracing::warn!(
                    "gc: skipping {} (does not load: {})",
                    file.display(),
                    e.to_string().lines().next().unwrap_or("")
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let graph = StageGraph::from_recipe(&recipe)?;
        let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
        keep.extend(plan.stages.iter().filter_map(|s| s.record.as_ref().map(|r| r.key)));
        loaded += 1;
    }
    if loaded == 0 {
        return Err(UsageError(
            "gc: no recipe loaded, so nothing would be kept; name the recipes to keep (or use `pipeline clean --all`)"
                .into(),
        )
        .into());
    }
    let report = cache.gc(&keep, &GcOptions { dry_run, max_size }).context("collecting garbage")?;
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "kept {} outputs of {loaded} recipe(s); {verb} {} record(s) ({} evicted for --max-size), {} blob(s), {} freed; {} remain",
        keep.len(),
        report.records_removed.len(),
        report.evicted.len(),
        report.blobs_removed,
        ByteSize(report.bytes_freed),
        ByteSize(report.bytes_remaining)
    );
    if !report.skipped_locked.is_empty() {
        println!("{} record(s) spared: in use by a running process", report.skipped_locked.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_clean(
    recipe: Option<PathBuf>,
    stages: Vec<String>,
    all: bool,
    sets: &[String],
    cache_args: &CacheArgs,
    registry: &Registry,
    env: &EngineEnv,
) -> anyhow::Result<ExitCode> {
    let cache = open_cache(&cache_args.cache_dir)?;
    let Some(recipe_path) = recipe else {
        if !all {
            bail!(UsageError("clean: name a recipe and stages, or pass --all".into()));
        }
        let records = cache.records().context("listing cache records")?;
        for r in &records {
            cache.remove_record(&r.key).with_context(|| format!("removing record {}", r.key))?;
        }
        println!("removed {} record(s); run `pipeline gc` to free their blobs", records.len());
        return Ok(ExitCode::SUCCESS);
    };
    if stages.is_empty() && !all {
        bail!(UsageError("clean: name the stages to clean, or pass --all for every stage of the recipe".into()));
    }
    let recipe = load_recipe(&recipe_path, sets, registry)?;
    let graph = StageGraph::from_recipe(&recipe)?;
    let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
    let index = RunIndex::new(cache.root(), &recipe.name);
    let targets: Vec<&PlannedStage> = if all {
        plan.stages.iter().collect()
    } else {
        let mut v = Vec::new();
        for sel in &stages {
            v.extend(selected(&recipe, &plan, sel)?);
        }
        v
    };
    let mut removed = 0;
    for s in targets {
        if let Some(rec) = &s.record {
            cache.remove_record(&rec.key).with_context(|| format!("removing the record of `{}`", s.id))?;
            removed += 1;
            println!("cleaned {}", s.id);
        }
        index.remove(&s.id).with_context(|| format!("removing the run index entry of `{}`", s.id))?;
    }
    println!("removed {removed} record(s); run `pipeline gc` to free their blobs");
    Ok(ExitCode::SUCCESS)
}

/// `--max-size` values: `10G`, `500MiB`, `1.5 TB`, or plain bytes.
fn parse_size(text: &str) -> Result<u64, UsageError> {
    text.trim()
        .parse::<ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| UsageError(format!("--max-size `{text}`: expected a size like 10G or 500MiB ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Command,
    }

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("pipeline").chain(args.iter().copied())).unwrap().cmd
    }

    #[test]
    fn force_with_and_without_a_stage() {
        let Command::Run(all) = parse(&["run", "r.toml", "--force"]) else { panic!("not run") };
        assert_eq!(all.select.options().force, Some(None));
        let Command::Run(one) = parse(&["run", "r.toml", "--force", "sft", "--jobs", "3"]) else { panic!("not run") };
        assert_eq!(one.select.options().force, Some(Some("sft".to_string())));
        assert_eq!(one.jobs, Some(3));
        let Command::Run(none) = parse(&["run", "r.toml", "--set", "a.b=1", "--set", "c=2"]) else { panic!("not run") };
        assert_eq!(none.select.options().force, None);
        assert_eq!(none.recipe.sets, vec!["a.b=1", "c=2"]);
    }

    #[test]
    fn sizes_and_exit_codes() {
        assert_eq!(parse_size("10G").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("500MiB").unwrap(), 500 * 1024 * 1024);
        assert!(parse_size("lots").unwrap_err().to_string().contains("--max-size `lots`"));
        assert_eq!(exit_code_for(&anyhow::Error::new(UsageError("x".into()))), 2);
        assert_eq!(exit_code_for(&anyhow::Error::new(DagError::UnknownStage("x".into())).context("while planning")), 2);
        assert_eq!(exit_code_for(&anyhow::anyhow!("disk full")), 1);
    }
}
