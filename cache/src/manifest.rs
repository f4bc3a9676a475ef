//! Output manifests (the file list of an artifact) and action records.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the artifact root, '/'-separated, never empty, no `.`/`..`.
    pub path: String,
    pub digest: Digest,
    pub size: u64,
    pub executable: bool,
}

/// The files of an artifact, sorted by `path` (byte order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: Vec<FileEntry>,
}

/// Domain separation so a tree digest never equals a file digest.
const TREE_CONTEXT: &str = "medreason-pipeline 2025 tree digest";

impl Manifest {
    /// Builds a manifest from entries in any order.
    pub fn from_entries(mut files: Vec<FileEntry>) -> Manifest {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest { files }
    }

    /// blake3 over the sorted (path, digest, size, executable) tuples, each
    /// length-prefixed, so renaming, editing or chmod-ing any file changes it.
    pub fn tree_digest(&self) -> Digest {
        let mut h = blake3::Hasher::new_derive_key(TREE_CONTEXT);
        h.update(&(self.files.len() as u64).to_le_bytes());
        let mut sorted: Vec<&FileEntry> = self.files.iter().collect();
        // Already sorted when built by the cache; sort anyway so a hand-built
        // manifest hashes the same as the canonical one.
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        for f in sorted {
            h.update(&(f.path.len() as u64).to_le_bytes());
            h.update(f.path.as_bytes());
            h.update(&f.digest.0);
            h.update(&f.size.to_le_bytes());
            h.update(&[u8::from(f.executable)]);
        }
        h.finalize().into()
    }

    /// Entries under `prefix/`, with the prefix stripped; `None` if there are none.
    /// A trailing '/' on `prefix` is ignored; an empty prefix returns everything.
    pub fn subtree(&self, prefix: &str) -> Option<Manifest> {
        let prefix = prefix.trim_end_matches('/');
        let files: Vec<FileEntry> = if prefix.is_empty() {
            self.files.clone()
        } else {
            self.files
                .iter()
                .filter_map(|f| {
                    let rest = f.path.strip_prefix(prefix)?.strip_prefix('/')?;
                    Some(FileEntry { path: rest.to_owned(), ..f.clone() })
                })
                .collect()
        };
        (!files.is_empty()).then(|| Manifest::from_entries(files))
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The entry at exactly `path`.
    pub fn get(&self, path: &str) -> Option<&FileEntry> {
        self.files.binary_search_by(|f| f.path.as_str().cmp(path)).ok().map(|i| &self.files[i])
    }
}

/// What a finished stage run produced: key -> manifest, written last on publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub key: Digest,
    pub created_unix_ms: u64,
    pub manifest: Manifest,
    /// Free-form data from the engine (stage kind, timings, provenance).
    pub meta: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, content: &[u8], executable: bool) -> FileEntry {
        FileEntry { path: path.to_owned(), digest: Digest::of_bytes(content), size: content.len() as u64, executable }
    }

    fn sample() -> Manifest {
        Manifest::from_entries(vec![
            entry("train/b.json", b"bb", false),
            entry("train/a.json", b"a", false),
            entry("trainer.bin", b"x", false),
            entry("test/a.json", b"t", true),
        ])
    }

    #[test]
    fn entries_are_sorted_and_sizes_add_up() {
        let m = sample();
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["test/a.json", "train/a.json", "train/b.json", "trainer.bin"]);
        assert_eq!(m.total_size(), 5);
        assert_eq!(m.get("train/b.json").map(|f| f.size), Some(2));
        assert!(m.get("train").is_none());
    }

    #[test]
    fn subtree_strips_prefix_and_respects_component_boundaries() {
        let m = sample();
        let train = m.subtree("train").unwrap();
        let paths: Vec<&str> = train.files.iter().map(|f| f.path.as_str()).collect();
        // "trainer.bin" shares the string prefix but is not under "train/".
        assert_eq!(paths, ["a.json", "b.json"]);
        assert_eq!(m.subtree("train/").unwrap(), train);
        assert!(m.subtree("missing").is_none());
        assert!(m.subtree("train/a.json").is_none());
        assert_eq!(m.subtree("").unwrap(), m);
    }

    #[test]
    fn tree_digest_sees_every_field() {
        let base = sample().tree_digest();
        assert_eq!(base, sample().tree_digest());
        let mut renamed = sample();
        renamed.files[0].path = "test/z.json".into();
        let mut edited = sample();
        edited.files[1].digest = Digest::of_bytes(b"other");
        let mut resized = sample();
        resized.files[1].size += 1;
        let mut chmodded = sample();
        chmodded.files[1].executable = true;
        for m in [renamed, edited, resized, chmodded] {
            assert_ne!(m.tree_digest(), base);
        }
        // Order of construction does not matter.
        let mut reversed = sample();
        reversed.files.reverse();
        assert_eq!(reversed.tree_digest(), base);
        // Empty tree differs from a tree with one empty file.
        assert_ne!(
            Manifest::default().tree_digest(),
            Manifest::from_entries(vec![entry("", b"", false)]).tree_digest()
        );
    }

    #[test]
    fn record_round_trips_through_json() {
        let rec = ActionRecord {
            key: Digest::of_bytes(b"key"),
            created_unix_ms: 1_700_000_000_000,
            manifest: sample(),
            meta: serde_json::json!({"kind": "phantom"}),
        };
        let json = serde_json::to_string(&rec).unwrap();
        assert!(json.contains(&rec.key.hex()));
        let back: ActionRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }
}
