//! The cache itself: blob store, action records, artifact views, staging.
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

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use tempfile::TempDir;

use crate::digest::Digest;
use crate::error::{CacheError, IoContext};
use crate::hashing::{FileStat, hash_contents};
use crate::lock::{self, KeyLock, LockConfig, LockInfo};
use crate::manifest::{ActionRecord, FileEntry, Manifest};
use crate::stat_cache::{StatCache, StatCounters};

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
}

/// A fresh directory for a stage to write its outputs into; removed on Drop.
/// Publishing consumes it (its files become blobs).
#[derive(Debug)]
pub struct Staging {
    dir: TempDir,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir).and_then(|d| d.sync_all()).ctx("fsync directory", dir)
}

/// A file found in a tree: its manifest path, real path and stat.
pub(crate) struct TreeFile {
    pub rel: String,
    pub abs: PathBuf,
    pub stat: FileStat,
}

/// Lists the regular files under `dir`, sorted by manifest path.
/// `follow_links`: true follows symlinks (loops are errors); false rejects them.
pub(crate) fn list_tree(dir: &Path, follow_links: bool) -> Result<Vec<TreeFile>, CacheError> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(follow_links).sort_by_file_name() {
        let entry = entry.map_err(|source| CacheError::Walk { path: dir.to_owned(), source })?;
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        let abs = entry.path().to_owned();
        if ft.is_symlink() {
            return Err(CacheError::SymlinkInOutput { path: abs });
        }
        if !ft.is_file() {
            return Err(CacheError::UnsupportedFileType { path: abs, kind: "a special file (socket, fifo or device)" });
        }
        let rel_path = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let mut parts = Vec::new();
        for c in rel_path.components() {
            match c.as_os_str().to_str() {
                Some(s) => parts.push(s),
                None => return Err(CacheError::NonUtf8Path { path: abs }),
            }
        }
        let meta = entry.metadata().map_err(|source| CacheError::Walk { path: abs.clone(), source })?;
        files.push(TreeFile { rel: parts.join("/"), abs, stat: FileStat::of(&meta) });
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(files)
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
        Ok(Cache { root: root.to_owned(), opts, stat })
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

    pub(crate) fn blob_path(&self, digest: &Digest, executable: bool) -> PathBuf {
        let hex = digest.hex();
        let name = if executable { format!("{}.x", &hex[2..]) } else { hex[2..].to_owned() };
        self.root.join("blobs").join(&hex[..2]).join(name)
    }

    pub(crate) fn record_path(&self, key: &Digest) -> PathBuf {
        self.root.join("records").join(format!("{}.json", key.hex()))
    }

    fn lock_path(&self, key: &Digest) -> PathBuf {
        self.root.join("locks").join(format!("{}.lock", key.hex()))
    }

    fn lock_config(&self) -> LockConfig {
        LockConfig { lease: self.opts.lock_lease, heartbeat: self.opts.lock_heartbeat }
    }

    /// Where downstream stages read a key's outputs.
    pub fn artifact_dir(&self, key: &Digest) -> PathBuf {
        self.root.join("artifacts").join(key.hex())
    }

    /// Where a stage producing `key` keeps state that must survive a failed
    /// or killed attempt (created on demand by the stage). Only the holder
    /// of the key's lock may use it; the engine removes it after publishing.
    pub fn resume_dir(&self, key: &Digest) -> PathBuf {
        self.root.join("resume").join(key.hex())
    }

    /// Forget the restart state of `key` (after a publish, or before a forced rerun).
    pub fn remove_resume_dir(&self, key: &Digest) -> Result<(), CacheError> {
        let dir = self.resume_dir(key);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).ctx("remove", &dir),
            _ => Ok(()),
        }
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
        self.hash_with_stat(path, FileStat::of(&meta))
    }

    pub(crate) fn hash_with_stat(&self, path: &Path, mut st: FileStat) -> Result<Digest, CacheError> {
        if let Some(d) = self.stat.get(&st) {
            return Ok(d);
        }
        // A writer racing with us shows up as a stat change; retry once, then
        // give up rather than cache a digest of mixed contents.
        for _ in 0..2 {
            let started = SystemTime::now();
            let digest = hash_contents(path, st.size)?;
            self.stat.note_hashed();
            let after = FileStat::read(path)?;
            if after == st {
                let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
                self.stat.insert(&abs, &st, digest, started);
                return Ok(digest);
            }
            st = after;
        }
        Err(CacheError::ChangedWhileHashing { path: path.to_owned() })
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
            let digest = self.hash_with_stat(path, st)?;
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
                    digest: self.hash_with_stat(&f.abs, f.stat)?,
                    size: f.stat.size,
                    executable: f.stat.executable(),
                })
            })
            .collect::<Result<Vec<_>, CacheError>>()?;
        Ok(Manifest::from_entries(entries))
    }

    /// A fresh, empty directory under `<root>/tmp/` for a stage's outputs.
    pub fn staging_dir(&self, label: &str) -> Result<Staging, CacheError> {
        let clean: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(64)
            .collect();
        let tmp = self.root.join("tmp");
        let dir = tempfile::Builder::new()
            .prefix(&format!("stage-{clean}-"))
            .tempdir_in(&tmp)
            .ctx("create staging directory in", &tmp)?;
        Ok(Staging { dir })
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

    /// Moves a damaged file to `quarantine/` so it is kept for inspection but
    /// never served again.
    pub(crate) fn quarantine(&self, path: &Path) -> Result<PathBuf, CacheError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "unnamed".into());
        let parent =
            path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dest = self.root.join("quarantine").join(format!("{parent}{name}.{}", now_unix_ms()));
        std::fs::rename(path, &dest).ctx("quarantine", path)?;
        tracing::warn!("quarantined {} -> {}", path.display(), dest.display());
        Ok(dest)
    }

    /// Checks a blob against its expected digest: via the stat cache when its
    /// stat is unchanged, else by rehashing.
    pub(crate) fn check_blob(&self, entry: &FileEntry) -> Result<BlobState, CacheError> {
        let path = self.blob_path(&entry.digest, entry.executable);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BlobState::Missing),
            Err(e) => return Err(e).ctx("stat", path),
        };
        if !meta.is_file() || meta.size() != entry.size {
            return Ok(BlobState::Corrupt(path));
        }
        let digest = self.hash_with_stat(&path, FileStat::of(&meta))?;
        Ok(if digest == entry.digest { BlobState::Ok } else { BlobState::Corrupt(path) })
    }

    fn read_record(&self, key: &Digest) -> Result<Option<ActionRecord>, CacheError> {
        let path = self.record_path(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("read", path),
        };
        let record: ActionRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("corrupt action record {}: {e}", path.display());
                self.quarantine(&path)?;
                return Ok(None);
            }
        };
        if record.key != *key {
            tracing::warn!("action record {} names key {}", path.display(), record.key);
            self.quarantine(&path)?;
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// The record for `key` if it and all its blobs are present and intact;
    /// the artifact view is rebuilt if it is missing or damaged. A record
    /// with missing or corrupt blobs is removed (corrupt blobs quarantined)
    /// and `None` returned, so the stage simply runs again.
    pub fn lookup(&self, key: &Digest) -> Result<Option<ActionRecord>, CacheError> {
        let Some(record) = self.read_record(key)? else {
            return Ok(None);
        };
        let states = record.manifest.files.par_iter().map(|f| self.check_blob(f)).collect::<Result<Vec<_>, _>>()?;
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
                    self.quarantine(&path)?;
                    usable = false;
                }
            }
        }
        if !usable {
            self.remove_record(key)?;
            return Ok(None);
        }
        if !self.view_is_intact(key, &record.manifest)? {
            tracing::info!("{}: rebuilding artifact view", key.short());
            self.build_view(key, &record.manifest)?;
        }
        // Last use, for gc's LRU eviction. Best effort: a read-only cache
        // still serves hits.
        let touched =
            OpenOptions::new().write(true).open(self.record_path(key)).and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::debug!("could not mark {} as used: {e}", key.short());
        }
        Ok(Some(record))
    }

    /// Whether `artifacts/<key>/` holds exactly the manifest's files, each a
    /// hard link to its blob.
    fn view_is_intact(&self, key: &Digest, manifest: &Manifest) -> Result<bool, CacheError> {
        let view = self.artifact_dir(key);
        if !view.is_dir() {
            return Ok(false);
        }
        for f in &manifest.files {
            let (Ok(v), Ok(b)) = (
                std::fs::symlink_metadata(view.join(&f.path)),
                std::fs::symlink_metadata(self.blob_path(&f.digest, f.executable)),
            ) else {
                return Ok(false);
            };
            if v.dev() != b.dev() || v.ino() != b.ino() {
                return Ok(false);
            }
        }
        // Nothing extra (a stage reading the view must see exactly its inputs).
        match list_tree(&view, false) {
            Ok(files) => Ok(files.len() == manifest.files.len()),
            Err(_) => Ok(false),
        }
    }

    /// Builds the view in `tmp/` and renames it into place, replacing a
    /// damaged one; an intact view built concurrently by another process wins.
    fn build_view(&self, key: &Digest, manifest: &Manifest) -> Result<(), CacheError> {
        let tmp_root = self.root.join("tmp");
        let tmp = tempfile::Builder::new()
            .prefix(&format!("view-{}-", key.short()))
            .tempdir_in(&tmp_root)
            .ctx("create temp view in", &tmp_root)?;
        let mut dirs = BTreeSet::new();
        dirs.insert(tmp.path().to_owned());
        for f in &manifest.files {
            validate_rel_path(&f.path, &self.record_path(key))?;
            let dest = tmp.path().join(&f.path);
            if let Some(parent) = dest.parent()
                && dirs.insert(parent.to_owned())
            {
                std::fs::create_dir_all(parent).ctx("create directory", parent)?;
            }
            let blob = self.blob_path(&f.digest, f.executable);
            std::fs::hard_link(&blob, &dest).ctx("link blob into view", &dest)?;
        }
        for d in &dirs {
            fsync_dir(d)?;
        }
        let target = self.artifact_dir(key);
        let built = tmp.keep();
        let result = self.install_view(key, manifest, &built, &target);
        if built.exists() {
            let _ = std::fs::remove_dir_all(&built);
        }
        result?;
        fsync_dir(&self.root.join("artifacts"))
    }

    fn install_view(&self, key: &Digest, manifest: &Manifest, built: &Path, target: &Path) -> Result<(), CacheError> {
        for _ in 0..3 {
            match std::fs::rename(built, target) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.kind(), ErrorKind::DirectoryNotEmpty | ErrorKind::AlreadyExists) => {
                    if self.view_is_intact(key, manifest)? {
                        return Ok(());
                    }
                    // Damaged view: move it aside (atomic), then retry.
                    let aside = self.root.join("tmp").join(format!("old-view-{}-{}", key.short(), now_unix_ms()));
                    match std::fs::rename(target, &aside) {
                        Ok(()) => {
                            let _ = std::fs::remove_dir_all(&aside);
                        }
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(e).ctx("move damaged view", target),
                    }
                }
                Err(e) => return Err(e).ctx("install view", target),
            }
        }
        Err(CacheError::Invalid {
            path: target.to_owned(),
            reason: "artifact view kept changing while being replaced".into(),
        })
    }

    /// Moves the staged outputs into the blob store (deduplicated), builds
    /// the read-only view and writes the action record last. Files and
    /// directories are fsynced before the record is renamed into place, so a
    /// crash at any point leaves either no record or a complete one.
    /// Symlinks, special files and non-UTF-8 names in the staging dir are
    /// errors; empty directories are dropped.
    pub fn publish(&self, key: &Digest, staging: Staging, meta: serde_json::Value) -> Result<ActionRecord, CacheError> {
        let files = list_tree(staging.path(), false)?;
        let entries = files.par_iter().map(|f| self.store_blob(f)).collect::<Result<Vec<_>, CacheError>>()?;
        let blob_dirs: BTreeSet<PathBuf> = entries
            .iter()
            .filter_map(|e| self.blob_path(&e.digest, e.executable).parent().map(Path::to_owned))
            .collect();
        for d in &blob_dirs {
            fsync_dir(d)?;
        }
        fsync_dir(&self.root.join("blobs"))?;
        let manifest = Manifest::from_entries(entries);
        self.build_view(key, &manifest)?;

        let record = ActionRecord { key: *key, created_unix_ms: now_unix_ms(), manifest, meta };
        self.write_record(&record)?;
        drop(staging);
        tracing::debug!(
            "published {} ({} files, {} bytes)",
            key.short(),
            record.manifest.files.len(),
            record.manifest.total_size()
        );
        Ok(record)
    }

    /// Hashes one staged file and links it into the blob store unless an
    /// intact blob with the same contents is already there.
    fn store_blob(&self, f: &TreeFile) -> Result<FileEntry, CacheError> {
        // Fresh outputs: no point asking the stat cache.
        let digest = hash_contents(&f.abs, f.stat.size)?;
        self.stat.note_hashed();
        if FileStat::read(&f.abs)? != f.stat {
            return Err(CacheError::ChangedWhileHashing { path: f.abs.clone() });
        }
        let entry = FileEntry { path: f.rel.clone(), digest, size: f.stat.size, executable: f.stat.executable() };
        let blob = self.blob_path(&digest, entry.executable);
        let mode = if entry.executable { 0o555 } else { 0o444 };
        for _ in 0..2 {
            match self.check_blob(&entry)? {
                BlobState::Ok => return Ok(entry), // dedup
                BlobState::Corrupt(p) => {
                    self.quarantine(&p)?;
                }
                BlobState::Missing => {}
            }
            std::fs::set_permissions(&f.abs, Permissions::from_mode(mode)).ctx("chmod", &f.abs)?;
            File::open(&f.abs).and_then(|file| file.sync_all()).ctx("fsync", &f.abs)?;
            if let Some(parent) = blob.parent() {
                std::fs::create_dir_all(parent).ctx("create directory", parent)?;
            }
            // link, not rename: it never replaces an existing blob (whose
            // inode existing views share); the staging name goes with the
            // staging dir.
            match std::fs::hard_link(&f.abs, &blob) {
                Ok(()) => return Ok(entry),
                // Another publisher stored it first; check theirs next round.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).ctx("link into blob store", &blob),
            }
        }
        match self.check_blob(&entry)? {
            BlobState::Ok => Ok(entry),
            _ => Err(CacheError::Invalid { path: blob, reason: "blob kept being replaced by a damaged copy".into() }),
        }
    }

    fn write_record(&self, record: &ActionRecord) -> Result<(), CacheError> {
        let dir = self.root.join("records");
        let path = self.record_path(&record.key);
        let mut tmp =
            tempfile::Builder::new().prefix(".record-").tempfile_in(&dir).ctx("create temp record in", &dir)?;
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
        fsync_dir(&dir)
    }

    /// All readable action records (unreadable ones are logged and skipped).
    pub fn records(&self) -> Result<Vec<ActionRecord>, CacheError> {
        Ok(self.records_with_mtime()?.into_iter().map(|(r, _)| r).collect())
    }

    /// Records with their last-use time (record mtime).
    pub(crate) fn records_with_mtime(&self) -> Result<Vec<(ActionRecord, SystemTime)>, CacheError> {
        let dir = self.root.join("records");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).ctx("list", &dir)? {
            let entry = entry.ctx("list", &dir)?;
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

    /// Forgets `key`: removes its record, then its view. Blobs stay until gc.
    pub fn remove_record(&self, key: &Digest) -> Result<(), CacheError> {
        let path = self.record_path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&self.root.join("records"))?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx("remove", path),
        }
        let view = self.artifact_dir(key);
        match std::fs::remove_dir_all(&view) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove", view),
        }
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

pub(crate) enum BlobState {
    Ok,
    Missing,
    Corrupt(PathBuf),
}

/// Manifest paths come from records on disk: refuse anything that could
/// escape the view directory.
fn validate_rel_path(rel: &str, record: &Path) -> Result<(), CacheError> {
    let ok = !rel.is_empty() && !rel.starts_with('/') && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(CacheError::Invalid {
            path: record.to_owned(),
            reason: format!("manifest path {rel:?} is not a relative '/'-separated path"),
        })
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
pub(crate) mod tests;
