//! Job specs: how a stage configured by one process is handed to another
//! (a Slurm job on any node that mounts the cache, or a rank of a
//! data-parallel stage). Plain data at `<cache>/jobs/<key>.json`: the
//! stage's key components (kind, version, canonical params, input digests,
//! seed, device class) plus where its inputs are and provenance details.
//! Backends write them ([`crate::backend::interface::ReadyStage::job_spec`]);
//! `pipeline exec-stage` ([`crate::worker`]) reads them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use pipeline_cache::{Cache, Digest};
use serde::{Deserialize, Serialize};

use crate::plan::KeyComponents;

/// Bumped when the spec format changes (a child refuses other formats).
pub const JOB_SPEC_FORMAT: u32 = 1;

/// Record meta field holding the Slurm job id that published a record.
pub const META_SLURM_JOB: &str = "slurm_job";

/// One input reference of the stage: which upstream record it reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInput {
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Key of the upstream's action record.
    pub record: Digest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub format: u32,
    /// The key the submitting process computed; the child must agree.
    pub key: Digest,
    pub stage_id: String,
    pub components: KeyComponents,
    /// Input name -> one entry per reference, parallel to `components.inputs`.
    pub inputs: BTreeMap<String, Vec<JobInput>>,
    /// Run even if the key is cached.
    pub forced: bool,
    /// Threads the stage asked for (0: the whole allocation).
    pub threads: usize,
    pub memory_mb: u64,
    /// Working directory of the submitting process (relative paths resolve there).
    pub cwd: PathBuf,
    pub recipe_dir: PathBuf,
    pub recipe_name: String,
    pub recipe_path: PathBuf,
    pub recipe_digest: String,
    pub git_revision: Option<String>,
    pub run_id: String,
    /// `pipeline` version of the submitting process.
    pub tool_version: String,
    /// Data-parallel processes running the stage (rank 0 publishes).
    #[serde(default = "one")]
    pub ranks: usize,
}

fn one() -> usize {
    1
}

pub fn jobs_dir(cache: &Cache) -> PathBuf {
    cache.root().join("jobs")
}

pub fn spec_path(cache: &Cache, key: &Digest) -> PathBuf {
    jobs_dir(cache).join(format!("{}.json", key.hex()))
}

impl JobSpec {
    /// Write atomically (temp file + rename) to `<cache>/jobs/<key>.json`.
    pub fn write(&self, cache: &Cache) -> anyhow::Result<PathBuf> {
        let dir = jobs_dir(cache);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = spec_path(cache, &self.key);
        let mut tmp = tempfile::Builder::new()
            .prefix(".spec-")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a temp file in {}", dir.display()))?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading job spec {}", path.display()))?;
        let spec: JobSpec =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing job spec {}", path.display()))?;
        if spec.format != JOB_SPEC_FORMAT {
            bail!(
                "job spec {} has format {}, this binary reads format {JOB_SPEC_FORMAT}: submit and run with the same `pipeline`",
                path.display(),
                spec.format
            );
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_other_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let components = KeyComponents {
            kind: "text".into(),
            version: 1,
            params: serde_json::json!({"text": "hi", "maybe": null}),
            inputs: BTreeMap::new(),
            external: vec![],
            seed: 3,
            device_class: None,
            unkeyed: Vec::new(),
            numerics: None,
        };
        let spec = JobSpec {
            format: JOB_SPEC_FORMAT,
            key: components.key(),
            stage_id: "t".into(),
            components,
            inputs: BTreeMap::new(),
            forced: false,
            threads: 0,
            memory_mb: 10,
            cwd: dir.path().to_path_buf(),
            recipe_dir: "recipes".into(),
            recipe_name: "r".into(),
            recipe_path: "recipes/r.toml".into(),
            recipe_digest: "d".into(),
            git_revision: None,
            run_id: "run".into(),
            tool_version: "0".into(),
            ranks: 1,
        };
        let path = spec.write(&cache).unwrap();
        assert_eq!(path, spec_path(&cache, &spec.key));
        assert_eq!(JobSpec::read(&path).unwrap(), spec);
        let mut other = serde_json::to_value(&spec).unwrap();
        other["format"] = 99.into();
        std::fs::write(&path, other.to_string()).unwrap();
        let err = JobSpec::read(&path).unwrap_err().to_string();
        assert!(err.contains("format 99"), "{err}");
    }
}
