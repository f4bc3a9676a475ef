//! The one training loop of the training stages. As in HF `Trainer` and
//! TRL's `GRPOTrainer(Trainer)`, the loop is the trainer's and the
//! algorithm supplies the inputs and the loss: `sft.rs` and `grpo.rs`
//! implement [`Algorithm`] and call [`Setup::start`] and [`run`].
//!
//! ```text
//! Setup::start        threads, ranks (dist::connect), the checkpoint (Pretrained::load),
//!                     the trainable set (regexes over HF names)
//! run                 AdamW (ParamUpdate); resume from the newest checkpoint of this run
//!   for step in start..algo.total_steps():
//!     algo.prepare(step)          this rank's inputs of the step (SFT: its shard of the
//!                                 global batch; GRPO: at a round's first update, generate,
//!                                 score and lay out the round). Collective.
//!     algo.loss(i).backward()     for each of this rank's micro-batches (gradient
//!                                 accumulation); each loss is already divided by the
//!                                 step's GLOBAL normaliser (tokens, sequences), so the
//!                                 gradients sum to the whole step's gradient
//!     update.sync_gradients()     sum across ranks                  } the seam of ZeRO-1/2
//!     algo.metrics()              the algorithm's statistics, combined across ranks
//!     update.step(lr)             global-norm clip + AdamW          }   (trainer/update.rs)
//!     metrics.jsonl row (every log_every steps), checkpoint (every checkpoint_every)
//! save (rank 0)       weights, the input's tokenizer/processor files, trainable.json
//! ```
//!
//! Same settings, same bytes: the outputs hold results only. Facts of the
//! run (the checkpoint it resumed from, step timings) go to the stage log
//! and to `provenance.json` through `ctx.note`, which the engine keeps out
//! of the artifact's digest; a resumed run publishes exactly the bytes of
//! an uninterrupted one.
//!
//! The loop owns everything the algorithms used to repeat: the checkpoint
//! (trainable weights, AdamW state, step, the algorithm's data
//! [`Position`] and its log files) and the refusal of a checkpoint from
//! another run (its position at its step is not this run's: another seed
//! or global batch), the loss reduction across ranks, the `step`, `loss`,
//! `lr` and `grad_norm` metrics and the output.
//!
//! Where the next pieces go: optimizer/gradient sharding replaces
//! [`ParamUpdate`]'s `sync_gradients` and `step` (see its module);
//! activation checkpointing is a property of the model's forward, switched
//! on in [`Setup::start`]; a per-rank memory model reads the trainable set
//! and the update's strategy.

pub mod setup;
pub mod update;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use stage_api::StageContext;
use stages_vlm::checkpoint::copy_aux_files;
use tch::Tensor;

pub use setup::{Setup, ThreadsGuard, Trainable, regex_union};
pub use update::ParamUpdate;

use crate::dist::{self, Collective};
use crate::optim::{AdamWConfig, LrSchedule};
use crate::resume::{self, TrainState};

/// One metrics row (or part of one), by metric name.
pub type Metrics = serde_json::Map<String, serde_json::Value>;

/// Where the data stands after some optimizer steps. Data order and
/// sampling seeds are derived from the step, so this is all a checkpoint
/// needs of the data; a checkpoint whose position is not what this run
/// derives for its step comes from another run and is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Dataset items consumed (SFT) or prompts drawn (GRPO).
    pub data_cursor: usize,
    /// The seed the next step's data depends on (SFT: the order's seed tag;
    /// GRPO: the next generation round's sampling seed).
    pub sampling_seed: u64,
}

/// A training algorithm: its inputs and its loss; the loop is [`run`]'s.
pub trait Algorithm {
    /// Progress phase (`"sft steps"`).
    fn phase(&self) -> &'static str;

    /// Optimizer steps of the whole run.
    fn total_steps(&self) -> usize;

    /// Where the data stands after `done` steps (saved in checkpoints,
    /// checked on resume).
    fn position(&self, done: usize) -> Position;

    /// Make step `step`'s (0-based) inputs ready on this rank. Collective:
    /// every rank calls it for every step.
    fn prepare(&mut self, step: usize, ctx: &StageContext, comm: &mut dyn Collective) -> anyhow::Result<()>;

    /// This rank's micro-batches of the prepared step (none on a rank left
    /// without data).
    fn micro_batches(&self) -> usize;

    /// Micro-batch `micro`'s share of the step loss (differentiable): its
    /// summed terms divided by the step's normaliser over ALL ranks and
    /// micro-batches, so the shares add up to the step loss whatever the
    /// micro-batch size and the rank count.
    fn loss(&mut self, micro: usize) -> anyhow::Result<Tensor>;

    /// The algorithm's metrics of the step, combined across ranks
    /// (collective); the loop adds `step`, `loss`, `lr` and `grad_norm`.
    fn metrics(&mut self, comm: &mut dyn Collective) -> anyhow::Result<Metrics>;

    /// Tokens the step processed on all ranks, when the algorithm counts
    /// them (throughput).
    fn tokens(&self) -> Option<usize> {
        None
    }

    /// Logs the algorithm appends to besides metrics.jsonl (checkpointed
    /// with it and restored on resume).
    fn log_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// The algorithm's fields of `trainable.json`.
    fn summary(&self) -> Metrics {
        Metrics::new()
    }
}

/// The loop's settings (the params SFT and GRPO share).
pub struct LoopSettings<'a> {
    /// The `trainable` regexes (recorded in trainable.json).
    pub patterns: &'a [String],
    pub optimizer: AdamWConfig,
    /// 0 = no clipping.
    pub max_grad_norm: f64,
    pub schedule: LrSchedule,
    pub log_every: usize,
    /// 0 = never.
    pub checkpoint_every: usize,
    pub max_shard_mb: u64,
}

/// Backpropagate this rank's micro-batches of the prepared step; returns
/// the sum of their losses (this rank's share of the step loss).
pub fn accumulate(algo: &mut impl Algorithm) -> anyhow::Result<f64> {
    let mut local = 0.0;
    for micro in 0..algo.micro_batches() {
        let loss = algo.loss(micro)?;
        loss.backward();
        local += loss.double_value(&[]);
    }
    Ok(local)
}

/// Train `setup.model` with `algo` and write the stage's output (rank 0).
pub fn run(
    ctx: &StageContext,
    s: &LoopSettings,
    setup: &Setup,
    comm: &mut dyn Collective,
    algo: &mut impl Algorithm,
) -> anyhow::Result<()> {
    let total = algo.total_steps();
    let names = &setup.trainable.names;
    let mut update = ParamUpdate::new(setup.trainable.tensors(&setup.model), s.optimizer, s.max_grad_norm);
    let out = ctx.output_dir().to_path_buf();
    let resume_dir = ctx.resume_dir()?.to_path_buf();
    let start = resume_from(&resume_dir, &out, setup, &mut update, &*algo, total)?;

    ctx.note("resumed_from_step", start);
    ctx.progress().start(algo.phase(), total as u64);
    ctx.progress().advance(start as u64);
    let mut times = StepTimes::default();
    for step in start..total {
        let began = Instant::now();
        ctx.check_cancelled()?;
        algo.prepare(step, ctx, comm)?;
        let local = accumulate(algo)?;
        update.sync_gradients(comm)?;
        let loss = if comm.world_size() > 1 { dist::all_reduce_f64(comm, &[local])?[0] } else { local };
        let mut row = algo.metrics(comm)?;
        let lr = s.schedule.at(step);
        let grad_norm = update.step(lr, comm)?;
        let done = step + 1;
        ctx.progress().advance(1);
        if ctx.is_main_rank() && (done % s.log_every.max(1) == 0 || done == total) {
            let timing = times.last_to_string();
            tracing::info!("step {done}/{total}: loss {loss:.5}, grad_norm {grad_norm:.4}, lr {lr:.3e}{timing}");
            row.insert("step".into(), done.into());
            row.insert("loss".into(), loss.into());
            row.insert("lr".into(), lr.into());
            row.insert("grad_norm".into(), grad_norm.into());
            ctx.metrics().record(&serde_json::Value::Object(row))?;
        }
        if ctx.is_main_rank() && s.checkpoint_every > 0 && done % s.checkpoint_every == 0 && done < total {
            let at = algo.position(done);
            let state =
                TrainState::new(done, update.optimizer().steps(), at.data_cursor, at.sampling_seed, names.clone());
            let mut files = vec![ctx.metrics().path().to_path_buf()];
            files.extend(algo.log_files());
            resume::save_training(&resume_dir, &state, &setup.model, update.optimizer(), files)?;
        }
        times.push(began.elapsed().as_secs_f64(), algo.tokens());
    }
    ctx.note("timing", times.summary());
    ctx.progress().finish();
    if !ctx.is_main_rank() {
        // Rank 0 saves the (identical) weights.
        return Ok(());
    }

    setup.model.save(&out, setup.kind, s.max_shard_mb * 1024 * 1024)?;
    copy_aux_files(&setup.model_dir, &out)?;
    let t = &setup.trainable;
    let mut summary = Metrics::new();
    summary.insert("patterns".into(), s.patterns.into());
    summary.insert("tensors".into(), t.names.clone().into());
    summary.insert("parameters".into(), t.parameters.into());
    summary.insert("total_parameters".into(), t.total_parameters.into());
    summary.insert("optimizer_steps".into(), total.into());
    summary.insert("ranks".into(), comm.world_size().into());
    summary.extend(algo.summary());
    std::fs::write(out.join("trainable.json"), serde_json::to_vec_pretty(&serde_json::Value::Object(summary))?)?;
    Ok(())
}

/// Restore the newest checkpoint of this run, if any; the step it was taken at (0: none).
fn resume_from(
    dir: &Path,
    out: &Path,
    setup: &Setup,
    update: &mut ParamUpdate,
    algo: &impl Algorithm,
    total: usize,
) -> anyhow::Result<usize> {
    let Some(ck) = resume::latest(dir)? else { return Ok(0) };
    let state = &ck.state;
    let expected = algo.position(state.step);
    if (state.data_cursor, state.next_sampling_seed) != (expected.data_cursor, expected.sampling_seed)
        || state.step >= total
    {
        bail!(
            "{}: step {} (data cursor {}, seed {}) does not match this run (data cursor {} and seed {} at that step, {total} steps)",
            ck.dir.display(),
            state.step,
            state.data_cursor,
            state.next_sampling_seed,
            expected.data_cursor,
            expected.sampling_seed,
        );
    }
    resume::restore(&ck, &setup.model, update.optimizer_mut(), &setup.trainable.names, out)?;
    tracing::info!("resuming from the checkpoint at step {} ({})", state.step, ck.dir.display());
    Ok(state.step)
}

/// Wall-clock seconds and tokens of each step this attempt ran. Timings
/// are facts of the run, not of its result: they go to the stage log and
/// `provenance.json` (`ctx.note`), never into the outputs, so identical
/// training publishes identical bytes.
#[derive(Default)]
struct StepTimes {
    secs: Vec<f64>,
    tokens: Vec<Option<usize>>,
}

impl StepTimes {
    fn push(&mut self, secs: f64, tokens: Option<usize>) {
        self.secs.push(secs);
        self.tokens.push(tokens);
    }

    /// `", 0.412 s, 9123 tokens/s"` of the latest step, for the log.
    fn last_to_string(&self) -> String {
        let Some(&secs) = self.secs.last() else { return String::new() };
        match self.tokens.last().copied().flatten() {
            Some(tokens) => format!(", {secs:.3} s, {:.0} tokens/s", tokens as f64 / secs.max(1e-9)),
            None => format!(", {secs:.3} s"),
        }
    }

    /// Steps timed and their seconds, the first (warm-up) step's seconds,
    /// and the medians of the steps after it (of all steps when there is
    /// one): seconds per step and, when the algorithm counts tokens, tokens/s.
    fn summary(&self) -> serde_json::Value {
        let mut out = Metrics::new();
        out.insert("steps".into(), self.secs.len().into());
        out.insert("seconds".into(), self.secs.iter().sum::<f64>().into());
        if let Some(&first) = self.secs.first() {
            out.insert("first_step_s".into(), first.into());
            let skip = usize::from(self.secs.len() > 1);
            out.insert("step_s_median".into(), median(self.secs[skip..].to_vec()).into());
            let rates: Option<Vec<f64>> = self.secs[skip..]
                .iter()
                .zip(&self.tokens[skip..])
                .map(|(secs, tokens)| tokens.map(|t| t as f64 / secs.max(1e-9)))
                .collect();
            if let Some(rates) = rates {
                out.insert("tokens_per_s_median".into(), median(rates).into());
            }
        }
        serde_json::Value::Object(out)
    }
}

/// The median of a non-empty list (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_summary_leaves_the_warm_up_step_out() {
        let mut t = StepTimes::default();
        assert_eq!(t.summary(), serde_json::json!({"steps": 0, "seconds": 0.0}));
        t.push(5.0, Some(100));
        let one = t.summary();
        assert_eq!((one["step_s_median"].as_f64(), one["tokens_per_s_median"].as_f64()), (Some(5.0), Some(20.0)));
        t.push(1.0, Some(100));
        t.push(3.0, Some(600));
        t.push(2.0, Some(300));
        let s = t.summary();
        assert_eq!(s["steps"], 4);
        assert_eq!(s["seconds"].as_f64(), Some(11.0));
        assert_eq!(s["first_step_s"].as_f64(), Some(5.0));
        assert_eq!(s["step_s_median"].as_f64(), Some(2.0));
        // Rates of steps 2..: 100, 200, 150 tokens/s.
        assert_eq!(s["tokens_per_s_median"].as_f64(), Some(150.0));
        assert_eq!(t.last_to_string(), ", 2.000 s, 150 tokens/s");
        // An algorithm that counts no tokens reports no throughput.
        let mut t = StepTimes::default();
        t.push(1.0, None);
        t.push(1.5, None);
        assert!(t.summary().get("tokens_per_s_median").is_none());
        assert_eq!(t.last_to_string(), ", 1.500 s");
    }
}
