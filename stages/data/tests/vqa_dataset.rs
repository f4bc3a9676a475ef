//! The data chain end to end on a tiny phantom corpus:
//! phantom -> rexgct_index -> lesion_slices -> render -> vqa -> split ->
//! parquet_export, then the Parquet is loaded back by pyarrow and HF
//! `datasets` (`tools/load_parquet.py`), and the same rows exported in the
//! `save_to_disk` layout (`format = "hf_arrow"`) are loaded back by
//! `datasets.load_from_disk` and compared with them (`tools/load_saved.py`),
//! when the venv can be created (`tools/py-env-data.sh`); otherwise that
//! part is skipped with the reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use stage_api::{StageContext, StageKind};
use stages_data::phantom::{Phantom, PhantomParams, Preset};
use stages_data::rexgct::{RexgctIndex, RexgctIndexParams};
use stages_data::{LesionSlices, ParquetExport, Render, Split, Vqa, jsonl};

const SIZE: usize = 96;

fn run<K: StageKind>(params: &K::Params, out: &Path, inputs: &[(&str, &Path)]) -> PathBuf {
    let mut b = StageContext::builder(K::KIND, out).seed(11).threads(2);
    for (name, path) in inputs {
        b = b.input(name, "up", None, *path);
    }
    let mut ctx = b.build().unwrap();
    K::run(params, &mut ctx).unwrap_or_else(|e| panic!("{}: {e:#}", K::KIND));
    out.to_path_buf()
}

fn build_dataset(dir: &Path) -> PathBuf {
    let phantom = PhantomParams {
        preset: Preset::Mini,
        cases: Some(8),
        slices: Some(16),
        size: Some(SIZE),
        ..Default::default()
    };
    let volumes = run::<Phantom>(&phantom, &dir.join("volumes"), &[]);
    let index = run::<RexgctIndex>(&RexgctIndexParams::default(), &dir.join("index"), &[("dataset", &volumes)]);
    // The phantom plants lesions around round(1300 * (96 / 512)^2) = 46 px.
    let slice_params = stages_data::slices::LesionSlicesParams { box_min_area: 46, ..Default::default() };
    let slices = run::<LesionSlices>(&slice_params, &dir.join("slices"), &[("index", &index), ("dataset", &volumes)]);
    let render = run::<Render>(
        &Default::default(),
        &dir.join("render"),
        &[("slices", &slices), ("index", &index), ("dataset", &volumes)],
    );
    let vqa = run::<Vqa>(&Default::default(), &dir.join("vqa"), &[("items", &render), ("index", &index)]);
    let split = run::<Split>(&Default::default(), &dir.join("split"), &[("items", &vqa)]);
    let params = stages_data::parquet_export::ParquetExportParams {
        dataset_name: "ct-rate-vqa-test".into(),
        ..Default::default()
    };
    run::<ParquetExport>(&params, &dir.join("parquet"), &[("split", &split), ("images", &render)])
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn phantom_to_parquet_and_back_through_python() {
    let dir = tempfile::tempdir().unwrap();
    let out = build_dataset(dir.path());

    let slices: Vec<Value> = jsonl::read(&dir.path().join("slices/items.jsonl")).unwrap();
    assert!(!slices.is_empty(), "the phantom must give lesion slices");
    let stats: Value = jsonl::read_json(&dir.path().join("slices/stats.json")).unwrap();
    assert!(stats["boxes_dropped_small"].as_u64().unwrap() > 0, "phantom plants sub-threshold lesions: {stats}");
    let info: Value = jsonl::read_json(&out.join("dataset_info.json")).unwrap();
    let (train, test) = (
        info["splits"]["train"]["num_examples"].as_u64().unwrap(),
        info["splits"]["test"]["num_examples"].as_u64().unwrap(),
    );
    assert_eq!(train + test, slices.len() as u64);
    assert!(train > 0 && test > 0);

    let env_script = repo_root().join("tools/py-env-data.sh");
    let venv = Command::new("bash").arg(&env_script).output();
    // Off CI a machine without Python may skip the loader check; in CI
    // (`CI` set, as .ci/run is run) it must really happen.
    let skip = |why: String| {
        assert!(std::env::var_os("CI").is_none(), "python loader check required in CI: {why}");
        println!("SKIPPED python loader: {why}");
    };
    let python = match venv {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            let last = String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_string();
            return skip(format!("{} failed: {last}", env_script.display()));
        }
        Err(e) => return skip(format!("cannot run bash: {e}")),
    };
    let side = 84; // smart_resize(96) -> 84
    let o = Command::new(&python)
        .arg(repo_root().join("tools/load_parquet.py"))
        .arg(&out)
        .args(["--expect-size", &format!("{side}x{side}")])
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", dir.path().join("hf"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "load_parquet.py failed:\n{stdout}\n{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["splits"]["train"]["rows"], train);
    assert_eq!(summary["splits"]["test"]["rows"], test);
    assert_eq!(summary["card_load"], "ok");

    // The same rows in the save_to_disk layout, several shards per split.
    let params = stages_data::parquet_export::ParquetExportParams {
        dataset_name: "ct-rate-vqa-test".into(),
        format: stages_data::parquet_export::ExportFormat::HfArrow,
        row_group_mb: 0.01,
        shard_mb: 0.02,
        ..Default::default()
    };
    let saved = run::<ParquetExport>(
        &params,
        &dir.path().join("saved"),
        &[("split", &dir.path().join("split")), ("images", &dir.path().join("render"))],
    );
    let o = Command::new(&python)
        .arg(repo_root().join("tools/load_saved.py"))
        .arg(&saved)
        .arg(&out)
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", dir.path().join("hf"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "load_saved.py failed:\n{stdout}\n{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["splits"]["train"]["rows"], train);
    assert_eq!(summary["splits"]["test"]["rows"], test);
    assert!(summary["splits"]["train"]["shards"].as_u64().unwrap() > 1, "{summary}");
}
