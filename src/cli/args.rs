//! The engine's commands as clap argument structs (`run plan dag status why
//! show gc verify clean kinds`, and the hidden `exec-stage` a Slurm job or
//! a data-parallel rank runs); `main.rs` flattens [`Command`] into its CLI.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use pipeline_engine::plan::SelectOptions;
use pipeline_engine::recipe::ExecutorKind;

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
    pub fn options(&self) -> SelectOptions {
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
    pub executor: Option<ExecutorArg>,
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

/// `--executor`: the recipe's `[executor] kind` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorArg {
    /// Threads of this process, within this machine's cores, memory and GPUs.
    Local,
    /// One `sbatch` job per stage, against a cache on a shared filesystem.
    Slurm,
}

impl From<ExecutorArg> for ExecutorKind {
    fn from(arg: ExecutorArg) -> Self {
        match arg {
            ExecutorArg::Local => ExecutorKind::Local,
            ExecutorArg::Slurm => ExecutorKind::Slurm,
        }
    }
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
}
