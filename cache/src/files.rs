//! File-system helpers the stores share: the regular files of a tree
//! (sorted, with a symlink policy), directory fsync (a rename is durable
//! only once its directory is synced), timestamps.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{CacheError, IoContext};
use crate::hashing::FileStat;

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The inode change time: when a blob or view came into being (hard links
/// and renames keep the mtime of the staged file).
pub(crate) fn ctime_of(meta: &std::fs::Metadata) -> SystemTime {
    let secs = meta.ctime().max(0) as u64;
    SystemTime::UNIX_EPOCH + Duration::new(secs, meta.ctime_nsec().clamp(0, 999_999_999) as u32)
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

/// Total size of the regular files under `dir` (0 if it does not exist).
pub(crate) fn tree_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Removes a file or a directory tree; already gone is fine.
pub(crate) fn remove_any(path: &Path) -> Result<(), CacheError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx("remove", path),
        _ => Ok(()),
    }
}
