//! Stage `hf_disk_vqa`: a VQA dataset saved with `datasets`' `save_to_disk`
//! (how the authors released CT-RATE-VQA: Arrow IPC stream shards listed by
//! `state.json`, features in `dataset_info.json`, images as the HF `Image`
//! struct {bytes, path}) -> a split of VQA rows that `sft`, `grpo` and
//! `eval` read exactly like our own `parquet_export` output.
//!
//! Columns follow the R1-V / Med-R1 convention by default: `image`,
//! `problem` (the question with lettered options, possibly wrapped in a
//! prompt) and `solution` (`<answer> B </answer>`). The options are parsed
//! from `problem` (`A. name`, `A) name`, `(A) name` or `A: name`, one per
//! line or inline), the gold letter from `solution` (the first answer
//! block's content, else the whole text: `B`, `B. emphysema`, `(B)`, or an
//! option's name); the class is the gold option's name unless `columns.class`
//! names a column. `problem` is kept as stored: evaluate with
//! `prompt = "dataset"` when it already carries an instruction that is not
//! one of our templates.
//!
//! Output: `<name>-00000-of-00001.parquet` (task contract row layout) and `summary.json`.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use anyhow::{Context as _, bail};
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use stage_api::{ParamError, StageContext, StageKind};
use stages_task::answer::option_text;
use stages_task::columns::BatchColumns;
use stages_task::completion::Completion;
use stages_task::dataset::{RowWriter, VqaRow};
use stages_task::hf_disk::{SavedDataset, dict_splits, is_saved_dataset};
use stages_task::prompt::{NO_THINK_TEMPLATE, THINK_TEMPLATE, recover_question};

use crate::jsonl;

/// Column names (R1-V / Med-R1 convention by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DiskColumns {
    /// HF `Image` feature.
    pub image: String,
    /// Question with lettered options.
    pub problem: String,
    /// Gold answer: `<answer> B </answer>` or the bare letter.
    pub solution: String,
    /// Item id column (text or integer); default: `<name>/<row index>`.
    pub id: Option<String>,
    /// Class column; default: the name of the gold option.
    pub class: Option<String>,
}

impl Default for DiskColumns {
    fn default() -> Self {
        Self { image: "image".into(), problem: "problem".into(), solution: "solution".into(), id: None, class: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HfDiskVqaParams {
    /// A `save_to_disk` directory: one Dataset (`state.json`) or a
    /// DatasetDict (`dataset_dict.json` + one directory per split). Relative
    /// paths resolve against the recipe's directory; `plan` warns when it
    /// does not exist.
    pub path: PathBuf,
    /// The DatasetDict split to read (default: its only split).
    #[serde(default)]
    pub split: Option<String>,
    /// The split name the output carries (its shard name, what the report
    /// calls it). Default: the split read. The released CT-RATE-VQA test set
    /// is a DatasetDict whose one split is named `train`: set `name = "test"`.
    #[serde(default)]
    pub name: Option<String>,
    /// Column names, e.g. `{ problem = "question" }`.
    #[serde(default)]
    pub columns: DiskColumns,
    /// Read only the first `limit` rows.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `A.` / `A)` / `(A)` / `A:` followed by whitespace, at the start or after
/// whitespace: a candidate option marker.
static MARKER: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"(?:^|[\s\[])\(?([A-Z])[\.\):]\s+").ok());
/// A letter answer: `B`, `B.`, `(B)`, `B) emphysema`, `B: ...`.
static LETTER: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"^\(?([A-Z])(?:[\.\):]|\s|$)").ok());

/// The lettered options of a question, in order from `A`: each option's
/// text runs to the next option's marker (the last one to its line's end,
/// or to a Med-R1 instruction `Your task:` on that line), trailing `,`/`;`
/// dropped. A stray `A.` before the list restarts it. Fewer than 2 options:
/// None.
pub fn parse_options(problem: &str) -> Option<Vec<(char, String)>> {
    let re = MARKER.as_ref()?;
    // Markers as (letter, start of marker, end of marker).
    let mut seq: Vec<(char, usize, usize)> = Vec::new();
    for c in re.captures_iter(problem) {
        let (Some(m), Some(l)) = (c.get(0), c.get(1)) else { continue };
        let letter = l.as_str().chars().next().unwrap_or('?');
        let start = l.start() - usize::from(problem[..l.start()].ends_with('('));
        let expected = seq.last().map_or('A', |(p, _, _)| char::from(*p as u8 + 1));
        if letter == 'A' && seq.len() <= 1 {
            seq = vec![(letter, start, m.end())];
        } else if letter == expected && !seq.is_empty() {
            seq.push((letter, start, m.end()));
        }
    }
    if seq.len() < 2 {
        return None;
    }
    let mut out = Vec::with_capacity(seq.len());
    for (i, (letter, _, end)) in seq.iter().enumerate() {
        let text = match seq.get(i + 1) {
            Some((_, next, _)) => &problem[*end..*next],
            None => {
                let line = problem[*end..].lines().next().unwrap_or("");
                line.split("Your task:").next().unwrap_or(line)
            }
        };
        let text = text.trim().trim_end_matches([',', ';']).trim();
        if text.is_empty() {
            return None;
        }
        out.push((*letter, text.to_string()));
    }
    Some(out)
}

/// The gold letter of a `solution`: its first answer block's content (else
/// the whole text), read as a letter (`B`, `B.`, `(B)`, `B. emphysema`) or
/// as one option's name (case-insensitive).
pub fn parse_solution(solution: &str, options: &[(char, String)]) -> Result<char, String> {
    let parsed = Completion::parse(solution);
    let text = parsed.first_answer_block().map_or(solution, |b| b.content).trim();
    if text.is_empty() {
        return Err(format!("no answer in {solution:?} (expected `<answer> B </answer>` or a letter)"));
    }
    let letter =
        LETTER.as_ref().and_then(|re| re.captures(text)).and_then(|c| c.get(1)).and_then(|m| m.as_str().chars().next());
    let letter = letter.or_else(|| options.iter().find(|(_, name)| name.eq_ignore_ascii_case(text)).map(|(l, _)| *l));
    let Some(letter) = letter else {
        return Err(format!("answer {text:?} is neither an option letter nor an option's name"));
    };
    if !options.iter().any(|(l, _)| *l == letter) {
        let letters: String = options.iter().map(|(l, _)| *l).collect();
        return Err(format!("answer `{letter}` is not one of the options {letters}"));
    }
    Ok(letter)
}

/// The dataset directory to read and the split name it carries.
fn locate(root: &Path, params: &HfDiskVqaParams) -> anyhow::Result<(PathBuf, String)> {
    if is_saved_dataset(root) {
        if let Some(s) = &params.split {
            bail!("`path` {} is a single Dataset, not a DatasetDict: remove `split = \"{s}\"`", root.display());
        }
        let ds_split = SavedDataset::open(root)?.split;
        let name = params.name.clone().or(ds_split).unwrap_or_else(|| "train".into());
        return Ok((root.to_path_buf(), name));
    }
    let Some(splits) = dict_splits(root)? else {
        bail!(
            "`path` {}: neither a save_to_disk Dataset (state.json) nor a DatasetDict (dataset_dict.json)",
            root.display()
        );
    };
    let split = match (&params.split, splits.as_slice()) {
        (Some(s), _) if splits.contains(s) => s.clone(),
        (Some(s), _) => bail!("`split` `{s}` is not a split of {} (splits: {splits:?})", root.display()),
        (None, [only]) => only.clone(),
        (None, _) => bail!("`path` {} has splits {splits:?}: name one with `split`", root.display()),
    };
    Ok((root.join(&split), params.name.clone().unwrap_or(split)))
}

pub struct HfDiskVqa;

impl StageKind for HfDiskVqa {
    type Params = HfDiskVqaParams;
    const KIND: &'static str = "hf_disk_vqa";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "A `datasets` save_to_disk VQA set (the released CT-RATE-VQA; R1-V columns image/problem/solution) -> VQA rows for sft, grpo and eval";

    fn external_inputs(p: &HfDiskVqaParams, recipe_dir: &Path) -> Vec<PathBuf> {
        let root = if p.path.is_absolute() { p.path.clone() } else { recipe_dir.join(&p.path) };
        match &p.split {
            Some(s) if root.join(s).is_dir() => vec![root.join(s)],
            _ => vec![root],
        }
    }

    fn resources(_: &HfDiskVqaParams) -> stage_api::Resources {
        stage_api::Resources { cpu: 1, memory_mb: 2048, ..Default::default() }
    }

    fn validate(p: &HfDiskVqaParams) -> Result<(), ParamError> {
        if p.path.as_os_str().is_empty() {
            return Err(ParamError::new(&["path"], "`path` is empty: expected a save_to_disk directory"));
        }
        if p.limit == Some(0) {
            return Err(ParamError::new(&["limit"], "must be at least 1"));
        }
        if let Some(n) = &p.name
            && (n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(ParamError::new(&["name"], format!("split name `{n}` must be [A-Za-z0-9_]+")));
        }
        Ok(())
    }

    fn run(params: &HfDiskVqaParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let root = ctx.resolve(&params.path);
        if !root.exists() {
            bail!("`path` {} does not exist (a save_to_disk directory)", root.display());
        }
        let (dir, name) = locate(&root, params)?;
        let ds = SavedDataset::open(&dir)?;
        let c = &params.columns;
        ds.require_image(&c.image)?;
        for col in [Some(&c.problem), Some(&c.solution), c.id.as_ref(), c.class.as_ref()].into_iter().flatten() {
            ds.require_column(col)?;
        }
        let out_name = format!("{name}-00000-of-00001.parquet");
        let mut writer = RowWriter::create(&ctx.output_dir().join(&out_name))?;
        let limit = params.limit.unwrap_or(usize::MAX);
        let mut count = 0usize;
        let (mut shard, mut first_row) = (PathBuf::new(), 0usize);
        ctx.progress().start("hf_disk_vqa", 0);
        for b in ds.batches() {
            ctx.check_cancelled()?;
            if count >= limit {
                break;
            }
            let (path, b) = b?;
            if path != shard {
                (shard, first_row) = (path.clone(), 0);
            }
            let cols = BatchColumns::new(&b, &path, first_row);
            let missing = |col: &str| cols.column_error(col, "missing");
            let images = cols.images(&c.image)?.ok_or_else(|| missing(&c.image))?;
            let problems = cols.strings(&c.problem)?.ok_or_else(|| missing(&c.problem))?;
            let solutions = cols.strings(&c.solution)?.ok_or_else(|| missing(&c.solution))?;
            let ids = match &c.id {
                Some(col) => Some(cols.strings_or_ints(col)?.ok_or_else(|| missing(col))?),
                None => None,
            };
            let classes = match &c.class {
                Some(col) => Some(cols.strings_or_ints(col)?.ok_or_else(|| missing(col))?),
                None => None,
            };
            let mut rows = Vec::new();
            for r in 0..b.num_rows() {
                if count + rows.len() >= limit {
                    break;
                }
                let image = images[r].clone().ok_or_else(|| {
                    cols.row_error(r, &c.image, "no image (null, or a path-only image without bytes)")
                })?;
                // Options are parsed from the bare question when the problem is one of our prompts.
                let question =
                    recover_question(&problems[r], &[THINK_TEMPLATE, NO_THINK_TEMPLATE]).unwrap_or(&problems[r]);
                let options = parse_options(question).ok_or_else(|| {
                    cols.row_error(
                        r,
                        &c.problem,
                        "no lettered options (expected `A. name` / `A) name`, from A on, at least two)",
                    )
                })?;
                let letter = parse_solution(&solutions[r], &options).map_err(|e| cols.row_error(r, &c.solution, e))?;
                let gold_name = options.iter().find(|(l, _)| *l == letter).map(|(_, n)| n.clone()).unwrap_or_default();
                let class = classes.as_ref().and_then(|v| v[r].clone()).unwrap_or_else(|| gold_name.clone());
                let index = count + rows.len();
                rows.push(VqaRow {
                    id: ids.as_ref().and_then(|v| v[r].clone()).unwrap_or_else(|| format!("{name}/{index:06}")),
                    image: Some(image),
                    problem: problems[r].clone(),
                    answer: letter.to_string(),
                    answers: Vec::new(),
                    options: options.iter().map(|(l, n)| option_text(*l, n)).collect(),
                    class_name: if c.class.is_some() { class.clone() } else { gold_name },
                    class,
                });
            }
            count += rows.len();
            first_row += b.num_rows();
            writer.write(&rows)?;
            ctx.progress().advance(rows.len() as u64);
        }
        ctx.progress().finish();
        writer.close()?;
        if count == 0 {
            bail!("{}: the dataset has no rows", dir.display());
        }
        jsonl::write_json(
            &ctx.output_dir().join("summary.json"),
            &json!({
                "split": name, "rows": count, "file": out_name,
                "shards": ds.files.iter().filter_map(|f| f.file_name()).map(|f| f.to_string_lossy().into_owned()).collect::<Vec<_>>(),
                "columns": c,
            }),
        )
        .with_context(|| format!("writing summary of {}", dir.display()))?;
        tracing::info!(rows = count, split = %name, "save_to_disk split imported");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[(char, &str)]) -> Vec<(char, String)> {
        v.iter().map(|(l, n)| (*l, n.to_string())).collect()
    }

    #[test]
    fn options_are_parsed_in_the_usual_spellings() {
        let ours = "Which type of lesion is marked?\nOptions:\nA. airway abnormalities\nB. emphysema\nC. pleural effusion/thickening";
        let want = opts(&[('A', "airway abnormalities"), ('B', "emphysema"), ('C', "pleural effusion/thickening")]);
        assert_eq!(parse_options(ours).unwrap(), want);
        // Wrapped in an unknown instruction on the last option's line.
        let wrapped = format!("{ours} Your task: 1. Think (A, B, C) inside <answer>...</answer> tags.");
        assert_eq!(parse_options(&wrapped).unwrap(), want);
        let med_r1 = "What content appears in this image?\nA) Cardiac tissue\nB) Breast tissue";
        assert_eq!(parse_options(med_r1).unwrap(), opts(&[('A', "Cardiac tissue"), ('B', "Breast tissue")]));
        let inline = "Is it (A) nodule, (B) mass; (C) cyst?";
        assert_eq!(parse_options(inline).unwrap(), opts(&[('A', "nodule"), ('B', "mass"), ('C', "cyst?")]));
        let stray = "Type A. lesion seen. Options: A. x B. y";
        assert_eq!(parse_options(stray).unwrap(), opts(&[('A', "x"), ('B', "y")]));
        assert!(parse_options("What is shown? Answer in one word.").is_none());
        assert!(parse_options("Options: A. only").is_none(), "one option is no choice");
        assert!(parse_options("e.g. U.S. data").is_none());
    }

    #[test]
    fn solutions_give_a_letter_among_the_options() {
        let o = opts(&[('A', "airway"), ('B', "emphysema")]);
        for s in ["<answer> B </answer>", "B", "<answer>B. emphysema</answer>", "(B)", "<answer>Emphysema</answer>"] {
            assert_eq!(parse_solution(s, &o), Ok('B'), "{s:?}");
        }
        assert!(parse_solution("<answer> C </answer>", &o).unwrap_err().contains("not one of the options AB"));
        assert!(parse_solution("<answer> </answer>", &o).unwrap_err().contains("no answer"));
        assert!(parse_solution("fibrosis", &o).unwrap_err().contains("neither an option letter"));
    }
}
