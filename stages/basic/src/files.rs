//! `files`: import an external file or directory as an artifact.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use globset::GlobSet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{ParamError, PlanOutput, PlanView, StageContext, StageKind};

use crate::tree::{glob_set, list_files};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesParams {
    /// File or directory to import; relative paths resolve against the
    /// recipe's directory. Its content digest is part of the cache key, so
    /// editing the files re-runs this stage and everything downstream.
    pub path: PathBuf,
    /// Only import files whose path relative to `path` matches this glob
    /// (e.g. `"**/*.nii.gz"`); all files when absent.
    #[serde(default)]
    pub glob: Option<String>,
}

pub struct Files;

impl StageKind for Files {
    type Params = FilesParams;
    const KIND: &'static str = "files";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Import an external file or directory (optionally filtered by a glob) as an artifact.";

    fn external_inputs(params: &FilesParams, recipe_dir: &Path) -> Vec<PathBuf> {
        vec![resolve(&params.path, recipe_dir)]
    }

    /// The output is a copy of `path` (the files `glob` keeps, at the same
    /// relative paths): plans downstream read the source before the import runs.
    fn plan_output(params: &FilesParams, plan: &PlanView) -> PlanOutput {
        let src = resolve(&params.path, plan.recipe_dir);
        PlanOutput { stand_in: src.is_dir().then_some(src), facts: Default::default() }
    }

    fn validate(params: &FilesParams) -> Result<(), ParamError> {
        if params.path.as_os_str().is_empty() {
            return Err(ParamError::new(&["path"], "`path` is empty: expected a file or directory"));
        }
        if let Some(glob) = &params.glob {
            globset::Glob::new(glob).map_err(|e| ParamError::new(&["glob"], format!("invalid glob `{glob}`: {e}")))?;
        }
        Ok(())
    }

    fn run(params: &FilesParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let src = ctx.resolve(&params.path);
        let filter = match &params.glob {
            Some(g) => Some(glob_set(std::slice::from_ref(g)).with_context(|| format!("compiling glob `{g}`"))?),
            None => None,
        };
        let files =
            list_files(&src, &GlobSet::empty()).with_context(|| format!("importing `path` {}", src.display()))?;
        let files: Vec<_> = files.into_iter().filter(|f| filter.as_ref().is_none_or(|g| g.is_match(&f.rel))).collect();
        if files.is_empty() {
            match &params.glob {
                Some(g) => bail!("no file under {} matches glob `{g}`", src.display()),
                None => bail!("{} contains no files", src.display()),
            }
        }
        ctx.progress().start("copying", files.len() as u64);
        let mut bytes = 0u64;
        for f in &files {
            ctx.check_cancelled()?;
            let dest = ctx.output_dir().join(&f.rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            bytes += std::fs::copy(&f.path, &dest)
                .with_context(|| format!("copying {} to {}", f.path.display(), dest.display()))?;
            ctx.progress().advance(1);
        }
        ctx.progress().finish();
        tracing::info!(files = files.len(), bytes, from = %src.display(), "imported");
        Ok(())
    }
}

fn resolve(path: &Path, recipe_dir: &Path) -> PathBuf {
    if path.is_absolute() { path.to_path_buf() } else { recipe_dir.join(path) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stage_api::Registry;

    fn params(path: &Path, glob: Option<&str>) -> FilesParams {
        FilesParams { path: path.to_path_buf(), glob: glob.map(str::to_string) }
    }

    #[test]
    fn copies_a_directory_tree_filtered_by_glob() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::write(data.join("a.nii.gz"), b"aa").unwrap();
        std::fs::write(data.join("sub/b.nii.gz"), b"bb").unwrap();
        std::fs::write(data.join("notes.txt"), b"n").unwrap();
        let out = dir.path().join("out");
        let mut ctx = StageContext::builder("files", &out).recipe_dir(dir.path()).build().unwrap();
        Files::run(&params(Path::new("data"), Some("**/*.nii.gz")), &mut ctx).unwrap();
        assert_eq!(std::fs::read(out.join("a.nii.gz")).unwrap(), b"aa");
        assert_eq!(std::fs::read(out.join("sub/b.nii.gz")).unwrap(), b"bb");
        assert!(!out.join("notes.txt").exists());
    }

    #[test]
    fn imports_a_single_file_and_reports_it_as_external_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("labels.csv"), "x,y\n").unwrap();
        let p = params(Path::new("labels.csv"), None);
        assert_eq!(Files::external_inputs(&p, dir.path()), [dir.path().join("labels.csv")]);
        let out = dir.path().join("out");
        let mut ctx = StageContext::builder("files", &out).recipe_dir(dir.path()).build().unwrap();
        Files::run(&p, &mut ctx).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("labels.csv")).unwrap(), "x,y\n");
    }

    #[test]
    fn the_source_directory_stands_in_for_the_import_before_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ckpt")).unwrap();
        std::fs::write(dir.path().join("one.csv"), "x").unwrap();
        let inputs = stage_api::PlanInputs::default();
        let view =
            PlanView { inputs: &inputs, ranks: 1, device: stage_api::DeviceRequest::Cpu, recipe_dir: dir.path() };
        let out = |p: &str| Files::plan_output(&params(Path::new(p), None), &view).stand_in;
        assert_eq!(out("ckpt"), Some(dir.path().join("ckpt")));
        assert_eq!(out("one.csv"), None, "a single file is no directory to stand in");
        assert_eq!(out("missing"), None);
    }

    #[test]
    fn missing_path_and_empty_match_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = StageContext::builder("files", dir.path().join("out")).recipe_dir(dir.path()).build().unwrap();
        let err = Files::run(&params(Path::new("nope"), None), &mut ctx).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/x.txt"), "x").unwrap();
        let err = Files::run(&params(Path::new("d"), Some("*.csv")), &mut ctx).unwrap_err();
        assert!(err.to_string().contains("matches glob `*.csv`"), "{err}");
    }

    #[test]
    fn params_are_checked_when_configured() {
        let kind = Registry::new().register::<Files>();
        let kind = kind.get("files").unwrap();
        let err = kind
            .configure(toml::toml! { path = "x"
            glob = "a[" })
            .err()
            .unwrap();
        assert_eq!(err.path, ["glob"]);
        let err = kind.configure(toml::Table::new()).err().unwrap();
        assert!(err.message.contains("missing field `path`"), "{}", err.message);
    }
}
