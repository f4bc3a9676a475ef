//! Benchmark of `lesion_slices` + `render` on `bench` phantoms (512x512x300).
//!
//! `cargo run --release -p stages-data --example bench_slices -- DIR [CASES] [THREADS...]`
//! generates (once) a bench phantom corpus and its index under DIR, then
//! times both stages for each thread count and prints one JSON line each.
//! Compare with `tools/reference_slices.py` (see docs/benchmarks.md).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use stage_api::{StageContext, StageKind};
use stages_data::phantom::{Phantom, PhantomParams, Preset};
use stages_data::rexgct::{RexgctIndex, RexgctIndexParams};
use stages_data::{LesionSlices, Render};

fn run<K: StageKind>(params: &K::Params, out: &Path, inputs: &[(&str, &Path)], threads: usize) -> anyhow::Result<f64> {
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    let mut b = StageContext::builder(K::KIND, out).seed(3).threads(threads);
    for (name, path) in inputs {
        b = b.input(name, "up", None, *path);
    }
    let mut ctx = b.build()?;
    let t = Instant::now();
    K::run(params, &mut ctx)?;
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.first().context("usage: bench_slices DIR [CASES] [THREADS...]")?);
    let cases: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let threads: Vec<usize> =
        if args.len() > 2 { args[2..].iter().map(|s| s.parse()).collect::<Result<_, _>>()? } else { vec![1, 2] };
    let volumes = dir.join("volumes");
    let index = dir.join("index");
    if !index.join("index.json").exists() {
        let p = PhantomParams { preset: Preset::Bench, cases: Some(cases), ..Default::default() };
        let t = run::<Phantom>(&p, &volumes, &[], 2)?;
        eprintln!("phantom: {cases} bench cases in {t:.1}s");
        run::<RexgctIndex>(&RexgctIndexParams::default(), &index, &[("dataset", &volumes)], 1)?;
    }
    if std::env::var_os("BENCH_READS").is_some() {
        // Where the time goes: decoding alone, per case.
        for e in std::fs::read_dir(volumes.join("images"))? {
            let ct = e?.path();
            let mask = volumes.join("segmentations").join(ct.file_name().context("file name")?);
            let t = Instant::now();
            let v = stages_data::nifti::read_f32(&ct)?;
            let t_ct = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let m = stages_data::nifti::read_labels(&mask)?;
            let t_mask = t.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"ct": ct.display().to_string(), "ct_dims": v.dims, "read_f32_s": t_ct,
                                              "mask_dims": m.dims, "read_labels_s": t_mask})
            );
        }
    }
    for &n in &threads {
        let slices = dir.join(format!("slices-{n}"));
        let ts = run::<LesionSlices>(&Default::default(), &slices, &[("index", &index), ("dataset", &volumes)], n)?;
        let tr = run::<Render>(
            &Default::default(),
            &dir.join(format!("render-{n}")),
            &[("slices", &slices), ("index", &index), ("dataset", &volumes)],
            n,
        )?;
        let items = std::fs::read_to_string(slices.join("items.jsonl"))?.lines().count();
        println!(
            "{}",
            serde_json::json!({"threads": n, "cases": cases, "items": items, "lesion_slices_s": ts, "render_s": tr,
                               "total_s": ts + tr, "s_per_case": (ts + tr) / cases as f64})
        );
    }
    Ok(())
}
