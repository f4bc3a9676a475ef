//! Content-addressed cache: blake3 blobs, action records, read-only views,
//! a stat cache, per-key locks, gc and verify.
//!
//! A stage run is identified by a key ([`KeyHasher`]). The engine locks the
//! key, calls [`Cache::lookup`]; on a miss it runs the stage into a
//! [`Staging`] directory and [`Cache::publish`]es it. Downstream stages read
//! [`Cache::artifact_dir`], a read-only view of hard links into the blob store.
//!
//! [`Cache`] is a facade over three stores that know nothing of each other
//! (the split of Bazel's remote-execution API): `cas` (file contents by
//! digest), `action_cache` (key -> record naming blobs by digest) and
//! `views` (artifact views, staging and resume directories). The rest:
//! `stat_cache` (no rehash of unchanged files), `lock` (per-key locks
//! across processes and hosts), `maintenance` (gc, verify, size),
//! `digest`/`manifest`/`hashing` (the data), `files`/`quarantine`/`error`.

mod action_cache;
mod cache;
mod cas;
mod digest;
mod error;
mod files;
mod hashing;
mod lock;
mod maintenance;
mod manifest;
mod quarantine;
mod stat_cache;
mod views;

pub use cache::{Cache, CacheOptions};
pub use digest::{Digest, DigestParseError, KeyHasher};
pub use error::CacheError;
pub use hashing::MMAP_THRESHOLD;
pub use lock::{KeyLock, LockInfo};
pub use maintenance::{CacheSize, CorruptBlob, GcOptions, GcReport, VerifyReport};
pub use manifest::{ActionRecord, FileEntry, Manifest};
pub use stat_cache::StatCounters;
pub use views::Staging;
