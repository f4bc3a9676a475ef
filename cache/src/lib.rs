//! Content-addressed cache: blake3 blob store, action records, stat cache,
//! per-key locks, gc and verify.
//!
//! A stage run is identified by a key ([`KeyHasher`]). The engine locks the
//! key, calls [`Cache::lookup`]; on a miss it runs the stage into a
//! [`Staging`] directory and [`Cache::publish`]es it. Downstream stages read
//! [`Cache::artifact_dir`], a read-only view of hard links into the blob store.

mod digest;
mod error;
mod hashing;
mod lock;
mod maintenance;
mod manifest;
mod stat_cache;
mod cache;

pub use digest::{Digest, DigestParseError, KeyHasher};
pub use error::CacheError;
pub use hashing::MMAP_THRESHOLD;
pub use lock::{KeyLock, LockInfo};
pub use maintenance::{CacheSize, CorruptBlob, GcOptions, GcReport, VerifyReport};
pub use manifest::{ActionRecord, FileEntry, Manifest};
pub use stat_cache::StatCounters;
pub use cache::{Cache, CacheOptions, Staging};
