//! `report.md`: the tables as Markdown tables, the plots as image links into
//! `plots/`, the gallery as a list of completions.

use std::fmt::Write as _;

use super::model::Report;
use crate::artifacts::PLOTS_DIR;

/// Markdown table cells must not break the row.
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        for t in &self.tables {
            let _ = writeln!(s, "## {}\n", t.title);
            let _ = writeln!(s, "| {} |", t.header.iter().map(|h| md_cell(h)).collect::<Vec<_>>().join(" | "));
            let _ = writeln!(s, "|{}|", vec!["---"; t.header.len()].join("|"));
            for (group, r) in t.rows_with_group_headers() {
                if let Some(g) = group {
                    let _ = writeln!(s, "| **{}** |{}", md_cell(g), " |".repeat(t.header.len().saturating_sub(1)));
                }
                let _ = writeln!(s, "| {} |", r.cells.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | "));
            }
            s.push('\n');
        }
        for (section, plots) in &self.plots {
            let _ = writeln!(s, "## {section}\n");
            for p in plots {
                let _ = writeln!(s, "![{}]({PLOTS_DIR}/{})\n", md_cell(&p.caption), p.file);
            }
        }
        let _ = writeln!(s, "## Examples\n");
        for (heading, examples) in &self.gallery {
            let _ = writeln!(s, "### {heading}\n");
            for ex in examples {
                let p = &ex.prediction;
                let _ = writeln!(
                    s,
                    "- `{}` gold {} ({}), {:?}: `{}`",
                    p.id,
                    p.gold,
                    p.class_name,
                    p.outcome,
                    md_cell(&p.completion).replace('`', "'")
                );
            }
            s.push('\n');
        }
        s
    }
}
