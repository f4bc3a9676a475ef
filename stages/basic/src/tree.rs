//! Listing the files of an artifact in a stable order.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use globset::{Glob, GlobSet, GlobSetBuilder};

/// Files the engine writes next to a stage's outputs; their content changes
/// from run to run (timestamps, hosts), so reading them would make results
/// irreproducible.
pub(crate) const ENGINE_FILES: &[&str] = &["provenance.json"];

/// A regular file inside an artifact and its `/`-separated relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileEntry {
    pub path: PathBuf,
    pub rel: String,
}

/// Every regular file under `root` (or `root` itself when it is a file),
/// sorted by relative path, skipping files whose relative path matches
/// `exclude`. Symlinks are followed (loops are an error).
pub(crate) fn list_files(root: &Path, exclude: &GlobSet) -> anyhow::Result<Vec<FileEntry>> {
    let meta = std::fs::metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if meta.is_file() {
        let rel = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok(vec![FileEntry { path: root.to_path_buf(), rel }]);
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).follow_links(true) {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel_path = entry
            .path()
            .strip_prefix(root)
            .with_context(|| format!("{} is outside {}", entry.path().display(), root.display()))?;
        let rel =
            rel_path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/");
        if exclude.is_match(&rel) {
            continue;
        }
        out.push(FileEntry { path: entry.into_path(), rel });
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Compile glob patterns (`**/*.nii.gz`, `provenance.json`) into one set.
pub(crate) fn glob_set(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(Glob::new(p)?);
    }
    builder.build()
}

/// Default `exclude` of stages that read whole artifacts.
pub(crate) fn default_exclude() -> Vec<String> {
    ENGINE_FILES.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_sorted_relative_paths_and_skips_excluded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        std::fs::write(dir.path().join("b/c/z.txt"), "z").unwrap();
        std::fs::write(dir.path().join("a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("b/y.txt"), "y").unwrap();
        std::fs::write(dir.path().join("provenance.json"), "{}").unwrap();
        let files = list_files(dir.path(), &glob_set(&default_exclude()).unwrap()).unwrap();
        let rels: Vec<&str> = files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, ["a.txt", "b/c/z.txt", "b/y.txt"]);
    }

    #[test]
    fn a_file_root_lists_itself() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("one.txt");
        std::fs::write(&f, "1").unwrap();
        let files = list_files(&f, &GlobSet::empty()).unwrap();
        assert_eq!(files, [FileEntry { path: f, rel: "one.txt".into() }]);
    }

    #[test]
    fn missing_root_names_the_path() {
        let err = list_files(Path::new("/nonexistent/x"), &GlobSet::empty()).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/x"));
    }
}
