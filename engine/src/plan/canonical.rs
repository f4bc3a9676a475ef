//! Canonical params: one byte string per meaning, so param order or `1.0`
//! vs `1` in a recipe never changes a cache key, and flat `path = value`
//! views for "params changed: grpo.beta 0.04 -> 0.1".

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

/// Normalise a params value: numbers that are whole and fit i64 become
/// integers (so `1.0` and `1` agree), `-0.0` becomes `0`; objects are keyed
/// in sorted order (serde_json's map may preserve insertion order when some
/// crate in the build enables that feature, so never rely on it).
pub fn normalize(value: &Value) -> Value {
    match value {
        Value::Number(n) => {
            if n.is_f64()
                && let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                return Value::from(f as i64);
            }
            Value::Number(n.clone())
        }
        Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> = map.iter().map(|(k, v)| (k, normalize(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        other => other.clone(),
    }
}

/// Compact JSON with sorted keys and normalised numbers: the bytes that
/// enter the cache key.
pub fn canonical_string(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(&normalize(value), &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

/// Leaf values by dotted path (`reward_weights.format`, `trainable[0]`).
pub fn flatten(value: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    flatten_into(&normalize(value), String::new(), &mut out);
    out
}

fn flatten_into(value: &Value, path: String, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                flatten_into(v, p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten_into(v, format!("{path}[{i}]"), out);
            }
        }
        leaf => {
            out.insert(path, canonical_string(leaf));
        }
    }
}

/// Human-readable differences `path old -> new` between two params values.
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    let (a, b) = (flatten(old), flatten(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => None,
            (Some(x), Some(y)) => Some(format!("{k} {x} -> {y}")),
            (Some(x), None) => Some(format!("{k} {x} -> (unset)")),
            (None, Some(y)) => Some(format!("{k} (unset) -> {y}")),
            (None, None) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_float_spelling_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b": 1.0, "a": {"y": [1, 2.5], "x": -0.0}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": {"x": 0, "y": [1.0, 2.5]}, "b": 1}"#).unwrap();
        assert_eq!(canonical_string(&a), canonical_string(&b));
        assert_eq!(canonical_string(&a), r#"{"a":{"x":0,"y":[1,2.5]},"b":1}"#);
    }

    #[test]
    fn different_values_give_different_strings() {
        assert_ne!(canonical_string(&json!({"beta": 0.04})), canonical_string(&json!({"beta": 0.1})));
        assert_ne!(canonical_string(&json!({"s": "1"})), canonical_string(&json!({"s": 1})));
    }

    #[test]
    fn diff_names_the_changed_leaf() {
        let old = json!({"beta": 0.04, "w": {"format": 1.0, "validity": 1.0}, "gone": true});
        let new = json!({"beta": 0.1, "w": {"validity": 1.0, "format": 1.0}, "added": [1]});
        assert_eq!(diff(&old, &new), vec!["added[0] (unset) -> 1", "beta 0.04 -> 0.1", "gone true -> (unset)"]);
        assert!(diff(&old, &old).is_empty());
    }
}
