//! `pipeline inspect FILE`: what a NIfTI file holds (the report itself is
//! built by `stages_data::inspect` with the reader the stages use).

use std::path::PathBuf;

use stages_data::inspect::{inspect_file, render_text};

#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// NIfTI-1 or NIfTI-2 file (`.nii` or `.nii.gz`).
    pub file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Header only: skip reading the voxels (fast on huge files).
    #[arg(long)]
    pub header_only: bool,
}

/// Print the report of `args.file` to stdout.
pub fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let report = inspect_file(&args.file, args.header_only)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(())
}
