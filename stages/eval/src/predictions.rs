//! Per-item predictions of an eval run: `predictions.jsonl` (what the judge
//! and report stages read) and the same rows as `predictions.parquet` (for
//! pandas/`datasets` users); file names in [`crate::artifacts`].

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use stages_task::answer::{ExtractFailure, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum PredictionsError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}:{line}: not a prediction record: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
}

/// One scored completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    /// Class key of the item.
    pub class: String,
    /// Display name of the gold class (confusion-matrix label).
    pub class_name: String,
    /// Gold answer (option letter or free-form text).
    pub gold: String,
    /// Every accepted answer of a free-form benchmark item (TextVQA's human
    /// answers); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<String>,
    pub options: Vec<String>,
    /// The user text the model saw (after the prompt variant was applied).
    pub prompt: String,
    /// Generated text, including any forced prefix (e.g. `<think>`).
    pub completion: String,
    pub extracted: Option<String>,
    /// Display name of the class the answer names (None when invalid/unparseable).
    pub predicted_class: Option<String>,
    pub failure: Option<ExtractFailure>,
    pub format_ok: bool,
    pub valid: bool,
    /// Full credit.
    pub correct: bool,
    /// The benchmark credit in [0, 1] (partial for `vqa_accuracy`); absent
    /// in predictions written before eval v5 (then `correct` as 0/1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit: Option<f64>,
    pub outcome: Outcome,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `eos`, `stop_string` or `length`.
    pub finish: String,
}

impl Prediction {
    /// The item's credit: [`Self::credit`], else 1 when correct, 0 otherwise.
    pub fn credit(&self) -> f64 {
        self.credit.unwrap_or(if self.correct { 1.0 } else { 0.0 })
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> PredictionsError {
    PredictionsError::Io { path: path.into(), message: e.to_string() }
}

pub fn write_jsonl(path: &Path, rows: &[Prediction]) -> Result<(), PredictionsError> {
    let mut w = BufWriter::new(File::create(path).map_err(|e| io_err(path, e))?);
    for r in rows {
        serde_json::to_writer(&mut w, r).map_err(|e| io_err(path, e))?;
        w.write_all(b"\n").map_err(|e| io_err(path, e))?;
    }
    w.flush().map_err(|e| io_err(path, e))
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Prediction>, PredictionsError> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| io_err(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| PredictionsError::Parse {
            path: path.into(),
            line: i + 1,
            message: e.to_string(),
        })?);
    }
    Ok(out)
}

fn label<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Flat columns (options joined by newlines) so any Parquet reader opens it.
pub fn write_parquet(path: &Path, rows: &[Prediction]) -> Result<(), PredictionsError> {
    let s = |f: &dyn Fn(&Prediction) -> Option<String>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let b = |f: &dyn Fn(&Prediction) -> bool| -> ArrayRef {
        Arc::new(rows.iter().map(|r| Some(f(r))).collect::<BooleanArray>())
    };
    let n = |f: &dyn Fn(&Prediction) -> usize| -> ArrayRef {
        Arc::new(rows.iter().map(|r| Some(f(r) as i64)).collect::<Int64Array>())
    };
    let batch = RecordBatch::try_from_iter(vec![
        ("id", s(&|r| Some(r.id.clone()))),
        ("class", s(&|r| Some(r.class.clone()))),
        ("class_name", s(&|r| Some(r.class_name.clone()))),
        ("gold", s(&|r| Some(r.gold.clone()))),
        ("answers", s(&|r| Some(r.answers.join("\n")))),
        ("options", s(&|r| Some(r.options.join("\n")))),
        ("prompt", s(&|r| Some(r.prompt.clone()))),
        ("completion", s(&|r| Some(r.completion.clone()))),
        ("extracted", s(&|r| r.extracted.clone())),
        ("predicted_class", s(&|r| r.predicted_class.clone())),
        ("failure", s(&|r| r.failure.as_ref().map(label))),
        ("format_ok", b(&|r| r.format_ok)),
        ("valid", b(&|r| r.valid)),
        ("correct", b(&|r| r.correct)),
        ("credit", Arc::new(rows.iter().map(|r| Some(r.credit())).collect::<Float64Array>()) as ArrayRef),
        ("outcome", s(&|r| Some(label(&r.outcome)))),
        ("prompt_tokens", n(&|r| r.prompt_tokens)),
        ("completion_tokens", n(&|r| r.completion_tokens)),
        ("finish", s(&|r| Some(r.finish.clone()))),
    ])
    .map_err(|e| io_err(path, e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        // No writer version string: the same rows give the same bytes.
        .set_created_by("medreason-pipeline eval".into())
        .build();
    let file = File::create(path).map_err(|e| io_err(path, e))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(|e| io_err(path, e))?;
    w.write(&batch).map_err(|e| io_err(path, e))?;
    w.close().map_err(|e| io_err(path, e))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;
    use crate::artifacts::{PREDICTIONS_JSONL, PREDICTIONS_PARQUET};

    pub(crate) fn sample(id: &str, class: &str, completion: &str, correct: bool) -> Prediction {
        Prediction {
            id: id.into(),
            class: class.into(),
            class_name: class.into(),
            gold: "A".into(),
            answers: Vec::new(),
            options: vec!["A. x".into()],
            prompt: "q".into(),
            completion: completion.into(),
            extracted: Some("A".into()),
            predicted_class: Some(class.into()),
            failure: None,
            format_ok: true,
            valid: true,
            correct,
            credit: Some(if correct { 1.0 } else { 0.0 }),
            outcome: if correct { Outcome::Correct } else { Outcome::Wrong },
            prompt_tokens: 5,
            completion_tokens: 7,
            finish: "stop_string".into(),
        }
    }

    #[test]
    fn jsonl_round_trips_and_parquet_has_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut rows = vec![sample("a", "x", "<answer>A</answer>", true), sample("b", "y", "oops", false)];
        rows[1].extracted = None;
        rows[1].failure = Some(ExtractFailure::NoAnswerTag);
        let j = dir.path().join(PREDICTIONS_JSONL);
        write_jsonl(&j, &rows).unwrap();
        assert_eq!(read_jsonl(&j).unwrap(), rows);
        let p = dir.path().join(PREDICTIONS_PARQUET);
        write_parquet(&p, &rows).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap()).unwrap().build().unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        assert!(batches[0].column_by_name("failure").is_some());
        std::fs::write(&j, "{\"id\": 1}\n").unwrap();
        let e = read_jsonl(&j).unwrap_err().to_string();
        assert!(e.contains("predictions.jsonl:1"), "{e}");
    }
}
