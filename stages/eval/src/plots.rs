//! Report plots drawn with plotters into an RGB buffer and encoded as PNG
//! with fixed settings (byte-identical for identical inputs). Text uses
//! DejaVu Sans embedded in the binary through plotters' `ab_glyph` backend,
//! so rendering needs no fontconfig or system fonts.

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot `{title}`: {message}")]
    Draw { title: String, message: String },
    #[error("plot `{title}`: PNG encoding failed: {message}")]
    Encode { title: String, message: String },
}

const FONT: &str = "sans-serif";

fn register_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    })
}

fn draw_err(title: &str, e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw { title: title.into(), message: e.to_string() }
}

/// Encode an RGB buffer as PNG (default compression, no timestamps/text chunks).
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| e.to_string())?;
    w.write_image_data(rgb).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Draw with `f` on a white `width` x `height` canvas and return PNG bytes.
pub fn render_canvas(
    title: &str,
    (width, height): (u32, u32),
    f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), PlotError>,
) -> Result<Vec<u8>, PlotError> {
    if !register_font() {
        return Err(draw_err(title, "the embedded DejaVu font could not be registered"));
    }
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(title, e))?;
        f(&root)?;
        root.present().map_err(|e| draw_err(title, e))?;
    }
    encode_png(&buf, width, height).map_err(|message| PlotError::Encode { title: title.into(), message })
}

/// A short axis label: the first word of a class name, at most 16 characters.
pub fn short_label(name: &str) -> String {
    let first = name.split([' ', '/']).next().unwrap_or(name);
    first.chars().take(16).collect()
}

/// Grouped bars: one group per category, one bar per series, values in 0..1.
pub fn grouped_bars(title: &str, categories: &[String], series: &[(String, Vec<f64>)]) -> Result<Vec<u8>, PlotError> {
    let n = categories.len().max(1);
    render_canvas(title, (960, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..1.0)
            .map_err(|e| draw_err(title, e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    categories.get(i as usize).map(|c| short_label(c)).unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("accuracy")
            .label_style((FONT, 13))
            .draw()
            .map_err(|e| draw_err(title, e))?;
        let k = series.len().max(1) as f64;
        let width = 0.8 / k;
        for (s, (name, values)) in series.iter().enumerate() {
            let color = Palette99::pick(s).to_rgba();
            let bars = values.iter().enumerate().map(move |(i, v)| {
                let x0 = i as f64 - 0.4 + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v.clamp(0.0, 1.0))], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(|e| draw_err(title, e))?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(title, e))
    })
}

/// Confusion matrix: rows gold, columns predicted; cells shaded by row share.
pub fn heatmap(title: &str, rows: &[String], cols: &[String], counts: &[Vec<u64>]) -> Result<Vec<u8>, PlotError> {
    let (nr, nc) = (rows.len().max(1), cols.len().max(1));
    render_canvas(title, (200 + 96 * nc as u32, 120 + 48 * nr as u32), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(120)
            .build_cartesian_2d(-0.5f64..(nc as f64 - 0.5), -0.5f64..(nr as f64 - 0.5))
            .map_err(|e| draw_err(title, e))?;
        let label = |names: &[String], v: f64, flip: bool| {
            let i = v.round();
            if (v - i).abs() > 1e-6 || i < 0.0 || i as usize >= names.len() {
                return String::new();
            }
            let idx = if flip { names.len() - 1 - i as usize } else { i as usize };
            short_label(&names[idx])
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nc)
            .y_labels(nr)
            .x_label_formatter(&|x| label(cols, *x, false))
            .y_label_formatter(&|y| label(rows, *y, true))
            .x_desc("predicted")
            .y_desc("gold")
            .label_style((FONT, 12))
            .draw()
            .map_err(|e| draw_err(title, e))?;
        for (r, row) in counts.iter().enumerate() {
            let total: u64 = row.iter().sum();
            let y = (nr - 1 - r) as f64;
            for (c, &n) in row.iter().enumerate() {
                let share = if total == 0 { 0.0 } else { n as f64 / total as f64 };
                let shade = (255.0 * (1.0 - 0.8 * share)) as u8;
                let x = c as f64;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                        RGBColor(shade, shade, 255).filled(),
                    )))
                    .map_err(|e| draw_err(title, e))?;
                let color = if share > 0.6 { WHITE } else { BLACK };
                let style = TextStyle::from((FONT, 14)).color(&color).pos(Pos::new(HPos::Center, VPos::Center));
                chart
                    .draw_series(std::iter::once(Text::new(n.to_string(), (x, y), style)))
                    .map_err(|e| draw_err(title, e))?;
            }
        }
        Ok(())
    })
}

/// One line of a curve plot, optionally with a shaded band (x, lo, hi)
/// around it (e.g. reward ± its std over the group).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Empty: no band.
    pub band: Vec<(f64, f64, f64)>,
}

/// Lines of (x, y) points, one per series (a training metric over steps).
pub fn lines(title: &str, x_desc: &str, series: &[Line]) -> Result<Vec<u8>, PlotError> {
    let pts = series
        .iter()
        .flat_map(|l| l.points.iter().copied().chain(l.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)])));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    render_canvas(title, (470, 300), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| draw_err(title, e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .label_style((FONT, 11))
            .x_labels(6)
            .y_labels(6)
            .draw()
            .map_err(|e| draw_err(title, e))?;
        // Bands first so every line stays visible on top of them.
        for (s, line) in series.iter().enumerate().filter(|(_, l)| l.band.len() > 1) {
            let color = Palette99::pick(s).to_rgba();
            let outline: Vec<(f64, f64)> = line
                .band
                .iter()
                .map(|&(x, _, hi)| (x, hi))
                .chain(line.band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(outline, color.mix(0.18).filled())))
                .map_err(|e| draw_err(title, e))?;
        }
        for (s, line) in series.iter().enumerate() {
            let color = Palette99::pick(s).to_rgba();
            chart
                .draw_series(LineSeries::new(line.points.iter().copied(), color.stroke_width(2)))
                .map_err(|e| draw_err(title, e))?
                .label(line.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
        }
        if series.len() > 1 || series.iter().any(|l| !l.name.is_empty()) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FONT, 11))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| draw_err(title, e))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let img = image::load_from_memory(png_bytes).unwrap().to_rgb8();
        (img.width(), img.height(), img.into_raw())
    }

    #[test]
    fn plots_render_text_and_are_deterministic() {
        let cats: Vec<String> = ["airway abnormalities", "emphysema"].map(String::from).to_vec();
        let series = vec![("base".to_string(), vec![0.2, 0.5]), ("grpo".to_string(), vec![0.6, 0.9])];
        let a = grouped_bars("Per-class accuracy", &cats, &series).unwrap();
        assert_eq!(a, grouped_bars("Per-class accuracy", &cats, &series).unwrap(), "same inputs, same bytes");
        let (w, h, px) = decode(&a);
        assert_eq!((w, h), (960, 420));
        // The caption band (top 30 px) must contain dark text pixels: fonts work without fontconfig.
        let dark = px[..(w * 30 * 3) as usize].chunks(3).filter(|p| p.iter().all(|&c| c < 100)).count();
        assert!(dark > 50, "caption text rendered ({dark} dark pixels)");
        let blank = grouped_bars("", &cats, &[]).unwrap();
        assert_ne!(blank, a);

        let hm = heatmap("Confusion", &cats, &cats, &[vec![3, 1], vec![0, 4]]).unwrap();
        assert_eq!(decode(&hm).0, 200 + 96 * 2);
        let line = |name: &str, points: Vec<(f64, f64)>| Line { name: name.into(), points, band: Vec::new() };
        let sft = line("sft", vec![(0.0, 2.0), (1.0, 1.5), (2.0, 1.2)]);
        let l = lines("loss", "step", std::slice::from_ref(&sft)).unwrap();
        assert_eq!(decode(&l).1, 300);
        // A band shades pixels the bare line leaves white.
        let banded = Line { band: vec![(0.0, 1.0, 3.0), (1.0, 1.0, 2.0), (2.0, 1.0, 1.4)], ..sft.clone() };
        let b = lines("loss", "step", &[banded]).unwrap();
        let white = |png: &[u8]| decode(png).2.chunks(3).filter(|p| p.iter().all(|&c| c == 255)).count();
        assert!(white(&b) < white(&l), "band drawn");
        // Degenerate input (no points, one point) still renders.
        lines("empty", "step", &[]).unwrap();
        lines("one", "step", &[line("x", vec![(3.0, 1.0)])]).unwrap();
    }

    #[test]
    fn short_labels_keep_the_first_word() {
        assert_eq!(short_label("pleural effusion/thickening"), "pleural");
        assert_eq!(short_label("consolidation/atelectasis"), "consolidation");
        assert_eq!(short_label("fibrosis-related changes"), "fibrosis-related");
    }
}
