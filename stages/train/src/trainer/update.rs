//! The update of the trainable parameters once every rank has backpropagated
//! its micro-batches: gradient sync across ranks, global-norm clipping and
//! the AdamW step, replicated or sharded (`shard` param).
//!
//! Replicated (`shard = "none"`, DDP-like): every rank keeps all gradients
//! and the whole AdamW state; the gradients are all-reduced (summed; each
//! rank's loss is already divided by the step's *global* normaliser) and
//! every rank takes the same step. Sharded (`optimizer`, `gradients`: ZeRO
//! stages 1 and 2): each rank keeps the AdamW state and the summed gradient
//! of its 1/N part of the flattened trainable set only ([`zero`](super::zero)).
//!
//! The loop's calls, the same for every level:
//! ```text
//! rounds = backward_rounds(micro-batches)     collective when gradients are reduced per micro-batch
//! for each round: backward; after_backward    gradients: reduce-scatter + free the full gradients
//! sync_gradients                              none: all-reduce; optimizer: reduce-scatter + free
//! step(lr)                                    clip to the global norm, AdamW, (sharded) all-gather
//! ```

use std::collections::BTreeMap;

use tch::Tensor;

use super::zero::{BUCKET_ELEMENTS, ShardLevel, ShardedUpdate};
use crate::dist::{self, Collective};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};

/// Gradient sync + clip + AdamW over the trainable tensors.
pub struct ParamUpdate {
    inner: Inner,
}

enum Inner {
    Replicated { opt: AdamW, max_grad_norm: f64 },
    Sharded(ShardedUpdate),
}

/// The optimizer state a checkpoint holds.
pub enum OptimizerState {
    /// The whole state by tensor name (`exp_avg.<param>`, ...), the same on every rank.
    Replicated(BTreeMap<String, Tensor>),
    /// This rank's part (`exp_avg`, `exp_avg_sq`, `master`: flat f32 of its part).
    Shard(BTreeMap<String, Tensor>),
}

impl ParamUpdate {
    /// Replicated: `params` share storage with the model; `max_grad_norm` 0 = no clipping.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig, max_grad_norm: f64) -> Self {
        Self { inner: Inner::Replicated { opt: AdamW::new(params, cfg), max_grad_norm } }
    }

    /// The update of shard level `level` among the ranks of `comm`.
    pub fn with_shard(
        params: Vec<(String, Tensor)>,
        cfg: AdamWConfig,
        max_grad_norm: f64,
        level: ShardLevel,
        comm: &dyn Collective,
    ) -> anyhow::Result<Self> {
        Ok(match level {
            ShardLevel::None => Self::new(params, cfg, max_grad_norm),
            _ => Self {
                inner: Inner::Sharded(ShardedUpdate::new(params, cfg, max_grad_norm, level, comm, BUCKET_ELEMENTS)?),
            },
        })
    }

    pub fn level(&self) -> ShardLevel {
        match &self.inner {
            Inner::Replicated { .. } => ShardLevel::None,
            Inner::Sharded(s) => s.level(),
        }
    }

    /// The trainable tensors (shared with the model).
    pub fn params(&self) -> Box<dyn Iterator<Item = &Tensor> + '_> {
        match &self.inner {
            Inner::Replicated { opt, .. } => Box::new(opt.params()),
            Inner::Sharded(s) => Box::new(s.params()),
        }
    }

    /// How many backward rounds this rank runs for its `mine` micro-batches:
    /// `mine`, except when gradients are reduce-scattered per micro-batch,
    /// then the most any rank has (a rank out of micro-batches still takes
    /// part in each reduce-scatter, with zeros). Collective then.
    pub fn backward_rounds(&self, mine: usize, comm: &mut dyn Collective) -> anyhow::Result<usize> {
        if self.level() != ShardLevel::Gradients || comm.world_size() == 1 {
            return Ok(mine);
        }
        let counts = dist::all_gather_f64(comm, &[mine as f64])?;
        Ok(counts.iter().flatten().fold(0.0f64, |m, &c| m.max(c)) as usize)
    }

    /// After each backward round: at the `gradients` level, reduce-scatter
    /// the full-size gradients into this rank's shard and free them.
    /// Collective then.
    pub fn after_backward(&mut self, comm: &mut dyn Collective) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Sharded(s) if s.level() == ShardLevel::Gradients => s.reduce_gradients(comm),
            _ => Ok(()),
        }
    }

    /// Sum the ranks' gradients: replicated, so every rank holds the step's
    /// gradient; `optimizer`, so each rank holds the sum of its part (the
    /// full-size gradients are freed). Collective.
    pub fn sync_gradients(&mut self, comm: &mut dyn Collective) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Replicated { opt, .. } => {
                if comm.world_size() > 1 {
                    // A rank with nothing to train on this step (a short last batch) still takes part.
                    dist::ensure_grads(opt.params());
                    dist::all_reduce_grads(comm, opt.params())?;
                }
                Ok(())
            }
            Inner::Sharded(s) if s.level() == ShardLevel::Optimizer => s.reduce_gradients(comm),
            Inner::Sharded(_) => Ok(()),
        }
    }

    /// Clip the gradients to the global norm, take one AdamW step with
    /// learning rate `lr` and clear the gradients; returns the norm before
    /// clipping. Collective when sharded (the norm sums every rank's part;
    /// the updated parts are all-gathered).
    pub fn step(&mut self, lr: f64, comm: &mut dyn Collective) -> anyhow::Result<f64> {
        match &mut self.inner {
            Inner::Replicated { opt, max_grad_norm } => {
                let norm = clip_grad_norm(opt.params(), *max_grad_norm);
                opt.step(lr);
                Ok(norm)
            }
            Inner::Sharded(s) => s.step(lr, comm),
        }
    }

    /// Updates taken so far (AdamW's bias-correction step count).
    pub fn steps(&self) -> i32 {
        match &self.inner {
            Inner::Replicated { opt, .. } => opt.steps(),
            Inner::Sharded(s) => s.steps(),
        }
    }

    /// The state a checkpoint saves (this rank's part when sharded).
    pub fn state(&self) -> OptimizerState {
        match &self.inner {
            Inner::Replicated { opt, .. } => OptimizerState::Replicated(opt.moments()),
            Inner::Sharded(s) => OptimizerState::Shard(s.state()),
        }
    }

    /// Restore [`state`](Self::state) (of the same kind) and the step count.
    pub fn restore(&mut self, state: &OptimizerState, steps: i32) -> Result<(), String> {
        match (&mut self.inner, state) {
            (Inner::Replicated { opt, .. }, OptimizerState::Replicated(m)) => opt.restore(m, steps),
            (Inner::Sharded(s), OptimizerState::Shard(m)) => s.restore(m, steps),
            (Inner::Replicated { .. }, OptimizerState::Shard(_)) => {
                Err("the checkpoint's optimizer state is sharded, this run's is not (shard = \"none\")".into())
            }
            (Inner::Sharded(_), OptimizerState::Replicated(_)) => {
                Err("the checkpoint's optimizer state is not sharded, this run shards it".into())
            }
        }
    }

    /// Bytes of optimizer state (moments and f32 masters) this rank holds.
    pub fn state_bytes(&self) -> usize {
        match &self.inner {
            Inner::Replicated { opt, .. } => opt.state_bytes(),
            Inner::Sharded(s) => s.state_bytes(),
        }
    }

    /// Bytes of the gradient shard a sharded rank keeps between steps (0: replicated).
    pub fn grad_shard_bytes(&self) -> usize {
        match &self.inner {
            Inner::Replicated { .. } => 0,
            Inner::Sharded(s) => s.grad_shard_bytes(),
        }
    }
}
