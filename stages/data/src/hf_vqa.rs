//! Stage `hf_vqa`: a general-VQA benchmark as downloaded from the Hugging
//! Face hub in its Parquet layout (`<split>-NNNNN-of-NNNNN[-hash].parquet`
//! shards, usually under `data/`, with the image as the HF `Image` struct
//! {bytes, path}) -> a split of VQA rows the `eval` stage scores (Table 2 of
//! the paper: ChartQA and TextVQA before and after training).
//!
//! Presets name the columns of the layouts the harness (lmms-eval) and the
//! hub use; `columns` overrides any of them, `preset = "custom"` names all:
//!
//! | preset | hub dataset | question | gold | class | default split |
//! |---|---|---|---|---|---|
//! | `chartqa` | `HuggingFaceM4/ChartQA` | `query` | `label` (list) | `human_or_machine` | `test` |
//! | `chartqa_lmms` | `lmms-lab/ChartQA` (lmms-eval's) | `question` | `answer` | `type` | `test` |
//! | `textvqa` | `lmms-lab/textvqa` (lmms-eval's) | `question` | `answers` (10 human answers) | - | `validation` |
//!
//! Output: `<split>-00000-of-00001.parquet` in the task contract's row layout
//! ([`stages_task::schema::ROW_COLUMNS`]: `answers` carries the gold list,
//! `answer` its most frequent entry) and `summary.json`. Score it with
//! `answer_match = "chartqa"` or `"vqa_accuracy"`.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use stage_api::{ParamError, StageContext, StageKind};
use stages_task::columns::{BatchColumns, class_label_names};
use stages_task::dataset::{RowWriter, VqaRow};

use crate::jsonl;

/// Rows per record batch read: benchmark images are large (TextVQA ~300 KB).
const READ_BATCH_ROWS: usize = 64;

/// A known layout: its columns and the split evaluated by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HfPreset {
    /// `HuggingFaceM4/ChartQA`: `image`, `query`, `label` (list), `human_or_machine` (ClassLabel).
    Chartqa,
    /// `lmms-lab/ChartQA` (what lmms-eval evaluates): `image`, `question`, `answer`, `type`.
    ChartqaLmms,
    /// `lmms-lab/textvqa` (what lmms-eval evaluates): `image`, `question`, `answers` (10), `question_id`.
    Textvqa,
    /// No preset: `columns` names at least `question` and `answer` or `answers`.
    Custom,
}

/// How the stored question becomes the row's question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuestionCase {
    /// As stored.
    AsIs,
    /// Python's `str.capitalize()` (first character upper case, the rest
    /// lower case), as lmms-eval's TextVQA prompt does (`textvqa_doc_to_text`).
    Capitalize,
}

/// Column names; unset ones come from the preset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HfColumns {
    /// HF `Image` struct {bytes, path} (or binary) column.
    pub image: Option<String>,
    /// Question text.
    pub question: Option<String>,
    /// Single gold answer (text).
    pub answer: Option<String>,
    /// List of accepted gold answers (or text: one answer).
    pub answers: Option<String>,
    /// Item id (text or integer); default: `<split>/<row index>`.
    pub id: Option<String>,
    /// Class (text, or an integer ClassLabel whose names the file's HF metadata declares).
    pub class: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HfVqaParams {
    /// Column layout: `chartqa`, `chartqa_lmms`, `textvqa` or `custom`.
    pub preset: HfPreset,
    /// The downloaded dataset: a directory searched (recursively) for the
    /// split's shards, or one Parquet file. Relative paths resolve against
    /// the recipe's directory; `plan` warns when it does not exist.
    pub path: PathBuf,
    /// Split to read: the shard name prefix (`test` reads `test-*.parquet`).
    /// Default: the preset's evaluation split (`test`, TextVQA `validation`).
    #[serde(default)]
    pub split: Option<String>,
    /// Read only the first `limit` rows, in shard order (quick subsets).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Column names overriding the preset's, e.g. `{ question = "query" }`.
    #[serde(default)]
    pub columns: HfColumns,
    /// `as_is` or `capitalize`; default: `capitalize` for `textvqa` (lmms-eval's prompt), else `as_is`.
    #[serde(default)]
    pub question_case: Option<QuestionCase>,
}

/// The resolved reading plan of a params set.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub image: String,
    pub question: String,
    pub answer: Option<String>,
    pub answers: Option<String>,
    pub id: Option<String>,
    pub class: Option<String>,
    pub split: String,
    pub question_case: QuestionCase,
}

impl HfVqaParams {
    pub fn layout(&self) -> Result<Layout, ParamError> {
        let s = |v: &str| Some(v.to_string());
        let (image, question, answer, answers, id, class, split, case) = match self.preset {
            HfPreset::Chartqa => {
                (s("image"), s("query"), None, s("label"), None, s("human_or_machine"), s("test"), QuestionCase::AsIs)
            }
            HfPreset::ChartqaLmms => {
                (s("image"), s("question"), s("answer"), None, None, s("type"), s("test"), QuestionCase::AsIs)
            }
            HfPreset::Textvqa => (
                s("image"),
                s("question"),
                None,
                s("answers"),
                s("question_id"),
                None,
                s("validation"),
                QuestionCase::Capitalize,
            ),
            HfPreset::Custom => (s("image"), None, None, None, None, None, None, QuestionCase::AsIs),
        };
        let c = &self.columns;
        let pick = |over: &Option<String>, preset: Option<String>| over.clone().or(preset).filter(|v| !v.is_empty());
        let question = pick(&c.question, question)
            .ok_or_else(|| ParamError::new(&["columns", "question"], "preset `custom` needs the question column"))?;
        let answer = pick(&c.answer, answer);
        let answers = pick(&c.answers, answers);
        if answer.is_none() && answers.is_none() {
            return Err(ParamError::new(&["columns", "answer"], "name the gold `answer` or `answers` column"));
        }
        let split = self.split.clone().or(split).ok_or_else(|| {
            ParamError::new(&["split"], "preset `custom` needs the split (the shard name prefix, e.g. `test`)")
        })?;
        Ok(Layout {
            image: pick(&c.image, image).unwrap_or_else(|| "image".into()),
            question,
            answer,
            answers,
            id: pick(&c.id, id),
            class: pick(&c.class, class),
            split,
            question_case: self.question_case.unwrap_or(case),
        })
    }
}

/// Python's `str.capitalize()`: first character upper case, the rest lower case.
pub fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
    }
}

/// The most frequent answer (ties: the first to occur); what the row shows
/// as its gold `answer` when the set gives only a list.
pub fn most_frequent(answers: &[String]) -> Option<String> {
    let mut best: Option<(&String, usize)> = None;
    for a in answers.iter().filter(|a| !a.trim().is_empty()) {
        let n = answers.iter().filter(|b| *b == a).count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((a, n));
        }
    }
    best.map(|(a, _)| a.trim().to_string())
}

/// Whether `name` is a shard of `split`: `<split>-....parquet` or `<split>.parquet`.
fn is_split_shard(name: &str, split: &str) -> bool {
    name.ends_with(".parquet")
        && (name == format!("{split}.parquet") || name.strip_prefix(split).is_some_and(|r| r.starts_with('-')))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// The shards of `split` under `path` (or `path` itself when it is a file), sorted by path.
pub fn split_shards(path: &Path, split: &str) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut all = Vec::new();
    walk(path, &mut all).with_context(|| format!("`path` {}: cannot list the directory", path.display()))?;
    let parquet: Vec<&PathBuf> = all.iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
    let mut shards: Vec<PathBuf> = parquet
        .iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| is_split_shard(n, split)))
        .map(|p| (*p).clone())
        .collect();
    shards.sort();
    if shards.is_empty() {
        let mut prefixes: Vec<String> = parquet
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.split(['-', '.']).next().map(str::to_string))
            .collect();
        prefixes.sort();
        prefixes.dedup();
        bail!(
            "`path` {}: no `{split}-*.parquet` shards for split `{split}` (Parquet files there are of: {prefixes:?})",
            path.display()
        );
    }
    Ok(shards)
}

/// The HF `features` declared in a Parquet file's `huggingface` schema metadata.
fn hf_features(builder: &ParquetRecordBatchReaderBuilder<File>) -> serde_json::Value {
    builder
        .schema()
        .metadata()
        .get("huggingface")
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|v| v.get("info").and_then(|i| i.get("features")).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// The rows of one shard, appended to `out` until `limit` rows are there.
fn read_shard(
    path: &Path,
    lay: &Layout,
    preset: HfPreset,
    limit: usize,
    writer: &mut RowWriter,
    count: &mut usize,
) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let features = hf_features(&builder);
    let have: Vec<String> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
    let needed = [
        Some(&lay.image),
        Some(&lay.question),
        lay.answer.as_ref(),
        lay.answers.as_ref(),
        lay.id.as_ref(),
        lay.class.as_ref(),
    ];
    for c in needed.into_iter().flatten() {
        if !have.contains(c) {
            bail!(
                "{}: column `{c}`: missing (the file has {have:?}; preset `{}` expects it: set `columns` to map this layout)",
                path.display(),
                serde_json::to_value(preset).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            );
        }
    }
    let label_names = lay.class.as_ref().and_then(|c| class_label_names(&features, c));
    let reader =
        builder.with_batch_size(READ_BATCH_ROWS).build().with_context(|| format!("reading {}", path.display()))?;
    let mut first_row = 0;
    for batch in reader {
        if *count >= limit {
            break;
        }
        let b = batch.with_context(|| format!("{}: reading a record batch", path.display()))?;
        let cols = BatchColumns::new(&b, path, first_row);
        let question = cols.strings(&lay.question)?.unwrap_or_default();
        let images = cols.images(&lay.image)?.unwrap_or_default();
        let answer = match &lay.answer {
            Some(c) => cols.strings(c)?,
            None => None,
        };
        let answers = match &lay.answers {
            Some(c) => cols.string_lists(c)?,
            None => None,
        };
        let ids = match &lay.id {
            Some(c) => cols.strings_or_ints(c)?,
            None => None,
        };
        let classes: Option<Vec<Option<String>>> = match &lay.class {
            None => None,
            Some(c) => match (&label_names, cols.ints(c)) {
                // An integer ClassLabel: its names from the file's HF features.
                (Some(names), Ok(Some(ints))) => Some(
                    ints.into_iter()
                        .map(|i| {
                            i.map(|i| {
                                usize::try_from(i)
                                    .ok()
                                    .and_then(|i| names.get(i).cloned())
                                    .unwrap_or_else(|| i.to_string())
                            })
                        })
                        .collect(),
                ),
                _ => cols.strings_or_ints(c)?,
            },
        };
        let mut rows = Vec::with_capacity(b.num_rows());
        for r in 0..b.num_rows() {
            if *count + rows.len() >= limit {
                break;
            }
            let image = images[r].clone().ok_or_else(|| {
                cols.row_error(r, &lay.image, "no image bytes (null, or a path-only image: expected the bytes inline)")
            })?;
            let list = answers.as_ref().map(|a| a[r].clone()).unwrap_or_default();
            let gold = match &answer {
                Some(a) if !a[r].trim().is_empty() => a[r].trim().to_string(),
                _ => most_frequent(&list).ok_or_else(|| {
                    let col = lay.answer.as_ref().or(lay.answers.as_ref()).cloned().unwrap_or_default();
                    cols.row_error(r, &col, "no gold answer")
                })?,
            };
            let index = *count + rows.len();
            let class = classes.as_ref().and_then(|c| c[r].clone()).unwrap_or_else(|| "all".into());
            rows.push(VqaRow {
                id: ids.as_ref().and_then(|i| i[r].clone()).unwrap_or_else(|| format!("{}/{index:06}", lay.split)),
                image: Some(image),
                problem: match lay.question_case {
                    QuestionCase::AsIs => question[r].clone(),
                    QuestionCase::Capitalize => capitalize(&question[r]),
                },
                answer: gold,
                answers: list,
                options: Vec::new(),
                class_name: class.clone(),
                class,
            });
        }
        *count += rows.len();
        writer.write(&rows)?;
        first_row += b.num_rows();
    }
    Ok(())
}

pub struct HfVqa;

impl StageKind for HfVqa {
    type Params = HfVqaParams;
    const KIND: &'static str = "hf_vqa";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "A general-VQA benchmark in its HF Parquet layout (ChartQA, TextVQA presets; column mapping) -> VQA rows with gold answer lists, for `eval`";

    fn external_inputs(p: &HfVqaParams, recipe_dir: &Path) -> Vec<PathBuf> {
        let root = if p.path.is_absolute() { p.path.clone() } else { recipe_dir.join(&p.path) };
        // Only the split's shards enter the key (a hub download holds every split).
        match p.layout().ok().and_then(|l| split_shards(&root, &l.split).ok()) {
            Some(shards) => shards,
            None => vec![root],
        }
    }

    fn resources(_: &HfVqaParams) -> stage_api::Resources {
        stage_api::Resources { cpu: 1, memory_mb: 1024, ..Default::default() }
    }

    fn validate(p: &HfVqaParams) -> Result<(), ParamError> {
        if p.path.as_os_str().is_empty() {
            return Err(ParamError::new(&["path"], "`path` is empty: expected the downloaded dataset"));
        }
        if p.limit == Some(0) {
            return Err(ParamError::new(&["limit"], "must be at least 1"));
        }
        let lay = p.layout()?;
        if lay.split.is_empty() || !lay.split.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ParamError::new(&["split"], format!("split `{}` must be [A-Za-z0-9_]+", lay.split)));
        }
        Ok(())
    }

    fn run(params: &HfVqaParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let lay = params.layout().map_err(|e| anyhow::anyhow!("param `{}`: {}", e.path.join("."), e.message))?;
        let root = ctx.resolve(&params.path);
        if !root.exists() {
            bail!("`path` {} does not exist (the downloaded dataset)", root.display());
        }
        let shards = split_shards(&root, &lay.split)?;
        let out_name = format!("{}-00000-of-00001.parquet", lay.split);
        let mut writer = RowWriter::create(&ctx.output_dir().join(&out_name))?;
        let limit = params.limit.unwrap_or(usize::MAX);
        let mut count = 0;
        ctx.progress().start("hf_vqa shards", shards.len() as u64);
        for shard in &shards {
            ctx.check_cancelled()?;
            if count >= limit {
                break;
            }
            read_shard(shard, &lay, params.preset, limit, &mut writer, &mut count)?;
            ctx.progress().advance(1);
        }
        ctx.progress().finish();
        writer.close()?;
        if count == 0 {
            bail!("`path` {}: split `{}` has no rows", root.display(), lay.split);
        }
        let rel = |p: &PathBuf| p.strip_prefix(&root).unwrap_or(p).display().to_string();
        jsonl::write_json(
            &ctx.output_dir().join("summary.json"),
            &json!({
                "preset": params.preset, "split": lay.split, "rows": count,
                "shards": shards.iter().map(rel).collect::<Vec<_>>(),
                "columns": {"image": lay.image, "question": lay.question, "answer": lay.answer,
                            "answers": lay.answers, "id": lay.id, "class": lay.class},
                "question_case": lay.question_case, "file": out_name,
            }),
        )?;
        tracing::info!(rows = count, split = %lay.split, shards = shards.len(), "benchmark split imported");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_and_overrides_win() {
        let p = |preset, columns| HfVqaParams {
            preset,
            path: "x".into(),
            split: None,
            limit: None,
            columns,
            question_case: None,
        };
        let l = p(HfPreset::Textvqa, HfColumns::default()).layout().unwrap();
        assert_eq!(
            (l.answers.as_deref(), l.split.as_str(), l.question_case),
            (Some("answers"), "validation", QuestionCase::Capitalize)
        );
        let l = p(HfPreset::Chartqa, HfColumns { question: Some("q".into()), ..Default::default() }).layout().unwrap();
        assert_eq!(
            (l.question.as_str(), l.answers.as_deref(), l.class.as_deref()),
            ("q", Some("label"), Some("human_or_machine"))
        );
        let e = p(HfPreset::Custom, HfColumns::default()).layout().unwrap_err();
        assert_eq!(e.path, ["columns", "question"]);
        let e = p(
            HfPreset::Custom,
            HfColumns { question: Some("q".into()), answer: Some("a".into()), ..Default::default() },
        )
        .layout()
        .unwrap_err();
        assert_eq!(e.path, ["split"]);
    }

    #[test]
    fn helpers_follow_python_and_hub_conventions() {
        assert_eq!(capitalize("what does THE sign say?"), "What does the sign say?");
        assert_eq!(capitalize("éCOLE"), "École");
        let a: Vec<String> = ["b", "a", "a", "b", "c"].map(String::from).to_vec();
        assert_eq!(most_frequent(&a).as_deref(), Some("b"), "tie: the first to occur");
        assert_eq!(most_frequent(&[]), None);
        assert!(is_split_shard("test-00000-of-00001.parquet", "test"));
        assert!(is_split_shard("train-00002-of-00003-194c9400785577a2.parquet", "train"));
        assert!(is_split_shard("test.parquet", "test"));
        assert!(
            !is_split_shard("testing-00000-of-00001.parquet", "test") && !is_split_shard("val-0.parquet", "validation")
        );
    }
}
