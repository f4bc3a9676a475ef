//! Tests of publish/lookup/hashing against real files in a temp dir.

use std::fs::Permissions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use super::*;
use crate::MMAP_THRESHOLD;

/// Options for tests: no racy window, so files written a moment ago are
/// stat-cached (the racy rule itself is tested separately).
pub(crate) fn fast_options() -> CacheOptions {
    CacheOptions { racy_window: Duration::ZERO, gc_grace: Duration::ZERO, ..CacheOptions::default() }
}

pub(crate) fn open_cache(dir: &Path) -> Cache {
    Cache::open_with(&dir.join("cache"), fast_options()).unwrap()
}

pub(crate) fn key(name: &str) -> Digest {
    crate::KeyHasher::new(1).field("name", name.as_bytes()).finish()
}

/// Publishes `files` (path, contents, executable) under `key`.
pub(crate) fn publish_files(cache: &Cache, key: &Digest, files: &[(&str, &[u8], bool)]) -> ActionRecord {
    let staging = cache.staging_dir("test").unwrap();
    for (rel, contents, exec) in files {
        let p = staging.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        if *exec {
            std::fs::set_permissions(&p, Permissions::from_mode(0o755)).unwrap();
        }
    }
    cache.publish(key, staging, serde_json::json!({"stage": "test"})).unwrap()
}

pub(crate) fn count_blobs(cache: &Cache) -> usize {
    walkdir::WalkDir::new(cache.root().join("blobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count()
}

fn count_files(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir).into_iter().filter_map(Result::ok).filter(|e| e.file_type().is_file()).count()
}

#[test]
fn cache_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cache>();
    assert_send_sync::<KeyLock>();
}

#[test]
fn open_creates_layout_and_rejects_other_layout_versions() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    for sub in ["blobs", "records", "artifacts", "locks", "stat", "tmp", "quarantine"] {
        assert!(cache.root().join(sub).is_dir(), "{sub}");
    }
    drop(cache);
    std::fs::write(dir.path().join("cache/VERSION"), "99\n").unwrap();
    let err = Cache::open(&dir.path().join("cache")).err().unwrap();
    assert!(err.to_string().contains("VERSION"), "{err}");
}

#[test]
fn publish_then_lookup_serves_identical_read_only_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let k = key("a");
    let files: &[(&str, &[u8], bool)] = &[
        ("data/train.jsonl", b"{\"q\":1}\n", false),
        ("data/test.jsonl", b"{\"q\":2}\n", false),
        ("run.sh", b"#!/bin/sh\n", true),
        ("empty", b"", false),
    ];
    let published = publish_files(&cache, &k, files);
    assert_eq!(published.manifest.files.len(), 4);
    assert_eq!(published.meta["stage"], "test");

    let found = cache.lookup(&k).unwrap().expect("hit");
    assert_eq!(found, published);
    let view = cache.artifact_dir(&k);
    for (rel, contents, exec) in files {
        let p = view.join(rel);
        assert_eq!(std::fs::read(&p).unwrap(), *contents, "{rel}");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, if *exec { 0o555 } else { 0o444 }, "{rel}");
        let entry = found.manifest.get(rel).unwrap();
        assert_eq!(entry.digest, Digest::of_bytes(contents));
        assert_eq!(entry.executable, *exec);
    }
    // The manifest of the view equals the record's manifest.
    assert_eq!(cache.hash_path(&view).unwrap(), found.manifest);
    // Staging is gone; nothing left behind in tmp/.
    assert_eq!(std::fs::read_dir(cache.root().join("tmp")).unwrap().count(), 0);
    assert!(cache.lookup(&key("other")).unwrap().is_none());
}

#[test]
fn empty_outputs_publish_and_hit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let staging = cache.staging_dir("empty").unwrap();
    std::fs::create_dir_all(staging.path().join("only/dirs")).unwrap();
    let rec = cache.publish(&key("e"), staging, serde_json::Value::Null).unwrap();
    assert!(rec.manifest.files.is_empty());
    assert_eq!(cache.lookup(&key("e")).unwrap(), Some(rec));
    assert!(cache.artifact_dir(&key("e")).is_dir());
}

#[test]
fn republishing_identical_outputs_adds_no_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let files: &[(&str, &[u8], bool)] = &[("a", b"same", false), ("b/c", b"same", false), ("d", b"other", false)];
    publish_files(&cache, &key("1"), files);
    assert_eq!(count_blobs(&cache), 2);
    publish_files(&cache, &key("2"), files);
    publish_files(&cache, &key("1"), files);
    assert_eq!(count_blobs(&cache), 2);
    // Same bytes but executable: a separate blob (hard links share the mode).
    publish_files(&cache, &key("3"), &[("a", b"same", true)]);
    assert_eq!(count_blobs(&cache), 3);
    for k in ["1", "2", "3"] {
        assert!(cache.lookup(&key(k)).unwrap().is_some(), "{k}");
    }
    let a1 = std::fs::metadata(cache.artifact_dir(&key("1")).join("a")).unwrap();
    let a2 = std::fs::metadata(cache.artifact_dir(&key("2")).join("b/c")).unwrap();
    assert_eq!(a1.ino(), a2.ino(), "views share the blob inode");
}

#[test]
fn corrupt_blob_is_quarantined_and_lookup_misses() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let k = key("c");
    let rec = publish_files(&cache, &k, &[("x.bin", b"original bytes", false), ("y", b"fine", false)]);
    // Prime the stat cache so the check below must notice the stat change.
    assert!(cache.lookup(&k).unwrap().is_some());
    let before = cache.stat_counters();
    assert!(cache.lookup(&k).unwrap().is_some());
    assert_eq!(cache.stat_counters().hashed, before.hashed, "warm lookup must not rehash");

    // The view file is a hard link to the blob: writing it corrupts the blob.
    let victim = cache.artifact_dir(&k).join("x.bin");
    std::fs::set_permissions(&victim, Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&victim, b"ORIGINAL BYTES").unwrap(); // same size
    let blob = cache.cas.blob_path(&rec.manifest.get("x.bin").unwrap().digest, false);

    assert!(cache.lookup(&k).unwrap().is_none());
    assert!(!blob.exists(), "corrupt blob removed from the store");
    assert!(!cache.actions.path(&k).exists(), "record dropped");
    assert!(!cache.artifact_dir(&k).exists(), "view dropped");
    let quarantined: Vec<_> =
        std::fs::read_dir(cache.root().join("quarantine")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(std::fs::read(&quarantined[0]).unwrap(), b"ORIGINAL BYTES");

    // Publishing again restores a good blob.
    publish_files(&cache, &k, &[("x.bin", b"original bytes", false), ("y", b"fine", false)]);
    assert_eq!(std::fs::read(&blob).unwrap(), b"original bytes");
    assert!(cache.lookup(&k).unwrap().is_some());
}

#[test]
fn truncated_blob_is_detected_without_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let k = key("t");
    let rec = publish_files(&cache, &k, &[("f", b"0123456789", false)]);
    let blob = cache.cas.blob_path(&rec.manifest.files[0].digest, false);
    std::fs::set_permissions(&blob, Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, b"01234").unwrap();
    assert!(cache.lookup(&k).unwrap().is_none());
    assert!(!blob.exists());
}

#[test]
fn crashed_publishes_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());

    // 1. Staging dropped mid-way (stage failed or process died): no record,
    //    and the staging directory is cleaned up.
    let k1 = key("dropped");
    let staging = cache.staging_dir("crash").unwrap();
    std::fs::write(staging.path().join("half"), b"partial").unwrap();
    let staged_at = staging.path().to_owned();
    drop(staging);
    assert!(!staged_at.exists());
    assert!(cache.lookup(&k1).unwrap().is_none());

    // 2. A record whose blobs never made it (e.g. written by a buggy or
    //    crashed process on a filesystem that reordered writes).
    let k2 = key("no-blobs");
    let record = ActionRecord {
        key: k2,
        created_unix_ms: 1,
        manifest: Manifest::from_entries(vec![FileEntry {
            path: "out.json".into(),
            digest: Digest::of_bytes(b"never stored"),
            size: 12,
            executable: false,
        }]),
        meta: serde_json::Value::Null,
    };
    cache.actions.write(&record).unwrap();
    assert!(cache.lookup(&k2).unwrap().is_none());
    assert!(!cache.actions.path(&k2).exists(), "useless record removed");

    // 3. Blobs and view written, crash before the record: a miss.
    let k3 = key("no-record");
    publish_files(&cache, &k3, &[("f", b"complete", false)]);
    std::fs::remove_file(cache.actions.path(&k3)).unwrap();
    assert!(cache.artifact_dir(&k3).exists());
    assert!(cache.lookup(&k3).unwrap().is_none());

    // 4. A torn record file is quarantined, not trusted.
    let k4 = key("torn");
    std::fs::write(cache.actions.path(&k4), b"{\"key\": \"").unwrap();
    assert!(cache.lookup(&k4).unwrap().is_none());
    assert!(!cache.actions.path(&k4).exists());
}

#[test]
fn missing_or_damaged_view_is_rebuilt_from_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let k = key("v");
    publish_files(&cache, &k, &[("a/b.txt", b"bee", false), ("c", b"sea", false)]);
    let view = cache.artifact_dir(&k);
    std::fs::remove_dir_all(&view).unwrap();
    assert!(cache.lookup(&k).unwrap().is_some());
    assert_eq!(std::fs::read(view.join("a/b.txt")).unwrap(), b"bee");

    // A stray file and a replaced (non-linked) file are both repaired.
    std::fs::write(view.join("stray"), b"x").unwrap();
    std::fs::remove_file(view.join("c")).unwrap();
    std::fs::write(view.join("c"), b"sea").unwrap();
    assert!(cache.lookup(&k).unwrap().is_some());
    assert!(!view.join("stray").exists());
    assert_eq!(count_files(&view), 2);
    let c = std::fs::metadata(view.join("c")).unwrap();
    let blob = std::fs::metadata(cache.cas.blob_path(&Digest::of_bytes(b"sea"), false)).unwrap();
    assert_eq!(c.ino(), blob.ino());
}

#[test]
fn concurrent_publishes_of_one_key_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let k = key("race");
    let files: Vec<(String, Vec<u8>)> = (0..20).map(|i| (format!("f{i}"), vec![i as u8; 1000 + i])).collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let staging = cache.staging_dir("race").unwrap();
                for (name, bytes) in &files {
                    std::fs::write(staging.path().join(name), bytes).unwrap();
                }
                cache.publish(&k, staging, serde_json::Value::Null).unwrap();
            });
        }
    });
    let rec = cache.lookup(&k).unwrap().unwrap();
    assert_eq!(rec.manifest.files.len(), 20);
    assert_eq!(count_blobs(&cache), 20);
    assert_eq!(count_files(&cache.artifact_dir(&k)), 20);
}

#[test]
fn publish_rejects_symlinks_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let staging = cache.staging_dir("links").unwrap();
    std::fs::write(staging.path().join("real"), b"r").unwrap();
    std::os::unix::fs::symlink("real", staging.path().join("alias")).unwrap();
    let err = cache.publish(&key("l"), staging, serde_json::Value::Null).unwrap_err();
    assert!(matches!(err, CacheError::SymlinkInOutput { .. }), "{err}");
    assert!(err.to_string().contains("alias"), "{err}");
    assert!(cache.lookup(&key("l")).unwrap().is_none());
}

#[test]
fn hash_path_of_file_dir_and_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/x.nii"), b"volume").unwrap();
    std::fs::write(data.join("y.csv"), b"a,b\n").unwrap();
    std::fs::create_dir_all(data.join("empty")).unwrap();

    let single = cache.hash_path(&data.join("y.csv")).unwrap();
    assert_eq!(single.files.len(), 1);
    assert_eq!(single.files[0].path, "y.csv");
    assert_eq!(single.files[0].digest, Digest::of_bytes(b"a,b\n"));
    assert_eq!(single.files[0].size, 4);

    let tree = cache.hash_path(&data).unwrap();
    let paths: Vec<&str> = tree.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["sub/x.nii", "y.csv"]);
    assert_eq!(tree.files[0].digest, cache.hash_file(&data.join("sub/x.nii")).unwrap());

    // Symlinks are followed: a linked tree hashes like the real one.
    let linked = dir.path().join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink(data.join("sub"), linked.join("sub")).unwrap();
    std::os::unix::fs::symlink(data.join("y.csv"), linked.join("y.csv")).unwrap();
    assert_eq!(cache.hash_path(&linked).unwrap().tree_digest(), tree.tree_digest());

    // ... but a loop is an error, not a hang.
    std::os::unix::fs::symlink(&data, data.join("sub/loop")).unwrap();
    let err = cache.hash_path(&data).unwrap_err();
    assert!(matches!(err, CacheError::Walk { .. }), "{err}");

    let missing = dir.path().join("nope");
    let err = cache.hash_path(&missing).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let err = cache.hash_file(&data).unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
}

#[test]
fn big_files_hash_like_small_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let bytes: Vec<u8> = (0..(MMAP_THRESHOLD as usize * 3 + 17)).map(|i| (i * 31 % 251) as u8).collect();
    let p = dir.path().join("big");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(cache.hash_file(&p).unwrap(), Digest::of_bytes(&bytes));
}

#[test]
fn stat_cache_avoids_rehash_and_sees_same_size_same_mtime_edits() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let file = dir.path().join("input.bin");
    std::fs::write(&file, b"version one").unwrap();
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    {
        let cache = Cache::open_with(&root, fast_options()).unwrap();
        let d1 = cache.hash_file(&file).unwrap();
        assert_eq!(cache.stat_counters().hashed, 1);
        assert_eq!(cache.hash_file(&file).unwrap(), d1);
        assert_eq!(cache.stat_counters(), StatCounters { hits: 1, hashed: 1 });
        cache.flush().unwrap();
    }
    // A new process (new Cache) trusts the persisted entry.
    let cache = Cache::open_with(&root, fast_options()).unwrap();
    assert_eq!(cache.hash_file(&file).unwrap(), Digest::of_bytes(b"version one"));
    assert_eq!(cache.stat_counters(), StatCounters { hits: 1, hashed: 0 });

    // Same size, mtime put back exactly: only the ctime tells.
    std::fs::write(&file, b"version two").unwrap();
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    assert_eq!(cache.hash_file(&file).unwrap(), Digest::of_bytes(b"version two"));
    assert_eq!(cache.stat_counters().hashed, 1);
}

#[test]
fn recently_modified_files_are_not_stat_cached() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CacheOptions { racy_window: Duration::from_secs(2), ..fast_options() };
    let cache = Cache::open_with(&dir.path().join("cache"), opts).unwrap();
    let file = dir.path().join("fresh");
    std::fs::write(&file, b"just written").unwrap();
    cache.hash_file(&file).unwrap();
    cache.hash_file(&file).unwrap();
    assert_eq!(cache.stat_counters(), StatCounters { hits: 0, hashed: 2 });
}

#[test]
fn records_lists_and_remove_record_forgets() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    publish_files(&cache, &key("r1"), &[("a", b"1", false)]);
    publish_files(&cache, &key("r2"), &[("a", b"2", false)]);
    let mut keys: Vec<Digest> = cache.records().unwrap().into_iter().map(|r| r.key).collect();
    keys.sort();
    let mut expected = vec![key("r1"), key("r2")];
    expected.sort();
    assert_eq!(keys, expected);
    cache.remove_record(&key("r1")).unwrap();
    cache.remove_record(&key("r1")).unwrap(); // idempotent
    assert!(cache.lookup(&key("r1")).unwrap().is_none());
    assert!(!cache.artifact_dir(&key("r1")).exists());
    assert_eq!(cache.records().unwrap().len(), 1);
}
