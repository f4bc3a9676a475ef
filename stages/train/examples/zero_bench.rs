//! Per-rank memory and step time of SFT with `shard = none | optimizer |
//! gradients` on 2 CPU ranks (separate processes over TCP, as the engine
//! runs them), for docs/benchmarks.md. Not a test: timings on a shared
//! machine are noisy.
//!
//! ```text
//! cargo run -p stages-train --example zero_bench -- <dir> [float32|bfloat16]
//! ```
//! prepares a model (LM MLPs of 37.7 M parameters, the trainable set) and a
//! split in `<dir>` once, then for each level starts 2 rank processes of
//! itself and prints one markdown row per rank: the optimizer state it
//! allocated (AdamW moments + f32 masters, bytes of tensors), its peak RSS
//! (VmHWM) and the median step time.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use stage_api::{DistInfo, StageContext, StageKind};
use stages_task::dataset::{VqaRow, write_rows};
use stages_task::prompt::THINK_TEMPLATE;
use stages_train::Sft;
use stages_train::sft::{SftParams, Target};
use stages_train::trainer::ShardLevel;
use stages_vlm::InitModel;
use stages_vlm::init_model::InitModelParams;

const WORLD: usize = 2;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, rank, shard, dir, dtype] if flag == "--rank" => rank_main(rank.parse()?, shard, Path::new(dir), dtype),
        [dir] => driver(Path::new(dir), "float32"),
        [dir, dtype] => driver(Path::new(dir), dtype),
        _ => bail!("usage: zero_bench <dir> [float32|bfloat16]"),
    }
}

fn driver(dir: &Path, dtype: &str) -> anyhow::Result<()> {
    prepare(dir)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!(
        "| shard | dtype | rank | optimizer state (MiB) | gradient shard (MiB) | peak RSS (MiB) | step (s, median) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for shard in ["none", "optimizer", "gradients"] {
        let run = dir.join(format!("run-{shard}-{dtype}"));
        let _ = std::fs::remove_dir_all(&run);
        let exe = std::env::current_exe()?;
        let children: Vec<_> = (0..WORLD)
            .map(|rank| {
                Command::new(&exe)
                    .args(["--rank", &rank.to_string(), shard, &run.to_string_lossy(), dtype])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        for (rank, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("rank {rank} of shard = {shard} failed");
            }
            let row: serde_json::Value = serde_json::from_slice(&out.stdout).context("a rank's report")?;
            let mib = |k: &str| row[k].as_f64().unwrap_or(0.0) / 1048576.0;
            println!(
                "| {shard} | {dtype} | {rank} | {:.1} | {:.1} | {:.0} | {:.3} |",
                mib("state_bytes"),
                mib("grad_shard_bytes"),
                mib("peak_rss"),
                row["step_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

fn rank_main(rank: usize, shard: &str, run: &Path, dtype: &str) -> anyhow::Result<()> {
    let shard: ShardLevel = serde_json::from_value(serde_json::json!(shard))?;
    let dir = run.parent().context("run dir")?;
    let rendezvous = run.join("rendezvous");
    std::fs::create_dir_all(&rendezvous)?;
    let dist = DistInfo { rank, world_size: WORLD, rendezvous, token: "bench".into() };
    let params = SftParams {
        target: Target::ThinkAnswer,
        lr: 1e-4,
        epochs: 3,
        batch_size: 2,
        grad_accum: 2,
        dtype: dtype.into(),
        shard,
        ..Default::default()
    };
    Sft::validate(&params).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut ctx = StageContext::builder("sft", run.join(format!("rank-{rank}")))
        .input("model", "init", None, dir.join("init"))
        .input("data", "export", Some("train"), dir.join("train"))
        .resume_dir(run.join("resume"))
        .threads(1)
        .dist(Some(dist))
        .seed(1)
        .build()?;
    Sft::run(&params, &mut ctx)?;
    let notes = ctx.notes();
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let report = serde_json::json!({
        "state_bytes": notes["optimizer_state_bytes"],
        "grad_shard_bytes": notes.get("gradient_shard_bytes").cloned().unwrap_or(0.into()),
        "peak_rss": kib("VmHWM:") * 1024.0,
        "step_s": notes["timing"]["step_s_median"],
    });
    println!("{report}");
    Ok(())
}

/// The model (init_model: LM MLPs 6 × 3 × 256 × 8192 = 37.7 M parameters)
/// and a 16-row split, once.
fn prepare(dir: &Path) -> anyhow::Result<()> {
    let init = dir.join("init");
    if init.join("model.safetensors").exists() {
        return Ok(());
    }
    let problem = THINK_TEMPLATE.replace(
        "{Question}",
        "What abnormality is visible in this chest CT slice? Options: A. airway B. emphysema C. ground-glass",
    );
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus)?;
    std::fs::write(corpus.join("qa.txt"), format!("{problem}\n").repeat(4))?;
    let mut ctx = StageContext::builder("init", &init).input("corpus", "c", None, &corpus).seed(3).build()?;
    let p = InitModelParams {
        vocab_size: 300,
        hidden_size: 256,
        intermediate_size: 8192,
        num_hidden_layers: 6,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        mrope_section: [8, 12, 12],
        ..Default::default()
    };
    InitModel::run(&p, &mut ctx)?;
    let rows: Vec<VqaRow> = (0..16)
        .map(|i| VqaRow {
            id: format!("case{i}"),
            image: Some(png(56, (i % 3 * 100) as u8)),
            problem: problem.clone(),
            answer: ["A", "B", "C"][i % 3].to_string(),
            answers: Vec::new(),
            options: vec!["A. airway".into(), "B. emphysema".into(), "C. ground-glass".into()],
            class: "c".into(),
            class_name: ["airway", "emphysema", "ground-glass"][i % 3].into(),
        })
        .collect();
    let train: PathBuf = dir.join("train");
    std::fs::create_dir_all(&train)?;
    write_rows(&train.join("train-00000-of-00001.parquet"), &rows)?;
    Ok(())
}

fn png(side: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([shade, (x * 9) as u8, (y * 5) as u8]));
    let mut bytes = Vec::new();
    let _ =
        image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png);
    bytes
}
