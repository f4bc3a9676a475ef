//! Stage `split`: patient-level train/test split (the paper's 8:2 by patient).
//!
//! Input `items` (any `items.jsonl` whose records have `patient_id` and
//! `class`, normally the `vqa` output). Outputs `train/items.jsonl` and
//! `test/items.jsonl` (records keep their order; `split` is set to the new
//! side and the original ReXGroundingCT partition moves to `source_split`),
//! plus `report.json` with patient/item counts per side and per class.
//!
//! Patients (sorted, then shuffled by the stage's seeded RNG) go to train
//! until `round(train_ratio * n)`; with `stratify = true` this is done per
//! group of patients sharing the same dominant class (their most frequent
//! item class, ties to the first in name order). A patient never appears on
//! both sides: the stage checks it and fails otherwise.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use stage_api::{InputSpec, OutputSpec, ParamError, StageContext, StageKind};

use crate::jsonl;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SplitParams {
    /// Fraction of patients in the train side (paper: 8:2).
    pub train_ratio: f64,
    /// Split each dominant-class group of patients separately so both sides
    /// see every class in about the same proportion.
    pub stratify: bool,
}

impl Default for SplitParams {
    fn default() -> Self {
        Self { train_ratio: 0.8, stratify: false }
    }
}

/// Number of train patients out of `n`: `round(ratio * n)`, keeping both
/// sides non-empty when there are at least two patients and 0 < ratio < 1.
fn train_count(n: usize, ratio: f64) -> usize {
    let k = (ratio * n as f64).round() as usize;
    if n >= 2 && ratio > 0.0 && ratio < 1.0 { k.clamp(1, n - 1) } else { k.min(n) }
}

/// Assign patients to train (`true`) or test, reproducibly for an RNG.
pub fn assign_patients(
    patient_classes: &BTreeMap<String, BTreeMap<String, usize>>,
    params: &SplitParams,
    rng: &mut impl rand::Rng,
) -> BTreeMap<String, bool> {
    let mut groups: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (patient, classes) in patient_classes {
        let group = if params.stratify {
            // max_by_key keeps the last maximum; iterate reversed so ties go to the first name.
            classes.iter().rev().max_by_key(|(_, n)| **n).map(|(c, _)| c.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        groups.entry(group).or_default().push(patient);
    }
    let mut out = BTreeMap::new();
    for (_, mut patients) in groups {
        patients.shuffle(rng);
        let k = train_count(patients.len(), params.train_ratio);
        for (i, p) in patients.into_iter().enumerate() {
            out.insert(p.to_string(), i < k);
        }
    }
    out
}

pub struct Split;

impl StageKind for Split {
    type Params = SplitParams;
    const KIND: &'static str = "split";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Patient-level train/test split (seeded, optional class stratification, leakage-checked)";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] =
            &[InputSpec::one("items", "items.jsonl with patient_id and class (the `vqa` output)")];
        INPUTS
    }

    fn outputs(_: &SplitParams) -> Vec<OutputSpec> {
        vec![
            OutputSpec::new("train", "items.jsonl of the train patients"),
            OutputSpec::new("test", "items.jsonl of the test patients"),
        ]
    }

    fn validate(p: &SplitParams) -> Result<(), ParamError> {
        if !(p.train_ratio > 0.0 && p.train_ratio < 1.0) {
            return Err(ParamError::new(&["train_ratio"], format!("must be in (0, 1), got {}", p.train_ratio)));
        }
        Ok(())
    }

    fn run(params: &SplitParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let items_path = ctx.input("items")?.join("items.jsonl");
        let items: Vec<Map<String, Value>> = jsonl::read(&items_path)?;
        let mut patient_classes: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        let mut keys = Vec::with_capacity(items.len());
        for (line, item) in items.iter().enumerate() {
            let field = |name: &str| -> anyhow::Result<String> {
                item.get(name).and_then(Value::as_str).map(str::to_string).with_context(|| {
                    format!("{}:{}: field `{name}` missing or not a string", items_path.display(), line + 1)
                })
            };
            let (patient, class) = (field("patient_id")?, field("class")?);
            *patient_classes.entry(patient.clone()).or_default().entry(class.clone()).or_default() += 1;
            keys.push((patient, class));
        }
        let assignment = assign_patients(&patient_classes, params, &mut ctx.rng("split"));

        let mut sides: BTreeMap<&str, Vec<Map<String, Value>>> = BTreeMap::from([("train", vec![]), ("test", vec![])]);
        let mut per_class: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
        let mut patients: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (mut item, (patient, class)) in items.into_iter().zip(keys) {
            let side = if assignment.get(&patient).copied().unwrap_or(false) { "train" } else { "test" };
            if let Some(old) = item.remove("split") {
                item.insert("source_split".into(), old);
            }
            item.insert("split".into(), Value::String(side.into()));
            *per_class.entry(side).or_default().entry(class).or_default() += 1;
            patients.entry(side).or_default().insert(patient);
            sides.entry(side).or_default().push(item);
        }
        let empty = BTreeSet::new();
        let (train_p, test_p) = (patients.get("train").unwrap_or(&empty), patients.get("test").unwrap_or(&empty));
        let leaked: Vec<&String> = train_p.intersection(test_p).collect();
        if !leaked.is_empty() {
            bail!("patient-level split leaked {} patient(s) into both sides, e.g. {}", leaked.len(), leaked[0]);
        }
        for (side, records) in &sides {
            jsonl::write(&ctx.output(side)?.join("items.jsonl"), records)?;
        }
        let report = json!({
            "train_ratio": params.train_ratio,
            "stratify": params.stratify,
            "patients": {"train": train_p.len(), "test": test_p.len()},
            "items": {"train": sides["train"].len(), "test": sides["test"].len()},
            "items_per_class": per_class,
            "patients_on_both_sides": 0,
        });
        jsonl::write_json(&ctx.output_dir().join("report.json"), &report)?;
        tracing::info!(
            train_patients = train_p.len(),
            test_patients = test_p.len(),
            train_items = sides["train"].len(),
            test_items = sides["test"].len(),
            "patient split"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(dir: &std::path::Path) -> std::path::PathBuf {
        // 50 patients, 1-4 items each, classes cycling; patient 0 has 3 classes.
        let mut recs = vec![];
        for p in 0..50 {
            for j in 0..(1 + p % 4) {
                let class = ["a", "b", "c"][(p + j * (p % 2)) % 3];
                recs.push(json!({"id": format!("train_{p}_a_1/{class}/{j:03}"), "patient_id": format!("train_{p}"),
                                 "class": class, "split": "train"}));
            }
        }
        let d = dir.join("items");
        std::fs::create_dir_all(&d).unwrap();
        jsonl::write(&d.join("items.jsonl"), &recs).unwrap();
        d
    }

    fn run(dir: &std::path::Path, p: &SplitParams, seed: u64, name: &str) -> (Vec<Value>, Vec<Value>, Value) {
        let input = items(dir);
        let out = dir.join(name);
        let mut ctx =
            StageContext::builder("split", &out).input("items", "vqa", None, input).seed(seed).build().unwrap();
        Split::run(p, &mut ctx).unwrap();
        (
            jsonl::read(&out.join("train/items.jsonl")).unwrap(),
            jsonl::read(&out.join("test/items.jsonl")).unwrap(),
            jsonl::read_json(&out.join("report.json")).unwrap(),
        )
    }

    fn patients(v: &[Value]) -> BTreeSet<String> {
        v.iter().map(|i| i["patient_id"].as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn no_patient_on_both_sides_and_counts_add_up() {
        let dir = tempfile::tempdir().unwrap();
        for stratify in [false, true] {
            let p = SplitParams { stratify, ..Default::default() };
            let (train, test, report) = run(dir.path(), &p, 3, &format!("out{stratify}"));
            let (tp, sp) = (patients(&train), patients(&test));
            assert!(tp.is_disjoint(&sp));
            assert_eq!(tp.len() + sp.len(), 50);
            if !stratify {
                assert_eq!(tp.len(), 40);
            }
            assert_eq!(report["patients"]["train"], tp.len());
            assert_eq!(report["items"]["test"], test.len());
            assert_eq!(train.len() + test.len(), (0..50).map(|p| 1 + p % 4).sum::<usize>());
            assert!(train.iter().all(|i| i["split"] == "train" && i["source_split"] == "train"));
            assert!(test.iter().all(|i| i["split"] == "test"));
        }
    }

    #[test]
    fn split_is_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let p = SplitParams::default();
        let a = run(dir.path(), &p, 5, "a");
        let b = run(dir.path(), &p, 5, "b");
        let c = run(dir.path(), &p, 6, "c");
        assert_eq!(patients(&a.0), patients(&b.0));
        assert_ne!(patients(&a.0), patients(&c.0));
    }

    #[test]
    fn stratified_groups_by_dominant_class() {
        let mut pc = BTreeMap::new();
        for i in 0..10 {
            pc.insert(format!("a{i}"), BTreeMap::from([("x".to_string(), 2), ("y".to_string(), 1)]));
            pc.insert(format!("b{i}"), BTreeMap::from([("x".to_string(), 1), ("y".to_string(), 1)])); // tie -> x
            pc.insert(format!("c{i}"), BTreeMap::from([("y".to_string(), 3)]));
        }
        let p = SplitParams { stratify: true, train_ratio: 0.7 };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let a = assign_patients(&pc, &p, &mut rng);
        // Group x has 20 patients -> 14 train; group y has 10 -> 7 train.
        let train_x = a.iter().filter(|(k, v)| **v && !k.starts_with('c')).count();
        let train_y = a.iter().filter(|(k, v)| **v && k.starts_with('c')).count();
        assert_eq!((train_x, train_y), (14, 7));
    }

    #[test]
    fn train_count_keeps_both_sides_non_empty() {
        assert_eq!(train_count(2, 0.8), 1);
        assert_eq!(train_count(10, 0.8), 8);
        assert_eq!(train_count(1, 0.8), 1);
        assert_eq!(train_count(3, 0.99), 2);
    }

    #[test]
    fn ratio_outside_unit_interval_is_rejected() {
        let err = Split::validate(&SplitParams { train_ratio: 1.0, ..Default::default() }).unwrap_err();
        assert_eq!(err.path, vec!["train_ratio"]);
    }

    use rand::SeedableRng;
}
