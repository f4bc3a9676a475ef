//! The update of the trainable parameters once every rank has backpropagated
//! its micro-batches: gradient sync across ranks, global-norm clipping and
//! the AdamW step.
//!
//! This is the seam of the memory-saving variants. Today every rank keeps
//! all gradients and the whole AdamW state ("replicated", DDP-like): the
//! gradients are all-reduced (summed; each rank's loss is already divided
//! by the step's *global* normaliser) and every rank takes the same step.
//! ZeRO-1 (`shard = "optimizer"`) keeps each rank's AdamW state for its
//! part of the flattened trainable set only: [`ParamUpdate::step`] updates
//! that part and all-gathers the parameters. ZeRO-2 (`shard = "gradients"`)
//! also replaces [`ParamUpdate::sync_gradients`] with a reduce-scatter into
//! that part's buckets. Both need the collective in `step` (the clip norm
//! sums every rank's part); the loop already passes it.

use tch::Tensor;

use crate::dist::{self, Collective};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};

/// Gradient sync + clip + AdamW over the trainable tensors, replicated on every rank.
pub struct ParamUpdate {
    opt: AdamW,
    max_grad_norm: f64,
}

impl ParamUpdate {
    /// `params` share storage with the model; `max_grad_norm` 0 = no clipping.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig, max_grad_norm: f64) -> Self {
        Self { opt: AdamW::new(params, cfg), max_grad_norm }
    }

    /// Sum the ranks' gradients so every rank holds the step's gradient.
    /// Collective.
    pub fn sync_gradients(&mut self, comm: &mut dyn Collective) -> anyhow::Result<()> {
        if comm.world_size() > 1 {
            // A rank with nothing to train on this step (a short last batch) still takes part.
            dist::ensure_grads(self.opt.params());
            dist::all_reduce_grads(comm, self.opt.params())?;
        }
        Ok(())
    }

    /// Clip the gradients to the global norm, take one AdamW step with
    /// learning rate `lr` and clear the gradients; returns the norm before
    /// clipping. Collective in the sharded variants (see the module doc).
    pub fn step(&mut self, lr: f64, _comm: &mut dyn Collective) -> anyhow::Result<f64> {
        let norm = clip_grad_norm(self.opt.params(), self.max_grad_norm);
        self.opt.step(lr);
        Ok(norm)
    }

    /// The optimizer (its state goes into checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }
}
