//! Where a run leaves things for people: `<workspace>/runs/<run id>/summary.json`
//! and `<workspace>/outputs/<recipe>/<stage id>` links to the cached outputs.
//!
//! The workspace is `--workspace` (or `$PIPELINE_WORKSPACE`) when given,
//! else the git repository holding the recipe, else the current directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::index::file_safe;

#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
}

impl Workspace {
    pub fn locate(explicit: Option<&Path>, recipe_dir: &Path) -> Self {
        let root = explicit
            .map(Path::to_path_buf)
            .or_else(|| crate::provenance::git_toplevel(recipe_dir))
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("."));
        Self { root }
    }

    /// Create `runs/<UTC timestamp>-<recipe>` (a numeric suffix keeps two
    /// runs started in the same millisecond apart). Returns (run id, dir).
    pub fn create_run_dir(&self, recipe_name: &str) -> std::io::Result<(String, PathBuf)> {
        let runs = self.root.join("runs");
        std::fs::create_dir_all(&runs)?;
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let base = format!("{stamp}-{}", file_safe(recipe_name));
        for n in 0..1000 {
            let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
            let dir = runs.join(&id);
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok((id, dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!("could not create a fresh run directory under {}", runs.display())))
    }

    pub fn output_link(&self, recipe_name: &str, stage_id: &str) -> PathBuf {
        self.root.join("outputs").join(file_safe(recipe_name)).join(file_safe(stage_id))
    }

    /// Point `outputs/<recipe>/<stage id>` at `target`, replacing an older
    /// link atomically (a new link under a temp name, renamed over).
    pub fn link_output(&self, recipe_name: &str, stage_id: &str, target: &Path) -> std::io::Result<PathBuf> {
        let link = self.output_link(recipe_name, stage_id);
        let parent = link.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".{}.{}.tmp", file_safe(stage_id), std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        symlink_dir(target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
        Ok(link)
    }
}

#[cfg(unix)]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_dir(target, link)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Ran and published its outputs.
    Ran,
    /// Outputs reused from the cache.
    Cached,
    Failed,
    /// Not run because an upstream stage failed.
    Skipped,
    /// Not started: the run stopped (failure without --keep-going, or cancelled).
    NotRun,
    /// Outside --until / --from.
    NotSelected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    pub id: String,
    pub kind: String,
    pub status: StageStatus,
    /// The final key (absent when the stage never got one).
    pub key: Option<String>,
    /// Why the plan decided to run or reuse it.
    pub reason: String,
    pub duration_s: f64,
    pub log: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub recipe: String,
    pub recipe_path: PathBuf,
    pub recipe_digest: String,
    pub started: String,
    pub finished: String,
    pub duration_s: f64,
    pub status: RunStatus,
    pub stages: Vec<StageSummary>,
}

impl RunSummary {
    pub fn write(&self, run_dir: &Path) -> std::io::Result<PathBuf> {
        let path = run_dir.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(path)
    }

    pub fn count(&self, status: StageStatus) -> usize {
        self.stages.iter().filter(|s| s.status == status).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_unique_and_links_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::locate(Some(dir.path()), dir.path());
        let (a, da) = ws.create_run_dir("mini").unwrap();
        let (b, db) = ws.create_run_dir("mini").unwrap();
        assert_ne!(a, b);
        assert!(da.is_dir() && db.is_dir() && a.ends_with("-mini"));

        let (t1, t2) = (dir.path().join("t1"), dir.path().join("t2"));
        std::fs::create_dir_all(&t1).unwrap();
        std::fs::create_dir_all(&t2).unwrap();
        std::fs::write(t2.join("f"), "x").unwrap();
        let link = ws.link_output("mini", "grpo@a", &t1).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), t1);
        ws.link_output("mini", "grpo@a", &t2).unwrap();
        assert_eq!(std::fs::read_to_string(link.join("f")).unwrap(), "x");
    }
}
