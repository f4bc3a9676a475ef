//! Training checkpoints in the stage's resume directory, so a killed run
//! continues where it stopped and ends with the same weights.
//!
//! ```text
//! <resume dir>/step-00000010/
//!     state.json              TrainState: step, optimizer step count, data cursor, next sampling seed, ...
//!     weights/                trainable tensors (safetensors, the model's dtype: exact)
//!     optimizer/              AdamW moments (safetensors, f32); empty when sharded
//!     optimizer-shards/rank-00001/   sharded runs: each rank's part of the AdamW state
//!                                    (exp_avg, exp_avg_sq, master: flat f32)
//!     files/                  the stage's logs so far (metrics.jsonl, completions.jsonl)
//! ```
//! A checkpoint is written into a hidden temp directory and renamed into
//! place, so any `step-*` directory is complete; older ones are then removed.
//! In a sharded run every rank first writes its part to a hidden directory
//! beside it ([`save_shard`]); rank 0 moves the parts in before the rename
//! (the resume directory must be shared by the ranks, as the engine's is).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use stages_vlm::Qwen25Vl;
use stages_vlm::checkpoint::{load_dir, save_dir};

use tch::{Device, Kind, Tensor};

const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

/// Where the training loop stands after `step` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    /// Optimizer steps done (also the learning-rate schedule position).
    pub step: usize,
    /// AdamW's bias-correction step count.
    pub optimizer_steps: i32,
    /// Dataset positions consumed (the seeded per-epoch order is re-derived from it).
    pub data_cursor: usize,
    /// Seed the sampler will use for the next generation round.
    pub next_sampling_seed: u64,
    /// Names of the trainable tensors (must match on resume).
    pub trainable: Vec<String>,
    /// Ranks the optimizer state is sharded over (absent: not sharded, in `optimizer/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_ranks: Option<usize>,
}

impl TrainState {
    pub fn new(
        step: usize,
        optimizer_steps: i32,
        data_cursor: usize,
        next_sampling_seed: u64,
        trainable: Vec<String>,
    ) -> Self {
        Self { format: FORMAT, step, optimizer_steps, data_cursor, next_sampling_seed, trainable, shard_ranks: None }
    }
}

/// A checkpoint found on disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
}

impl Checkpoint {
    pub fn weights(&self, kind: Kind, device: Device) -> anyhow::Result<BTreeMap<String, Tensor>> {
        Ok(load_dir(&self.dir.join("weights"), kind, device)?)
    }
    pub fn moments(&self, device: Device) -> anyhow::Result<BTreeMap<String, Tensor>> {
        Ok(load_dir(&self.dir.join("optimizer"), Kind::Float, device)?)
    }
    /// Rank `rank`'s part of a sharded optimizer state.
    pub fn shard(&self, rank: usize, device: Device) -> anyhow::Result<BTreeMap<String, Tensor>> {
        let dir = self.dir.join(SHARDS_DIR).join(shard_name(rank));
        if !dir.is_dir() {
            bail!("{}: no optimizer shard of rank {rank} ({} is missing)", self.dir.display(), dir.display());
        }
        Ok(load_dir(&dir, Kind::Float, device)?)
    }
    /// Copy the saved logs back to `out` (same file names).
    pub fn restore_files(&self, out: &Path) -> anyhow::Result<()> {
        let files = self.dir.join("files");
        for entry in std::fs::read_dir(&files).with_context(|| format!("listing {}", files.display()))? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, out.join(name))
                    .with_context(|| format!("restoring {} into {}", path.display(), out.display()))?;
            }
        }
        Ok(())
    }
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

const SHARDS_DIR: &str = "optimizer-shards";

fn shard_name(rank: usize) -> String {
    format!("rank-{rank:05}")
}

/// Where rank `rank` writes its optimizer shard of step `step` before rank 0 moves it in.
fn shard_staging(dir: &Path, step: usize, rank: usize) -> PathBuf {
    dir.join(format!(".{}.{}.tmp", step_dir_name(step), shard_name(rank)))
}

/// Write this rank's part of a sharded optimizer state for the checkpoint
/// of `step` (every rank, before rank 0's [`save`] with `shards` set).
pub fn save_shard(dir: &Path, step: usize, rank: usize, state: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
    let staging = shard_staging(dir, step, rank);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    save_dir(&staging, state, Kind::Float, u64::MAX)?;
    Ok(())
}

fn parse_step(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The newest complete checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> anyhow::Result<Option<Checkpoint>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step(&name)
            && best.as_ref().is_none_or(|(b, _)| step > *b)
        {
            best = Some((step, entry.path()));
        }
    }
    let Some((step, path)) = best else { return Ok(None) };
    let state_path = path.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("reading {}", state_path.display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a training state written by this version", state_path.display()))?;
    if state.format != FORMAT || state.step != step {
        bail!(
            "{}: format {} step {} (expected format {FORMAT}, step {step})",
            state_path.display(),
            state.format,
            state.step
        );
    }
    Ok(Some(Checkpoint { dir: path, state }))
}

/// What a checkpoint holds besides the state.
pub struct Snapshot<'a> {
    pub state: &'a TrainState,
    pub weights: &'a BTreeMap<String, Tensor>,
    /// Storage dtype of the weights (the model's: bit-exact round trip).
    pub weights_kind: Kind,
    pub moments: &'a BTreeMap<String, Tensor>,
    /// Files copied into the checkpoint (the logs written so far).
    pub files: Vec<PathBuf>,
    /// Ranks whose optimizer shards ([`save_shard`]) go into the checkpoint (0: not sharded).
    pub shards: usize,
}

/// Write `snap` as `dir/step-N` atomically, then drop older checkpoints.
pub fn save(dir: &Path, snap: &Snapshot) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = step_dir_name(snap.state.step);
    let tmp = dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    save_dir(&tmp.join("weights"), snap.weights, snap.weights_kind, u64::MAX)?;
    save_dir(&tmp.join("optimizer"), snap.moments, Kind::Float, u64::MAX)?;
    if snap.shards > 0 {
        std::fs::create_dir_all(tmp.join(SHARDS_DIR))?;
    }
    for rank in 0..snap.shards {
        let staged = shard_staging(dir, snap.state.step, rank);
        let into = tmp.join(SHARDS_DIR).join(shard_name(rank));
        std::fs::rename(&staged, &into).with_context(|| {
            format!("moving rank {rank}'s optimizer shard {} into the checkpoint", staged.display())
        })?;
    }
    let files = tmp.join("files");
    std::fs::create_dir_all(&files)?;
    for f in &snap.files {
        if let (true, Some(file_name)) = (f.is_file(), f.file_name()) {
            std::fs::copy(f, files.join(file_name)).with_context(|| format!("copying {}", f.display()))?;
        }
    }
    // The state goes last: it names what the directory holds.
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(snap.state)?)?;
    let target = dir.join(&name);
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&tmp, &target).with_context(|| format!("moving the checkpoint to {}", target.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let other = entry.file_name().to_string_lossy().into_owned();
        let stale = parse_step(&other).is_some_and(|s| s < snap.state.step) || other.ends_with(".tmp");
        if stale {
            std::fs::remove_dir_all(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(target)
}

/// Checkpoint a training loop into `dir`: the trainable tensors of `model`
/// (those `state` names), the replicated optimizer `moments` (empty when
/// sharded: the `state.shard_ranks` ranks' shards are moved in) and the
/// logs in `files`.
pub fn save_training(
    dir: &Path,
    state: &TrainState,
    model: &Qwen25Vl,
    moments: &BTreeMap<String, Tensor>,
    files: Vec<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let weights = state.trainable.iter().map(|n| (n.clone(), model.params[n].shallow_clone())).collect();
    let shards = state.shard_ranks.unwrap_or(0);
    let snap = Snapshot { state, weights: &weights, weights_kind: model.kind, moments, files, shards };
    let saved = save(dir, &snap)?;
    tracing::info!("checkpoint at step {}: {}", state.step, saved.display());
    Ok(saved)
}

/// Load a checkpoint's weights into the policy and its logs into `out`
/// (the optimizer state is the update's: [`Checkpoint::moments`], [`Checkpoint::shard`]).
pub fn restore(ck: &Checkpoint, model: &Qwen25Vl, trainable: &[String], out: &Path) -> anyhow::Result<()> {
    if ck.state.trainable != trainable {
        bail!(
            "{}: the checkpoint trains {} tensors, this run {}: not the same run",
            ck.dir.display(),
            ck.state.trainable.len(),
            trainable.len()
        );
    }
    let weights = ck.weights(model.kind, model.device)?;
    tch::no_grad(|| -> anyhow::Result<()> {
        for name in trainable {
            let saved = weights.get(name).with_context(|| format!("{}: no weights for `{name}`", ck.dir.display()))?;
            let mut param = model.params[name].shallow_clone();
            if saved.size() != param.size() {
                bail!("{}: `{name}` has shape {:?}, the model {:?}", ck.dir.display(), saved.size(), param.size());
            }
            param.copy_(saved);
        }
        Ok(())
    })?;
    ck.restore_files(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_latest_round_trips_and_keeps_only_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("resume");
        assert!(latest(&root).unwrap().is_none());
        let w: BTreeMap<String, Tensor> =
            [("a.weight".to_string(), Tensor::from_slice(&[1.5f32, -2.25, 1e-7]))].into_iter().collect();
        let m: BTreeMap<String, Tensor> =
            [("exp_avg.a.weight".to_string(), Tensor::from_slice(&[0.1f32, 0.2, 0.3]))].into_iter().collect();
        let log = dir.path().join("metrics.jsonl");
        std::fs::write(&log, "{\"step\": 1}\n").unwrap();
        for step in [2, 4] {
            let state = TrainState::new(step, step as i32, step * 3, 77, vec!["a.weight".into()]);
            let snap = Snapshot {
                state: &state,
                weights: &w,
                weights_kind: Kind::Float,
                moments: &m,
                files: vec![log.clone()],
                shards: 0,
            };
            save(&root, &snap).unwrap();
        }
        // A torn write of a later step is ignored.
        std::fs::create_dir_all(root.join(".step-00000006.tmp")).unwrap();
        let ck = latest(&root).unwrap().unwrap();
        assert_eq!((ck.state.step, ck.state.data_cursor, ck.state.next_sampling_seed), (4, 12, 77));
        assert!(ck.weights(Kind::Float, Device::Cpu).unwrap()["a.weight"].equal(&w["a.weight"]));
        assert!(ck.moments(Device::Cpu).unwrap()["exp_avg.a.weight"].equal(&m["exp_avg.a.weight"]));
        let names: Vec<String> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.contains(&"step-00000004".to_string()) && !names.contains(&"step-00000002".to_string()));
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        ck.restore_files(&out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), "{\"step\": 1}\n");

        std::fs::write(ck.dir.join(STATE_FILE), "{}").unwrap();
        let e = latest(&root).err().unwrap().to_string();
        assert!(e.contains("state.json") && e.contains("not a training state"), "{e}");
    }
}
