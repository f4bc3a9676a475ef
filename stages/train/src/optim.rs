//! AdamW over an explicit list of trainable tensors, the warmup + cosine
//! (or constant) schedule and global-norm gradient clipping. Frozen tensors
//! never appear here, so they hold no optimizer state.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW (Loshchilov & Hutter) with bias correction, as torch.optim.AdamW.
///
/// Parameters held in a 16-bit float (bf16 on CUDA) get an f32 master copy
/// that the updates accumulate in: an update below half a bf16 ulp of the
/// weight (most of them at lr 1e-5..1e-6) would otherwise round away.
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// f32 master weights of the 16-bit parameters (None: the parameter is f32/f64).
    master: Vec<Option<Tensor>>,
    cfg: AdamWConfig,
    t: i32,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        // Moments in f32 whatever the parameter dtype (bf16 moments lose updates).
        let zeros = |p: &Tensor| Tensor::zeros(p.size(), (Kind::Float, p.device()));
        let m = params.iter().map(|(_, p)| zeros(p)).collect();
        let v = params.iter().map(|(_, p)| zeros(p)).collect();
        let master = params
            .iter()
            .map(|(_, p)| matches!(p.kind(), Kind::BFloat16 | Kind::Half).then(|| p.detach().to_kind(Kind::Float)))
            .collect();
        Self { params, m, v, master, cfg, t: 0 }
    }

    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.params.iter().map(|(_, p)| p)
    }

    /// Updates taken so far (the bias-correction step count).
    pub fn steps(&self) -> i32 {
        self.t
    }

    /// The moments by name (`exp_avg.<param>`, `exp_avg_sq.<param>`, as
    /// torch's state dict calls them) and the f32 master weights of 16-bit
    /// parameters (`master.<param>`), for a checkpoint.
    pub fn moments(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("exp_avg.{name}"), self.m[i].shallow_clone());
            out.insert(format!("exp_avg_sq.{name}"), self.v[i].shallow_clone());
            if let Some(master) = &self.master[i] {
                out.insert(format!("master.{name}"), master.shallow_clone());
            }
        }
        out
    }

    /// Restore what [`moments`](Self::moments) and [`steps`](Self::steps)
    /// returned; every moment must be present with its parameter's shape.
    pub fn restore(&mut self, moments: &BTreeMap<String, Tensor>, steps: i32) -> Result<(), String> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (key, slot) in
                [(format!("exp_avg.{name}"), &mut self.m[i]), (format!("exp_avg_sq.{name}"), &mut self.v[i])]
            {
                let t = moments.get(&key).ok_or_else(|| format!("optimizer state has no `{key}`"))?;
                if t.size() != p.size() {
                    return Err(format!("optimizer state `{key}` has shape {:?}, expected {:?}", t.size(), p.size()));
                }
                *slot = t.to_kind(Kind::Float).to_device(p.device());
            }
            // Without a saved master copy (an older checkpoint) the restored weight is the best start.
            if self.master[i].is_some() {
                let saved = moments.get(&format!("master.{name}"));
                self.master[i] = Some(match saved {
                    Some(t) if t.size() == p.size() => t.to_kind(Kind::Float).to_device(p.device()),
                    _ => p.detach().to_kind(Kind::Float),
                });
            }
        }
        self.t = steps;
        Ok(())
    }

    /// One update with learning rate `lr`, then clear the gradients.
    pub fn step(&mut self, lr: f64) {
        self.t += 1;
        let bias = BiasCorrection::at(&self.cfg, self.t);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let pf = match &self.master[i] {
                    Some(master) => master.shallow_clone(),
                    None => p.to_kind(Kind::Float),
                };
                let new =
                    adamw_update(&self.cfg, bias, lr, &g.to_kind(Kind::Float), &mut self.m[i], &mut self.v[i], pf);
                p.copy_(&new.to_kind(p.kind()));
                if let Some(master) = &mut self.master[i] {
                    *master = new;
                }
                let _ = p.grad().zero_();
            }
        });
    }

    /// Bytes of optimizer state this optimizer holds (moments and masters).
    pub fn state_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        self.m.iter().chain(&self.v).chain(self.master.iter().flatten()).map(bytes).sum()
    }
}

/// AdamW's bias-correction factors `1 - β^t` of update `t` (1-based).
#[derive(Debug, Clone, Copy)]
pub struct BiasCorrection {
    bc1: f64,
    bc2: f64,
}

impl BiasCorrection {
    pub fn at(cfg: &AdamWConfig, t: i32) -> Self {
        Self { bc1: 1.0 - cfg.beta1.powi(t), bc2: 1.0 - cfg.beta2.powi(t) }
    }
}

/// One AdamW update of f32 values `pf` with f32 gradient `g`: updates the
/// moments `m`, `v` in place and returns the new f32 values. The one place
/// the update's arithmetic lives: the replicated [`AdamW`] (per tensor) and
/// the sharded update (over a rank's flat slice) call it, so an element's
/// update is the same operations either way.
pub fn adamw_update(
    cfg: &AdamWConfig,
    bias: BiasCorrection,
    lr: f64,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    pf: Tensor,
) -> Tensor {
    *m = &*m * cfg.beta1 + g * (1.0 - cfg.beta1);
    *v = &*v * cfg.beta2 + (g * g) * (1.0 - cfg.beta2);
    let denom = (&*v / bias.bc2).sqrt() + cfg.eps;
    let mut update = (&*m / bias.bc1) / denom;
    if cfg.weight_decay != 0.0 {
        update += &pf * cfg.weight_decay;
    }
    pf - update * lr
}

/// Elements per row of [`squared_norm`]'s partial sums: below ATen's
/// parallel grain (32,768), so a tensor of one row is summed by one thread.
const NORM_CHUNK: i64 = 4096;

/// Sum of the squares of every value of `tensors` (in f32, summed in f64):
/// the local part of the global gradient norm. The one function every norm
/// goes through (replicated clipping and each rank's shard), so the
/// summation order is decided here, and it does not depend on the thread
/// count: ATen's full reduction (`x.square().sum()`) splits its sum by
/// thread above 32,768 elements (docs/numerics.md), so each tensor is
/// summed per row of [`NORM_CHUNK`] elements on its device (a reduction
/// along a dimension gives each row to one thread, in a fixed order), and
/// the row sums are added on the CPU in f64 in index order.
pub fn squared_norm(tensors: &[Tensor]) -> f64 {
    let mut total = 0f64;
    for g in tensors {
        let flat = g.detach().to_kind(Kind::Float).flatten(0, -1);
        let n = flat.size()[0];
        let rows = n / NORM_CHUNK;
        let mut parts: Vec<Tensor> = Vec::with_capacity(2);
        if rows > 0 {
            parts.push(flat.narrow(0, 0, rows * NORM_CHUNK).square().reshape([rows, NORM_CHUNK]).sum_dim_intlist(
                1,
                false,
                Kind::Float,
            ));
        }
        if n > rows * NORM_CHUNK {
            parts.push(flat.narrow(0, rows * NORM_CHUNK, n - rows * NORM_CHUNK).square().sum(Kind::Float).view([1]));
        }
        for part in parts {
            // A failed copy makes the norm NaN (shown in the metrics), never a silent 0.
            match Vec::<f32>::try_from(part.to_device(tch::Device::Cpu)) {
                Ok(sums) => total += sums.iter().map(|&x| f64::from(x)).sum::<f64>(),
                Err(_) => return f64::NAN,
            }
        }
    }
    total
}

/// Scale gradients so their global L2 norm is at most `max_norm` (0 = no
/// clipping); returns the norm before clipping.
pub fn clip_grad_norm<'a>(params: impl Iterator<Item = &'a Tensor>, max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params.map(|p| p.grad()).filter(|g| g.defined()).collect();
    let norm = squared_norm(&grads).sqrt();
    if let Some(scale) = clip_scale(norm, max_norm) {
        tch::no_grad(|| {
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_scalar_(scale);
            }
        });
    }
    norm
}

/// The factor gradients of global norm `norm` are scaled by to clip them
/// to `max_norm` (None: no clipping needed, or `max_norm` 0 = off).
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// Linear warmup to `peak`, then cosine decay to 0 at `total` steps (or
/// `peak` held constant).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    peak: f64,
    warmup: usize,
    total: usize,
    decay: bool,
}

impl LrSchedule {
    pub fn cosine(peak: f64, warmup: usize, total: usize) -> Self {
        Self { peak, warmup: warmup.min(total), total: total.max(1), decay: true }
    }

    /// Warmup then `peak` until the end (HF `constant_with_warmup`).
    pub fn constant(peak: f64, warmup: usize, total: usize) -> Self {
        Self { decay: false, ..Self::cosine(peak, warmup, total) }
    }

    /// Learning rate of optimizer step `step` (0-based), as HF's
    /// `get_cosine_schedule_with_warmup`.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        if !self.decay {
            return self.peak;
        }
        let progress = (step - self.warmup) as f64 / (self.total - self.warmup).max(1) as f64;
        self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squared_norm_does_not_depend_on_the_thread_count() {
        // Sizes above ATen's parallel grain, where a full `sum()` splits by thread.
        let grads: Vec<Tensor> = [1 << 20, 100_000, 65_537, 129_024, 3]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let x = Tensor::arange(n, (Kind::Float, tch::Device::Cpu));
                ((x * (0.618_034 + i as f64)).sin() * 1e-2).view([-1])
            })
            .collect();
        let norm_at = |threads: usize| {
            let _guard = stages_vlm::ThreadsGuard::set(threads);
            squared_norm(&grads)
        };
        let one = norm_at(1);
        for threads in [2, 3, 4] {
            assert_eq!(norm_at(threads).to_bits(), one.to_bits(), "{threads} threads");
        }
        let exact: f64 =
            grads.iter().flat_map(|g| Vec::<f32>::try_from(g).unwrap()).map(|x| f64::from(x) * f64::from(x)).sum();
        assert!((one - exact).abs() <= 1e-5 * exact, "{one} vs {exact}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let s = LrSchedule::cosine(1.0, 2, 6);
        let lrs: Vec<f64> = (0..7).map(|i| s.at(i)).collect();
        assert_eq!(lrs[0], 0.0);
        assert_eq!(lrs[1], 0.5);
        assert_eq!(lrs[2], 1.0);
        assert!((lrs[4] - 0.5).abs() < 1e-12, "{lrs:?}");
        assert!(lrs[6].abs() < 1e-12, "{lrs:?}");
    }

    #[test]
    fn constant_schedule_holds_the_peak_after_warmup() {
        let s = LrSchedule::constant(2.0, 2, 6);
        let lrs: Vec<f64> = (0..7).map(|i| s.at(i)).collect();
        assert_eq!(lrs, vec![0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn small_updates_of_bf16_weights_accumulate_in_the_f32_master_copy() {
        // lr 1e-6 on a weight of 0.02: each update is far below bf16's
        // resolution there (~1.2e-4), so without a master copy nothing moves.
        let p = Tensor::full([64], 0.02, (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], cfg);
        let start = p.detach().to_kind(Kind::Float);
        for _ in 0..300 {
            (&p * 1.0).sum(Kind::Float).backward();
            opt.step(1e-6);
        }
        // 300 steps of ~1e-6 each: the master copy moved ~3e-4, and so (rounded) did the weight.
        let master = opt.moments()["master.w"].shallow_clone();
        let moved = (&start - &master).mean(Kind::Float).double_value(&[]);
        assert!((moved - 3e-4).abs() < 2e-5, "master moved {moved}");
        let weight_moved = (&start - p.detach().to_kind(Kind::Float)).mean(Kind::Float).double_value(&[]);
        assert!(weight_moved > 1e-4, "the bf16 weight never moved ({weight_moved})");
    }

    #[test]
    fn restored_moments_continue_exactly() {
        // Two optimizers: one steps twice, the other steps once, is saved,
        // restored into a fresh optimizer, then steps again: same bits.
        let grad = |p: &Tensor, c: f32| (p * Tensor::from_slice(&[c, -2.0 * c])).sum(Kind::Float).backward();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.01 };
        let a = Tensor::from_slice(&[0.5f32, 1.5]).set_requires_grad(true);
        let mut opt_a = AdamW::new(vec![("w".into(), a.shallow_clone())], cfg);
        grad(&a, 1.0);
        opt_a.step(0.1);
        grad(&a, 3.0);
        opt_a.step(0.1);

        let b = Tensor::from_slice(&[0.5f32, 1.5]).set_requires_grad(true);
        let mut opt_b = AdamW::new(vec![("w".into(), b.shallow_clone())], cfg);
        grad(&b, 1.0);
        opt_b.step(0.1);
        let (saved, steps) = (opt_b.moments(), opt_b.steps());
        assert_eq!(saved.keys().collect::<Vec<_>>(), ["exp_avg.w", "exp_avg_sq.w"]);
        let copies: BTreeMap<String, Tensor> = saved.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        let c = b.detach().copy().set_requires_grad(true);
        let mut opt_c = AdamW::new(vec![("w".into(), c.shallow_clone())], cfg);
        opt_c.restore(&copies, steps).unwrap();
        grad(&c, 3.0);
        opt_c.step(0.1);
        assert!(a.equal(&c), "{a} vs {c}");
        let e = opt_c.restore(&BTreeMap::new(), 1).unwrap_err();
        assert!(e.contains("exp_avg.w"), "{e}");
    }

    #[test]
    fn adamw_first_step_matches_the_closed_form() {
        // After one step m̂ = g and v̂ = g², so the update is lr·g/(|g|+eps) + lr·wd·p.
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[3.0f32, 0.5])).sum(Kind::Float);
        loss.backward();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        opt.step(0.01);
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        let expect = [1.0 - 0.01 * (1.0 + 0.1 * 1.0), -2.0 - 0.01 * (1.0 + 0.1 * -2.0)];
        for (g, e) in got.iter().zip(expect) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?} vs {expect:?}");
        }
        assert_eq!(p.grad().abs().sum(Kind::Float).double_value(&[]), 0.0, "grads cleared");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let norm = clip_grad_norm([&p].into_iter(), 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(&p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    }
}
