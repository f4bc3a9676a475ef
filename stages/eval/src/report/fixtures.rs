//! Eval outputs on disk for the report's tests (metrics by the eval's own aggregation).

use std::path::Path;

use stages_task::answer::{ExtractFailure, Outcome};

use crate::artifacts::{GALLERY_DIR, GALLERY_JSON, METRICS_JSON, PREDICTIONS_JSONL};
use crate::eval::metrics_of;
use crate::metrics::{CiMethod, EvalSource, Metrics};
use crate::plots;
use crate::predictions::tests::sample;
use crate::predictions::{Prediction, write_jsonl};

pub(crate) fn write_eval(dir: &Path, accuracy_pattern: &[bool]) {
    write_eval_of(dir, accuracy_pattern, None);
}

/// The source of an eval of `model` on `dataset` (a data stage id), scored with `answer_match`.
pub(crate) fn source_on(model: &str, dataset: &str, prompt: &str, answer_match: &str) -> Option<EvalSource> {
    Some(EvalSource {
        model: model.into(),
        data: dataset.into(),
        split: None,
        prompt: prompt.into(),
        dataset: Some(dataset.into()),
        answer_match: Some(answer_match.into()),
    })
}

/// A free-form eval whose items earn `credits` (partial credit allowed).
pub(crate) fn write_scored(dir: &Path, credits: &[f64], source: Option<EvalSource>) {
    std::fs::create_dir_all(dir).unwrap();
    let preds: Vec<Prediction> = credits
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let mut p = sample(&format!("q{i}"), "all", "<answer>x</answer>", c >= 1.0);
            (p.options, p.predicted_class, p.credit) = (Vec::new(), None, Some(c));
            p
        })
        .collect();
    write_jsonl(&dir.join(PREDICTIONS_JSONL), &preds).unwrap();
    let m = Metrics { source, ..metrics_of(&preds, CiMethod::Wilson) };
    std::fs::write(dir.join(METRICS_JSON), serde_json::to_string(&m).unwrap()).unwrap();
}

pub(crate) fn source(model: &str, split: &str, prompt: &str) -> Option<EvalSource> {
    Some(EvalSource {
        model: model.into(),
        data: format!("export.{split}"),
        split: Some(split.into()),
        prompt: prompt.into(),
        dataset: None,
        answer_match: None,
    })
}

/// An eval of items alternating between two classes, correct where
/// `accuracy_pattern` says; item 3 (if any) is unparseable; item 0 has an image.
pub(crate) fn write_eval_of(dir: &Path, accuracy_pattern: &[bool], source: Option<EvalSource>) {
    std::fs::create_dir_all(dir.join(GALLERY_DIR)).unwrap();
    let classes = ["emphysema", "ground-glass opacity"];
    let preds: Vec<Prediction> = accuracy_pattern
        .iter()
        .enumerate()
        .map(|(i, &ok)| {
            let class = classes[i % 2];
            let mut p = sample(&format!("case{i}/s"), class, "<think>x < y & z</think><answer>A</answer>", ok);
            p.options = vec!["A. emphysema".into(), "B. ground-glass opacity".into()];
            p.gold = if class == "emphysema" { "A".into() } else { "B".into() };
            p.predicted_class = Some("emphysema".into());
            if i == 3 {
                (p.extracted, p.predicted_class, p.failure, p.valid, p.outcome) =
                    (None, None, Some(ExtractFailure::NoAnswerTag), false, Outcome::Unparseable);
            }
            p
        })
        .collect();
    write_jsonl(&dir.join(PREDICTIONS_JSONL), &preds).unwrap();
    let m = Metrics { source, ..metrics_of(&preds, CiMethod::Wilson) };
    std::fs::write(dir.join(METRICS_JSON), serde_json::to_string(&m).unwrap()).unwrap();
    let png = plots::encode_png(&[0, 0, 0, 255, 255, 255], 2, 1).unwrap();
    std::fs::write(dir.join(GALLERY_DIR).join("case0_s.img"), png).unwrap();
    std::fs::write(dir.join(GALLERY_DIR).join(GALLERY_JSON), r#"[{"id": "case0/s", "image": "case0_s.img"}]"#).unwrap();
}
