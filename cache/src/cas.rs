//! The content-addressed store (CAS): file contents by blake3 digest at
//! `blobs/<aa>/<62 hex>[.x]` (".x": an executable copy, because hard links
//! share one mode). It knows nothing of keys or records: as in Bazel's
//! remote-execution API, an action record only names blobs by digest.
//! Blobs are read-only, deduplicated, never replaced in place (views share
//! their inodes), and checked against their digest before they are served.

use std::collections::BTreeSet;
use std::fs::{File, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::digest::Digest;
use crate::error::{CacheError, IoContext};
use crate::files::{TreeFile, ctime_of, fsync_dir};
use crate::hashing::{FileStat, hash_contents};
use crate::manifest::FileEntry;
use crate::quarantine::Quarantine;
use crate::stat_cache::StatCache;

/// What the store holds for a manifest entry.
pub(crate) enum BlobState {
    Ok,
    Missing,
    Corrupt(PathBuf),
}

/// A blob file on disk.
pub(crate) struct BlobFile {
    pub path: PathBuf,
    /// `None` when the name is not a digest (stray file).
    pub digest: Option<Digest>,
    pub size: u64,
    pub ctime: SystemTime,
}

pub(crate) struct Cas {
    dir: PathBuf,
    quarantine: Quarantine,
}

impl Cas {
    pub fn new(dir: PathBuf, quarantine: Quarantine) -> Self {
        Self { dir, quarantine }
    }

    pub fn blob_path(&self, digest: &Digest, executable: bool) -> PathBuf {
        let hex = digest.hex();
        let name = if executable { format!("{}.x", &hex[2..]) } else { hex[2..].to_owned() };
        self.dir.join(&hex[..2]).join(name)
    }

    /// Moves a damaged blob to the quarantine.
    pub fn quarantine(&self, path: &Path) -> Result<PathBuf, CacheError> {
        self.quarantine.keep(path)
    }

    /// Checks a blob against its expected digest: via the stat cache when its
    /// stat is unchanged, else by rehashing.
    pub fn check(&self, entry: &FileEntry, stat: &StatCache) -> Result<BlobState, CacheError> {
        let path = self.blob_path(&entry.digest, entry.executable);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BlobState::Missing),
            Err(e) => return Err(e).ctx("stat", path),
        };
        if !meta.is_file() || meta.size() != entry.size {
            return Ok(BlobState::Corrupt(path));
        }
        let digest = stat.digest(&path, FileStat::of(&meta))?;
        Ok(if digest == entry.digest { BlobState::Ok } else { BlobState::Corrupt(path) })
    }

    /// Hashes one staged file and links it into the store unless an intact
    /// blob with the same contents is already there.
    pub fn store(&self, f: &TreeFile, stat: &StatCache) -> Result<FileEntry, CacheError> {
        // Fresh outputs: no point asking the stat cache.
        let digest = hash_contents(&f.abs, f.stat.size)?;
        stat.note_hashed();
        if FileStat::read(&f.abs)? != f.stat {
            return Err(CacheError::ChangedWhileHashing { path: f.abs.clone() });
        }
        let entry = FileEntry { path: f.rel.clone(), digest, size: f.stat.size, executable: f.stat.executable() };
        let blob = self.blob_path(&digest, entry.executable);
        let mode = if entry.executable { 0o555 } else { 0o444 };
        for _ in 0..2 {
            match self.check(&entry, stat)? {
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
        match self.check(&entry, stat)? {
            BlobState::Ok => Ok(entry),
            _ => Err(CacheError::Invalid { path: blob, reason: "blob kept being replaced by a damaged copy".into() }),
        }
    }

    /// Makes the links [`store`](Self::store) created for `entries` durable.
    pub fn sync(&self, entries: &[FileEntry]) -> Result<(), CacheError> {
        let shards: BTreeSet<PathBuf> = entries
            .iter()
            .filter_map(|e| self.blob_path(&e.digest, e.executable).parent().map(Path::to_owned))
            .collect();
        for d in &shards {
            fsync_dir(d)?;
        }
        fsync_dir(&self.dir)
    }

    /// Every blob file, sorted by path.
    pub fn list(&self) -> Result<Vec<BlobFile>, CacheError> {
        let root = &self.dir;
        let mut out = Vec::new();
        for shard in std::fs::read_dir(root).ctx("list", root)? {
            let shard = shard.ctx("list", root)?;
            let shard_name = shard.file_name().to_string_lossy().into_owned();
            let shard_path = shard.path();
            if !shard_path.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&shard_path).ctx("list", &shard_path)? {
                let f = f.ctx("list", &shard_path)?;
                let Ok(meta) = f.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let name = f.file_name().to_string_lossy().into_owned();
                let hex = format!("{shard_name}{}", name.strip_suffix(".x").unwrap_or(&name));
                out.push(BlobFile {
                    path: f.path(),
                    digest: hex.parse().ok(),
                    size: meta.len(),
                    ctime: ctime_of(&meta),
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::list_tree;
    use std::time::Duration;

    /// A store in `dir/blobs` and the stat cache it checks blobs with.
    fn store(dir: &Path) -> (Cas, StatCache) {
        for sub in ["blobs", "quarantine", "stat"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let cas = Cas::new(dir.join("blobs"), Quarantine::new(dir.join("quarantine")));
        (cas, StatCache::open(&dir.join("stat"), Duration::ZERO).unwrap())
    }

    /// Stores the files of a fresh staging dir holding `files`.
    fn stage(cas: &Cas, stat: &StatCache, dir: &Path, files: &[(&str, &[u8])]) -> Vec<FileEntry> {
        let staging = tempfile::tempdir_in(dir).unwrap();
        for (rel, bytes) in files {
            std::fs::write(staging.path().join(rel), bytes).unwrap();
        }
        let staged = list_tree(staging.path(), false).unwrap();
        let entries: Vec<FileEntry> = staged.iter().map(|f| cas.store(f, stat).unwrap()).collect();
        cas.sync(&entries).unwrap();
        entries
    }

    #[test]
    fn blobs_are_stored_once_per_content_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (cas, stat) = store(dir.path());
        let first = stage(&cas, &stat, dir.path(), &[("a", b"same"), ("b", b"same"), ("c", b"other")]);
        let again = stage(&cas, &stat, dir.path(), &[("x", b"same")]);
        assert_eq!(first[0].digest, again[0].digest);
        assert_eq!(cas.list().unwrap().len(), 2, "one blob per content");
        let blob = cas.blob_path(&again[0].digest, false);
        assert_eq!(std::fs::read(&blob).unwrap(), b"same");
        assert_eq!(std::fs::metadata(&blob).unwrap().permissions().mode() & 0o777, 0o444);
        assert!(matches!(cas.check(&again[0], &stat).unwrap(), BlobState::Ok));
    }

    #[test]
    fn a_damaged_blob_is_reported_and_replaced_by_the_next_store() {
        let dir = tempfile::tempdir().unwrap();
        let (cas, stat) = store(dir.path());
        let entry = stage(&cas, &stat, dir.path(), &[("a", b"good bytes")]).remove(0);
        let blob = cas.blob_path(&entry.digest, false);
        std::fs::set_permissions(&blob, Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&blob, b"BAD! bytes").unwrap(); // same size: only the digest tells
        assert!(matches!(cas.check(&entry, &stat).unwrap(), BlobState::Corrupt(p) if p == blob));
        stage(&cas, &stat, dir.path(), &[("a", b"good bytes")]);
        assert_eq!(std::fs::read(&blob).unwrap(), b"good bytes");
        assert_eq!(std::fs::read_dir(dir.path().join("quarantine")).unwrap().count(), 1);
        std::fs::remove_file(&blob).unwrap();
        assert!(matches!(cas.check(&entry, &stat).unwrap(), BlobState::Missing));
    }
}
