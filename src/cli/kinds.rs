//! `pipeline kinds`: the registered stage kinds, their generated recipe
//! reference, and the check that `docs/recipes.md` is in step with it.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use pipeline_engine::recipe::docs::{generated_section, render_stage_reference, update_stage_reference};
use stage_api::Registry;

/// One line per kind: name, version, summary, `[ranks]` for data-parallel kinds.
pub fn list(registry: &Registry) -> anyhow::Result<ExitCode> {
    let width = registry.kinds().map(str::len).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for kind in registry.iter() {
        let ranks = if kind.distributed() { " [ranks]" } else { "" };
        let line = writeln!(out, "{:<width$}  v{:<3} {}{ranks}", kind.kind(), kind.version(), kind.doc().summary);
        // `pipeline kinds | head`: a closed pipe ends the listing, it is not an error.
        if let Err(e) = line {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
            return Err(e.into());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--reference`: the generated Markdown reference of every kind.
pub fn reference(registry: &Registry) -> ExitCode {
    print!("{}", render_stage_reference(registry));
    ExitCode::SUCCESS
}

/// Keep the generated part of the recipe reference in step with the registry.
pub fn check_doc(path: &Path, write: bool, registry: &Registry) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(current) = generated_section(&text) else {
        anyhow::bail!(
            "{} has no generated stage-reference section (BEGIN/END GENERATED STAGE REFERENCE markers)",
            path.display()
        );
    };
    if current == render_stage_reference(registry) {
        println!("{}: stage reference up to date", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    if write {
        let updated = update_stage_reference(&text, registry);
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, updated).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        println!("{}: stage reference rewritten", path.display());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{}: the stage reference drifted from the registry; run `pipeline kinds --doc {} --write`",
            path.display(),
            path.display()
        );
        Ok(ExitCode::FAILURE)
    }
}
