//! GRPO publishes the same bytes for the same settings: two runs agree, and
//! a run killed between checkpoints resumes from the newest one and
//! publishes exactly what an uninterrupted run does (where it resumed from
//! goes to the notes for provenance.json). Its own test binary: libtorch's
//! thread count is process-global, and every run here must use the same one.

mod support;

use std::path::{Path, PathBuf};

use stages_train::Grpo;
use stages_train::grpo::{COMPLETIONS_JSONL, GrpoParams};
use support::{Dirs, Notes};

fn run(model: &Path, split: &Path, out: &Path, resume: &Path, kill_after: Option<u64>) -> anyhow::Result<Notes> {
    run_seeded(Dirs { model, split, out, resume }, kill_after, 23)
}

fn run_seeded(dirs: Dirs, kill_after: Option<u64>, seed: u64) -> anyhow::Result<Notes> {
    let params = GrpoParams {
        steps: 6,
        prompts_per_step: 2,
        num_generations: 3,
        num_iterations: 2,
        max_completion_length: 32,
        micro_batch_size: 4,
        checkpoint_every: 2,
        log_completions_every: 1,
        trainable: vec![".*".into()],
        lr: 1e-3,
        ..Default::default()
    };
    support::train::<Grpo>(&params, dirs, seed, kill_after)
}

/// A split and a tiny model SFT'd into the answer format (rewards differ).
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let split = support::write_split(&dir.join("train"), 9);
    (support::tiny_sft_model(dir, &split, 20), split)
}

#[test]
fn two_runs_publish_the_same_bytes() {
    let _serial = support::serial();
    let dir = tempfile::tempdir().unwrap();
    let (model, split) = fixture(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let notes = run(&model, &split, &a, &dir.path().join("resume-a"), None).unwrap();
    run(&model, &split, &b, &dir.path().join("resume-b"), None).unwrap();
    support::assert_same_files(&a, &b);
    // The timings went to the notes (provenance.json), not into the outputs.
    assert_eq!(notes["timing"]["steps"], 6, "{notes:?}");
    assert!(notes["timing"]["step_s_median"].as_f64().is_some_and(|t| t > 0.0), "{notes:?}");
}

#[test]
fn killed_run_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let _serial = support::serial();
    let dir = tempfile::tempdir().unwrap();
    let (model, split) = fixture(dir.path());

    let full = dir.path().join("full");
    run(&model, &split, &full, &dir.path().join("resume-full"), None).unwrap();

    // Killed after step 3: the newest checkpoint is step 2.
    let resume = dir.path().join("resume");
    let killed = dir.path().join("killed");
    let e = run(&model, &split, &killed, &resume, Some(3)).unwrap_err().to_string();
    assert!(e.contains("cancelled"), "{e}");
    let kept: Vec<String> =
        std::fs::read_dir(&resume).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(kept, ["step-00000002"]);
    assert!(!killed.join("model.safetensors").exists());

    // A checkpoint of another run (here: another seed) is refused, not mixed in.
    let foreign = dir.path().join("resume-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let copy = std::process::Command::new("cp").arg("-r").arg(resume.join("step-00000002")).arg(&foreign).status();
    assert!(copy.unwrap().success());
    let dirs = Dirs { model: &model, split: &split, out: &dir.path().join("foreign"), resume: &foreign };
    let e = run_seeded(dirs, None, 24).unwrap_err().to_string();
    assert!(e.contains("does not match this run"), "{e}");

    // A new attempt (fresh output dir, as the engine gives) continues from step 2.
    let resumed = dir.path().join("resumed");
    let notes = run(&model, &split, &resumed, &resume, None).unwrap();
    assert_eq!(notes["resumed_from_step"], 2);
    support::assert_same_files(&full, &resumed);
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&full) != std::fs::read(model.join("model.safetensors")).unwrap(), "training changed nothing");
    let rows = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(rows, 6);
    let completions = std::fs::read_to_string(full.join(COMPLETIONS_JSONL)).unwrap();
    assert_eq!(completions.lines().count(), 3 * 6, "3 rounds of 6 completions, each logged");
}
