//! Decode throughput of the rollout loop (docs/benchmarks.md, "Rollouts"):
//! one prompt, a group of `--group` sampled completions with uneven lengths,
//! on a random model with Qwen2.5-VL-7B decoder shapes (`--layers` decoder
//! layers, full vocabulary unless `--vocab`), for each [`DecodeLoop`]:
//! the loop before issue 15 (host sampler, finished rows kept), each change
//! alone, and both (the default). The loops draw the same tokens up to the
//! last bits of the logits (dropping rows changes the matmuls' batch shape),
//! so completions can differ by a few tokens: `same_completions` says whether
//! they match the first loop's; rates are tokens per second of decoding.
//!
//! Lengths: temperature 1 over near-uniform random logits, with `--end-tokens`
//! end-of-sequence ids spread over the vocabulary, so completions stop after a
//! geometric number of tokens (mean ≈ vocab / end-tokens), cut at `--max-new`.
//!
//! ```sh
//! CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo run -p stages-vlm --example decode_bench -- --layers 1 --threads 2
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use stages_vlm::generate::{DecodeLoop, GenerationConfig, SamplerSite, generate_with};
use stages_vlm::model::param_shapes;
use stages_vlm::{Batch, Qwen25Vl, Qwen25VlConfig};
use tch::{Device, Kind, Tensor};

struct Args {
    layers: i64,
    vocab: i64,
    prompt: i64,
    group: usize,
    max_new: usize,
    end_tokens: i64,
    threads: i32,
    seed: u64,
    repeats: usize,
    cuda: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        layers: 1,
        vocab: 152_064,
        prompt: 384,
        group: 5,
        max_new: 128,
        end_tokens: 3000,
        threads: 0,
        seed: 1,
        repeats: 2,
        cuda: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--cuda" {
            a.cuda = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = |e: std::num::ParseIntError| anyhow::anyhow!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--layers" => a.layers = value.parse().map_err(bad)?,
            "--vocab" => a.vocab = value.parse().map_err(bad)?,
            "--prompt" => a.prompt = value.parse().map_err(bad)?,
            "--group" => a.group = value.parse().map_err(bad)?,
            "--max-new" => a.max_new = value.parse().map_err(bad)?,
            "--end-tokens" => a.end_tokens = value.parse().map_err(bad)?,
            "--threads" => a.threads = value.parse().map_err(bad)?,
            "--seed" => a.seed = value.parse().map_err(bad)?,
            "--repeats" => a.repeats = value.parse().map_err(bad)?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Qwen2.5-VL-7B's decoder (hidden 3584, MLP 18944, 28 heads, 4 KV heads).
fn model(a: &Args, device: Device, kind: Kind) -> anyhow::Result<Qwen25Vl> {
    let raw = serde_json::json!({
        "model_type": "qwen2", "vocab_size": a.vocab, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": a.layers, "num_attention_heads": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "tie_word_embeddings": false, "eos_token_id": 0
    });
    let config = Qwen25VlConfig::from_value(raw, Path::new("7B-shaped decoder"))?;
    tch::manual_seed(0);
    let params: BTreeMap<String, Tensor> = param_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.contains("norm") {
                Tensor::ones(&shape, (kind, device))
            } else {
                Tensor::randn(&shape, (kind, device)) * 0.02
            };
            (name, t)
        })
        .collect();
    Ok(Qwen25Vl::from_params(config, params)?)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let (device, kind) = if a.cuda { (Device::Cuda(0), Kind::BFloat16) } else { (Device::Cpu, Kind::Float) };
    let t0 = Instant::now();
    let model = model(&a, device, kind)?;
    eprintln!("random model in {:.1} s", t0.elapsed().as_secs_f64());
    let ids = Tensor::arange_start(1000, 1000 + a.prompt, (Kind::Int64, Device::Cpu)).view([1, a.prompt]);
    let mask = Tensor::ones([1, a.prompt], (Kind::Int64, Device::Cpu));
    let batch = Batch { input_ids: &ids, attention_mask: &mask, pixel_values: None, image_grid_thw: &[] };
    let step = (a.vocab / a.end_tokens.max(1)).max(1);
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new,
        temperature: 1.0,
        seed: a.seed,
        row_streams: Some(0),
        num_return_sequences: a.group,
        eos_token_ids: (0..a.end_tokens).map(|i| 3 + i * step).filter(|&t| t < a.vocab).collect(),
        stop_strings: vec![],
        ..Default::default()
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // Prefill alone, to take it out of the decode rate.
    let _ = tch::no_grad(|| model.prefill(&batch, true))?;
    sync();
    let t0 = Instant::now();
    let _ = tch::no_grad(|| model.prefill(&batch, true))?;
    sync();
    let prefill_s = t0.elapsed().as_secs_f64();
    let loops = [
        ("before (host sampler, rows kept)", DecodeLoop { drop_finished: false, sampler: SamplerSite::Host }),
        ("finished rows dropped", DecodeLoop { drop_finished: true, sampler: SamplerSite::Host }),
        ("device sampler", DecodeLoop { drop_finished: false, sampler: SamplerSite::Device }),
        ("both (default)", DecodeLoop::default()),
    ];
    let mut reference: Option<Vec<Vec<i64>>> = None;
    for round in 0..a.repeats {
        for (name, decode) in loops {
            sync();
            let t0 = Instant::now();
            let out = generate_with(&model, None, &batch, &cfg, decode)?;
            sync();
            let secs = t0.elapsed().as_secs_f64();
            let tokens: Vec<Vec<i64>> = out.iter().map(|c| c.token_ids.clone()).collect();
            let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
            // Dropping rows changes the batch shape of every matmul, so at
            // these shapes a row's logits can move in the last bits and a
            // near-uniform draw pick another token: then the work differs
            // slightly, which the rates below account for (tokens / s).
            let same = match &reference {
                None => {
                    reference = Some(tokens);
                    true
                }
                Some(r) => *r == tokens,
            };
            if !same {
                eprintln!("{name}: other completions than the first loop (lengths {lengths:?})");
            }
            let n: usize = lengths.iter().sum();
            let decode_s = (secs - prefill_s).max(1e-9);
            // Steps run = the longest completion; row-steps the old loop paid for = steps × group.
            println!(
                "{}",
                serde_json::json!({
                    "round": round, "loop": name, "threads": tch::get_num_threads(), "device": format!("{device:?}"),
                    "layers": a.layers, "vocab": a.vocab, "prompt": a.prompt, "group": a.group, "lengths": lengths,
                    "generated": n, "same_completions": same, "generate_s": secs, "prefill_s": prefill_s,
                    "decode_tokens_per_s": n as f64 / decode_s,
                })
            );
        }
    }
    Ok(())
}
