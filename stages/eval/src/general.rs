//! Stage `general_vqa`: a small synthetic general-VQA set (rendered bar
//! charts and words, free-form answers) so a recipe can show the
//! general-ability check of the paper (ChartQA/TextVQA must not collapse)
//! without downloading a benchmark. The real benchmarks come in through
//! `hf_vqa` (ChartQA, TextVQA) and are scored with their harness metrics
//! (`answer_match = "chartqa"` / `"vqa_accuracy"`), as in `recipes/full.toml`.
//!
//! Output: `general-00000-of-00001.parquet` with columns `id`, `image`
//! {bytes, path}, `question`, `answer`, `class` (`chart` | `text`).

use std::fs::File;
use std::sync::Arc;

use anyhow::Context as _;
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray, StructArray};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use rand::Rng;
use rand::seq::IndexedRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{ParamError, StageContext, StageKind};
use stages_task::schema::{column, image_fields};

use crate::plots::{PlotError, render_canvas};

pub const GENERAL_PARQUET: &str = "general-00000-of-00001.parquet";

/// Prompt for free-form answers (use as the eval's `no_think_template`).
pub const FREE_FORM_TEMPLATE: &str =
    "{Question} Answer with a single word or number inside <answer>...</answer> tags, and nothing else.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GeneralVqaParams {
    /// Bar-chart questions ("What is the value of bar C?", numeric answers).
    pub charts: usize,
    /// Rendered-word questions ("What word is written in the image?").
    pub words: usize,
    /// Image side in pixels.
    pub size: u32,
    /// Words drawn from for the text questions.
    pub vocabulary: Vec<String>,
}

impl Default for GeneralVqaParams {
    fn default() -> Self {
        Self {
            charts: 12,
            words: 12,
            size: 224,
            vocabulary: ["lung", "chest", "scan", "heart", "rib", "nodule", "airway", "pleura", "liver", "spine"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// One generated question.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneralItem {
    pub id: String,
    pub png: Vec<u8>,
    pub question: String,
    pub answer: String,
    pub class: String,
}

fn chart_png(title: &str, values: &[u32], size: u32) -> Result<Vec<u8>, PlotError> {
    render_canvas(title, (size, size), |root| {
        let err = |e: &dyn std::fmt::Display| PlotError::Draw { title: title.into(), message: e.to_string() };
        let n = values.len();
        let mut chart = ChartBuilder::on(root)
            .margin(8)
            .x_label_area_size(20)
            .y_label_area_size(30)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..110.0)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                    char::from(b'A' + i as u8).to_string()
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, &v) in values.iter().enumerate() {
            let x = i as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new([(x - 0.35, 0.0), (x + 0.35, v as f64)], BLUE.filled())))
                .map_err(|e| err(&e))?;
            let style = TextStyle::from(("sans-serif", 12)).pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(std::iter::once(Text::new(v.to_string(), (x, v as f64 + 2.0), style)))
                .map_err(|e| err(&e))?;
        }
        Ok(())
    })
}

fn word_png(word: &str, size: u32) -> Result<Vec<u8>, PlotError> {
    render_canvas(word, (size, size), |root| {
        let style = TextStyle::from(("sans-serif", (size / 6) as i32)).pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new(word.to_string(), ((size / 2) as i32, (size / 2) as i32), style))
            .map_err(|e| PlotError::Draw { title: word.into(), message: e.to_string() })
    })
}

/// Generate the set (reproducible from `rng`).
pub fn generate_items(p: &GeneralVqaParams, rng: &mut impl Rng) -> Result<Vec<GeneralItem>, PlotError> {
    let mut items = Vec::with_capacity(p.charts + p.words);
    for i in 0..p.charts {
        let bars = rng.random_range(3..=5usize);
        let values: Vec<u32> = (0..bars).map(|_| rng.random_range(1..=100)).collect();
        let pick = rng.random_range(0..bars);
        let letter = char::from(b'A' + pick as u8);
        items.push(GeneralItem {
            id: format!("chart/{i:04}"),
            png: chart_png(&format!("chart {i}"), &values, p.size)?,
            question: format!("What is the value of bar {letter} in the chart?"),
            answer: values[pick].to_string(),
            class: "chart".into(),
        });
    }
    for i in 0..p.words {
        let word = p.vocabulary.choose(rng).cloned().unwrap_or_else(|| "lung".into());
        items.push(GeneralItem {
            id: format!("text/{i:04}"),
            png: word_png(&word, p.size)?,
            question: "What word is written in the image?".into(),
            answer: word,
            class: "text".into(),
        });
    }
    Ok(items)
}

fn write_parquet(path: &std::path::Path, items: &[GeneralItem]) -> anyhow::Result<()> {
    let s = |f: &dyn Fn(&GeneralItem) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(items.iter().map(f)))
    };
    let image = StructArray::try_new(
        image_fields(),
        vec![
            Arc::new(BinaryArray::from_iter_values(items.iter().map(|i| i.png.as_slice()))),
            s(&|i| format!("{}.png", i.id.replace('/', "_"))),
        ],
        None,
    )?;
    let batch = RecordBatch::try_from_iter(vec![
        (column::ID, s(&|i| i.id.clone())),
        (column::IMAGE, Arc::new(image) as ArrayRef),
        (column::QUESTION, s(&|i| i.question.clone())),
        (column::ANSWER, s(&|i| i.answer.clone())),
        (column::CLASS, s(&|i| i.class.clone())),
    ])?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_created_by("medreason-pipeline general_vqa".into())
        .build();
    let mut w = ArrowWriter::try_new(
        File::create(path).with_context(|| format!("creating {}", path.display()))?,
        batch.schema(),
        Some(props),
    )?;
    w.write(&batch)?;
    w.close().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub struct GeneralVqa;

impl StageKind for GeneralVqa {
    type Params = GeneralVqaParams;
    const KIND: &'static str = "general_vqa";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Synthetic general VQA set (rendered bar charts and words, free-form answers) for the general-ability check";

    fn validate(p: &Self::Params) -> Result<(), ParamError> {
        if p.charts + p.words == 0 {
            return Err(ParamError::new(&["charts"], "charts + words must be at least 1"));
        }
        if p.size < 56 {
            return Err(ParamError::new(&["size"], "must be at least 56 pixels"));
        }
        if p.words > 0 && p.vocabulary.is_empty() {
            return Err(ParamError::new(&["vocabulary"], "must not be empty when words > 0"));
        }
        Ok(())
    }

    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let mut rng = ctx.rng("general_vqa");
        let items = generate_items(params, &mut rng)?;
        write_parquet(&ctx.output_dir().join(GENERAL_PARQUET), &items)?;
        tracing::info!(items = items.len(), "general VQA set written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use stages_task::answer::{AnswerMatch, Scorer};
    use stages_task::completion::ResponseFormat;
    use stages_task::dataset::read_split;

    #[test]
    fn general_set_is_reproducible_and_readable_by_eval() {
        let p = GeneralVqaParams { charts: 3, words: 2, size: 112, ..Default::default() };
        let a = generate_items(&p, &mut ChaCha8Rng::seed_from_u64(4)).unwrap();
        let b = generate_items(&p, &mut ChaCha8Rng::seed_from_u64(4)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 5);
        assert!(a[0].question.starts_with("What is the value of bar") && a[0].answer.parse::<u32>().is_ok());
        assert!(p.vocabulary.contains(&a[4].answer));
        let img = image::load_from_memory(&a[4].png).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (112, 112));
        assert!(img.pixels().any(|px| px.0[0] < 100), "the word is drawn");

        let dir = tempfile::tempdir().unwrap();
        let mut ctx = StageContext::builder("general", dir.path().join("out")).seed(1).build().unwrap();
        GeneralVqa::run(&p, &mut ctx).unwrap();
        let rows = read_split(&dir.path().join("out")).unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!((rows[4].class.as_str(), rows[0].options.len()), ("text", 0));
        // A free-form scorer accepts the gold answer in tags.
        let s = Scorer::new(r"<answer>\s*(.*?)\s*</answer>", ResponseFormat::NoThink, AnswerMatch::Relaxed).unwrap();
        let score = s.score(&format!("<answer>{}</answer>", rows[0].answer), &rows[0].answer, &[]);
        assert!(score.correct);
    }
}
