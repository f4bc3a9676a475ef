//! ALL key derivation: where each component of a stage's key comes from.
//! The planner (upstreams that will run stand in with their planned keys),
//! the scheduler (once every upstream has published) and `exec-stage`
//! (recomputing the key a job spec names, with its own registry) derive
//! [`KeyComponents`] here and nowhere else, so they cannot disagree.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pipeline_cache::{ActionRecord, Cache, Digest, Manifest};
use stage_api::{ConfiguredStage, DeviceRequest, DynStageKind, Resources};

use super::device::resolve_device;
use super::key::{ExternalDigest, InputDigest, KeyComponents};
use crate::env::EngineEnv;
use crate::numerics::Numerics;
use crate::provenance::PROVENANCE_FILE;
use crate::recipe::{Recipe, StageDecl};

/// Why the artifact digest of an input could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stage `{stage}` has no output `{output}` (its output directory holds no `{output}/`)")]
pub struct MissingOutput {
    pub stage: String,
    pub output: String,
}

/// Digest of an upstream artifact: the whole output tree, or one named
/// output's subtree; `provenance.json` is left out so identical outputs
/// produced at different times have the same digest.
pub fn artifact_digest(stage: &str, record: &ActionRecord, output: Option<&str>) -> Result<Digest, MissingOutput> {
    let content =
        Manifest::from_entries(record.manifest.files.iter().filter(|f| f.path != PROVENANCE_FILE).cloned().collect());
    match output {
        None => Ok(content.tree_digest()),
        Some(name) => content
            .subtree(name)
            .map(|m| m.tree_digest())
            .ok_or_else(|| MissingOutput { stage: stage.to_string(), output: name.to_string() }),
    }
}

/// The digest of input `name` of stage `stage_id`, reading `output` of
/// `upstream` from its published `record` (an error when that output is missing).
pub fn published_input(
    stage_id: &str,
    name: &str,
    upstream: &str,
    output: Option<&str>,
    record: &ActionRecord,
) -> anyhow::Result<InputDigest> {
    let digest =
        artifact_digest(upstream, record, output).with_context(|| format!("stage `{stage_id}`: input `{name}`"))?;
    Ok(InputDigest { stage: upstream.to_string(), output: output.map(str::to_string), digest, pending: false })
}

/// Digests of external inputs (stat-cached by the cache, so free on rerun).
pub fn external_digests(
    cache: &Cache,
    paths: &[PathBuf],
    warnings: &mut Vec<String>,
) -> anyhow::Result<Vec<ExternalDigest>> {
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let digest = if path.exists() {
            let manifest =
                cache.hash_path(path).with_context(|| format!("hashing external input {}", path.display()))?;
            Some(manifest.tree_digest())
        } else {
            warnings.push(format!("external input {} does not exist", path.display()));
            None
        };
        out.push(ExternalDigest { path: path.clone(), digest });
    }
    Ok(out)
}

/// What is known of an upstream stage when a key is derived.
#[derive(Debug, Clone, Copy)]
pub enum Upstream<'r> {
    /// Published: the digest of its (named) output enters the key.
    Published(&'r ActionRecord),
    /// Will run first: its planned key stands in, and the key is
    /// provisional until the upstream has run.
    Pending(Digest),
}

/// A configured stage and how it runs: every key component but the inputs.
struct Subject<'a> {
    kind: &'a dyn DynStageKind,
    stage: &'a dyn ConfiguredStage,
    recipe_dir: &'a Path,
    seed: u64,
    device_class: Option<String>,
    numerics: Option<Numerics>,
}

impl Subject<'_> {
    fn external_digests(&self, cache: &Cache, warnings: &mut Vec<String>) -> anyhow::Result<Vec<ExternalDigest>> {
        external_digests(cache, &self.stage.external_inputs(self.recipe_dir), warnings)
    }

    /// The one place [`KeyComponents`] are put together.
    fn components(self, inputs: BTreeMap<String, Vec<InputDigest>>, external: Vec<ExternalDigest>) -> KeyComponents {
        KeyComponents {
            kind: self.kind.kind().to_string(),
            version: self.kind.version(),
            params: self.stage.canonical_params(),
            inputs,
            external,
            seed: self.seed,
            device_class: self.device_class,
            unkeyed: self.stage.unkeyed_params().into_iter().map(String::from).collect(),
            numerics: self.numerics,
        }
    }
}

/// `cpu` / `cuda` for stages that use a device (their results may differ);
/// none for CPU-only stages.
fn device_class(requested: DeviceRequest, resolved: &Result<DeviceRequest, String>) -> Option<String> {
    match (requested, resolved) {
        (DeviceRequest::Cpu, _) => None,
        (_, Ok(DeviceRequest::Cuda)) | (_, Err(_)) => Some("cuda".to_string()),
        (_, Ok(_)) => Some("cpu".to_string()),
    }
}

/// What a stage's key records of the recipe's numerics: only libtorch
/// stages compute with the pinned kernels.
pub fn stage_numerics(numerics: Numerics, resources: &Resources) -> Option<Numerics> {
    if resources.libtorch { numerics.key_tag() } else { None }
}

/// Key components of `decl` given what is known of its upstreams (`None`:
/// not a stage of the graph), and the device it gets where it will run
/// (or why it cannot run there). Problems that do not stop planning go to
/// `warnings`.
pub fn stage_components<'r>(
    recipe: &Recipe,
    decl: &StageDecl,
    cache: &Cache,
    env: &EngineEnv,
    upstream: &dyn Fn(&str) -> Option<Upstream<'r>>,
    warnings: &mut Vec<String>,
) -> anyhow::Result<(KeyComponents, Result<DeviceRequest, String>)> {
    let resources = decl.stage.resources();
    let device = resolve_device(&decl.id, resources.device, env.cuda_for(&decl.id), recipe.allow_cpu_fallback)
        .map_err(|e| e.to_string());
    if let Err(e) = &device {
        warnings.push(e.clone());
    } else if resources.device == DeviceRequest::Cuda && device == Ok(DeviceRequest::Cpu) {
        warnings.push("CUDA requested but no GPU: running on the CPU (allow_cpu_fallback)".to_string());
    }
    let subject = Subject {
        kind: decl.kind.as_ref(),
        stage: decl.stage.as_ref(),
        recipe_dir: recipe.dir(),
        seed: decl.seed,
        device_class: device_class(resources.device, &device),
        numerics: stage_numerics(recipe.numerics, &resources),
    };
    let external =
        subject.external_digests(cache, warnings).with_context(|| format!("planning stage `{}`", decl.id))?;
    let mut inputs = BTreeMap::new();
    for (name, refs) in &decl.inputs {
        let digests = refs
            .iter()
            .map(|r| {
                let (digest, pending) = match upstream(&r.stage) {
                    Some(Upstream::Published(record)) => match artifact_digest(&r.stage, record, r.output.as_deref()) {
                        Ok(d) => (d, false),
                        Err(e) => {
                            warnings.push(format!("input `{name}`: {e}"));
                            (Digest::of_bytes(format!("missing output {}.{:?}", r.stage, r.output).as_bytes()), false)
                        }
                    },
                    Some(Upstream::Pending(key)) => (key, true),
                    // Unreachable for a well-formed graph; keep the key distinct anyway.
                    None => (Digest::of_bytes(format!("unknown upstream {}", r.stage).as_bytes()), true),
                };
                InputDigest { stage: r.stage.clone(), output: r.output.clone(), digest, pending }
            })
            .collect();
        inputs.insert(name.clone(), digests);
    }
    Ok((subject.components(inputs, external), device))
}

/// Recompute a stage's key components at run time, when every upstream
/// it reads has a final record; anything missing is an error.
pub fn final_components(
    recipe: &Recipe,
    decl: &StageDecl,
    cache: &Cache,
    env: &EngineEnv,
    records: &HashMap<String, ActionRecord>,
) -> anyhow::Result<KeyComponents> {
    // Every referenced upstream output must exist before the stage may start.
    for (name, refs) in &decl.inputs {
        for r in refs {
            let record = records
                .get(&r.stage)
                .with_context(|| format!("stage `{}`: upstream `{}` has no output record", decl.id, r.stage))?;
            published_input(&decl.id, name, &r.stage, r.output.as_deref(), record)?;
        }
    }
    let mut warnings = Vec::new();
    let upstream = |up: &str| records.get(up).map(Upstream::Published);
    let (comps, _) = stage_components(recipe, decl, cache, env, &upstream, &mut warnings)?;
    if let Some(missing) = comps.missing_external().next() {
        anyhow::bail!("stage `{}`: external input {} does not exist", decl.id, missing.display());
    }
    if comps.has_pending_inputs() {
        anyhow::bail!("stage `{}` has an upstream without output", decl.id);
    }
    Ok(comps)
}

/// The key components `exec-stage` recomputes for a job: the stage as this
/// binary configures it, the inputs the job spec names (digests of
/// published records, see [`published_input`]) and the seed, device
/// class and numerics the submitting process planned with.
pub fn job_components(
    kind: &dyn DynStageKind,
    stage: &dyn ConfiguredStage,
    recipe_dir: &Path,
    planned: &KeyComponents,
    inputs: BTreeMap<String, Vec<InputDigest>>,
    cache: &Cache,
) -> anyhow::Result<KeyComponents> {
    let subject = Subject {
        kind,
        stage,
        recipe_dir,
        seed: planned.seed,
        device_class: planned.device_class.clone(),
        numerics: planned.numerics,
    };
    let external = subject.external_digests(cache, &mut Vec::new())?;
    Ok(subject.components(inputs, external))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_cache::FileEntry;
    use serde_json::json;

    #[test]
    fn artifact_digest_ignores_provenance_and_selects_outputs() {
        let entry = |path: &str, content: &[u8]| FileEntry {
            path: path.into(),
            digest: Digest::of_bytes(content),
            size: content.len() as u64,
            executable: false,
        };
        let record = |prov: &[u8]| ActionRecord {
            key: Digest::of_bytes(b"key"),
            created_unix_ms: 0,
            manifest: Manifest::from_entries(vec![
                entry("train/a.txt", b"a"),
                entry("test/b.txt", b"b"),
                entry(PROVENANCE_FILE, prov),
            ]),
            meta: json!({}),
        };
        let (r1, r2) = (record(b"run at 10:00"), record(b"run at 11:00"));
        assert_eq!(artifact_digest("s", &r1, None).unwrap(), artifact_digest("s", &r2, None).unwrap());
        let train = artifact_digest("s", &r1, Some("train")).unwrap();
        assert_ne!(train, artifact_digest("s", &r1, Some("test")).unwrap());
        assert_ne!(train, artifact_digest("s", &r1, None).unwrap());
        let err = artifact_digest("split", &r1, Some("val")).unwrap_err();
        assert_eq!(err.to_string(), "stage `split` has no output `val` (its output directory holds no `val/`)");
    }
}
