//! Typed stage params from recipe tables, with errors that name the key.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

/// A params problem, located by its key path inside the stage table (the
/// engine turns the path into file:line:column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// Key path inside the stage table, e.g. `["reward_weights", "format"]`;
    /// empty when the problem is the table as a whole.
    pub path: Vec<String>,
    pub message: String,
    /// e.g. "did you mean `box_min_area`?"
    pub hint: Option<String>,
}

impl ParamError {
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        Self { path: path.iter().map(|s| s.to_string()).collect(), message: message.into(), hint: None }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// JSON schema of a params type (draft 2020-12, as schemars emits it).
pub fn schema_of<P: JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(P)).unwrap_or(serde_json::Value::Null)
}

/// Names of the top-level properties a params type accepts.
pub fn param_names<P: JsonSchema>() -> Vec<String> {
    let schema = schema_of::<P>();
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

/// Deserialize params, reporting unknown keys (with a did-you-mean hint) and
/// type errors with the path of the offending key.
pub fn parse_params<P: DeserializeOwned + JsonSchema>(table: toml::Table) -> Result<P, ParamError> {
    let known = param_names::<P>();
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
