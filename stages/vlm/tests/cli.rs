//! `pipeline model generate / convert` on the parity fixture checkpoint.

use std::path::{Path, PathBuf};

use clap::Parser;
use stages_vlm::{ModelCommand, model_main};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: ModelCommand,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("model").chain(args.iter().copied()))?;
    model_main(&cli.cmd)
}

#[test]
fn generate_dumps_logits_and_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump.safetensors");
    let ckpt = fixtures().join("checkpoint");
    let image = fixtures().join("image_a.png");
    run(&[
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What is shown in this slice?",
        "--max-new-tokens",
        "3",
        "--dump-logits",
        dump.to_str().unwrap(),
    ])
    .unwrap();
    let named = tch::Tensor::read_safetensors(&dump).unwrap();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    for key in ["logits", "input_ids", "attention_mask", "pixel_values", "image_grid_thw"] {
        assert!(names.contains(&key), "{key} missing from {names:?}");
    }
}

#[test]
fn convert_reshards_and_copies_tokenizer_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ckpt = fixtures().join("checkpoint");
    run(&["convert", "--checkpoint", ckpt.to_str().unwrap(), "--out", out.to_str().unwrap(), "--max-shard-mb", "0"])
        .unwrap();
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(out.join("tokenizer.json").exists() && out.join("chat_template.json").exists());
    let a = stages_vlm::checkpoint::load_dir(&ckpt, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let b = stages_vlm::checkpoint::load_dir(&out, tch::Kind::Float, tch::Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|(k, v)| b[k].equal(v)));
}

#[test]
fn bad_arguments_are_clear_errors() {
    let e = run(&["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt", "x"]).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/ckpt"), "{e:#}");
    let ckpt = fixtures().join("checkpoint");
    let e = run(&["generate", "--checkpoint", ckpt.to_str().unwrap(), "--prompt", "x", "--dtype", "int4"]).unwrap_err();
    assert!(e.to_string().contains("--dtype"), "{e}");
}
