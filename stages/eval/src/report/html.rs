//! `report.html`: one self-contained page (plots and gallery images embedded
//! as base64 `data:` URIs, opens offline), rendered from
//! `templates/report.html` by minijinja with HTML autoescape on, so every
//! label, id, class name, prompt and completion is escaped by the engine.

use base64::Engine as _;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

use super::model::Report;

const TEMPLATE_NAME: &str = "report.html";
const TEMPLATE: &str = include_str!("../../templates/report.html");

fn sniff_mime(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"\x89PNG") {
        "image/png"
    } else if bytes.starts_with(&[0xff, 0xd8]) {
        "image/jpeg"
    } else {
        "application/octet-stream"
    }
}

/// A `data:` URI: a fixed MIME type and base64 text, safe in an attribute as is.
fn data_uri(bytes: &[u8]) -> String {
    format!("data:{};base64,{}", sniff_mime(bytes), base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// An HTML id for a section title (`Training curves` -> `training-curves`).
fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

#[derive(Serialize)]
struct Page<'a> {
    title: &'a str,
    tables: Vec<TableView<'a>>,
    plot_sections: Vec<PlotSection<'a>>,
    gallery: Vec<GallerySection<'a>>,
}

#[derive(Serialize)]
struct TableView<'a> {
    title: &'a str,
    header: &'a [String],
    rows: Vec<RowView<'a>>,
}

#[derive(Serialize)]
struct RowView<'a> {
    /// The run whose rows start here (a header row), if one does.
    group_header: Option<&'a str>,
    cells: &'a [String],
}

#[derive(Serialize)]
struct PlotSection<'a> {
    title: &'a str,
    anchor: String,
    plots: Vec<PlotView<'a>>,
}

#[derive(Serialize)]
struct PlotView<'a> {
    caption: &'a str,
    src: String,
}

#[derive(Serialize)]
struct GallerySection<'a> {
    heading: &'a str,
    examples: Vec<ExampleView<'a>>,
}

#[derive(Serialize)]
struct ExampleView<'a> {
    id: &'a str,
    correct: bool,
    image_src: Option<String>,
    gold: &'a str,
    class_name: &'a str,
    answer: &'a str,
    outcome: String,
    prompt: &'a str,
    completion: &'a str,
}

impl Report {
    pub fn html(&self) -> Result<String, minijinja::Error> {
        let page = Page {
            title: &self.title,
            tables: self
                .tables
                .iter()
                .map(|t| TableView {
                    title: &t.title,
                    header: &t.header,
                    rows: t
                        .rows_with_group_headers()
                        .into_iter()
                        .map(|(group_header, r)| RowView { group_header, cells: &r.cells })
                        .collect(),
                })
                .collect(),
            plot_sections: self
                .plots
                .iter()
                .map(|(title, plots)| PlotSection {
                    title,
                    anchor: anchor(title),
                    plots: plots.iter().map(|p| PlotView { caption: &p.caption, src: data_uri(&p.png) }).collect(),
                })
                .collect(),
            gallery: self
                .gallery
                .iter()
                .map(|(heading, examples)| GallerySection {
                    heading,
                    examples: examples
                        .iter()
                        .map(|ex| {
                            let p = &ex.prediction;
                            ExampleView {
                                id: &p.id,
                                correct: p.correct,
                                image_src: ex.image.as_deref().map(data_uri),
                                gold: &p.gold,
                                class_name: &p.class_name,
                                answer: p.extracted.as_deref().unwrap_or("—"),
                                outcome: format!("{:?}", p.outcome).to_lowercase(),
                                prompt: &p.prompt,
                                completion: &p.completion,
                            }
                        })
                        .collect(),
                })
                .collect(),
        };
        let mut env = Environment::new();
        // Block tags on lines of their own leave no blank lines; the page ends with a newline.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.add_template(TEMPLATE_NAME, TEMPLATE)?;
        env.get_template(TEMPLATE_NAME)?.render(&page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_and_data_uris() {
        assert_eq!(anchor("Training curves"), "training-curves");
        assert_eq!(anchor("Per-class accuracy (%)"), "per-class-accuracy");
        assert_eq!(data_uri(b"\x89PNGxx"), "data:image/png;base64,iVBOR3h4");
        assert!(data_uri(&[0xff, 0xd8, 0]).starts_with("data:image/jpeg;base64,"));
    }
}
