//! `checksum`: blake3 digests of every file of an artifact (like `b3sum`).

use std::io::Write;

use anyhow::Context as _;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{InputSpec, ParamError, Resources, StageContext, StageKind};

use crate::tree::{default_exclude, glob_set, list_files};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksumParams {
    /// Hash function; only `"blake3"` is supported.
    pub algorithm: String,
    /// Globs of relative paths to skip (the engine's `provenance.json` by
    /// default: it differs between runs).
    pub exclude: Vec<String>,
    /// Hashing threads (0 = all cores).
    // More than any machine has cores.
    #[schemars(range(max = 1024))]
    pub threads: usize,
}

impl Default for ChecksumParams {
    fn default() -> Self {
        Self { algorithm: "blake3".into(), exclude: default_exclude(), threads: 0 }
    }
}

pub struct Checksum;

impl StageKind for Checksum {
    type Params = ChecksumParams;
    const KIND: &'static str = "checksum";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Write `checksums.txt` (blake3 and relative path per file, as `b3sum` prints) and `summary.json` (file count, bytes).";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[InputSpec::one("input", "Artifact to checksum.")];
        INPUTS
    }

    fn resources(params: &ChecksumParams) -> Resources {
        Resources { cpu: params.threads, ..Resources::default() }
    }

    fn validate(params: &ChecksumParams) -> Result<(), ParamError> {
        if params.algorithm != "blake3" {
            return Err(ParamError::new(&["algorithm"], format!("unsupported algorithm `{}`", params.algorithm))
                .with_hint("only `blake3` is supported"));
        }
        glob_set(&params.exclude).map(|_| ()).map_err(|e| ParamError::new(&["exclude"], format!("invalid glob: {e}")))
    }

    fn run(params: &ChecksumParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let exclude = glob_set(&params.exclude).context("compiling `exclude`")?;
        let input = ctx.input("input")?.to_path_buf();
        let files = list_files(&input, &exclude).with_context(|| format!("input `input` at {}", input.display()))?;
        ctx.progress().start("hashing", files.len() as u64);
        let progress = ctx.progress();
        // Files in parallel; mmap so large files do not go through a buffer copy.
        let digests: Vec<anyhow::Result<(String, u64)>> = ctx.pool().install(|| {
            files
                .par_iter()
                .map(|f| {
                    let mut hasher = blake3::Hasher::new();
                    hasher.update_mmap(&f.path).with_context(|| format!("hashing {}", f.path.display()))?;
                    progress.advance(1);
                    Ok((hasher.finalize().to_hex().to_string(), hasher.count()))
                })
                .collect()
        });
        ctx.progress().finish();
        ctx.check_cancelled()?;

        let dest = ctx.output_dir().join("checksums.txt");
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&dest).with_context(|| format!("creating {}", dest.display()))?,
        );
        let mut total = 0u64;
        for (f, digest) in files.iter().zip(digests) {
            let (hex, len) = digest?;
            total += len;
            writeln!(out, "{hex}  {}", f.rel)?;
        }
        out.flush().with_context(|| format!("writing {}", dest.display()))?;
        let summary = serde_json::json!({ "algorithm": params.algorithm, "files": files.len(), "bytes": total });
        let summary_path = ctx.output_dir().join("summary.json");
        std::fs::write(&summary_path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", summary_path.display()))?;
        tracing::info!(files = files.len(), bytes = total, "checksummed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stage_api::Registry;

    #[test]
    fn writes_b3sum_lines_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir_all(input.join("d")).unwrap();
        std::fs::write(input.join("b.txt"), "hello").unwrap();
        std::fs::write(input.join("d/a.bin"), [0u8; 3000]).unwrap();
        std::fs::write(input.join("provenance.json"), "{}").unwrap();
        let out = dir.path().join("out");
        let mut ctx =
            StageContext::builder("checksum", &out).input("input", "up", None, &input).threads(2).build().unwrap();
        Checksum::run(&ChecksumParams::default(), &mut ctx).unwrap();
        let text = std::fs::read_to_string(out.join("checksums.txt")).unwrap();
        let expected =
            format!("{}  b.txt\n{}  d/a.bin\n", blake3::hash(b"hello").to_hex(), blake3::hash(&[0u8; 3000]).to_hex());
        assert_eq!(text, expected);
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["files"], 2);
        assert_eq!(summary["bytes"], 3005);
    }

    #[test]
    fn only_blake3_is_accepted() {
        let registry = Registry::new().register::<Checksum>();
        let err = registry.get("checksum").unwrap().configure(toml::toml! { algorithm = "md5" }).err().unwrap();
        assert_eq!(err.path, ["algorithm"]);
        assert_eq!(err.hint.as_deref(), Some("only `blake3` is supported"));
    }
}
