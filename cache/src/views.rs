//! What stages see of the cache, all by key or label under the root:
//! * `artifacts/<key>/`: a read-only view of a published record, hard links
//!   into the CAS (so a view costs no bytes and is rebuilt when damaged);
//! * `tmp/`: staging directories a stage writes its outputs into (publishing
//!   consumes them, dropping one removes it) and half-built views;
//! * `resume/<key>/`: a stage's own restart state (e.g. training
//!   checkpoints), kept across failed attempts, removed once the key is
//!   published.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::cas::Cas;
use crate::digest::Digest;
use crate::error::{CacheError, IoContext};
use crate::files::{fsync_dir, list_tree, now_unix_ms};
use crate::manifest::Manifest;

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

pub(crate) struct Views {
    /// `artifacts/`
    artifacts: PathBuf,
    /// `tmp/`
    tmp: PathBuf,
    /// `resume/`
    resume: PathBuf,
}

impl Views {
    pub fn new(root: &Path) -> Self {
        Self { artifacts: root.join("artifacts"), tmp: root.join("tmp"), resume: root.join("resume") }
    }

    pub fn artifacts(&self) -> &Path {
        &self.artifacts
    }

    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    pub fn resume(&self) -> &Path {
        &self.resume
    }

    /// Where downstream stages read a key's outputs.
    pub fn artifact_dir(&self, key: &Digest) -> PathBuf {
        self.artifacts.join(key.hex())
    }

    /// Whether `artifacts/<key>/` holds exactly the manifest's files, each a
    /// hard link to its blob.
    pub fn is_intact(&self, key: &Digest, manifest: &Manifest, cas: &Cas) -> Result<bool, CacheError> {
        let view = self.artifact_dir(key);
        if !view.is_dir() {
            return Ok(false);
        }
        for f in &manifest.files {
            let (Ok(v), Ok(b)) = (
                std::fs::symlink_metadata(view.join(&f.path)),
                std::fs::symlink_metadata(cas.blob_path(&f.digest, f.executable)),
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
    /// damaged one; an intact view built concurrently by another process
    /// wins. `record` names the manifest's origin in errors.
    pub fn build(&self, key: &Digest, manifest: &Manifest, cas: &Cas, record: &Path) -> Result<(), CacheError> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("view-{}-", key.short()))
            .tempdir_in(&self.tmp)
            .ctx("create temp view in", &self.tmp)?;
        let mut dirs = BTreeSet::new();
        dirs.insert(tmp.path().to_owned());
        for f in &manifest.files {
            validate_rel_path(&f.path, record)?;
            let dest = tmp.path().join(&f.path);
            if let Some(parent) = dest.parent()
                && dirs.insert(parent.to_owned())
            {
                std::fs::create_dir_all(parent).ctx("create directory", parent)?;
            }
            let blob = cas.blob_path(&f.digest, f.executable);
            std::fs::hard_link(&blob, &dest).ctx("link blob into view", &dest)?;
        }
        for d in &dirs {
            fsync_dir(d)?;
        }
        let target = self.artifact_dir(key);
        let built = tmp.keep();
        let result = self.install(key, manifest, cas, &built, &target);
        if built.exists() {
            let _ = std::fs::remove_dir_all(&built);
        }
        result?;
        fsync_dir(&self.artifacts)
    }

    fn install(
        &self,
        key: &Digest,
        manifest: &Manifest,
        cas: &Cas,
        built: &Path,
        target: &Path,
    ) -> Result<(), CacheError> {
        for _ in 0..3 {
            match std::fs::rename(built, target) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.kind(), ErrorKind::DirectoryNotEmpty | ErrorKind::AlreadyExists) => {
                    if self.is_intact(key, manifest, cas)? {
                        return Ok(());
                    }
                    // Damaged view: move it aside (atomic), then retry.
                    let aside = self.tmp.join(format!("old-view-{}-{}", key.short(), now_unix_ms()));
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

    /// Removes the view of `key` (absent is fine).
    pub fn remove(&self, key: &Digest) -> Result<(), CacheError> {
        let view = self.artifact_dir(key);
        match std::fs::remove_dir_all(&view) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove", view),
        }
    }

    /// A fresh, empty directory under `tmp/` for a stage's outputs.
    pub fn staging_dir(&self, label: &str) -> Result<Staging, CacheError> {
        let clean: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(64)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("stage-{clean}-"))
            .tempdir_in(&self.tmp)
            .ctx("create staging directory in", &self.tmp)?;
        Ok(Staging { dir })
    }

    /// Where a stage producing `key` keeps state that must survive a failed
    /// or killed attempt (created on demand by the stage).
    pub fn resume_dir(&self, key: &Digest) -> PathBuf {
        self.resume.join(key.hex())
    }

    /// Forget the restart state of `key`.
    pub fn remove_resume_dir(&self, key: &Digest) -> Result<(), CacheError> {
        let dir = self.resume_dir(key);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).ctx("remove", &dir),
            _ => Ok(()),
        }
    }
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
mod tests {
    use super::*;
    use crate::manifest::FileEntry;
    use crate::quarantine::Quarantine;

    fn views(dir: &Path) -> Views {
        for sub in ["artifacts", "tmp", "resume"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Views::new(dir)
    }

    #[test]
    fn staging_labels_are_sanitised() {
        let dir = tempfile::tempdir().unwrap();
        let v = views(dir.path());
        let s = v.staging_dir("../../etc/grpo sweep[1]").unwrap();
        assert_eq!(s.path().parent().unwrap(), dir.path().join("tmp"));
        let name = s.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("stage-______etc_grpo_sweep_1_-"), "{name}");
    }

    #[test]
    fn a_manifest_path_leaving_the_view_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = views(dir.path());
        let cas = Cas::new(dir.path().join("blobs"), Quarantine::new(dir.path().join("quarantine")));
        for bad in ["../escape", "/abs", "a//b", "a/./b", ""] {
            let entry = FileEntry { path: bad.into(), digest: Digest::of_bytes(b"x"), size: 1, executable: false };
            let manifest = Manifest { files: vec![entry] };
            let err = v.build(&Digest::of_bytes(b"k"), &manifest, &cas, Path::new("rec.json")).unwrap_err();
            assert!(err.to_string().contains("rec.json") && err.to_string().contains("relative"), "{bad}: {err}");
        }
        assert_eq!(std::fs::read_dir(dir.path().join("artifacts")).unwrap().count(), 0);
    }

    #[test]
    fn resume_dirs_are_per_key_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let v = views(dir.path());
        let (a, b) = (Digest::of_bytes(b"a"), Digest::of_bytes(b"b"));
        std::fs::create_dir_all(v.resume_dir(&a).join("ckpt")).unwrap();
        assert_ne!(v.resume_dir(&a), v.resume_dir(&b));
        v.remove_resume_dir(&a).unwrap();
        v.remove_resume_dir(&a).unwrap();
        assert!(!v.resume_dir(&a).exists());
    }
}
