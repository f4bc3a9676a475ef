//! `pipeline model generate / convert` on the vlm parity fixture checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/vlm/tests/fixtures/parity")
}

/// `pipeline model ARGS...`: Ok, or Err with what it printed.
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline")).arg("model").args(args).output().expect("running pipeline");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(()) } else { Err(text) }
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
    assert!(e.contains("/nonexistent/ckpt"), "{e}");
    let ckpt = fixtures().join("checkpoint");
    let e = run(&["generate", "--checkpoint", ckpt.to_str().unwrap(), "--prompt", "x", "--dtype", "int4"]).unwrap_err();
    assert!(e.contains("--dtype"), "{e}");
}
