//! Memory at plan time, kind-agnostic: the read-only view of a stage's
//! inputs the plan can offer ([`plan_view_inputs`]: published outputs,
//! upstream stand-ins, facts), the stage's own prediction, the resources it
//! turns into (host peak × ranks for admission and Slurm's `--mem`), and
//! the GPU fit check against `[executor] gpu_memory_gb` or the device's
//! reported memory. Nothing here enters a key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stage_api::memory::{gib, mib_ceil};
use stage_api::{
    DeviceRequest, InputSource, MemoryEstimate, MemoryPool, PlanFacts, PlanInput, PlanInputs, PlanOutput, PlanView,
    Resources,
};

use crate::recipe::StageDecl;

/// What the plan knows of one upstream stage's output.
#[derive(Debug, Clone)]
pub enum UpstreamOutput {
    /// Published at this directory, with the facts the stage stated.
    Published(PathBuf, PlanFacts),
    /// Still to run: what it said about its output.
    Planned(PlanOutput),
}

/// The inputs of `decl` as the plan sees them (`upstream(id)`: what is known
/// of that stage, `None` for a stage outside the graph).
pub fn plan_view_inputs(decl: &StageDecl, upstream: &dyn Fn(&str) -> Option<UpstreamOutput>) -> PlanInputs {
    let join = |dir: &Path, output: Option<&str>| match output {
        Some(o) => dir.join(o),
        None => dir.to_path_buf(),
    };
    let mut inputs = BTreeMap::new();
    for (name, refs) in &decl.inputs {
        let list = refs
            .iter()
            .map(|r| {
                let (source, facts) = match upstream(&r.stage) {
                    Some(UpstreamOutput::Published(dir, facts)) => {
                        (InputSource::Published(join(&dir, r.output.as_deref())), facts)
                    }
                    Some(UpstreamOutput::Planned(out)) => match &out.stand_in {
                        Some(dir) => (InputSource::StandIn(join(dir, r.output.as_deref())), out.facts.clone()),
                        None => (InputSource::Pending, out.facts.clone()),
                    },
                    None => (InputSource::Pending, Default::default()),
                };
                PlanInput { stage: r.stage.clone(), source, facts }
            })
            .collect();
        inputs.insert(name.clone(), list);
    }
    PlanInputs::new(inputs)
}

/// The device a prediction is for: where the stage will run, or CUDA for a
/// stage that requires it on a machine without one (the plan warns anyway).
pub fn plan_device(device: &Result<DeviceRequest, String>) -> DeviceRequest {
    match device {
        Ok(DeviceRequest::Cpu) => DeviceRequest::Cpu,
        _ => DeviceRequest::Cuda,
    }
}

/// A stage's prediction and what it says of its output.
pub fn predict(
    decl: &StageDecl,
    inputs: &PlanInputs,
    ranks: usize,
    device: DeviceRequest,
    recipe_dir: &Path,
) -> (MemoryEstimate, PlanOutput) {
    let view = PlanView { inputs, ranks, device, recipe_dir };
    (decl.stage.memory(&view), decl.stage.plan_output(&view))
}

/// The stage's resources with its predicted host peak (all ranks) as
/// `memory_mb`; the kind's fixed value when there is no prediction.
pub fn resources_with(fixed: Resources, estimate: &MemoryEstimate, ranks: usize) -> Resources {
    match estimate.prediction() {
        Some(p) => {
            Resources { memory_mb: mib_ceil(p.host_peak_bytes()).saturating_mul(ranks.max(1) as u64).max(1), ..fixed }
        }
        None => fixed,
    }
}

/// The memory of one GPU the plan checks against.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuCapacity {
    pub bytes: u64,
    /// `[executor] gpu_memory_gb = 80`, or the device's own report.
    pub source: String,
}

impl GpuCapacity {
    /// The recipe's declaration wins (it describes where the run goes);
    /// else the memory the local GPU reports.
    pub fn pick(recipe_gb: Option<f64>, device_mb: Option<u64>) -> Option<Self> {
        match (recipe_gb, device_mb) {
            (Some(gb), _) => Some(Self {
                bytes: (gb * (1u64 << 30) as f64) as u64,
                source: format!("[executor] gpu_memory_gb = {gb}"),
            }),
            (None, Some(mb)) => Some(Self { bytes: mb << 20, source: "the GPU of this machine".into() }),
            (None, None) => None,
        }
    }
}

/// Share of the GPU a prediction may use before the plan calls the headroom
/// thin: the CUDA context (≈ 0.5 GiB) and the caching allocator's
/// fragmentation (typically 5–10 % of what is allocated) live above the
/// tensors the model counts.
pub const GPU_HEADROOM: f64 = 0.9;

/// How the stage's GPU peak compares with `cap`: `Ok(note)` when it fits
/// with headroom, `Err(warning)` naming the biggest term and its fix.
pub fn gpu_fit(estimate: &MemoryEstimate, cap: &GpuCapacity) -> Option<Result<String, String>> {
    let pool: &MemoryPool = estimate.prediction()?.gpu.as_ref()?;
    let peak = pool.peak_bytes();
    let phase = pool.peak_phase().map(|p| format!(" during {}", p.name)).unwrap_or_default();
    let share = peak as f64 / cap.bytes.max(1) as f64;
    if share <= GPU_HEADROOM {
        return Some(Ok(format!("{} of {} per GPU ({:.0} %)", gib(peak), gib(cap.bytes), share * 100.0)));
    }
    let big = pool.biggest_term();
    let biggest = big.map(|t| format!("; biggest term: {} {}", t.name, gib(t.bytes))).unwrap_or_default();
    let fix = big.and_then(|t| t.fix.clone()).map(|f| format!("; to shrink it: {f}")).unwrap_or_default();
    let verdict = if share > 1.0 { "does not fit" } else { "leaves under 10 % headroom" };
    Some(Err(format!(
        "needs {} per rank on the GPU{phase}, {verdict}: {} ({}){biggest}{fix}",
        gib(peak),
        gib(cap.bytes),
        cap.source
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::backend::local::LocalBackend;
    use crate::env::EngineEnv;
    use crate::plan::{Selection, StageGraph, make_plan};
    use crate::run::progress::RunProgress;
    use crate::run::scheduler::{RunOptions, Scheduler};
    use crate::workspace::Workspace;
    use pipeline_cache::Cache;
    use stage_api::{
        InputSpec, LogProgress, MemoryPrediction, MemoryTerm, Phase, ProgressSink, Registry, StageContext, StageKind,
    };

    /// Writes `mib` into `size.txt`; before it runs, `stand_in` (a directory
    /// holding its own `size.txt`) stands in, and it states a fact.
    struct Source;
    #[derive(Debug, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct SourceParams {
        /// MiB written to size.txt.
        mib: u64,
        /// Stand-in directory.
        stand_in: Option<PathBuf>,
    }
    impl StageKind for Source {
        type Params = SourceParams;
        const KIND: &'static str = "source";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        fn plan_output(p: &SourceParams, _plan: &PlanView) -> PlanOutput {
            let mut out = PlanOutput { stand_in: p.stand_in.clone(), facts: Default::default() };
            out.facts.set("max_image_pixels", 7);
            out
        }
        fn run(p: &SourceParams, ctx: &mut StageContext) -> anyhow::Result<()> {
            Ok(std::fs::write(ctx.output_dir().join("size.txt"), p.mib.to_string())?)
        }
    }

    /// Passes its input on; no stand-in (the default plan output).
    struct Relay;
    impl StageKind for Relay {
        type Params = SourceParams;
        const KIND: &'static str = "relay";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        fn inputs() -> &'static [InputSpec] {
            const I: &[InputSpec] = &[InputSpec::one("up", "upstream")];
            I
        }
        fn run(_p: &SourceParams, ctx: &mut StageContext) -> anyhow::Result<()> {
            let up = ctx.input("up")?.join("size.txt");
            std::fs::copy(up, ctx.output_dir().join("size.txt"))?;
            Ok(())
        }
    }

    /// Predicts `size.txt` MiB of host memory (times the fact, if any) per rank.
    struct Sized;
    impl StageKind for Sized {
        type Params = SourceParams;
        const KIND: &'static str = "sized";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        const DISTRIBUTED: bool = true;
        fn inputs() -> &'static [InputSpec] {
            const I: &[InputSpec] = &[InputSpec::one("up", "upstream")];
            I
        }
        fn memory(_p: &SourceParams, plan: &PlanView) -> MemoryEstimate {
            let dir = match plan.inputs.path("up") {
                Ok(d) => d,
                Err(e) => return MemoryEstimate::Unknown { reason: e.to_string() },
            };
            let mib: u64 = std::fs::read_to_string(dir.join("size.txt")).unwrap().trim().parse().unwrap();
            let fact = plan.inputs.facts("up").get("max_image_pixels").unwrap_or(1);
            let term = MemoryTerm::new("data", (mib * fact) << 20, "");
            let host = MemoryPool { resident: vec![term], phases: vec![] };
            MemoryEstimate::Predicted(MemoryPrediction::on_cpu(MemoryPool::default(), host, vec![]))
        }
        fn run(_p: &SourceParams, _ctx: &mut StageContext) -> anyhow::Result<()> {
            Ok(())
        }
    }

    struct Quiet;
    impl RunProgress for Quiet {
        fn stage_sink(&self, _stage_id: &str) -> Arc<dyn ProgressSink> {
            Arc::new(LogProgress::default())
        }
        fn println(&self, _line: &str) {}
    }

    #[test]
    fn stages_read_stand_ins_published_outputs_and_facts_at_plan_time() {
        let dir = tempfile::tempdir().unwrap();
        let stand_in = dir.path().join("stand_in");
        std::fs::create_dir_all(&stand_in).unwrap();
        std::fs::write(stand_in.join("size.txt"), "3").unwrap();
        let src = format!(
            "[recipe]\nname = \"m\"\n[stage.src]\nkind = \"source\"\nmib = 5\nstand_in = {:?}\n\
             [stage.relay]\nkind = \"relay\"\nup = \"src\"\n\
             [stage.direct]\nkind = \"sized\"\nup = \"src\"\n\
             [stage.behind]\nkind = \"sized\"\nup = \"relay\"\n",
            stand_in.display().to_string()
        );
        let registry = Registry::new().register::<Source>().register::<Relay>().register::<Sized>();
        let load = |sets: &[String]| {
            crate::recipe::load_recipe_str(&src, &dir.path().join("r.toml"), sets, &registry).unwrap()
        };
        let recipe = load(&["executor.stage.direct.ranks=2".to_string()]);
        let graph = StageGraph::from_recipe(&recipe).unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let env = EngineEnv { cuda_devices: 0, stage_gpus: None, cores: 2, memory_mb: 1024, gpu_memory_mb: None };
        let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env).unwrap();
        let stage = |plan: &crate::plan::Plan, id: &str| plan.stage(id).unwrap().clone();
        // Before anything ran: `direct` reads the stand-in (3 MiB, fact 7, 2 ranks).
        let direct = stage(&plan, "direct");
        assert_eq!(direct.memory.prediction().unwrap().host_peak_bytes(), 21 << 20);
        assert_eq!(direct.resources.memory_mb, 2 * 21, "host peak × ranks");
        // `relay` has no stand-in: `behind` cannot read its input yet.
        let behind = stage(&plan, "behind");
        assert_eq!(behind.memory, MemoryEstimate::Unknown { reason: "unknown until `relay` runs".into() });
        assert_eq!(behind.resources.memory_mb, 256, "the kind's fixed value stands");
        // The fact passed through `relay`.
        assert_eq!(stage(&plan, "relay").plan_output.facts.get("max_image_pixels"), Some(7));

        // Run on one rank (a test binary cannot start rank processes).
        let recipe = load(&[]);
        let workspace = Workspace { root: dir.path().to_path_buf() };
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
        exec.run(&plan, &RunOptions { jobs: 1, keep_going: false }).unwrap();
        // Published: the real outputs (5 MiB) are read, not the stand-in; the facts stay.
        let plan = make_plan(&recipe, &graph, &cache, &Selection::all(&graph), &env).unwrap();
        assert_eq!(stage(&plan, "direct").memory.prediction().unwrap().host_peak_bytes(), 35 << 20);
        assert_eq!(stage(&plan, "behind").memory.prediction().unwrap().host_peak_bytes(), 35 << 20);
    }

    fn estimate(resident_gib: u64, phase_gib: u64) -> MemoryEstimate {
        let t = |n: &str, g: u64, fix: Option<&str>| MemoryTerm {
            name: n.into(),
            bytes: g << 30,
            formula: String::new(),
            fix: fix.map(String::from),
        };
        let gpu = MemoryPool {
            resident: vec![t("weights", 1, None), t("optimizer moments", resident_gib, Some("shard = \"optimizer\""))],
            phases: vec![Phase::new("training micro-batch", vec![t("activations", phase_gib, Some("batch_size"))])],
        };
        let host = MemoryPool { resident: vec![t("runtime", 2, None)], phases: vec![] };
        MemoryEstimate::Predicted(MemoryPrediction::on_gpu(gpu, host, vec![]))
    }

    #[test]
    fn the_fit_check_names_the_biggest_term_and_its_fix() {
        let cap = GpuCapacity::pick(Some(80.0), Some(1)).unwrap();
        assert_eq!(cap.source, "[executor] gpu_memory_gb = 80");
        assert_eq!(gpu_fit(&estimate(40, 10), &cap).unwrap().unwrap(), "51.0G of 80.0G per GPU (64 %)");
        let e = gpu_fit(&estimate(85, 10), &cap).unwrap().unwrap_err();
        assert!(e.contains("needs 96.0G per rank on the GPU during training micro-batch, does not fit: 80.0G"), "{e}");
        assert!(e.contains("biggest term: optimizer moments 85.0G; to shrink it: shard = \"optimizer\""), "{e}");
        let e = gpu_fit(&estimate(10, 64), &cap).unwrap().unwrap_err();
        assert!(
            e.contains("leaves under 10 % headroom") && e.contains("activations 64.0G; to shrink it: batch_size"),
            "{e}"
        );
        // No GPU pool (a CPU stage) or no prediction: nothing to check.
        assert!(gpu_fit(&MemoryEstimate::NotModelled, &cap).is_none());
        assert_eq!(GpuCapacity::pick(None, Some(81_559)).unwrap().bytes, 81_559 << 20);
        assert!(GpuCapacity::pick(None, None).is_none());
    }

    #[test]
    fn predicted_host_memory_times_ranks_replaces_the_fixed_value() {
        let fixed = Resources { cpu: 0, device: DeviceRequest::Cuda, memory_mb: 4096, libtorch: true };
        assert_eq!(resources_with(fixed, &estimate(1, 1), 8).memory_mb, 8 * 2048);
        let unknown = MemoryEstimate::Unknown { reason: "unknown until `sft` runs".into() };
        assert_eq!(resources_with(fixed, &unknown, 8), fixed);
    }
}
