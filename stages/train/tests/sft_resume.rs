//! An SFT run killed between checkpoints resumes from the newest one and
//! ends with bit-identical weights and the same loss curve. Its own test
//! binary: libtorch's thread count is process-global.

mod support;

use std::path::Path;

use stage_api::StageKind;
use stages_train::Sft;
use stages_train::sft::{SftParams, Target};

fn run(init: &Path, split: &Path, out: &Path, resume: &Path, kill_after: Option<u64>, seed: u64) -> anyhow::Result<()> {
    let params = SftParams {
        target: Target::ThinkAnswer,
        trainable: vec![".*".into()],
        lr: 1e-2,
        epochs: 2,
        batch_size: 2,
        checkpoint_every: 3,
        ..Default::default()
    };
    Sft::validate(&params).unwrap();
    Sft::run(&params, &mut support::training_context("sft", out, init, split, resume, seed, kill_after)?)
}

/// metrics.jsonl without the wall-clock column.
fn losses(out: &Path) -> Vec<serde_json::Value> {
    support::metrics_without(out, "tokens_per_s")
}

#[test]
fn killed_sft_resumes_to_bit_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let split = support::write_split(&dir.path().join("train"), 9);
    // The fixture's init_model output (its short SFT is not used here).
    support::tiny_sft_model(dir.path(), &split, 1);
    let init = dir.path().join("init");

    let full = dir.path().join("full");
    run(&init, &split, &full, &dir.path().join("resume-full"), None, 8).unwrap();
    assert_eq!(losses(&full).len(), 10, "9 items, batch 2: 5 steps per epoch, 2 epochs");

    // Killed after step 7 (into the second epoch): the newest checkpoint is step 6.
    let resume = dir.path().join("resume");
    let e = run(&init, &split, &dir.path().join("killed"), &resume, Some(7), 8).unwrap_err().to_string();
    assert!(e.contains("cancelled"), "{e}");
    let kept: Vec<String> =
        std::fs::read_dir(&resume).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(kept, ["step-00000006"]);

    // Another seed shuffles differently: its run refuses the checkpoint.
    let foreign = dir.path().join("foreign");
    let copy = std::process::Command::new("cp").arg("-r").arg(&resume).arg(&foreign).status();
    assert!(copy.unwrap().success());
    let e = run(&init, &split, &dir.path().join("other"), &foreign, None, 9).unwrap_err().to_string();
    assert!(e.contains("does not match this run"), "{e}");

    let resumed = dir.path().join("resumed");
    run(&init, &split, &resumed, &resume, None, 8).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("trainable.json")).unwrap()).unwrap();
    assert_eq!(summary["resumed_from_step"], 6);
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&full) == weights(&resumed), "resumed weights differ from the uninterrupted run");
    assert!(weights(&full) != weights(&init), "training changed nothing");
    assert_eq!(losses(&resumed), losses(&full));
}
