//! Stage `parquet_export`: the CT-RATE-VQA dataset as sharded Parquet that a
//! Hugging Face `datasets` user loads with
//! `load_dataset("parquet", data_files={"train": "train/*.parquet", ...})`
//! or `load_dataset(<output dir>)` (the README card declares the configs);
//! or, with `format = "hf_arrow"`, in the `save_to_disk` layout the authors
//! released theirs in (`load_from_disk(<output dir>)`: `dataset_dict.json`,
//! and per split `data-NNNNN-of-NNNNN.arrow` Arrow IPC stream shards,
//! `state.json`, `dataset_info.json`; [`stages_task::hf_disk`]).
//!
//! Inputs: `split` (one or more references: the whole `split` output, whose
//! sub-directories `train/`, `test/` hold `items.jsonl`, or single sides like
//! `split.train`) and `images` (the `render` output; records name their PNG
//! relative to it). Outputs: one directory per split with
//! `<split>-NNNNN-of-MMMMM.parquet` shards, plus `dataset_info.json` and a
//! `README.md` dataset card with features and counts.
//!
//! Columns: the task contract's export layout ([`stages_task::schema`]: `id`,
//! the HF `image` struct, `problem`, `solution`, `answer`, `options`, the
//! class, case, patient and slice, `boxes`, `split`), read back by
//! [`stages_task::read_split`].
//!
//! Shards and row groups are planned before writing from the PNG sizes (row
//! groups close once they reach `row_group_mb`, shards once they reach
//! `shard_mb`), so names carry the shard count and memory stays bounded by
//! one row group per worker. zstd compression; the image column is neither
//! dictionary-encoded nor given statistics (PNG bytes gain nothing from either).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use arrow_array::{ArrayRef, BinaryArray, Int32Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use stage_api::{InputSpec, OutputSpec, ParamError, StageContext, StageKind};
use stages_task::hf_disk;
use stages_task::schema::{
    EXPORT_COLUMNS, box_fields, card_features_yaml, column, export_schema, hf_features_json, image_fields, list_item,
};

use crate::components::BBox;
use crate::jsonl;

/// The file layout of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// Sharded zstd Parquet (`load_dataset`).
    #[default]
    Parquet,
    /// `datasets`' `save_to_disk` layout: Arrow IPC stream shards (`load_from_disk`).
    HfArrow,
}

impl ExportFormat {
    /// The default is left out of the canonical params: adding the choice
    /// does not change the cache key of existing Parquet exports.
    fn is_parquet(&self) -> bool {
        *self == ExportFormat::Parquet
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetExportParams {
    /// `parquet` (sharded zstd Parquet) or `hf_arrow` (the `save_to_disk`
    /// layout the authors released CT-RATE-VQA in; `row_group_mb` and
    /// `zstd_level` do not apply, a record batch per planned row group).
    #[serde(skip_serializing_if = "ExportFormat::is_parquet")]
    pub format: ExportFormat,
    /// Splits to export; each must be found in the `split` input.
    pub splits: Vec<String>,
    /// Target row-group size in MiB of payload (a group closes once it reaches it).
    pub row_group_mb: f64,
    /// Target shard size in MiB (a shard closes once it reaches it, at a row-group boundary).
    pub shard_mb: f64,
    /// zstd level (1-22).
    pub zstd_level: i32,
    /// Name written into the dataset card and `dataset_info.json`.
    pub dataset_name: String,
}

impl Default for ParquetExportParams {
    fn default() -> Self {
        Self {
            format: ExportFormat::Parquet,
            splits: vec!["train".into(), "test".into()],
            row_group_mb: 128.0,
            shard_mb: 512.0,
            zstd_level: 3,
            dataset_name: "CT-RATE-VQA".into(),
        }
    }
}

impl ExportFormat {
    fn label(self) -> &'static str {
        match self {
            ExportFormat::Parquet => "parquet",
            ExportFormat::HfArrow => "hf_arrow",
        }
    }
}

/// The fields of a `vqa`/`split` record that become columns.
#[derive(Debug, Clone, Deserialize)]
struct Row {
    id: String,
    image: String,
    problem: String,
    solution: String,
    answer: String,
    #[serde(default)]
    options: Vec<String>,
    class: String,
    #[serde(default)]
    class_name: Option<String>,
    case: String,
    patient_id: String,
    slice: i32,
    boxes: Vec<BBox>,
    /// Boxes in the coordinates of the rendered (possibly resized) image.
    #[serde(default)]
    image_boxes: Option<Vec<BBox>>,
    split: String,
}

/// Row groups (as index ranges into the split's rows) of one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardPlan {
    groups: Vec<std::ops::Range<usize>>,
}

/// Cut rows with the given payload sizes into row groups and shards.
fn plan_shards(sizes: &[u64], row_group_bytes: u64, shard_bytes: u64) -> Vec<ShardPlan> {
    let mut shards = vec![];
    let mut groups = vec![];
    let (mut start, mut group_size, mut shard_size) = (0usize, 0u64, 0u64);
    for (i, s) in sizes.iter().enumerate() {
        group_size += s;
        if group_size >= row_group_bytes || i + 1 == sizes.len() {
            groups.push(start..i + 1);
            shard_size += group_size;
            start = i + 1;
            group_size = 0;
            if shard_size >= shard_bytes || i + 1 == sizes.len() {
                shards.push(ShardPlan { groups: std::mem::take(&mut groups) });
                shard_size = 0;
            }
        }
    }
    shards
}

/// File name an image gets in the `path` field (what `datasets` stores).
fn image_name(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap_or(rel)
}

fn batch(schema: &SchemaRef, rows: &[Row], images_dir: &Path) -> anyhow::Result<RecordBatch> {
    let mut image_bytes = Vec::with_capacity(rows.len());
    for r in rows {
        let p = images_dir.join(&r.image);
        image_bytes.push(std::fs::read(&p).with_context(|| format!("reading image of `{}`: {}", r.id, p.display()))?);
    }
    let strings =
        |f: &dyn Fn(&Row) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let image: ArrayRef = Arc::new(StructArray::try_new(
        image_fields(),
        vec![
            Arc::new(BinaryArray::from_iter_values(image_bytes.iter())),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| image_name(&r.image)))),
        ],
        None,
    )?);
    let options_values = StringArray::from_iter_values(rows.iter().flat_map(|r| r.options.iter()));
    let options: ArrayRef = Arc::new(ListArray::try_new(
        list_item(DataType::Utf8),
        OffsetBuffer::from_lengths(rows.iter().map(|r| r.options.len())),
        Arc::new(options_values),
        None,
    )?);
    let row_boxes = |r: &Row| r.image_boxes.as_ref().unwrap_or(&r.boxes).clone();
    let all: Vec<Vec<BBox>> = rows.iter().map(row_boxes).collect();
    let coord = |f: fn(&BBox) -> u32| -> anyhow::Result<ArrayRef> {
        let v: Result<Vec<i32>, _> = all.iter().flatten().map(|b| i32::try_from(f(b))).collect();
        Ok(Arc::new(Int32Array::from(v.context("box coordinate exceeds int32")?)))
    };
    let box_struct = StructArray::try_new(
        box_fields(),
        vec![coord(|b| b.x0)?, coord(|b| b.y0)?, coord(|b| b.x1)?, coord(|b| b.y1)?],
        None,
    )?;
    let boxes: ArrayRef = Arc::new(ListArray::try_new(
        list_item(DataType::Struct(box_fields())),
        OffsetBuffer::from_lengths(all.iter().map(Vec::len)),
        Arc::new(box_struct),
        None,
    )?);
    let mut named: HashMap<&str, ArrayRef> = HashMap::from([
        (column::ID, strings(&|r| &r.id)),
        (column::IMAGE, image),
        (column::PROBLEM, strings(&|r| &r.problem)),
        (column::SOLUTION, strings(&|r| &r.solution)),
        (column::ANSWER, strings(&|r| &r.answer)),
        (column::OPTIONS, options),
        (column::CLASS, strings(&|r| &r.class)),
        (column::CLASS_NAME, strings(&|r| r.class_name.as_deref().unwrap_or(&r.class))),
        (column::CASE_ID, strings(&|r| &r.case)),
        (column::PATIENT_ID, strings(&|r| &r.patient_id)),
        (column::SLICE_INDEX, Arc::new(Int32Array::from(rows.iter().map(|r| r.slice).collect::<Vec<_>>())) as ArrayRef),
        (column::BOXES, boxes),
        (column::SPLIT, strings(&|r| &r.split)),
    ]);
    // The schema fixes the order; every column it declares must be filled.
    let columns = schema
        .fields()
        .iter()
        .map(|f| named.remove(f.name().as_str()).with_context(|| format!("no values for column `{}`", f.name())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn writer_properties(level: i32) -> anyhow::Result<WriterProperties> {
    let image_bytes = ColumnPath::from(vec!["image".to_string(), "bytes".to_string()]);
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(level)?))
        // We close row groups ourselves (see plan_shards).
        .set_max_row_group_row_count(None)
        .set_column_dictionary_enabled(image_bytes.clone(), false)
        .set_column_statistics_enabled(image_bytes, EnabledStatistics::None)
        .build())
}

/// Where the records of each split live: `items.jsonl` files found in the inputs.
fn find_split_sources(ctx: &StageContext) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for art in ctx.inputs("split") {
        let direct = art.path.join("items.jsonl");
        if direct.is_file() {
            let name = art
                .output
                .clone()
                .or_else(|| art.path.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            out.insert(name, direct);
            continue;
        }
        let entries = std::fs::read_dir(&art.path).with_context(|| format!("listing {}", art.path.display()))?;
        for e in entries {
            let e = e?;
            let items = e.path().join("items.jsonl");
            if items.is_file() {
                out.insert(e.file_name().to_string_lossy().into_owned(), items);
            }
        }
    }
    Ok(out)
}

struct SplitSummary {
    name: String,
    rows: usize,
    bytes: u64,
    shards: Vec<String>,
    classes: BTreeMap<String, usize>,
    patients: usize,
}

fn dataset_card(params: &ParquetExportParams, splits: &[SplitSummary]) -> String {
    let mut s = String::from("---\n");
    // The configs tell `load_dataset(DIR)` where the Parquet shards are; a
    // save_to_disk layout is loaded with `load_from_disk(DIR)` instead.
    if params.format == ExportFormat::Parquet {
        s += "configs:\n- config_name: default\n  data_files:\n";
        for sp in splits {
            s += &format!("  - split: {0}\n    path: {0}/*.parquet\n", sp.name);
        }
    }
    s += "dataset_info:\n  features:\n";
    s += &card_features_yaml().lines().map(|l| format!("  {l}\n")).collect::<String>();
    s += "  splits:\n";
    for sp in splits {
        s += &format!("  - name: {}\n    num_bytes: {}\n    num_examples: {}\n", sp.name, sp.bytes, sp.rows);
    }
    s += "---\n\n";
    s += &format!(
        "# {}\n\nChest-CT lesion-classification VQA built by the medreason-pipeline \
         (`lesion_slices` -> `render` -> `vqa` -> `split` -> `parquet_export`). One row per \
         (case, lesion class, axial slice): the rendered slice (`image`, PNG, with the zoom-in \
         patch when enabled), a 7-option multiple-choice `problem`, the `solution` \
         (`<answer> X </answer>`), the `answer` letter and the lesion `class`. Splits are by patient.\n\n",
        params.dataset_name
    );
    if params.format == ExportFormat::HfArrow {
        s += "Saved in the `datasets` `save_to_disk` layout: load it with `datasets.load_from_disk(<this directory>)`.\n\n";
    }
    s += "| split | rows | patients | shards |\n|---|---|---|---|\n";
    for sp in splits {
        s += &format!("| {} | {} | {} | {} |\n", sp.name, sp.rows, sp.patients, sp.shards.len());
    }
    s += "\n## Rows per class\n\n| class |";
    for sp in splits {
        s += &format!(" {} |", sp.name);
    }
    s += "\n|---|";
    s += &"---|".repeat(splits.len());
    s += "\n";
    let classes: std::collections::BTreeSet<&String> = splits.iter().flat_map(|sp| sp.classes.keys()).collect();
    for c in classes {
        s += &format!("| {c} |");
        for sp in splits {
            s += &format!(" {} |", sp.classes.get(c).copied().unwrap_or(0));
        }
        s += "\n";
    }
    s
}

pub struct ParquetExport;

impl StageKind for ParquetExport {
    type Params = ParquetExportParams;
    const KIND: &'static str = "parquet_export";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Sharded zstd Parquet in the Hugging Face `datasets` layout (Image struct column), or the `save_to_disk` Arrow layout, plus a dataset card";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::many("split", "`split` output (or its `train`/`test` outputs)"),
            InputSpec::one("images", "`render` output (PNG files the records point at)"),
        ];
        INPUTS
    }

    fn outputs(p: &ParquetExportParams) -> Vec<OutputSpec> {
        p.splits.iter().map(|s| OutputSpec::new(s.clone(), format!("{s} Parquet shards"))).collect()
    }

    fn resources(_: &ParquetExportParams) -> stage_api::Resources {
        stage_api::Resources { cpu: 0, memory_mb: 1024, ..Default::default() }
    }

    fn validate(p: &ParquetExportParams) -> Result<(), ParamError> {
        if p.splits.is_empty() {
            return Err(ParamError::new(&["splits"], "at least one split is needed"));
        }
        if let Some(bad) =
            p.splits.iter().find(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(ParamError::new(&["splits"], format!("split name `{bad}` must be [A-Za-z0-9_]+")));
        }
        for (key, v) in [("row_group_mb", p.row_group_mb), ("shard_mb", p.shard_mb)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(ParamError::new(&[key], format!("must be a positive size in MiB, got {v}")));
            }
        }
        if !(1..=22).contains(&p.zstd_level) {
            return Err(ParamError::new(&["zstd_level"], format!("must be in 1..=22, got {}", p.zstd_level)));
        }
        Ok(())
    }

    fn run(params: &ParquetExportParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let sources = find_split_sources(ctx)?;
        let images_dir = ctx.input("images")?.to_path_buf();
        let schema = export_schema();
        let props = writer_properties(params.zstd_level)?;
        let mib = |v: f64| (v * 1024.0 * 1024.0) as u64;
        let mut summaries = vec![];
        for split in &params.splits {
            let Some(src) = sources.get(split) else {
                bail!(
                    "split `{split}` not found in the `split` input (found: {:?}); expected <dir>/{split}/items.jsonl",
                    sources.keys().collect::<Vec<_>>()
                );
            };
            let rows: Vec<Row> = jsonl::read(src)?;
            let mut sizes = Vec::with_capacity(rows.len());
            for r in &rows {
                let p = images_dir.join(&r.image);
                let meta = std::fs::metadata(&p).with_context(|| format!("image of `{}`: {}", r.id, p.display()))?;
                sizes.push(meta.len() + (r.problem.len() + r.id.len() + 64) as u64);
            }
            let plan = plan_shards(&sizes, mib(params.row_group_mb), mib(params.shard_mb));
            let out_dir = ctx.output(split)?;
            let n = plan.len();
            let names: Vec<String> = match params.format {
                ExportFormat::Parquet => (0..n).map(|i| format!("{split}-{i:05}-of-{n:05}.parquet")).collect(),
                ExportFormat::HfArrow => (0..n).map(|i| hf_disk::shard_name(i, n)).collect(),
            };
            ctx.progress().start(&format!("{} {split}", params.format.label()), n as u64);
            let progress = ctx.progress();
            ctx.pool().install(|| {
                plan.par_iter().zip(names.par_iter()).try_for_each(|(shard, name)| -> anyhow::Result<()> {
                    let path = out_dir.join(name);
                    match params.format {
                        ExportFormat::Parquet => {
                            let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
                            let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props.clone()))?;
                            for g in &shard.groups {
                                w.write(&batch(&schema, &rows[g.clone()], &images_dir)?)
                                    .with_context(|| format!("writing {}", path.display()))?;
                                w.flush()?; // one planned row group
                            }
                            w.close().with_context(|| format!("closing {}", path.display()))?;
                        }
                        ExportFormat::HfArrow => {
                            let mut w = hf_disk::ShardWriter::create(&path, &schema)?;
                            for g in &shard.groups {
                                w.write(&batch(&schema, &rows[g.clone()], &images_dir)?)?;
                            }
                            w.finish()?;
                        }
                    }
                    progress.advance(1);
                    Ok(())
                })
            })?;
            progress.finish();
            if params.format == ExportFormat::HfArrow {
                hf_disk::write_metadata(&out_dir, &params.dataset_name, split, &hf_features_json(), &names)?;
            }
            let mut classes = BTreeMap::new();
            for r in &rows {
                *classes.entry(r.class.clone()).or_insert(0usize) += 1;
            }
            let patients = rows.iter().map(|r| r.patient_id.as_str()).collect::<std::collections::BTreeSet<_>>().len();
            let bytes = names.iter().map(|n| std::fs::metadata(out_dir.join(n)).map(|m| m.len()).unwrap_or(0)).sum();
            tracing::info!(split, rows = rows.len(), shards = n, bytes, "parquet written");
            summaries.push(SplitSummary {
                name: split.clone(),
                rows: rows.len(),
                bytes,
                shards: names,
                classes,
                patients,
            });
        }
        let info = json!({
            "dataset_name": params.dataset_name,
            "features": serde_json::from_str::<serde_json::Value>(&hf_features_json())?,
            "column_order": EXPORT_COLUMNS.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            "splits": summaries.iter().map(|s| (s.name.clone(), json!({
                "name": s.name, "num_examples": s.rows, "num_bytes": s.bytes, "num_patients": s.patients,
                "shards": s.shards, "class_counts": s.classes,
            }))).collect::<serde_json::Map<_, _>>(),
        });
        jsonl::write_json(&ctx.output_dir().join("dataset_info.json"), &info)?;
        if params.format == ExportFormat::HfArrow {
            hf_disk::write_dict(ctx.output_dir(), &params.splits)?;
        }
        std::fs::write(ctx.output_dir().join("README.md"), dataset_card(params, &summaries))
            .context("writing README.md")?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn plan_cuts_groups_and_shards_at_thresholds() {
        let sizes = [4, 4, 4, 4, 4, 4, 4];
        let plan = plan_shards(&sizes, 8, 16);
        assert_eq!(plan, vec![ShardPlan { groups: vec![0..2, 2..4] }, ShardPlan { groups: vec![4..6, 6..7] }]);
        assert_eq!(plan_shards(&[], 8, 16), vec![]);
        assert_eq!(plan_shards(&[100], 8, 16), vec![ShardPlan { groups: std::iter::once(0..1).collect() }]);
    }

    /// Write a split dir + images dir as `split`/`render` would.
    pub(crate) fn fixture(dir: &Path, train: usize, test: usize) -> (PathBuf, PathBuf) {
        let images = dir.join("render");
        std::fs::create_dir_all(images.join("images")).unwrap();
        let split = dir.join("split");
        for (side, n) in [("train", train), ("test", test)] {
            let mut recs = vec![];
            for i in 0..n {
                let id = format!("{side}_{i}_a_1/nodule_mass/{i:03}");
                let file = format!("images/{}.png", id.replace('/', "__"));
                let (w, h) = (28 + i as u32, 56);
                let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, i as u8]));
                img.save(images.join(&file)).unwrap();
                recs.push(json!({
                    "id": id, "image": file, "problem": format!("q{i}"), "solution": "<answer> D </answer>",
                    "answer": "D", "options": ["A. a", "B. b", "C. c", "D. nodules"], "class": "nodule_mass",
                    "class_name": "pulmonary nodules/masses", "case": format!("{side}_{i}_a_1"),
                    "patient_id": format!("{side}_{i}"), "slice": i, "split": side,
                    "boxes": [{"x0": 1, "y0": 2, "x1": 30, "y1": 40}],
                    "image_boxes": [{"x0": 1, "y0": 2, "x1": 3 + i, "y1": 4}, {"x0": 0, "y0": 0, "x1": 5, "y1": 5}],
                }));
            }
            std::fs::create_dir_all(split.join(side)).unwrap();
            jsonl::write(&split.join(side).join("items.jsonl"), &recs).unwrap();
        }
        (split, images)
    }

    pub(crate) fn export(dir: &Path, params: &ParquetExportParams) -> PathBuf {
        let (split, images) = fixture(dir, 9, 3);
        let out = dir.join("out");
        let mut ctx = StageContext::builder("export", &out)
            .input("split", "split", None, split)
            .input("images", "render", None, images)
            .threads(2)
            .build()
            .unwrap();
        ParquetExport::run(params, &mut ctx).unwrap();
        out
    }

    #[test]
    fn parquet_reads_back_with_the_parquet_crate() {
        let dir = tempfile::tempdir().unwrap();
        // Tiny row groups / shards to exercise the planner: ~3 rows per group.
        let p =
            ParquetExportParams { row_group_mb: 400.0 / 1048576.0, shard_mb: 800.0 / 1048576.0, ..Default::default() };
        let out = export(dir.path(), &p);
        let mut shards: Vec<_> = std::fs::read_dir(out.join("train")).unwrap().map(|e| e.unwrap().path()).collect();
        shards.sort();
        assert!(shards.len() > 1, "several shards: {shards:?}");
        let n = shards.len();
        assert!(shards[0].ends_with(format!("train-00000-of-{n:05}.parquet")));
        let mut ids = vec![];
        let mut groups = 0;
        for s in &shards {
            let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(s).unwrap()).unwrap();
            groups += builder.metadata().num_row_groups();
            let hf = builder.schema().metadata().get("huggingface").unwrap().clone();
            assert!(hf.contains(r#""image": {"_type": "Image"}"#), "{hf}");
            assert!(hf.contains(r#"[{"x0": {"dtype": "int32", "_type": "Value"}, "y0""#), "{hf}");
            for b in builder.build().unwrap() {
                let b = b.unwrap();
                let id = b.column_by_name("id").unwrap().as_string::<i32>();
                let image = b.column_by_name("image").unwrap().as_struct();
                let bytes = image.column_by_name("bytes").unwrap().as_binary::<i32>();
                let boxes = b.column_by_name("boxes").unwrap().as_list::<i32>();
                for r in 0..b.num_rows() {
                    let i = ids.len();
                    ids.push(id.value(r).to_string());
                    let img = image::load_from_memory(bytes.value(r)).unwrap();
                    assert_eq!((img.width(), img.height()), (28 + i as u32, 56));
                    let bx = boxes.value(r);
                    let bx = bx.as_struct();
                    assert_eq!(bx.len(), 2);
                    let x1 = bx.column_by_name("x1").unwrap().as_primitive::<arrow_array::types::Int32Type>();
                    assert_eq!(x1.value(0), 3 + i as i32, "image boxes are exported");
                }
            }
        }
        assert!(groups > shards.len(), "several row groups per shard");
        // The task contract's reader sees the rows the export wrote.
        let rows = stages_task::read_split(&out.join("train")).unwrap();
        assert_eq!(rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), ids);
        let first = &rows[0];
        assert_eq!(
            (first.answer.as_str(), first.class.as_str(), first.class_name.as_str(), first.options.len()),
            ("D", "nodule_mass", "pulmonary nodules/masses", 4)
        );
        assert!(rows.iter().all(|r| r.problem.starts_with('q') && r.image.is_some()));
        assert_eq!(ids, (0..9).map(|i| format!("train_{i}_a_1/nodule_mass/{i:03}")).collect::<Vec<_>>());
        let info: serde_json::Value = jsonl::read_json(&out.join("dataset_info.json")).unwrap();
        assert_eq!(info["splits"]["train"]["num_examples"], 9);
        assert_eq!(info["splits"]["test"]["num_examples"], 3);
        assert_eq!(info["splits"]["test"]["class_counts"]["nodule_mass"], 3);
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(card.contains("path: train/*.parquet") && card.contains("num_examples: 9"), "{card}");
    }

    #[test]
    fn hf_arrow_export_holds_the_same_rows_in_the_save_to_disk_layout() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let small = |format| ParquetExportParams {
            format,
            row_group_mb: 400.0 / 1048576.0,
            shard_mb: 800.0 / 1048576.0,
            ..Default::default()
        };
        let parquet = export(a.path(), &small(ExportFormat::Parquet));
        let arrow = export(b.path(), &small(ExportFormat::HfArrow));
        let dict: serde_json::Value = jsonl::read_json(&arrow.join("dataset_dict.json")).unwrap();
        assert_eq!(dict, json!({"splits": ["train", "test"]}));
        let state: serde_json::Value = jsonl::read_json(&arrow.join("train/state.json")).unwrap();
        let shards = state["_data_files"].as_array().unwrap();
        assert!(shards.len() > 1, "planned shards: {state}");
        assert_eq!(shards[0]["filename"], format!("data-00000-of-{:05}.arrow", shards.len()));
        assert_eq!(state["_split"], "train");
        let info: serde_json::Value = jsonl::read_json(&arrow.join("train/dataset_info.json")).unwrap();
        assert_eq!(info["features"]["image"], json!({"_type": "Image"}));
        for split in ["train", "test"] {
            let (p, h) = (stages_task::read_split(&parquet.join(split)), stages_task::read_split(&arrow.join(split)));
            assert_eq!(p.unwrap(), h.unwrap(), "{split}: same rows in both formats");
        }
        let card = std::fs::read_to_string(arrow.join("README.md")).unwrap();
        assert!(!card.contains("configs:") && card.contains("load_from_disk"), "{card}");
        // The default format stays out of the canonical params (cache keys of Parquet exports unchanged).
        let canonical = serde_json::to_value(ParquetExportParams::default()).unwrap();
        assert!(canonical.get("format").is_none(), "{canonical}");
        assert_eq!(serde_json::to_value(small(ExportFormat::HfArrow)).unwrap()["format"], "hf_arrow");
    }

    #[test]
    fn export_is_byte_reproducible() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let p = ParquetExportParams::default();
        let (oa, ob) = (export(a.path(), &p), export(b.path(), &p));
        let f = "train/train-00000-of-00001.parquet";
        assert_eq!(std::fs::read(oa.join(f)).unwrap(), std::fs::read(ob.join(f)).unwrap());
    }

    #[test]
    fn missing_split_and_missing_image_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (split, images) = fixture(dir.path(), 2, 0);
        std::fs::remove_dir_all(split.join("test")).unwrap();
        let mut ctx = StageContext::builder("export", dir.path().join("out"))
            .input("split", "split", None, &split)
            .input("images", "render", None, &images)
            .build()
            .unwrap();
        let err = ParquetExport::run(&ParquetExportParams::default(), &mut ctx).unwrap_err().to_string();
        assert!(err.contains("split `test` not found"), "{err}");
        std::fs::remove_file(images.join("images/train_0_a_1__nodule_mass__000.png")).unwrap();
        let p = ParquetExportParams { splits: vec!["train".into()], ..Default::default() };
        let err = format!("{:#}", ParquetExport::run(&p, &mut ctx).unwrap_err());
        assert!(err.contains("train_0_a_1/nodule_mass/000"), "{err}");
    }
}
