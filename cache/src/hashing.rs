//! Hashing file contents: plain reads for small files, mmap + multithreaded
//! blake3 for big ones.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::digest::Digest;
use crate::error::{CacheError, IoContext};

/// Files at least this big are mmapped and hashed with rayon: below it the
/// thread fan-out costs more than it saves (blake3 docs suggest ~128 KiB-1 MiB).
pub const MMAP_THRESHOLD: u64 = 1 << 20;

/// The stat fields that identify one version of a file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub mode: u32,
}

impl FileStat {
    pub fn of(meta: &Metadata) -> FileStat {
        FileStat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
            ctime_ns: meta.ctime().saturating_mul(1_000_000_000) + meta.ctime_nsec(),
            mode: meta.mode(),
        }
    }

    pub fn read(path: &Path) -> Result<FileStat, CacheError> {
        std::fs::metadata(path).ctx("stat", path).map(|m| FileStat::of(&m))
    }

    pub fn executable(&self) -> bool {
        self.mode & 0o111 != 0
    }
}

/// Hashes the bytes of `path` (whose size is `size`) with no caching.
pub(crate) fn hash_contents(path: &Path, size: u64) -> Result<Digest, CacheError> {
    let mut hasher = blake3::Hasher::new();
    if size >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path).ctx("hash (mmap)", path)?;
    } else {
        let mut file = File::open(path).ctx("open", path)?;
        let mut buf = Vec::with_capacity(size as usize);
        file.read_to_end(&mut buf).ctx("read", path)?;
        hasher.update(&buf);
    }
    Ok(hasher.finalize().into())
}
