//! `concat`: concatenate the files of several artifacts into one text file.

use std::fs::File;
use std::io::{BufWriter, Write};

use anyhow::Context as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{InputSpec, ParamError, StageContext, StageKind};

use crate::tree::{default_exclude, glob_set, list_files};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ConcatParams {
    /// Written between consecutive files (not after the last one).
    pub separator: String,
    /// Globs of relative paths to skip in every input (the engine's
    /// `provenance.json` by default: it differs between runs).
    pub exclude: Vec<String>,
}

impl Default for ConcatParams {
    fn default() -> Self {
        Self { separator: String::new(), exclude: default_exclude() }
    }
}

pub struct Concat;

impl StageKind for Concat {
    type Params = ConcatParams;
    const KIND: &'static str = "concat";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Concatenate every file of the `parts` inputs (in recipe order, files sorted by relative path) into `out.txt`.";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] =
            &[InputSpec::many("parts", "Artifacts whose files are concatenated, in this order.")];
        INPUTS
    }

    fn validate(params: &ConcatParams) -> Result<(), ParamError> {
        glob_set(&params.exclude).map(|_| ()).map_err(|e| ParamError::new(&["exclude"], format!("invalid glob: {e}")))
    }

    fn run(params: &ConcatParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let exclude = glob_set(&params.exclude).context("compiling `exclude`")?;
        let dest = ctx.output_dir().join("out.txt");
        let mut out = BufWriter::new(File::create(&dest).with_context(|| format!("creating {}", dest.display()))?);
        let mut first = true;
        let mut count = 0usize;
        for part in ctx.inputs("parts") {
            for f in list_files(&part.path, &exclude)
                .with_context(|| format!("input `parts` from stage `{}`", part.stage))?
            {
                ctx.check_cancelled()?;
                if !first {
                    out.write_all(params.separator.as_bytes())?;
                }
                first = false;
                let mut src = File::open(&f.path).with_context(|| format!("opening {}", f.path.display()))?;
                std::io::copy(&mut src, &mut out).with_context(|| format!("copying {}", f.path.display()))?;
                count += 1;
            }
        }
        out.flush().with_context(|| format!("writing {}", dest.display()))?;
        tracing::info!(files = count, "concatenated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenates_inputs_in_order_with_separator() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("2.txt"), "a2").unwrap();
        std::fs::write(a.join("1.txt"), "a1").unwrap();
        std::fs::write(a.join("sub/0.txt"), "a0").unwrap();
        std::fs::write(a.join("provenance.json"), "{\"t\": 1}").unwrap();
        std::fs::write(b.join("x.txt"), "b").unwrap();
        let out = dir.path().join("out");
        // `b` first: recipe order wins over names.
        let mut ctx = StageContext::builder("concat", &out)
            .input("parts", "b", None, &b)
            .input("parts", "a", None, &a)
            .build()
            .unwrap();
        let params = ConcatParams { separator: "|".into(), ..ConcatParams::default() };
        Concat::run(&params, &mut ctx).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("out.txt")).unwrap(), "b|a1|a2|a0");
    }

    #[test]
    fn unreadable_input_names_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = StageContext::builder("concat", dir.path().join("out"))
            .input("parts", "ghost", None, dir.path().join("missing"))
            .build()
            .unwrap();
        let err = Concat::run(&ConcatParams::default(), &mut ctx).unwrap_err();
        assert!(err.to_string().contains("stage `ghost`"), "{err:#}");
    }
}
