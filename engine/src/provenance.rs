//! `provenance.json`, written into every output directory: what produced
//! these files, from which inputs, where and when.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::plan::key::{ExternalDigest, InputDigest};

/// Written by the engine into every output directory; not part of the
/// artifact's digest (it holds times and hosts, which differ run to run).
pub const PROVENANCE_FILE: &str = "provenance.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub recipe_path: PathBuf,
    /// blake3 of the merged recipe (after `extends` and `--set`).
    pub recipe_digest: String,
    /// `git rev-parse HEAD` of the repository holding the recipe, if any.
    pub git_revision: Option<String>,
    pub stage_id: String,
    pub kind: String,
    pub version: u32,
    pub key: String,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, Vec<InputDigest>>,
    pub external_inputs: Vec<ExternalDigest>,
    pub seed: u64,
    pub tool_version: String,
    pub host: String,
    /// Threads per rank.
    pub threads: usize,
    /// Data-parallel processes that ran the stage (rank 0 published).
    #[serde(default = "one")]
    pub ranks: usize,
    /// Device of rank 0.
    pub device: String,
    pub memory_mb: u64,
    /// RFC 3339, UTC.
    pub started: String,
    pub finished: String,
    pub duration_s: f64,
    pub run_id: String,
    /// What the stage noted about this run (`StageContext::note`: e.g. the
    /// checkpoint it resumed from, step timings); facts of the run, not of
    /// its result, so they live here, outside the artifact's digest.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub notes: serde_json::Map<String, serde_json::Value>,
}

fn one() -> usize {
    1
}

impl Provenance {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join(PROVENANCE_FILE), text + "\n")
    }

    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(PROVENANCE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))
    }
}

/// The commit checked out in `dir`'s repository, or `None` (no git, not a
/// repository): provenance is best effort, never a reason to fail a run.
pub fn git_revision(dir: &Path) -> Option<String> {
    let out = Command::new("git").arg("rev-parse").arg("HEAD").current_dir(dir).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

/// The top directory of `dir`'s git repository, if it is in one.
pub fn git_toplevel(dir: &Path) -> Option<PathBuf> {
    let out = Command::new("git").args(["rev-parse", "--show-toplevel"]).current_dir(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then(|| PathBuf::from(text))
}

pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stage_api::host_name;

    #[test]
    fn round_trips_and_git_lookups_fail_softly() {
        let dir = tempfile::tempdir().unwrap();
        let p = Provenance {
            ranks: 1,
            recipe_path: "r.toml".into(),
            recipe_digest: "abc".into(),
            git_revision: git_revision(dir.path()),
            stage_id: "s".into(),
            kind: "text".into(),
            version: 1,
            key: "k".into(),
            params: serde_json::json!({"a": 1}),
            inputs: BTreeMap::new(),
            external_inputs: vec![],
            seed: 1,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            host: host_name(),
            threads: 1,
            device: "cpu".into(),
            memory_mb: 1,
            started: rfc3339(chrono::Utc::now()),
            finished: rfc3339(chrono::Utc::now()),
            duration_s: 0.5,
            run_id: "r".into(),
            notes: serde_json::json!({"resumed_from_step": 6}).as_object().cloned().unwrap_or_default(),
        };
        // A temp dir is not a repository.
        assert_eq!(p.git_revision, None);
        assert_eq!(git_toplevel(dir.path()), None);
        p.write(dir.path()).unwrap();
        assert_eq!(Provenance::read(dir.path()).unwrap(), p);
        assert!(Provenance::read(&dir.path().join("nope")).unwrap_err().to_string().contains("provenance.json"));
    }
}
