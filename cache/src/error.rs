//! The cache's error type: every variant names the path involved.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: file name is not valid UTF-8 (manifest paths must be UTF-8)")]
    NonUtf8Path { path: PathBuf },
    #[error("{path}: {kind} is not supported here (expected a regular file or directory)")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },
    #[error("{path}: symlinks are not allowed in stage outputs (write a real file instead)")]
    SymlinkInOutput { path: PathBuf },
    #[error("{path}: walking the tree failed: {source}")]
    Walk {
        path: PathBuf,
        #[source]
        source: walkdir::Error,
    },
    #[error("{path}: file changed while it was being hashed")]
    ChangedWhileHashing { path: PathBuf },
    #[error("{path}: invalid JSON ({what}): {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: action record is for key {found}, expected {expected}")]
    RecordKeyMismatch { path: PathBuf, expected: String, found: String },
    #[error("{path}: timed out after {waited:?} waiting for the lock held by {holder}")]
    LockTimeout { path: PathBuf, holder: String, waited: Duration },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// `io::Result` -> `CacheError::Io` naming the operation and the path.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, CacheError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, CacheError> {
        self.map_err(|source| CacheError::Io { op, path: path.into(), source })
    }
}
