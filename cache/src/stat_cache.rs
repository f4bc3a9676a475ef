//! Persistent stat cache: (dev, inode, size, mtime ns, ctime ns) -> digest, so a
//! no-op rerun does not rehash gigabytes.
//!
//! Storage: one append-only JSON-lines log, `<root>/stat/log.jsonl`. Chosen over
//! one-file-per-entry because a 100k-file dataset would otherwise cost 100k
//! inodes and opens; concurrency stays safe because
//! - each flush appends its whole batch with a single `write` on an `O_APPEND`
//!   file, so two processes never interleave inside a line;
//! - a torn line (crash mid-write) is not valid JSON and is skipped when
//!   loading; a truncated JSON object can never parse as a different entry;
//! - compaction runs under `stat/compact.lock` and replaces the log by rename;
//!   an append racing with it may be lost, which only costs a rehash later.
//!
//! An entry is trusted only when every stat field matches, and is never
//! recorded when the file's mtime or ctime falls within `racy_window` of the
//! moment hashing started (the "racy git" problem: a write in the same clock
//! tick as the hash would leave the timestamps unchanged).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{CacheError, IoContext};
use crate::hashing::{FileStat, hash_contents};

const LOG_NAME: &str = "log.jsonl";
const COMPACT_LOCK: &str = "compact.lock";
/// A compaction lock older than this belongs to a crashed process.
const COMPACT_LOCK_STALE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    digest: Digest,
    /// Only used by compaction to drop entries of files that no longer exist.
    path: PathBuf,
}

impl Entry {
    fn matches(&self, st: &FileStat) -> bool {
        self.dev == st.dev
            && self.ino == st.ino
            && self.size == st.size
            && self.mtime_ns == st.mtime_ns
            && self.ctime_ns == st.ctime_ns
    }
}

#[derive(Default)]
struct State {
    map: HashMap<(u64, u64), Entry>,
    pending: Vec<Entry>,
}

pub(crate) struct StatCache {
    dir: PathBuf,
    racy_window: Duration,
    state: Mutex<State>,
    hits: AtomicU64,
    hashed: AtomicU64,
}

/// Counters for tests and benchmarks: how often the cache answered and how
/// many files had to be read and hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatCounters {
    pub hits: u64,
    pub hashed: u64,
}

fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

impl StatCache {
    pub fn open(dir: &Path, racy_window: Duration) -> Result<StatCache, CacheError> {
        std::fs::create_dir_all(dir).ctx("create directory", dir)?;
        let (entries, lines) = read_log(&dir.join(LOG_NAME))?;
        let mut map = HashMap::with_capacity(entries.len());
        for e in entries {
            map.insert((e.dev, e.ino), e);
        }
        let cache = StatCache {
            dir: dir.to_owned(),
            racy_window,
            state: Mutex::new(State { map, pending: Vec::new() }),
            hits: AtomicU64::new(0),
            hashed: AtomicU64::new(0),
        };
        let live = cache.lock_state().map.len();
        // Superseded lines pile up as files change; compact when they dominate.
        if lines > 2 * live + 1024
            && let Err(e) = cache.compact()
        {
            tracing::warn!("stat cache compaction skipped: {e}");
        }
        Ok(cache)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (single inserts), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, st: &FileStat) -> Option<Digest> {
        let state = self.lock_state();
        let hit = state.map.get(&(st.dev, st.ino)).filter(|e| e.matches(st)).map(|e| e.digest);
        if hit.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    pub fn note_hashed(&self) {
        self.hashed.fetch_add(1, Ordering::Relaxed);
    }

    /// Records `digest` for `st` unless the file changed too recently before
    /// `hash_started` to trust its timestamps.
    pub fn insert(&self, path: &Path, st: &FileStat, digest: Digest, hash_started: SystemTime) {
        let cutoff = unix_ns(hash_started) - self.racy_window.as_nanos() as i64;
        if st.mtime_ns >= cutoff || st.ctime_ns >= cutoff {
            return;
        }
        let entry = Entry {
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
            digest,
            path: path.to_owned(),
        };
        let mut state = self.lock_state();
        state.map.insert((st.dev, st.ino), entry.clone());
        state.pending.push(entry);
    }

    /// Digest of the contents of `path`, whose stat is `st`: from the cache
    /// when the stat is unchanged, else hashed and remembered.
    pub fn digest(&self, path: &Path, mut st: FileStat) -> Result<Digest, CacheError> {
        if let Some(d) = self.get(&st) {
            return Ok(d);
        }
        // A writer racing with us shows up as a stat change; retry once, then
        // give up rather than cache a digest of mixed contents.
        for _ in 0..2 {
            let started = SystemTime::now();
            let digest = hash_contents(path, st.size)?;
            self.note_hashed();
            let after = FileStat::read(path)?;
            if after == st {
                let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
                self.insert(&abs, &st, digest, started);
                return Ok(digest);
            }
            st = after;
        }
        Err(CacheError::ChangedWhileHashing { path: path.to_owned() })
    }

    pub fn counters(&self) -> StatCounters {
        StatCounters { hits: self.hits.load(Ordering::Relaxed), hashed: self.hashed.load(Ordering::Relaxed) }
    }

    /// Appends new entries to the log in one write.
    pub fn flush(&self) -> Result<(), CacheError> {
        let pending = std::mem::take(&mut self.lock_state().pending);
        if pending.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(pending.len() * 200);
        for e in &pending {
            // Serialising plain structs of numbers/strings cannot fail.
            if serde_json::to_writer(&mut buf, e).is_ok() {
                buf.push(b'\n');
            }
        }
        let path = self.dir.join(LOG_NAME);
        let result = OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| f.write_all(&buf));
        if result.is_err() {
            // Keep the entries so a later flush can retry.
            self.lock_state().pending.extend(pending);
        }
        result.ctx("append to stat cache", path)
    }

    /// Rewrites the log with one line per live entry whose file is unchanged.
    fn compact(&self) -> Result<(), CacheError> {
        let lock_path = self.dir.join(COMPACT_LOCK);
        if !take_compact_lock(&lock_path)? {
            return Ok(());
        }
        let result = (|| {
            let log = self.dir.join(LOG_NAME);
            let (entries, _) = read_log(&log)?;
            let mut latest: HashMap<(u64, u64), Entry> = HashMap::new();
            for e in entries {
                latest.insert((e.dev, e.ino), e);
            }
            let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).ctx("create temp file in", &self.dir)?;
            let mut kept = 0usize;
            for e in latest.values() {
                let still_valid = FileStat::read(&e.path).is_ok_and(|st| e.matches(&st));
                if still_valid {
                    serde_json::to_writer(&mut tmp, e).map_err(|source| CacheError::Json {
                        path: tmp.path().to_owned(),
                        what: "stat cache entry",
                        source,
                    })?;
                    tmp.write_all(b"\n").ctx("write", tmp.path().to_owned())?;
                    kept += 1;
                }
            }
            tmp.as_file().sync_all().ctx("fsync", tmp.path().to_owned())?;
            tmp.persist(&log).map_err(|e| CacheError::Io { op: "replace", path: log.clone(), source: e.error })?;
            tracing::debug!(kept, "compacted stat cache {}", log.display());
            Ok(())
        })();
        let _ = std::fs::remove_file(&lock_path);
        result
    }
}

fn take_compact_lock(path: &Path) -> Result<bool, CacheError> {
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = std::fs::metadata(path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                match age {
                    Some(age) if age > COMPACT_LOCK_STALE => {
                        let _ = std::fs::remove_file(path);
                    }
                    _ => return Ok(false),
                }
            }
            Err(e) => return Err(e).ctx("create", path),
        }
    }
    Ok(false)
}

/// All parseable entries of the log, and the number of lines read.
fn read_log(path: &Path) -> Result<(Vec<Entry>, usize), CacheError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e).ctx("open", path),
    };
    let mut entries = Vec::new();
    let mut lines = 0usize;
    let mut skipped = 0usize;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.ctx("read", path)?;
        lines += 1;
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) => entries.push(e),
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::debug!(skipped, "ignored torn lines in {}", path.display());
    }
    Ok((entries, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(path: &Path) -> FileStat {
        FileStat::read(path).unwrap()
    }

    #[test]
    fn entries_need_every_stat_field_and_skip_racy_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        let cache = StatCache::open(&dir.path().join("stat"), Duration::from_secs(2)).unwrap();
        let st = stat_of(&file);
        let d = Digest::of_bytes(b"abc");

        // Just written: racy, so not recorded.
        cache.insert(&file, &st, d, SystemTime::now());
        assert_eq!(cache.get(&st), None);

        // Hashed "long after" the last change: recorded.
        let later = SystemTime::now() + Duration::from_secs(10);
        cache.insert(&file, &st, d, later);
        assert_eq!(cache.get(&st), Some(d));
        for changed in [
            FileStat { size: st.size + 1, ..st },
            FileStat { mtime_ns: st.mtime_ns + 1, ..st },
            FileStat { ctime_ns: st.ctime_ns + 1, ..st },
            FileStat { ino: st.ino + 1, ..st },
            FileStat { dev: st.dev + 1, ..st },
        ] {
            assert_eq!(cache.get(&changed), None, "{changed:?}");
        }
    }

    #[test]
    fn flush_persists_and_torn_lines_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        let stat_dir = dir.path().join("stat");
        let st = stat_of(&file);
        let d = Digest::of_bytes(b"abc");
        {
            let cache = StatCache::open(&stat_dir, Duration::ZERO).unwrap();
            cache.insert(&file, &st, d, SystemTime::now() + Duration::from_secs(1));
            cache.flush().unwrap();
        }
        // Simulate a crash mid-append by another process.
        let mut log = OpenOptions::new().append(true).open(stat_dir.join(LOG_NAME)).unwrap();
        log.write_all(b"{\"dev\":1,\"ino\":").unwrap();
        drop(log);
        let cache = StatCache::open(&stat_dir, Duration::ZERO).unwrap();
        assert_eq!(cache.get(&st), Some(d));
    }

    #[test]
    fn compaction_keeps_latest_valid_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let stat_dir = dir.path().join("stat");
        let keep = dir.path().join("keep");
        let gone = dir.path().join("gone");
        std::fs::write(&keep, b"k").unwrap();
        std::fs::write(&gone, b"g").unwrap();
        let (st_keep, st_gone) = (stat_of(&keep), stat_of(&gone));
        let later = SystemTime::now() + Duration::from_secs(1);
        {
            let cache = StatCache::open(&stat_dir, Duration::ZERO).unwrap();
            // Many superseded lines for the same file trigger compaction on open.
            for i in 0..1100u32 {
                cache.insert(&keep, &st_keep, Digest::of_bytes(&i.to_le_bytes()), later);
            }
            cache.insert(&keep, &st_keep, Digest::of_bytes(b"k"), later);
            cache.insert(&gone, &st_gone, Digest::of_bytes(b"g"), later);
            cache.flush().unwrap();
        }
        std::fs::remove_file(&gone).unwrap();
        let cache = StatCache::open(&stat_dir, Duration::ZERO).unwrap();
        assert_eq!(cache.get(&st_keep), Some(Digest::of_bytes(b"k")));
        let text = std::fs::read_to_string(stat_dir.join(LOG_NAME)).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!stat_dir.join(COMPACT_LOCK).exists());
    }
}
