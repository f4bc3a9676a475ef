//! Whole-cache maintenance across the three stores: `verify` (rehash every
//! blob), `gc` (drop records nothing keeps, then unreferenced blobs, views
//! and leftovers) and `size`.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use serde::Serialize;

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{CacheError, IoContext};
use crate::files::{ctime_of, remove_any, tree_bytes};
use crate::hashing::{FileStat, hash_contents};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// After dropping unkept records, evict least-recently-used kept records
    /// until the blob store is at most this many bytes.
    pub max_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Records deleted (or that would be), including `evicted`.
    pub records_removed: Vec<Digest>,
    /// Kept records evicted to get under `max_size`, oldest use first.
    pub evicted: Vec<Digest>,
    /// Records spared because a live process holds their key lock.
    pub skipped_locked: Vec<Digest>,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub views_removed: usize,
    pub tmp_removed: usize,
    /// Blob bytes still referenced afterwards.
    pub bytes_remaining: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CorruptBlob {
    pub digest: Option<Digest>,
    pub path: PathBuf,
    pub quarantined_to: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    pub corrupt: Vec<CorruptBlob>,
    /// Records dropped because a blob they need is corrupt or missing.
    pub records_removed: Vec<Digest>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.records_removed.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CacheSize {
    pub records: usize,
    pub blobs: usize,
    /// Bytes of file contents (views are hard links: no extra bytes).
    pub blob_bytes: u64,
    pub views: usize,
    pub tmp_bytes: u64,
    pub quarantine_bytes: u64,
}

impl Cache {
    /// Rehashes every blob (in parallel, ignoring the stat cache). Corrupt
    /// blobs are quarantined and the records that need them removed.
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        let blobs = self.cas.list()?;
        let mut report = VerifyReport {
            blobs_checked: blobs.len(),
            bytes_checked: blobs.iter().map(|b| b.size).sum(),
            ..VerifyReport::default()
        };
        let results = blobs
            .par_iter()
            .map(|b| -> Result<bool, CacheError> {
                let Some(expected) = b.digest else {
                    return Ok(false);
                };
                let st = FileStat::read(&b.path)?;
                let started = SystemTime::now();
                let actual = hash_contents(&b.path, st.size)?;
                self.stat.note_hashed();
                if actual == expected {
                    // A verified blob need not be rehashed by the next lookup.
                    self.stat.insert(&b.path, &st, actual, started);
                }
                Ok(actual == expected)
            })
            .collect::<Result<Vec<bool>, CacheError>>()?;
        for (b, ok) in blobs.iter().zip(results) {
            if !ok {
                let dest = self.cas.quarantine(&b.path)?;
                report.corrupt.push(CorruptBlob { digest: b.digest, path: b.path.clone(), quarantined_to: dest });
            }
        }
        for record in self.records()? {
            let complete = record.manifest.files.iter().all(|f| self.cas.blob_path(&f.digest, f.executable).is_file());
            if !complete {
                self.remove_record(&record.key)?;
                report.records_removed.push(record.key);
            }
        }
        self.flush()?;
        Ok(report)
    }

    /// Deletes records not in `keep` (and, with `max_size`, least-recently
    /// used kept ones until the blobs fit), then blobs and views nothing
    /// references and stale temp files. Records whose key is locked by a
    /// live process are never deleted; unreferenced files younger than the
    /// gc grace period are left alone (a publish may be in flight).
    pub fn gc(&self, keep: &BTreeSet<Digest>, opts: &GcOptions) -> Result<GcReport, CacheError> {
        let mut report = GcReport { dry_run: opts.dry_run, ..GcReport::default() };
        let mut records = self.actions.list()?;
        // Oldest use first: the eviction order.
        records.sort_by_key(|(r, used)| (*used, r.key));

        let blob_size = |e: &crate::FileEntry| (self.cas.blob_path(&e.digest, e.executable), e.size);
        let mut refcount: HashMap<PathBuf, (usize, u64)> = HashMap::new();
        let mut alive: Vec<bool> = Vec::with_capacity(records.len());
        for (r, _) in &records {
            let kept = keep.contains(&r.key);
            alive.push(kept);
            if kept {
                for e in &r.manifest.files {
                    let (p, size) = blob_size(e);
                    refcount.entry(p).or_insert((0, size)).0 += 1;
                }
            }
        }
        let mut live_bytes: u64 = refcount.values().map(|(_, s)| s).sum();
        if let Some(max) = opts.max_size {
            for (i, (r, _)) in records.iter().enumerate() {
                if live_bytes <= max {
                    break;
                }
                if !alive[i] {
                    continue;
                }
                alive[i] = false;
                report.evicted.push(r.key);
                for e in &r.manifest.files {
                    let (p, _) = blob_size(e);
                    if let Some((count, size)) = refcount.get_mut(&p) {
                        *count -= 1;
                        if *count == 0 {
                            live_bytes -= *size;
                        }
                    }
                }
            }
        }

        // Delete (or, dry run, just list) the records that lost; a record in
        // use by a running stage keeps its blobs.
        for (i, (r, _)) in records.iter().enumerate() {
            if alive[i] {
                continue;
            }
            let lock = self.try_lock(&r.key)?;
            if lock.is_none() {
                report.skipped_locked.push(r.key);
                report.evicted.retain(|k| *k != r.key);
                alive[i] = true;
                continue;
            }
            report.records_removed.push(r.key);
            if self.artifact_dir(&r.key).exists() {
                report.views_removed += 1;
            }
            if !opts.dry_run {
                self.remove_record(&r.key)?;
            }
        }

        let mut referenced: BTreeSet<PathBuf> = BTreeSet::new();
        let mut live_keys: BTreeSet<String> = BTreeSet::new();
        for (i, (r, _)) in records.iter().enumerate() {
            if alive[i] {
                live_keys.insert(r.key.hex());
                referenced.extend(r.manifest.files.iter().map(|e| blob_size(e).0));
            }
        }
        let now = SystemTime::now();
        let older_than = |t: SystemTime, age: Duration| now.duration_since(t).is_ok_and(|a| a >= age);

        for b in self.cas.list()? {
            if referenced.contains(&b.path) {
                report.bytes_remaining += b.size;
                continue;
            }
            if !older_than(b.ctime, self.opts.gc_grace) {
                report.bytes_remaining += b.size;
                continue;
            }
            report.blobs_removed += 1;
            report.bytes_freed += b.size;
            if !opts.dry_run {
                remove_any(&b.path)?;
            }
        }

        let views = self.views.artifacts();
        for v in std::fs::read_dir(views).ctx("list", views)? {
            let v = v.ctx("list", views)?;
            let name = v.file_name().to_string_lossy().into_owned();
            // Views of removed records were counted above; what is left here
            // are orphans from crashed publishes.
            let removed_now = name.parse::<Digest>().is_ok_and(|k| report.records_removed.contains(&k));
            if live_keys.contains(&name) || removed_now {
                continue;
            }
            let old = v.metadata().map(|m| older_than(ctime_of(&m), self.opts.gc_grace)).unwrap_or(false);
            if old {
                report.views_removed += 1;
                if !opts.dry_run {
                    remove_any(&v.path())?;
                }
            }
        }

        // Leftovers of crashed processes: everything in tmp/, and the hidden
        // temp files that records/ and locks/ use for atomic writes.
        let mut leftovers = Vec::new();
        for sub in ["tmp", "records", "locks"] {
            let dir = self.root.join(sub);
            for t in std::fs::read_dir(&dir).ctx("list", &dir)? {
                let t = t.ctx("list", &dir)?;
                let name = t.file_name().to_string_lossy().into_owned();
                let temp_name = name.starts_with('.') || name.contains(".lock.stale-");
                if sub == "tmp" || temp_name {
                    leftovers.push(t);
                }
            }
        }
        // Restart state of stages that were killed and never rerun; a key
        // whose lock is held belongs to a running stage and is kept.
        let resume = self.views.resume();
        if resume.is_dir() {
            for t in std::fs::read_dir(resume).ctx("list", resume)? {
                let t = t.ctx("list", resume)?;
                let in_use = match t.file_name().to_string_lossy().parse::<Digest>() {
                    Ok(k) => self.try_lock(&k)?.is_none(),
                    Err(_) => false,
                };
                if !in_use {
                    leftovers.push(t);
                }
            }
        }
        for t in leftovers {
            let old =
                t.metadata().and_then(|m| m.modified()).map(|m| older_than(m, self.opts.tmp_max_age)).unwrap_or(false);
            if old {
                report.tmp_removed += 1;
                if !opts.dry_run {
                    remove_any(&t.path())?;
                }
            }
        }
        Ok(report)
    }

    /// What the cache holds and how big it is.
    pub fn size(&self) -> Result<CacheSize, CacheError> {
        let blobs = self.cas.list()?;
        let views_dir = self.views.artifacts();
        let views = std::fs::read_dir(views_dir).ctx("list", views_dir)?.filter_map(Result::ok).count();
        Ok(CacheSize {
            records: self.actions.list()?.len(),
            blobs: blobs.len(),
            blob_bytes: blobs.iter().map(|b| b.size).sum(),
            views,
            tmp_bytes: tree_bytes(self.views.tmp()),
            quarantine_bytes: tree_bytes(&self.root.join("quarantine")),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{File, Permissions};
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::cache::CacheOptions;
    use crate::cache::tests::{count_blobs, fast_options, key, open_cache, publish_files};

    fn set_last_used(cache: &Cache, k: &Digest, secs_ago: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs_ago);
        File::options().write(true).open(cache.actions.path(k)).unwrap().set_modified(t).unwrap();
    }

    #[test]
    fn verify_finds_corrupt_blobs_and_drops_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(dir.path());
        let rec = publish_files(&cache, &key("a"), &[("x", b"xxxx", false), ("y", b"yyyy", false)]);
        publish_files(&cache, &key("b"), &[("y", b"yyyy", false)]);
        let clean = cache.verify().unwrap();
        assert!(clean.is_clean(), "{clean:?}");
        assert_eq!(clean.blobs_checked, 2);
        assert_eq!(clean.bytes_checked, 8);

        let x = cache.cas.blob_path(&rec.manifest.get("x").unwrap().digest, false);
        std::fs::set_permissions(&x, Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&x, b"XXXX").unwrap();
        let report = cache.verify().unwrap();
        assert_eq!(report.corrupt.len(), 1);
        assert_eq!(report.corrupt[0].path, x);
        assert_eq!(std::fs::read(&report.corrupt[0].quarantined_to).unwrap(), b"XXXX");
        assert_eq!(report.records_removed, vec![key("a")]);
        assert!(cache.lookup(&key("a")).unwrap().is_none());
        assert!(cache.lookup(&key("b")).unwrap().is_some(), "unaffected record survives");
    }

    #[test]
    fn gc_deletes_unkept_records_and_their_unshared_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(dir.path());
        publish_files(&cache, &key("keep"), &[("shared", b"s", false), ("own", b"keep-only", false)]);
        publish_files(&cache, &key("drop"), &[("shared", b"s", false), ("own", b"drop-only!", false)]);
        assert_eq!(count_blobs(&cache), 3);
        let keep: BTreeSet<Digest> = [key("keep")].into();

        let dry = cache.gc(&keep, &GcOptions { dry_run: true, max_size: None }).unwrap();
        assert_eq!(dry.records_removed, vec![key("drop")]);
        assert_eq!(dry.blobs_removed, 1);
        assert_eq!(dry.bytes_freed, 10);
        assert_eq!(dry.views_removed, 1);
        assert_eq!(count_blobs(&cache), 3, "dry run deletes nothing");
        assert!(cache.lookup(&key("drop")).unwrap().is_some());

        let real = cache.gc(&keep, &GcOptions::default()).unwrap();
        assert_eq!(real.records_removed, dry.records_removed);
        assert_eq!(real.views_removed, 1);
        assert_eq!((real.blobs_removed, real.bytes_freed), (1, 10));
        assert_eq!(real.bytes_remaining, 1 + 9);
        assert_eq!(count_blobs(&cache), 2);
        assert!(cache.lookup(&key("drop")).unwrap().is_none());
        assert!(!cache.artifact_dir(&key("drop")).exists());
        let kept = cache.lookup(&key("keep")).unwrap().unwrap();
        assert_eq!(std::fs::read(cache.artifact_dir(&kept.key).join("own")).unwrap(), b"keep-only");
    }

    #[test]
    fn gc_max_size_evicts_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(dir.path());
        for (name, ago) in [("old", 300), ("mid", 200), ("new", 100)] {
            publish_files(&cache, &key(name), &[("f", name.repeat(100).as_bytes(), false)]);
            set_last_used(&cache, &key(name), ago);
        }
        // Using "old" now makes it the most recently used.
        assert!(cache.lookup(&key("old")).unwrap().is_some());
        let keep: BTreeSet<Digest> = ["old", "mid", "new"].iter().map(|n| key(n)).collect();
        let opts = GcOptions { dry_run: false, max_size: Some(700) };
        let report = cache.gc(&keep, &opts).unwrap();
        // 300 + 300 + 300 bytes > 700: evict "mid" (oldest use) only.
        assert_eq!(report.evicted, vec![key("mid")]);
        assert_eq!(report.records_removed, vec![key("mid")]);
        assert_eq!(report.bytes_remaining, 600);
        assert!(cache.lookup(&key("old")).unwrap().is_some());
        assert!(cache.lookup(&key("new")).unwrap().is_some());
        assert!(cache.lookup(&key("mid")).unwrap().is_none());
    }

    #[test]
    fn gc_spares_locked_records_and_young_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(dir.path());
        publish_files(&cache, &key("busy"), &[("f", b"busy", false)]);
        let _held = cache.lock(&key("busy"), None).unwrap();
        let report = cache.gc(&BTreeSet::new(), &GcOptions::default()).unwrap();
        assert_eq!(report.skipped_locked, vec![key("busy")]);
        assert!(report.records_removed.is_empty());
        assert_eq!(report.blobs_removed, 0);
        assert!(cache.lookup(&key("busy")).unwrap().is_some());

        // With a grace period, a blob that no record references yet (a
        // publish in flight) is left alone.
        let graceful =
            Cache::open_with(cache.root(), CacheOptions { gc_grace: Duration::from_secs(3600), ..fast_options() })
                .unwrap();
        publish_files(&graceful, &key("fresh"), &[("f", b"fresh", false)]);
        std::fs::remove_file(graceful.actions.path(&key("fresh"))).unwrap();
        let report = graceful.gc(&[key("busy")].into(), &GcOptions::default()).unwrap();
        assert_eq!(report.blobs_removed, 0);
        assert_eq!(report.views_removed, 0);
        assert_eq!(count_blobs(&graceful), 2);
    }

    #[test]
    fn gc_removes_old_crash_leftovers_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open_with(
            &dir.path().join("cache"),
            CacheOptions { tmp_max_age: Duration::from_secs(3600), ..fast_options() },
        )
        .unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        let staging = cache.staging_dir("running").unwrap();
        let crashed = cache.root().join("tmp/stage-crashed-x");
        std::fs::create_dir_all(&crashed).unwrap();
        let torn_record = cache.root().join("records/.record-abc");
        let lock_tmp = cache.root().join("locks/.lock-tmp-abc");
        for p in [&torn_record, &lock_tmp] {
            std::fs::write(p, b"partial").unwrap();
            File::options().write(true).open(p).unwrap().set_modified(old).unwrap();
        }
        File::open(&crashed).unwrap().set_modified(old).unwrap();
        // Restart state: abandoned long ago, abandoned but locked (a stage is
        // running), and fresh.
        let abandoned = cache.resume_dir(&key("abandoned"));
        let running = cache.resume_dir(&key("running"));
        let fresh = cache.resume_dir(&key("fresh"));
        for d in [&abandoned, &running, &fresh] {
            std::fs::create_dir_all(d).unwrap();
        }
        for d in [&abandoned, &running] {
            File::open(d).unwrap().set_modified(old).unwrap();
        }
        let _held = cache.try_lock(&key("running")).unwrap().unwrap();

        let report = cache.gc(&BTreeSet::new(), &GcOptions::default()).unwrap();
        assert_eq!(report.tmp_removed, 4);
        assert!(!crashed.exists() && !torn_record.exists() && !lock_tmp.exists());
        assert!(staging.path().exists(), "a live staging dir is young and kept");
        assert!(!abandoned.exists() && running.exists() && fresh.exists());
    }

    #[test]
    fn size_counts_records_blobs_and_views() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(dir.path());
        publish_files(&cache, &key("a"), &[("x", b"12345", false), ("y", b"12345", false)]);
        publish_files(&cache, &key("b"), &[("z", b"abc", false)]);
        let s = cache.size().unwrap();
        assert_eq!((s.records, s.blobs, s.blob_bytes, s.views), (2, 2, 8, 2));
        assert_eq!(s.tmp_bytes, 0);
    }
}
