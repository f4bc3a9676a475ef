//! Group-relative advantages: A_i = (r_i − mean of its group) / (std + 1e-4),
//! with the std taken per group, over the whole batch, or not at all
//! (`scale_rewards`), as TRL's GRPOTrainer. Standard deviations are
//! unbiased (Bessel), like `torch.std`.

use serde::{Deserialize, Serialize};
use stage_api::schemars::{self, JsonSchema};

/// Added to the std before dividing (TRL and the Med-R1 lineage).
pub const STD_EPS: f64 = 1e-4;

/// How rewards are scaled into advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the std of the completion's group (the original GRPO).
    Group,
    /// Divide by the std of every reward of the batch.
    Batch,
    /// Do not divide (Dr. GRPO): only subtract the group mean.
    None,
}

/// Advantages of a batch of `groups × group_size` completions (group-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    pub values: Vec<f64>,
    /// Fraction of completions whose scaling std is 0 (with `none`: the group std),
    /// TRL's `frac_reward_zero_std`: groups that teach nothing under `group`.
    pub frac_zero_std: f64,
}

/// Mean and unbiased std of `xs` (std 0 for fewer than two values).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// torch.isclose(std, 0) with its default atol.
fn is_zero(std: f64) -> bool {
    std.abs() <= 1e-8
}

/// Advantages of `rewards` in consecutive groups of `group_size`.
pub fn advantages(rewards: &[f64], group_size: usize, scale: ScaleRewards) -> Advantages {
    let group_size = group_size.max(1);
    let (_, batch_std) = mean_std(rewards);
    let mut values = Vec::with_capacity(rewards.len());
    let mut zero = 0usize;
    for group in rewards.chunks(group_size) {
        let (mean, group_std) = mean_std(group);
        let std = if scale == ScaleRewards::Batch { batch_std } else { group_std };
        for r in group {
            let centred = r - mean;
            values.push(if scale == ScaleRewards::None { centred } else { centred / (std + STD_EPS) });
            zero += usize::from(is_zero(std));
        }
    }
    let frac_zero_std = if rewards.is_empty() { 0.0 } else { zero as f64 / rewards.len() as f64 };
    Advantages { values, frac_zero_std }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    // Two groups of 3: [1, 2, 3] (mean 2, std 1) and [4, 4, 4] (std 0).
    const R: [f64; 6] = [1.0, 2.0, 3.0, 4.0, 4.0, 4.0];

    #[test]
    fn group_scaling() {
        let a = advantages(&R, 3, ScaleRewards::Group);
        let s = 1.0 + STD_EPS;
        close(&a.values, &[-1.0 / s, 0.0, 1.0 / s, 0.0, 0.0, 0.0]);
        assert_eq!(a.frac_zero_std, 0.5);
    }

    #[test]
    fn batch_scaling() {
        // Batch mean is not used: centring stays per group. Batch std of R:
        // mean 3, squared deviations 4+1+0+1+1+1 = 8, /5 -> sqrt(1.6).
        let a = advantages(&R, 3, ScaleRewards::Batch);
        let s = 1.6f64.sqrt() + STD_EPS;
        close(&a.values, &[-1.0 / s, 0.0, 1.0 / s, 0.0, 0.0, 0.0]);
        assert_eq!(a.frac_zero_std, 0.0, "the batch std is not zero");
        let flat = advantages(&[2.0, 2.0, 2.0, 2.0], 2, ScaleRewards::Batch);
        assert_eq!((flat.values, flat.frac_zero_std), (vec![0.0; 4], 1.0));
    }

    #[test]
    fn no_scaling() {
        let a = advantages(&[0.0, 4.0, 1.0, 1.0, 3.0, 5.0], 2, ScaleRewards::None);
        close(&a.values, &[-2.0, 2.0, 0.0, 0.0, -1.0, 1.0]);
        // The logged fraction still uses the group std.
        assert!((a.frac_zero_std - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn paper_rewards_in_a_group_of_five() {
        // R = format + validity + 2·correctness for five completions:
        // 4, 2, 0, 4, 1 -> mean 2.2, std sqrt(((1.8²)·2 + 0.2² + 2.2² + 1.2²)/4) = sqrt(3.2).
        let r = [4.0, 2.0, 0.0, 4.0, 1.0];
        let a = advantages(&r, 5, ScaleRewards::Group);
        let s = 3.2f64.sqrt() + STD_EPS;
        close(&a.values, &[1.8 / s, -0.2 / s, -2.2 / s, 1.8 / s, -1.2 / s]);
        let (mean, std) = mean_std(&r);
        assert!((mean - 2.2).abs() < 1e-12 && (std - 3.2f64.sqrt()).abs() < 1e-12);
        assert!(a.values.iter().sum::<f64>().abs() < 1e-12, "advantages of a group sum to 0");
    }
}
