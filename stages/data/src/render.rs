//! Stage `render`: lesion slices -> RGB PNG model inputs (the paper's Fig. 1a).
//!
//! Inputs: `slices` (the `lesion_slices` output), `index` and optional
//! `dataset` (as for `lesion_slices`: where the CT volumes are). Each case's
//! CT is read once (`read_f32`, scaling applied) by one worker of the stage
//! pool; its listed slices are then rendered:
//! 1. HU window: clip to `clip = [lo, hi]` (default [-1000, 1000], the CT-RATE
//!    normalisation; out-of-field padding such as -8192 lands on black) or
//!    `window = {level, width}`, then `floor((v - lo) * 255 / (hi - lo) + 0.5)`;
//! 2. output size: with `resize` the model processor's `smart_resize`
//!    (`stages-vlm-resize`, HF `Qwen2VLImageProcessor`'s rule: sides
//!    multiples of `size_factor` = 28, area within [`min_pixels`,
//!    `max_pixels`] = 401,408), else the native slice size; the grey slice
//!    is resized with `filter`, boxes are scaled outward (floor/ceil);
//! 3. the localisation box (`box_color`, `box_width` px, drawn just outside the
//!    zoom box so lesion pixels stay visible) when `draw_box`;
//! 4. with `zoom`: the zoom box (`zoom_box = "largest"` area box, or the
//!    `"union"` of all boxes) is cropped from the NATIVE slice as a square of
//!    side `max(w, h) * (1 + 2 * zoom_margin)` centred on the box (shifted to
//!    stay inside), resized to `patch_side` (a fraction of the shorter output
//!    side, or pixels), pasted at the upper-left corner (0, 0), and given a
//!    `patch_border_width` px border of `patch_border_color` on its outermost
//!    pixels. The patch is drawn after the box, so it covers a box lying under
//!    the upper-left corner;
//! 5. PNG (RGB8) with the fixed `png_compression`, so bytes are reproducible.
//!
//! Output: `images/<id with '/' replaced by "__">.png` and `items.jsonl`: each
//! `lesion_slices` record plus `image` (path relative to this output),
//! `width`, `height`, `image_boxes` (boxes in output pixels), `zoom_box`
//! (native pixels, null without zoom) and `patch` (its region in the output).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use image::imageops::{self, FilterType};
use image::{GrayImage, Rgb, RgbImage};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::plan::facts;
use stage_api::{InputSpec, ParamError, PlanOutput, PlanView, Resources, StageContext, StageKind};
use stages_vlm_resize::smart_resize;

use crate::components::BBox;
use crate::jsonl;
use crate::nifti::{self, AxialSlicer};
use crate::slices::{SliceItem, load_index};

/// Window given as level (centre) and width, in HU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub level: f32,
    pub width: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ZoomBox {
    /// The box with the largest area (first in raster order on ties).
    Largest,
    /// The smallest box containing all boxes of the slice.
    Union,
}

/// Patch side: a fraction of the shorter output side (float, e.g. 0.333) or pixels (integer).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PatchSide {
    // The largest slice side the stage accepts (`max_pixels` = 4096 x 4096).
    Pixels(#[schemars(range(min = 1, max = 4096))] u32),
    // > 0 is checked in `validate`.
    Fraction(#[schemars(range(min = 0.0, max = 1.0))] f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    Nearest,
    Triangle,
    CatmullRom,
    Lanczos3,
}

impl From<ResizeFilter> for FilterType {
    fn from(f: ResizeFilter) -> Self {
        match f {
            ResizeFilter::Nearest => FilterType::Nearest,
            ResizeFilter::Triangle => FilterType::Triangle,
            ResizeFilter::CatmullRom => FilterType::CatmullRom,
            ResizeFilter::Lanczos3 => FilterType::Lanczos3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PngCompression {
    Fast,
    Balanced,
    High,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RenderParams {
    /// HU range `[lo, hi]` mapped linearly onto 0..255 (values outside are clipped).
    pub clip: [f32; 2],
    /// Level/width window (e.g. lung: `{ level = -600, width = 1500 }`); overrides `clip`.
    pub window: Option<Window>,
    /// Paste a magnified patch of the lesion at the upper-left corner.
    pub zoom: bool,
    /// Which box the patch magnifies: `largest` or `union`.
    pub zoom_box: ZoomBox,
    /// Context around the zoom box, as a fraction of its longer side on each side.
    #[schemars(range(min = 0.0, max = 2.0))]
    pub zoom_margin: f64,
    /// Patch side: fraction of the shorter output side (float) or pixels (integer).
    pub patch_side: PatchSide,
    /// RGB colour of the patch border (paper: green).
    pub patch_border_color: [u8; 3],
    /// Patch border width in pixels.
    // Wider than that is no border but a frame filling the patch.
    #[schemars(range(max = 256))]
    pub patch_border_width: u32,
    /// Draw the localisation box around the zoom box on the slice.
    pub draw_box: bool,
    /// RGB colour of the localisation box (paper: red).
    pub box_color: [u8; 3],
    /// Localisation box line width in pixels.
    #[schemars(range(max = 256))]
    pub box_width: u32,
    /// Resize to the model's input grid (`smart_resize`); false keeps the native size.
    pub resize: bool,
    /// Upper bound on output pixels (401,408 = 512 visual tokens of 28x28).
    // 4096 x 4096: above Qwen2.5-VL's own processor maximum (12,845,056).
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_pixels: u64,
    /// Lower bound on output pixels.
    #[schemars(range(max = 16_777_216))]
    pub min_pixels: u64,
    /// Output sides are multiples of this (Qwen2.5-VL: 28).
    // Qwen2.5-VL: 28 (14 px patches, merged 2 x 2).
    #[schemars(range(min = 1, max = 1024))]
    pub size_factor: u32,
    /// Resampling filter: `nearest`, `triangle` (bilinear), `catmull_rom`, `lanczos3`.
    pub filter: ResizeFilter,
    /// PNG compression preset (`fast`, `balanced`, `high`); fixed, so bytes are reproducible.
    pub png_compression: PngCompression,
}

impl Default for RenderParams {
    fn default() -> Self {
        Self {
            clip: [-1000.0, 1000.0],
            window: None,
            zoom: true,
            zoom_box: ZoomBox::Largest,
            zoom_margin: 0.1,
            patch_side: PatchSide::Fraction(1.0 / 3.0),
            patch_border_color: [0, 255, 0],
            patch_border_width: 3,
            draw_box: true,
            box_color: [255, 0, 0],
            box_width: 3,
            resize: true,
            max_pixels: 401_408,
            min_pixels: 3_136,
            size_factor: 28,
            filter: ResizeFilter::Triangle,
            png_compression: PngCompression::Fast,
        }
    }
}

impl RenderParams {
    /// The HU range mapped onto 0..255.
    pub fn hu_range(&self) -> (f32, f32) {
        match self.window {
            Some(w) => (w.level - w.width / 2.0, w.level + w.width / 2.0),
            None => (self.clip[0], self.clip[1]),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("slice has {len} values, expected {rows} x {cols}")]
    Shape { len: usize, rows: usize, cols: usize },
    #[error("box {0:?} lies outside the {1} x {2} slice")]
    BoxOutside(BBox, usize, usize),
    #[error("PNG encoding: {0}")]
    Png(String),
    #[error("resizing the {rows} x {cols} slice: {message}")]
    Resize { rows: u32, cols: u32, message: String },
}

/// HU -> 8-bit grey, row-major.
pub fn window_to_gray(hu: &[f32], lo: f32, hi: f32) -> Vec<u8> {
    let scale = 255.0f32 / (hi - lo);
    hu.iter().map(|&v| ((v.clamp(lo, hi) - lo) * scale + 0.5).floor() as u8).collect()
}

/// The output size with `resize`: the model processor's `smart_resize` (so
/// the processor keeps the image as rendered), within this stage's bounds.
fn output_size(rows: u32, cols: u32, p: &RenderParams) -> Result<(u32, u32), RenderError> {
    let err = |message: String| RenderError::Resize { rows, cols, message };
    // u64 -> usize is lossless on the 64-bit targets libtorch exists for.
    let (min, max) = (p.min_pixels as usize, p.max_pixels as usize);
    let (h, w) =
        smart_resize(rows as usize, cols as usize, p.size_factor as usize, min, max).map_err(|e| err(e.to_string()))?;
    match (u32::try_from(h), u32::try_from(w)) {
        (Ok(h), Ok(w)) => Ok((h, w)),
        _ => Err(err(format!("output size {h} x {w} does not fit in u32"))),
    }
}

/// A rendered slice before encoding, with where things were drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Composed {
    pub image: RgbImage,
    pub image_boxes: Vec<BBox>,
    pub zoom_box: Option<BBox>,
    pub patch: Option<BBox>,
}

fn scale_box(b: &BBox, sx: f64, sy: f64, w: u32, h: u32) -> BBox {
    BBox {
        x0: (b.x0 as f64 * sx).floor() as u32,
        y0: (b.y0 as f64 * sy).floor() as u32,
        x1: ((b.x1 as f64 * sx).ceil() as u32).min(w),
        y1: ((b.y1 as f64 * sy).ceil() as u32).min(h),
    }
}

fn gray_to_rgb(g: &GrayImage) -> RgbImage {
    RgbImage::from_fn(g.width(), g.height(), |x, y| {
        let v = g.get_pixel(x, y)[0];
        Rgb([v, v, v])
    })
}

/// Paint the ring of `width` px just outside `b` (clipped to the image).
fn draw_outline(img: &mut RgbImage, b: &BBox, width: u32, color: [u8; 3]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let wd = width as i64;
    let (x0, y0, x1, y1) = (b.x0 as i64 - wd, b.y0 as i64 - wd, b.x1 as i64 + wd, b.y1 as i64 + wd);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            let inside = x >= b.x0 as i64 && x < b.x1 as i64 && y >= b.y0 as i64 && y < b.y1 as i64;
            if !inside {
                img.put_pixel(x as u32, y as u32, Rgb(color));
            }
        }
    }
}

/// Square crop (in native pixels) around `b`, grown by `margin` of its longer side per side.
fn zoom_crop(b: &BBox, margin: f64, rows: u32, cols: u32) -> BBox {
    let side = (b.width().max(b.height()) as f64 * (1.0 + 2.0 * margin)).ceil() as u32;
    let side = side.max(1).min(rows).min(cols);
    let start = |lo: u32, hi: u32, limit: u32| -> u32 {
        let s = (i64::from(lo) + i64::from(hi) - i64::from(side)).div_euclid(2);
        s.clamp(0, i64::from(limit - side)) as u32
    };
    let (x0, y0) = (start(b.x0, b.x1, cols), start(b.y0, b.y1, rows));
    BBox { x0, y0, x1: x0 + side, y1: y0 + side }
}

/// Window, resize, draw and paste (steps 1-4 of the module docs).
pub fn compose(
    hu: &[f32],
    rows: usize,
    cols: usize,
    boxes: &[BBox],
    p: &RenderParams,
) -> Result<Composed, RenderError> {
    if hu.len() != rows * cols {
        return Err(RenderError::Shape { len: hu.len(), rows, cols });
    }
    if let Some(b) = boxes.iter().find(|b| b.x1 as usize > cols || b.y1 as usize > rows || b.x0 >= b.x1 || b.y0 >= b.y1)
    {
        return Err(RenderError::BoxOutside(*b, rows, cols));
    }
    let (lo, hi) = p.hu_range();
    let (r, c) = (rows as u32, cols as u32);
    let native = GrayImage::from_raw(c, r, window_to_gray(hu, lo, hi)).ok_or(RenderError::Shape {
        len: hu.len(),
        rows,
        cols,
    })?;
    let (h, w) = if p.resize { output_size(r, c, p)? } else { (r, c) };
    let filter: FilterType = p.filter.into();
    let base = if (h, w) == (r, c) { native.clone() } else { imageops::resize(&native, w, h, filter) };
    let mut img = gray_to_rgb(&base);
    let (sx, sy) = (w as f64 / c as f64, h as f64 / r as f64);
    let image_boxes: Vec<BBox> = boxes.iter().map(|b| scale_box(b, sx, sy, w, h)).collect();
    let zoom_box = match p.zoom_box {
        // max_by_key keeps the last maximum: reverse so ties pick the first box.
        ZoomBox::Largest => boxes.iter().rev().max_by_key(|b| b.area()).copied(),
        ZoomBox::Union => boxes.iter().copied().reduce(|a, b| a.union(&b)),
    };
    if let (true, Some(zb)) = (p.draw_box, zoom_box) {
        draw_outline(&mut img, &scale_box(&zb, sx, sy, w, h), p.box_width, p.box_color);
    }
    let mut patch_region = None;
    if let (true, Some(zb)) = (p.zoom, zoom_box) {
        let crop = zoom_crop(&zb, p.zoom_margin, r, c);
        let side = match p.patch_side {
            PatchSide::Pixels(px) => px,
            PatchSide::Fraction(f) => (f * h.min(w) as f64).round() as u32,
        }
        .clamp(1, h.min(w));
        let cropped = imageops::crop_imm(&native, crop.x0, crop.y0, crop.width(), crop.height()).to_image();
        let patch = if cropped.width() == side { cropped } else { imageops::resize(&cropped, side, side, filter) };
        let mut patch = gray_to_rgb(&patch);
        let bw = p.patch_border_width.min(side);
        for (x, y, px) in patch.enumerate_pixels_mut() {
            if x < bw || y < bw || x >= side - bw || y >= side - bw {
                *px = Rgb(p.patch_border_color);
            }
        }
        imageops::replace(&mut img, &patch, 0, 0);
        patch_region = Some(BBox { x0: 0, y0: 0, x1: side, y1: side });
    }
    Ok(Composed {
        image: img,
        image_boxes,
        zoom_box: if p.zoom || p.draw_box { zoom_box } else { None },
        patch: patch_region,
    })
}

/// PNG bytes of an RGB image with fixed settings.
pub fn encode_png(img: &RgbImage, compression: PngCompression) -> Result<Vec<u8>, RenderError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(match compression {
        PngCompression::Fast => png::Compression::Fast,
        PngCompression::Balanced => png::Compression::Balanced,
        PngCompression::High => png::Compression::High,
    });
    let mut w = enc.write_header().map_err(|e| RenderError::Png(e.to_string()))?;
    w.write_image_data(img.as_raw()).map_err(|e| RenderError::Png(e.to_string()))?;
    w.finish().map_err(|e| RenderError::Png(e.to_string()))?;
    Ok(out)
}

/// A `lesion_slices` record plus where its image is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderedItem {
    #[serde(flatten)]
    pub item: SliceItem,
    pub image: String,
    pub width: u32,
    pub height: u32,
    pub image_boxes: Vec<BBox>,
    pub zoom_box: Option<BBox>,
    pub patch: Option<BBox>,
}

pub fn image_path(id: &str) -> String {
    format!("images/{}.png", id.replace('/', "__"))
}

fn render_case(
    items: &[SliceItem],
    ct_path: &Path,
    out_dir: &Path,
    p: &RenderParams,
) -> anyhow::Result<Vec<RenderedItem>> {
    let vol = nifti::read_f32(ct_path)?;
    if vol.dims.iter().skip(3).any(|&d| d != 1) {
        bail!("{}: CT must be 3D, got dims {:?}", ct_path.display(), vol.dims);
    }
    let slicer = AxialSlicer::new(&vol.header.affine, vol.dims3()).with_context(|| ct_path.display().to_string())?;
    let (rows, cols) = slicer.slice_dims();
    let mut buf = Vec::new();
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        if (it.rows, it.cols) != (rows, cols) || it.slice >= slicer.num_slices() {
            bail!(
                "item `{}` expects slice {} of {}x{} but {} has {} slices of {rows}x{cols}",
                it.id,
                it.slice,
                it.rows,
                it.cols,
                ct_path.display(),
                slicer.num_slices()
            );
        }
        slicer.slice(&vol.data, it.slice, &mut buf);
        let composed = compose(&buf, rows, cols, &it.boxes, p).with_context(|| format!("item `{}`", it.id))?;
        let png = encode_png(&composed.image, p.png_compression)?;
        let rel = image_path(&it.id);
        let path = out_dir.join(&rel);
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        out.push(RenderedItem {
            item: it.clone(),
            image: rel,
            width: composed.image.width(),
            height: composed.image.height(),
            image_boxes: composed.image_boxes,
            zoom_box: composed.zoom_box,
            patch: composed.patch,
        });
    }
    Ok(out)
}

pub struct Render;

impl StageKind for Render {
    type Params = RenderParams;
    const KIND: &'static str = "render";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "HU window, zoom-in patch at the upper-left, boxes, smart_resize, reproducible PNG per lesion slice";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::one("slices", "`lesion_slices` output (items.jsonl)"),
            InputSpec::one("index", "`rexgct_index` output (case paths)"),
            InputSpec::optional("dataset", "dataset root artifact (when the index has no `root`)"),
        ];
        INPUTS
    }

    fn resources(_: &RenderParams) -> Resources {
        // One f32 CT per worker (512x512x332 = 350 MB).
        Resources { cpu: 0, memory_mb: 2048, ..Default::default() }
    }

    /// With `resize`, no image is larger than `max_pixels`: the bound the
    /// model stages' memory predictions read downstream (as a plan fact).
    fn plan_output(p: &RenderParams, plan: &PlanView) -> PlanOutput {
        let mut out = PlanOutput::pass_through(plan);
        if p.resize {
            out.facts.set(facts::MAX_IMAGE_PIXELS, p.max_pixels);
        }
        out
    }

    fn validate(p: &RenderParams) -> Result<(), ParamError> {
        let (lo, hi) = p.hu_range();
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            let key = if p.window.is_some() { "window" } else { "clip" };
            return Err(ParamError::new(&[key], format!("HU range must satisfy lo < hi, got [{lo}, {hi}]")));
        }
        match p.patch_side {
            PatchSide::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(ParamError::new(&["patch_side"], format!("a fraction must be in (0, 1], got {f}")));
            }
            _ => {}
        }
        if p.resize && p.min_pixels > p.max_pixels {
            return Err(ParamError::new(&["min_pixels"], "must not exceed max_pixels"));
        }
        Ok(())
    }

    fn run(params: &RenderParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let (index, base) = load_index(ctx)?;
        let cases: BTreeMap<&str, &crate::slices::IndexCase> =
            index.cases.iter().map(|c| (c.name.as_str(), c)).collect();
        let items_path = ctx.input("slices")?.join("items.jsonl");
        let items: Vec<SliceItem> = jsonl::read(&items_path)?;
        let mut by_case: BTreeMap<&str, Vec<SliceItem>> = BTreeMap::new();
        for it in &items {
            by_case.entry(it.case.as_str()).or_default().push(it.clone());
        }
        for case in by_case.keys() {
            if !cases.contains_key(case) {
                bail!("{}: case `{case}` is not in the index", items_path.display());
            }
        }
        std::fs::create_dir_all(ctx.output_dir().join("images")).context("creating images/")?;
        let out_dir = ctx.output_dir().to_path_buf();
        ctx.progress().start("render", items.len() as u64);
        let progress = ctx.progress();
        let cancel = || ctx.is_cancelled();
        let rendered: Vec<Vec<RenderedItem>> = ctx.pool().install(|| {
            by_case
                .par_iter()
                .map(|(case, its)| {
                    if cancel() {
                        bail!("cancelled");
                    }
                    let ct = base.join(&cases[case].ct);
                    let r = render_case(its, &ct, &out_dir, params).with_context(|| format!("case `{case}`"))?;
                    progress.advance(its.len() as u64);
                    Ok(r)
                })
                .collect::<anyhow::Result<_>>()
        })?;
        progress.finish();
        let mut rendered: Vec<RenderedItem> = rendered.into_iter().flatten().collect();
        // Keep the input order (sorted by case, class, slice).
        let order: BTreeMap<&str, usize> = items.iter().enumerate().map(|(i, it)| (it.id.as_str(), i)).collect();
        rendered.sort_by_key(|r| order.get(r.item.id.as_str()).copied().unwrap_or(usize::MAX));
        jsonl::write(&ctx.output_dir().join("items.jsonl"), &rendered)?;
        tracing::info!(images = rendered.len(), "rendered");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
