//! Sharded training state (`shard = "optimizer" | "gradients"`, ZeRO-1/2)
//! trains the model the one-process unsharded run trains: with 2 and 3 CPU
//! ranks over TCP, SFT's and GRPO's losses, gradient norms and final
//! weights equal the single process's to 1e-6 relative (one libtorch
//! thread per rank; only the float summation order differs). A sharded run
//! killed between checkpoints resumes (each rank its part of the optimizer
//! state) to the bytes of an uninterrupted one (SFT and GRPO), and another
//! rank count is refused. Its own test binary: libtorch's thread count is process-global.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use stages_train::grpo::GrpoParams;
use stages_train::sft::{SftParams, Target};
use stages_train::trainer::ShardLevel;
use stages_train::{Grpo, Sft};
use tch::Tensor;

/// The split, the init_model checkpoint (SFT starts there) and its short
/// SFT into the answer format (GRPO starts there: rewards differ).
fn fixture() -> &'static (PathBuf, PathBuf, PathBuf) {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static PATHS: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
        let split = support::write_split(&dir.join("train"), 9);
        let sft = support::tiny_sft_model(dir, &split, 20);
        (split, dir.join("init"), sft)
    })
}

type Row = serde_json::Map<String, serde_json::Value>;

/// What a run published: its metrics rows and its weights.
struct Trained {
    rows: Vec<Row>,
    weights: BTreeMap<String, Tensor>,
}

fn read_output(out: &Path) -> Trained {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let weights = Tensor::read_safetensors(out.join("model.safetensors")).unwrap().into_iter().collect();
    Trained { rows, weights }
}

fn weights(dir: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("model.safetensors")).unwrap().into_iter().collect()
}

/// Run `K` on `world` ranks in a fresh directory; rank 0's output.
fn train<K: stage_api::StageKind>(params: &K::Params, world: usize, model: &Path, split: &Path) -> Trained
where
    K::Params: Sync,
{
    let root = tempfile::tempdir().unwrap();
    let resume = root.path().join("resume");
    for (rank, result) in
        support::train_ranks::<K>(params, world, model, split, root.path(), &resume, None).into_iter().enumerate()
    {
        if let Err(e) = result {
            panic!("rank {rank} of {world}: {e:#}");
        }
    }
    read_output(&root.path().join("rank-0"))
}

/// `got` equals `want`: the same steps, losses and gradient norms to 1e-6
/// relative, and the flattened trained parameters (the vector the ranks
/// shard) to 1e-6 of its largest value (∞-norm); the training moved them
/// much further than that from `start`.
fn assert_same_training(at: &str, got: &Trained, want: &Trained, start: &BTreeMap<String, Tensor>) {
    assert_eq!(got.rows.len(), want.rows.len(), "{at}: steps");
    for (g, w) in got.rows.iter().zip(&want.rows) {
        assert_eq!(g["step"], w["step"], "{at}");
        for key in ["loss", "grad_norm"] {
            let (a, b) = (g[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{at}, step {}: {key} {a} vs {b}", w["step"]);
        }
    }
    assert_eq!(got.weights.keys().collect::<Vec<_>>(), want.weights.keys().collect::<Vec<_>>(), "{at}");
    let trained: Vec<&String> = want.weights.keys().filter(|n| !want.weights[*n].equal(&start[*n])).collect();
    assert!(!trained.is_empty(), "{at}: nothing trained");
    let max_abs = |t: &Tensor| t.abs().max().double_value(&[]);
    let scale = trained.iter().map(|n| max_abs(&want.weights[*n])).fold(0.0, f64::max);
    let (mut diff, mut moved) = (0.0f64, 0.0f64);
    for (name, w) in &want.weights {
        let d = max_abs(&(&got.weights[name] - w));
        if d > diff {
            diff = d;
        }
        assert!(d <= 1e-6 * scale, "{at}: `{name}` differs by {d:e} (largest trained value {scale})");
        moved = moved.max(max_abs(&(w - &start[name])));
    }
    assert!(moved > 1e-3 * scale, "{at}: training barely moved the weights ({moved:e}): the comparison checks nothing");
    eprintln!("{at}: weights differ by at most {:.2e} of the largest, moved {:.2e} of it", diff / scale, moved / scale);
}

/// The MLPs of both towers. Not `.*`: the key projection's bias has a zero
/// gradient in exact arithmetic (softmax ignores a shift shared by all
/// keys), so AdamW turns its rounding noise into full-size steps whose
/// signs any change of summation order flips (the replicated path with
/// another rank count as much as sharding).
fn trainable() -> Vec<String> {
    vec![r"\.mlp\.".into()]
}

fn sft_params(shard: ShardLevel, grad_accum: usize) -> SftParams {
    SftParams {
        target: Target::ThinkAnswer,
        trainable: trainable(),
        // The ranks sum micro-batch gradients in another order than one
        // process; AdamW's m/√v passes that ~1e-7 relative difference on
        // in proportion to the learning rate: at 1e-2 the weights differ by
        // ~1.3e-6 of their scale, at 1e-3 (100× the paper's SFT rate) by ~1e-7.
        lr: 1e-3,
        epochs: 1,
        batch_size: 1,
        grad_accum,
        shard,
        ..Default::default()
    }
}

#[test]
fn sharded_sft_on_2_and_3_ranks_equals_the_one_process_run() {
    let _serial = support::serial();
    let (split, init, _) = fixture();
    let start = weights(init);
    // Each rank backpropagates 2 micro-batches of 1 item per step (the
    // `gradients` level reduce-scatters after each); the one process runs
    // the same micro-batches in order. 9 items on 2 ranks: steps of 4, 4
    // and 1 item, so in the last step rank 1 has nothing to train on.
    for world in [2, 3] {
        let want = train::<Sft>(&sft_params(ShardLevel::None, 2 * world), 1, init, split);
        for shard in [ShardLevel::Optimizer, ShardLevel::Gradients] {
            let got = train::<Sft>(&sft_params(shard, 2), world, init, split);
            assert_same_training(&format!("sft, {world} ranks, shard {shard:?}"), &got, &want, &start);
        }
    }
}

fn grpo_params(shard: ShardLevel, prompts: usize) -> GrpoParams {
    GrpoParams {
        steps: 2,
        prompts_per_step: prompts,
        num_generations: 3,
        max_completion_length: 16,
        micro_batch_size: 3,
        beta: 0.0,
        trainable: trainable(),
        lr: 1e-3,
        log_completions_every: 0,
        checkpoint_every: 0,
        shard,
        ..Default::default()
    }
}

#[test]
fn sharded_grpo_on_2_and_3_ranks_equals_the_one_process_run() {
    let _serial = support::serial();
    let (split, _, sft) = fixture();
    let start = weights(sft);
    // One prompt (3 completions, one micro-batch) per rank and step.
    for world in [2, 3] {
        let want = train::<Grpo>(&grpo_params(ShardLevel::None, world), 1, sft, split);
        for shard in [ShardLevel::Optimizer, ShardLevel::Gradients] {
            let got = train::<Grpo>(&grpo_params(shard, world), world, sft, split);
            assert_same_training(&format!("grpo, {world} ranks, shard {shard:?}"), &got, &want, &start);
        }
    }
}

#[test]
fn killed_sharded_sft_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let _serial = support::serial();
    let (split, init, _) = fixture();
    let dir = tempfile::tempdir().unwrap();
    // 2 ranks × 3 micro-batches: global batch 6, 2 steps per epoch, 4 steps.
    let params = SftParams { epochs: 2, checkpoint_every: 1, ..sft_params(ShardLevel::Gradients, 3) };
    let run = |name: &str, world: usize, params: &SftParams, resume: &Path, kill: Option<u64>| {
        let root = dir.path().join(name);
        let results = support::train_ranks::<Sft>(params, world, init, split, &root, resume, kill);
        (root.join("rank-0"), results)
    };
    let (full, results) = run("full", 2, &params, &dir.path().join("resume-full"), None);
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    // Killed after step 3: the newest checkpoint is step 3, each rank's part in it.
    let resume = dir.path().join("resume");
    let (_, results) = run("killed", 2, &params, &resume, Some(3));
    for r in &results {
        let e = r.as_ref().err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("cancelled"), "{e}");
    }
    let ck = resume.join("step-00000003");
    for rank in 0..2 {
        assert!(
            ck.join(format!("optimizer-shards/rank-{rank:05}")).is_dir(),
            "rank {rank}'s shard in {}",
            ck.display()
        );
    }

    // Another rank count (same global batch: 3 ranks × 2) is refused, naming both.
    let other = SftParams { grad_accum: 2, ..params.clone() };
    let (_, results) = run("three", 3, &other, &resume, None);
    let e = format!("{:#}", results[0].as_ref().expect_err("3 ranks refuse a 2-rank checkpoint"));
    assert!(e.contains("step-00000003") && e.contains("sharded over 2 ranks, this run has 3"), "{e}");

    let (resumed, results) = run("resumed", 2, &params, &resume, None);
    let notes = results.into_iter().next().unwrap().unwrap();
    assert_eq!(notes["resumed_from_step"], 3);
    support::assert_same_files(&full, &resumed);
}

#[test]
fn killed_sharded_grpo_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let _serial = support::serial();
    let (split, _, sft) = fixture();
    let dir = tempfile::tempdir().unwrap();
    // 2 ranks, one prompt each, 2 steps per generation round (the clip
    // matters), checkpoints between rounds.
    let params = GrpoParams {
        steps: 4,
        num_iterations: 2,
        checkpoint_every: 2,
        log_completions_every: 1,
        ..grpo_params(ShardLevel::Optimizer, 2)
    };
    let run = |name: &str, resume: &Path, kill: Option<u64>| {
        let root = dir.path().join(name);
        let results = support::train_ranks::<Grpo>(&params, 2, sft, split, &root, resume, kill);
        (root.join("rank-0"), results)
    };
    let (full, results) = run("full", &dir.path().join("resume-full"), None);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let resume = dir.path().join("resume");
    let (_, results) = run("killed", &resume, Some(3));
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert!(resume.join("step-00000002/optimizer-shards/rank-00001").is_dir());
    let (resumed, results) = run("resumed", &resume, None);
    assert_eq!(results.into_iter().next().unwrap().unwrap()["resumed_from_step"], 2);
    support::assert_same_files(&full, &resumed);
}

#[test]
fn shard_enters_the_canonical_params_only_when_not_none() {
    // The cache key hashes the params' JSON: `none` (the default, whether
    // written or not) keeps every existing key; a sharded run may differ
    // from it in the last bits, so it gets keys of its own.
    let json = |p: &SftParams| serde_json::to_value(p).unwrap();
    let none: SftParams = serde_json::from_value(serde_json::json!({"shard": "none"})).unwrap();
    assert_eq!(json(&none), json(&SftParams::default()));
    assert!(json(&none).get("shard").is_none());
    assert_eq!(json(&sft_params(ShardLevel::Gradients, 1))["shard"], "gradients");
    let grpo = GrpoParams { shard: ShardLevel::Optimizer, ..Default::default() };
    assert_eq!(serde_json::to_value(&grpo).unwrap()["shard"], "optimizer");
    assert!(serde_json::to_value(GrpoParams::default()).unwrap().get("shard").is_none());
}
