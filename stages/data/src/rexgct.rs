//! Stage `rexgct_index`: read a ReXGroundingCT-shaped dataset root
//! (`dataset.json`, CT volumes under `ct_dir`, masks under `mask_dir`),
//! validate every entry, map finding categories to the 7 lesion classes and
//! derive patient ids; writes `index.json` (format in the data-stage notes:
//! `root`, `classes`, `class_names`, `cases[]`, `skipped[]`, plus `counts`).
//!
//! The dataset comes either as the input artifact `dataset` (e.g. the
//! `phantom` stage) or as the external path `root` (its content is digested
//! into the cache key). Entry checks: a name we can derive a patient id
//! from, category codes either mapped (`class_map`) or known-dropped
//! (`dropped_categories`), both files present, NIfTI headers readable, mask
//! channels (4D `(F, X, Y, Z)`, `(X, Y, Z, F)` or 3D with one channel)
//! matching the CT grid and the number of findings. A bad entry is an error
//! naming the entry and the reason (`on_invalid = "error"`), or is listed in
//! `skipped` with the reason (`on_invalid = "skip"`). Entries whose findings
//! all map to no class are listed in `skipped` too (never an error).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stage_api::{InputSpec, ParamError, Resources, StageContext, StageKind};

use crate::nifti;

/// The 7 lesion classes, in the order used for options and reports.
pub const CLASSES: [&str; 7] = [
    "airway",
    "emphysema",
    "fibrosis",
    "nodule_mass",
    "consolidation_atelectasis",
    "ground_glass_opacity",
    "effusion_thickening",
];

/// Display names (paper wording) of [`CLASSES`], used in questions/options.
pub const CLASS_NAMES: [&str; 7] = [
    "airway abnormalities",
    "emphysema",
    "fibrosis-related changes",
    "pulmonary nodules/masses",
    "consolidation/atelectasis",
    "ground-glass opacity",
    "pleural effusion/thickening",
];

/// The CHOSEN category → class mapping of the domain notes (§2).
pub fn default_class_map() -> BTreeMap<String, Vec<String>> {
    let table: [(&str, &[&str]); 7] = [
        ("airway", &["1a", "1b"]),
        ("emphysema", &["1c"]),
        ("fibrosis", &["1d", "2a", "2f"]),
        ("nodule_mass", &["2d"]),
        ("consolidation_atelectasis", &["2b"]),
        ("ground_glass_opacity", &["2c"]),
        ("effusion_thickening", &["2e"]),
    ];
    table.iter().map(|(c, codes)| (c.to_string(), codes.iter().map(|s| s.to_string()).collect())).collect()
}

fn default_class_names() -> BTreeMap<String, String> {
    CLASSES.iter().zip(CLASS_NAMES).map(|(c, n)| (c.to_string(), n.to_string())).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    /// Fail the stage on the first invalid entry.
    Error,
    /// List invalid entries in `skipped` with the reason and go on.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RexgctIndexParams {
    /// Dataset root outside the cache (relative to the recipe); give this or the `dataset` input.
    pub root: Option<PathBuf>,
    /// Directory of the CT volumes under the root (a relative path must stay
    /// inside the root, symlinks included; an absolute path is used as is).
    pub ct_dir: String,
    /// Directory of the 4D masks under the root (same rule as `ct_dir`).
    pub mask_dir: String,
    /// Partitions of `dataset.json` to index (only train and val ship masks).
    pub splits: Vec<String>,
    /// Class → category codes (CHOSEN default: airway = 1a+1b, emphysema = 1c,
    /// fibrosis = 1d+2a+2f, nodule_mass = 2d, consolidation_atelectasis = 2b,
    /// ground_glass_opacity = 2c, effusion_thickening = 2e).
    pub class_map: BTreeMap<String, Vec<String>>,
    /// Category codes deliberately left out (not an error): micronodules,
    /// other non-focal, pneumothorax, other focal.
    pub dropped_categories: Vec<String>,
    /// Display names of the classes (questions, options, reports).
    pub class_names: BTreeMap<String, String>,
    /// What to do with an invalid entry: `error` or `skip`.
    pub on_invalid: OnInvalid,
    /// Read the NIfTI headers to check mask channels against the CT grid and
    /// the findings (cheap: only the header is decompressed).
    pub check_headers: bool,
}

impl Default for RexgctIndexParams {
    fn default() -> Self {
        Self {
            root: None,
            ct_dir: "images".into(),
            mask_dir: "segmentations".into(),
            splits: vec!["train".into(), "val".into()],
            class_map: default_class_map(),
            dropped_categories: ["1e", "1f", "2g", "2h"].iter().map(|s| s.to_string()).collect(),
            class_names: default_class_names(),
            on_invalid: OnInvalid::Error,
            check_headers: true,
        }
    }
}

impl RexgctIndexParams {
    /// Category code → class.
    fn code_to_class(&self) -> BTreeMap<&str, &str> {
        let mut m = BTreeMap::new();
        for (class, codes) in &self.class_map {
            for code in codes {
                m.insert(code.as_str(), class.as_str());
            }
        }
        m
    }

    /// Classes in the canonical order first, then any extra ones by name.
    fn ordered_classes(&self) -> Vec<String> {
        let mut out: Vec<String> =
            CLASSES.iter().filter(|c| self.class_map.contains_key(**c)).map(|c| c.to_string()).collect();
        out.extend(self.class_map.keys().filter(|k| !CLASSES.contains(&k.as_str())).cloned());
        out
    }
}

pub struct RexgctIndex;

const INPUTS: &[InputSpec] =
    &[InputSpec::optional("dataset", "dataset root as an artifact (e.g. a `phantom` stage); or set `root`")];

impl StageKind for RexgctIndex {
    type Params = RexgctIndexParams;
    const KIND: &'static str = "rexgct_index";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Index a ReXGroundingCT root: validate entries, map categories to 7 classes, patient ids -> index.json";

    fn inputs() -> &'static [InputSpec] {
        INPUTS
    }

    fn resources(_params: &Self::Params) -> Resources {
        Resources { cpu: 0, memory_mb: 128, ..Resources::default() }
    }

    fn external_inputs(params: &Self::Params, recipe_dir: &Path) -> Vec<PathBuf> {
        params.root.iter().map(|r| if r.is_absolute() { r.clone() } else { recipe_dir.join(r) }).collect()
    }

    fn validate(params: &Self::Params) -> Result<(), ParamError> {
        if params.class_map.is_empty() {
            return Err(ParamError::new(&["class_map"], "needs at least one class"));
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (class, codes) in &params.class_map {
            if codes.is_empty() {
                return Err(ParamError::new(&["class_map", class], "lists no category codes"));
            }
            for code in codes {
                if let Some(prev) = seen.insert(code, class) {
                    return Err(ParamError::new(
                        &["class_map", class],
                        format!("category `{code}` is already mapped to `{prev}`"),
                    ));
                }
                if params.dropped_categories.contains(code) {
                    return Err(ParamError::new(
                        &["dropped_categories"],
                        format!("`{code}` is both dropped and mapped to `{class}`"),
                    ));
                }
            }
            if !params.class_names.contains_key(class) {
                return Err(ParamError::new(&["class_names"], format!("no display name for class `{class}`")));
            }
        }
        if params.splits.is_empty() {
            return Err(ParamError::new(&["splits"], "needs at least one partition"));
        }
        for (key, dir) in [("ct_dir", &params.ct_dir), ("mask_dir", &params.mask_dir)] {
            if !crate::paths::stays_inside(Path::new(dir)) {
                return Err(ParamError::new(&[key], format!("`{dir}` leaves the dataset root")).with_hint(
                    "a relative directory must stay inside the root (no `..`); write an absolute path to read from elsewhere",
                ));
            }
        }
        Ok(())
    }

    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let (root, external) = match (ctx.optional_input("dataset")?, &params.root) {
            (Some(_), Some(_)) => bail!("give either the `dataset` input or the `root` param, not both"),
            (None, None) => bail!("no dataset: set `root` (a ReXGroundingCT folder) or the `dataset` input"),
            (Some(dir), None) => (dir.to_path_buf(), false),
            (None, Some(r)) => (ctx.resolve(r), true),
        };
        // Canonical, so that files can be checked to resolve inside it.
        let root = root.canonicalize().with_context(|| format!("dataset root {}", root.display()))?;
        let index = build_index(params, &root, external, ctx)?;
        let out = ctx.output_dir().join("index.json");
        let mut text = serde_json::to_string_pretty(&index)?;
        text.push('\n');
        std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
        Ok(())
    }
}

/// One indexed case, or why it was left out.
enum Outcome {
    Case(Value),
    Invalid(String),
    Empty(String),
}

fn build_index(params: &RexgctIndexParams, root: &Path, external: bool, ctx: &StageContext) -> anyhow::Result<Value> {
    let json_path = root.join("dataset.json");
    let text = std::fs::read_to_string(&json_path).with_context(|| format!("reading {}", json_path.display()))?;
    let dataset: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", json_path.display()))?;
    let mut entries: Vec<(&str, &Value)> = Vec::new();
    for split in &params.splits {
        let list = dataset
            .get(split)
            .with_context(|| format!("{}: no partition `{split}` (has: {})", json_path.display(), keys_of(&dataset)))?;
        let list =
            list.as_array().with_context(|| format!("{}: `{split}` must be a list of entries", json_path.display()))?;
        entries.extend(list.iter().map(|e| (split.as_str(), e)));
    }
    let code_to_class = params.code_to_class();
    ctx.progress().start("rexgct_index", entries.len() as u64);
    let outcomes: Vec<(String, Outcome)> = ctx.pool().install(|| {
        entries
            .par_iter()
            .enumerate()
            .map(|(i, (split, entry))| {
                let name = entry
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{split}[{i}]"));
                let outcome = index_entry(params, &code_to_class, root, split, entry);
                ctx.progress().advance(1);
                (name, outcome)
            })
            .collect()
    });
    ctx.progress().finish();

    let mut cases = Vec::new();
    let mut skipped = Vec::new();
    let mut names = BTreeSet::new();
    let mut per_class: BTreeMap<String, usize> = BTreeMap::new();
    for (name, outcome) in outcomes {
        match outcome {
            Outcome::Case(case) => {
                if !names.insert(case["name"].as_str().unwrap_or_default().to_string()) {
                    let reason = "duplicate entry name".to_string();
                    if params.on_invalid == OnInvalid::Error {
                        bail!("{}: entry `{name}`: {reason}", json_path.display());
                    }
                    skipped.push(json!({"name": name, "reason": reason}));
                    continue;
                }
                for f in case["findings"].as_array().into_iter().flatten() {
                    *per_class.entry(f["class"].as_str().unwrap_or_default().to_string()).or_default() += 1;
                }
                cases.push(case);
            }
            Outcome::Invalid(reason) => {
                if params.on_invalid == OnInvalid::Error {
                    bail!(
                        "{}: entry `{name}`: {reason} (set on_invalid = \"skip\" to leave such entries out)",
                        json_path.display()
                    );
                }
                tracing::warn!(entry = %name, %reason, "skipping invalid entry");
                skipped.push(json!({"name": name, "reason": reason}));
            }
            Outcome::Empty(reason) => skipped.push(json!({"name": name, "reason": reason})),
        }
    }
    if cases.is_empty() {
        bail!("{}: no usable entries in {:?} ({} skipped)", json_path.display(), params.splits, skipped.len());
    }
    let classes = params.ordered_classes();
    let class_names: serde_json::Map<String, Value> = classes
        .iter()
        .map(|c| (c.clone(), json!(params.class_names.get(c).cloned().unwrap_or_else(|| c.clone()))))
        .collect();
    tracing::info!(cases = cases.len(), skipped = skipped.len(), "dataset indexed");
    Ok(json!({
        "root": if external { json!(root.to_string_lossy()) } else { Value::Null },
        "classes": classes,
        "class_names": class_names,
        "counts": {"cases": cases.len(), "skipped": skipped.len(), "findings_per_class": per_class},
        "cases": cases,
        "skipped": skipped,
    }))
}

fn keys_of(v: &Value) -> String {
    v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_else(|| "not an object".into())
}

/// `train_1741_b_2` → `train_1741` (partition prefix + patient number; the
/// number alone would merge unrelated train and valid patients).
pub fn patient_id(case: &str) -> Option<String> {
    let mut parts = case.split('_');
    let prefix = parts.next()?;
    let number = parts.next()?;
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!("{prefix}_{number}"))
}

fn index_entry(
    params: &RexgctIndexParams,
    code_to_class: &BTreeMap<&str, &str>,
    root: &Path,
    split: &str,
    entry: &Value,
) -> Outcome {
    match check_entry(params, code_to_class, root, split, entry) {
        Ok(Some(case)) => Outcome::Case(case),
        Ok(None) => Outcome::Empty("no finding maps to a lesion class".into()),
        Err(reason) => Outcome::Invalid(reason),
    }
}

/// A string-keyed object of an entry (`findings`, `categories`), keys "0".."n-1".
fn keyed<'a>(entry: &'a Value, field: &str) -> Result<BTreeMap<usize, &'a Value>, String> {
    let obj = match entry.get(field) {
        Some(Value::Object(o)) => o,
        Some(_) => return Err(format!("`{field}` must be an object keyed by finding index")),
        None => return Err(format!("missing `{field}`")),
    };
    obj.iter()
        .map(|(k, v)| {
            k.parse::<usize>().map(|i| (i, v)).map_err(|_| format!("`{field}` key `{k}` is not a finding index"))
        })
        .collect()
}

fn check_entry(
    params: &RexgctIndexParams,
    code_to_class: &BTreeMap<&str, &str>,
    root: &Path,
    split: &str,
    entry: &Value,
) -> Result<Option<Value>, String> {
    let file = entry.get("name").and_then(Value::as_str).ok_or("missing string field `name`")?;
    if file.contains('/') || file.contains('\\') || file.starts_with('.') {
        return Err(format!("name `{file}` must be a plain file name"));
    }
    let case = file
        .strip_suffix(".nii.gz")
        .or_else(|| file.strip_suffix(".nii"))
        .ok_or_else(|| format!("name `{file}` does not end in .nii.gz or .nii"))?;
    let patient = patient_id(case).ok_or_else(|| {
        format!("cannot derive a patient id from `{case}` (expected <partition>_<number>_..., e.g. train_1741_b_2)")
    })?;
    let findings = keyed(entry, "findings")?;
    let categories = keyed(entry, "categories")?;
    let n_findings = findings.len();
    if let Some(k) = findings.keys().find(|&&k| k >= n_findings) {
        return Err(format!("finding keys must be 0..{n_findings}, found {k}"));
    }
    let mut out = Vec::new();
    for (&ch, sentence) in &findings {
        let code = categories
            .get(&ch)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("finding {ch} has no category code in `categories`"))?;
        match code_to_class.get(code) {
            Some(class) => out.push(json!({
                "channel": ch,
                "category": code,
                "class": class,
                "sentence": sentence.as_str().unwrap_or_default(),
            })),
            None if params.dropped_categories.iter().any(|d| d == code) => {}
            None => {
                return Err(format!(
                    "finding {ch} has category code `{code}`, which is neither in class_map nor in dropped_categories"
                ));
            }
        }
    }

    let ct_rel = Path::new(&params.ct_dir).join(file);
    let mask_rel = Path::new(&params.mask_dir).join(file);
    let (ct, mask) = (root.join(&ct_rel), root.join(&mask_rel));
    for (what, dir, p) in [("CT volume", &params.ct_dir, &ct), ("mask", &params.mask_dir, &mask)] {
        if !p.is_file() {
            return Err(format!("{what} {} is missing", p.display()));
        }
        check_resolves_inside(root, Path::new(dir), p).map_err(|e| format!("{what} {e}"))?;
    }
    if params.check_headers {
        let ct_h = nifti::read_header(&ct).map_err(|e| e.to_string())?;
        let mask_h = nifti::read_header(&mask).map_err(|e| e.to_string())?;
        let grid: Vec<usize> = match ct_h.dims.as_slice() {
            [x, y, z] | [x, y, z, 1] => vec![*x, *y, *z],
            d => return Err(format!("CT {} has dims {d:?}; expected a 3D volume", ct.display())),
        };
        let channels = mask_channels(&mask_h.dims, &grid).map_err(|m| format!("mask {}: {m}", mask.display()))?;
        if channels != n_findings {
            return Err(format!(
                "mask {} has {channels} channel(s) but the entry lists {n_findings} finding(s)",
                mask.display()
            ));
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    Ok(Some(json!({
        "name": case,
        "patient_id": patient,
        "split": split,
        "ct": ct_rel.to_string_lossy(),
        "mask": mask_rel.to_string_lossy(),
        "findings": out,
    })))
}

/// A file found through a relative directory param must resolve inside the
/// (canonical) dataset root: a symlink in the dataset pointing elsewhere
/// makes the entry invalid. Files under an absolute directory param are
/// where the recipe said.
fn check_resolves_inside(root: &Path, dir: &Path, file: &Path) -> Result<(), String> {
    if dir.is_absolute() {
        return Ok(());
    }
    let real = file.canonicalize().map_err(|e| format!("{}: {e}", file.display()))?;
    if real.starts_with(root) {
        Ok(())
    } else {
        Err(format!(
            "{} resolves to {}, outside the dataset root {} (a symlink?); give the directory as an absolute path to read files from there",
            file.display(),
            real.display(),
            root.display()
        ))
    }
}

/// Number of finding channels of a mask whose spatial grid must equal `grid`:
/// `(F, X, Y, Z)`, `(X, Y, Z, F)` or 3D (one channel).
pub fn mask_channels(dims: &[usize], grid: &[usize]) -> Result<usize, String> {
    match dims {
        [x, y, z] if [*x, *y, *z] == grid[..] => Ok(1),
        [f, x, y, z] if [*x, *y, *z] == grid[..] => Ok(*f),
        [x, y, z, f] if [*x, *y, *z] == grid[..] => Ok(*f),
        _ => Err(format!(
            "dims {dims:?} match neither (F, {g0}, {g1}, {g2}), ({g0}, {g1}, {g2}, F) nor the 3D CT grid {grid:?}",
            g0 = grid[0],
            g1 = grid[1],
            g2 = grid[2]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with three entries: a good 4D channel-first case, a case with a
    /// 3D mask, and whatever `extra` adds.
    fn make_root(dir: &Path, extra: Vec<Value>) -> PathBuf {
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::create_dir_all(root.join("segmentations")).unwrap();
        let ct = vec![0i16; 4 * 3 * 2];
        let aff = nifti::identity();
        for name in ["train_12_a_1", "train_12_a_2", "valid_12_a_1", "train_5_b_1"] {
            nifti::write(&root.join(format!("images/{name}.nii.gz")), &[4, 3, 2], &ct, &aff, None).unwrap();
        }
        nifti::write(&root.join("segmentations/train_12_a_1.nii.gz"), &[2, 4, 3, 2], &[0u8; 48], &aff, None).unwrap();
        nifti::write(&root.join("segmentations/train_12_a_2.nii.gz"), &[4, 3, 2], &[0u8; 24], &aff, None).unwrap();
        nifti::write(&root.join("segmentations/valid_12_a_1.nii.gz"), &[4, 3, 2, 1], &[0u8; 24], &aff, None).unwrap();
        // Mask channel count disagrees with the findings (3 vs 1).
        nifti::write(&root.join("segmentations/train_5_b_1.nii.gz"), &[3, 4, 3, 2], &[0u8; 72], &aff, None).unwrap();
        let mut train = vec![
            json!({"name": "train_12_a_1.nii.gz", "findings": {"0": "Consolidation.", "1": "Micronodules."},
                   "categories": {"0": "2b", "1": "1e"}}),
            json!({"name": "train_12_a_2.nii.gz", "findings": {"0": "Micronodules."}, "categories": {"0": "1e"}}),
        ];
        train.extend(extra);
        let val = vec![json!({"name": "valid_12_a_1.nii.gz", "findings": {"0": "GGO."}, "categories": {"0": "2c"}})];
        std::fs::write(root.join("dataset.json"), json!({"train": train, "val": val, "test": []}).to_string()).unwrap();
        root
    }

    fn run(params: &RexgctIndexParams, dir: &Path) -> anyhow::Result<Value> {
        let out = dir.join("out");
        let _ = std::fs::remove_dir_all(&out);
        let mut ctx = StageContext::builder("index", &out).recipe_dir(dir).build()?;
        RexgctIndex::run(params, &mut ctx)?;
        Ok(serde_json::from_slice(&std::fs::read(out.join("index.json"))?)?)
    }

    #[test]
    fn patient_ids_keep_the_partition() {
        assert_eq!(patient_id("train_1741_b_2").as_deref(), Some("train_1741"));
        assert_eq!(patient_id("valid_1741_a_1").as_deref(), Some("valid_1741"));
        assert_eq!(patient_id("1741_a_1"), None);
        assert_eq!(patient_id("train_x_a"), None);
    }

    #[test]
    fn indexes_maps_and_skips_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        make_root(dir.path(), vec![]);
        let params = RexgctIndexParams { root: Some("root".into()), ..Default::default() };
        let index = run(&params, dir.path()).unwrap();
        assert_eq!(index["classes"].as_array().unwrap().len(), 7);
        assert_eq!(index["class_names"]["airway"], "airway abnormalities");
        assert!(index["root"].as_str().unwrap().ends_with("root"));
        let cases = index["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0]["name"], "train_12_a_1");
        assert_eq!(cases[0]["patient_id"], "train_12");
        assert_eq!(cases[0]["ct"], "images/train_12_a_1.nii.gz");
        // The dropped micronodule finding is left out, the channel kept.
        assert_eq!(
            cases[0]["findings"],
            json!([{"channel": 0, "category": "2b", "class": "consolidation_atelectasis", "sentence": "Consolidation."}])
        );
        assert_eq!(cases[1]["patient_id"], "valid_12");
        assert_eq!(cases[1]["split"], "val");
        let skipped = index["skipped"].as_array().unwrap();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0]["reason"].as_str().unwrap().contains("no finding maps"));
    }

    #[test]
    fn invalid_entries_error_or_skip() {
        let dir = tempfile::tempdir().unwrap();
        let extra = vec![
            json!({"name": "train_5_b_1.nii.gz", "findings": {"0": "Nodule."}, "categories": {"0": "2d"}}),
            json!({"name": "train_6_a_1.nii.gz", "findings": {"0": "Nodule."}, "categories": {"0": "2d"}}),
            json!({"name": "train_12_a_2.nii.gz", "findings": {"0": "Odd."}, "categories": {"0": "9z"}}),
            json!({"name": "scan.nii.gz", "findings": {}, "categories": {}}),
        ];
        make_root(dir.path(), extra);
        let mut params = RexgctIndexParams { root: Some("root".into()), ..Default::default() };
        let err = format!("{:#}", run(&params, dir.path()).unwrap_err());
        assert!(err.contains("train_5_b_1") && err.contains("3 channel(s)") && err.contains("on_invalid"), "{err}");

        params.on_invalid = OnInvalid::Skip;
        let index = run(&params, dir.path()).unwrap();
        let reasons: Vec<String> = index["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{}: {}", s["name"].as_str().unwrap(), s["reason"].as_str().unwrap()))
            .collect();
        let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
        assert!(has("train_5_b_1.nii.gz: mask") && has("channel(s)"), "{reasons:?}");
        assert!(has("train_6_a_1.nii.gz: CT volume") && has("is missing"), "{reasons:?}");
        assert!(has("`9z`"), "{reasons:?}");
        assert!(has("patient id"), "{reasons:?}");
        assert_eq!(index["cases"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn mask_layouts_are_recognised() {
        let grid = [4, 3, 2];
        assert_eq!(mask_channels(&[5, 4, 3, 2], &grid), Ok(5));
        assert_eq!(mask_channels(&[4, 3, 2, 5], &grid), Ok(5));
        assert_eq!(mask_channels(&[4, 3, 2], &grid), Ok(1));
        assert!(mask_channels(&[4, 3, 3], &grid).unwrap_err().contains("match neither"));
    }

    #[test]
    fn params_validation() {
        let mut p = RexgctIndexParams::default();
        p.class_map.get_mut("emphysema").unwrap().push("2d".into());
        let e = RexgctIndex::validate(&p).unwrap_err();
        assert!(e.message.contains("already mapped"), "{}", e.message);
        let mut p = RexgctIndexParams::default();
        p.class_map.insert("tumour".into(), vec!["2h".into()]);
        assert_eq!(RexgctIndex::validate(&p).unwrap_err().path, vec!["dropped_categories"]);
        // Parsing a recipe-style TOML table with a custom map.
        let table: toml::Table =
            "class_map = { nodule_mass = [\"2d\", \"1e\"] }\ndropped_categories = []\non_invalid = \"skip\""
                .parse()
                .unwrap();
        let p: RexgctIndexParams = stage_api::params::parse_params(table).unwrap();
        assert_eq!(p.ordered_classes(), vec!["nodule_mass"]);
        RexgctIndex::validate(&p).unwrap();
    }

    #[test]
    fn dataset_paths_stay_inside_the_root_unless_given_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let root = make_root(dir.path(), vec![]);
        let configure = |src: &str| stage_api::configure_params::<RexgctIndex>(src.parse().unwrap());
        for escape in ["../images", "images/../../x", "/"] {
            let src = format!("ct_dir = {escape:?}");
            if escape.starts_with('/') {
                configure(&src).unwrap();
                continue;
            }
            let e = configure(&src).unwrap_err();
            assert_eq!(e.path, vec!["ct_dir"], "{escape}");
            assert!(e.message.contains("leaves the dataset root"), "{}", e.message);
        }
        assert_eq!(configure("mask_dir = \"..\"").unwrap_err().path, vec!["mask_dir"]);
        configure("ct_dir = \"./images\"\nmask_dir = \"a/b\"").unwrap();

        // A symlink inside the root pointing outside it: that entry is invalid.
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let ct = root.join("images/train_12_a_1.nii.gz");
        std::fs::rename(&ct, outside.join("train_12_a_1.nii.gz")).unwrap();
        std::os::unix::fs::symlink(outside.join("train_12_a_1.nii.gz"), &ct).unwrap();
        let mut params = RexgctIndexParams { root: Some("root".into()), ..Default::default() };
        let e = format!("{:#}", run(&params, dir.path()).unwrap_err());
        assert!(e.contains("train_12_a_1") && e.contains("outside the dataset root"), "{e}");

        // The same volumes named by an absolute `ct_dir` are read where it says.
        std::fs::remove_file(&ct).unwrap();
        for other in ["train_12_a_2", "valid_12_a_1", "train_5_b_1"] {
            let name = format!("{other}.nii.gz");
            std::fs::rename(root.join("images").join(&name), outside.join(&name)).unwrap();
        }
        params.ct_dir = outside.to_str().unwrap().to_string();
        let index = run(&params, dir.path()).unwrap();
        assert_eq!(index["cases"].as_array().unwrap().len(), 2);
        assert_eq!(index["cases"][0]["ct"].as_str(), Some(outside.join("train_12_a_1.nii.gz").to_str().unwrap()));
    }

    #[test]
    fn missing_dataset_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", run(&RexgctIndexParams::default(), dir.path()).unwrap_err());
        assert!(e.contains("no dataset"), "{e}");
        let p = RexgctIndexParams { root: Some("nope".into()), ..Default::default() };
        let e = format!("{:#}", run(&p, dir.path()).unwrap_err());
        assert!(e.contains("nope"), "{e}");
    }
}
