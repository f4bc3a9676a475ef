//! SFT publishes the same bytes for the same settings: two runs agree, and
//! a run killed between checkpoints resumes from the newest one and
//! publishes exactly what an uninterrupted run does (where it resumed from
//! goes to the notes for provenance.json). Its own test binary: libtorch's
//! thread count is process-global.

mod support;

use std::path::Path;

use stages_train::Sft;
use stages_train::sft::{SftParams, Target};
use support::{Dirs, Notes};

/// Run SFT; the notes it made for provenance.json.
fn run(
    init: &Path,
    split: &Path,
    out: &Path,
    resume: &Path,
    kill_after: Option<u64>,
    seed: u64,
) -> anyhow::Result<Notes> {
    let params = SftParams {
        target: Target::ThinkAnswer,
        trainable: vec![".*".into()],
        lr: 1e-2,
        epochs: 2,
        batch_size: 2,
        checkpoint_every: 3,
        ..Default::default()
    };
    support::train::<Sft>(&params, Dirs { model: init, split, out, resume }, seed, kill_after)
}

/// The fixture's init_model output (its short SFT is not used here) and a split.
fn fixture(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let split = support::write_split(&dir.join("train"), 9);
    support::tiny_sft_model(dir, &split, 1);
    (dir.join("init"), split)
}

#[test]
fn two_runs_publish_the_same_bytes() {
    let _serial = support::serial();
    let dir = tempfile::tempdir().unwrap();
    let (init, split) = fixture(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let notes = run(&init, &split, &a, &dir.path().join("resume-a"), None, 8).unwrap();
    run(&init, &split, &b, &dir.path().join("resume-b"), None, 8).unwrap();
    support::assert_same_files(&a, &b);
    // The timings went to the notes (provenance.json), not into the outputs.
    assert_eq!(notes["timing"]["steps"], 10, "{notes:?}");
    assert!(notes["timing"]["tokens_per_s_median"].as_f64().is_some_and(|t| t > 0.0), "{notes:?}");
    assert_eq!(notes["resumed_from_step"], 0);
}

#[test]
fn killed_sft_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let _serial = support::serial();
    let dir = tempfile::tempdir().unwrap();
    let (init, split) = fixture(dir.path());

    let full = dir.path().join("full");
    run(&init, &split, &full, &dir.path().join("resume-full"), None, 8).unwrap();
    let rows = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(rows, 10, "9 items, batch 2: 5 steps per epoch, 2 epochs");

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
    let notes = run(&init, &split, &resumed, &resume, None, 8).unwrap();
    assert_eq!(notes["resumed_from_step"], 6);
    assert_eq!(notes["timing"]["steps"], 4, "steps 7..=10 ran in the resumed attempt");
    support::assert_same_files(&full, &resumed);
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&full) != weights(&init), "training changed nothing");
}
