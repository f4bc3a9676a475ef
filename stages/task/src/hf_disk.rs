//! The Hugging Face `datasets` `save_to_disk` layout, read and written.
//!
//! A `Dataset.save_to_disk(dir)` directory holds Arrow IPC *stream* shards
//! (`data-00000-of-00003.arrow`, ...), `state.json` (whose `_data_files`
//! lists the shards in order, plus the fingerprint, format and split) and
//! `dataset_info.json` (whose `features` declare the columns: an `Image`
//! feature is stored as the struct {bytes: binary, path: string}). A
//! `DatasetDict.save_to_disk(dir)` directory holds `dataset_dict.json`
//! (`{"splits": [...]}`) and one such directory per split.
//!
//! This is how the authors released CT-RATE-VQA, and what
//! `datasets.load_from_disk` loads; `parquet_export` can write it too.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{DataType, Schema, SchemaRef};
use serde_json::{Value, json};

use crate::schema::{IMAGE_BYTES, IMAGE_PATH};

pub const STATE_JSON: &str = "state.json";
pub const DATASET_INFO_JSON: &str = "dataset_info.json";
pub const DATASET_DICT_JSON: &str = "dataset_dict.json";

#[derive(Debug, thiserror::Error)]
pub enum HfDiskError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: column `{column}`: {message}")]
    Column { path: PathBuf, column: String, message: String },
}

fn file_err(path: &Path, message: impl Into<String>) -> HfDiskError {
    HfDiskError::File { path: path.into(), message: message.into() }
}

fn read_json(path: &Path) -> Result<Value, HfDiskError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("not valid JSON: {e}")))
}

/// Whether `dir` is a `Dataset.save_to_disk` directory (has `state.json`).
pub fn is_saved_dataset(dir: &Path) -> bool {
    dir.join(STATE_JSON).is_file()
}

/// The splits of a `DatasetDict.save_to_disk` directory; None when `dir`
/// has no `dataset_dict.json`.
pub fn dict_splits(dir: &Path) -> Result<Option<Vec<String>>, HfDiskError> {
    let path = dir.join(DATASET_DICT_JSON);
    if !path.is_file() {
        return Ok(None);
    }
    let v = read_json(&path)?;
    let splits = v
        .get("splits")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| file_err(&path, "expected {\"splits\": [\"train\", ...]}"))?;
    Ok(Some(splits))
}

/// An opened `save_to_disk` directory: its validated shard list and features.
#[derive(Debug, Clone)]
pub struct SavedDataset {
    pub dir: PathBuf,
    /// Shards in `_data_files` order.
    pub files: Vec<PathBuf>,
    /// `dataset_info.json`'s `features` object.
    pub features: serde_json::Map<String, Value>,
    /// `state.json`'s `_split` (None when null).
    pub split: Option<String>,
    /// The Arrow schema of the shards (all shards must agree).
    pub schema: SchemaRef,
}

fn open_stream(path: &Path) -> Result<StreamReader<BufReader<File>>, HfDiskError> {
    let f = File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    StreamReader::try_new(BufReader::new(f), None)
        .map_err(|e| file_err(path, format!("not an Arrow IPC stream (what `save_to_disk` writes): {e}")))
}

impl SavedDataset {
    /// Read and check `state.json` and `dataset_info.json`: every shard of
    /// `_data_files` exists and is an Arrow IPC stream, the shards share one
    /// schema, and every column the schema has is declared in `features`.
    pub fn open(dir: &Path) -> Result<Self, HfDiskError> {
        let state_path = dir.join(STATE_JSON);
        let info_path = dir.join(DATASET_INFO_JSON);
        if !state_path.is_file() {
            let hint = if dir.join(DATASET_DICT_JSON).is_file() {
                " (this is a DatasetDict: name one of its splits)"
            } else {
                " (expected a directory written by `datasets`' save_to_disk)"
            };
            return Err(file_err(dir, format!("no {STATE_JSON}{hint}")));
        }
        let state = read_json(&state_path)?;
        let entries = state
            .get("_data_files")
            .and_then(Value::as_array)
            .ok_or_else(|| file_err(&state_path, "`_data_files`: expected a list of {\"filename\": ...}"))?;
        if entries.is_empty() {
            return Err(file_err(&state_path, "`_data_files` is empty: the dataset has no shards"));
        }
        let mut files = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let name = e.get("filename").and_then(Value::as_str).ok_or_else(|| {
                file_err(&state_path, format!("`_data_files[{i}]`: expected {{\"filename\": \"data-....arrow\"}}"))
            })?;
            // Shards live next to state.json; a path out of it is not a shard.
            if name.contains('/') || name.contains('\\') || name == ".." {
                return Err(file_err(&state_path, format!("`_data_files[{i}]`: `{name}` is not a file name")));
            }
            let path = dir.join(name);
            if !path.is_file() {
                return Err(file_err(&state_path, format!("`_data_files[{i}]`: shard `{name}` does not exist")));
            }
            files.push(path);
        }
        let split = state.get("_split").and_then(Value::as_str).map(str::to_string);
        let info = read_json(&info_path)?;
        let features = info
            .get("features")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| file_err(&info_path, "`features`: expected an object of column declarations"))?;
        let schema = open_stream(&files[0])?.schema();
        for f in &files[1..] {
            let other = open_stream(f)?.schema();
            if other.fields() != schema.fields() {
                return Err(file_err(f, format!("schema differs from {}", files[0].display())));
            }
        }
        if let Some(undeclared) = schema.fields().iter().find(|f| !features.contains_key(f.name())) {
            return Err(HfDiskError::Column {
                path: info_path,
                column: undeclared.name().clone(),
                message: format!(
                    "in the shards but not declared in `features` ({:?})",
                    features.keys().collect::<Vec<_>>()
                ),
            });
        }
        Ok(Self { dir: dir.into(), files, features, split, schema })
    }

    /// `column` must be declared in `features` and present in the shards.
    pub fn require_column(&self, column: &str) -> Result<(), HfDiskError> {
        if !self.features.contains_key(column) || self.schema.field_with_name(column).is_err() {
            return Err(HfDiskError::Column {
                path: self.dir.join(DATASET_INFO_JSON),
                column: column.into(),
                message: format!(
                    "not a column of the dataset (features: {:?})",
                    self.features.keys().collect::<Vec<_>>()
                ),
            });
        }
        Ok(())
    }

    /// `column` must be declared as an `Image` feature and stored as the
    /// struct {bytes: binary, path: string}.
    pub fn require_image(&self, column: &str) -> Result<(), HfDiskError> {
        self.require_column(column)?;
        let declared = self.features.get(column).and_then(|f| f.get("_type")).and_then(Value::as_str);
        if declared != Some("Image") {
            return Err(HfDiskError::Column {
                path: self.dir.join(DATASET_INFO_JSON),
                column: column.into(),
                message: format!(
                    "declared as {}, expected an Image feature ({{\"_type\": \"Image\"}})",
                    self.features.get(column).map_or_else(|| "nothing".into(), Value::to_string)
                ),
            });
        }
        let ok = match self.schema.field_with_name(column).map(|f| f.data_type().clone()) {
            Ok(DataType::Struct(fields)) => {
                let ty = |n: &str| fields.iter().find(|f| f.name() == n).map(|f| f.data_type().clone());
                matches!(ty(IMAGE_BYTES), Some(DataType::Binary | DataType::LargeBinary))
                    && matches!(ty(IMAGE_PATH), Some(DataType::Utf8 | DataType::LargeUtf8))
            }
            _ => false,
        };
        if !ok {
            let found = self.schema.field_with_name(column).map(|f| f.data_type().to_string()).unwrap_or_default();
            return Err(HfDiskError::Column {
                path: self.files[0].clone(),
                column: column.into(),
                message: format!(
                    "an Image feature must be stored as struct {{bytes: binary, path: string}}, found {found}"
                ),
            });
        }
        Ok(())
    }

    /// The record batches of every shard in order, with the shard they come from.
    pub fn batches(&self) -> impl Iterator<Item = Result<(PathBuf, RecordBatch), HfDiskError>> + '_ {
        self.files.iter().flat_map(|path| -> Box<dyn Iterator<Item = Result<(PathBuf, RecordBatch), HfDiskError>>> {
            match open_stream(path) {
                Err(e) => Box::new(std::iter::once(Err(e))),
                Ok(reader) => Box::new(reader.map(move |b| {
                    b.map(|b| (path.clone(), b)).map_err(|e| file_err(path, format!("reading a record batch: {e}")))
                })),
            }
        })
    }
}

/// Writes one Arrow IPC stream shard.
pub struct ShardWriter {
    path: PathBuf,
    writer: StreamWriter<BufWriter<File>>,
}

impl ShardWriter {
    pub fn create(path: &Path, schema: &Schema) -> Result<Self, HfDiskError> {
        let f = File::create(path).map_err(|e| file_err(path, format!("cannot create: {e}")))?;
        let writer = StreamWriter::try_new(BufWriter::new(f), schema).map_err(|e| file_err(path, e.to_string()))?;
        Ok(Self { path: path.into(), writer })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), HfDiskError> {
        self.writer.write(batch).map_err(|e| file_err(&self.path, e.to_string()))
    }

    pub fn finish(mut self) -> Result<(), HfDiskError> {
        self.writer.finish().map_err(|e| file_err(&self.path, e.to_string()))?;
        let mut inner = self.writer.into_inner().map_err(|e| file_err(&self.path, e.to_string()))?;
        std::io::Write::flush(&mut inner).map_err(|e| file_err(&self.path, e.to_string()))
    }
}

/// The shard names `save_to_disk` uses.
pub fn shard_name(i: usize, n: usize) -> String {
    format!("data-{i:05}-of-{n:05}.arrow")
}

/// 64-bit FNV-1a, hex: a stable fingerprint (`datasets` only needs a
/// string that identifies the content; it uses xxhash of its own state).
fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Write `state.json` and `dataset_info.json` for shards already written
/// into `dir` (`shards`: their file names, in order). `features_json` is the
/// features object as JSON text (column order kept).
pub fn write_metadata(
    dir: &Path,
    dataset_name: &str,
    split: &str,
    features_json: &str,
    shards: &[String],
) -> Result<(), HfDiskError> {
    let info_path = dir.join(DATASET_INFO_JSON);
    if !serde_json::from_str::<Value>(features_json).is_ok_and(|f| f.is_object()) {
        return Err(file_err(&info_path, format!("features: not a JSON object: {features_json}")));
    }
    let mut sizes = Vec::with_capacity(shards.len());
    for s in shards {
        let p = dir.join(s);
        sizes.push(std::fs::metadata(&p).map_err(|e| file_err(&p, e.to_string()))?.len().to_le_bytes());
    }
    let mut parts: Vec<&[u8]> = vec![features_json.as_bytes(), split.as_bytes(), dataset_name.as_bytes()];
    parts.extend(shards.iter().map(|s| s.as_bytes()));
    parts.extend(sizes.iter().map(|s| &s[..]));
    let state = json!({
        "_data_files": shards.iter().map(|s| json!({"filename": s})).collect::<Vec<_>>(),
        "_fingerprint": fingerprint(&parts),
        "_format_columns": null,
        "_format_kwargs": {},
        "_format_type": null,
        "_output_all_columns": false,
        "_split": split,
    });
    // The features object is written as given: its key order is the column
    // order (a serde_json map would sort the keys).
    let info = format!(
        "{{\n  \"citation\": \"\",\n  \"dataset_name\": {},\n  \"description\": \"\",\n  \"features\": {features_json},\n  \"homepage\": \"\",\n  \"license\": \"\"\n}}\n",
        Value::from(dataset_name)
    );
    let write = |path: &Path, text: String| std::fs::write(path, text).map_err(|e| file_err(path, e.to_string()));
    write(&dir.join(STATE_JSON), format!("{}\n", serde_json::to_string_pretty(&state).unwrap_or_default()))?;
    write(&info_path, info)
}

/// Write `dataset_dict.json` listing `splits` (each a sub-directory of `dir`).
pub fn write_dict(dir: &Path, splits: &[String]) -> Result<(), HfDiskError> {
    let path = dir.join(DATASET_DICT_JSON);
    std::fs::write(&path, format!("{}\n", json!({ "splits": splits }))).map_err(|e| file_err(&path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, StringArray};

    use super::*;

    fn batch(values: &[&str]) -> RecordBatch {
        RecordBatch::try_from_iter(vec![("q", Arc::new(StringArray::from(values.to_vec())) as ArrayRef)]).unwrap()
    }

    #[test]
    fn written_shards_read_back_in_state_order_and_bad_metadata_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let b = batch(&["x"]);
        let names = vec![shard_name(0, 2), shard_name(1, 2)];
        for (name, values) in names.iter().zip([&["a", "b"][..], &["c"][..]]) {
            let mut w = ShardWriter::create(&d.join(name), &b.schema()).unwrap();
            w.write(&batch(values)).unwrap();
            w.finish().unwrap();
        }
        let features = r#"{"q": {"dtype": "string", "_type": "Value"}}"#;
        write_metadata(d, "t", "test", features, &names).unwrap();
        let ds = SavedDataset::open(d).unwrap();
        assert_eq!(ds.split.as_deref(), Some("test"));
        let rows: Vec<usize> = ds.batches().map(|b| b.unwrap().1.num_rows()).collect();
        assert_eq!(rows, [2, 1]);
        assert!(ds.require_column("q").is_ok());
        let e = ds.require_image("q").unwrap_err().to_string();
        assert!(e.contains("dataset_info.json: column `q`: declared as") && e.contains("Image"), "{e}");
        let e = ds.require_column("image").unwrap_err().to_string();
        assert!(e.contains("column `image`: not a column"), "{e}");

        // A shard listed in state.json but missing.
        std::fs::remove_file(d.join(&names[1])).unwrap();
        let e = SavedDataset::open(d).unwrap_err().to_string();
        assert!(e.contains("state.json: `_data_files[1]`: shard `data-00001-of-00002.arrow` does not exist"), "{e}");
        // A column the features do not declare.
        write_metadata(d, "t", "test", r#"{"other": {"dtype": "string", "_type": "Value"}}"#, &names[..1]).unwrap();
        let e = SavedDataset::open(d).unwrap_err().to_string();
        assert!(e.contains("dataset_info.json: column `q`: in the shards but not declared"), "{e}");
        // Not a stream.
        std::fs::write(d.join(&names[0]), b"PAR1").unwrap();
        write_metadata(d, "t", "test", features, &names[..1]).unwrap();
        let e = SavedDataset::open(d).unwrap_err().to_string();
        assert!(e.contains("not an Arrow IPC stream"), "{e}");
        // A DatasetDict directory is named as such.
        let dict = d.join("dict");
        std::fs::create_dir_all(&dict).unwrap();
        write_dict(&dict, &["train".into()]).unwrap();
        assert_eq!(dict_splits(&dict).unwrap().unwrap(), ["train"]);
        let e = SavedDataset::open(&dict).unwrap_err().to_string();
        assert!(e.contains("this is a DatasetDict"), "{e}");
    }
}
