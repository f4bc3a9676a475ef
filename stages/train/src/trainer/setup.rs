//! What every training stage does before its loop: give libtorch the
//! stage's share of threads, meet the other ranks, load the checkpoint
//! (`stages_vlm::Pretrained`, the one loader) and pick the trainable
//! parameters by regex.

use std::path::{Path, PathBuf};

use anyhow::bail;
use stage_api::StageContext;
use stages_vlm::chat::ChatTokenizer;
use stages_vlm::device::device_and_kind;
use stages_vlm::processor::ImageProcessor;
use stages_vlm::{Pretrained, Qwen25Vl};
use tch::{Kind, Tensor};

use crate::dist::{self, Collective};

/// `(?:a)|(?:b)` of the given regexes, checked to compile.
pub fn regex_union(patterns: &[String]) -> Result<String, String> {
    let union = patterns.iter().map(|p| format!("(?:{p})")).collect::<Vec<_>>().join("|");
    regex::Regex::new(&union).map_err(|e| format!("invalid regex: {e}"))?;
    Ok(union)
}

/// Sets libtorch's intra-op threads to the stage's share for its lifetime.
pub struct ThreadsGuard(i32);
impl ThreadsGuard {
    pub fn set(n: usize) -> Self {
        let prev = tch::get_num_threads();
        tch::set_num_threads(n.max(1) as i32);
        Self(prev)
    }
}
impl Drop for ThreadsGuard {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// The trainable tensors of a model: names and (shared-storage) handles.
pub struct Trainable {
    pub names: Vec<String>,
    pub parameters: i64,
    pub total_parameters: i64,
}

impl Trainable {
    /// Turn on gradients for the parameters matching any of `patterns` (and
    /// off for the rest); an error when nothing matches.
    pub fn select(model: &Qwen25Vl, patterns: &[String]) -> anyhow::Result<Self> {
        let pattern = regex_union(patterns).map_err(anyhow::Error::msg)?;
        let names = model.set_trainable(&pattern)?;
        if names.is_empty() {
            bail!("param `trainable`: no parameter name matches {patterns:?}");
        }
        let parameters: i64 = names.iter().map(|n| model.params[n].numel() as i64).sum();
        let total_parameters: i64 = model.params.values().map(|t| t.numel() as i64).sum();
        tracing::info!("{} tensors trainable: {parameters} of {total_parameters} parameters", names.len());
        Ok(Self { names, parameters, total_parameters })
    }

    /// (name, tensor) pairs sharing storage with the model, for the optimizer.
    pub fn tensors(&self, model: &Qwen25Vl) -> Vec<(String, Tensor)> {
        self.names.iter().map(|n| (n.clone(), model.params[n].shallow_clone())).collect()
    }
}

/// A training stage's model, its processors and trainable set, loaded on
/// this rank. Holds libtorch's thread count for the stage's lifetime.
pub struct Setup {
    pub model: Qwen25Vl,
    pub tokenizer: ChatTokenizer,
    pub processor: ImageProcessor,
    pub trainable: Trainable,
    /// The checkpoint the stage started from (its aux files are copied to the output).
    pub model_dir: PathBuf,
    /// The weights' dtype (the output is saved in it).
    pub kind: Kind,
    _threads: ThreadsGuard,
}

impl Setup {
    /// Take the stage's threads, connect the ranks (a [`dist::Single`] when
    /// there is one), load `model_dir` in `dtype` on the stage's device and
    /// turn on gradients for the `trainable` regexes.
    pub fn start(
        ctx: &StageContext,
        model_dir: &Path,
        dtype: &str,
        trainable: &[String],
    ) -> anyhow::Result<(Box<dyn Collective>, Self)> {
        let (device, kind) = device_and_kind(ctx, dtype)?;
        let threads = ThreadsGuard::set(ctx.threads());
        let comm = dist::connect(ctx, device)?;
        let Pretrained { model, tokenizer, processor } = Pretrained::load(model_dir, kind, device)?;
        let trainable = Trainable::select(&model, trainable)?;
        let setup = Self {
            model,
            tokenizer,
            processor,
            trainable,
            model_dir: model_dir.to_path_buf(),
            kind,
            _threads: threads,
        };
        Ok((comm, setup))
    }
}
