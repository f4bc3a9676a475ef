//! Activation checkpointing for a chain of blocks (`gradient_checkpointing`
//! in HF terms). libtorch's C++ API has no `torch.utils.checkpoint`, so the
//! chain is run segment-wise: a model is cut into [`Segment`]s
//! `x_{i+1} = f_i(x_i)` (a decoder layer, a vision block, or glue such as the
//! patch embedding), and [`forward_backward`] runs
//!
//! 1. the forward, keeping only each segment's *input* `x_i` (detached: every
//!    other activation of the segment is freed when the segment ends);
//! 2. the loss head `loss = head(x_n)` with gradients, and its backward,
//!    which leaves `g_n = ∂loss/∂x_n`;
//! 3. for i = n−1 … first trainable segment: recompute `y = f_i(x_i)` with
//!    `x_i` as a fresh leaf that requires grad, and backpropagate
//!    `sum(y · g_{i+1})`, whose gradient with respect to `y` is exactly
//!    `g_{i+1}`. That accumulates the segment's parameter gradients (into
//!    their `.grad`, as `loss.backward()` does) and leaves `g_i = x_i.grad`
//!    for the segment before.
//!
//! Segments before the first trainable one (those whose parameters are all
//! frozen, with nothing trainable upstream of them) are run once under
//! `no_grad` and never recomputed: no gradient flows into them. A frozen
//! segment *after* a trainable one is recomputed, for its input gradient only.
//!
//! **What is kept** (for a memory model), between the forward and the end of
//! the backward:
//! - the input of every segment from the first trainable one on (for the
//!   Qwen2.5-VL model: `(patches, vision hidden)` per vision block, the last
//!   block's output as the input of the merger + embedding segment,
//!   `(batch, len, hidden)` per decoder layer, in the model dtype); each is
//!   dropped once its segment has been recomputed;
//! - the chain's output `x_n` and its gradient `g_n` (one `(batch, len,
//!   hidden)` each);
//! - whatever the segments' closures capture (for the model: RoPE cos/sin,
//!   the attention mask, the vision window indices; no activations);
//! - while the head runs: the head's own autograd state (final norm, the
//!   logits and whatever the loss keeps for backward, e.g. a
//!   `(batch, n, vocab)` f32 log-softmax), freed when the head's backward ends;
//! - transiently, one segment's full autograd state (during its forward and
//!   its recomputation) and its gradient buffers.
//!
//! Without checkpointing, every segment from the first trainable one keeps
//! its whole autograd state until the backward reaches it.
//!
//! **Exactness.** A segment is recomputed with the same kernels on the same
//! input (the first forward also runs with gradients recorded, then drops the
//! graph, so kernel choices that depend on `requires_grad` cannot differ), so
//! gradients equal those of the plain pass up to the order in which
//! contributions to a parameter used by several segments are summed (tied
//! embeddings). Recomputation must reproduce the forward exactly: the
//! Qwen2.5-VL models have no dropout (attention and hidden dropout are 0 and
//! not implemented), so there is no random state to replay; a segment with
//! dropout would need its RNG state saved before the forward and restored
//! before the recomputation.

use tch::Tensor;

use crate::error::ModelError;

/// One link `x_{i+1} = f_i(x_i)` of a chain.
pub struct Segment<'a> {
    /// What it is (a checkpoint name prefix such as
    /// `model.language_model.layers.3`), for errors and traces.
    pub name: String,
    /// Whether any parameter `f_i` reads requires a gradient.
    pub trainable: bool,
    f: Box<dyn Fn(&Tensor) -> Tensor + 'a>,
}

impl<'a> Segment<'a> {
    pub fn new(name: impl Into<String>, trainable: bool, f: impl Fn(&Tensor) -> Tensor + 'a) -> Self {
        Self { name: name.into(), trainable, f: Box::new(f) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        (self.f)(x)
    }
}

impl std::fmt::Debug for Segment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("name", &self.name).field("trainable", &self.trainable).finish()
    }
}

fn backward(t: &Tensor) -> Result<(), ModelError> {
    Ok(t.f_backward()?)
}

/// Run `input` through `segments` and the loss `head` (a scalar), then
/// backpropagate: parameter gradients are accumulated into their `.grad`
/// exactly as `head(chain(input)).backward()` would. With `checkpointing`,
/// only the segments' inputs are kept (see the module docs); without, this
/// is that plain forward and backward. Returns the loss value. A loss that
/// needs no gradient (nothing trains) is computed and not backpropagated.
pub fn forward_backward<E: From<ModelError>>(
    input: &Tensor,
    segments: &[Segment],
    checkpointing: bool,
    head: impl FnOnce(&Tensor) -> Result<Tensor, E>,
) -> Result<f64, E> {
    let first = segments.iter().position(|s| s.trainable);
    let Some(first) = first.filter(|_| checkpointing) else {
        // Plain: autograd keeps what every segment needs (nothing for the
        // frozen ones before the first trainable segment).
        let x = segments.iter().fold(input.shallow_clone(), |x, s| s.forward(&x));
        return finish(head(&x)?).map_err(E::from);
    };
    // Frozen prefix: no gradient reaches it, run it once without a graph.
    let mut x = tch::no_grad(|| segments[..first].iter().fold(input.shallow_clone(), |x, s| s.forward(&x)));
    let mut kept = Vec::with_capacity(segments.len() - first);
    for (i, s) in segments[first..].iter().enumerate() {
        // As the recomputation will run it (input a leaf requiring grad
        // after the first trainable segment); the graph dies with `y`.
        let leaf = x.detach().set_requires_grad(i > 0);
        let y = s.forward(&leaf);
        kept.push(x);
        x = y.detach();
    }
    let out = x.set_requires_grad(true);
    let loss = head(&out)?;
    let value = loss.double_value(&[]);
    if loss.requires_grad() {
        backward(&loss)?;
    }
    drop(loss);
    let mut grad = out.grad();
    drop(out);
    for (i, s) in segments[first..].iter().enumerate().rev() {
        if !grad.defined() {
            // The loss does not depend on this segment's output: nothing flows further up.
            break;
        }
        let Some(x) = kept.pop() else { break };
        let leaf = x.detach().set_requires_grad(i > 0);
        drop(x);
        let y = s.forward(&leaf);
        if y.requires_grad() {
            backward(&(&y * &grad).sum(y.kind()))?;
        }
        drop(y);
        grad = if i > 0 { leaf.grad() } else { Tensor::new() };
    }
    Ok(value)
}

/// Backpropagate a loss that needs it; its value.
fn finish(loss: Tensor) -> Result<f64, ModelError> {
    let value = loss.double_value(&[]);
    if loss.requires_grad() {
        backward(&loss)?;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A chain of tanh(W x + b) blocks with a quadratic loss head.
    struct Chain {
        weights: Vec<(Tensor, Tensor)>,
        head: Tensor,
    }

    impl Chain {
        fn new(n: usize, width: i64) -> Self {
            tch::manual_seed(7);
            let opts = (Kind::Double, Device::Cpu);
            let weights = (0..n)
                .map(|_| (Tensor::randn([width, width], opts) * 0.5, Tensor::randn([width], opts) * 0.1))
                .collect();
            Self { weights, head: Tensor::randn([width], opts) }
        }

        /// Same values in fresh tensors. (Not a second `new`: the seed is
        /// process-wide and other tests draw from it in parallel.)
        fn copy(&self) -> Self {
            Self { weights: self.weights.iter().map(|(w, b)| (w.copy(), b.copy())).collect(), head: self.head.copy() }
        }

        fn train(&self, which: &[usize], head: bool) {
            for (i, (w, b)) in self.weights.iter().enumerate() {
                let _ = w.set_requires_grad(which.contains(&i));
                let _ = b.set_requires_grad(which.contains(&i));
            }
            let _ = self.head.set_requires_grad(head);
        }

        fn segments(&self) -> Vec<Segment<'_>> {
            self.weights
                .iter()
                .enumerate()
                .map(|(i, (w, b))| {
                    Segment::new(format!("block{i}"), w.requires_grad(), move |x| x.linear(w, Some(b)).tanh())
                })
                .collect()
        }

        fn grads(&self) -> Vec<Option<Tensor>> {
            let mut all: Vec<&Tensor> = self.weights.iter().flat_map(|(w, b)| [w, b]).collect();
            all.push(&self.head);
            all.into_iter()
                .map(|t| {
                    let g = t.grad();
                    g.defined().then(|| g.copy())
                })
                .collect()
        }

        fn run(&self, x: &Tensor, checkpointing: bool) -> (f64, Vec<Option<Tensor>>) {
            let loss = forward_backward::<ModelError>(x, &self.segments(), checkpointing, |y| {
                Ok((y.matmul(&self.head) - 0.5).square().sum(Kind::Double))
            })
            .unwrap();
            (loss, self.grads())
        }
    }

    fn max_diff(a: &[Option<Tensor>], b: &[Option<Tensor>]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| match (a, b) {
                (None, None) => 0.0,
                (Some(a), Some(b)) => (a - b).abs().max().double_value(&[]),
                // A zero gradient may exist on one side only (never here).
                _ => f64::INFINITY,
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn checkpointed_gradients_equal_the_plain_pass() {
        let x = Tensor::randn([3, 6], (Kind::Double, Device::Cpu));
        // All trainable; a frozen prefix; a frozen block between trainable
        // ones (its input gradient must still flow); only the head.
        for (which, head) in [(vec![0, 1, 2, 3, 4], true), (vec![2, 4], false), (vec![0, 3], true), (vec![], true)] {
            // Fresh tensors (no gradient yet) for each pass, same values.
            let a = Chain::new(5, 6);
            let b = a.copy();
            a.train(&which, head);
            b.train(&which, head);
            let (plain_loss, plain) = a.run(&x, false);
            let (ckpt_loss, ckpt) = b.run(&x, true);
            assert_eq!(plain_loss, ckpt_loss);
            let diff = max_diff(&plain, &ckpt);
            assert!(diff < 1e-12, "trainable {which:?}: gradients differ by {diff}");
            for (i, g) in plain.iter().enumerate().take(10) {
                assert_eq!(g.is_some(), which.contains(&(i / 2)), "block {} gradient presence", i / 2);
            }
        }
    }

    #[test]
    fn frozen_prefix_is_not_recomputed_and_nothing_trainable_is_no_error() {
        use std::cell::Cell;
        let chain = Chain::new(3, 4);
        chain.train(&[2], false);
        let calls = Cell::new([0usize; 3]);
        let counting: Vec<Segment> = chain
            .weights
            .iter()
            .enumerate()
            .map(|(i, (w, b))| {
                let calls = &calls;
                Segment::new(format!("b{i}"), i == 2, move |x| {
                    let mut c = calls.get();
                    c[i] += 1;
                    calls.set(c);
                    x.linear(w, Some(b)).tanh()
                })
            })
            .collect();
        let x = Tensor::randn([2, 4], (Kind::Double, Device::Cpu));
        forward_backward::<ModelError>(&x, &counting, true, |y| Ok(y.sum(Kind::Double))).unwrap();
        assert_eq!(calls.get(), [1, 1, 2], "frozen blocks run once, the trainable one is recomputed");
        chain.train(&[], false);
        let frozen = chain.segments();
        let v = forward_backward::<ModelError>(&x, &frozen, true, |y| Ok(y.sum(Kind::Double))).unwrap();
        assert!(v.is_finite());
    }
}
