//! Typed access to the columns of a record batch, with errors that name the
//! file and the column (and the row where one row is at fault): what every
//! reader of VQA data (our Parquet splits, HF benchmark Parquet, HF
//! `save_to_disk` Arrow shards) builds its rows from.
//!
//! The accepted Arrow types are those `datasets` and pyarrow write: `string`
//! or `large_string` text, any integer width for ids and class labels,
//! `list` / `large_list` of strings, and the HF `Image` struct {bytes, path}
//! (or plain binary) for images.

use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;

use crate::schema::IMAGE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ColumnError {
    #[error("{path}: column `{column}`: {message}")]
    Column { path: PathBuf, column: String, message: String },
    #[error("{path}: row {row}: column `{column}`: {message}")]
    Row { path: PathBuf, row: usize, column: String, message: String },
}

/// The columns of one record batch of a file; `first_row` is the index in
/// the file of the batch's first row (for row-located errors).
pub struct BatchColumns<'a> {
    pub batch: &'a RecordBatch,
    pub path: &'a Path,
    pub first_row: usize,
}

impl<'a> BatchColumns<'a> {
    pub fn new(batch: &'a RecordBatch, path: &'a Path, first_row: usize) -> Self {
        Self { batch, path, first_row }
    }

    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.num_rows() == 0
    }

    pub fn has(&self, name: &str) -> bool {
        self.batch.column_by_name(name).is_some()
    }

    /// An error about column `name` as a whole.
    pub fn column_error(&self, name: &str, message: impl Into<String>) -> ColumnError {
        ColumnError::Column { path: self.path.into(), column: name.into(), message: message.into() }
    }

    /// An error about row `r` (index within the batch) of column `name`.
    pub fn row_error(&self, r: usize, name: &str, message: impl Into<String>) -> ColumnError {
        ColumnError::Row {
            path: self.path.into(),
            row: self.first_row + r,
            column: name.into(),
            message: message.into(),
        }
    }

    fn column(&self, name: &str) -> Option<&ArrayRef> {
        self.batch.column_by_name(name)
    }

    /// The column, or an error naming it and the columns the file has.
    pub fn require(&self, name: &str) -> Result<(), ColumnError> {
        if self.has(name) {
            return Ok(());
        }
        let have: Vec<String> = self.batch.schema().fields().iter().map(|f| f.name().clone()).collect();
        Err(self.column_error(name, format!("missing (the file has {have:?})")))
    }

    /// A text column (null -> empty string); None when absent.
    pub fn strings(&self, name: &str) -> Result<Option<Vec<String>>, ColumnError> {
        let Some(c) = self.column(name) else { return Ok(None) };
        string_values(c).map(Some).map_err(|found| self.column_error(name, format!("expected text, found {found}")))
    }

    /// A text or integer column as strings (ids, class labels); None when absent.
    pub fn strings_or_ints(&self, name: &str) -> Result<Option<Vec<Option<String>>>, ColumnError> {
        let Some(c) = self.column(name) else { return Ok(None) };
        if let Ok(v) = string_values(c) {
            return Ok(Some((0..v.len()).map(|i| (!c.is_null(i)).then(|| v[i].clone())).collect()));
        }
        let ints = int_values(c)
            .ok_or_else(|| self.column_error(name, format!("expected text or an integer, found {}", c.data_type())))?;
        Ok(Some(ints.into_iter().map(|v| v.map(|v| v.to_string())).collect()))
    }

    /// An integer column (e.g. an HF `ClassLabel`); None when absent.
    pub fn ints(&self, name: &str) -> Result<Option<Vec<Option<i64>>>, ColumnError> {
        let Some(c) = self.column(name) else { return Ok(None) };
        int_values(c)
            .map(Some)
            .ok_or_else(|| self.column_error(name, format!("expected an integer, found {}", c.data_type())))
    }

    /// A list-of-text column (null -> empty list); a plain text column is
    /// read as one-element lists. None when absent.
    pub fn string_lists(&self, name: &str) -> Result<Option<Vec<Vec<String>>>, ColumnError> {
        let Some(c) = self.column(name) else { return Ok(None) };
        let bad = |found: &DataType| self.column_error(name, format!("expected a list of text, found {found}"));
        let lists: Vec<Option<ArrayRef>> = match c.data_type() {
            DataType::List(_) => {
                let l = c.as_list::<i32>();
                (0..l.len()).map(|i| (!l.is_null(i)).then(|| l.value(i))).collect()
            }
            DataType::LargeList(_) => {
                let l = c.as_list::<i64>();
                (0..l.len()).map(|i| (!l.is_null(i)).then(|| l.value(i))).collect()
            }
            DataType::Utf8 | DataType::LargeUtf8 => {
                let v = string_values(c).map_err(|_| bad(c.data_type()))?;
                return Ok(Some(
                    (0..v.len()).map(|i| if c.is_null(i) { vec![] } else { vec![v[i].clone()] }).collect(),
                ));
            }
            other => return Err(bad(other)),
        };
        let mut out = Vec::with_capacity(lists.len());
        for l in lists {
            match l {
                None => out.push(Vec::new()),
                Some(items) => out.push(string_values(&items).map_err(|found| {
                    self.column_error(name, format!("expected list items of type text, found {found}"))
                })?),
            }
        }
        Ok(Some(out))
    }

    /// Encoded image bytes of an HF `Image` struct {bytes, path} or a binary
    /// column; `None` for a row without bytes (null image, or a path-only
    /// image). None when the column is absent.
    pub fn images(&self, name: &str) -> Result<Option<Vec<Option<Vec<u8>>>>, ColumnError> {
        let Some(c) = self.column(name) else { return Ok(None) };
        let bytes = match c.data_type() {
            DataType::Struct(_) => {
                let s = c.as_struct();
                let b = s.column_by_name(IMAGE_BYTES).ok_or_else(|| {
                    self.column_error(name, "struct has no `bytes` field (expected the HF Image struct {bytes, path})")
                })?;
                // A null struct row hides whatever its fields hold.
                (b.clone(), Some(s.clone()))
            }
            DataType::Binary | DataType::LargeBinary => (c.clone(), None),
            other => {
                return Err(self.column_error(
                    name,
                    format!("expected the HF Image struct {{bytes, path}} or binary, found {other}"),
                ));
            }
        };
        let (b, parent) = bytes;
        let present = |i: usize| parent.as_ref().is_none_or(|p| !p.is_null(i)) && !b.is_null(i);
        let out = match b.data_type() {
            DataType::Binary => {
                let a = b.as_binary::<i32>();
                (0..a.len()).map(|i| present(i).then(|| a.value(i).to_vec())).collect()
            }
            DataType::LargeBinary => {
                let a = b.as_binary::<i64>();
                (0..a.len()).map(|i| present(i).then(|| a.value(i).to_vec())).collect()
            }
            other => {
                return Err(
                    self.column_error(&format!("{name}.{IMAGE_BYTES}"), format!("expected binary, found {other}"))
                );
            }
        };
        Ok(Some(out))
    }
}

/// Text values (null -> empty); Err(type) when the array is not text.
fn string_values(c: &ArrayRef) -> Result<Vec<String>, DataType> {
    match c.data_type() {
        DataType::Utf8 => {
            let a = c.as_string::<i32>();
            Ok((0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect())
        }
        DataType::LargeUtf8 => {
            let a = c.as_string::<i64>();
            Ok((0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect())
        }
        DataType::Utf8View => {
            let a = c.as_string_view();
            Ok((0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect())
        }
        other => Err(other.clone()),
    }
}

fn int_values(c: &ArrayRef) -> Option<Vec<Option<i64>>> {
    macro_rules! ints {
        ($t:ty) => {{
            let a = c.as_primitive::<$t>();
            (0..a.len()).map(|i| (!a.is_null(i)).then(|| i64::try_from(a.value(i)).ok()).flatten()).collect()
        }};
    }
    Some(match c.data_type() {
        DataType::Int8 => ints!(Int8Type),
        DataType::Int16 => ints!(Int16Type),
        DataType::Int32 => ints!(Int32Type),
        DataType::Int64 => ints!(Int64Type),
        DataType::UInt8 => ints!(UInt8Type),
        DataType::UInt16 => ints!(UInt16Type),
        DataType::UInt32 => ints!(UInt32Type),
        DataType::UInt64 => ints!(UInt64Type),
        _ => return None,
    })
}

/// The names of an HF `ClassLabel` feature in a `features` declaration
/// (`{"names": [...], "_type": "ClassLabel"}`), if `column` is one.
pub fn class_label_names(features: &serde_json::Value, column: &str) -> Option<Vec<String>> {
    let f = features.get(column)?;
    if f.get("_type")?.as_str()? != "ClassLabel" {
        return None;
    }
    f.get("names")?.as_array()?.iter().map(|n| n.as_str().map(str::to_string)).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{BinaryArray, Int64Array, StringArray, StructArray};

    use super::*;
    use crate::schema::image_fields;

    #[test]
    fn typed_columns_and_located_errors() {
        let mut lists = ListBuilder::new(StringBuilder::new());
        lists.values().append_value("a");
        lists.values().append_value("b");
        lists.append(true);
        lists.append(false);
        let image = StructArray::try_new(
            image_fields(),
            vec![
                Arc::new(BinaryArray::from(vec![Some(&b"png"[..]), None])),
                Arc::new(StringArray::from(vec![None, Some("x.png")])),
            ],
            None,
        )
        .unwrap();
        let b = RecordBatch::try_from_iter(vec![
            ("q", Arc::new(StringArray::from(vec![Some("x"), None])) as ArrayRef),
            ("id", Arc::new(Int64Array::from(vec![7, 8])) as ArrayRef),
            ("answers", Arc::new(lists.finish()) as ArrayRef),
            ("image", Arc::new(image) as ArrayRef),
        ])
        .unwrap();
        let cols = BatchColumns::new(&b, Path::new("f.parquet"), 10);
        assert_eq!(cols.strings("q").unwrap().unwrap(), ["x", ""]);
        assert_eq!(cols.strings_or_ints("id").unwrap().unwrap(), [Some("7".to_string()), Some("8".to_string())]);
        assert_eq!(cols.string_lists("answers").unwrap().unwrap(), [vec!["a", "b"], vec![]]);
        assert_eq!(cols.string_lists("q").unwrap().unwrap(), [vec!["x"], vec![]]);
        assert_eq!(cols.images("image").unwrap().unwrap(), [Some(b"png".to_vec()), None], "path-only: no bytes");
        assert!(cols.strings("nope").unwrap().is_none());
        let e = cols.strings("id").unwrap_err().to_string();
        assert_eq!(e, "f.parquet: column `id`: expected text, found Int64");
        let e = cols.images("q").unwrap_err().to_string();
        assert!(e.starts_with("f.parquet: column `q`: expected the HF Image struct"), "{e}");
        assert_eq!(cols.row_error(1, "image", "no bytes").to_string(), "f.parquet: row 11: column `image`: no bytes");
        let e = cols.require("question").unwrap_err().to_string();
        assert!(e.contains("column `question`: missing (the file has [\"q\", \"id\", \"answers\", \"image\"])"), "{e}");
    }

    #[test]
    fn class_label_names_come_from_the_features() {
        let f = serde_json::json!({"kind": {"names": ["human", "machine"], "_type": "ClassLabel"}, "q": {"dtype": "string", "_type": "Value"}});
        assert_eq!(class_label_names(&f, "kind").unwrap(), ["human", "machine"]);
        assert!(class_label_names(&f, "q").is_none() && class_label_names(&f, "x").is_none());
    }
}
