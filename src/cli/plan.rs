//! The commands that show a plan: `plan` (a table, or `--json` with the
//! full keys), `dag`, `status`, `why` and `show`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use bytesize::ByteSize;
use pipeline_engine::EngineEnv;
use pipeline_engine::index::RunIndex;
use pipeline_engine::plan::canonical::normalize;
use pipeline_engine::plan::memory::GpuCapacity;
use pipeline_engine::plan::{Action, Plan, PlannedStage, Selection, StageGraph, make_plan};
use pipeline_engine::provenance::Provenance;
use pipeline_engine::recipe::{Recipe, load_recipe, resolve_stage_selector};
use stage_api::memory::gib;
use stage_api::{DeviceRequest, MemoryEstimate, Registry};

use super::args::{RecipeArgs, SelectArgs};
use super::load::{env_for, load};

/// `pipeline plan`: the table, or `--json`.
pub fn plan(
    args: &RecipeArgs,
    select: &SelectArgs,
    json: bool,
    registry: &Registry,
    env: &EngineEnv,
) -> anyhow::Result<ExitCode> {
    let (recipe, graph, cache) = load(args, registry)?;
    let selection = Selection::build(&recipe, &graph, &select.options())?;
    let plan = make_plan(&recipe, &graph, &cache, &selection, &env_for(&recipe, env, None))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan_json(&plan))?);
    } else {
        print!("{}", render_plan(&plan));
    }
    Ok(ExitCode::SUCCESS)
}

/// `pipeline dag`: the stage graph as text or Graphviz.
pub fn dag(recipe: &Path, sets: &[String], dot: bool, registry: &Registry) -> anyhow::Result<ExitCode> {
    let recipe = load_recipe(recipe, sets, registry)?;
    let graph = StageGraph::from_recipe(&recipe)?;
    let kind_of = |id: &str| recipe.stage(id).map(|s| s.kind.kind().to_string()).unwrap_or_default();
    print!("{}", if dot { graph.to_dot(kind_of) } else { graph.to_text(kind_of) });
    Ok(ExitCode::SUCCESS)
}

fn resources_label(s: &PlannedStage) -> String {
    let cpu = if s.resources.cpu == 0 { "all".to_string() } else { s.resources.cpu.to_string() };
    let ranks = if s.ranks > 1 { format!(" ranks={}", s.ranks) } else { String::new() };
    format!("cpu={cpu} dev={}{ranks}", device_label(&s.device))
}

/// The MEMORY column, per rank: predicted (`gpu 61.2G/96.0G host 4.1G`,
/// `!` when it does not fit), the kind's fixed estimate (`256M`), or `?`
/// (the reason on its own line below the row).
fn memory_label(s: &PlannedStage, cap: Option<&GpuCapacity>) -> String {
    match &s.memory {
        MemoryEstimate::Predicted(p) => {
            let host = format!("host {}", gib(p.host_peak_bytes()));
            match (p.gpu_peak_bytes(), cap, &s.gpu_fit) {
                (Some(g), Some(cap), Some(fit)) => {
                    let mark = if fit.is_ok() { "" } else { " !" };
                    format!("gpu {}/{}{mark} {host}", gib(g), gib(cap.bytes))
                }
                (Some(g), _, _) => format!("gpu {} {host}", gib(g)),
                (None, _, _) => host,
            }
        }
        MemoryEstimate::NotModelled => format!("{}M", s.resources.memory_mb),
        MemoryEstimate::Unknown { .. } => "?".into(),
    }
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
                "memory": memory_json(s),
                "warnings": s.warnings,
            })
        })
        .collect();
    let gpu = plan.gpu_capacity.as_ref().map(|c| serde_json::json!({"bytes": c.bytes, "source": c.source}));
    serde_json::json!({ "stages": stages, "gpu_memory": gpu })
}

/// `plan --json`'s memory of one stage: the estimate (per rank) with its
/// peaks and the GPU fit.
fn memory_json(s: &PlannedStage) -> serde_json::Value {
    let mut v = serde_json::to_value(&s.memory).unwrap_or(serde_json::Value::Null);
    if let (Some(p), Some(obj)) = (s.memory.prediction(), v.as_object_mut()) {
        obj.insert("host_peak_bytes".into(), p.host_peak_bytes().into());
        obj.insert("gpu_peak_bytes".into(), p.gpu_peak_bytes().into());
        let fit = s.gpu_fit.as_ref().map(|f| match f {
            Ok(note) => serde_json::json!({"fits": true, "note": note}),
            Err(w) => serde_json::json!({"fits": false, "note": w}),
        });
        obj.insert("gpu_fit".into(), fit.unwrap_or(serde_json::Value::Null));
    }
    v
}

/// The `plan` table.
pub fn render_plan(plan: &Plan) -> String {
    let cap = plan.gpu_capacity.as_ref();
    let rows: Vec<[String; 6]> = plan
        .stages
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.kind.clone(),
                s.action.as_str().to_string(),
                resources_label(s),
                memory_label(s, cap),
                s.reason.clone(),
            ]
        })
        .collect();
    let header = ["STAGE", "KIND", "STATUS", "RESOURCES", "MEMORY/RANK", "REASON"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, r: &[String; 6]| {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:<w4$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        );
    };
    line(&mut out, &header);
    for (r, s) in rows.iter().zip(&plan.stages) {
        line(&mut out, r);
        if s.action != Action::NotSelected {
            if let MemoryEstimate::Unknown { reason } = &s.memory {
                let _ = writeln!(out, "  memory: {reason} (admission assumes {}M)", s.resources.memory_mb);
            }
            for w in &s.warnings {
                let _ = writeln!(out, "  warning: {w}");
            }
        }
    }
    if let Some(cap) = cap {
        let checked: Vec<&PlannedStage> =
            plan.stages.iter().filter(|s| s.action != Action::NotSelected && s.gpu_fit.is_some()).collect();
        let misfits = checked.iter().filter(|s| matches!(s.gpu_fit, Some(Err(_)))).count();
        let verdict = match (checked.len(), misfits) {
            (0, _) => "no CUDA stage with a prediction".to_string(),
            (n, 0) => format!("all {n} CUDA stages with a prediction fit with headroom"),
            (n, m) => format!("{m} of {n} CUDA stages do not fit with headroom (warnings above)"),
        };
        let _ = writeln!(out, "GPU memory per rank vs {} ({}): {verdict}", gib(cap.bytes), cap.source);
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

/// `pipeline status`.
pub fn status(args: &RecipeArgs, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
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

pub fn selected<'p>(recipe: &Recipe, plan: &'p Plan, selector: &str) -> anyhow::Result<Vec<&'p PlannedStage>> {
    let decls = resolve_stage_selector(recipe, selector)?;
    Ok(decls.iter().filter_map(|d| plan.stage(&d.id)).collect())
}

/// `pipeline why`.
pub fn why(args: &RecipeArgs, stage: &str, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
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

/// `pipeline show`.
pub fn show(args: &RecipeArgs, stage: &str, registry: &Registry, env: &EngineEnv) -> anyhow::Result<ExitCode> {
    let (recipe, graph, cache) = load(args, registry)?;
    let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env_for(&recipe, env, None))?;
    for s in selected(&recipe, &plan, stage)? {
        println!("stage {} (kind {} v{})", s.id, s.kind, s.components.version);
        println!("status: {} ({})", s.action.as_str(), s.reason);
        println!("key: {}", s.key.hex());
        println!("seed: {}", s.components.seed);
        println!("resources: {}", resources_label(s));
        print!("{}", memory_breakdown(s, plan.gpu_capacity.as_ref()));
        println!("params: {}", serde_json::to_string_pretty(&normalize(&s.components.params))?);
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

/// `show`'s memory section: every term of each pool with its formula, the
/// phases (the peak one marked), the notes and the GPU fit.
fn memory_breakdown(s: &PlannedStage, cap: Option<&GpuCapacity>) -> String {
    let mut out = String::new();
    let p = match &s.memory {
        MemoryEstimate::Predicted(p) => p,
        MemoryEstimate::NotModelled => {
            let _ = writeln!(out, "memory: {}M (the kind's fixed estimate)", s.resources.memory_mb);
            return out;
        }
        MemoryEstimate::Unknown { reason } => {
            let _ = writeln!(out, "memory: {reason} (admission assumes {}M)", s.resources.memory_mb);
            return out;
        }
    };
    let ranks = if s.ranks > 1 { format!(", {} ranks", s.ranks) } else { String::new() };
    let _ = writeln!(
        out,
        "memory per rank{ranks} (predicted; admission and Slurm --mem: {}M for all ranks):",
        s.resources.memory_mb
    );
    let pools = [
        ("GPU", p.gpu.as_ref()),
        (if p.gpu.is_some() { "host" } else { "host (the stage runs on the CPU)" }, Some(&p.host)),
    ];
    for (name, pool) in pools {
        let Some(pool) = pool else { continue };
        let _ = writeln!(out, "  {name}: peak {}", gib(pool.peak_bytes()));
        let term = |out: &mut String, indent: &str, t: &stage_api::MemoryTerm| {
            let fix = t.fix.as_ref().map(|f| format!(" [shrink: {f}]")).unwrap_or_default();
            let _ = writeln!(out, "{indent}{:<28} {:>8}  {}{fix}", t.name, gib(t.bytes), t.formula);
        };
        for t in &pool.resident {
            term(&mut out, "    ", t);
        }
        let peak = pool.peak_phase().map(|p| p.name.clone());
        for phase in &pool.phases {
            let mark = if Some(&phase.name) == peak.as_ref() { " (peak)" } else { "" };
            let _ = writeln!(out, "    while {}{mark}: +{}", phase.name, gib(phase.bytes()));
            for t in &phase.terms {
                term(&mut out, "      ", t);
            }
        }
    }
    for n in &p.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    match (&s.gpu_fit, cap) {
        (Some(Ok(note)), Some(cap)) => {
            let _ = writeln!(out, "  GPU: fits, {note} ({})", cap.source);
        }
        (Some(Err(w)), _) => {
            let _ = writeln!(out, "  GPU: {w}");
        }
        _ => {}
    }
    out
}

/// Device a stage was resolved to, for display.
pub fn device_label(d: &Result<DeviceRequest, String>) -> String {
    match d {
        Ok(DeviceRequest::Cpu) => "cpu".into(),
        Ok(DeviceRequest::Cuda) => "cuda".into(),
        Ok(DeviceRequest::Auto) => "auto".into(),
        // Only a stage requiring CUDA on a machine without it gets here.
        Err(_) => "cuda(none here)".into(),
    }
}
