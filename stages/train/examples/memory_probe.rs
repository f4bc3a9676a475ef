//! Measured peak memory of one real `sft` or `grpo` run on the CPU against
//! the prediction of `stages_train::memory` at the same lengths (the table
//! of docs/benchmarks.md, "Memory model").
//!
//! ```text
//! memory_probe make DIR key=value...    # a random checkpoint of the given shape
//! memory_probe sft DIR key=value...     # two optimizer steps of the real stage
//! memory_probe grpo DIR key=value...    # two GRPO steps (generation, reference, update)
//! ```
//!
//! Shape keys (`make`): hidden, inter, layers, heads, kv, vocab, vdepth,
//! vhidden, vinter, vheads, model_type (`qwen2_5_vl` or `qwen2_vl`). Run keys: batch, side (image side in pixels),
//! trainable (regex), prompts, gens, micro, completion, shard_mb, ckpt (1:
//! `gradient_checkpointing = true`, where the stages have it).
//!
//! `device=cuda` runs on the first GPU in the stages' CUDA dtype (bf16) and
//! measures the GPU instead: the driver's used memory after the run minus
//! before it (libtorch's caching allocator keeps what it reserved, so this
//! is the reserved peak: allocated tensors plus fragmentation), compared
//! with the prediction's GPU pool. Needs a CUDA libtorch on the library path
//! (`libtorch_cuda.so`, as the `pipeline` binary loads it). Written for the
//! first GPU session; not yet run.
//!
//! How it measures: the process first runs the same mode on a tiny model
//! (so libtorch's kernels and allocator pools are paged in), then returns
//! freed heap to the OS (`malloc_trim`), reads `VmRSS` as the baseline and
//! resets the peak (`/proc/self/clear_refs` = 5). After the measured run
//! the peak is `VmHWM`; measured = peak − baseline. The prediction leaves
//! out the runtime term (the baseline). One thread, so per-thread scratch
//! does not vary with the machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use stage_api::{MemoryPrediction, StageContext, StageKind};
use stages_task::dataset::{VqaRow, split_size, write_rows};
use stages_task::prompt::{PromptVariant, THINK_TEMPLATE};
use stages_train::grpo::GrpoParams;
use stages_train::memory::{Lengths, Where, grpo_prediction, sft_prediction};
use stages_train::prompt::PromptEncoder;
use stages_train::sft::{Encoder, SftParams, Target};
use stages_train::{Grpo, Sft};
use stages_vlm::DeviceChoice;
use stages_vlm::chat::ChatTokenizer;
use stages_vlm::init_model::InitModelParams;
use stages_vlm::memory::plan::{ModelFacts, RETENTION, RUNTIME_CPU_BYTES};
use stages_vlm::memory::{Precision, Shard};
use stages_vlm::processor::ImageProcessor;
use stages_vlm::{InitModel, Qwen25Vl, Qwen25VlConfig};
use tch::{Device, Kind};

unsafe extern "C" {
    /// glibc: give freed heap memory back to the OS.
    fn malloc_trim(pad: usize) -> i32;
}

type Args = BTreeMap<String, String>;

/// Load libtorch's CUDA kernels (before any tch call), as the binary does.
fn load_cuda() -> anyhow::Result<()> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    let name = std::env::var("PIPELINE_LIBTORCH_CUDA").unwrap_or_else(|_| "libtorch_cuda.so".into());
    // SAFETY: libtorch_cuda's initialisers register CUDA kernels with the
    // already-loaded libtorch of the same version; it stays loaded.
    let lib =
        unsafe { Library::open(Some(&name), RTLD_NOW | RTLD_GLOBAL) }.with_context(|| format!("loading {name}"))?;
    std::mem::forget(lib);
    Ok(())
}

/// Bytes in use on the current CUDA context's device (driver API).
fn cuda_used_bytes() -> anyhow::Result<u64> {
    use libloading::os::unix::{Library, RTLD_NOW, Symbol};
    type MemGetInfo = unsafe extern "C" fn(free: *mut usize, total: *mut usize) -> i32;
    // SAFETY: cuMemGetInfo_v2 has this signature in every CUDA 11+ driver; the
    // calling thread has libtorch's primary context current after a CUDA op.
    unsafe {
        let lib = Library::open(Some("libcuda.so.1"), RTLD_NOW)?;
        let f: Symbol<MemGetInfo> = lib.get(b"cuMemGetInfo_v2\0")?;
        let (mut free, mut total) = (0usize, 0usize);
        let rc = f(&mut free, &mut total);
        if rc != 0 {
            bail!("cuMemGetInfo_v2 failed with CUDA error {rc}");
        }
        Ok((total - free) as u64)
    }
}

fn arg(args: &Args, key: &str, default: u64) -> anyhow::Result<u64> {
    match args.get(key) {
        Some(v) => v.parse().with_context(|| format!("{key}={v}: expected an integer")),
        None => Ok(default),
    }
}

fn status_kib(field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let line =
        text.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(line.split_whitespace().nth(1).context("malformed status line")?.parse()?)
}

/// A random checkpoint of the given shape: init_model's tokenizer and
/// processor files, the config widened to `vocab`, fresh random weights.
fn make(dir: &Path, a: &Args) -> anyhow::Result<()> {
    let hidden = arg(a, "hidden", 64)? as i64;
    let heads = arg(a, "heads", 4)? as i64;
    let half = hidden / heads / 2;
    let side = half * 3 / 8;
    let params = InitModelParams {
        model_type: a.get("model_type").cloned().unwrap_or_else(|| "qwen2_5_vl".into()),
        hidden_size: hidden,
        intermediate_size: arg(a, "inter", 128)? as i64,
        num_hidden_layers: arg(a, "layers", 2)? as i64,
        num_attention_heads: heads,
        num_key_value_heads: arg(a, "kv", 2)? as i64,
        mrope_section: [half - 2 * side, side, side],
        vision_depth: arg(a, "vdepth", 2)? as i64,
        vision_hidden_size: arg(a, "vhidden", 32)? as i64,
        vision_intermediate_size: arg(a, "vinter", 64)? as i64,
        vision_num_heads: arg(a, "vheads", 2)? as i64,
        max_pixels: 28 * 28 * 1280,
        vocab_size: 400,
        ..Default::default()
    };
    let mut ctx = StageContext::builder("make", dir).seed(1).build()?;
    InitModel::run(&params, &mut ctx)?;
    let path = dir.join("config.json");
    let mut raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    raw["vocab_size"] = arg(a, "vocab", 512)?.into();
    for f in std::fs::read_dir(dir)? {
        let f = f?.path();
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
            std::fs::remove_file(&f)?;
        }
    }
    let config = Qwen25VlConfig::from_value(raw, &path)?;
    let model = Qwen25Vl::random(config, 7, Kind::Float, Device::Cpu)?;
    model.save(dir, Kind::Float, 2048 << 20)?;
    let n: i64 = model.params.values().map(|t| t.numel() as i64).sum();
    println!("{{\"made\": \"{}\", \"parameters\": {n}}}", dir.display());
    Ok(())
}

fn png(side: u32, shade: u8) -> anyhow::Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([shade, (x * 9) as u8, (y * 5) as u8]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// `n` rows with a seven-option question (≈ the `vqa` stage's) and a `side` image.
fn split(dir: &Path, n: usize, side: u32) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let options: Vec<String> = [
        "airway abnormalities",
        "emphysema",
        "fibrosis-related changes",
        "pulmonary nodules/masses",
        "consolidation/atelectasis",
        "ground-glass opacity",
        "pleural effusion/thickening",
    ]
    .iter()
    .enumerate()
    .map(|(i, c)| format!("{}. {c}", (b'A' + i as u8) as char))
    .collect();
    let question = format!("Which type of lesion is marked in this chest CT slice?\nOptions:\n{}", options.join("\n"));
    let rows = (0..n)
        .map(|i| {
            Ok(VqaRow {
                id: format!("case{i}"),
                image: Some(png(side, (i * 40) as u8)?),
                problem: THINK_TEMPLATE.replace("{Question}", &question),
                answer: "B".into(),
                answers: Vec::new(),
                options: options.clone(),
                class: "emphysema".into(),
                class_name: "emphysema".into(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_rows(&dir.join("train-00000-of-00001.parquet"), &rows)?;
    Ok(dir.to_path_buf())
}

fn is_cuda(a: &Args) -> bool {
    a.get("device").is_some_and(|d| d == "cuda")
}

struct Run {
    sft: SftParams,
    grpo: GrpoParams,
    items: usize,
    side: u32,
    cuda: bool,
}

fn run_params(mode: &str, a: &Args) -> anyhow::Result<Run> {
    let batch = arg(a, "batch", 2)? as usize;
    let trainable =
        vec![a.get("trainable").cloned().unwrap_or_else(|| r"^model\.language_model\.layers\.\d+\.mlp\.".into())];
    let shard = arg(a, "shard_mb", 2048)?;
    let cuda = is_cuda(a);
    let (dtype, device_choice) = if cuda { ("auto", DeviceChoice::Cuda) } else { ("float32", DeviceChoice::Cpu) };
    let sft = SftParams {
        epochs: 1,
        batch_size: batch,
        grad_accum: 1,
        max_steps: Some(2),
        target: Target::Answer,
        trainable: trainable.clone(),
        dtype: dtype.into(),
        device: device_choice,
        max_shard_mb: shard,
        ..Default::default()
    };
    let prompts = arg(a, "prompts", 1)? as usize;
    let grpo = GrpoParams {
        steps: 2,
        prompts_per_step: prompts,
        num_generations: arg(a, "gens", 2)? as usize,
        micro_batch_size: arg(a, "micro", 2)? as usize,
        max_completion_length: arg(a, "completion", 32)? as usize,
        checkpoint_every: 0,
        log_completions_every: 0,
        trainable,
        dtype: dtype.into(),
        device: device_choice,
        max_shard_mb: shard,
        ..Default::default()
    };
    // `ckpt=1`: activation checkpointing, set by its param name so the probe
    // builds whether or not the stages have the param yet (a stage without
    // it rejects the key).
    let (sft, grpo) = if arg(a, "ckpt", 0)? != 0 {
        (with_param(&sft, "gradient_checkpointing", true)?, with_param(&grpo, "gradient_checkpointing", true)?)
    } else {
        (sft, grpo)
    };
    let items = if mode == "sft" { 2 * batch } else { 2 * prompts };
    Ok(Run { sft, grpo, items, side: arg(a, "side", 56)? as u32, cuda })
}

/// `params` with one more key, through their serialized form.
fn with_param<P: serde::Serialize + serde::de::DeserializeOwned>(
    params: &P,
    key: &str,
    value: impl Into<serde_json::Value>,
) -> anyhow::Result<P> {
    let mut v = serde_json::to_value(params)?;
    v[key] = value.into();
    serde_json::from_value(v).with_context(|| format!("setting `{key}` (does this stage have the param yet?)"))
}

fn run_stage(mode: &str, model: &Path, data: &Path, out: &Path, r: &Run) -> anyhow::Result<()> {
    let mut ctx = StageContext::builder(mode, out)
        .input("model", "m", None, model)
        .input("data", "export", Some("train"), data)
        .resume_dir(out.with_extension("resume"))
        .device(if r.cuda { stage_api::Device::Cuda(0) } else { stage_api::Device::Cpu })
        .threads(1)
        .seed(11)
        .build()?;
    match mode {
        "sft" => Sft::run(&r.sft, &mut ctx),
        "grpo" => Grpo::run(&r.grpo, &mut ctx),
        _ => bail!("mode must be make, sft or grpo, got {mode}"),
    }
}

/// The lengths the stage saw: one row encoded exactly as the stage encodes it.
fn lengths(mode: &str, model: &Path, data: &Path, r: &Run) -> anyhow::Result<Lengths> {
    let config = Qwen25VlConfig::from_file(&model.join("config.json"))?;
    let tokenizer = ChatTokenizer::load(model, &config.eos_token_id)?;
    let processor = ImageProcessor::from_checkpoint(model)?;
    let rows = stages_task::dataset::read_split(data)?;
    let prompt = PromptEncoder { tokenizer: &tokenizer, processor: &processor, variant: PromptVariant::Think }
        .encode(&rows[0])?;
    let patches = prompt.pixel_values.as_ref().map_or(0, |p| p.size()[0] as u64);
    Ok(if mode == "sft" {
        let ex = Encoder { tokenizer: &tokenizer, processor: &processor, params: &r.sft }.encode(&rows[0])?;
        Lengths { prompt: prompt.ids.len() as u64, patches, completion: (ex.ids.len() - prompt.ids.len()) as u64 }
    } else {
        Lengths { prompt: prompt.ids.len() as u64, patches, completion: r.grpo.max_completion_length as u64 }
    })
}

fn measure(mode: &str, dir: &Path, a: &Args) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let r = run_params(mode, a)?;
    // Warm-up on a tiny model: kernels and pools paged in before the baseline.
    let tiny = work.path().join("tiny");
    make(&tiny, &Args::new())?;
    let mut tiny_args = Args::from([("batch".into(), "1".into())]);
    if r.cuda {
        tiny_args.insert("device".into(), "cuda".into());
    }
    let small = Run { items: 2, side: 56, ..run_params(mode, &tiny_args)? };
    let wdata = split(&work.path().join("wdata"), small.items, small.side)?;
    run_stage(mode, &tiny, &wdata, &work.path().join("wout"), &small)?;

    let data = split(&work.path().join("data"), r.items, r.side)?;
    let len = lengths(mode, dir, &data, &r)?;
    let model = ModelFacts::read(dir).map_err(anyhow::Error::msg)?;
    let precision = if r.cuda { Precision::Bf16 } else { Precision::F32 };
    let checkpointing = match mode {
        "sft" => r.sft.memory_settings().map_err(anyhow::Error::msg)?.parallel.checkpointing,
        _ => r.grpo.memory_settings().map_err(anyhow::Error::msg)?.parallel.checkpointing,
    };
    let w = Where { ranks: 1, cuda: r.cuda, data: Some(split_size(&data)?), shard: Shard::None, checkpointing };
    let pred: MemoryPrediction = match mode {
        "sft" => sft_prediction(&r.sft.memory_settings().map_err(anyhow::Error::msg)?, &model, precision, len, &w),
        _ => grpo_prediction(&r.grpo.memory_settings().map_err(anyhow::Error::msg)?, &model, precision, len, &w),
    }
    .map_err(anyhow::Error::msg)?;
    if r.cuda {
        // The warm-up's cached blocks stay reserved: measure growth from here.
        let before = cuda_used_bytes()?;
        run_stage(mode, dir, &data, &work.path().join("out"), &r)?;
        let after = cuda_used_bytes()?;
        let predicted = pred.gpu_peak_bytes().unwrap_or(0);
        let measured = after.saturating_sub(before);
        let mib = |b: u64| (b as f64 / 1048576.0 * 10.0).round() / 10.0;
        println!(
            "{}",
            serde_json::json!({
                "mode": mode, "device": "cuda", "model": dir.display().to_string(), "args": a,
                "lengths": {"prompt": len.prompt, "patches": len.patches, "completion": len.completion},
                "used_before_mib": mib(before), "used_after_mib": mib(after), "measured_mib": mib(measured),
                "predicted_mib": mib(predicted), "ratio": (predicted as f64 / measured.max(1) as f64 * 1000.0).round() / 1000.0,
            })
        );
        return Ok(());
    }
    // SAFETY: glibc's malloc_trim only returns free heap pages to the OS.
    unsafe { malloc_trim(0) };
    let baseline = status_kib("VmRSS:")? * 1024;
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
    run_stage(mode, dir, &data, &work.path().join("out"), &r)?;
    let peak = status_kib("VmHWM:")? * 1024;
    // With glibc's retention allowance (what admission uses), and without it
    // (live tensors: what MALLOC_MMAP_THRESHOLD_ runs measure).
    let predicted = pred.host_peak_bytes() - RUNTIME_CPU_BYTES;
    let retained: u64 =
        pred.host.peak_phase().map_or(0, |p| p.terms.iter().filter(|t| t.name == RETENTION).map(|t| t.bytes).sum());
    let live = predicted - retained;
    let measured = peak - baseline;
    let mib = |b: u64| (b as f64 / 1048576.0 * 10.0).round() / 10.0;
    let phase = pred.host.peak_phase().map(|p| p.name.clone()).unwrap_or_default();
    let terms: serde_json::Map<String, serde_json::Value> = pred
        .host
        .resident
        .iter()
        .chain(pred.host.peak_phase().map(|p| p.terms.as_slice()).unwrap_or(&[]))
        .map(|t| (t.name.clone(), mib(t.bytes).into()))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "mode": mode, "model": dir.display().to_string(), "args": a,
            "lengths": {"prompt": len.prompt, "patches": len.patches, "completion": len.completion},
            "baseline_mib": mib(baseline), "peak_mib": mib(peak), "measured_mib": mib(measured),
            "predicted_mib": mib(predicted), "predicted_live_mib": mib(live),
            "ratio": (predicted as f64 / measured.max(1) as f64 * 1000.0).round() / 1000.0,
            "ratio_live": (live as f64 / measured.max(1) as f64 * 1000.0).round() / 1000.0,
            "peak_phase": phase, "terms_mib": terms,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(dir)) = (argv.first(), argv.get(1)) else {
        bail!("usage: memory_probe make|sft|grpo DIR key=value...");
    };
    let mut args = Args::new();
    for kv in &argv[2..] {
        let (k, v) = kv.split_once('=').with_context(|| format!("`{kv}`: expected key=value"))?;
        args.insert(k.to_string(), v.to_string());
    }
    if is_cuda(&args) {
        load_cuda()?;
    }
    tch::set_num_threads(1);
    let dir = PathBuf::from(dir);
    match mode.as_str() {
        "make" => make(&dir, &args),
        "sft" | "grpo" => measure(mode, &dir, &args),
        _ => bail!("mode must be make, sft or grpo, got {mode}"),
    }
}
