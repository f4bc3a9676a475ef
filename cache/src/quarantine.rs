//! `quarantine/`: damaged files (corrupt blobs, torn action records) are
//! moved here, kept for inspection but never served again.

use std::path::{Path, PathBuf};

use crate::error::{CacheError, IoContext};
use crate::files::now_unix_ms;

#[derive(Debug, Clone)]
pub(crate) struct Quarantine {
    dir: PathBuf,
}

impl Quarantine {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Moves `path` aside; returns where it went.
    pub fn keep(&self, path: &Path) -> Result<PathBuf, CacheError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "unnamed".into());
        let parent =
            path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dest = self.dir.join(format!("{parent}{name}.{}", now_unix_ms()));
        std::fs::rename(path, &dest).ctx("quarantine", path)?;
        tracing::warn!("quarantined {} -> {}", path.display(), dest.display());
        Ok(dest)
    }
}
