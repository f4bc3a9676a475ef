//! Typed stage params from recipe tables, with errors that name the key.
//!
//! # Ranges: one mechanism
//!
//! Every count or size param declares its allowed range on its field, with
//! a short reason for the bounds in the doc comment or a comment beside it:
//!
//! ```ignore
//! /// Number of CT volumes.
//! // ReXGroundingCT has 3,142 volumes: 100 000 is 30 times that.
//! #[schemars(range(min = 1, max = 100_000))]
//! pub cases: Option<usize>,
//! ```
//!
//! The attribute puts `minimum` / `maximum` into the params JSON schema;
//! [`parse_params`] checks every number the recipe writes against it
//! ([`crate::ranges`]: `Option`, nested tables, maps and lists included;
//! `#[schemars(inner(range(..)))]` bounds the items of a list) and
//! reports `` `cases` = 1000000000000 `` as "1000000000000 is out of range:
//! expected 1..=100000" at that key. The generated reference in
//! `docs/recipes.md` shows the same ranges, read from the same schema.
//! Limits one field cannot express (a product of several params, one param
//! bounded by another) stay in [`StageKind::validate`](crate::StageKind::validate).
//! Ranges are about sanity (what a real run could ever use), not memory;
//! they never enter a cache key (canonical params are the values, not the schema).

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

pub use crate::param_error::ParamError;

/// JSON schema of a params type (draft 2020-12, as schemars emits it).
pub fn schema_of<P: JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(P)).unwrap_or(serde_json::Value::Null)
}

/// Names of the top-level properties a params type accepts.
pub fn param_names<P: JsonSchema>() -> Vec<String> {
    property_names(&schema_of::<P>())
}

fn property_names(schema: &serde_json::Value) -> Vec<String> {
    schema
        .get("properties")
        .and_then(|p| p.as_object())
        .map(|props| props.keys().cloned().collect())
        .unwrap_or_default()
}

/// The closest candidate to `word` if it is plausibly a misspelling.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Deserialize params, reporting unknown keys (with a did-you-mean hint),
/// numbers outside their declared range ([`crate::ranges`]) and type errors
/// with the path of the offending key.
pub fn parse_params<P: DeserializeOwned + JsonSchema>(table: toml::Table) -> Result<P, ParamError> {
    let schema = schema_of::<P>();
    let known = property_names(&schema);
    for key in table.keys() {
        if !known.iter().any(|k| k == key) {
            let mut err = ParamError::new(&[key], format!("unknown parameter `{key}`"));
            if let Some(best) = did_you_mean(key, known.iter().map(String::as_str)) {
                err = err.with_hint(format!("did you mean `{best}`?"));
            } else if !known.is_empty() {
                err = err.with_hint(format!("expected one of: {}", known.join(", ")));
            }
            return Err(err);
        }
    }
    crate::ranges::check_toml(&schema, &table)?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path: Vec<String> = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        ParamError { path, message: e.inner().to_string(), hint: None }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, JsonSchema, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct P {
        /// Minimum box area.
        box_min_area: u64,
        weights: std::collections::BTreeMap<String, f64>,
    }
    impl Default for P {
        fn default() -> Self {
            Self { box_min_area: 1300, weights: Default::default() }
        }
    }

    fn table(src: &str) -> toml::Table {
        src.parse().unwrap()
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let p: P = parse_params(table("")).unwrap();
        assert_eq!(p.box_min_area, 1300);
    }

    #[test]
    fn misspelled_key_gets_hint() {
        let err = parse_params::<P>(table("box_min_aera = 3")).unwrap_err();
        assert_eq!(err.path, vec!["box_min_aera"]);
        assert_eq!(err.hint.as_deref(), Some("did you mean `box_min_area`?"));
    }

    #[test]
    fn type_error_names_nested_key() {
        let err = parse_params::<P>(table("weights = { format = \"high\" }")).unwrap_err();
        assert_eq!(err.path, vec!["weights", "format"]);
        assert!(err.message.contains("invalid type"), "{}", err.message);
    }
}
