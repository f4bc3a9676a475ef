//! Content-addressed cache: blake3 blob store, action records, stat cache,
//! per-key locks, gc and verify.
