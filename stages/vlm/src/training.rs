//! One training forward + backward of [`Qwen25Vl`], plain or with activation
//! checkpointing (`gradient_checkpointing = true` of the sft and grpo
//! stages): the trainer hands over a batch and its loss, the model decides
//! what autograd keeps.
//!
//! With checkpointing the model is run as a chain of
//! [`activation_checkpointing`](crate::activation_checkpointing) segments:
//!
//! ```text
//! with images:  pixel_values → [visual.patch_embed] → [visual.blocks.0] … [visual.blocks.D-1]
//!               → [visual.merger] → [embed_tokens + image scatter] → [layers.0] … [layers.L-1] → head
//! text only:    input_ids → [embed_tokens] → [layers.0] … [layers.L-1] → head
//! head:         language_model.norm → (last n positions) → lm_head → the caller's loss
//! ```
//!
//! The vision segments come from the tower ([`crate::model::VisionTower::segments`]:
//! Qwen2.5-VL's window-attention tower, or Qwen2-VL's, one call each).
//! Each segment is trainable when any parameter under its checkpoint-name
//! prefix requires a gradient. Segments before the first trainable one run
//! once without a graph: with the paper's LM-MLP-only training (full.toml)
//! the whole vision tower and the embedding do; the mini recipe trains
//! `visual.blocks` and `visual.merger`, so the chain starts at block 0 and
//! the gradient of the text model's input embeddings at the image-pad
//! positions flows back through the scatter into the merger and the blocks.
//!
//! What is kept (see `activation_checkpointing` for the general rule), from
//! the first trainable segment on: one `(patches, vision hidden)` tensor per
//! vision block and one for the merger, the merged image features
//! `(image tokens, hidden)` (input of the embedding segment), one
//! `(batch, len, hidden)` per decoder layer and one more for the head's
//! input and its gradient, all in the model dtype; plus the RoPE cos/sin
//! `(batch, 1, len, head_dim)`, the attention mask `(batch, 1, len, len)`
//! bool and the vision rotary tables; plus, while the head runs, the final
//! norm's, `lm_head`'s and the loss's autograd state (logits of the `span`
//! positions: `(batch, n, vocab)`, the loss's f32 copies of them).

use tch::Tensor;

use crate::activation_checkpointing::{Segment, forward_backward};
use crate::error::ModelError;
use crate::model::{Batch, Qwen25Vl};
use crate::qwen2_5_vl::TextModel;

/// Which positions the loss needs logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsSpan {
    /// Every position (SFT): `forward`.
    All,
    /// The last `n` positions (GRPO's completions): `forward_last(n)`.
    Last(i64),
}

impl Qwen25Vl {
    /// Whether any parameter whose checkpoint name starts with `prefix` requires a gradient.
    pub fn any_trainable(&self, prefix: &str) -> bool {
        use std::ops::Bound;
        self.params
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(name, _)| name.starts_with(prefix))
            .any(|(_, t)| t.requires_grad())
    }

    /// Forward `batch`, compute `loss(logits)` (a scalar; logits
    /// (batch, positions of `span`, vocab)) and backpropagate it,
    /// accumulating gradients into the parameters' `.grad` as
    /// `loss.backward()` does. With `checkpointing`, only each block's input
    /// is kept during the forward and blocks are recomputed in the backward
    /// (see the module docs); the gradients are those of the plain pass.
    /// Returns the loss value.
    pub fn forward_backward<E: From<ModelError>>(
        &self,
        batch: &Batch,
        span: LogitsSpan,
        checkpointing: bool,
        loss: impl FnOnce(&Tensor) -> Result<Tensor, E>,
    ) -> Result<f64, E> {
        if !checkpointing {
            let logits = match span {
                LogitsSpan::All => self.forward(batch)?,
                LogitsSpan::Last(n) => self.forward_last(batch, n)?,
            };
            let loss = loss(&logits)?;
            drop(logits);
            let value = loss.double_value(&[]);
            if loss.requires_grad() {
                loss.f_backward().map_err(ModelError::from)?;
            }
            return Ok(value);
        }
        let p = self.positions(batch)?;
        let trainable = |prefix: &str| self.any_trainable(prefix);
        let embed = format!("{}.embed_tokens.", TextModel::PREFIX);
        let lm = &self.language_model;
        let layer_inputs = lm.attention_inputs(&p.pos, &p.key_valid, 0, self.kind);
        let mut segments: Vec<Segment> = Vec::new();
        let images = match (self.vision(), batch.pixel_values) {
            (Some((visual, _, _)), Some(pv)) => Some((visual, pv.to_device(self.device))),
            _ => None,
        };
        let input = match images {
            Some((visual, pv)) => {
                segments.extend(visual.segments(&pv, batch.image_grid_thw, &trainable)?);
                let ids = &p.ids;
                segments.push(Segment::new(format!("{embed} + image scatter"), trainable(&embed), move |feats| {
                    self.embed_with_images(ids, Some(feats))
                }));
                pv
            }
            None => {
                segments.push(Segment::new(embed.clone(), trainable(&embed), |ids| self.embed_with_images(ids, None)));
                p.ids.shallow_clone()
            }
        };
        segments.extend(lm.segments(&layer_inputs, &trainable));
        forward_backward(&input, &segments, true, |x: &Tensor| {
            let hidden = lm.norm.forward(x);
            let hidden = match span {
                LogitsSpan::All => hidden,
                LogitsSpan::Last(n) => {
                    let len = hidden.size()[1];
                    let n = n.clamp(1, len);
                    hidden.narrow(1, len - n, n)
                }
            };
            loss(&self.logits(&hidden))
        })
    }
}
