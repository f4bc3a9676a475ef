//! Batched generation: left-padded prefill once, KV-cached decode steps,
//! greedy or sampled (temperature, top-k, top-p, seed), stop on eos / stop
//! strings / max_new_tokens, with per-token logprobs for GRPO.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::chat::ChatTokenizer;
use crate::error::ModelError;
use crate::model::{Batch, Qwen25Vl};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
    /// `Some(k)`: output row `r` samples from its own stream `k + r` of
    /// `seed`, so rows sample the same tokens whatever else shares the batch
    /// (data-parallel GRPO splits a round's prompts across ranks). `None`:
    /// one stream for the whole batch.
    #[serde(default)]
    pub row_streams: Option<usize>,
    /// Completions per prompt (a GRPO group); the prompt is prefilled once.
    pub num_return_sequences: usize,
    pub eos_token_ids: Vec<i64>,
    /// Stop once the decoded completion contains one of these (kept in the output).
    pub stop_strings: Vec<String>,
    /// Token ids never generated (HF `suppress_tokens`): e.g. the image
    /// placeholder, which a completion fed back to the model must not contain.
    #[serde(default)]
    pub suppress_tokens: Vec<i64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            row_streams: None,
            num_return_sequences: 1,
            eos_token_ids: Vec::new(),
            stop_strings: vec!["</answer>".into()],
            suppress_tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Index of the prompt in the batch.
    pub prompt: usize,
    pub token_ids: Vec<i64>,
    /// Decoded without special tokens (empty when no tokenizer was given).
    pub text: String,
    /// log p(token) under the sampling distribution (after temperature,
    /// before top-k/top-p truncation); for greedy, under the raw logits.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Where the next tokens are chosen, and whether rows that finished keep
/// being decoded. [`DecodeLoop::default`] is what generation uses; the other
/// settings rebuild the loop before it (every row decoded until the last
/// one finishes, each row's full-vocabulary logits copied to the host and
/// sampled there), kept as the reference the device sampler is tested
/// against and as the benchmark's baseline (`pipeline model bench`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLoop {
    /// Drop finished rows from the batch and the KV cache.
    pub drop_finished: bool,
    pub sampler: SamplerSite,
}

impl Default for DecodeLoop {
    fn default() -> Self {
        Self { drop_finished: true, sampler: SamplerSite::Device }
    }
}

/// Where [`generate`] turns logits into tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerSite {
    /// Tensor ops on the model's device; one (token, log-prob) pair per row
    /// comes back each step.
    Device,
    /// On the host, over a copy of every row's logits.
    Host,
}

/// Give the `suppressed` tokens a logit of -inf (probability 0).
fn suppress(logits: &mut [f32], suppressed: &[i64]) {
    for &t in suppressed {
        if let Some(l) = usize::try_from(t).ok().and_then(|i| logits.get_mut(i)) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Host sampler: pick a token from one row of logits with the uniform draw
/// `u` in [0, 1) (unused when greedy); returns (token, logprob).
fn choose(logits: &[f32], cfg: &GenerationConfig, u: f32) -> (usize, f32) {
    let t = if cfg.temperature > 0.0 { cfg.temperature as f32 } else { 1.0 };
    // log-sum-exp of the temperature-scaled logits, shifted by the max for stability.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) / t;
    let lse = max + logits.iter().map(|&l| (l / t - max).exp()).sum::<f32>().ln();
    let logprob = |i: usize| logits[i] / t - lse;
    if cfg.temperature <= 0.0 {
        // First maximum, like torch.argmax.
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return (best, logprob(best));
    }
    // Sorting the whole vocabulary (152k for Qwen) for every sampled token
    // would dominate generation: candidates are drawn in vocabulary order,
    // and only the top-k / nucleus filters partially order them.
    let prob = |i: usize| logprob(i).exp();
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if cfg.top_k > 0 && cfg.top_k < order.len() {
        order.select_nth_unstable_by(cfg.top_k - 1, desc);
        order.truncate(cfg.top_k);
    }
    if cfg.top_p < 1.0 {
        // The nucleus: the most likely candidates until their share of the
        // candidates' mass reaches top_p, found by sorting ever longer prefixes.
        let total: f32 = order.iter().map(|&i| prob(i)).sum();
        let mut want = order.len().min(64);
        let keep = loop {
            if want < order.len() {
                order.select_nth_unstable_by(want - 1, desc);
            }
            order[..want].sort_by(desc);
            let mut acc = 0.0;
            let found = order[..want].iter().position(|&i| {
                acc += prob(i) / total;
                acc >= cfg.top_p as f32
            });
            match found {
                Some(n) => break n + 1,
                None if want == order.len() => break want,
                None => want = (want * 8).min(order.len()),
            }
        };
        order.truncate(keep);
    }
    let total: f32 = order.iter().map(|&i| prob(i)).sum();
    let mut u = u * total;
    let mut last = None;
    for &i in &order {
        let p = prob(i);
        if p > 0.0 {
            last = Some(i);
        }
        u -= p;
        if u <= 0.0 && p > 0.0 {
            return (i, logprob(i));
        }
    }
    // Rounding left u > 0: the last candidate that can be drawn at all.
    let last = last.unwrap_or(0);
    (last, logprob(last))
}

/// The device sampler's distribution over (rows, vocab) f32 `logits`
/// (suppressed tokens already at -inf): the log-probs of the
/// temperature-scaled logits over the whole vocabulary (what a completion's
/// `logprobs` report), and the probabilities with everything outside the
/// top-k / nucleus candidates set to 0.
///
/// The candidates are the host sampler's: the `top_k` largest, then the
/// shortest most-likely prefix of them whose share of their mass reaches
/// `top_p` (ties broken by `topk`'s order, as the host broke them by its
/// partial sort's). The nucleus is searched in ever longer sorted prefixes
/// (64, ×8, …), so the whole vocabulary is rarely sorted.
fn candidate_probs(logits: &Tensor, cfg: &GenerationConfig) -> (Tensor, Tensor) {
    let vocab = logits.size().last().copied().unwrap_or(0);
    let scaled = logits / cfg.temperature;
    let logp = scaled.log_softmax(-1, Kind::Float);
    let mut probs = logp.exp();
    // Keep the first `keep` (rows, k) entries of a sorted `index` (rows, k).
    let only = |probs: &Tensor, index: &Tensor, keep: &Tensor| {
        let mask = probs.zeros_like().to_kind(Kind::Bool).scatter(-1, index, keep);
        probs.masked_fill(&mask.logical_not(), 0.0)
    };
    if cfg.top_k > 0 && (cfg.top_k as i64) < vocab {
        let index = scaled.topk(cfg.top_k as i64, -1, true, false).1;
        probs = only(&probs, &index, &index.ones_like().to_kind(Kind::Bool));
    }
    if cfg.top_p < 1.0 {
        let total = probs.sum_dim_intlist([-1i64].as_slice(), true, Kind::Float);
        let mut k = vocab.min(64);
        loop {
            let (vals, index) = probs.topk(k, -1, true, true);
            let share = (&vals / &total).cumsum(-1, Kind::Float);
            let reached = share.ge(cfg.top_p);
            let found = reached.any_dim(-1, true);
            // A row is settled once its nucleus is found or its prefix holds
            // every candidate (then rounding kept the share below top_p).
            let settled = found.logical_or(&vals.narrow(-1, k - 1, 1).le(0.0));
            if k == vocab || settled.all().int64_value(&[]) != 0 {
                // Position of the first share >= top_p, else the whole prefix.
                let first = reached.to_kind(Kind::Int64).argmax(-1, true).where_self(&found, &Tensor::from(k - 1));
                let positions = Tensor::arange(k, (Kind::Int64, vals.device())).view([1, k]);
                probs = only(&probs, &index, &positions.le_tensor(&first));
                break;
            }
            k = (k * 8).min(vocab);
        }
    }
    (logp, probs)
}

/// Device sampler: the (token, logprob) of every row of (rows, vocab)
/// `logits`, with `uniforms` one draw in [0, 1) per row (ignored when
/// greedy). Greedy is `argmax` (the first maximum, as the host's). Sampling
/// inverts the candidates' cumulative distribution in vocabulary order at
/// `u × total`: the host sampler's rule, computed with a cumulative sum, so
/// a draw within rounding of a boundary may pick the neighbouring token.
/// Only the tokens and log-probs are copied back.
fn device_choose(
    logits: &Tensor,
    cfg: &GenerationConfig,
    uniforms: &[f32],
    suppressed: Option<&Tensor>,
) -> Result<(Vec<i64>, Vec<f32>), ModelError> {
    let mut logits = logits.to_kind(Kind::Float);
    if let Some(s) = suppressed {
        logits = logits.index_fill(-1, s, f64::NEG_INFINITY);
    }
    let (token, logp) = if cfg.temperature <= 0.0 {
        let token = logits.argmax(-1, true);
        (token.shallow_clone(), logits.log_softmax(-1, Kind::Float).gather(-1, &token, false))
    } else {
        let (logp, probs) = candidate_probs(&logits, cfg);
        let cdf = probs.cumsum(-1, Kind::Float);
        let vocab = cdf.size().last().copied().unwrap_or(1);
        let total = cdf.narrow(-1, vocab - 1, 1);
        let rows = uniforms.len() as i64;
        let u = Tensor::from_slice(uniforms).to_device(cdf.device()).view([rows, 1]) * &total;
        // The first index whose cumulative mass reaches u; u > 0 so a
        // zero-probability token is never picked, u ≤ total so one always is.
        let u = u.clamp_min(f64::from(f32::MIN_POSITIVE)).minimum(&total);
        let token = cdf.lt_tensor(&u).sum_dim_intlist([-1i64].as_slice(), true, Kind::Int64).clamp_max(vocab - 1);
        (token.shallow_clone(), logp.gather(-1, &token, false))
    };
    // One copy back: ids are exact in f64.
    let both = Tensor::cat(&[token.to_kind(Kind::Double), logp.to_kind(Kind::Double)], 1).to_device(Device::Cpu);
    let rows: Vec<Vec<f64>> = Vec::try_from(&both)?;
    Ok(rows.into_iter().map(|r| (r[0] as i64, r[1] as f32)).unzip())
}

/// Host sampler over every row of `logits`; rows in `skip` get (0, 0).
fn host_choose(
    logits: &Tensor,
    cfg: &GenerationConfig,
    uniforms: &[f32],
    skip: &[bool],
) -> Result<(Vec<i64>, Vec<f32>), ModelError> {
    let mut host: Vec<Vec<f32>> = Vec::try_from(&logits.to_kind(Kind::Float).to_device(Device::Cpu))?;
    Ok(host
        .iter_mut()
        .enumerate()
        .map(|(b, row)| {
            if skip[b] {
                return (0, 0.0);
            }
            suppress(row, &cfg.suppress_tokens);
            let (tok, lp) = choose(row, cfg, uniforms.get(b).copied().unwrap_or(0.0));
            (tok as i64, lp)
        })
        .unzip())
}

/// Generate completions for every prompt of `batch`
/// (`num_return_sequences` each, prompt-major order).
pub fn generate(
    model: &Qwen25Vl,
    tokenizer: Option<&ChatTokenizer>,
    batch: &Batch,
    cfg: &GenerationConfig,
) -> Result<Vec<Completion>, ModelError> {
    generate_with(model, tokenizer, batch, cfg, DecodeLoop::default())
}

/// [`generate`] with a chosen [`DecodeLoop`].
///
/// The prompt batch is prefilled once and its KV cache repeated for the
/// `num_return_sequences` completions of each prompt. Every decode step
/// draws one uniform per unfinished row from that row's stream (or, without
/// `row_streams`, from the shared stream in row order) — the same draws
/// whichever loop runs — then picks the tokens; rows that finished are then
/// dropped from the batch and from the KV cache (`index_select` on every
/// layer's keys/values, the key mask and the mRoPE deltas), so a group with
/// uneven completion lengths stops paying for its finished rows.
pub fn generate_with(
    model: &Qwen25Vl,
    tokenizer: Option<&ChatTokenizer>,
    batch: &Batch,
    cfg: &GenerationConfig,
    decode: DecodeLoop,
) -> Result<Vec<Completion>, ModelError> {
    let n = cfg.num_return_sequences.max(1);
    tch::no_grad(|| {
        let (logits, mut state) = model.prefill(batch, true)?;
        let mut logits = logits.squeeze_dim(1);
        if n > 1 {
            state.repeat_rows(n as i64);
            logits = logits.repeat_interleave_self_int(n as i64, 0, None);
        }
        let rows = logits.size()[0] as usize;
        let mut shared = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut own: Vec<ChaCha8Rng> = match cfg.row_streams {
            Some(first) => (0..rows)
                .map(|r| {
                    let mut g = ChaCha8Rng::seed_from_u64(cfg.seed);
                    g.set_stream((first + r) as u64);
                    g
                })
                .collect(),
            None => Vec::new(),
        };
        let mut out: Vec<Completion> = (0..rows)
            .map(|r| Completion {
                prompt: r / n,
                token_ids: Vec::new(),
                text: String::new(),
                logprobs: Vec::new(),
                finish: FinishReason::Length,
            })
            .collect();
        let vocab = model.config.text.vocab_size;
        let gone: Vec<i64> = cfg.suppress_tokens.iter().copied().filter(|t| (0..vocab).contains(t)).collect();
        let suppressed = (!gone.is_empty()).then(|| Tensor::from_slice(&gone).to_device(model.device));
        let mut done = vec![false; rows];
        let filler = cfg.eos_token_ids.first().copied().unwrap_or(0);
        // Batch row b decodes completion `active[b]` (kept in increasing order).
        let mut active: Vec<usize> = (0..rows).collect();
        for step in 0..cfg.max_new_tokens {
            let finished: Vec<bool> = active.iter().map(|&r| done[r]).collect();
            let uniforms: Vec<f32> = if cfg.temperature > 0.0 {
                active
                    .iter()
                    .map(|&r| if done[r] { 0.5 } else { own.get_mut(r).unwrap_or(&mut shared).random::<f32>() })
                    .collect()
            } else {
                vec![0.0; active.len()]
            };
            let (tokens, logprobs) = match decode.sampler {
                SamplerSite::Device => device_choose(&logits, cfg, &uniforms, suppressed.as_ref())?,
                SamplerSite::Host => host_choose(&logits, cfg, &uniforms, &finished)?,
            };
            let mut next = Vec::with_capacity(active.len());
            let mut keep = Vec::with_capacity(active.len());
            for (b, &r) in active.iter().enumerate() {
                if finished[b] {
                    next.push(filler);
                    continue;
                }
                let tok = tokens[b];
                let c = &mut out[r];
                c.token_ids.push(tok);
                c.logprobs.push(logprobs[b]);
                if cfg.eos_token_ids.contains(&tok) {
                    c.finish = FinishReason::Eos;
                    done[r] = true;
                } else if !cfg.stop_strings.is_empty()
                    && let Some(t) = tokenizer
                {
                    let ids: Vec<u32> = c.token_ids.iter().map(|&i| i as u32).collect();
                    let text = t.decode(&ids, false).map_err(|e| ModelError::Input(e.to_string()))?;
                    if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                        c.finish = FinishReason::StopString;
                        done[r] = true;
                    }
                }
                next.push(tok);
                if !done[r] {
                    keep.push(b);
                }
            }
            if keep.is_empty() || step + 1 == cfg.max_new_tokens {
                break;
            }
            if decode.drop_finished && keep.len() < active.len() {
                let idx: Vec<i64> = keep.iter().map(|&b| b as i64).collect();
                state.select_rows(&Tensor::from_slice(&idx).to_device(model.device));
                next = keep.iter().map(|&b| next[b]).collect();
                active = keep.iter().map(|&b| active[b]).collect();
            }
            logits = model.decode_step(&Tensor::from_slice(&next), &mut state);
        }
        if let Some(t) = tokenizer {
            for c in &mut out {
                let ids: Vec<u32> = c.token_ids.iter().map(|&i| i as u32).collect();
                c.text = t.decode(&ids, true).map_err(|e| ModelError::Input(e.to_string()))?;
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Qwen25VlConfig;

    /// (token, logprob) of one row of logits under the host and the device sampler, for the draw `u`.
    fn both(logits: &[f32], cfg: &GenerationConfig, u: f32) -> [(usize, f32); 2] {
        let mut row = logits.to_vec();
        suppress(&mut row, &cfg.suppress_tokens);
        let host = choose(&row, cfg, u);
        let gone: Vec<i64> =
            cfg.suppress_tokens.iter().copied().filter(|&t| (0..logits.len() as i64).contains(&t)).collect();
        let sup = (!gone.is_empty()).then(|| Tensor::from_slice(&gone));
        let (tok, lp) = device_choose(&Tensor::from_slice(logits).view([1, -1]), cfg, &[u], sup.as_ref()).unwrap();
        [host, (tok[0] as usize, lp[0])]
    }

    #[test]
    fn greedy_takes_first_max_and_sampling_respects_top_k() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let cfg = GenerationConfig::default();
        let expected = 2.0 - (1.0f32 + 2.0 * 2f32.exp() + (-1f32).exp()).ln();
        for (tok, lp) in both(&[0.0, 2.0, 2.0, -1.0], &cfg, 0.0) {
            assert_eq!(tok, 1);
            assert!((lp - expected).abs() < 1e-5);
        }
        let cfg = GenerationConfig { temperature: 1.0, top_k: 2, ..Default::default() };
        for _ in 0..50 {
            for (tok, _) in both(&[0.0, 2.0, 1.5, 1.0], &cfg, rng.random()) {
                assert!(tok == 1 || tok == 2);
            }
        }
        // top_p keeps only the dominant token here.
        let cfg = GenerationConfig { temperature: 1.0, top_p: 0.5, ..Default::default() };
        for _ in 0..20 {
            for (tok, _) in both(&[0.0, 5.0, 0.0], &cfg, rng.random()) {
                assert_eq!(tok, 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_the_nucleus_is_the_top_mass() {
        // 4000 draws from softmax([0, 1, 2, 3]): every frequency within 3 % of its probability.
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let cfg = GenerationConfig { temperature: 1.0, ..Default::default() };
        let mut counts = [[0usize; 4]; 2];
        for _ in 0..4000 {
            for (side, (tok, _)) in both(&logits, &cfg, rng.random()).into_iter().enumerate() {
                counts[side][tok] += 1;
            }
        }
        for side in counts {
            for (i, &c) in side.iter().enumerate() {
                let p = logits[i].exp() / z;
                assert!((c as f32 / 4000.0 - p).abs() < 0.03, "token {i}: {c} of 4000 vs p {p}");
            }
        }
        // A long tail (200 tokens) beyond the first 64 candidates: the nucleus
        // of top_p 0.9 is exactly the smallest most-likely set with 90 % of the mass.
        let mut tail = vec![0.0f32; 200];
        tail[7] = 6.0;
        tail[150] = 5.5;
        let probs: Vec<f32> = {
            let z: f32 = tail.iter().map(|l| l.exp()).sum();
            tail.iter().map(|l| l.exp() / z).collect()
        };
        let top2 = probs[7] + probs[150];
        assert!(top2 < 0.9, "the nucleus must reach into the flat tail ({top2})");
        let cfg = GenerationConfig { temperature: 1.0, top_p: 0.9, ..Default::default() };
        let mut seen = [std::collections::BTreeSet::new(), std::collections::BTreeSet::new()];
        for _ in 0..3000 {
            for (side, (tok, _)) in both(&tail, &cfg, rng.random()).into_iter().enumerate() {
                seen[side].insert(tok);
            }
        }
        let flat = probs[0];
        let nucleus_tail = ((0.9 - top2) / flat).ceil() as usize;
        for seen in seen {
            assert!(seen.contains(&7) && seen.contains(&150));
            assert!(seen.len() <= 2 + nucleus_tail, "{} tokens drawn, nucleus holds {}", seen.len(), 2 + nucleus_tail);
            assert!(seen.len() > 2 + nucleus_tail / 2, "the nucleus tail was not sampled: {}", seen.len());
        }
        // top_k on a long vocabulary keeps exactly the k largest.
        let cfg = GenerationConfig { temperature: 1.0, top_k: 2, ..Default::default() };
        for _ in 0..200 {
            for (t, _) in both(&tail, &cfg, rng.random()) {
                assert!(t == 7 || t == 150, "{t}");
            }
        }
    }

    #[test]
    fn suppressed_tokens_are_never_chosen() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let logits = vec![0.0f32, 9.0, 0.5, 8.0];
        let greedy = GenerationConfig { suppress_tokens: vec![1, 3, 99, -1], ..Default::default() };
        assert_eq!(both(&logits, &greedy, 0.0).map(|(t, _)| t), [2, 2], "greedy skips them");
        let cfg = GenerationConfig { temperature: 1.0, ..greedy };
        for _ in 0..200 {
            for (tok, lp) in both(&logits, &cfg, rng.random()) {
                assert!(tok == 0 || tok == 2, "{tok}");
                assert!(lp.is_finite());
            }
        }
    }

    #[test]
    fn temperature_scales_logprobs() {
        let cfg = GenerationConfig { temperature: 2.0, ..Default::default() };
        let logits = [1.0f32, 3.0];
        let z = (0.5f32.exp() + 1.5f32.exp()).ln();
        for (tok, lp) in both(&logits, &cfg, 0.3) {
            assert!((lp - (logits[tok] / 2.0 - z)).abs() < 1e-5);
        }
    }

    /// Sorted indices of the `k` largest values.
    fn top(values: &[f32], k: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|a, b| values[*b].total_cmp(&values[*a]));
        order.truncate(k);
        order.sort();
        order
    }

    #[test]
    fn device_sampler_draws_the_host_samplers_tokens_and_candidates() {
        tch::manual_seed(4);
        let (rows, vocab) = (8usize, 1000usize);
        let logits = Tensor::randn([rows as i64, vocab as i64], (Kind::Float, Device::Cpu)) * 3.0;
        let host: Vec<Vec<f32>> = Vec::try_from(&logits).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Greedy and plain temperature sampling: the same token for the same
        // draw (inverse CDF in vocabulary order on both sides).
        for cfg in [
            GenerationConfig::default(),
            GenerationConfig { temperature: 0.7, ..Default::default() },
            GenerationConfig { temperature: 1.3, ..Default::default() },
        ] {
            for _ in 0..50 {
                let u: Vec<f32> = (0..rows).map(|_| rng.random()).collect();
                let (tok, lp) = device_choose(&logits, &cfg, &u, None).unwrap();
                for r in 0..rows {
                    let (t, l) = choose(&host[r], &cfg, u[r]);
                    assert_eq!(tok[r], t as i64, "row {r}, u {}, temperature {}", u[r], cfg.temperature);
                    assert!((lp[r] - l).abs() < 1e-5, "{} vs {l}", lp[r]);
                }
            }
        }
        // top-k / top-p: the device's candidates are exactly the host's (no
        // ties among random logits), computed here from a full sort.
        for (k, p) in [(50, 1.0), (0, 0.9), (0, 0.3), (200, 0.95), (5, 0.999)] {
            let cfg = GenerationConfig { temperature: 0.8, top_k: k, top_p: p, ..Default::default() };
            let (_, probs) = candidate_probs(&logits.to_kind(Kind::Float), &cfg);
            for (r, row) in host.iter().enumerate() {
                let scaled: Vec<f32> = row.iter().map(|l| l / 0.8).collect();
                let z: f32 = scaled.iter().map(|s| s.exp()).sum();
                let mut want = if k > 0 { top(&scaled, k) } else { (0..vocab).collect() };
                if p < 1.0 {
                    let mass: f32 = want.iter().map(|&i| scaled[i].exp() / z).sum();
                    want.sort_by(|a, b| scaled[*b].total_cmp(&scaled[*a]));
                    let mut acc = 0.0;
                    let n = want.iter().position(|&i| {
                        acc += scaled[i].exp() / z / mass;
                        acc >= p as f32
                    });
                    want.truncate(n.map_or(want.len(), |n| n + 1));
                    want.sort();
                }
                let got: Vec<usize> = (0..vocab).filter(|&i| probs.double_value(&[r as i64, i as i64]) > 0.0).collect();
                assert_eq!(got, want, "row {r}, top_k {k}, top_p {p}");
            }
        }
    }

    /// A tiny random text model (vocab 64) and a left-padded batch of two
    /// prompts of different lengths (so their mRoPE deltas differ).
    fn tiny() -> (Qwen25Vl, Tensor, Tensor) {
        let raw = serde_json::json!({
            "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": false, "initializer_range": 0.5, "eos_token_id": 1
        });
        let config = Qwen25VlConfig::from_value(raw, std::path::Path::new("tiny")).unwrap();
        let model = Qwen25Vl::random(config, 3, Kind::Float, Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&[0i64, 0, 0, 9, 17, 33, 41, 12, 7, 22, 5, 30, 11, 8]).view([2, 7]);
        let mask = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 7]);
        (model, ids, mask)
    }

    #[test]
    fn dropping_finished_rows_and_sampling_on_the_device_keep_every_completion() {
        let (model, ids, mask) = tiny();
        let batch = Batch { input_ids: &ids, attention_mask: &mask, pixel_values: None, image_grid_thw: &[] };
        let run =
            |cfg: &GenerationConfig, decode: DecodeLoop| generate_with(&model, None, &batch, cfg, decode).unwrap();
        let before = DecodeLoop { drop_finished: false, sampler: SamplerSite::Host };
        let host_dropping = DecodeLoop { drop_finished: true, sampler: SamplerSite::Host };
        let device_full = DecodeLoop { drop_finished: false, sampler: SamplerSite::Device };
        // Five end tokens of 64: completions end after ~12 tokens, unevenly.
        let eos = vec![1, 2, 3, 4, 5];
        let sampled = GenerationConfig {
            max_new_tokens: 40,
            temperature: 1.0,
            num_return_sequences: 5,
            eos_token_ids: eos.clone(),
            stop_strings: vec![],
            suppress_tokens: vec![6],
            ..Default::default()
        };
        let greedy = GenerationConfig { temperature: 0.0, suppress_tokens: vec![], ..sampled.clone() };
        for (cfg, row_streams) in [(&sampled, Some(3)), (&sampled, None), (&greedy, None)] {
            let cfg = GenerationConfig { row_streams, ..cfg.clone() };
            let reference = run(&cfg, before);
            let lengths: Vec<usize> = reference.iter().map(|c| c.token_ids.len()).collect();
            if cfg.temperature > 0.0 {
                let (lo, hi) = (lengths.iter().min().unwrap(), lengths.iter().max().unwrap());
                assert!(hi > &(2 * lo), "completion lengths should be uneven: {lengths:?}");
                assert!(reference.iter().all(|c| !c.token_ids.contains(&6)), "suppressed token sampled");
            }
            for decode in [host_dropping, device_full, DecodeLoop::default()] {
                let got = run(&cfg, decode);
                assert_eq!(got.len(), reference.len());
                for (a, b) in got.iter().zip(&reference) {
                    assert_eq!((a.prompt, &a.token_ids, a.finish), (b.prompt, &b.token_ids, b.finish), "{decode:?}");
                    let diff = a.logprobs.iter().zip(&b.logprobs).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                    assert!(diff < 1e-5, "{decode:?}: logprobs differ by {diff}");
                }
            }
        }
    }
}
