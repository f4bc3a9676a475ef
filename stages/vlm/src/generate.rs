//! Batched generation: left-padded prefill once, KV-cached decode steps,
//! greedy or sampled (temperature, top-k, top-p, seed), stop on eos / stop
//! strings / max_new_tokens, with per-token logprobs for GRPO.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

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

/// Give the `suppressed` tokens a logit of -inf (probability 0).
fn suppress(logits: &mut [f32], suppressed: &[i64]) {
    for &t in suppressed {
        if let Some(l) = usize::try_from(t).ok().and_then(|i| logits.get_mut(i)) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Pick a token from one row of logits; returns (token, logprob).
fn choose(logits: &[f32], cfg: &GenerationConfig, rng: &mut ChaCha8Rng) -> (usize, f32) {
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
    let mut u = rng.random::<f32>() * total;
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

/// Generate completions for every prompt of `batch`
/// (`num_return_sequences` each, prompt-major order).
pub fn generate(
    model: &Qwen25Vl,
    tokenizer: Option<&ChatTokenizer>,
    batch: &Batch,
    cfg: &GenerationConfig,
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
        let mut done = vec![false; rows];
        let filler = cfg.eos_token_ids.first().copied().unwrap_or(0);
        for step in 0..cfg.max_new_tokens {
            let mut host: Vec<Vec<f32>> = Vec::try_from(&logits.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
            let mut next = Vec::with_capacity(rows);
            for (r, row) in host.iter_mut().enumerate() {
                if done[r] {
                    next.push(filler);
                    continue;
                }
                suppress(row, &cfg.suppress_tokens);
                let rng = own.get_mut(r).unwrap_or(&mut shared);
                let (tok, lp) = choose(row, cfg, rng);
                let c = &mut out[r];
                c.token_ids.push(tok as i64);
                c.logprobs.push(lp);
                if cfg.eos_token_ids.contains(&(tok as i64)) {
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
                next.push(tok as i64);
            }
            if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
                break;
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

    #[test]
    fn greedy_takes_first_max_and_sampling_respects_top_k() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let cfg = GenerationConfig::default();
        let (tok, lp) = choose(&[0.0, 2.0, 2.0, -1.0], &cfg, &mut rng);
        assert_eq!(tok, 1);
        let expected = 2.0 - (1.0f32 + 2.0 * 2f32.exp() + (-1f32).exp()).ln();
        assert!((lp - expected).abs() < 1e-5);
        let cfg = GenerationConfig { temperature: 1.0, top_k: 2, ..Default::default() };
        for _ in 0..50 {
            let (tok, _) = choose(&[0.0, 2.0, 1.5, 1.0], &cfg, &mut rng);
            assert!(tok == 1 || tok == 2);
        }
        // top_p keeps only the dominant token here.
        let cfg = GenerationConfig { temperature: 1.0, top_p: 0.5, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(choose(&[0.0, 5.0, 0.0], &cfg, &mut rng).0, 1);
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_the_nucleus_is_the_top_mass() {
        // 4000 draws from softmax([0, 1, 2, 3]): every frequency within 3 % of its probability.
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let cfg = GenerationConfig { temperature: 1.0, ..Default::default() };
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[choose(&logits, &cfg, &mut rng).0] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = logits[i].exp() / z;
            assert!((c as f32 / 4000.0 - p).abs() < 0.03, "token {i}: {c} of 4000 vs p {p}");
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
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            seen.insert(choose(&tail, &cfg, &mut rng).0);
        }
        let flat = probs[0];
        let nucleus_tail = ((0.9 - top2) / flat).ceil() as usize;
        assert!(seen.contains(&7) && seen.contains(&150));
        assert!(seen.len() <= 2 + nucleus_tail, "{} tokens drawn, nucleus holds {}", seen.len(), 2 + nucleus_tail);
        assert!(seen.len() > 2 + nucleus_tail / 2, "the nucleus tail was not sampled: {}", seen.len());
        // top_k on a long vocabulary keeps exactly the k largest.
        let cfg = GenerationConfig { temperature: 1.0, top_k: 2, ..Default::default() };
        for _ in 0..200 {
            let t = choose(&tail, &cfg, &mut rng).0;
            assert!(t == 7 || t == 150, "{t}");
        }
    }

    #[test]
    fn suppressed_tokens_are_never_chosen() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut logits = vec![0.0f32, 9.0, 0.5, 8.0];
        suppress(&mut logits, &[1, 3, 99, -1]);
        assert_eq!(choose(&logits, &GenerationConfig::default(), &mut rng).0, 2, "greedy skips them");
        let cfg = GenerationConfig { temperature: 1.0, ..Default::default() };
        for _ in 0..200 {
            let (tok, lp) = choose(&logits, &cfg, &mut rng);
            assert!(tok == 0 || tok == 2, "{tok}");
            assert!(lp.is_finite());
        }
    }

    #[test]
    fn temperature_scales_logprobs() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let cfg = GenerationConfig { temperature: 2.0, ..Default::default() };
        let logits = [1.0f32, 3.0];
        let (tok, lp) = choose(&logits, &cfg, &mut rng);
        let z = (0.5f32.exp() + 1.5f32.exp()).ln();
        assert!((lp - (logits[tok] / 2.0 - z)).abs() < 1e-5);
    }
}
