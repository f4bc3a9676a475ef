//! The action cache: key -> [`ActionRecord`] at `records/<key>.json`. A
//! record lists its output files by blob digest (the bytes live in the
//! CAS); it is written atomically and last, so a crash leaves either no
//! record or a complete one. A record's mtime is its last use (gc evicts
//! least recently used records first).

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use crate::digest::Digest;
use crate::error::{CacheError, IoContext};
use crate::files::fsync_dir;
use crate::manifest::ActionRecord;
use crate::quarantine::Quarantine;

pub(crate) struct ActionCache {
    dir: PathBuf,
    quarantine: Quarantine,
}

impl ActionCache {
    pub fn new(dir: PathBuf, quarantine: Quarantine) -> Self {
        Self { dir, quarantine }
    }

    pub fn path(&self, key: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", key.hex()))
    }

    /// The record of `key`; a torn record, or one naming another key, is
    /// quarantined and reads as none.
    pub fn read(&self, key: &Digest) -> Result<Option<ActionRecord>, CacheError> {
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("read", path),
        };
        let record: ActionRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("corrupt action record {}: {e}", path.display());
                self.quarantine.keep(&path)?;
                return Ok(None);
            }
        };
        if record.key != *key {
            tracing::warn!("action record {} names key {}", path.display(), record.key);
            self.quarantine.keep(&path)?;
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// Writes the record atomically (temp file, fsync, rename, fsync dir).
    pub fn write(&self, record: &ActionRecord) -> Result<(), CacheError> {
        let dir = &self.dir;
        let path = self.path(&record.key);
        let mut tmp = tempfile::Builder::new().prefix(".record-").tempfile_in(dir).ctx("create temp record in", dir)?;
        serde_json::to_writer_pretty(&mut tmp, record).map_err(|source| CacheError::Json {
            path: path.clone(),
            what: "action record",
            source,
        })?;
        tmp.write_all(b"\n").ctx("write", tmp.path().to_owned())?;
        tmp.as_file().sync_all().ctx("fsync", tmp.path().to_owned())?;
        tmp.persist(&path).map_err(|e| CacheError::Io {
            op: "rename record into",
            path: path.clone(),
            source: e.error,
        })?;
        fsync_dir(dir)
    }

    /// Marks `key` as used now, for gc's LRU eviction. Best effort: a
    /// read-only cache still serves hits.
    pub fn touch(&self, key: &Digest) {
        let touched = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(key))
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::debug!("could not mark {} as used: {e}", key.short());
        }
    }

    /// Every readable record with its last use, sorted by key (unreadable
    /// ones are logged and skipped).
    pub fn list(&self) -> Result<Vec<(ActionRecord, SystemTime)>, CacheError> {
        let dir = &self.dir;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).ctx("list", dir)? {
            let entry = entry.ctx("list", dir)?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(key) = hex.parse::<Digest>() else {
                continue;
            };
            let path = entry.path();
            let used = match entry.metadata().and_then(|m| m.modified()) {
                Ok(t) => t,
                Err(_) => continue, // removed meanwhile
            };
            match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<ActionRecord>(&bytes) {
                    Ok(r) if r.key == key => out.push((r, used)),
                    Ok(_) => tracing::warn!("{}: record names another key; skipped", path.display()),
                    Err(e) => tracing::warn!("{}: unreadable record skipped: {e}", path.display()),
                },
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx("read", path),
            }
        }
        out.sort_by_key(|(r, _)| r.key);
        Ok(out)
    }

    /// Removes the record of `key` (absent is fine).
    pub fn remove(&self, key: &Digest) -> Result<(), CacheError> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&self.dir),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove", path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn actions(dir: &std::path::Path) -> ActionCache {
        for sub in ["records", "quarantine"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        ActionCache::new(dir.join("records"), Quarantine::new(dir.join("quarantine")))
    }

    fn record(name: &str) -> ActionRecord {
        ActionRecord {
            key: Digest::of_bytes(name.as_bytes()),
            created_unix_ms: 7,
            manifest: Manifest::default(),
            meta: serde_json::json!({"stage": name}),
        }
    }

    #[test]
    fn records_round_trip_and_are_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ac = actions(dir.path());
        let (a, b) = (record("a"), record("b"));
        ac.write(&a).unwrap();
        ac.write(&b).unwrap();
        assert_eq!(ac.read(&a.key).unwrap(), Some(a.clone()));
        let listed: Vec<Digest> = ac.list().unwrap().into_iter().map(|(r, _)| r.key).collect();
        let mut expected = vec![a.key, b.key];
        expected.sort();
        assert_eq!(listed, expected);
        ac.remove(&a.key).unwrap();
        ac.remove(&a.key).unwrap(); // idempotent
        assert_eq!(ac.read(&a.key).unwrap(), None);
        // Only the temp-file prefix of atomic writes may remain: none did.
        assert_eq!(std::fs::read_dir(dir.path().join("records")).unwrap().count(), 1);
    }

    #[test]
    fn a_record_under_another_key_is_quarantined_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let ac = actions(dir.path());
        let a = record("a");
        let other = Digest::of_bytes(b"other");
        std::fs::write(ac.path(&other), serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(ac.read(&other).unwrap(), None);
        assert!(!ac.path(&other).exists());
        assert_eq!(std::fs::read_dir(dir.path().join("quarantine")).unwrap().count(), 1);
    }
}
