//! Stage `lesion_slices`: per case and lesion class, the axial slices with a
//! lesion box that survives the dataset rules, capped by uniform sampling.
//!
//! Inputs: `index` (the `rexgct_index` output) and optional `dataset` (the
//! dataset root as an artifact; without it, case paths resolve against the
//! index's `root`). For each case the CT header gives the geometry (the
//! ReXGroundingCT masks carry an identity affine, so the CT's affine is
//! used for both) and the mask is read once:
//! 1. class mask of a display slice = OR of the finding channels whose
//!    category maps to the class (4D `[F, X, Y, Z]`, `[X, Y, Z, F]` detected by
//!    matching the CT dims, or a 3D single-channel mask);
//! 2. 2D connected components (`connectivity` 4 | 8) -> bounding boxes;
//! 3. boxes with `w * h <= box_min_area` are dropped, then boxes covering more
//!    than `max_box_fraction` of the slice (corrupt full-plane masks);
//! 4. slices without a surviving box are dropped;
//! 5. at most `max_slices` of the kept slices are taken with
//!    `round(linspace(0, n - 1, min(n, max_slices)))` (numpy rounding, half to
//!    even) over the sorted slice indices, per (case, class) with
//!    `cap_scope = "case_class"` or over all (slice, class) pairs of the case
//!    with `cap_scope = "case"`.
//!
//! Slices are display-oriented ([`AxialSlicer`]: anterior up, patient right
//! on image left, index k increasing inferior -> superior); boxes are in
//! display pixel coordinates (x = column, y = row, x1/y1 exclusive).
//!
//! Output: `items.jsonl` ([`SliceItem`] per line, sorted by case, class,
//! slice: the id order for volumes under 1000 slices) and `stats.json`.
//! Cases run in parallel on the stage pool, one mask volume per worker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context as _, bail};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{InputSpec, ParamError, Resources, StageContext, StageKind};

use crate::components::{BBox, BoxRules, ComponentLabeler, Connectivity};
use crate::jsonl;
use crate::nifti::{self, AxialSlicer, ChannelLayout};

/// Which group of candidate slices `max_slices` caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CapScope {
    /// Up to `max_slices` per (case, lesion class).
    CaseClass,
    /// Up to `max_slices` per case over all its (slice, class) items.
    Case,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LesionSlicesParams {
    /// Pixel neighbourhood of connected components: 4 or 8.
    pub connectivity: Connectivity,
    /// Keep boxes with area `w * h` strictly greater than this (paper: 1300 at 512 px).
    // The area of a 4096 x 4096 slice: no CT slice is larger.
    #[schemars(range(max = 16_777_216))]
    pub box_min_area: u64,
    /// Drop boxes covering more than this fraction of the slice (corrupt full-plane masks).
    pub max_box_fraction: f64,
    /// At most this many slices per `cap_scope` group, sampled uniformly.
    // More than any volume has slices (chest CTs: up to ~1000).
    #[schemars(range(min = 1, max = 10_000))]
    pub max_slices: usize,
    /// `case_class` (default) or `case`.
    pub cap_scope: CapScope,
}

impl Default for LesionSlicesParams {
    fn default() -> Self {
        Self {
            connectivity: Connectivity::Eight,
            box_min_area: 1300,
            max_box_fraction: 0.5,
            max_slices: 20,
            cap_scope: CapScope::CaseClass,
        }
    }
}

/// One output record: a (case, class, display slice) with its boxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceItem {
    pub id: String,
    pub case: String,
    pub patient_id: String,
    pub split: String,
    pub class: String,
    /// Display slice index k (inferior -> superior).
    pub slice: usize,
    /// Index along the stored axis that runs S.
    pub stored_slice: usize,
    pub rows: usize,
    pub cols: usize,
    pub boxes: Vec<BBox>,
    /// Voxel spacing along display [row, col, slice] in mm.
    pub spacing_mm: [f64; 3],
}

pub fn item_id(case: &str, class: &str, slice: usize) -> String {
    format!("{case}/{class}/{slice:03}")
}

/// The parts of `index.json` the slice and render stages read.
#[derive(Debug, Clone, Deserialize)]
pub struct IndexFile {
    #[serde(default)]
    pub root: Option<PathBuf>,
    pub classes: Vec<String>,
    #[serde(default)]
    pub class_names: BTreeMap<String, String>,
    pub cases: Vec<IndexCase>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IndexCase {
    pub name: String,
    pub patient_id: String,
    pub split: String,
    pub ct: PathBuf,
    pub mask: PathBuf,
    #[serde(default)]
    pub findings: Vec<IndexFinding>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IndexFinding {
    pub channel: usize,
    /// `None` for findings whose category the class map drops.
    #[serde(default)]
    pub class: Option<String>,
}

/// Read `index.json` and the directory its relative case paths resolve against.
pub fn load_index(ctx: &StageContext) -> anyhow::Result<(IndexFile, PathBuf)> {
    let path = ctx.input("index")?.join("index.json");
    let index: IndexFile = jsonl::read_json(&path).context("reading the case index")?;
    for case in &index.cases {
        if let Some(p) = [&case.ct, &case.mask].into_iter().find(|p| !crate::paths::stays_inside(p)) {
            bail!("{}: case `{}`: `{}` leaves the dataset directory", path.display(), case.name, p.display());
        }
    }
    let base = match (ctx.optional_input("dataset")?, &index.root) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(root)) => root.clone(),
        (None, None) => bail!(
            "{}: `root` is null (the dataset came as an artifact); give this stage the same `dataset` input",
            path.display()
        ),
    };
    Ok((index, base))
}

/// `round(linspace(0, n - 1, min(n, cap)))` with numpy's arithmetic
/// (`i * step`, last = n - 1) and rounding (half to even).
pub fn linspace_indices(n: usize, cap: usize) -> Vec<usize> {
    let m = n.min(cap);
    match m {
        0 => vec![],
        1 => vec![0],
        _ => {
            let step = (n - 1) as f64 / (m - 1) as f64;
            (0..m).map(|i| if i == m - 1 { n - 1 } else { (i as f64 * step).round_ties_even() as usize }).collect()
        }
    }
}

/// Uniformly sample `items` (already sorted) down to `cap`.
pub fn sample<T: Clone>(items: &[T], cap: usize) -> Vec<T> {
    linspace_indices(items.len(), cap).into_iter().map(|i| items[i].clone()).collect()
}

/// How a mask's dims relate to the CT's.
pub fn mask_layout(mask_dims: &[usize], ct: [usize; 3]) -> Option<ChannelLayout> {
    match mask_dims {
        [x, y, z] if [*x, *y, *z] == ct => Some(ChannelLayout::Last { channels: 1 }),
        [f, x, y, z] if [*x, *y, *z] == ct => Some(ChannelLayout::First { channels: *f }),
        [x, y, z, f] if [*x, *y, *z] == ct => Some(ChannelLayout::Last { channels: *f }),
        _ => None,
    }
}

/// Counts of what each rule removed, summed over cases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceStats {
    pub cases: usize,
    pub slices_with_foreground: u64,
    pub boxes_dropped_small: u64,
    pub boxes_dropped_large: u64,
    pub slices_without_surviving_box: u64,
    pub slices_kept_before_cap: u64,
    pub slices_dropped_by_cap: u64,
    pub items_per_class: BTreeMap<String, usize>,
}

impl SliceStats {
    fn add(&mut self, o: &SliceStats) {
        self.cases += o.cases;
        self.slices_with_foreground += o.slices_with_foreground;
        self.boxes_dropped_small += o.boxes_dropped_small;
        self.boxes_dropped_large += o.boxes_dropped_large;
        self.slices_without_surviving_box += o.slices_without_surviving_box;
        self.slices_kept_before_cap += o.slices_kept_before_cap;
        self.slices_dropped_by_cap += o.slices_dropped_by_cap;
        for (k, v) in &o.items_per_class {
            *self.items_per_class.entry(k.clone()).or_default() += v;
        }
    }
}

/// Which stored planes hold foreground, per channel and stored axis, so
/// empty (channel, slice) pairs are skipped without extracting them.
struct Presence {
    /// `[channel][axis]` -> flags per coordinate along that axis.
    planes: Vec<[Vec<bool>; 3]>,
}

impl Presence {
    fn scan(data: &[u16], dims: [usize; 3], layout: ChannelLayout) -> Self {
        let channels = match layout {
            ChannelLayout::First { channels } | ChannelLayout::Last { channels } => channels,
        };
        let mut planes: Vec<[Vec<bool>; 3]> =
            (0..channels).map(|_| [vec![false; dims[0]], vec![false; dims[1]], vec![false; dims[2]]]).collect();
        let nvox = dims[0] * dims[1] * dims[2];
        let mut mark = |f: usize, v: usize| {
            let (x, y, z) = (v % dims[0], (v / dims[0]) % dims[1], v / (dims[0] * dims[1]));
            let p = &mut planes[f];
            p[0][x] = true;
            p[1][y] = true;
            p[2][z] = true;
        };
        match layout {
            ChannelLayout::First { channels } => {
                for (v, chunk) in data.chunks_exact(channels).enumerate() {
                    for (f, &l) in chunk.iter().enumerate() {
                        if l != 0 {
                            mark(f, v);
                        }
                    }
                }
            }
            ChannelLayout::Last { channels } => {
                for f in 0..channels {
                    for (v, &l) in data[f * nvox..(f + 1) * nvox].iter().enumerate() {
                        if l != 0 {
                            mark(f, v);
                        }
                    }
                }
            }
        }
        Self { planes }
    }
}

/// The smallest box holding every non-zero pixel of a row-major mask.
fn foreground_bounds(mask: &[u8], rows: usize, cols: usize) -> Option<BBox> {
    let mut b: Option<BBox> = None;
    for (y, row) in mask.chunks_exact(cols).take(rows).enumerate() {
        let Some(first) = row.iter().position(|&v| v != 0) else { continue };
        let last = row.iter().rposition(|&v| v != 0).unwrap_or(first);
        let r = BBox { x0: first as u32, y0: y as u32, x1: last as u32 + 1, y1: y as u32 + 1 };
        b = Some(b.map_or(r, |b| b.union(&r)));
    }
    b
}

/// The stored axis display slices run along (probed through the slicer).
fn slice_axis(slicer: &AxialSlicer) -> Option<usize> {
    let n = slicer.num_slices();
    if n < 2 {
        return None;
    }
    let (a, b) = (slicer.stored_coords(0, 0, 0), slicer.stored_coords(0, 0, n - 1));
    (0..3).find(|&i| a[i] != b[i])
}

/// Candidate slices of one case: (display slice, class, boxes), before the cap.
fn process_case(
    case: &IndexCase,
    base: &Path,
    params: &LesionSlicesParams,
) -> anyhow::Result<(Vec<SliceItem>, SliceStats)> {
    let ct_path = base.join(&case.ct);
    let mask_path = base.join(&case.mask);
    let header = nifti::read_header(&ct_path)?;
    let ct_dims = [0, 1, 2].map(|i| header.dims.get(i).copied().unwrap_or(1));
    if header.dims.iter().skip(3).any(|&d| d != 1) {
        bail!("{}: CT must be 3D, got dims {:?}", ct_path.display(), header.dims);
    }
    let mask = nifti::read_labels(&mask_path)?;
    let layout = mask_layout(&mask.dims, ct_dims).with_context(|| {
        format!(
            "{}: mask dims {:?} match neither the CT dims {:?} ({}) as [F, X, Y, Z], [X, Y, Z, F] nor [X, Y, Z]",
            mask_path.display(),
            mask.dims,
            ct_dims,
            ct_path.display()
        )
    })?;
    let channels = match layout {
        ChannelLayout::First { channels } | ChannelLayout::Last { channels } => channels,
    };
    let mut class_channels: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for f in &case.findings {
        let Some(class) = f.class.as_deref() else { continue };
        if f.channel >= channels {
            bail!(
                "{}: finding channel {} of class `{class}` but the mask has {channels} channel(s)",
                mask_path.display(),
                f.channel
            );
        }
        class_channels.entry(class).or_default().push(f.channel);
    }
    let slicer = AxialSlicer::new(&header.affine, ct_dims).with_context(|| format!("{}", ct_path.display()))?;
    let presence = Presence::scan(&mask.data, ct_dims, layout);
    let s_axis = slice_axis(&slicer);
    let (rows, cols) = slicer.slice_dims();
    let rules = BoxRules { min_area: params.box_min_area, max_fraction: params.max_box_fraction };
    let mut labeler = ComponentLabeler::new();
    let (mut acc, mut one, mut crop) = (Vec::<u8>::new(), Vec::<u16>::new(), Vec::<u8>::new());
    let mut stats = SliceStats { cases: 1, ..Default::default() };
    let mut kept: Vec<SliceItem> = vec![];
    for (class, chans) in &class_channels {
        for k in 0..slicer.num_slices() {
            let stored = slicer.stored_index(k);
            let active: Vec<usize> =
                chans.iter().copied().filter(|&f| s_axis.is_none_or(|a| presence.planes[f][a][stored])).collect();
            if active.is_empty() {
                continue;
            }
            acc.clear();
            acc.resize(rows * cols, 0);
            for &f in &active {
                slicer.slice_channel(&mask.data, layout, f, k, &mut one);
                for (a, &l) in acc.iter_mut().zip(&one) {
                    *a |= u8::from(l != 0);
                }
            }
            // Lesions are small: label only the rectangle holding foreground.
            let Some(fg) = foreground_bounds(&acc, rows, cols) else { continue };
            let (cw, ch) = (fg.width() as usize, fg.height() as usize);
            crop.clear();
            for y in fg.y0 as usize..fg.y1 as usize {
                crop.extend_from_slice(&acc[y * cols + fg.x0 as usize..][..cw]);
            }
            let mut comps = labeler.components(&crop, ch, cw, params.connectivity)?;
            for c in &mut comps {
                c.bbox =
                    BBox { x0: c.bbox.x0 + fg.x0, y0: c.bbox.y0 + fg.y0, x1: c.bbox.x1 + fg.x0, y1: c.bbox.y1 + fg.y0 };
            }
            stats.slices_with_foreground += 1;
            let f = rules.apply(&comps, rows, cols);
            stats.boxes_dropped_small += f.dropped_small;
            stats.boxes_dropped_large += f.dropped_large;
            if f.kept.is_empty() {
                stats.slices_without_surviving_box += 1;
                continue;
            }
            kept.push(SliceItem {
                id: item_id(&case.name, class, k),
                case: case.name.clone(),
                patient_id: case.patient_id.clone(),
                split: case.split.clone(),
                class: class.to_string(),
                slice: k,
                stored_slice: stored,
                rows,
                cols,
                boxes: f.kept,
                spacing_mm: slicer.spacing_mm(),
            });
        }
    }
    stats.slices_kept_before_cap = kept.len() as u64;
    let sampled = match params.cap_scope {
        CapScope::CaseClass => {
            let mut by_class: BTreeMap<String, Vec<SliceItem>> = BTreeMap::new();
            for it in kept {
                by_class.entry(it.class.clone()).or_default().push(it);
            }
            by_class.values().flat_map(|v| sample(v, params.max_slices)).collect()
        }
        CapScope::Case => {
            kept.sort_by(|a, b| (a.slice, &a.class).cmp(&(b.slice, &b.class)));
            sample(&kept, params.max_slices)
        }
    };
    stats.slices_dropped_by_cap = stats.slices_kept_before_cap - sampled.len() as u64;
    for it in &sampled {
        *stats.items_per_class.entry(it.class.clone()).or_default() += 1;
    }
    Ok((sampled, stats))
}

pub struct LesionSlices;

impl StageKind for LesionSlices {
    type Params = LesionSlicesParams;
    const KIND: &'static str = "lesion_slices";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Axial lesion slices per case and class: connected-component boxes, area/fraction rules, uniform cap";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::one("index", "`rexgct_index` output (index.json)"),
            InputSpec::optional("dataset", "dataset root artifact (when the index has no `root`)"),
        ];
        INPUTS
    }

    fn resources(_: &LesionSlicesParams) -> Resources {
        // One 4D mask per worker; a 512x512x300 mask with a few channels is ~1 GiB as u16.
        Resources { cpu: 0, memory_mb: 2048, ..Default::default() }
    }

    fn validate(p: &LesionSlicesParams) -> Result<(), ParamError> {
        if !(p.max_box_fraction > 0.0 && p.max_box_fraction <= 1.0) {
            return Err(ParamError::new(
                &["max_box_fraction"],
                format!("must be in (0, 1], got {}", p.max_box_fraction),
            ));
        }
        Ok(())
    }

    fn run(params: &LesionSlicesParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let (index, base) = load_index(ctx)?;
        ctx.progress().start("lesion_slices", index.cases.len() as u64);
        let total = Mutex::new(SliceStats::default());
        let progress = ctx.progress();
        let cancelled = || ctx.is_cancelled();
        let per_case: Vec<Vec<SliceItem>> = ctx.pool().install(|| {
            index
                .cases
                .par_iter()
                .map(|case| -> anyhow::Result<Vec<SliceItem>> {
                    if cancelled() {
                        bail!("cancelled");
                    }
                    let (items, stats) =
                        process_case(case, &base, params).with_context(|| format!("case `{}`", case.name))?;
                    if let Ok(mut t) = total.lock() {
                        t.add(&stats);
                    }
                    progress.advance(1);
                    Ok(items)
                })
                .collect::<anyhow::Result<_>>()
        })?;
        progress.finish();
        let mut items: Vec<SliceItem> = per_case.into_iter().flatten().collect();
        items.sort_by(|a, b| (&a.case, &a.class, a.slice).cmp(&(&b.case, &b.class, b.slice)));
        jsonl::write(&ctx.output_dir().join("items.jsonl"), &items)?;
        let stats = total.into_inner().map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
        jsonl::write_json(&ctx.output_dir().join("stats.json"), &stats)?;
        tracing::info!(cases = stats.cases, items = items.len(), "lesion slices");
        Ok(())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod bounds_tests {
    use super::*;

    #[test]
    fn foreground_bounds_cover_all_pixels() {
        let mut m = vec![0u8; 5 * 6];
        assert_eq!(foreground_bounds(&m, 5, 6), None);
        m[6 + 4] = 1; // row 1, col 4
        m[3 * 6 + 1] = 1; // row 3, col 1
        assert_eq!(foreground_bounds(&m, 5, 6), Some(BBox { x0: 1, y0: 1, x1: 5, y1: 4 }));
    }
}
