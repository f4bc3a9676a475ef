//! [`VqaRow`]: one question as the training and evaluation stages see it,
//! and the reader of a Parquet split into rows: the `parquet_export` layout
//! ([`crate::schema`]) or any general VQA set with at least a question
//! (`problem` or `question`) and an `answer` (free-form benchmarks).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray, StructArray};
use arrow_schema::DataType;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::schema::{IMAGE_BYTES, column, image_fields};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: column `{column}`: {message}")]
    Column { path: PathBuf, column: String, message: String },
    #[error("{0}: no *.parquet files (expected a Parquet split directory such as `export.test`)")]
    Empty(PathBuf),
}

/// One question of a split.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaRow {
    pub id: String,
    /// Encoded image (PNG/JPEG) or None for text-only sets.
    pub image: Option<Vec<u8>>,
    /// The question as stored (for CT-RATE-VQA: already wrapped in a prompt).
    pub problem: String,
    pub answer: String,
    /// `"A. name"` strings; empty for free-form sets.
    pub options: Vec<String>,
    /// Class key (`class`) or "all" when the set has none.
    pub class: String,
    /// Display name of the class (`class_name`, else `class`).
    pub class_name: String,
}

/// Parquet files of a split directory (or the file itself), sorted by name.
pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| DatasetError::File { path: dir.into(), message: format!("cannot list directory: {e}") })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DatasetError::Empty(dir.into()));
    }
    Ok(files)
}

fn col_err(path: &Path, column: &str, message: impl Into<String>) -> DatasetError {
    DatasetError::Column { path: path.into(), column: column.into(), message: message.into() }
}

/// A string column (Utf8 or LargeUtf8) as owned values; None if absent.
fn strings(b: &RecordBatch, path: &Path, name: &str) -> Result<Option<Vec<String>>, DatasetError> {
    let Some(c) = b.column_by_name(name) else { return Ok(None) };
    let values: Vec<String> = match c.data_type() {
        DataType::Utf8 => {
            let a = c.as_string::<i32>();
            (0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect()
        }
        DataType::LargeUtf8 => {
            let a = c.as_string::<i64>();
            (0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect()
        }
        other => return Err(col_err(path, name, format!("expected a string column, found {other}"))),
    };
    Ok(Some(values))
}

fn images(b: &RecordBatch, path: &Path) -> Result<Option<Vec<Option<Vec<u8>>>>, DatasetError> {
    let Some(c) = b.column_by_name(column::IMAGE) else { return Ok(None) };
    let bytes = match c.data_type() {
        DataType::Struct(_) => c
            .as_struct()
            .column_by_name(IMAGE_BYTES)
            .ok_or_else(|| col_err(path, column::IMAGE, "struct has no `bytes` field (expected {bytes, path})"))?
            .clone(),
        DataType::Binary | DataType::LargeBinary => c.clone(),
        other => {
            return Err(col_err(
                path,
                column::IMAGE,
                format!("expected struct {{bytes, path}} or binary, found {other}"),
            ));
        }
    };
    let out = match bytes.data_type() {
        DataType::Binary => {
            let a = bytes.as_binary::<i32>();
            (0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i).to_vec())).collect()
        }
        DataType::LargeBinary => {
            let a = bytes.as_binary::<i64>();
            (0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i).to_vec())).collect()
        }
        other => return Err(col_err(path, "image.bytes", format!("expected binary, found {other}"))),
    };
    Ok(Some(out))
}

fn options(b: &RecordBatch, path: &Path) -> Result<Option<Vec<Vec<String>>>, DatasetError> {
    let Some(c) = b.column_by_name(column::OPTIONS) else { return Ok(None) };
    let DataType::List(_) = c.data_type() else {
        return Err(col_err(path, column::OPTIONS, format!("expected a list of strings, found {}", c.data_type())));
    };
    let list = c.as_list::<i32>();
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        if list.is_null(i) {
            out.push(Vec::new());
            continue;
        }
        let v = list.value(i);
        let s = v.as_string_opt::<i32>().ok_or_else(|| {
            col_err(path, column::OPTIONS, format!("expected list items of type string, found {}", v.data_type()))
        })?;
        out.push((0..s.len()).map(|j| s.value(j).to_string()).collect());
    }
    Ok(Some(out))
}

/// Read every row of a split (files in name order, rows in file order).
/// How big a split is, from the Parquet footers alone (no row is read):
/// what a plan can say about the rows a stage will hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSize {
    pub rows: u64,
    /// The split's Parquet bytes (images are stored as encoded PNG/JPEG, so
    /// close to the bytes the rows take once read).
    pub bytes: u64,
}

/// [`SplitSize`] of a split directory (or one Parquet file).
pub fn split_size(dir: &Path) -> Result<SplitSize, DatasetError> {
    let mut size = SplitSize { rows: 0, bytes: 0 };
    for path in parquet_files(dir)? {
        let file_err = |e: &dyn std::fmt::Display| DatasetError::File { path: path.clone(), message: e.to_string() };
        let file = File::open(&path).map_err(|e| file_err(&e))?;
        size.bytes += file.metadata().map_err(|e| file_err(&e))?.len();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| file_err(&format!("not a readable Parquet file: {e}")))?;
        size.rows += builder.metadata().file_metadata().num_rows().max(0) as u64;
    }
    Ok(size)
}

pub fn read_split(dir: &Path) -> Result<Vec<VqaRow>, DatasetError> {
    let mut rows = Vec::new();
    for path in parquet_files(dir)? {
        let file_err = |e: &dyn std::fmt::Display| DatasetError::File { path: path.clone(), message: e.to_string() };
        let file = File::open(&path).map_err(|e| file_err(&e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| file_err(&format!("not a readable Parquet file: {e}")))?
            .build()
            .map_err(|e| file_err(&e))?;
        for batch in reader {
            let b = batch.map_err(|e| file_err(&e))?;
            let n = b.num_rows();
            let problem = match strings(&b, &path, column::PROBLEM)? {
                Some(p) => p,
                None => strings(&b, &path, column::QUESTION)?
                    .ok_or_else(|| col_err(&path, column::PROBLEM, "missing (expected `problem` or `question`)"))?,
            };
            let answer =
                strings(&b, &path, column::ANSWER)?.ok_or_else(|| col_err(&path, column::ANSWER, "missing"))?;
            let start = rows.len();
            let ids =
                strings(&b, &path, column::ID)?.unwrap_or_else(|| (start..start + n).map(|i| i.to_string()).collect());
            let class = strings(&b, &path, column::CLASS)?;
            let class_name = strings(&b, &path, column::CLASS_NAME)?;
            let images = images(&b, &path)?;
            let options = options(&b, &path)?;
            for r in 0..n {
                let class_r = class.as_ref().map_or_else(|| "all".to_string(), |c| c[r].clone());
                rows.push(VqaRow {
                    id: ids[r].clone(),
                    image: images.as_ref().and_then(|im| im[r].clone()),
                    problem: problem[r].clone(),
                    answer: answer[r].trim().to_string(),
                    options: options.as_ref().map(|o| o[r].clone()).unwrap_or_default(),
                    class_name: class_name.as_ref().map_or_else(|| class_r.clone(), |c| c[r].clone()),
                    class: class_r,
                });
            }
        }
    }
    Ok(rows)
}

/// Write `rows` as one Parquet file with the columns a [`VqaRow`] is read
/// from (the export's names and types; the export adds `solution`, the case,
/// patient, slice and boxes). For splits built outside the data chain, such
/// as test fixtures.
pub fn write_rows(path: &Path, rows: &[VqaRow]) -> Result<(), DatasetError> {
    let err = |e: &dyn std::fmt::Display| DatasetError::File { path: path.into(), message: e.to_string() };
    let strings =
        |f: &dyn Fn(&VqaRow) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let bytes: ArrayRef = Arc::new(rows.iter().map(|r| r.image.as_deref()).collect::<BinaryArray>());
    let paths: ArrayRef = Arc::new(rows.iter().map(|_| None::<&str>).collect::<StringArray>());
    let image = StructArray::try_new(image_fields(), vec![bytes, paths], None).map_err(|e| err(&e))?;
    let mut options = ListBuilder::new(StringBuilder::new());
    for r in rows {
        for o in &r.options {
            options.values().append_value(o);
        }
        options.append(true);
    }
    let batch = RecordBatch::try_from_iter(vec![
        (column::ID, strings(&|r| &r.id)),
        (column::IMAGE, Arc::new(image) as ArrayRef),
        (column::PROBLEM, strings(&|r| &r.problem)),
        (column::ANSWER, strings(&|r| &r.answer)),
        (column::OPTIONS, Arc::new(options.finish()) as ArrayRef),
        (column::CLASS, strings(&|r| &r.class)),
        (column::CLASS_NAME, strings(&|r| &r.class_name)),
    ])
    .map_err(|e| err(&e))?;
    let file = File::create(path).map_err(|e| err(&e))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| err(&e))?;
    w.write(&batch).map_err(|e| err(&e))?;
    w.close().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, image: Option<Vec<u8>>, answer: &str, class: &str, class_name: &str) -> VqaRow {
        VqaRow {
            id: id.into(),
            image,
            problem: format!("Q {id}"),
            answer: answer.into(),
            options: ["A. airway abnormalities", "B. emphysema", "C. ground-glass opacity"].map(String::from).to_vec(),
            class: class.into(),
            class_name: class_name.into(),
        }
    }

    #[test]
    fn reads_export_layout_and_free_form_sets() {
        let dir = tempfile::tempdir().unwrap();
        let b = row("b", Some(vec![9]), "B", "emphysema", "emphysema");
        write_rows(&dir.path().join("test-00001-of-00002.parquet"), std::slice::from_ref(&b)).unwrap();
        let a = row("a", Some(vec![1, 2]), " A ", "airway", "airway abnormalities");
        let text_only = row("t", None, "C", "ggo", "ground-glass opacity");
        write_rows(&dir.path().join("test-00000-of-00002.parquet"), &[a, text_only.clone()]).unwrap();
        let rows = read_split(dir.path()).unwrap();
        assert_eq!(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a", "t", "b"]);
        let size = split_size(dir.path()).unwrap();
        let on_disk: u64 = parquet_files(dir.path()).unwrap().iter().map(|f| f.metadata().unwrap().len()).sum();
        assert_eq!(size, SplitSize { rows: 3, bytes: on_disk }, "rows from the footers alone");
        assert_eq!(rows[0].image.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!((rows[0].answer.as_str(), rows[0].class_name.as_str()), ("A", "airway abnormalities"));
        assert_eq!((&rows[1], &rows[2]), (&text_only, &b), "rows read back as written");

        // A general free-form set: question + answer only.
        let general = dir.path().join("general.parquet");
        let batch = RecordBatch::try_from_iter(vec![
            ("question", Arc::new(StringArray::from(vec!["2+2?"])) as ArrayRef),
            ("answer", Arc::new(StringArray::from(vec!["4"])) as ArrayRef),
        ])
        .unwrap();
        let mut w = ArrowWriter::try_new(File::create(&general).unwrap(), batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let rows = read_split(&general).unwrap();
        assert_eq!((rows[0].id.as_str(), rows[0].class.as_str(), rows[0].image.is_none()), ("0", "all", true));
    }

    #[test]
    fn missing_columns_and_empty_dirs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_split(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no *.parquet files"), "{e}");
        let f = dir.path().join("x.parquet");
        let batch =
            RecordBatch::try_from_iter(vec![("problem", Arc::new(StringArray::from(vec!["q"])) as ArrayRef)]).unwrap();
        let mut w = ArrowWriter::try_new(File::create(&f).unwrap(), batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let e = read_split(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x.parquet") && e.contains("column `answer`: missing"), "{e}");
        std::fs::write(&f, b"not parquet").unwrap();
        let e = read_split(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a readable Parquet file"), "{e}");
    }
}
