//! The run index: for each (recipe name, stage id) the key and key
//! components of its last run, at `<cache>/index/<recipe>/<stage id>.json`,
//! so `plan` can explain what changed since then.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use pipeline_cache::Digest;
use serde::{Deserialize, Serialize};

use crate::plan::key::KeyComponents;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub key: Digest,
    pub components: KeyComponents,
    pub recorded_unix_ms: u64,
    /// The run that last ran or reused this stage.
    pub run_id: String,
}

#[derive(Debug, Clone)]
pub struct RunIndex {
    dir: PathBuf,
}

impl RunIndex {
    pub fn new(cache_root: &Path, recipe_name: &str) -> Self {
        Self { dir: cache_root.join("index").join(file_safe(recipe_name)) }
    }

    fn path(&self, stage_id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_safe(stage_id)))
    }

    /// The last entry, or `None` if there is none or it is unreadable (the
    /// index only improves explanations; a bad entry must not stop a run).
    pub fn get(&self, stage_id: &str) -> Option<IndexEntry> {
        let path = self.path(stage_id);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(entry) => Some(entry),
            Err(e) => {
                tracing::warn!("ignoring unreadable run index entry {}: {e}", path.display());
                None
            }
        }
    }

    /// Replace the entry atomically (write a temp file, then rename).
    pub fn put(&self, stage_id: &str, entry: &IndexEntry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer_pretty(&mut tmp, entry)?;
        tmp.write_all(b"\n")?;
        tmp.persist(self.path(stage_id)).map_err(|e| e.error)?;
        Ok(())
    }

    pub fn remove(&self, stage_id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(stage_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Stage ids and recipe names are identifiers (plus `@`, `+`); keep any
/// path separator out of file names anyway.
pub fn file_safe(name: &str) -> String {
    name.chars().map(|c| if c == '/' || c == '\\' || c == '\0' { '_' } else { c }).collect()
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn entries_round_trip_and_bad_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let index = RunIndex::new(dir.path(), "mini");
        assert!(index.get("grpo@a").is_none());
        let components = KeyComponents {
            kind: "text".into(),
            version: 1,
            params: serde_json::json!({"text": "hi"}),
            inputs: BTreeMap::new(),
            external: vec![],
            seed: 3,
            device_class: None,
            unkeyed: Vec::new(),
            numerics: None,
        };
        let entry = IndexEntry { key: components.key(), components, recorded_unix_ms: 5, run_id: "r1".into() };
        index.put("grpo@a", &entry).unwrap();
        assert_eq!(index.get("grpo@a"), Some(entry));
        std::fs::write(dir.path().join("index/mini/bad.json"), "{not json").unwrap();
        assert!(index.get("bad").is_none());
        index.remove("grpo@a").unwrap();
        index.remove("grpo@a").unwrap();
        assert!(index.get("grpo@a").is_none());
    }
}
