//! The column layouts of our VQA data, declared once: the column names every
//! reader looks up, and the tables [`EXPORT_COLUMNS`] (the CT-RATE-VQA
//! export) and [`ROW_COLUMNS`] (what [`crate::dataset::write_rows`] writes:
//! the columns of a [`crate::VqaRow`]) from which the Arrow schemas, the
//! Hugging Face `datasets` feature declarations (schema metadata,
//! `dataset_info.json`) and the dataset card's YAML are all derived.
//!
//! Columns (in this order): `id`, `image` struct {bytes: binary, path:
//! string} (what `datasets` writes for an `Image` feature; the schema carries
//! the `huggingface` metadata so it decodes to a PIL image without a cast),
//! `problem`, `solution`, `answer`, `options`, `class`, `class_name`,
//! `case_id`, `patient_id`, `slice_index`, `boxes` (list of {x0, y0, x1, y1}
//! in pixel coordinates of the stored image, x1/y1 exclusive), `split`.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};

/// Column names.
pub mod column {
    pub const ID: &str = "id";
    pub const IMAGE: &str = "image";
    pub const PROBLEM: &str = "problem";
    /// What general VQA sets call the problem (read when `problem` is absent).
    pub const QUESTION: &str = "question";
    pub const SOLUTION: &str = "solution";
    pub const ANSWER: &str = "answer";
    /// Every accepted gold answer (TextVQA: the 10 human answers; ChartQA:
    /// the label list). Optional: a set without it has only `answer`.
    pub const ANSWERS: &str = "answers";
    pub const OPTIONS: &str = "options";
    pub const CLASS: &str = "class";
    pub const CLASS_NAME: &str = "class_name";
    pub const CASE_ID: &str = "case_id";
    pub const PATIENT_ID: &str = "patient_id";
    pub const SLICE_INDEX: &str = "slice_index";
    pub const BOXES: &str = "boxes";
    pub const SPLIT: &str = "split";
}

/// Fields of the HF `Image` struct.
pub const IMAGE_BYTES: &str = "bytes";
pub const IMAGE_PATH: &str = "path";
/// Fields of a box, pixel coordinates (x1, y1 exclusive).
pub const BOX_COORDS: [&str; 4] = ["x0", "y0", "x1", "y1"];
/// The item field name of a list column (what pyarrow and `datasets` write).
pub const LIST_ITEM: &str = "item";

/// What a column holds, in the three vocabularies it is declared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    String,
    Int32,
    /// The HF `Image` struct {bytes, path}.
    Image,
    StringList,
    /// A list of {x0, y0, x1, y1} int32 structs.
    Boxes,
}

/// The export's columns, in order.
pub const EXPORT_COLUMNS: [(&str, Feature); 13] = [
    (column::ID, Feature::String),
    (column::IMAGE, Feature::Image),
    (column::PROBLEM, Feature::String),
    (column::SOLUTION, Feature::String),
    (column::ANSWER, Feature::String),
    (column::OPTIONS, Feature::StringList),
    (column::CLASS, Feature::String),
    (column::CLASS_NAME, Feature::String),
    (column::CASE_ID, Feature::String),
    (column::PATIENT_ID, Feature::String),
    (column::SLICE_INDEX, Feature::Int32),
    (column::BOXES, Feature::Boxes),
    (column::SPLIT, Feature::String),
];

/// The columns of a [`crate::VqaRow`] as [`crate::dataset::write_rows`]
/// writes them (the readers take the export's extra columns too).
pub const ROW_COLUMNS: [(&str, Feature); 8] = [
    (column::ID, Feature::String),
    (column::IMAGE, Feature::Image),
    (column::PROBLEM, Feature::String),
    (column::ANSWER, Feature::String),
    (column::ANSWERS, Feature::StringList),
    (column::OPTIONS, Feature::StringList),
    (column::CLASS, Feature::String),
    (column::CLASS_NAME, Feature::String),
];

pub fn image_fields() -> Fields {
    Fields::from(vec![Field::new(IMAGE_BYTES, DataType::Binary, true), Field::new(IMAGE_PATH, DataType::Utf8, true)])
}

pub fn box_fields() -> Fields {
    Fields::from(BOX_COORDS.map(|n| Field::new(n, DataType::Int32, true)).to_vec())
}

/// The item field of a list column of `item` values.
pub fn list_item(item: DataType) -> Arc<Field> {
    Arc::new(Field::new(LIST_ITEM, item, true))
}

impl Feature {
    pub fn arrow_type(self) -> DataType {
        match self {
            Feature::String => DataType::Utf8,
            Feature::Int32 => DataType::Int32,
            Feature::Image => DataType::Struct(image_fields()),
            Feature::StringList => DataType::List(list_item(DataType::Utf8)),
            Feature::Boxes => DataType::List(list_item(DataType::Struct(box_fields()))),
        }
    }

    /// The `datasets` feature declaration (JSON text).
    fn hf_json(self) -> String {
        const STRING: &str = r#"{"dtype": "string", "_type": "Value"}"#;
        const INT32: &str = r#"{"dtype": "int32", "_type": "Value"}"#;
        match self {
            Feature::String => STRING.into(),
            Feature::Int32 => INT32.into(),
            Feature::Image => r#"{"_type": "Image"}"#.into(),
            Feature::StringList => format!("[{STRING}]"),
            Feature::Boxes => {
                let coords: Vec<(&str, String)> = BOX_COORDS.iter().map(|c| (*c, INT32.to_string())).collect();
                format!("[{}]", ordered_object(&coords))
            }
        }
    }

    /// The dataset card's YAML lines after `- name: <column>`.
    fn card_yaml(self) -> String {
        match self {
            Feature::String => "    dtype: string\n".into(),
            Feature::Int32 => "    dtype: int32\n".into(),
            Feature::Image => "    dtype: image\n".into(),
            Feature::StringList => "    list: string\n".into(),
            Feature::Boxes => {
                let coords: String =
                    BOX_COORDS.iter().map(|c| format!("    - name: {c}\n      dtype: int32\n")).collect();
                format!("    list:\n{coords}")
            }
        }
    }
}

/// `{"a": .., "b": ..}` from JSON texts, keeping the given order (nested
/// struct fields must follow the Arrow field order, hence text, not maps).
fn ordered_object(pairs: &[(&str, String)]) -> String {
    let body: Vec<String> = pairs.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
    format!("{{{}}}", body.join(", "))
}

/// The HF feature declarations of `columns`, as one JSON object in column order.
pub fn hf_features_json_of(columns: &[(&str, Feature)]) -> String {
    let pairs: Vec<(&str, String)> = columns.iter().map(|(name, f)| (*name, f.hf_json())).collect();
    ordered_object(&pairs)
}

/// The HF feature declarations of the export, as one JSON object in column order.
pub fn hf_features_json() -> String {
    hf_features_json_of(&EXPORT_COLUMNS)
}

/// The `features:` entries of the dataset card's YAML header.
pub fn card_features_yaml() -> String {
    EXPORT_COLUMNS.iter().map(|(name, f)| format!("  - name: {name}\n{}", f.card_yaml())).collect()
}

/// The Arrow schema of `columns`, with the `huggingface` metadata that
/// makes `datasets` decode the image column as an `Image` without a cast.
pub fn schema_of(columns: &[(&str, Feature)]) -> SchemaRef {
    let fields: Vec<Field> = columns.iter().map(|(name, f)| Field::new(*name, f.arrow_type(), true)).collect();
    let hf = format!("{{\"info\": {{\"features\": {}}}}}", hf_features_json_of(columns));
    Arc::new(Schema::new(fields).with_metadata(HashMap::from([("huggingface".to_string(), hf)])))
}

/// The Arrow schema of an export shard, with the `huggingface` metadata.
pub fn export_schema() -> SchemaRef {
    schema_of(&EXPORT_COLUMNS)
}

/// The Arrow schema of [`ROW_COLUMNS`], with the `huggingface` metadata.
pub fn row_schema() -> SchemaRef {
    schema_of(&ROW_COLUMNS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_declarations_name_the_same_columns_in_order() {
        let schema = export_schema();
        let arrow: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let names: Vec<&str> = EXPORT_COLUMNS.iter().map(|(n, _)| *n).collect();
        assert_eq!(arrow, names);
        let yaml = card_features_yaml();
        let yaml: Vec<&str> = yaml.lines().filter_map(|l| l.strip_prefix("  - name: ")).collect();
        assert_eq!(yaml, names);
        let hf = hf_features_json();
        let mut at = 0;
        for n in names {
            let pos = hf[at..].find(&format!("\"{n}\": ")).map(|p| p + at);
            at = pos.unwrap_or_else(|| panic!("{n} missing or out of order in {hf}"));
        }
        assert!(hf.contains(r#""boxes": [{"x0": {"dtype": "int32", "_type": "Value"}, "y0""#), "{hf}");
        assert!(schema.metadata()["huggingface"].starts_with(r#"{"info": {"features": {"id": "#));
    }
}
