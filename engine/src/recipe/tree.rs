//! A TOML value tree that remembers where every key and value was written,
//! so values merged from `extends` files, sweep variants and `--set`
//! arguments still point at their own text in errors.

use std::collections::BTreeMap;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::RecipeError;
use super::source::{Origin, SourceId, SourceMap};

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub origin: Origin,
    pub value: NodeValue,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeValue {
    /// String, integer, float, boolean or datetime.
    Scalar(toml::Value),
    Array(Vec<Node>),
    Table(Table),
}

/// A table entry: where its key was written and its value.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: Origin,
    pub value: Node,
}

/// Keys are sorted by name; use [`Table::in_order`] for declaration order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    pub entries: BTreeMap<String, Entry>,
}

impl Node {
    pub fn as_table(&self) -> Option<&Table> {
        match &self.value {
            NodeValue::Table(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Scalar(toml::Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// TOML type name, as used in "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match &self.value {
            NodeValue::Scalar(v) => v.type_str(),
            NodeValue::Array(_) => "array",
            NodeValue::Table(_) => "table",
        }
    }

    /// Plain TOML value (origins dropped), for stage params.
    pub fn to_toml(&self) -> toml::Value {
        match &self.value {
            NodeValue::Scalar(v) => v.clone(),
            NodeValue::Array(items) => toml::Value::Array(items.iter().map(Node::to_toml).collect()),
            NodeValue::Table(t) => toml::Value::Table(t.to_toml()),
        }
    }

    /// Canonical text: keys sorted at every level, whatever the toml crate's
    /// map order is in this build (its `preserve_order` feature may be
    /// switched on by another crate).
    pub fn write_canonical(&self, out: &mut String) {
        match &self.value {
            NodeValue::Scalar(v) => out.push_str(&canonical_scalar(v)),
            NodeValue::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_canonical(out);
                }
                out.push(']');
            }
            NodeValue::Table(t) => t.write_canonical(out),
        }
    }
}

fn canonical_scalar(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => toml::Value::String(s.clone()).to_string(),
        toml::Value::Float(f) => format!("{f:?}"),
        other => other.to_string(),
    }
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries.get(key).map(|e| &e.value)
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn remove(&mut self, key: &str) -> Option<Entry> {
        self.entries.remove(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Entries in the order they were declared (base files first).
    pub fn in_order<'a>(&'a self, sources: &SourceMap) -> Vec<(&'a str, &'a Entry)> {
        let mut v: Vec<(&str, &Entry)> = self.entries.iter().map(|(k, e)| (k.as_str(), e)).collect();
        v.sort_by_key(|(_, e)| sources.order_key(&e.key));
        v
    }

    pub fn to_toml(&self) -> toml::Table {
        let mut t = toml::Table::new();
        for (k, e) in &self.entries {
            t.insert(k.clone(), e.value.to_toml());
        }
        t
    }

    pub fn write_canonical(&self, out: &mut String) {
        out.push('{');
        for (i, (k, e)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&toml::Value::String(k.clone()).to_string());
            out.push('=');
            e.value.write_canonical(out);
        }
        out.push('}');
    }

    /// Deep merge: tables merge key by key, anything else in `over`
    /// replaces what was there. A merged table keeps the origin of its first
    /// declaration; replaced values carry the origin of their override.
    pub fn merge(&mut self, over: Table) {
        for (key, over_entry) in over.entries {
            match self.entries.get_mut(&key) {
                Some(base) => merge_node(&mut base.value, over_entry.value, &mut base.key, over_entry.key),
                None => {
                    self.entries.insert(key, over_entry);
                }
            }
        }
    }
}

fn merge_node(base: &mut Node, over: Node, base_key: &mut Origin, over_key: Origin) {
    match (&mut base.value, over.value) {
        (NodeValue::Table(b), NodeValue::Table(o)) => b.merge(o),
        (_, value) => {
            *base = Node { origin: over.origin, value };
            *base_key = over_key;
        }
    }
}

/// Parse a TOML document into a spanned tree.
pub(crate) fn parse_document(sources: &SourceMap, id: SourceId) -> Result<Table, RecipeError> {
    let text = sources.text(id);
    let doc = DeTable::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        RecipeError::at(sources, &Origin::new(id, span), format!("invalid TOML: {}", e.message().trim_end()))
    })?;
    convert_table(sources, id, doc.into_inner())
}

/// Parse one TOML value (a `--set` right-hand side) whose text starts at
/// byte `offset` of source `id`. `None` when it is not valid TOML.
pub(crate) fn parse_value(sources: &SourceMap, id: SourceId, offset: usize, text: &str) -> Option<Node> {
    let value = DeValue::parse(text).ok()?;
    let shifted = |s: std::ops::Range<usize>| s.start + offset..s.end + offset;
    let node = convert_value(sources, id, value).ok()?;
    Some(shift_node(node, &shifted))
}

fn shift_node(mut node: Node, f: &dyn Fn(std::ops::Range<usize>) -> std::ops::Range<usize>) -> Node {
    node.origin.span = f(node.origin.span.clone());
    node.value = match node.value {
        NodeValue::Scalar(v) => NodeValue::Scalar(v),
        NodeValue::Array(items) => NodeValue::Array(items.into_iter().map(|n| shift_node(n, f)).collect()),
        NodeValue::Table(t) => NodeValue::Table(Table {
            entries: t
                .entries
                .into_iter()
                .map(|(k, e)| {
                    let key = Origin::new(e.key.source, f(e.key.span));
                    (k, Entry { key, value: shift_node(e.value, f) })
                })
                .collect(),
        }),
    };
    node
}

fn convert_table(sources: &SourceMap, id: SourceId, table: DeTable<'_>) -> Result<Table, RecipeError> {
    let mut out = Table::default();
    for (key, value) in table {
        let key_origin = Origin::new(id, key.span());
        let node = convert_value(sources, id, value)?;
        out.entries.insert(key.into_inner().into_owned(), Entry { key: key_origin, value: node });
    }
    Ok(out)
}

fn convert_value(sources: &SourceMap, id: SourceId, value: Spanned<DeValue<'_>>) -> Result<Node, RecipeError> {
    let origin = Origin::new(id, value.span());
    let value = match value.into_inner() {
        DeValue::String(s) => NodeValue::Scalar(toml::Value::String(s.into_owned())),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => NodeValue::Scalar(toml::Value::Integer(n)),
            Err(_) => {
                return Err(RecipeError::at(sources, &origin, "integer out of range")
                    .with_help("TOML integers are 64-bit signed"));
            }
        },
        DeValue::Float(f) => match f.as_str().parse::<f64>() {
            Ok(x) => NodeValue::Scalar(toml::Value::Float(x)),
            Err(_) => return Err(RecipeError::at(sources, &origin, "invalid float")),
        },
        DeValue::Boolean(b) => NodeValue::Scalar(toml::Value::Boolean(b)),
        DeValue::Datetime(d) => NodeValue::Scalar(toml::Value::Datetime(d)),
        DeValue::Array(items) => {
            NodeValue::Array(items.into_iter().map(|v| convert_value(sources, id, v)).collect::<Result<Vec<_>, _>>()?)
        }
        DeValue::Table(t) => NodeValue::Table(convert_table(sources, id, t)?),
    };
    Ok(Node { origin, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(map: &mut SourceMap, name: &str, text: &str) -> Table {
        let id = map.add(name.into(), text.to_string());
        parse_document(map, id).unwrap()
    }

    #[test]
    fn deep_merge_keeps_origins_of_overrides() {
        let mut map = SourceMap::default();
        let mut base = doc(&mut map, "base.toml", "[stage.g]\nkind = \"k\"\nw = { a = 1, b = 2 }\nl = [1, 2]\n");
        let over = doc(&mut map, "top.toml", "[stage.g]\nw.a = 5\nl = [3]\n");
        base.merge(over);
        let g = base.get("stage").unwrap().as_table().unwrap().get("g").unwrap().as_table().unwrap();
        let w = g.get("w").unwrap().to_toml();
        assert_eq!(
            w,
            toml::Value::Table(toml::toml! { a = 5
            b = 2 })
        );
        assert_eq!(g.get("l").unwrap().to_toml(), toml::Value::Array(vec![toml::Value::Integer(3)]));
        let a = g.get("w").unwrap().as_table().unwrap().get("a").unwrap();
        assert_eq!(map.name(a.origin.source).to_str(), Some("top.toml"));
        assert_eq!(map.name(g.get("kind").unwrap().origin.source).to_str(), Some("base.toml"));
    }

    #[test]
    fn numbers_in_all_toml_spellings() {
        let mut map = SourceMap::default();
        let t = doc(&mut map, "n.toml", "a = 1_000\nb = 0xff\nc = 1e3\nd = -inf\n");
        assert_eq!(t.get("a").unwrap().to_toml(), toml::Value::Integer(1000));
        assert_eq!(t.get("b").unwrap().to_toml(), toml::Value::Integer(255));
        assert_eq!(t.get("c").unwrap().to_toml(), toml::Value::Float(1000.0));
        assert_eq!(t.get("d").unwrap().to_toml(), toml::Value::Float(f64::NEG_INFINITY));
    }

    #[test]
    fn canonical_text_ignores_declaration_order() {
        let mut map = SourceMap::default();
        let a = doc(&mut map, "a.toml", "x = 1\n[t]\nb = 2.0\na = 'q'\n");
        let b = doc(&mut map, "b.toml", "[t]\na = \"q\"\nb = 2.0\n[u]\n");
        let (mut ca, mut cb) = (String::new(), String::new());
        a.write_canonical(&mut ca);
        b.write_canonical(&mut cb);
        assert_eq!(ca, r#"{"t"={"a"="q","b"=2.0},"x"=1}"#);
        assert_ne!(ca, cb);
    }

    #[test]
    fn set_values_are_shifted_to_their_argument_offset() {
        let mut map = SourceMap::default();
        let id = map.add("<--set #1>".into(), "a.b=[1, 2]".to_string());
        let node = parse_value(&map, id, 4, "[1, 2]").unwrap();
        assert_eq!(node.origin.span, 4..10);
        match node.value {
            NodeValue::Array(items) => assert_eq!(items[1].origin.span, 8..9),
            other => panic!("expected array, got {other:?}"),
        }
        assert!(parse_value(&map, id, 4, "/mnt/x").is_none());
    }
}
