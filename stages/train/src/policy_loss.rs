//! The GRPO objective per token, as TRL's `GRPOTrainer._compute_loss`:
//!
//! ratio ρ = exp(logp − logp_old); surrogate −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A);
//! plus β·KL with the k3 estimator exp(ref − logp) − (ref − logp) − 1;
//! masked to the completion tokens (m) and aggregated per `loss_type` over
//! the whole optimizer step: S completions and T loss tokens summed over
//! every micro-batch of every rank, L = `max_completion_length`:
//!
//! - `grpo`: (1/S) Σ_i (Σ_t m·ℓ / max(1, Σ_t m)): mean over sequences of each sequence's token mean;
//! - `bnpo`: Σ m·ℓ / max(1, T): token mean over the step;
//! - `dr_grpo`: Σ m·ℓ / (S·L);
//! - `dapo`: Σ m·ℓ / max(1, T).
//!
//! Each micro-batch contributes its sums divided by these step totals, so
//! the micro-batch losses (and gradients) add up to the step's whatever the
//! micro-batch size and the rank count. That is what TRL computes when the
//! step's micro-batches are equal (it divides each micro-batch's mean by the
//! gradient-accumulation count, and DDP averages the ranks): `grpo` and
//! `dr_grpo` are exactly TRL's then. TRL's `bnpo` takes the token mean of
//! each micro-batch, which still depends on how the tokens fall into
//! micro-batches; here it is the step's token mean, the same aggregation as
//! `dapo` (TRL's `dapo`: Σ m·ℓ over the step's global token count).

use serde::{Deserialize, Serialize};
use stage_api::schemars::{self, JsonSchema};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Per-sequence token mean, then mean over sequences (DeepSeekMath; favours short wrong answers).
    Grpo,
    /// Token mean over the optimizer step (the same aggregation as `dapo`; TRL's is per micro-batch).
    Bnpo,
    /// Token sum over a constant (sequences × max_completion_length): no length bias (Dr. GRPO).
    DrGrpo,
    /// Token sum over every completion token of the optimizer step (DAPO).
    Dapo,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub loss_type: LossType,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// KL coefficient; 0 = no reference model, no KL term.
    pub beta: f64,
    pub max_completion_length: usize,
}

/// The totals of a micro-batch's optimizer step (all micro-batches, all ranks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScale {
    /// Completions (S), those without loss tokens included.
    pub sequences: usize,
    /// Loss tokens (T, the mask sum).
    pub tokens: f64,
}

/// (batch, tokens) tensors of one micro-batch, all of one float kind.
pub struct LossInputs<'a> {
    pub logps: &'a Tensor,
    pub old_logps: &'a Tensor,
    pub ref_logps: Option<&'a Tensor>,
    /// (batch,) one advantage per completion.
    pub advantages: &'a Tensor,
    /// 1 on completion tokens that count, 0 elsewhere.
    pub mask: &'a Tensor,
}

/// Masked sums of a micro-batch, added up over a step for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    pub tokens: f64,
    pub kl: f64,
    /// ρ < 1 − ε_low with A < 0 (the clip binds from below).
    pub low_clipped: f64,
    /// ρ > 1 + ε_high with A > 0.
    pub high_clipped: f64,
    pub region_clipped: f64,
}

impl LossStats {
    pub fn add(&mut self, o: &LossStats) {
        self.tokens += o.tokens;
        self.kl += o.kl;
        self.low_clipped += o.low_clipped;
        self.high_clipped += o.high_clipped;
        self.region_clipped += o.region_clipped;
    }

    /// `x` per counted token (0 when there are none).
    pub fn per_token(&self, x: f64) -> f64 {
        if self.tokens > 0.0 { x / self.tokens } else { 0.0 }
    }
}

/// The float kind log-probs are computed in: f64 stays f64, else f32.
pub fn calc_kind(k: Kind) -> Kind {
    if k == Kind::Double { Kind::Double } else { Kind::Float }
}

/// Log-probabilities of `ids` (batch, tokens) under `logits` (batch,
/// tokens, vocab) divided by `temperature`, with the `suppressed` tokens
/// given probability 0: exactly the distribution the sampler drew from.
/// Also each position's entropy (no gradient).
pub fn token_logps(logits: &Tensor, ids: &Tensor, temperature: f64, suppressed: &[i64]) -> (Tensor, Tensor) {
    let kind = calc_kind(logits.kind());
    let vocab = logits.size().last().copied().unwrap_or(0);
    let mut scaled = logits.to_kind(kind) / temperature;
    let gone: Vec<i64> = suppressed.iter().copied().filter(|&t| (0..vocab).contains(&t)).collect();
    if !gone.is_empty() {
        // A large finite value rather than -inf: exp underflows to exactly 0
        // and the entropy's p·log p stays 0 instead of NaN.
        scaled = scaled.index_fill(-1, &Tensor::from_slice(&gone).to_device(scaled.device()), -1e9);
    }
    // gather − logsumexp: no (batch, tokens, vocab) log-softmax kept for backward.
    let picked = scaled.gather(-1, &ids.unsqueeze(-1), false).squeeze_dim(-1);
    let logps = picked - scaled.logsumexp([-1i64], false);
    let entropy = tch::no_grad(|| {
        let lp = scaled.detach().log_softmax(-1, kind);
        -(lp.exp() * &lp).sum_dim_intlist([-1i64].as_slice(), false, kind)
    });
    (logps, entropy)
}

fn sum(t: &Tensor) -> f64 {
    t.sum(t.kind()).double_value(&[])
}

/// The micro-batch's share of the step loss (differentiable) and its stats;
/// the shares of a step's micro-batches add up to its loss.
pub fn policy_loss(cfg: &LossConfig, x: &LossInputs, scale: &StepScale) -> (Tensor, LossStats) {
    let adv = x.advantages.unsqueeze(1);
    let ratio = (x.logps - x.old_logps).exp();
    let clipped = ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let surrogate = (&ratio * &adv).minimum(&(&clipped * &adv));
    let mut stats = LossStats::default();
    let per_token = match x.ref_logps {
        Some(r) if cfg.beta != 0.0 => {
            let d = r - x.logps;
            let kl = d.exp() - &d - 1.0;
            stats.kl = tch::no_grad(|| sum(&(kl.detach() * x.mask)));
            -surrogate + kl * cfg.beta
        }
        _ => -surrogate,
    };
    let masked = &per_token * x.mask;
    let sequences = scale.sequences.max(1) as f64;
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let lens = x.mask.sum_dim_intlist([-1i64].as_slice(), false, x.mask.kind()).clamp_min(1.0);
            (masked.sum_dim_intlist([-1i64].as_slice(), false, masked.kind()) / lens).sum(masked.kind()) / sequences
        }
        LossType::Bnpo | LossType::Dapo => masked.sum(masked.kind()) / scale.tokens.max(1.0),
        LossType::DrGrpo => masked.sum(masked.kind()) / (sequences * cfg.max_completion_length as f64),
    };
    tch::no_grad(|| {
        let r = ratio.detach();
        let low = r.lt(1.0 - cfg.epsilon_low).logical_and(&adv.lt(0.0));
        let high = r.gt(1.0 + cfg.epsilon_high).logical_and(&adv.gt(0.0));
        let region = low.logical_or(&high);
        let count = |b: &Tensor| sum(&(b.to_kind(x.mask.kind()) * x.mask));
        stats.tokens = sum(x.mask);
        stats.low_clipped = count(&low);
        stats.high_clipped = count(&high);
        stats.region_clipped = count(&region);
    });
    (loss, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LN2: f64 = std::f64::consts::LN_2;

    fn t2(rows: &[[f64; 3]; 2]) -> Tensor {
        Tensor::from_slice(&rows.concat()).view([2, 3])
    }

    /// Ratios row 0 = [1.5, 0.9, 1.0], row 1 = [0.5, 1.1, 2.0] (old logps 0);
    /// advantages [1, −2]; the last token of row 0 is masked out.
    /// Per-token surrogate losses with ε = 0.2:
    /// row 0: −min(1.5, 1.2) = −1.2 (clipped high), −0.9;
    /// row 1: −min(−1, −1.6) = 1.6 (clipped low), 2.2, −min(−4, −2.4) = 4 (not clipped: A < 0).
    struct Case {
        logps: Tensor,
        old: Tensor,
        reference: Tensor,
        adv: Tensor,
        mask: Tensor,
    }

    fn case() -> Case {
        let logps = t2(&[[1.5f64.ln(), 0.9f64.ln(), 0.0], [0.5f64.ln(), 1.1f64.ln(), 2.0f64.ln()]]);
        // ref − logp: row 0 [0, ln 2, 5 (masked)], row 1 [−ln 2, 0, 0]:
        // k3 = 0, 1 − ln 2, –, ln 2 − 0.5, 0, 0 -> masked sum exactly 0.5.
        let reference = &logps + t2(&[[0.0, LN2, 5.0], [-LN2, 0.0, 0.0]]);
        Case {
            old: logps.zeros_like(),
            reference,
            logps,
            adv: Tensor::from_slice(&[1.0f64, -2.0]),
            mask: t2(&[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
        }
    }

    /// The case as the whole step.
    const WHOLE: StepScale = StepScale { sequences: 2, tokens: 5.0 };
    /// The case as half of a step of 4 sequences and 10 tokens.
    const HALF: StepScale = StepScale { sequences: 4, tokens: 10.0 };

    fn run(c: &Case, loss_type: LossType, beta: f64, scale: StepScale, eps_high: f64) -> (f64, LossStats) {
        let cfg = LossConfig { loss_type, epsilon_low: 0.2, epsilon_high: eps_high, beta, max_completion_length: 4 };
        let x = LossInputs {
            logps: &c.logps,
            old_logps: &c.old,
            ref_logps: Some(&c.reference),
            advantages: &c.adv,
            mask: &c.mask,
        };
        let (loss, stats) = policy_loss(&cfg, &x, &scale);
        (loss.double_value(&[]), stats)
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn every_loss_type_against_hand_computed_values() {
        let c = case();
        // Token losses: row 0 [−1.2, −0.9], row 1 [1.6, 2.2, 4.0]; sum 5.7 over 5 tokens.
        close(run(&c, LossType::Grpo, 0.0, WHOLE, 0.2).0, (-2.1 / 2.0 + 7.8 / 3.0) / 2.0);
        close(run(&c, LossType::Bnpo, 0.0, WHOLE, 0.2).0, 5.7 / 5.0);
        close(run(&c, LossType::DrGrpo, 0.0, WHOLE, 0.2).0, 5.7 / (2.0 * 4.0));
        close(run(&c, LossType::Dapo, 0.0, WHOLE, 0.2).0, 5.7 / 5.0);
        // Half of a step: divided by the step's sequences and tokens.
        close(run(&c, LossType::Grpo, 0.0, HALF, 0.2).0, (-2.1 / 2.0 + 7.8 / 3.0) / 4.0);
        close(run(&c, LossType::Bnpo, 0.0, HALF, 0.2).0, 5.7 / 10.0);
        close(run(&c, LossType::DrGrpo, 0.0, HALF, 0.2).0, 5.7 / 16.0);
        close(run(&c, LossType::Dapo, 0.0, HALF, 0.2).0, 5.7 / 10.0);
    }

    #[test]
    fn kl_term_uses_the_k3_estimator() {
        let c = case();
        let beta = 0.1;
        let (k1, k2) = (1.0 - LN2, LN2 - 0.5); // row 0 token 1, row 1 token 0
        let row0 = -2.1 + beta * k1;
        let row1 = 7.8 + beta * k2;
        close(run(&c, LossType::Grpo, beta, WHOLE, 0.2).0, (row0 / 2.0 + row1 / 3.0) / 2.0);
        close(run(&c, LossType::Bnpo, beta, WHOLE, 0.2).0, (row0 + row1) / 5.0);
        let (_, stats) = run(&c, LossType::Bnpo, beta, WHOLE, 0.2);
        close(stats.kl, 0.5);
        close(stats.per_token(stats.kl), 0.1);
        // beta = 0: no KL term and no KL statistic.
        assert_eq!(run(&c, LossType::Bnpo, 0.0, WHOLE, 0.2).1.kl, 0.0);
    }

    #[test]
    fn clip_ratios_count_only_binding_clips() {
        let (_, s) = run(&case(), LossType::Grpo, 0.0, WHOLE, 0.2);
        assert_eq!((s.tokens, s.low_clipped, s.high_clipped, s.region_clipped), (5.0, 1.0, 1.0, 2.0));
        // A wider upper bound (DAPO's clip-higher): 1.5 is still clipped at 1.28,
        // and the loss of that token becomes −1.28.
        let (loss, s) = run(&case(), LossType::Bnpo, 0.0, WHOLE, 0.28);
        close(loss, (5.7 - 0.08) / 5.0);
        assert_eq!(s.high_clipped, 1.0);
        let (_, s) = run(&case(), LossType::Bnpo, 0.0, WHOLE, 0.6);
        assert_eq!((s.high_clipped, s.region_clipped), (0.0, 1.0));
    }

    #[test]
    fn masked_tokens_and_empty_rows_contribute_nothing() {
        let mut c = case();
        // Row 1 fully masked (a truncated completion under mask_truncated_completions).
        c.mask = t2(&[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]);
        // grpo: row 1 mean is 0/1 = 0 and still counts as a sequence.
        let scale = StepScale { sequences: 2, tokens: 2.0 };
        close(run(&c, LossType::Grpo, 0.0, scale, 0.2).0, (-2.1 / 2.0) / 2.0);
        close(run(&c, LossType::Bnpo, 0.0, scale, 0.2).0, -2.1 / 2.0);
    }

    #[test]
    fn a_step_has_the_same_loss_and_gradient_however_it_is_cut_into_micro_batches() {
        // 10 completions (the mini recipe's 2 prompts × 5) of different
        // lengths, one with no loss token (a masked truncated completion).
        tch::manual_seed(7);
        let (n, len) = (10i64, 6i64);
        let opts = (Kind::Double, tch::Device::Cpu);
        let logps = Tensor::randn([n, len], opts) * 0.3 - 1.0;
        let old = &logps + Tensor::randn([n, len], opts) * 0.2;
        let reference = &logps + Tensor::randn([n, len], opts) * 0.2;
        let adv = Tensor::randn([n], opts);
        let lengths = [6, 1, 4, 6, 2, 5, 3, 6, 0, 4];
        let mask: Vec<f64> = lengths.iter().flat_map(|&l| (0..len).map(move |t| f64::from(u8::from(t < l)))).collect();
        let mask = Tensor::from_slice(&mask).view([n, len]);
        let scale = StepScale { sequences: n as usize, tokens: sum(&mask) };
        for loss_type in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
            let cfg =
                LossConfig { loss_type, epsilon_low: 0.2, epsilon_high: 0.28, beta: 0.04, max_completion_length: 8 };
            // The summed loss and the gradient w.r.t. the log-probs with micro-batches of `size`.
            let step = |size: i64| {
                let leaf = logps.detach().copy().set_requires_grad(true);
                let mut total = 0.0;
                for start in (0..n).step_by(size as usize) {
                    let k = size.min(n - start);
                    let part = |t: &Tensor| t.narrow(0, start, k);
                    let x = LossInputs {
                        logps: &part(&leaf),
                        old_logps: &part(&old),
                        ref_logps: Some(&part(&reference)),
                        advantages: &part(&adv),
                        mask: &part(&mask),
                    };
                    let (loss, _) = policy_loss(&cfg, &x, &scale);
                    loss.backward();
                    total += loss.double_value(&[]);
                }
                (total, leaf.grad())
            };
            let (whole, grad) = step(n);
            assert!(grad.abs().max().double_value(&[]) > 1e-3, "{loss_type:?}: a zero gradient checks nothing");
            for size in [1, 3, 8] {
                let (loss, g) = step(size);
                assert!((loss - whole).abs() < 1e-12, "{loss_type:?}, micro-batches of {size}: loss {loss} vs {whole}");
                let diff = (&g - &grad).abs().max().double_value(&[]);
                assert!(diff < 1e-12, "{loss_type:?}, micro-batches of {size}: gradients differ by {diff}");
            }
        }
    }

    #[test]
    fn token_logps_match_a_log_softmax_and_entropy_is_exact() {
        let logits = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 0.0, 0.0, 0.0]).view([1, 2, 3]);
        let ids = Tensor::from_slice(&[2i64, 0]).view([1, 2]);
        let (lp, ent) = token_logps(&logits, &ids, 2.0, &[]);
        let z = (0.5f64.exp() + 1.0f64.exp() + 1.5f64.exp()).ln();
        close(lp.double_value(&[0, 0]), 1.5 - z);
        close(lp.double_value(&[0, 1]), -(3.0f64.ln()));
        close(ent.double_value(&[0, 1]), 3.0f64.ln());
        assert!(!ent.requires_grad());
        // Token 1 suppressed: renormalised over tokens 0 and 2.
        let (lp, ent) = token_logps(&logits, &ids, 2.0, &[1, 7]);
        let z = (0.5f64.exp() + 1.5f64.exp()).ln();
        close(lp.double_value(&[0, 0]), 1.5 - z);
        close(lp.double_value(&[0, 1]), -(2.0f64.ln()));
        close(ent.double_value(&[0, 1]), 2.0f64.ln());
    }
}
