//! One phase of `tools/gpu_check.sh` (issue 15 item 6), through the stages'
//! own code: `Sft::run` and `Grpo::run` with `gradient_checkpointing`, on a
//! random checkpoint with Qwen2.5-VL-7B shapes (or, with `--small`, a tiny
//! one so the script can be tried on a CPU in a couple of minutes).
//!
//! ```text
//! step_check --phase init   --work DIR [--small] [--device cuda]   checkpoint + 8-row split
//! step_check --phase sft    --work DIR [--dist]  ...               SFT steps (LM MLPs, as full.toml)
//! step_check --phase grpo   --work DIR [--dist]  ...               GRPO steps (G completions of N tokens)
//! step_check --phase decode --work DIR           ...               generate G × N tokens, timed
//! ```
//!
//! Each phase appends one JSON line to `DIR/results.jsonl`: what ran, the
//! stage's own step timing (`ctx.note("timing")`: the first step, then the
//! median of the others), the process's peak RSS, and for SFT the model FLOPs
//! utilisation `6 · N · tokens/s / peak` (N = parameters outside the vision
//! tower and the embedding table; the PaLM convention, recomputation not
//! counted as useful work) when `--peak-tflops` is given. Peak CUDA memory is
//! sampled from outside (nvidia-smi) by the script: tch does not expose
//! libtorch's allocator statistics.
//!
//! `--dist` runs the stage as rank 0 of a world of 1 (`DistInfo`), so the
//! collective is the TCP one on the CPU and NCCL on CUDA (build with
//! `--features nccl`): the data-parallel code path with one process.
//!
//! The 7B checkpoint: `init_model` trains the tokenizer and writes the
//! processor files (tiny weights), then the weights are drawn again, in the
//! run dtype on the run device, for the 7B config with the full 152,064-token
//! vocabulary (the tokenizer only uses the first few hundred ids).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use stage_api::{DistInfo, StageContext, StageKind};
use stages_task::dataset::{VqaRow, write_rows};
use stages_task::prompt::THINK_TEMPLATE;
use stages_train::grpo::GrpoParams;
use stages_train::sft::{SftParams, Target};
use stages_train::{Grpo, Sft};
use stages_vlm::device::DeviceChoice;
use stages_vlm::generate::{GenerationConfig, generate};
use stages_vlm::init_model::InitModelParams;
use stages_vlm::model::param_shapes;
use stages_vlm::{Batch, InitModel, Pretrained, Qwen25Vl, Qwen25VlConfig};
use tch::{Device, Kind, Tensor};

/// The paper's SFT set: the language model's MLPs.
const MLP: &str = r"^model\.language_model\.layers\.\d+\.mlp\.";

struct Args {
    phase: String,
    work: PathBuf,
    small: bool,
    cuda: bool,
    dist: bool,
    group: usize,
    completion: usize,
    steps: usize,
    batch: usize,
    threads: usize,
    peak_tflops: Option<f64>,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        phase: String::new(),
        work: PathBuf::new(),
        small: false,
        cuda: false,
        dist: false,
        group: 5,
        completion: 256,
        steps: 2,
        batch: 4,
        threads: 0,
        peak_tflops: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--small" => a.small = true,
            "--dist" => a.dist = true,
            _ => {
                let value = it.next().with_context(|| format!("{flag} needs a value"))?;
                let number =
                    |v: &str| v.parse::<usize>().with_context(|| format!("{flag}: expected a count, got {v:?}"));
                match flag.as_str() {
                    "--phase" => a.phase = value,
                    "--work" => a.work = value.into(),
                    "--device" => {
                        a.cuda = match value.as_str() {
                            "cuda" => true,
                            "cpu" => false,
                            other => bail!("--device: cpu or cuda, got {other:?}"),
                        }
                    }
                    "--group" => a.group = number(&value)?,
                    "--completion" => a.completion = number(&value)?,
                    "--steps" => a.steps = number(&value)?,
                    "--batch" => a.batch = number(&value)?,
                    "--threads" => a.threads = number(&value)?,
                    "--peak-tflops" => {
                        a.peak_tflops = Some(
                            value
                                .parse()
                                .with_context(|| format!("--peak-tflops: expected a number, got {value:?}"))?,
                        )
                    }
                    other => bail!("unknown flag {other}"),
                }
            }
        }
    }
    if a.work.as_os_str().is_empty() {
        bail!("--work DIR is required");
    }
    Ok(a)
}

impl Args {
    fn device(&self) -> stage_api::Device {
        if self.cuda { stage_api::Device::Cuda(0) } else { stage_api::Device::Cpu }
    }

    fn torch_device(&self) -> Device {
        if self.cuda { Device::Cuda(0) } else { Device::Cpu }
    }

    /// bf16 as on the paper's GPUs; f32 for the CPU try-out (CPU bf16 matmuls are slow).
    fn dtype(&self) -> &'static str {
        if self.cuda { "bfloat16" } else { "float32" }
    }

    fn kind(&self) -> Kind {
        if self.cuda { Kind::BFloat16 } else { Kind::Float }
    }

    fn threads(&self) -> usize {
        if self.threads > 0 { self.threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) }
    }

    fn model_dir(&self) -> PathBuf {
        self.work.join("model")
    }

    fn split_dir(&self) -> PathBuf {
        self.work.join("train")
    }

    /// A stage context as the engine builds one (device, threads, optional rank 0 of 1).
    fn context(&self, stage: &str) -> anyhow::Result<StageContext> {
        let out = self.work.join(stage);
        if out.exists() {
            std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
        }
        let dist = self.dist.then(|| {
            let rendezvous = self.work.join(format!("{stage}.rendezvous"));
            DistInfo { rank: 0, world_size: 1, rendezvous, token: format!("step_check/{stage}") }
        });
        if let Some(d) = &dist {
            if d.rendezvous.exists() {
                std::fs::remove_dir_all(&d.rendezvous)?;
            }
            std::fs::create_dir_all(&d.rendezvous)?;
        }
        StageContext::builder(stage, &out)
            .input("model", "init", None, self.model_dir())
            .input("data", "export", Some("train"), self.split_dir())
            .resume_dir(self.work.join(format!("{stage}.resume")))
            .seed(7)
            .threads(self.threads())
            .device(self.device())
            .dist(dist)
            .build()
    }
}

/// Qwen2.5-VL-7B-Instruct's shapes (docs/scaling.md), or a tiny model.
fn init_params(small: bool) -> InitModelParams {
    let base = InitModelParams { vocab_size: 400, ..Default::default() };
    if small {
        return InitModelParams { num_hidden_layers: 4, vision_depth: 4, fullatt_block_indexes: vec![3], ..base };
    }
    InitModelParams {
        hidden_size: 3584,
        intermediate_size: 18944,
        num_hidden_layers: 28,
        num_attention_heads: 28,
        num_key_value_heads: 4,
        mrope_section: [16, 24, 24],
        vision_depth: 32,
        vision_hidden_size: 1280,
        vision_intermediate_size: 3420,
        vision_num_heads: 16,
        window_size: 112,
        fullatt_block_indexes: vec![7, 15, 23, 31],
        // Up to 256 visual tokens per image (a 448 × 448 render).
        min_pixels: 56 * 56,
        max_pixels: 28 * 28 * 256,
        ..base
    }
}

const VOCAB_7B: i64 = 152_064;
/// Above the tiny tokenizer's ids, so the padding rows of the embedding exist as at 7B.
const VOCAB_SMALL: i64 = 1024;

fn png(side: u32, shade: u8) -> anyhow::Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([shade, (x * 9) as u8, (y * 5) as u8]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

fn question() -> String {
    THINK_TEMPLATE.replace(
        "{Question}",
        "Which lesion is shown?\nOptions:\nA. airway abnormalities\nB. emphysema\nC. ground-glass opacity",
    )
}

/// Tokenizer + processor from `init_model`, 7B weights drawn on the run device, 8 rows.
fn init(a: &Args) -> anyhow::Result<serde_json::Value> {
    let corpus = a.work.join("corpus");
    std::fs::create_dir_all(&corpus)?;
    std::fs::write(corpus.join("qa.txt"), format!("{}\n", question()).repeat(4))?;
    let dir = a.model_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let p = init_params(a.small);
    InitModel::validate(&p).map_err(|e| anyhow::anyhow!("init_model params: {e}"))?;
    let mut ctx = StageContext::builder("init", &dir).input("corpus", "c", None, &corpus).seed(3).build()?;
    let t0 = Instant::now();
    // init_model draws f32 weights on the CPU (33 GB at 7B): write its files
    // with one decoder layer and one vision block, then draw the weights of
    // the full config in the run dtype on the run device.
    let shallow = InitModelParams {
        num_hidden_layers: 1,
        vision_depth: 1,
        fullatt_block_indexes: vec![0],
        intermediate_size: 64,
        vision_intermediate_size: 64,
        ..p.clone()
    };
    InitModel::run(&shallow, &mut ctx)?;
    let path = dir.join("config.json");
    let mut raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let set = |raw: &mut serde_json::Value, key: &str, v: serde_json::Value| {
        if let Some(o) = raw.as_object_mut() {
            o.insert(key.into(), v);
        }
    };
    set(&mut raw, "num_hidden_layers", p.num_hidden_layers.into());
    set(&mut raw, "intermediate_size", p.intermediate_size.into());
    set(&mut raw, "vocab_size", (if a.small { VOCAB_SMALL } else { VOCAB_7B }).into());
    let vision = raw.get_mut("vision_config").context("config.json has no vision_config")?;
    set(vision, "depth", p.vision_depth.into());
    set(vision, "intermediate_size", p.vision_intermediate_size.into());
    set(vision, "fullatt_block_indexes", serde_json::json!(p.fullatt_block_indexes));
    let config = Qwen25VlConfig::from_value(raw, &path)?;
    for f in std::fs::read_dir(&dir)? {
        let f = f?.path();
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            std::fs::remove_file(&f)?;
        }
    }
    let model = Qwen25Vl::random(config, 3, a.kind(), a.torch_device())?;
    model.save(&dir, a.kind(), 4096 * 1024 * 1024)?;
    let params: usize = model.params.values().map(Tensor::numel).sum();
    drop(model);
    let rows: Vec<VqaRow> = (0..8)
        .map(|i| {
            Ok(VqaRow {
                id: format!("case{i}/slice{i}"),
                image: Some(png(if a.small { 56 } else { 448 }, (i * 30) as u8)?),
                problem: question(),
                answer: ["A", "B", "C"][i % 3].into(),
                answers: Vec::new(),
                options: ["A. airway abnormalities", "B. emphysema", "C. ground-glass opacity"]
                    .map(String::from)
                    .to_vec(),
                class: ["airway", "emphysema", "ggo"][i % 3].into(),
                class_name: ["airway abnormalities", "emphysema", "ground-glass opacity"][i % 3].into(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    std::fs::create_dir_all(a.split_dir())?;
    write_rows(&a.split_dir().join("train-00000-of-00001.parquet"), &rows)?;
    Ok(serde_json::json!({"parameters": params, "seconds": t0.elapsed().as_secs_f64()}))
}

/// Parameters a token's forward multiplies by (not the vision tower, not the embedding lookup).
fn flop_params(a: &Args) -> anyhow::Result<i64> {
    let config = Qwen25VlConfig::from_file(&a.model_dir().join("config.json"))?;
    Ok(param_shapes(&config)
        .iter()
        .filter(|(n, _)| !n.starts_with("model.visual.") && !n.contains("embed_tokens"))
        .map(|(_, shape)| shape.iter().product::<i64>())
        .sum())
}

fn sft(a: &Args) -> anyhow::Result<serde_json::Value> {
    let n = flop_params(a)?;
    let mut ctx = a.context("sft")?;
    let p = SftParams {
        target: Target::Answer,
        trainable: vec![MLP.into()],
        batch_size: a.batch,
        max_steps: Some(a.steps),
        epochs: a.steps,
        device: if a.cuda { DeviceChoice::Cuda } else { DeviceChoice::Cpu },
        dtype: a.dtype().into(),
        gradient_checkpointing: true,
        ..Default::default()
    };
    Sft::validate(&p).map_err(|e| anyhow::anyhow!("sft params: {e}"))?;
    let t0 = Instant::now();
    Sft::run(&p, &mut ctx)?;
    let timing = ctx.notes().get("timing").cloned().unwrap_or_default();
    let mfu = match (timing.get("tokens_per_s_median").and_then(serde_json::Value::as_f64), a.peak_tflops) {
        (Some(rate), Some(peak)) => Some(6.0 * n as f64 * rate / (peak * 1e12)),
        _ => None,
    };
    Ok(serde_json::json!({"timing": timing, "stage_s": t0.elapsed().as_secs_f64(), "flop_parameters": n,
        "batch_size": a.batch, "mfu": mfu, "peak_tflops": a.peak_tflops}))
}

fn grpo(a: &Args) -> anyhow::Result<serde_json::Value> {
    let mut ctx = a.context("grpo")?;
    let p = GrpoParams {
        steps: a.steps,
        prompts_per_step: 1,
        num_generations: a.group,
        micro_batch_size: a.group,
        max_completion_length: a.completion,
        mask_truncated_completions: false,
        trainable: vec![MLP.into()],
        checkpoint_every: 0,
        device: if a.cuda { DeviceChoice::Cuda } else { DeviceChoice::Cpu },
        dtype: a.dtype().into(),
        gradient_checkpointing: true,
        ..Default::default()
    };
    Grpo::validate(&p).map_err(|e| anyhow::anyhow!("grpo params: {e}"))?;
    let t0 = Instant::now();
    Grpo::run(&p, &mut ctx)?;
    let timing = ctx.notes().get("timing").cloned().unwrap_or_default();
    Ok(serde_json::json!({"timing": timing, "stage_s": t0.elapsed().as_secs_f64(), "beta": p.beta,
        "completion_tokens": a.completion, "group": a.group}))
}

/// G completions of exactly `--completion` tokens (no end token) after one
/// 384-token prompt: ms per decode step of the whole group.
fn decode(a: &Args) -> anyhow::Result<serde_json::Value> {
    let device = a.torch_device();
    let Pretrained { model, .. } = Pretrained::load(&a.model_dir(), a.kind(), device)?;
    let prompt = 384;
    let ids = Tensor::arange_start(300, 300 + prompt, (Kind::Int64, Device::Cpu)).remainder(350).view([1, prompt]);
    let mask = Tensor::ones([1, prompt], (Kind::Int64, Device::Cpu));
    let batch = Batch { input_ids: &ids, attention_mask: &mask, pixel_values: None, image_grid_thw: &[] };
    let cfg = GenerationConfig {
        max_new_tokens: a.completion,
        temperature: 1.0,
        num_return_sequences: a.group,
        eos_token_ids: Vec::new(),
        stop_strings: Vec::new(),
        ..Default::default()
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let time = |f: &dyn Fn() -> anyhow::Result<usize>| -> anyhow::Result<(f64, usize)> {
        sync();
        let t0 = Instant::now();
        let n = f()?;
        sync();
        Ok((t0.elapsed().as_secs_f64(), n))
    };
    let prefill = || tch::no_grad(|| model.prefill(&batch, true)).map(|_| 0).map_err(anyhow::Error::from);
    let gen_all = || -> anyhow::Result<usize> {
        let out = generate(&model, None, &batch, &cfg)?;
        Ok(out.iter().map(|c| c.token_ids.len()).max().unwrap_or(0))
    };
    time(&prefill)?; // warm-up
    let (prefill_s, _) = time(&prefill)?;
    let (generate_s, steps) = time(&gen_all)?;
    let ms = 1000.0 * (generate_s - prefill_s).max(0.0) / steps.max(1) as f64;
    Ok(serde_json::json!({"prompt": prompt, "group": a.group, "decode_steps": steps, "prefill_s": prefill_s,
        "generate_s": generate_s, "decode_ms_per_token": ms}))
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    std::fs::create_dir_all(&a.work).with_context(|| format!("creating {}", a.work.display()))?;
    if a.cuda && !tch::Cuda::is_available() {
        bail!("--device cuda: libtorch sees no CUDA device (is a CUDA libtorch on LD_LIBRARY_PATH?)");
    }
    let result = match a.phase.as_str() {
        "init" => init(&a)?,
        "sft" => sft(&a)?,
        "grpo" => grpo(&a)?,
        "decode" => decode(&a)?,
        other => bail!("--phase: init, sft, grpo or decode, got {other:?}"),
    };
    let line = serde_json::json!({
        "phase": a.phase, "small": a.small, "device": if a.cuda { "cuda" } else { "cpu" }, "dtype": a.dtype(),
        "world_size_1_collective": a.dist, "threads": a.threads(), "peak_rss_mib": peak_rss_mib(), "result": result,
    });
    println!("{line}");
    append(&a.work.join("results.jsonl"), &line)
}

fn append(path: &Path, line: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{line}")?;
    Ok(())
}
