//! One GRPO generation round: pick the round's prompts (a seeded shuffle per
//! epoch, so round `g` always gets the same rows), sample `num_generations`
//! completions per prompt (prefill once, sampled with a per-round seed),
//! score the rewards, compute the advantages, and lay the completions out as
//! training micro-batches (left-padded prompt + right-padded completion).
//!
//! With data-parallel ranks each rank generates the completions of its
//! contiguous shard of the round's prompts. Every completion samples from its
//! own stream of the round seed (indexed by its place in the whole round), so
//! the shards together sample what one process would; rewards are gathered
//! so advantages (group or batch scaled) and metrics cover the whole round.

use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use rand_chacha::ChaCha8Rng;
use stages_task::answer::option_letters;
use stages_task::dataset::VqaRow;
use stages_vlm::chat::ChatTokenizer;
use stages_vlm::generate::{Completion, FinishReason, GenerationConfig, generate};
use stages_vlm::{Batch, Qwen25Vl};
use tch::{Kind, Tensor};

use crate::advantages::{Advantages, ScaleRewards, advantages};
use crate::dist::{self, Collective};
use crate::prompt::{EncodedPrompt, PromptEncoder};
use crate::rewards::{Rewards, Sample};

/// Which dataset rows each round trains on: the rows in a fresh seeded
/// order every epoch, consumed `per_round` at a time across epoch ends.
pub struct DataOrder {
    rows: usize,
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl DataOrder {
    pub fn new(rows: usize, seed: u64) -> Self {
        Self { rows, seed, epoch: None }
    }

    /// The row at position `pos` of the endless epoch-by-epoch order.
    pub fn row(&mut self, pos: usize) -> usize {
        let (epoch, offset) = (pos / self.rows, pos % self.rows);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.rows).collect();
            let stream = stage_api::derive_seed(self.seed, &format!("grpo/order/{epoch}"));
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(stream));
            self.epoch = Some((epoch, order));
        }
        self.epoch.as_ref().map_or(offset, |(_, order)| order[offset])
    }

    /// Rows of round `round` with `per_round` prompts per round.
    pub fn round(&mut self, round: usize, per_round: usize) -> Vec<usize> {
        (round * per_round..(round + 1) * per_round).map(|pos| self.row(pos)).collect()
    }
}

/// The seed of round `round`'s sampling generator.
pub fn round_seed(seed: u64, round: usize) -> u64 {
    stage_api::derive_seed(seed, &format!("grpo/generate/{round}"))
}

/// Everything a round needs besides the model.
pub struct RolloutSpec<'a> {
    pub num_generations: usize,
    /// Sampling settings; `seed` and `num_return_sequences` are set per round.
    pub generation: GenerationConfig,
    pub scale_rewards: ScaleRewards,
    pub micro_batch_size: usize,
    pub mask_truncated_completions: bool,
    pub rewards: &'a Rewards,
}

/// Training tensors of up to `micro_batch_size` completions.
pub struct MicroBatch {
    /// Completion indices (into `Rollout::completions`).
    pub seqs: Vec<usize>,
    /// (batch, prompt + completion) ids: left-padded prompts, right-padded completions.
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub pixel_values: Option<Tensor>,
    pub grid: Vec<[i64; 3]>,
    /// (batch, completion) ids and masks.
    pub completion_ids: Tensor,
    /// Tokens in the loss (real tokens; none of a truncated completion when masking those).
    pub loss_mask: Tensor,
    /// Real completion tokens.
    pub token_mask: Tensor,
    /// Log-probs the sampler reported while generating.
    pub sampling_logps: Tensor,
    pub advantages: Tensor,
    /// Under the generating weights (filled by the first policy update).
    pub old_logps: Option<Tensor>,
    /// Under the reference model (when beta > 0).
    pub ref_logps: Option<Tensor>,
}

impl MicroBatch {
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
            pixel_values: self.pixel_values.as_ref(),
            image_grid_thw: &self.grid,
        }
    }

    /// Completion positions per row (the logits needed: one more than this).
    pub fn completion_len(&self) -> i64 {
        self.completion_ids.size()[1]
    }
}

/// The completions of one round (this rank's share), scored and laid out
/// for training.
pub struct Rollout {
    pub round: usize,
    /// Dataset row of each prompt.
    pub rows: Vec<usize>,
    pub users: Vec<String>,
    pub completions: Vec<Completion>,
    /// Per completion: one score per reward function.
    pub scores: Vec<Vec<f64>>,
    /// Per completion: the weighted total.
    pub rewards: Vec<f64>,
    /// This rank's completions' advantages; `frac_zero_std` of the whole round.
    pub advantages: Advantages,
    pub micro: Vec<MicroBatch>,
    /// The whole round across ranks (metrics and loss normalisers).
    pub round_totals: RoundTotals,
}

/// Per completion of the whole round (all ranks, in rank order), what the
/// metrics need, and the normalisers of the step loss.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RoundTotals {
    pub scores: Vec<Vec<f64>>,
    pub rewards: Vec<f64>,
    pub lengths: Vec<usize>,
    pub truncated: Vec<bool>,
    /// Completions over all ranks (the `grpo` and `dr_grpo` normaliser).
    pub sequences: usize,
    /// Completion tokens in the loss over all ranks (the `bnpo` and `dapo` normaliser).
    pub loss_tokens: f64,
}

impl RoundTotals {
    /// Concatenate the ranks' shares (in rank order).
    fn join(parts: Vec<RoundTotals>) -> Self {
        let mut all = RoundTotals::default();
        for p in parts {
            all.scores.extend(p.scores);
            all.rewards.extend(p.rewards);
            all.lengths.extend(p.lengths);
            all.truncated.extend(p.truncated);
        }
        all
    }
}

impl Rollout {
    pub fn is_truncated(c: &Completion) -> bool {
        c.finish == FinishReason::Length
    }
}

/// Left-pad the prompts into one generation batch (shared with nothing else:
/// the eval stage batches rendered texts, GRPO already has token ids).
fn prompt_batch(
    prompts: &[&EncodedPrompt],
    pad: i64,
    model: &Qwen25Vl,
) -> (Tensor, Tensor, Option<Tensor>, Vec<[i64; 3]>) {
    let len = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for p in prompts {
        let n = len - p.ids.len();
        ids.extend(std::iter::repeat_n(pad, n).chain(p.ids.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, n).chain(std::iter::repeat_n(1, p.ids.len())));
    }
    let shape = [prompts.len() as i64, len as i64];
    let pv: Vec<&Tensor> = prompts.iter().filter_map(|p| p.pixel_values.as_ref()).collect();
    let pixel_values = (!pv.is_empty()).then(|| Tensor::cat(&pv, 0).to_device(model.device).to_kind(model.kind));
    let grid = prompts.iter().flat_map(|p| p.grid.iter().copied()).collect();
    (
        Tensor::from_slice(&ids).view(shape).to_device(model.device),
        Tensor::from_slice(&mask).view(shape).to_device(model.device),
        pixel_values,
        grid,
    )
}

/// What a round's micro-batches are cut from.
struct Layout<'a> {
    group: usize,
    prompts: &'a [EncodedPrompt],
    completions: &'a [Completion],
    advantages: &'a [f64],
    pad: i64,
    mask_truncated: bool,
    model: &'a Qwen25Vl,
}

impl Layout<'_> {
    /// Completions `seqs` (with their prompts) as one training micro-batch.
    fn micro_batch(&self, seqs: &[usize]) -> MicroBatch {
        let Layout { group, prompts, completions, advantages, pad, mask_truncated, model } = *self;
        let p_len = seqs.iter().map(|&s| prompts[s / group].ids.len()).max().unwrap_or(0);
        let c_len = seqs.iter().map(|&s| completions[s].token_ids.len()).max().unwrap_or(0).max(1);
        let (mut ids, mut attn, mut cids, mut loss, mut real, mut samp) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &s in seqs {
            let (p, c) = (&prompts[s / group], &completions[s]);
            let (lp, lc) = (p.ids.len(), c.token_ids.len());
            let counts = !(mask_truncated && Rollout::is_truncated(c));
            ids.extend(std::iter::repeat_n(pad, p_len - lp).chain(p.ids.iter().copied()));
            ids.extend(c.token_ids.iter().copied().chain(std::iter::repeat_n(pad, c_len - lc)));
            attn.extend(std::iter::repeat_n(0i64, p_len - lp).chain(std::iter::repeat_n(1, lp + lc)));
            attn.extend(std::iter::repeat_n(0i64, c_len - lc));
            cids.extend(c.token_ids.iter().copied().chain(std::iter::repeat_n(pad, c_len - lc)));
            for t in 0..c_len {
                real.push(f32::from(u8::from(t < lc)));
                loss.push(f32::from(u8::from(t < lc && counts)));
                samp.push(c.logprobs.get(t).copied().unwrap_or(0.0));
            }
        }
        let b = seqs.len() as i64;
        let dev = model.device;
        let kind = crate::policy_loss::calc_kind(model.kind);
        let f = |v: &[f32], w: i64| Tensor::from_slice(v).view([b, w]).to_kind(kind).to_device(dev);
        let pv: Vec<&Tensor> = seqs.iter().filter_map(|&s| prompts[s / group].pixel_values.as_ref()).collect();
        MicroBatch {
            seqs: seqs.to_vec(),
            input_ids: Tensor::from_slice(&ids).view([b, (p_len + c_len) as i64]).to_device(dev),
            attention_mask: Tensor::from_slice(&attn).view([b, (p_len + c_len) as i64]).to_device(dev),
            pixel_values: (!pv.is_empty()).then(|| Tensor::cat(&pv, 0).to_device(dev).to_kind(model.kind)),
            grid: seqs.iter().flat_map(|&s| prompts[s / group].grid.iter().copied()).collect(),
            completion_ids: Tensor::from_slice(&cids).view([b, c_len as i64]).to_device(dev),
            loss_mask: f(&loss, c_len as i64),
            token_mask: f(&real, c_len as i64),
            sampling_logps: f(&samp, c_len as i64),
            advantages: Tensor::from_slice(&seqs.iter().map(|&s| advantages[s]).collect::<Vec<f64>>())
                .to_kind(kind)
                .to_device(dev),
            old_logps: None,
            ref_logps: None,
        }
    }
}

/// The policy and data a round samples from.
pub struct Sampler<'a> {
    pub model: &'a Qwen25Vl,
    pub tokenizer: &'a ChatTokenizer,
    pub encoder: PromptEncoder<'a>,
    pub data: &'a [VqaRow],
    /// The stage seed (each round derives its own sampling seed).
    pub seed: u64,
}

/// This rank's share of a round, sampled: its contiguous shard of the
/// round's prompts and their completions.
pub struct Sampled {
    pub round: usize,
    /// This rank's prompts, as positions in the round.
    pub shard: std::ops::Range<usize>,
    /// Dataset row of each of this rank's prompts.
    pub rows: Vec<usize>,
    pub prompts: Vec<EncodedPrompt>,
    /// `prompt` indexes `prompts`.
    pub completions: Vec<Completion>,
}

/// Generate, score and lay out round `round` for the given dataset rows
/// (the whole round: each rank of `comm` takes its shard).
pub fn rollout(
    spec: &RolloutSpec,
    sampler: &Sampler,
    round_rows: Vec<usize>,
    round: usize,
    comm: &mut dyn Collective,
) -> anyhow::Result<Rollout> {
    let sampled = sample(spec, sampler, round_rows, round, comm.rank(), comm.world_size())?;
    lay_out(spec, sampler, sampled, comm)
}

/// Sample rank `rank` of `world`'s shard of round `round` (no collective).
pub fn sample(
    spec: &RolloutSpec,
    sampler: &Sampler,
    round_rows: Vec<usize>,
    round: usize,
    rank: usize,
    world: usize,
) -> anyhow::Result<Sampled> {
    let Sampler { model, tokenizer, ref encoder, data, seed } = *sampler;
    let group = spec.num_generations;
    let shard = dist::shard(round_rows.len(), rank, world);
    let rows = round_rows[shard.clone()].to_vec();
    let prompts: Vec<EncodedPrompt> = rows.iter().map(|&r| encoder.encode(&data[r])).collect::<anyhow::Result<_>>()?;
    let refs: Vec<&EncodedPrompt> = prompts.iter().collect();
    let pad = i64::from(tokenizer.pad_id);
    let completions = if prompts.is_empty() {
        Vec::new()
    } else {
        let (input_ids, attention_mask, pixel_values, grid) = prompt_batch(&refs, pad, model);
        let cfg = GenerationConfig {
            seed: round_seed(seed, round),
            row_streams: Some(shard.start * group),
            num_return_sequences: group,
            ..spec.generation.clone()
        };
        let batch = Batch {
            input_ids: &input_ids,
            attention_mask: &attention_mask,
            pixel_values: pixel_values.as_ref(),
            image_grid_thw: &grid,
        };
        generate(model, Some(tokenizer), &batch, &cfg)?
    };
    Ok(Sampled { round, shard, rows, prompts, completions })
}

/// Score this rank's completions, gather the round's rewards (advantages
/// and metrics cover the whole round) and the loss normalisers, and cut
/// the completions into micro-batches. Collective.
pub fn lay_out(
    spec: &RolloutSpec,
    sampler: &Sampler,
    sampled: Sampled,
    comm: &mut dyn Collective,
) -> anyhow::Result<Rollout> {
    let Sampled { round, shard, rows, prompts, completions } = sampled;
    let (model, data) = (sampler.model, sampler.data);
    let group = spec.num_generations;
    let mut scores = Vec::with_capacity(completions.len());
    let mut rewards = Vec::with_capacity(completions.len());
    for c in &completions {
        let row = &data[rows[c.prompt]];
        let letters = option_letters(&row.options);
        let s = spec.rewards.score(&Sample { completion: &c.text, gold: &row.answer, letters: &letters });
        rewards.push(spec.rewards.total(&s));
        scores.push(s);
    }
    // Advantages need whole groups (local) or the whole round (`batch`): gather.
    let share = RoundTotals {
        scores: scores.clone(),
        rewards: rewards.clone(),
        lengths: completions.iter().map(|c| c.token_ids.len()).collect(),
        truncated: completions.iter().map(Rollout::is_truncated).collect(),
        ..Default::default()
    };
    let mut totals = RoundTotals::join(dist::all_gather_json(comm, &share)?);
    let all = advantages(&totals.rewards, group, spec.scale_rewards);
    let local = shard.start * group..shard.end * group;
    let adv = Advantages { values: all.values[local].to_vec(), frac_zero_std: all.frac_zero_std };
    let seqs: Vec<usize> = (0..completions.len()).collect();
    let layout = Layout {
        group,
        prompts: &prompts,
        completions: &completions,
        advantages: &adv.values,
        pad: i64::from(sampler.tokenizer.pad_id),
        mask_truncated: spec.mask_truncated_completions,
        model,
    };
    let micro: Vec<MicroBatch> =
        seqs.chunks(spec.micro_batch_size.max(1)).map(|chunk| layout.micro_batch(chunk)).collect();
    let loss_tokens: f64 = micro.iter().map(|m| m.loss_mask.sum(Kind::Double).double_value(&[])).sum();
    totals.sequences = totals.rewards.len();
    totals.loss_tokens = dist::all_reduce_f64(comm, &[loss_tokens])?[0];
    Ok(Rollout {
        round,
        rows,
        users: prompts.into_iter().map(|p| p.user).collect(),
        completions,
        scores,
        rewards,
        advantages: adv,
        micro,
        round_totals: totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_is_a_fresh_permutation_per_epoch_and_reproducible() {
        let mut a = DataOrder::new(5, 9);
        let first: Vec<usize> = (0..5).map(|p| a.row(p)).collect();
        let second: Vec<usize> = (5..10).map(|p| a.row(p)).collect();
        for epoch in [&first, &second] {
            let mut sorted = epoch.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        }
        assert_ne!(first, second, "each epoch is reshuffled");
        // Random access (a resumed run) gives the same rows as a sequential pass.
        let mut b = DataOrder::new(5, 9);
        assert_eq!(b.round(2, 3), vec![second[1], second[2], second[3]]);
        assert_eq!(b.round(0, 3), first[..3].to_vec());
        assert_ne!(round_seed(9, 0), round_seed(9, 1));
    }
}
