//! `pipeline model ...`: try a checkpoint before a long run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use tch::{Device, Kind, Tensor};

use stages_vlm::chat::{ChatTokenizer, Message};
use stages_vlm::checkpoint;
use stages_vlm::device::{DTYPES, Dtype};
use stages_vlm::generate::{GenerationConfig, generate};
use stages_vlm::model::{Batch, Qwen25Vl};
use stages_vlm::pretrained::Pretrained;
use stages_vlm::processor::open_image;

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Run the image processor, chat template and generation on one prompt.
    Generate(GenerateArgs),
    /// Re-save a checkpoint (dtype, shard size) through the Rust loader/saver.
    Convert(ConvertArgs),
    /// Time prefill and greedy decoding of a prompt.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// HF checkpoint directory (config.json, *.safetensors, tokenizer.json, ...).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// cpu | cuda | auto
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

#[derive(Debug, clap::Args)]
pub struct PromptArgs {
    /// Image file(s) (PNG/JPEG), placed before the prompt text.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Optional system message (the template's default otherwise).
    #[arg(long)]
    pub system: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write prefill logits, pixel_values, image_grid_thw and input_ids here (safetensors).
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub out: PathBuf,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_shard_mb: u64,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Prompts in the batch (copies of the prompt).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed prefill repetitions; 0 = only load and report memory.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// torch intra-op threads (0 = libtorch default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

fn device_and_kind(args: &ModelArgs) -> anyhow::Result<(Device, Kind)> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => bail!("--device cuda: no CUDA device is available to libtorch"),
        "auto" => Device::cuda_if_available(),
        other => bail!("--device: expected cpu, cuda or auto, got {other:?}"),
    };
    let Ok(dtype) = args.dtype.parse::<Dtype>() else {
        bail!("--dtype: expected {DTYPES}, got {:?}", args.dtype);
    };
    Ok((device, dtype.kind(device)))
}

fn load(args: &ModelArgs) -> anyhow::Result<Pretrained> {
    let (device, kind) = device_and_kind(args)?;
    Ok(Pretrained::load(&args.checkpoint, kind, device)?)
}

/// Processed prompt tensors, kept alive for a `Batch` borrowing them.
struct Prepared {
    input_ids: Tensor,
    attention_mask: Tensor,
    pixel_values: Option<Tensor>,
    grid: Vec<[i64; 3]>,
}

impl Prepared {
    fn batch(&self) -> Batch<'_> {
        Batch {
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
            pixel_values: self.pixel_values.as_ref(),
            image_grid_thw: &self.grid,
        }
    }
}

fn prepare(l: &Pretrained, p: &PromptArgs, copies: usize) -> anyhow::Result<Prepared> {
    let images = p.image.iter().map(|f| open_image(f)).collect::<Result<Vec<_>, _>>()?;
    let mut messages = Vec::new();
    if let Some(s) = &p.system {
        messages.push(Message::text("system", s));
    }
    messages.push(Message::user_with_images(images.len(), &p.prompt));
    let text = l.tokenizer.render(&messages, true)?;
    let (text, pixel_values, grid) = if images.is_empty() {
        (text, None, Vec::new())
    } else {
        let vis = l.processor.process(&images)?;
        let counts = vis.tokens_per_image(l.processor.merge_size);
        let pv = vis.pixel_values.repeat([copies as i64, 1]);
        let grid: Vec<[i64; 3]> = (0..copies).flat_map(|_| vis.grid_thw.iter().copied()).collect();
        (ChatTokenizer::expand_image_pads(&text, &counts)?, Some(pv), grid)
    };
    let enc = l.tokenizer.encode_batch(&vec![text; copies])?;
    Ok(Prepared { input_ids: enc.input_ids, attention_mask: enc.attention_mask, pixel_values, grid })
}

fn write_dump(path: &Path, prep: &Prepared, logits: &Tensor) -> anyhow::Result<()> {
    let mut named: Vec<(&str, Tensor)> = vec![
        ("logits", logits.to_kind(Kind::Float).to_device(Device::Cpu)),
        ("input_ids", prep.input_ids.shallow_clone()),
        ("attention_mask", prep.attention_mask.shallow_clone()),
    ];
    if let Some(pv) = &prep.pixel_values {
        named.push(("pixel_values", pv.shallow_clone()));
        let flat: Vec<i64> = prep.grid.iter().flatten().copied().collect();
        named.push(("image_grid_thw", Tensor::from_slice(&flat).view([-1, 3])));
    }
    Tensor::write_safetensors(&named, path).with_context(|| format!("writing {}", path.display()))
}

pub fn model_main(cmd: &ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Generate(a) => {
            let l = load(&a.model)?;
            let prep = prepare(&l, &a.prompt, 1)?;
            if let Some(path) = &a.dump_logits {
                let logits = tch::no_grad(|| l.model.forward(&prep.batch()))?;
                write_dump(path, &prep, &logits)?;
                tracing::info!(path = %path.display(), "wrote prefill logits");
            }
            let cfg = GenerationConfig {
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                top_k: a.top_k,
                seed: a.seed,
                eos_token_ids: l.tokenizer.eos_ids.iter().map(|&e| e as i64).collect(),
                ..Default::default()
            };
            let out = generate(&l.model, Some(&l.tokenizer), &prep.batch(), &cfg)?;
            for c in out {
                println!("{}", c.text);
            }
            Ok(())
        }
        ModelCommand::Convert(a) => {
            let (_, kind) = device_and_kind(&a.model)?;
            let model = Qwen25Vl::load(&a.model.checkpoint, kind, Device::Cpu)?;
            let files = model.save(&a.out, kind, a.max_shard_mb * 1024 * 1024)?;
            let copied = checkpoint::copy_aux_files(&a.model.checkpoint, &a.out)?;
            println!("wrote {} ({} weight files, copied {})", a.out.display(), files.len() - 1, copied.join(", "));
            Ok(())
        }
        ModelCommand::Bench(a) => bench(a),
    }
}

fn bench(a: &BenchArgs) -> anyhow::Result<()> {
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let t0 = Instant::now();
    let l = load(&a.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let load_peak_rss_mb = peak_rss_mb();
    if a.iters == 0 {
        // Load-only: how much memory a checkpoint needs (docs/benchmarks.md).
        let bytes: usize = l.model.params.values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum();
        let report = serde_json::json!({"impl": "rust-tch", "load_s": load_s, "load_peak_rss_mb": load_peak_rss_mb,
            "param_mb": bytes as f64 / (1024.0 * 1024.0), "dtype": format!("{:?}", l.model.kind)});
        println!("{report}");
        return Ok(());
    }
    let prep = prepare(&l, &a.prompt, a.batch)?;
    let sync = || {
        if let Device::Cuda(i) = l.model.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let _warmup = tch::no_grad(|| l.model.forward(&prep.batch()))?;
    sync();
    let t0 = Instant::now();
    for _ in 0..a.iters.max(1) {
        let _logits = tch::no_grad(|| l.model.forward(&prep.batch()))?;
    }
    sync();
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3 / a.iters.max(1) as f64;
    let cfg = GenerationConfig { max_new_tokens: a.new_tokens, stop_strings: vec![], ..Default::default() };
    let t0 = Instant::now();
    let out = generate(&l.model, None, &prep.batch(), &cfg)?;
    sync();
    let gen_s = t0.elapsed().as_secs_f64();
    let tokens: usize = out.iter().map(|c| c.token_ids.len()).sum();
    let report = serde_json::json!({
        "impl": "rust-tch", "threads": tch::get_num_threads(), "device": format!("{:?}", l.model.device),
        "dtype": format!("{:?}", l.model.kind), "prompt_tokens": prep.input_ids.size(), "load_s": load_s,
        "load_peak_rss_mb": load_peak_rss_mb,
        "prefill_ms": prefill_ms, "generate_tokens_per_s": tokens as f64 / gen_s,
        "generate_new_tokens": tokens, "generate_s": gen_s,
    });
    println!("{report}");
    Ok(())
}

/// Peak resident set size of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
