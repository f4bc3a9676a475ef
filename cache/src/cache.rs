//! The [`Cache`] facade: one type the engine talks to, built from three
//! stores that know nothing of each other, as in Bazel's remote-execution
//! API (action cache and CAS are separate services):
//! * [`crate::cas`]: file contents by digest (blobs);
//! * [`crate::action_cache`]: key -> action record (a manifest of blob digests);
//! * [`crate::views`]: read-only artifact views, staging and resume dirs.
//!
//! The facade composes them: [`Cache::publish`] stores blobs, builds the
//! view and writes the record last; [`Cache::lookup`] reads the record and
//! serves it only when every blob is intact (rebuilding a damaged view).
//! It also hashes inputs through the stat cache and hands out per-key locks.
//!
//! Layout under the root:
//! ```text
//! blobs/<aa>/<62 hex>[.x]   file contents by digest (".x": executable copy,
//!                           because hard links share one mode)
//! records/<key>.json        action records; mtime = last use (for gc LRU)
//! artifacts/<key>/          read-only view: hard links to blobs
//! locks/<key>.lock          per-key locks
//! stat/                     stat cache
//! tmp/                      staging and half-built views
//! resume/<key>/             a stage's own restart state (e.g. training
//!                           checkpoints): kept across failed attempts,
//!                           removed once the key is published
//! quarantine/               corrupt blobs and records, kept for inspection
//! ```

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rayon::prelude::*;

use crate::action_cache::ActionCache;
use crate::cas::{BlobState, Cas};
use crate::digest::Digest;
use crate::error::{CacheError, IoContext};
use crate::files::{list_tree, now_unix_ms};
use crate::hashing::FileStat;
use crate::lock::{self, KeyLock, LockConfig, LockInfo};
use crate::manifest::{ActionRecord, FileEntry, Manifest};
use crate::quarantine::Quarantine;
use crate::stat_cache::{StatCache, StatCounters};
use crate::views::{Staging, Views};

/// Bumped when the on-disk layout changes incompatibly.
const LAYOUT_VERSION: &str = "1";

/// Tunables; `Default` is what the engine should use.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Files changed this recently before hashing are not stat-cached.
    pub racy_window: Duration,
    /// A lock held by another host is stale once its mtime is this old.
    pub lock_lease: Duration,
    /// How often a held lock's mtime is refreshed (must be well below the lease).
    pub lock_heartbeat: Duration,
    /// gc never deletes unreferenced blobs/views younger than this: they may
    /// belong to a publish that has not written its record yet.
    pub gc_grace: Duration,
    /// gc deletes leftovers in `tmp/` (crashed runs) older than this.
    pub tmp_max_age: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            racy_window: Duration::from_secs(2),
            lock_lease: Duration::from_secs(600),
            lock_heartbeat: Duration::from_secs(60),
            gc_grace: Duration::from_secs(3600),
            tmp_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// A content-addressed cache rooted at one directory. `Send + Sync`: share it
/// between scheduler threads by reference.
pub struct Cache {
    pub(crate) root: PathBuf,
    pub(crate) opts: CacheOptions,
    pub(crate) stat: StatCache,
    pub(crate) cas: Cas,
    pub(crate) actions: ActionCache,
    pub(crate) views: Views,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        Cache::open_with(root, CacheOptions::default())
    }

    pub fn open_with(root: &Path, opts: CacheOptions) -> Result<Cache, CacheError> {
        // Absolute, so stat-cache entries stay meaningful if the cwd changes.
        let root = &std::path::absolute(root).ctx("resolve", root)?;
        for sub in ["blobs", "records", "artifacts", "locks", "stat", "tmp", "quarantine", "resume"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).ctx("create directory", &d)?;
        }
        let version_file = root.join("VERSION");
        match std::fs::read_to_string(&version_file) {
            Ok(v) if v.trim() == LAYOUT_VERSION => {}
            Ok(v) => {
                return Err(CacheError::Invalid {
                    path: version_file,
                    reason: format!(
                        "cache layout version {:?}, this build expects {LAYOUT_VERSION:?} (use another --cache-dir)",
                        v.trim()
                    ),
                });
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::write(&version_file, format!("{LAYOUT_VERSION}\n")).ctx("write", &version_file)?;
            }
            Err(e) => return Err(e).ctx("read", version_file),
        }
        let stat = StatCache::open(&root.join("stat"), opts.racy_window)?;
        let quarantine = Quarantine::new(root.join("quarantine"));
        Ok(Cache {
            root: root.to_owned(),
            opts,
            stat,
            cas: Cas::new(root.join("blobs"), quarantine.clone()),
            actions: ActionCache::new(root.join("records"), quarantine),
            views: Views::new(root),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    /// How many files were answered by the stat cache / actually hashed.
    pub fn stat_counters(&self) -> StatCounters {
        self.stat.counters()
    }

    fn lock_path(&self, key: &Digest) -> PathBuf {
        self.root.join("locks").join(format!("{}.lock", key.hex()))
    }

    fn lock_config(&self) -> LockConfig {
        LockConfig { lease: self.opts.lock_lease, heartbeat: self.opts.lock_heartbeat }
    }

    /// Where downstream stages read a key's outputs.
    pub fn artifact_dir(&self, key: &Digest) -> PathBuf {
        self.views.artifact_dir(key)
    }

    /// Where a stage producing `key` keeps state that must survive a failed
    /// or killed attempt (created on demand by the stage). Only the holder
    /// of the key's lock may use it; the engine removes it after publishing.
    pub fn resume_dir(&self, key: &Digest) -> PathBuf {
        self.views.resume_dir(key)
    }

    /// Forget the restart state of `key` (after a publish, or before a forced rerun).
    pub fn remove_resume_dir(&self, key: &Digest) -> Result<(), CacheError> {
        self.views.remove_resume_dir(key)
    }

    /// A fresh, empty directory under `<root>/tmp/` for a stage's outputs.
    pub fn staging_dir(&self, label: &str) -> Result<Staging, CacheError> {
        self.views.staging_dir(label)
    }

    /// Digest of a file's contents, answered from the stat cache when the
    /// file's (dev, inode, size, mtime ns, ctime ns) are unchanged.
    /// Symlinks are followed.
    pub fn hash_file(&self, path: &Path) -> Result<Digest, CacheError> {
        let meta = std::fs::metadata(path).ctx("stat", path)?;
        if !meta.is_file() {
            return Err(CacheError::UnsupportedFileType {
                path: path.to_owned(),
                kind: if meta.is_dir() { "a directory" } else { "a special file" },
            });
        }
        self.stat.digest(path, FileStat::of(&meta))
    }

    /// Manifest of a file (one entry named by its file name) or of a
    /// directory tree (paths relative to it). Symlinks are followed, symlink
    /// loops and special files are errors; empty directories are not
    /// represented. Files are hashed in parallel and stat-cached.
    pub fn hash_path(&self, path: &Path) -> Result<Manifest, CacheError> {
        let meta = std::fs::metadata(path).ctx("stat", path)?;
        if meta.is_file() {
            let name = path
                .file_name()
                .ok_or_else(|| CacheError::Invalid {
                    path: path.to_owned(),
                    reason: "a file path must end in a file name".into(),
                })?
                .to_str()
                .ok_or_else(|| CacheError::NonUtf8Path { path: path.to_owned() })?;
            let st = FileStat::of(&meta);
            let digest = self.stat.digest(path, st)?;
            return Ok(Manifest {
                files: vec![FileEntry { path: name.to_owned(), digest, size: st.size, executable: st.executable() }],
            });
        }
        if !meta.is_dir() {
            return Err(CacheError::UnsupportedFileType {
                path: path.to_owned(),
                kind: "a special file (socket, fifo or device)",
            });
        }
        let files = list_tree(path, true)?;
        let entries = files
            .par_iter()
            .map(|f| {
                Ok(FileEntry {
                    path: f.rel.clone(),
                    digest: self.stat.digest(&f.abs, f.stat)?,
                    size: f.stat.size,
                    executable: f.stat.executable(),
                })
            })
            .collect::<Result<Vec<_>, CacheError>>()?;
        Ok(Manifest::from_entries(entries))
    }

    /// Exclusive lock on `key`; waits while a live process holds it.
    pub fn lock(&self, key: &Digest, timeout: Option<Duration>) -> Result<KeyLock, CacheError> {
        lock::lock(&self.lock_path(key), &self.lock_config(), timeout)
    }

    /// The lock on `key` if it is free (or stale), else `None`.
    pub fn try_lock(&self, key: &Digest) -> Result<Option<KeyLock>, CacheError> {
        lock::try_lock(&self.lock_path(key), &self.lock_config())
    }

    /// Who holds the lock on `key`, if anyone (live or not).
    pub fn lock_holder(&self, key: &Digest) -> Result<Option<LockInfo>, CacheError> {
        lock::holder(&self.lock_path(key))
    }

    /// The record for `key` if it and all its blobs are present and intact;
    /// the artifact view is rebuilt if it is missing or damaged. A record
    /// with missing or corrupt blobs is removed (corrupt blobs quarantined)
    /// and `None` returned, so the stage simply runs again.
    pub fn lookup(&self, key: &Digest) -> Result<Option<ActionRecord>, CacheError> {
        let Some(record) = self.actions.read(key)? else {
            return Ok(None);
        };
        let states =
            record.manifest.files.par_iter().map(|f| self.cas.check(f, &self.stat)).collect::<Result<Vec<_>, _>>()?;
        let mut usable = true;
        for (state, entry) in states.into_iter().zip(&record.manifest.files) {
            match state {
                BlobState::Ok => {}
                BlobState::Missing => {
                    tracing::warn!("{}: blob of {:?} is missing", key.short(), entry.path);
                    usable = false;
                }
                BlobState::Corrupt(path) => {
                    tracing::warn!("{}: blob of {:?} is corrupt", key.short(), entry.path);
                    self.cas.quarantine(&path)?;
                    usable = false;
                }
            }
        }
        if !usable {
            self.remove_record(key)?;
            return Ok(None);
        }
        if !self.views.is_intact(key, &record.manifest, &self.cas)? {
            tracing::info!("{}: rebuilding artifact view", key.short());
            self.views.build(key, &record.manifest, &self.cas, &self.actions.path(key))?;
        }
        self.actions.touch(key);
        Ok(Some(record))
    }

    /// Moves the staged outputs into the blob store (deduplicated), builds
    /// the read-only view and writes the action record last. Files and
    /// directories are fsynced before the record is renamed into place, so a
    /// crash at any point leaves either no record or a complete one.
    /// Symlinks, special files and non-UTF-8 names in the staging dir are
    /// errors; empty directories are dropped.
    pub fn publish(&self, key: &Digest, staging: Staging, meta: serde_json::Value) -> Result<ActionRecord, CacheError> {
        let files = list_tree(staging.path(), false)?;
        let entries =
            files.par_iter().map(|f| self.cas.store(f, &self.stat)).collect::<Result<Vec<_>, CacheError>>()?;
        self.cas.sync(&entries)?;
        let manifest = Manifest::from_entries(entries);
        self.views.build(key, &manifest, &self.cas, &self.actions.path(key))?;

        let record = ActionRecord { key: *key, created_unix_ms: now_unix_ms(), manifest, meta };
        self.actions.write(&record)?;
        drop(staging);
        tracing::debug!(
            "published {} ({} files, {} bytes)",
            key.short(),
            record.manifest.files.len(),
            record.manifest.total_size()
        );
        Ok(record)
    }

    /// All readable action records (unreadable ones are logged and skipped).
    pub fn records(&self) -> Result<Vec<ActionRecord>, CacheError> {
        Ok(self.actions.list()?.into_iter().map(|(r, _)| r).collect())
    }

    /// Forgets `key`: removes its record, then its view. Blobs stay until gc.
    pub fn remove_record(&self, key: &Digest) -> Result<(), CacheError> {
        self.actions.remove(key)?;
        self.views.remove(key)
    }

    /// Persists new stat-cache entries (also done on Drop, best effort).
    pub fn flush(&self) -> Result<(), CacheError> {
        self.stat.flush()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Err(e) = self.stat.flush() {
            tracing::warn!("stat cache not saved: {e}");
        }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
pub(crate) mod tests;
