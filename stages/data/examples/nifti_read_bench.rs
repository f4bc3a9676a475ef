//! Read throughput of the NIfTI reader on a bench-size phantom volume.
//!
//!     cargo run --release -p stages-data --example nifti_read_bench -- DIR [REPEATS]
//!
//! Generates one `bench` phantom case (512×512×300 int16 CT, 4D uint8 mask)
//! into DIR unless DIR already holds one, then times `read_f32` on the CT
//! and `read_labels` on the mask; prints MB/s of decompressed voxel bytes.
//! Compare with `tools/bench_nifti_read.py DIR` (nibabel).

use std::path::{Path, PathBuf};
use std::time::Instant;

use stage_api::{StageContext, StageKind};
use stages_data::nifti;
use stages_data::phantom::{Phantom, PhantomParams, Preset};

fn first_file(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.sort();
    Ok(files.into_iter().find(|p| p.to_string_lossy().ends_with(".nii.gz")))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "target/nifti-bench".into()));
    let repeats: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(3);
    if first_file(&dir.join("images"))?.is_none() {
        let params = PhantomParams { preset: Preset::Bench, cases: Some(1), ..PhantomParams::default() };
        let mut ctx = StageContext::builder("bench", &dir).seed(1).threads(1).build()?;
        let t = Instant::now();
        Phantom::run(&params, &mut ctx)?;
        println!("generated 1 bench case in {:.2} s (1 thread)", t.elapsed().as_secs_f64());
    }
    let ct = first_file(&dir.join("images"))?.ok_or_else(|| anyhow::anyhow!("no CT in {}", dir.display()))?;
    let mask = first_file(&dir.join("segmentations"))?.ok_or_else(|| anyhow::anyhow!("no mask"))?;
    for (what, path) in [("ct read_f32", &ct), ("mask read_labels", &mask)] {
        let header = nifti::read_header(path)?;
        let mb = header.data_bytes() as f64 / 1e6;
        let gz_mb = std::fs::metadata(path)?.len() as f64 / 1e6;
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            if what.starts_with("ct") {
                std::hint::black_box(nifti::read_f32(path)?);
            } else {
                std::hint::black_box(nifti::read_labels(path)?);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{what}: {:?} {} ({mb:.1} MB voxels, {gz_mb:.1} MB gz): best {best:.3} s = {:.0} MB/s",
            header.dims,
            header.datatype.name(),
            mb / best
        );
    }
    Ok(())
}
