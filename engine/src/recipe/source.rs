//! The texts a recipe was assembled from (recipe files, `extends` files and
//! `--set` arguments) and the conversion of byte spans into line/column.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A position in a recipe file (or `<--set #N>` for a command-line
/// override). Line and column are 1-based; `len` counts characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLoc {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub len: usize,
}

impl fmt::Display for SourceLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// Index of a text in a [`SourceMap`].
pub(crate) type SourceId = usize;

/// Where a key or value was written: a text and a byte span inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub source: SourceId,
    pub span: Range<usize>,
}

impl Origin {
    pub fn new(source: SourceId, span: Range<usize>) -> Self {
        Self { source, span }
    }
}

struct SourceText {
    /// File path, or `<--set #N>` for a command-line override.
    name: PathBuf,
    text: Arc<str>,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
    /// Declaration rank: base files of an `extends` chain rank lower than the
    /// files extending them, `--set` arguments rank last. Orders stages and
    /// variants the way a reader of the merged recipe expects.
    rank: usize,
}

/// All texts of one recipe load.
#[derive(Default)]
pub(crate) struct SourceMap {
    texts: Vec<SourceText>,
}

impl SourceMap {
    pub fn add(&mut self, name: PathBuf, text: impl Into<Arc<str>>) -> SourceId {
        let text: Arc<str> = text.into();
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        let rank = self.texts.len();
        self.texts.push(SourceText { name, text, line_starts, rank });
        self.texts.len() - 1
    }

    pub fn text(&self, id: SourceId) -> &str {
        &self.texts[id].text
    }

    pub fn name(&self, id: SourceId) -> &Path {
        &self.texts[id].name
    }

    pub fn set_rank(&mut self, id: SourceId, rank: usize) {
        self.texts[id].rank = rank;
    }

    /// Sort key that follows declaration order across the merged texts.
    pub fn order_key(&self, origin: &Origin) -> (usize, usize) {
        (self.texts[origin.source].rank, origin.span.start)
    }

    /// 1-based line and column (in characters) of a byte span, its length
    /// in characters (clipped to the first line) and that line's text.
    pub fn locate(&self, origin: &Origin) -> (SourceLoc, String) {
        let src = &self.texts[origin.source];
        let text = &*src.text;
        let start = floor_char_boundary(text, origin.span.start.min(text.len()));
        let line_idx = match src.line_starts.binary_search(&start) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let line_start = src.line_starts[line_idx];
        let line_end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i);
        let line_text = text[line_start..line_end].trim_end_matches('\r').to_string();
        let col = text[line_start..start].chars().count() + 1;
        let end = floor_char_boundary(text, origin.span.end.clamp(start, line_end.max(start)));
        let len = text[start..end].chars().count().max(1);
        (SourceLoc { file: src.name.clone(), line: line_idx + 1, col, len }, line_text)
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_become_one_based_line_and_column() {
        let mut map = SourceMap::default();
        let id = map.add("r.toml".into(), "a = 1\n[stage.x]\nkind = \"ü\"\n");
        let (loc, line) = map.locate(&Origin::new(id, 16..20));
        assert_eq!((loc.line, loc.col, loc.len), (3, 1, 4));
        assert_eq!(line, "kind = \"ü\"");
        // Columns count characters, not bytes.
        let text = map.text(id);
        let after = text.find("ü").unwrap() + "ü".len();
        let (loc, _) = map.locate(&Origin::new(id, after..after + 1));
        assert_eq!((loc.line, loc.col), (3, 10));
    }

    #[test]
    fn multi_line_spans_are_clipped_to_their_first_line() {
        let mut map = SourceMap::default();
        let id = map.add("r.toml".into(), "x = [\n 1,\n]\n");
        let (loc, _) = map.locate(&Origin::new(id, 4..11));
        assert_eq!((loc.line, loc.col, loc.len), (1, 5, 1));
    }
}
