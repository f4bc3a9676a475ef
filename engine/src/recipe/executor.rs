//! The `[executor]` table: where the stages of a run execute.
//!
//! ```toml
//! [executor]
//! kind = "slurm"            # or "local" (the default)
//! partition = "gpu"
//! account = "lab"
//! time = "02:00:00"
//! qos = "normal"
//! extra_args = ["--constraint=a100"]
//! poll_interval = 10         # seconds between squeue/sacct polls
//! max_resubmits = 2          # lost jobs (NODE_FAIL, PREEMPTED, vanished) resubmitted
//! log_dir = "/shared/logs"   # default: <cache>/logs/<run id>/slurm
//! gpu_memory_gb = 96         # memory of one GPU where stages run (GiB): `plan` warns
//!                            # before anything runs when a stage will not fit
//!
//! [executor.stage.sft]       # per-stage overrides of the stage's own resources
//! ranks = 8                  # data-parallel processes (kinds that support it; both executors)
//! cpus = 16                  # per rank
//! gpus = 1                   # per rank
//! mem = "64G"                # per job (Slurm)
//! time = "1-00:00:00"
//! ```
//!
//! The job-wide Slurm settings fill the Slurm backend's own
//! [`SlurmConfig`](crate::backend::slurm::config::SlurmConfig) (plain data that imports nothing of the engine), so a
//! typo in them is a located recipe error like any other.
//!
//! Nothing here enters a cache key: the same stage run locally or on Slurm,
//! as one rank or eight, has the same key (data-parallel ranks compute the
//! single-process result up to float rounding; provenance records `ranks`).

use std::path::PathBuf;

use super::decl::{ExecutorConfig, ExecutorKind, StageDecl, StageOverride};
use super::error::RecipeError;
use super::source::{Origin, SourceMap};
use super::tree::{Node, NodeValue, Table};
use crate::backend::slurm::config::{parse_mem_mb, valid_slurm_time};
use stage_api::params::did_you_mean;

const EXECUTOR_KEYS: &[&str] = &[
    "kind",
    "partition",
    "account",
    "time",
    "qos",
    "extra_args",
    "poll_interval",
    "max_resubmits",
    "log_dir",
    "gpu_memory_gb",
    "stage",
];
const STAGE_KEYS: &[&str] = &["ranks", "cpus", "gpus", "mem", "time"];

fn unknown_key(sources: &SourceMap, origin: &Origin, key: &str, table: &str, known: &[&str]) -> RecipeError {
    let hint = did_you_mean(key, known.iter().copied())
        .map(|b| format!("did you mean `{b}`?"))
        .unwrap_or_else(|| format!("`{table}` accepts: {}", known.join(", ")));
    RecipeError::at(sources, origin, format!("unknown key `{key}` in `{table}`")).with_help(hint)
}

fn expected(sources: &SourceMap, node: &Node, what: &str, wanted: &str) -> RecipeError {
    RecipeError::at(sources, &node.origin, format!("`{what}` must be {wanted}, found {}", node.type_name()))
}

fn string(sources: &SourceMap, node: &Node, what: &str) -> Result<String, RecipeError> {
    node.as_str().map(str::to_string).ok_or_else(|| expected(sources, node, what, "a string"))
}

fn count(sources: &SourceMap, node: &Node, what: &str) -> Result<u64, RecipeError> {
    match node.value {
        NodeValue::Scalar(toml::Value::Integer(n)) if n >= 0 => Ok(n as u64),
        _ => Err(expected(sources, node, what, "a non-negative integer")),
    }
}

/// Sanity bounds of the executor's counts: far above any real job, low
/// enough that a typo cannot ask for a billion processes.
/// Data-parallel processes of one stage (8 GPUs per node x 128 nodes).
const RANKS: std::ops::RangeInclusive<u64> = 1..=1024;
/// CPU cores per rank (the largest nodes have a few hundred).
const CPUS: std::ops::RangeInclusive<u64> = 1..=4096;
/// GPUs per rank (one node).
const GPUS: std::ops::RangeInclusive<u64> = 0..=64;
/// Resubmissions of a lost Slurm job.
const MAX_RESUBMITS: std::ops::RangeInclusive<u64> = 0..=100;

/// A count within `range`, else a located error naming the range.
fn count_in(
    sources: &SourceMap,
    node: &Node,
    what: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, RecipeError> {
    let n = count(sources, node, what)?;
    if range.contains(&n) {
        return Ok(n);
    }
    Err(RecipeError::at(
        sources,
        &node.origin,
        format!("`{what}` = {n} {} {}..={}", stage_api::ranges::OUT_OF_RANGE, range.start(), range.end()),
    ))
}

/// Slurm's time formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`
/// (an integer is minutes).
fn time_value(sources: &SourceMap, node: &Node, what: &str) -> Result<String, RecipeError> {
    let text = match &node.value {
        NodeValue::Scalar(toml::Value::Integer(n)) if *n > 0 => return Ok(n.to_string()),
        NodeValue::Scalar(toml::Value::String(s)) => s.clone(),
        _ => return Err(expected(sources, node, what, "a Slurm time limit (\"HH:MM:SS\", \"D-HH:MM\" or minutes)")),
    };
    if valid_slurm_time(&text) {
        Ok(text)
    } else {
        Err(RecipeError::at(sources, &node.origin, format!("`{what}`: `{text}` is not a Slurm time limit"))
            .with_help("write minutes, \"HH:MM:SS\", \"D-HH\", \"D-HH:MM\" or \"D-HH:MM:SS\""))
    }
}

fn mem_value(sources: &SourceMap, node: &Node, what: &str) -> Result<u64, RecipeError> {
    let parsed = match &node.value {
        NodeValue::Scalar(toml::Value::Integer(n)) if *n > 0 => Some(*n as u64),
        NodeValue::Scalar(toml::Value::String(s)) => parse_mem_mb(s),
        _ => None,
    };
    parsed.ok_or_else(|| {
        RecipeError::at(sources, &node.origin, format!("`{what}` must be a memory size, found {}", node.type_name()))
            .with_help("write MiB as an integer (`4096`) or a string like \"16G\" or \"500M\"")
    })
}

/// A table entry that must itself be a table.
fn table_of<'n>(sources: &SourceMap, node: &'n Node, what: &str) -> Result<&'n Table, RecipeError> {
    node.as_table().ok_or_else(|| expected(sources, node, what, "a table"))
}

/// Parse `[executor]` (absent: local with defaults). Stage overrides must
/// name a stage of the recipe.
pub(crate) fn parse_executor(
    sources: &SourceMap,
    node: Option<&Node>,
    stages: &[StageDecl],
) -> Result<ExecutorConfig, RecipeError> {
    let mut cfg = ExecutorConfig::default();
    let Some(node) = node else { return Ok(cfg) };
    let table = table_of(sources, node, "executor")?;
    let slurm = &mut cfg.slurm;
    for (key, entry) in table.in_order(sources) {
        let value = &entry.value;
        let what = format!("executor.{key}");
        match key {
            "kind" => {
                let kind = string(sources, value, &what)?;
                cfg.kind = match kind.as_str() {
                    "local" => ExecutorKind::Local,
                    "slurm" => ExecutorKind::Slurm,
                    _ => {
                        return Err(RecipeError::at(sources, &value.origin, format!("unknown executor kind `{kind}`"))
                            .with_help("`kind` is \"local\" or \"slurm\""));
                    }
                }
            }
            "partition" => slurm.partition = Some(string(sources, value, &what)?),
            "account" => slurm.account = Some(string(sources, value, &what)?),
            "qos" => slurm.qos = Some(string(sources, value, &what)?),
            "time" => slurm.time = Some(time_value(sources, value, &what)?),
            "log_dir" => slurm.log_dir = Some(PathBuf::from(string(sources, value, &what)?)),
            "max_resubmits" => {
                // In range, so it fits.
                slurm.max_resubmits = count_in(sources, value, &what, MAX_RESUBMITS)? as u32;
            }
            "poll_interval" => {
                let seconds = match value.value {
                    NodeValue::Scalar(toml::Value::Integer(n)) => n as f64,
                    NodeValue::Scalar(toml::Value::Float(x)) => x,
                    _ => f64::NAN,
                };
                // An hour between polls is already slower than any job's state matters.
                if !(seconds > 0.0 && seconds <= 3600.0) {
                    return Err(expected(sources, value, &what, "a number of seconds in (0, 3600]"));
                }
                slurm.poll_interval_s = seconds;
            }
            "gpu_memory_gb" => {
                let gb = match value.value {
                    NodeValue::Scalar(toml::Value::Integer(n)) => n as f64,
                    NodeValue::Scalar(toml::Value::Float(x)) => x,
                    _ => f64::NAN,
                };
                if !(gb.is_finite() && gb > 0.0) {
                    return Err(expected(sources, value, &what, "a positive number of GiB (e.g. 80 for an H100)"));
                }
                cfg.gpu_memory_gb = Some(gb);
            }
            "extra_args" => {
                let NodeValue::Array(items) = &value.value else {
                    return Err(expected(sources, value, &what, "a list of strings")
                        .with_help("e.g. `extra_args = [\"--constraint=a100\"]`"));
                };
                slurm.extra_args = items.iter().map(|i| string(sources, i, &what)).collect::<Result<_, _>>()?;
            }
            "stage" => {
                let overrides = table_of(sources, value, &what)?;
                for (id, stage_entry) in overrides.in_order(sources) {
                    if !stages.iter().any(|s| s.id == id || s.name == id) {
                        let mut names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
                        names.dedup();
                        let err = RecipeError::at(
                            sources,
                            &stage_entry.key,
                            format!("`[executor.stage.{id}]` names no stage of the recipe"),
                        );
                        return Err(match did_you_mean(id, names.iter().copied()) {
                            Some(b) => err.with_help(format!("did you mean `{b}`?")),
                            None => err.with_help(format!("stages: {}", names.join(", "))),
                        });
                    }
                    let what = format!("executor.stage.{id}");
                    let table = table_of(sources, &stage_entry.value, &what)?;
                    let o = parse_stage_override(sources, table, &what)?;
                    if o.ranks.is_some_and(|n| n > 1)
                        && let Some(single) =
                            stages.iter().find(|s| (s.id == id || s.name == id) && !s.kind.distributed())
                    {
                        let node = table.get("ranks").map_or(&stage_entry.key, |n| &n.origin);
                        return Err(RecipeError::at(
                            sources,
                            node,
                            format!(
                                "stage `{}` (kind `{}`) runs as one process: `ranks` must be 1",
                                single.id,
                                single.kind.kind()
                            ),
                        )
                        .with_help("data-parallel ranks are for training kinds (`pipeline kinds` marks them)"));
                    }
                    cfg.stages.insert(id.to_string(), o);
                }
            }
            _ => return Err(unknown_key(sources, &entry.key, key, "[executor]", EXECUTOR_KEYS)),
        }
    }
    Ok(cfg)
}

fn parse_stage_override(sources: &SourceMap, table: &Table, what: &str) -> Result<StageOverride, RecipeError> {
    let mut o = StageOverride::default();
    for (key, entry) in table.in_order(sources) {
        let value = &entry.value;
        let field = format!("{what}.{key}");
        match key {
            "ranks" => o.ranks = Some(count_in(sources, value, &field, RANKS)? as usize),
            "cpus" => o.cpus = Some(count_in(sources, value, &field, CPUS)? as usize),
            "gpus" => o.gpus = Some(count_in(sources, value, &field, GPUS)? as usize),
            "mem" => o.mem_mb = Some(mem_value(sources, value, &field)?),
            "time" => o.time = Some(time_value(sources, value, &field)?),
            _ => return Err(unknown_key(sources, &entry.key, key, &format!("[{what}]"), STAGE_KEYS)),
        }
    }
    Ok(o)
}
