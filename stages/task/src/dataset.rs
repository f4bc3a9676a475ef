//! [`VqaRow`]: one question as the training and evaluation stages see it;
//! the reader of a split into rows, and the writer of rows.
//!
//! [`read_split`] reads our own layouts: a directory of Parquet shards (the
//! `parquet_export` layout, [`crate::schema`], or any general VQA set with at
//! least a question (`problem` or `question`) and an `answer`), or a
//! `save_to_disk` directory with the same columns ([`crate::hf_disk`],
//! `parquet_export format = "hf_arrow"`). [`write_rows`] / [`RowWriter`]
//! write the columns of a row ([`crate::schema::ROW_COLUMNS`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray, StructArray};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::columns::{BatchColumns, ColumnError};
use crate::hf_disk::{HfDiskError, SavedDataset, is_saved_dataset};
use crate::schema::{ROW_COLUMNS, column, image_fields, row_schema};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(transparent)]
    Column(#[from] ColumnError),
    #[error(transparent)]
    Saved(#[from] HfDiskError),
    #[error(
        "{0}: no *.parquet files and no save_to_disk `state.json` (expected a split directory such as `export.test`)"
    )]
    Empty(PathBuf),
}

/// One question of a split.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VqaRow {
    pub id: String,
    /// Encoded image (PNG/JPEG) or None for text-only sets.
    pub image: Option<Vec<u8>>,
    /// The question as stored (for CT-RATE-VQA: already wrapped in a prompt).
    pub problem: String,
    /// The gold answer: an option letter, or the reference free-form answer.
    pub answer: String,
    /// Every accepted answer of a free-form benchmark (TextVQA's 10 human
    /// answers, ChartQA's labels); empty when the set has only `answer`.
    pub answers: Vec<String>,
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

/// The rows of one record batch in our column names; `start` is the number
/// of rows read before it (ids of sets without an `id` column).
pub fn rows_of_batch(cols: &BatchColumns<'_>, start: usize) -> Result<Vec<VqaRow>, DatasetError> {
    let n = cols.len();
    let problem = match cols.strings(column::PROBLEM)? {
        Some(p) => p,
        None => cols
            .strings(column::QUESTION)?
            .ok_or_else(|| cols.column_error(column::PROBLEM, "missing (expected `problem` or `question`)"))?,
    };
    let answer = cols.strings(column::ANSWER)?.ok_or_else(|| cols.column_error(column::ANSWER, "missing"))?;
    let answers = cols.string_lists(column::ANSWERS)?;
    let ids = cols.strings_or_ints(column::ID)?;
    let class = cols.strings(column::CLASS)?;
    let class_name = cols.strings(column::CLASS_NAME)?;
    let images = cols.images(column::IMAGE)?;
    let options = cols.string_lists(column::OPTIONS)?;
    let mut rows = Vec::with_capacity(n);
    for r in 0..n {
        let class_r = class.as_ref().map_or_else(|| "all".to_string(), |c| c[r].clone());
        rows.push(VqaRow {
            id: ids.as_ref().and_then(|i| i[r].clone()).unwrap_or_else(|| (start + r).to_string()),
            image: images.as_ref().and_then(|im| im[r].clone()),
            problem: problem[r].clone(),
            answer: answer[r].trim().to_string(),
            answers: answers.as_ref().map(|a| a[r].clone()).unwrap_or_default(),
            options: options.as_ref().map(|o| o[r].clone()).unwrap_or_default(),
            class_name: class_name.as_ref().map_or_else(|| class_r.clone(), |c| c[r].clone()),
            class: class_r,
        });
    }
    Ok(rows)
}

/// How big a split is, from the Parquet footers (no row is decoded):
/// what a plan can say about the rows a stage will hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSize {
    pub rows: u64,
    /// The split's Parquet bytes (images are stored as encoded PNG/JPEG, so
    /// close to the bytes the rows take once read).
    pub bytes: u64,
}

/// [`SplitSize`] of a split directory (or one Parquet file). A
/// `save_to_disk` directory has no footers: its Arrow stream shards are
/// read through once to count the rows.
pub fn split_size(dir: &Path) -> Result<SplitSize, DatasetError> {
    let mut size = SplitSize { rows: 0, bytes: 0 };
    if is_saved_dataset(dir) {
        let ds = SavedDataset::open(dir)?;
        for path in &ds.files {
            let meta = std::fs::metadata(path)
                .map_err(|e| DatasetError::File { path: path.clone(), message: e.to_string() })?;
            size.bytes += meta.len();
        }
        for b in ds.batches() {
            size.rows += b?.1.num_rows() as u64;
        }
        return Ok(size);
    }
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

/// Read every row of a split: Parquet files in name order, or the shards of
/// a `save_to_disk` directory in `state.json` order; rows in file order.
pub fn read_split(dir: &Path) -> Result<Vec<VqaRow>, DatasetError> {
    let mut rows = Vec::new();
    if is_saved_dataset(dir) {
        let ds = SavedDataset::open(dir)?;
        let mut shard = PathBuf::new();
        let mut first_row = 0;
        for b in ds.batches() {
            let (path, b) = b?;
            if path != shard {
                (shard, first_row) = (path.clone(), 0);
            }
            rows.extend(rows_of_batch(&BatchColumns::new(&b, &path, first_row), rows.len())?);
            first_row += b.num_rows();
        }
        return Ok(rows);
    }
    for path in parquet_files(dir)? {
        let file_err = |e: &dyn std::fmt::Display| DatasetError::File { path: path.clone(), message: e.to_string() };
        let file = File::open(&path).map_err(|e| file_err(&e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| file_err(&format!("not a readable Parquet file: {e}")))?
            .build()
            .map_err(|e| file_err(&e))?;
        let mut first_row = 0;
        for batch in reader {
            let b = batch.map_err(|e| file_err(&e))?;
            rows.extend(rows_of_batch(&BatchColumns::new(&b, &path, first_row), rows.len())?);
            first_row += b.num_rows();
        }
    }
    Ok(rows)
}

/// The record batch of `rows` in [`ROW_COLUMNS`] order.
pub fn rows_batch(rows: &[VqaRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let strings =
        |f: &dyn Fn(&VqaRow) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let lists = |f: &dyn Fn(&VqaRow) -> &[String]| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for r in rows {
            for v in f(r) {
                b.values().append_value(v);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let bytes: ArrayRef = Arc::new(rows.iter().map(|r| r.image.as_deref()).collect::<BinaryArray>());
    let paths: ArrayRef = Arc::new(rows.iter().map(|_| None::<&str>).collect::<StringArray>());
    let image: ArrayRef = Arc::new(StructArray::try_new(image_fields(), vec![bytes, paths], None)?);
    let columns: Vec<ArrayRef> = ROW_COLUMNS
        .iter()
        .map(|(name, _)| match *name {
            column::ID => strings(&|r| &r.id),
            column::IMAGE => image.clone(),
            column::PROBLEM => strings(&|r| &r.problem),
            column::ANSWER => strings(&|r| &r.answer),
            column::ANSWERS => lists(&|r| &r.answers),
            column::OPTIONS => lists(&|r| &r.options),
            column::CLASS => strings(&|r| &r.class),
            _ => strings(&|r| &r.class_name),
        })
        .collect();
    RecordBatch::try_new(row_schema(), columns)
}

/// Writes rows into one Parquet file ([`ROW_COLUMNS`], with the HF
/// `huggingface` schema metadata, zstd), one row group per [`Self::write`]
/// call, so a large set streams through without being held in memory.
pub struct RowWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
}

impl RowWriter {
    pub fn create(path: &Path) -> Result<Self, DatasetError> {
        let err = |e: &dyn std::fmt::Display| DatasetError::File { path: path.into(), message: e.to_string() };
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(None)
            // No writer version string: the same rows give the same bytes.
            .set_created_by("medreason-pipeline".into())
            .build();
        let file = File::create(path).map_err(|e| err(&e))?;
        let writer = ArrowWriter::try_new(file, row_schema(), Some(props)).map_err(|e| err(&e))?;
        Ok(Self { path: path.into(), writer })
    }

    pub fn write(&mut self, rows: &[VqaRow]) -> Result<(), DatasetError> {
        let err = |e: &dyn std::fmt::Display| DatasetError::File { path: self.path.clone(), message: e.to_string() };
        if rows.is_empty() {
            return Ok(());
        }
        let batch = rows_batch(rows).map_err(|e| err(&e))?;
        self.writer.write(&batch).map_err(|e| err(&e))?;
        self.writer.flush().map_err(|e| err(&e))
    }

    pub fn close(self) -> Result<(), DatasetError> {
        let path = self.path;
        self.writer.close().map_err(|e| DatasetError::File { path, message: e.to_string() })?;
        Ok(())
    }
}

/// Write `rows` as one Parquet file with the columns a [`VqaRow`] is read
/// from ([`ROW_COLUMNS`]: the export's names and types; the export adds
/// `solution`, the case, patient, slice and boxes).
pub fn write_rows(path: &Path, rows: &[VqaRow]) -> Result<(), DatasetError> {
    let mut w = RowWriter::create(path)?;
    w.write(rows)?;
    w.close()
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
            answers: Vec::new(),
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
    fn answers_round_trip_and_save_to_disk_dirs_read_like_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = row("q1", Some(vec![7]), "2", "all", "all");
        a.answers = vec!["2".into(), "two".into()];
        a.options.clear();
        let b = row("q2", None, "B", "emphysema", "emphysema");
        write_rows(&dir.path().join("val-00000-of-00001.parquet"), &[a.clone(), b.clone()]).unwrap();
        assert_eq!(read_split(dir.path()).unwrap(), [a.clone(), b.clone()]);

        // The same rows as `save_to_disk` shards.
        let saved = dir.path().join("saved");
        std::fs::create_dir_all(&saved).unwrap();
        let names = [crate::hf_disk::shard_name(0, 2), crate::hf_disk::shard_name(1, 2)];
        for (name, rows) in names.iter().zip([std::slice::from_ref(&a), std::slice::from_ref(&b)]) {
            let batch = rows_batch(rows).unwrap();
            let mut w = crate::hf_disk::ShardWriter::create(&saved.join(name), &batch.schema()).unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
        }
        let features = crate::schema::hf_features_json_of(&ROW_COLUMNS);
        crate::hf_disk::write_metadata(&saved, "t", "val", &features, &names).unwrap();
        assert_eq!(read_split(&saved).unwrap(), [a, b]);
        // What a plan reads of it: both shards' rows and bytes.
        let bytes: u64 = names.iter().map(|n| saved.join(n).metadata().unwrap().len()).sum();
        assert_eq!(split_size(&saved).unwrap(), SplitSize { rows: 2, bytes });
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
