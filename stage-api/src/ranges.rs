//! Numeric ranges of stage params, declared once on the field and checked
//! against the params JSON schema.
//!
//! A field declares its range with schemars' validation attribute, which
//! puts `minimum` / `maximum` into the schema:
//!
//! ```ignore
//! /// Completions sampled per prompt, the group (paper: N = 5).
//! #[schemars(range(min = 2, max = 1024))]
//! pub num_generations: usize,
//! ```
//!
//! [`check_toml`] walks a recipe table along the schema (`$ref`s, `Option`,
//! nested tables, maps, lists, enum variants) and reports the first number
//! outside its field's range as a [`ParamError`] at that key's path;
//! [`crate::params::parse_params`] calls it before deserializing, so a value
//! too large for the field's type is reported with its range too. The same
//! schema is what `docs/recipes.md` is generated from, so the reference
//! shows exactly the ranges that are checked ([`declared_range`]).
//!
//! Alternatives (`anyOf` / `oneOf`: `Option`, untagged and tagged enums)
//! follow JSON-schema semantics: a value passes when one alternative of its
//! type (and, for tagged enums, its tag) admits it.

use std::cmp::Ordering;

use serde_json::Value;

use crate::param_error::ParamError;

/// The words of every out-of-range message (`"3 is out of range: expected
/// 1..=2"`); the engine points such errors at the value, not the key.
pub const OUT_OF_RANGE: &str = "is out of range: expected";

/// Schemas nest through `$ref`; a self-referential one must not recurse forever.
const MAX_DEPTH: usize = 64;

/// A number as written: integers compared exactly, floats as floats.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn from_json(n: &serde_json::Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i.into()))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Int(u.into()))
        } else {
            n.as_f64().map(Num::Float)
        }
    }

    /// `None` when the two cannot be ordered (NaN).
    fn cmp(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Num::Int(i) => write!(f, "{i}"),
            Num::Float(x) => write!(f, "{x:?}"),
        }
    }
}

/// The shape of a params value, whatever format it came in.
enum Shape<'a, V> {
    Null,
    Number(Num),
    Str(&'a str),
    /// A boolean or a datetime, by its JSON-schema type name.
    Other(&'static str),
    Array(Vec<&'a V>),
    Object(Vec<(&'a str, &'a V)>),
}

/// A params value as the checker sees it: recipe TOML or canonical JSON.
trait ParamValue: Sized {
    fn shape(&self) -> Shape<'_, Self>;
}

impl ParamValue for toml::Value {
    fn shape(&self) -> Shape<'_, Self> {
        match self {
            toml::Value::Integer(i) => Shape::Number(Num::Int((*i).into())),
            toml::Value::Float(f) => Shape::Number(Num::Float(*f)),
            toml::Value::String(s) => Shape::Str(s),
            toml::Value::Boolean(_) => Shape::Other("boolean"),
            toml::Value::Datetime(_) => Shape::Other("string"),
            toml::Value::Array(items) => Shape::Array(items.iter().collect()),
            toml::Value::Table(t) => Shape::Object(t.iter().map(|(k, v)| (k.as_str(), v)).collect()),
        }
    }
}

impl ParamValue for Value {
    fn shape(&self) -> Shape<'_, Self> {
        match self {
            Value::Null => Shape::Null,
            Value::Number(n) => Num::from_json(n).map_or(Shape::Null, Shape::Number),
            Value::String(s) => Shape::Str(s),
            Value::Bool(_) => Shape::Other("boolean"),
            Value::Array(items) => Shape::Array(items.iter().collect()),
            Value::Object(map) => Shape::Object(map.iter().map(|(k, v)| (k.as_str(), v)).collect()),
        }
    }
}

impl<V> Shape<'_, V> {
    /// JSON-schema type names this value has (an integer is also a number).
    fn is_type(&self, ty: &str) -> bool {
        match self {
            Shape::Null => ty == "null",
            Shape::Number(Num::Int(_)) => ty == "integer" || ty == "number",
            Shape::Number(Num::Float(_)) => ty == "number",
            Shape::Str(_) => ty == "string",
            Shape::Other(t) => *t == ty,
            Shape::Array(_) => ty == "array",
            Shape::Object(_) => ty == "object",
        }
    }
}

/// Check a recipe's params table against the ranges of `schema`.
pub fn check_toml(schema: &Value, table: &toml::Table) -> Result<(), ParamError> {
    check_value(schema, &toml::Value::Table(table.clone()))
}

/// Check canonical params (JSON) against the ranges of `schema`.
pub fn check_json(schema: &Value, params: &Value) -> Result<(), ParamError> {
    check_value(schema, params)
}

fn check_value<V: ParamValue>(schema: &Value, value: &V) -> Result<(), ParamError> {
    let mut path = Vec::new();
    Checker { root: schema }.check(schema, value, &mut path, 0)
}

struct Checker<'s> {
    root: &'s Value,
}

impl<'s> Checker<'s> {
    /// Follow a local `$ref` (`#/$defs/Name`); anything else as is.
    fn resolve(&self, schema: &'s Value) -> &'s Value {
        let mut schema = schema;
        for _ in 0..MAX_DEPTH {
            let Some(target) = schema.get("$ref").and_then(Value::as_str) else { break };
            let Some(found) = target.strip_prefix('#').and_then(|p| self.root.pointer(p)) else { break };
            schema = found;
        }
        schema
    }

    fn check<V: ParamValue>(
        &self,
        schema: &'s Value,
        value: &V,
        path: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), ParamError> {
        if depth > MAX_DEPTH {
            return Ok(());
        }
        let schema = self.resolve(schema);
        let shape = value.shape();
        if matches!(shape, Shape::Null) {
            return Ok(());
        }
        for part in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
            self.check(part, value, path, depth + 1)?;
        }
        for key in ["anyOf", "oneOf"] {
            let Some(alternatives) = schema.get(key).and_then(Value::as_array) else { continue };
            let mut first_error = None;
            let mut passed = false;
            for alt in alternatives.iter().filter(|a| self.admits(a, &shape)) {
                match self.check(alt, value, path, depth + 1) {
                    Ok(()) => {
                        passed = true;
                        break;
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let (false, Some(e)) = (passed, first_error) {
                return Err(e);
            }
        }
        match shape {
            Shape::Number(n) => check_number(schema, n, path),
            Shape::Array(items) => {
                let prefix = schema.get("prefixItems").and_then(Value::as_array);
                for (i, item) in items.into_iter().enumerate() {
                    let sub = prefix.and_then(|p| p.get(i)).or_else(|| schema.get("items").filter(|s| s.is_object()));
                    if let Some(sub) = sub {
                        path.push(i.to_string());
                        self.check(sub, item, path, depth + 1)?;
                        path.pop();
                    }
                }
                Ok(())
            }
            Shape::Object(entries) => {
                let props = schema.get("properties").and_then(Value::as_object);
                let extra = schema.get("additionalProperties").filter(|s| s.is_object());
                for (key, item) in entries {
                    if let Some(sub) = props.and_then(|p| p.get(key)).or(extra) {
                        path.push(key.to_string());
                        self.check(sub, item, path, depth + 1)?;
                        path.pop();
                    }
                }
                Ok(())
            }
            Shape::Null | Shape::Str(_) | Shape::Other(_) => Ok(()),
        }
    }

    /// Whether alternative `alt` of an `anyOf` / `oneOf` is meant for this
    /// value: its type matches and, for a table, every `const` property it
    /// declares (the tag of a tagged enum) has that value.
    fn admits<V: ParamValue>(&self, alt: &'s Value, shape: &Shape<'_, V>) -> bool {
        let alt = self.resolve(alt);
        let type_ok = match alt.get("type") {
            Some(Value::String(t)) => shape.is_type(t),
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).any(|t| shape.is_type(t)),
            _ => true,
        };
        if !type_ok {
            return false;
        }
        let (Shape::Object(entries), Some(props)) = (shape, alt.get("properties").and_then(Value::as_object)) else {
            return true;
        };
        // Tags are strings; a non-string `const` does not tell alternatives apart.
        props.iter().all(|(key, prop)| match self.resolve(prop).get("const").and_then(Value::as_str) {
            None => true,
            Some(wanted) => entries.iter().any(|(k, v)| *k == key && matches!(v.shape(), Shape::Str(s) if s == wanted)),
        })
    }
}

fn bound(schema: &Value, key: &str) -> Option<Num> {
    schema.get(key).and_then(Value::as_number).and_then(Num::from_json)
}

fn check_number(schema: &Value, n: Num, path: &[String]) -> Result<(), ParamError> {
    let Some(range) = Range::of(schema) else { return Ok(()) };
    if range.contains(n) {
        return Ok(());
    }
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    Err(ParamError::new(&path, format!("{n} {OUT_OF_RANGE} {range}")))
}

/// The bounds a schema puts on a number.
#[derive(Debug, Clone, Copy)]
struct Range {
    min: Option<(Num, bool)>,
    max: Option<(Num, bool)>,
}

impl Range {
    /// `(bound, exclusive)` pairs from `minimum` / `exclusiveMinimum` and
    /// `maximum` / `exclusiveMaximum`; `None` when there are none.
    fn of(schema: &Value) -> Option<Range> {
        let min = bound(schema, "exclusiveMinimum").map(|b| (b, true)).or(bound(schema, "minimum").map(|b| (b, false)));
        let max = bound(schema, "exclusiveMaximum").map(|b| (b, true)).or(bound(schema, "maximum").map(|b| (b, false)));
        (min.is_some() || max.is_some()).then_some(Range { min, max })
    }

    /// Written positively so that NaN is out of every range.
    fn contains(&self, n: Num) -> bool {
        let above = match self.min {
            None => true,
            Some((b, excl)) => {
                matches!(n.cmp(b), Some(Ordering::Greater)) || (!excl && n.cmp(b) == Some(Ordering::Equal))
            }
        };
        let below = match self.max {
            None => true,
            Some((b, excl)) => matches!(n.cmp(b), Some(Ordering::Less)) || (!excl && n.cmp(b) == Some(Ordering::Equal)),
        };
        above && below
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.max) {
            (Some((lo, false)), Some((hi, false))) => write!(f, "{lo}..={hi}"),
            (Some((lo, true)), Some((hi, false))) => write!(f, "> {lo} and <= {hi}"),
            (Some((lo, false)), Some((hi, true))) => write!(f, "{lo}..{hi}"),
            (Some((lo, true)), Some((hi, true))) => write!(f, "> {lo} and < {hi}"),
            (Some((lo, excl)), None) => write!(f, "{} {lo}", if excl { ">" } else { ">=" }),
            (None, Some((hi, excl))) => write!(f, "{} {hi}", if excl { "<" } else { "<=" }),
            (None, None) => Ok(()),
        }
    }
}

/// The range a field's schema declares, as the docs show it (`1..=100000`,
/// `>= 1`), leaving out the bounds its integer type has anyway (an unsigned
/// type's `>= 0`, a `u8`'s `0..=255`): `None` when nothing narrower is declared.
pub fn declared_range(schema: &Value) -> Option<String> {
    let range = Range::of(schema)?;
    let natural: Option<(i128, Option<i128>)> = match schema.get("format").and_then(Value::as_str) {
        Some("uint8") => Some((0, Some(u8::MAX.into()))),
        Some("uint16") => Some((0, Some(u16::MAX.into()))),
        Some("int8") => Some((i8::MIN.into(), Some(i8::MAX.into()))),
        Some("int16") => Some((i16::MIN.into(), Some(i16::MAX.into()))),
        Some("uint" | "uint32" | "uint64" | "uint128") => Some((0, None)),
        _ => None,
    };
    if let Some((lo, hi)) = natural {
        let same_min = matches!(range.min, Some((Num::Int(b), false)) if b == lo);
        let same_max = match (range.max, hi) {
            (None, _) => true,
            (Some((Num::Int(b), false)), Some(h)) => b == h,
            _ => false,
        };
        if same_min && same_max {
            return None;
        }
    }
    Some(range.to_string())
}

/// The defaults a params schema documents, checked against its ranges (a
/// default outside its own field's range would fail every recipe that
/// leaves the field out).
pub fn check_defaults(schema: &Value) -> Result<(), ParamError> {
    let defaults: serde_json::Map<String, Value> = schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, prop)| prop.get("default").map(|d| (k.clone(), d.clone())))
        .collect();
    check_json(schema, &Value::Object(defaults))
}

/// Paths of the integer params in `schema` that declare no range narrower
/// than their type's (`a.b` for nested tables, `a[]` for list items), so a
/// test can require one on every count and size.
pub fn unranged_integers(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let checker = Checker { root: schema };
    collect_unranged(&checker, schema, "", &mut out, 0);
    out.sort();
    out.dedup();
    out
}

fn collect_unranged(checker: &Checker<'_>, schema: &Value, path: &str, out: &mut Vec<String>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    let schema = checker.resolve(schema);
    let is_integer = match schema.get("type") {
        Some(Value::String(t)) => t == "integer",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
        _ => false,
    };
    if is_integer && declared_range(schema).is_none() {
        out.push(path.to_string());
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for alt in schema.get(key).and_then(Value::as_array).into_iter().flatten() {
            collect_unranged(checker, alt, path, out, depth + 1);
        }
    }
    if let Some(items) = schema.get("items").filter(|i| i.is_object()) {
        collect_unranged(checker, items, &format!("{path}[]"), out, depth + 1);
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|i| i.is_object()) {
        collect_unranged(checker, extra, &format!("{path}.*"), out, depth + 1);
    }
    for (key, prop) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
        let sub = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        collect_unranged(checker, prop, &sub, out, depth + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemars::JsonSchema;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, serde::Serialize, JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    #[allow(dead_code)]
    struct Inner {
        #[schemars(range(min = 1, max = 256))]
        concurrency: usize,
    }
    impl Default for Inner {
        fn default() -> Self {
            Self { concurrency: 8 }
        }
    }

    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case", tag = "method")]
    #[allow(dead_code)]
    enum Ci {
        Wilson,
        Bootstrap {
            #[schemars(range(min = 1, max = 1000))]
            resamples: u32,
        },
    }

    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(untagged)]
    #[allow(dead_code)]
    enum Side {
        Pixels(u32),
        Fraction(f64),
    }

    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        #[schemars(range(min = 1, max = 100_000))]
        cases: Option<usize>,
        #[schemars(range(min = 0.0, max = 1.0))]
        fraction: Option<f64>,
        plain: Option<u64>,
        small: Option<u8>,
        http: Option<Inner>,
        ci: Option<Ci>,
        #[schemars(inner(range(min = 0, max = 10)))]
        sections: Option<Vec<i64>>,
        weights: Option<BTreeMap<String, Inner>>,
        side: Option<Side>,
    }

    fn check(src: &str) -> Result<(), ParamError> {
        let table: toml::Table = src.parse().unwrap();
        check_toml(&crate::params::schema_of::<P>(), &table)
    }

    #[test]
    fn values_inside_their_ranges_pass() {
        check("cases = 1\nfraction = 1.0\nplain = 123456789012\nhttp = { concurrency = 256 }").unwrap();
        check("ci = { method = \"bootstrap\", resamples = 1000 }").unwrap();
        check("sections = [0, 10, 3]\nweights = { a = { concurrency = 2 } }\nside = 0.5").unwrap();
        // Untagged alternatives: `-3` is no `u32` but a fine float, as serde reads it.
        check("side = 7").unwrap();
        check("side = -3").unwrap();
    }

    #[test]
    fn top_level_numbers_out_of_range_name_key_and_range() {
        let err = check("cases = 1000000000000").unwrap_err();
        assert_eq!(err.path, vec!["cases"]);
        assert_eq!(err.message, "1000000000000 is out of range: expected 1..=100000");
        assert_eq!(check("cases = 0").unwrap_err().message, "0 is out of range: expected 1..=100000");
        let err = check("fraction = 1.5").unwrap_err();
        assert_eq!(err.message, "1.5 is out of range: expected 0.0..=1.0");
    }

    #[test]
    fn nan_is_out_of_every_range() {
        let err = check("fraction = nan").unwrap_err();
        assert_eq!(err.path, vec!["fraction"]);
    }

    #[test]
    fn type_ranges_are_checked_before_serde_would_overflow() {
        let err = check("small = 300").unwrap_err();
        assert_eq!(err.message, "300 is out of range: expected 0..=255");
        assert_eq!(check("plain = -1").unwrap_err().message, "-1 is out of range: expected >= 0");
    }

    #[test]
    fn nested_tables_lists_maps_and_tagged_variants() {
        let err = check("http = { concurrency = 0 }").unwrap_err();
        assert_eq!(err.path, vec!["http", "concurrency"]);
        let err = check("ci = { method = \"bootstrap\", resamples = 0 }").unwrap_err();
        assert_eq!(err.path, vec!["ci", "resamples"]);
        assert!(err.message.ends_with("expected 1..=1000"), "{}", err.message);
        let err = check("sections = [1, 11]").unwrap_err();
        assert_eq!(err.path, vec!["sections", "1"]);
        let err = check("weights = { format = { concurrency = 300 } }").unwrap_err();
        assert_eq!(err.path, vec!["weights", "format", "concurrency"]);
    }

    #[test]
    fn wrong_types_are_left_to_serde() {
        check("cases = \"many\"\nhttp = 3\nsections = \"x\"\nci = { method = \"wilson\" }").unwrap();
    }

    #[test]
    fn canonical_json_is_checked_too() {
        let schema = crate::params::schema_of::<P>();
        check_json(&schema, &serde_json::json!({"cases": null, "http": {"concurrency": 4}})).unwrap();
        let err = check_json(&schema, &serde_json::json!({"cases": 0})).unwrap_err();
        assert_eq!(err.path, vec!["cases"]);
    }

    #[test]
    fn unranged_integers_and_defaults_are_found() {
        let schema = crate::params::schema_of::<P>();
        assert_eq!(unranged_integers(&schema), vec!["plain", "side", "small"]);

        #[derive(Debug, Deserialize, serde::Serialize, schemars::JsonSchema)]
        #[serde(default)]
        #[allow(dead_code)]
        struct D {
            #[schemars(range(min = 1, max = 10))]
            n: u32,
            http: Inner,
        }
        impl Default for D {
            fn default() -> Self {
                Self { n: 5, http: Inner { concurrency: 300 } }
            }
        }
        let err = check_defaults(&crate::params::schema_of::<D>()).unwrap_err();
        assert_eq!(err.path, vec!["http", "concurrency"]);
    }

    #[test]
    fn declared_ranges_leave_out_what_the_type_implies() {
        let schema = crate::params::schema_of::<P>();
        let prop = |name: &str| schema["properties"][name].clone();
        assert_eq!(declared_range(&prop("cases")).as_deref(), Some("1..=100000"));
        assert_eq!(declared_range(&prop("fraction")).as_deref(), Some("0.0..=1.0"));
        assert_eq!(declared_range(&prop("plain")), None);
        assert_eq!(declared_range(&prop("small")), None);
    }
}
