//! GRPO on a tiny real model: the loss gradient against finite differences,
//! a step's independence of micro-batch size and rank count, MLP-only
//! updates, and the stage end to end without a reference model.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use stage_api::{DistInfo, StageContext, StageKind};
use stages_task::answer::DEFAULT_ANSWER_REGEX;
use stages_task::completion::ResponseFormat;
use stages_task::dataset::read_split;
use stages_task::prompt::PromptVariant;
use stages_train::Grpo;
use stages_train::advantages::ScaleRewards;
use stages_train::dist::tcp::Tcp;
use stages_train::dist::{self, Collective, Single};
use stages_train::grpo::{COMPLETIONS_JSONL, GrpoLoss, GrpoParams, StepStats, suppressed_tokens};
use stages_train::optim::{AdamW, AdamWConfig};
use stages_train::policy_loss::{LossConfig, LossInputs, LossType, StepScale, policy_loss, token_logps};
use stages_train::prompt::PromptEncoder;
use stages_train::rewards::{Rewards, paper_weights};
use stages_train::rollout::{RolloutSpec, Sampled, Sampler, lay_out, rollout, sample};
use stages_train::trainer::{ParamUpdate, Trainable};
use stages_vlm::generate::{Completion, GenerationConfig};
use stages_vlm::{Batch, Pretrained};
use tch::{Device, Kind, Tensor};

/// One tiny SFT'd checkpoint and split for every test of this binary.
fn fixture() -> &'static (PathBuf, PathBuf) {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
        let split = support::write_split(&dir.join("train"), 9);
        let model = support::tiny_sft_model(dir, &split, 20);
        (model, split)
    })
}

#[test]
fn grpo_loss_gradient_matches_finite_differences() {
    let (model_dir, split) = fixture();
    // float64 end to end so central differences are accurate to ~1e-9.
    let Pretrained { model, tokenizer, processor } = Pretrained::load(model_dir, Kind::Double, Device::Cpu).unwrap();
    // (tensor, flat index): language MLP and attention, the vision tower and
    // its patch embedding (the whole model is differentiated, images included).
    let checked = [
        ("model.language_model.layers.0.mlp.up_proj.weight", 3 * 64 + 5),
        ("model.language_model.layers.1.mlp.down_proj.weight", 7 * 128 + 2),
        ("model.language_model.layers.1.self_attn.q_proj.weight", 64 + 2),
        ("model.visual.blocks.0.mlp.gate_proj.weight", 4),
        ("model.visual.patch_embed.proj.weight", 17),
    ];
    let trainable: Vec<String> = checked.iter().map(|(n, _)| format!("^{}$", regex::escape(n))).collect();
    Trainable::select(&model, &trainable).unwrap();

    // Two sequences: the same image prompt, two fixed completions.
    let rows = read_split(split).unwrap();
    let enc = PromptEncoder { tokenizer: &tokenizer, processor: &processor, variant: PromptVariant::Think };
    let prompt = enc.encode(&rows[0]).unwrap();
    let completions: [Vec<i64>; 2] = [vec![11, 40, 7, 99, 23], vec![64, 3, 18, 2, 50]];
    let c = completions[0].len() as i64;
    let ids: Vec<i64> = completions.iter().flat_map(|cmp| prompt.ids.iter().chain(cmp).copied()).collect();
    let len = ids.len() as i64 / 2;
    let input_ids = Tensor::from_slice(&ids).view([2, len]);
    let attention_mask = Tensor::ones([2, len], (Kind::Int64, Device::Cpu));
    let pv = prompt.pixel_values.as_ref().unwrap().to_kind(Kind::Double);
    let pixel_values = Tensor::cat(&[&pv, &pv], 0);
    let grid = [prompt.grid[0], prompt.grid[0]];
    let cids = Tensor::from_slice(&completions.concat()).view([2, c]);
    let mask = Tensor::from_slice(&[1.0f64, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]).view([2, c]);
    let adv = Tensor::from_slice(&[1.0f64, -0.5]);
    let temperature = 0.9;
    let logps = || {
        let batch = Batch {
            input_ids: &input_ids,
            attention_mask: &attention_mask,
            pixel_values: Some(&pixel_values),
            image_grid_thw: &grid,
        };
        let logits = model.forward_last(&batch, c + 1).unwrap().narrow(1, 0, c);
        token_logps(&logits, &cids, temperature, &suppressed_tokens(&model)).0
    };
    // Old and reference log-probs off the current ones, so ratios sit inside
    // (e^±0.05), above (e^0.3) and below (e^-0.3) the clip range.
    let now = tch::no_grad(logps);
    let old = &now + Tensor::from_slice(&[0.3f64, -0.3, 0.05, -0.05, 0.0, -0.3, 0.3, 0.05, -0.05, 0.3]).view([2, c]);
    let reference = &now + Tensor::from_slice(&[0.2f64, -0.1, 0.4, 0.0, 0.0, -0.2, 0.1, 0.3, -0.4, 0.2]).view([2, c]);
    for loss_type in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
        let cfg = LossConfig { loss_type, epsilon_low: 0.2, epsilon_high: 0.28, beta: 0.04, max_completion_length: 8 };
        let scale = StepScale { sequences: 4, tokens: 13.0 };
        let loss_at = |lp: &Tensor| {
            let x =
                LossInputs { logps: lp, old_logps: &old, ref_logps: Some(&reference), advantages: &adv, mask: &mask };
            policy_loss(&cfg, &x, &scale)
        };
        let (loss, stats) = loss_at(&logps());
        assert!(stats.region_clipped > 0.0 && stats.region_clipped < stats.tokens, "{stats:?}");
        for (name, _) in &checked {
            let mut g = model.params[*name].grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        loss.backward();
        let h = 1e-6;
        for &(name, i) in &checked {
            let p = &model.params[name];
            let grad = p.grad();
            assert!(grad.defined(), "{name} got no gradient");
            let analytic = grad.view([-1]).double_value(&[i]);
            let orig = p.view([-1]).double_value(&[i]);
            let at = |v: f64| {
                tch::no_grad(|| {
                    let _ = p.view([-1]).get(i).fill_(v);
                    loss_at(&logps()).0.double_value(&[])
                })
            };
            let numeric = (at(orig + h) - at(orig - h)) / (2.0 * h);
            tch::no_grad(|| {
                let _ = p.view([-1]).get(i).fill_(orig);
            });
            let tol = 1e-6 + 1e-5 * analytic.abs().max(numeric.abs());
            assert!(
                (analytic - numeric).abs() < tol,
                "{loss_type:?} {name}[{i}]: autograd {analytic:e} vs finite difference {numeric:e}"
            );
            assert!(analytic.abs() > 1e-9, "{loss_type:?} {name}: a zero gradient checks nothing");
        }
    }
}

fn spec(rewards: &Rewards, suppress_tokens: Vec<i64>) -> RolloutSpec<'_> {
    RolloutSpec {
        num_generations: 3,
        generation: GenerationConfig {
            max_new_tokens: 32,
            temperature: 1.0,
            stop_strings: Vec::new(),
            suppress_tokens,
            ..Default::default()
        },
        scale_rewards: ScaleRewards::Group,
        micro_batch_size: 4,
        mask_truncated_completions: false,
        rewards,
    }
}

#[test]
fn mlp_only_training_leaves_every_other_parameter_bit_identical() {
    let (model_dir, split) = fixture();
    let Pretrained { model, tokenizer, processor } = Pretrained::load(model_dir, Kind::Float, Device::Cpu).unwrap();
    let p = GrpoParams::default();
    let trainable = Trainable::select(&model, &p.trainable).unwrap();
    assert!(trainable.names.iter().all(|n| n.contains("language_model") && n.contains(".mlp.")));
    let before: Vec<(String, Tensor)> = model.params.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();

    let data = read_split(split).unwrap();
    let rewards = Rewards::new(&paper_weights(), ResponseFormat::Think, DEFAULT_ANSWER_REGEX).unwrap();
    let spec = spec(&rewards, suppressed_tokens(&model));
    let sampler = Sampler {
        model: &model,
        tokenizer: &tokenizer,
        encoder: PromptEncoder { tokenizer: &tokenizer, processor: &processor, variant: PromptVariant::Think },
        data: &data,
        seed: 1,
    };
    let mut r = rollout(&spec, &sampler, vec![0, 4], 0, &mut stages_train::dist::Single).unwrap();
    assert_eq!(r.completions.len(), 6);
    // Fixed non-zero advantages: the update must move every MLP tensor.
    for m in &mut r.micro {
        let n = m.seqs.len() as i64;
        m.advantages = Tensor::arange(n, (Kind::Float, Device::Cpu)) - (n as f64 - 1.0) / 2.0 + 0.25;
    }
    let reference = model_dir.clone();
    let frozen = stages_vlm::Qwen25Vl::load(&reference, Kind::Float, Device::Cpu).unwrap();
    let policy = GrpoLoss { p: &p, model: &model, reference: Some(&frozen), loss: p.loss_config() };
    policy.reference_logps(&mut r).unwrap();
    let mut opt =
        AdamW::new(trainable.tensors(&model), AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let mut stats = StepStats::new(0);
    for i in 0..r.micro.len() {
        policy.micro_loss(&mut r, i, 0, &mut stats).unwrap().backward();
    }
    // Same weights generated and scored: the ratio is 1, the KL 0.
    assert!(stats.loss_stats.kl.abs() < 1e-9, "{}", stats.loss_stats.kl);
    let (diff_mean, _) = stats.sampling_diff().unwrap();
    assert!(diff_mean < 1e-4, "training log-probs differ from the sampler's by {diff_mean}");
    opt.step(1e-3);
    assert!(opt.moments().keys().all(|k| k.contains(".mlp.")), "optimizer state only for trainable tensors");
    for (name, old) in &before {
        let same = model.params[name].equal(old);
        if trainable.names.contains(name) {
            assert!(!same, "{name} should have trained");
        } else {
            assert!(same, "{name} is frozen but changed");
            assert!(!model.params[name].grad().defined(), "{name} got a gradient");
        }
    }
}

/// Rank 0's view of one GRPO step over fixed completions: the step loss
/// (summed over micro-batches and ranks) and the synced gradient of the
/// trainable tensors, flattened, per loss type.
fn step_on_ranks(world: usize, micro_batch_size: usize, completions: &[Completion]) -> Vec<(f64, Vec<f32>)> {
    let (model_dir, split) = fixture();
    let rendezvous = tempfile::tempdir().unwrap();
    let rendezvous = rendezvous.path();
    let mut per_rank: Vec<Vec<(f64, Vec<f32>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let mut comm: Box<dyn Collective> = if world == 1 {
                        Box::new(Single)
                    } else {
                        let info =
                            DistInfo { rank, world_size: world, rendezvous: rendezvous.into(), token: "t".into() };
                        Box::new(Tcp::connect(&info, Duration::from_secs(60), &|| false).unwrap())
                    };
                    let Pretrained { model, tokenizer, processor } =
                        Pretrained::load(model_dir, Kind::Float, Device::Cpu).unwrap();
                    let p = GrpoParams { beta: 0.0, num_generations: GROUP, ..Default::default() };
                    let trainable = Trainable::select(&model, &p.trainable).unwrap();
                    let data = read_split(split).unwrap();
                    let rewards = Rewards::new(&paper_weights(), ResponseFormat::Think, DEFAULT_ANSWER_REGEX).unwrap();
                    let spec = RolloutSpec {
                        num_generations: GROUP,
                        micro_batch_size,
                        ..spec(&rewards, suppressed_tokens(&model))
                    };
                    let encoder =
                        PromptEncoder { tokenizer: &tokenizer, processor: &processor, variant: PromptVariant::Think };
                    let sampler = Sampler { model: &model, tokenizer: &tokenizer, encoder, data: &data, seed: 1 };
                    // This rank's shard of the round, as `sample` would have drawn it.
                    let shard = dist::shard(ROUND_ROWS.len(), rank, world);
                    let rows = ROUND_ROWS[shard.clone()].to_vec();
                    let prompts = rows.iter().map(|&r| sampler.encoder.encode(&data[r]).unwrap()).collect();
                    let mine = completions
                        .iter()
                        .filter(|c| shard.contains(&c.prompt))
                        .map(|c| Completion { prompt: c.prompt - shard.start, ..c.clone() })
                        .collect();
                    let sampled = Sampled { round: 0, shard: shard.clone(), rows, prompts, completions: mine };
                    let mut r = lay_out(&spec, &sampler, sampled, comm.as_mut()).unwrap();
                    // Fixed advantages by place in the round: the tiny model's
                    // rewards rarely differ within a group.
                    for m in &mut r.micro {
                        let adv: Vec<f32> = m.seqs.iter().map(|&i| fixed_advantage(shard.start * GROUP + i)).collect();
                        m.advantages = Tensor::from_slice(&adv);
                    }
                    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
                    let mut update = ParamUpdate::new(trainable.tensors(&model), cfg, 0.0);
                    LOSS_TYPES
                        .iter()
                        .map(|&loss_type| {
                            let mut p = p.clone();
                            p.loss_type = loss_type;
                            let policy = GrpoLoss { p: &p, model: &model, reference: None, loss: p.loss_config() };
                            for t in update.optimizer().params() {
                                let mut g = t.grad();
                                if g.defined() {
                                    let _ = g.zero_();
                                }
                            }
                            let mut stats = StepStats::new(0);
                            let mut local = 0.0;
                            for i in 0..r.micro.len() {
                                let loss = policy.micro_loss(&mut r, i, 0, &mut stats).unwrap();
                                loss.backward();
                                local += loss.double_value(&[]);
                            }
                            update.sync_gradients(comm.as_mut()).unwrap();
                            let loss = dist::all_reduce_f64(comm.as_mut(), &[local]).unwrap()[0];
                            let grads: Vec<Tensor> = update.optimizer().params().map(|t| t.grad().view([-1])).collect();
                            (loss, Vec::<f32>::try_from(&Tensor::cat(&grads, 0)).unwrap())
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    per_rank.swap_remove(0)
}

const GROUP: usize = 5;
/// Three prompts × 5 completions: micro-batches of 8 leave a short one, and
/// 2 ranks shard the round unevenly (10 + 5 completions).
const ROUND_ROWS: [usize; 3] = [0, 4, 5];
const LOSS_TYPES: [LossType; 4] = [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo];

fn fixed_advantage(i: usize) -> f32 {
    (i * 7 % 11) as f32 / 5.0 - 1.1
}

#[test]
fn a_step_does_not_depend_on_the_micro_batch_size_nor_the_rank_count() {
    // One round sampled once; every configuration trains on its completions.
    let (model_dir, split) = fixture();
    let Pretrained { model, tokenizer, processor } = Pretrained::load(model_dir, Kind::Float, Device::Cpu).unwrap();
    let data = read_split(split).unwrap();
    let rewards = Rewards::new(&paper_weights(), ResponseFormat::Think, DEFAULT_ANSWER_REGEX).unwrap();
    let base = spec(&rewards, suppressed_tokens(&model));
    let eos_token_ids = tokenizer.eos_ids.iter().map(|&e| i64::from(e)).collect();
    let generation = GenerationConfig { eos_token_ids, ..base.generation.clone() };
    let spec = RolloutSpec { num_generations: GROUP, generation, ..base };
    let encoder = PromptEncoder { tokenizer: &tokenizer, processor: &processor, variant: PromptVariant::Think };
    let sampler = Sampler { model: &model, tokenizer: &tokenizer, encoder, data: &data, seed: 1 };
    let completions = sample(&spec, &sampler, ROUND_ROWS.to_vec(), 0, 0, 1).unwrap().completions;
    let lengths: Vec<usize> = completions.iter().map(|c| c.token_ids.len()).collect();
    assert_eq!(lengths.len(), 15);
    assert!(lengths.iter().any(|&l| l != lengths[0]), "completions of one length check little: {lengths:?}");

    let whole = step_on_ranks(1, 15, &completions);
    for (world, micro_batch_size) in [(1, 1), (1, 3), (1, 8), (2, 8), (2, 3), (3, 8)] {
        let got = step_on_ranks(world, micro_batch_size, &completions);
        for (((loss, grad), (want_loss, want_grad)), loss_type) in got.iter().zip(&whole).zip(LOSS_TYPES) {
            let at = format!("{loss_type:?}, {world} rank(s), micro-batches of {micro_batch_size}");
            let scale = want_grad.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            assert!(scale > 1e-6, "{at}: a zero gradient checks nothing");
            assert!((loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1e-3), "{at}: loss {loss} vs {want_loss}");
            let diff = grad.iter().zip(want_grad).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-4 * scale, "{at}: gradients differ by {diff} (largest entry {scale})");
        }
    }
}

fn metrics(out: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn stage_without_kl_trains_logs_trl_metrics_and_writes_a_loadable_checkpoint() {
    let (model_dir, split) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grpo");
    let mut ctx = StageContext::builder("grpo", &out)
        .input("model", "sft", None, model_dir)
        .input("data", "export", Some("train"), split)
        .resume_dir(dir.path().join("resume"))
        .seed(11)
        .build()
        .unwrap();
    let params = GrpoParams {
        beta: 0.0,
        steps: 3,
        prompts_per_step: 2,
        num_generations: 3,
        max_completion_length: 32,
        micro_batch_size: 4,
        num_iterations: 1,
        loss_type: LossType::Dapo,
        scale_rewards: ScaleRewards::Batch,
        mask_truncated_completions: true,
        trainable: vec![".*".into()],
        lr: 1e-3,
        log_completions_every: 2,
        ..Default::default()
    };
    Grpo::validate(&params).unwrap();
    Grpo::run(&params, &mut ctx).unwrap();
    let rows = metrics(&out);
    assert_eq!(rows.len(), 3);
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "reward",
        "reward_std",
        "rewards/format/mean",
        "rewards/format/std",
        "rewards/validity/mean",
        "rewards/correctness/mean",
        "rewards/correctness/std",
        "frac_reward_zero_std",
        "entropy",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
    ] {
        assert!(rows.iter().all(|r| r.contains_key(key)), "metric `{key}` missing: {:?}", rows[0].keys());
    }
    assert!(!rows[0].contains_key("kl"), "beta = 0: no KL metric");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainable.json")).unwrap()).unwrap();
    assert_eq!(summary["reference_model"], false, "beta = 0 never loads the reference model");
    // Completions of steps 1 and 3 (every 2 steps), 6 per round.
    let samples = std::fs::read_to_string(out.join(COMPLETIONS_JSONL)).unwrap();
    let steps: Vec<u64> = samples
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3]);
    // The output is an HF checkpoint the next stage loads.
    let trained = Pretrained::load(&out, Kind::Float, Device::Cpu).unwrap().model;
    let base = Pretrained::load(model_dir, Kind::Float, Device::Cpu).unwrap().model;
    assert!(rows.iter().any(|r| r["frac_reward_zero_std"].as_f64() < Some(1.0)), "some group had a learning signal");
    let unchanged: Vec<&String> =
        trained.params.iter().filter(|(n, t)| t.equal(&base.params[*n])).map(|(n, _)| n).collect();
    assert!(unchanged.is_empty(), "every tensor trains with trainable = ['.*']; unchanged: {unchanged:?}");
}

#[test]
fn params_are_validated_by_key_and_weights_lay_over_the_paper_defaults() {
    let bad = |p: GrpoParams| Grpo::validate(&p).unwrap_err().path;
    assert_eq!(bad(GrpoParams { num_generations: 1, ..Default::default() }), ["num_generations"]);
    assert_eq!(bad(GrpoParams { checkpoint_every: 3, num_iterations: 2, ..Default::default() }), ["checkpoint_every"]);
    assert_eq!(bad(GrpoParams { prompt: PromptVariant::CotForcing, ..Default::default() }), ["prompt"]);
    assert_eq!(bad(GrpoParams { beta: -1.0, ..Default::default() }), ["beta"]);
    let mut w = paper_weights();
    w.insert("lenght".into(), 1.0);
    assert_eq!(bad(GrpoParams { reward_weights: w, ..Default::default() }), ["reward_weights", "lenght"]);
    let zero: BTreeMap<String, f64> = paper_weights().into_keys().map(|k| (k, 0.0)).collect();
    assert_eq!(bad(GrpoParams { reward_weights: zero, ..Default::default() }), ["reward_weights"]);
    assert_eq!(bad(GrpoParams { answer_regex: "(".into(), ..Default::default() }), ["answer_regex"]);

    // A recipe writing only `validity = 0` keeps format 1 and correctness 2.
    let p: GrpoParams = serde_json::from_value(serde_json::json!({"reward_weights": {"validity": 0.0}})).unwrap();
    let expect: BTreeMap<String, f64> =
        [("format".to_string(), 1.0), ("validity".to_string(), 0.0), ("correctness".to_string(), 2.0)].into();
    assert_eq!(p.reward_weights, expect);
    let d = GrpoParams::default();
    assert_eq!((d.num_generations, d.steps, d.temperature, d.lr, d.beta, d.epsilon), (5, 1500, 1.0, 1e-6, 0.04, 0.2));
}
