//! Stage `phantom`: a synthetic, ReXGroundingCT-shaped corpus so the whole
//! pipeline runs offline and in CI.
//!
//! Output (the stage's whole output directory is the dataset root):
//! - `dataset.json` — `{"train": [...], "val": [...], "test": []}`, entries
//!   named like the real ones (`train_12_a_1.nii.gz`, `valid_7_a_1.nii.gz`;
//!   some patients have several scans: `_a_1`, `_a_2`, `_b_1`), with
//!   `findings`, `categories`, `entity_counts` and `pixels` per finding.
//! - `images/<name>` — int16 CT in HU stored with `scl_slope = 1` and
//!   `scl_inter` ∈ {0, −1024}, LPS affine (x → patient left, y → posterior,
//!   z → superior), so display slices equal stored slices.
//! - `segmentations/<name>` — uint8 4D `(F, X, Y, Z)` instance-labelled masks
//!   (one channel per finding, 0 = background, k = lesion k), identity affine
//!   like the real masks.
//! - `phantom.json` — the ground truth planted per case: per finding its
//!   class, category and per lesion the stored z range, the 3D bounding box
//!   and the largest per-slice box area (stored voxel coordinates, which are
//!   also display coordinates because of the LPS layout).
//!
//! Anatomy: air outside an elliptic body (soft tissue, fat rim), two lungs
//! (about −850 HU) that taper towards the apex and base, a vertebra, and on
//! `padding_fraction` of the cases out-of-field padding at −8192 HU outside
//! the circular reconstruction field.
//!
//! Lesions, one visually distinct appearance per class:
//! - nodule_mass (2d): round solid blob, ~+50 HU, sharp edge;
//! - ground_glass_opacity (2c): hazy lobulated patch, ~−550 HU, soft edge;
//! - consolidation_atelectasis (2b): dense homogeneous wedge (~+35 HU) based
//!   on the pleura;
//! - effusion_thickening (2e): dependent fluid (~+15 HU) filling the
//!   posterior lung with a flat meniscus;
//! - emphysema (1c): clustered black holes (−1000 HU) with thin bright walls;
//! - fibrosis (1d, 2a, 2f): reticular grid of lines (~−150 HU);
//! - airway (1a, 1b): thick-walled tubes along z, black lumen, bright wall.
//!
//! Besides, some cases get a micronodule finding (1e, dropped by the default
//! class map) and `corrupt_planes` cases get an extra finding whose mask
//! fills one whole axial plane (like the real `train_1378_a_2`).
//!
//! Sizes: lesion boxes are planted relative to `box_min_area_hint` (by
//! default `round(1300 · (size/512)²)`, the paper's 1300 px rule scaled to
//! the in-plane size): "large" lesions have a central-slice box of 2–8× the
//! hint, "small" ones 0.15–0.6× (always below it); every ellipsoidal lesion
//! also tapers in z, so its end slices fall below the hint too.
//!
//! Deterministic: every case draws from its own RNG stream (seed, case
//! name) and textures use a position hash, so the bytes do not depend on
//! thread count or scheduling; gzip level is fixed and headers carry no
//! timestamps.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stage_api::derive_seed;
use stage_api::{ParamError, Resources, StageContext, StageKind};

use crate::nifti::{self, WriteOptions};
use crate::rexgct::CLASSES;

/// Size presets; explicit `cases`/`slices`/`size` override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Fast on 2 CPU cores: 160 px in-plane, 32 slices, 40 cases.
    Mini,
    /// Real size: 512 px in-plane, 300 slices, 8 cases.
    Bench,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PhantomParams {
    /// Size preset (`mini` | `bench`) giving the defaults below.
    pub preset: Preset,
    /// Number of CT volumes (default from the preset: mini 40, bench 8).
    pub cases: Option<usize>,
    /// Axial slices per volume (mini 32, bench 300).
    pub slices: Option<usize>,
    /// In-plane size in pixels, square (mini 160, bench 512).
    pub size: Option<usize>,
    /// Fraction of patients put in the `val` partition (named `valid_*`).
    pub val_fraction: f64,
    /// The box-area threshold (px) the lesion sizes are planted around;
    /// default `round(1300 · (size/512)²)`.
    pub box_min_area_hint: Option<u64>,
    /// Fraction of lesions planted below `box_min_area_hint`.
    pub small_fraction: f64,
    /// Fraction of cases with out-of-field padding at −8192 HU.
    pub padding_fraction: f64,
    /// Number of cases with one corrupt finding channel filling a whole axial plane.
    pub corrupt_planes: usize,
    /// Most findings (mask channels) per case, micronodule finding excluded.
    pub max_findings: usize,
    /// Probability that a case also gets a micronodule (1e) finding.
    pub micronodule_fraction: f64,
    /// gzip level of the written `.nii.gz` files.
    pub gz_level: u32,
}

impl Default for PhantomParams {
    fn default() -> Self {
        Self {
            preset: Preset::Bench,
            cases: None,
            slices: None,
            size: None,
            val_fraction: 0.1,
            box_min_area_hint: None,
            small_fraction: 0.25,
            padding_fraction: 0.25,
            corrupt_planes: 1,
            max_findings: 3,
            micronodule_fraction: 0.2,
            gz_level: 1,
        }
    }
}

/// Params with the preset applied.
#[derive(Debug, Clone, Copy)]
struct Config {
    cases: usize,
    slices: usize,
    size: usize,
    hint: f64,
}

impl PhantomParams {
    fn config(&self) -> Config {
        let (cases, slices, size) = match self.preset {
            Preset::Mini => (40, 32, 160),
            Preset::Bench => (8, 300, 512),
        };
        let size = self.size.unwrap_or(size);
        let hint = self
            .box_min_area_hint
            .map(|h| h as f64)
            .unwrap_or_else(|| (1300.0 * (size as f64 / 512.0).powi(2)).round());
        Config { cases: self.cases.unwrap_or(cases), slices: self.slices.unwrap_or(slices), size, hint }
    }
}

pub struct Phantom;

impl StageKind for Phantom {
    type Params = PhantomParams;
    const KIND: &'static str = "phantom";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Synthetic ReXGroundingCT-shaped corpus: NIfTI CTs, 4D lesion masks, dataset.json";

    fn resources(params: &Self::Params) -> Resources {
        let c = params.config();
        let per_case = c.size * c.size * c.slices * (2 + params.max_findings + 2);
        Resources { cpu: 0, memory_mb: (2 * per_case / (1 << 20)) as u64 + 64, ..Resources::default() }
    }

    fn validate(params: &Self::Params) -> Result<(), ParamError> {
        let c = params.config();
        if c.cases == 0 {
            return Err(ParamError::new(&["cases"], "must be at least 1"));
        }
        if !(8..=2048).contains(&c.slices) {
            return Err(ParamError::new(&["slices"], format!("{}: expected 8..=2048", c.slices)));
        }
        if !(64..=2048).contains(&c.size) {
            return Err(ParamError::new(&["size"], format!("{}: expected 64..=2048 pixels", c.size)));
        }
        let area = (c.size * c.size) as f64;
        if c.hint < 4.0 || c.hint * 8.0 > area * 0.08 {
            return Err(ParamError::new(
                &["box_min_area_hint"],
                format!(
                    "{}: expected 4 ..= {} px for a {}-px slice (lesions must fit in a lung)",
                    c.hint,
                    area * 0.01,
                    c.size
                ),
            ));
        }
        for (key, v) in [
            ("val_fraction", params.val_fraction),
            ("small_fraction", params.small_fraction),
            ("padding_fraction", params.padding_fraction),
            ("micronodule_fraction", params.micronodule_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ParamError::new(&[key], format!("{v}: expected a fraction in 0..=1")));
            }
        }
        if !(1..=7).contains(&params.max_findings) {
            return Err(ParamError::new(&["max_findings"], "expected 1..=7"));
        }
        if params.gz_level > 9 {
            return Err(ParamError::new(&["gz_level"], "expected 0..=9"));
        }
        if params.corrupt_planes > c.cases {
            return Err(ParamError::new(&["corrupt_planes"], format!("more than the {} cases", c.cases)));
        }
        Ok(())
    }

    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let cfg = params.config();
        // The stage's `seed` key (or the recipe seed) reaches us as ctx.seed().
        let seed = ctx.seed();
        let plans = plan_corpus(params, &cfg, seed);
        let root = ctx.output_dir().to_path_buf();
        for dir in ["images", "segmentations"] {
            std::fs::create_dir_all(root.join(dir))
                .with_context(|| format!("creating {}", root.join(dir).display()))?;
        }
        ctx.progress().start("phantom", plans.len() as u64);
        let options = WriteOptions { gz_level: params.gz_level, ..WriteOptions::default() };
        let ctx_ref = &*ctx;
        let truths: Vec<Value> = ctx_ref.pool().install(|| {
            plans
                .par_iter()
                .map(|plan| {
                    ctx_ref.check_cancelled()?;
                    let truth = generate_case(plan, &cfg, &root, options)
                        .with_context(|| format!("generating phantom case {}", plan.name))?;
                    ctx_ref.progress().advance(1);
                    Ok(truth)
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        ctx.progress().finish();

        let mut dataset: BTreeMap<&str, Vec<Value>> =
            BTreeMap::from([("train", Vec::new()), ("val", Vec::new()), ("test", Vec::new())]);
        for (plan, truth) in plans.iter().zip(&truths) {
            dataset.entry(plan.split).or_default().push(dataset_entry(truth));
        }
        write_json(&root.join("dataset.json"), &json!(dataset))?;
        write_json(
            &root.join("phantom.json"),
            &json!({
                "seed": seed,
                "size": cfg.size,
                "slices": cfg.slices,
                "box_min_area_hint": cfg.hint,
                "cases": truths,
            }),
        )?;
        tracing::info!(cases = plans.len(), root = %root.display(), "phantom corpus written");
        Ok(())
    }
}

fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// What a finding looks like; the seven classes plus the dropped micronodules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Airway,
    Emphysema,
    Fibrosis,
    Nodule,
    Consolidation,
    Ggo,
    Effusion,
    Micronodules,
}

impl Kind {
    const CLASSES: [Kind; 7] =
        [Kind::Airway, Kind::Emphysema, Kind::Fibrosis, Kind::Nodule, Kind::Consolidation, Kind::Ggo, Kind::Effusion];

    fn class(self) -> Option<&'static str> {
        Self::CLASSES.iter().position(|&k| k == self).map(|i| CLASSES[i])
    }

    /// Category codes of ReXGroundingCT this kind is drawn as.
    fn categories(self) -> &'static [&'static str] {
        match self {
            Kind::Airway => &["1a", "1b"],
            Kind::Emphysema => &["1c"],
            Kind::Fibrosis => &["1d", "2a", "2f"],
            Kind::Nodule => &["2d"],
            Kind::Consolidation => &["2b"],
            Kind::Ggo => &["2c"],
            Kind::Effusion => &["2e"],
            Kind::Micronodules => &["1e"],
        }
    }

    fn sentence(self, category: &str, side: &str, lobe: &str) -> String {
        match (self, category) {
            (Kind::Airway, "1a") => format!("Bronchial wall thickening in the {side} {lobe} lobe."),
            (Kind::Airway, _) => format!("Cylindrical bronchiectasis in the {side} {lobe} lobe."),
            (Kind::Emphysema, _) => format!("Centrilobular emphysema in the {side} {lobe} lobe."),
            (Kind::Fibrosis, "1d") => format!("Interlobular septal thickening in the {side} {lobe} lobe."),
            (Kind::Fibrosis, "2f") => format!("Honeycombing in the {side} {lobe} lobe."),
            (Kind::Fibrosis, _) => format!("Linear fibrotic changes in the {side} {lobe} lobe."),
            (Kind::Nodule, _) => format!("A solid pulmonary nodule in the {side} {lobe} lobe."),
            (Kind::Consolidation, _) => format!("Consolidation and atelectasis in the {side} {lobe} lobe."),
            (Kind::Ggo, _) => format!("Ground-glass opacity in the {side} {lobe} lobe."),
            (Kind::Effusion, _) => format!("Pleural effusion on the {side} side."),
            (Kind::Micronodules, _) => format!("Scattered micronodules in the {side} {lobe} lobe."),
        }
    }
}

/// One planted lesion (instance) of a finding.
#[derive(Debug, Clone)]
struct LesionPlan {
    lung: usize,
    /// Centre in voxels (x, y, z).
    centre: [f64; 3],
    /// In-plane radius at the central slice (px).
    radius: f64,
    /// Half extent along z (slices).
    half_z: f64,
    /// Orientation/phase of the texture or wedge (radians).
    angle: f64,
    small: bool,
}

#[derive(Debug, Clone)]
struct FindingPlan {
    kind: Kind,
    category: &'static str,
    sentence: String,
    lesions: Vec<LesionPlan>,
    /// A corrupt channel filling this whole stored axial plane.
    full_plane: Option<usize>,
}

#[derive(Debug, Clone)]
struct CasePlan {
    name: String,
    patient_id: String,
    split: &'static str,
    seed: u64,
    scl_inter: f32,
    padded: bool,
    findings: Vec<FindingPlan>,
}

/// Geometry shared by planning and painting.
#[derive(Debug, Clone, Copy)]
struct Lung {
    cx: f64,
    cy: f64,
    ax: f64,
    ay: f64,
}

fn lungs(size: usize) -> [Lung; 2] {
    let n = size as f64;
    // x grows towards the patient's left: lung 0 is the right lung.
    [
        Lung { cx: 0.33 * n, cy: 0.50 * n, ax: 0.14 * n, ay: 0.24 * n },
        Lung { cx: 0.67 * n, cy: 0.50 * n, ax: 0.13 * n, ay: 0.23 * n },
    ]
}

/// In-plane scale of the lungs at stored slice z (0 outside the lungs' z range).
fn lung_scale(z: f64, slices: usize) -> f64 {
    let t = (z + 0.5) / slices as f64;
    let u = (t - 0.5) / 0.46;
    if u.abs() >= 1.0 { 0.0 } else { 0.35 + 0.65 * (1.0 - u * u).sqrt() }
}

/// Normalised elliptic radius of (x, y) in a lung at slice z (< 1 inside).
fn lung_rho(lung: &Lung, x: f64, y: f64, scale: f64) -> f64 {
    if scale <= 0.0 {
        return f64::INFINITY;
    }
    let dx = (x - lung.cx) / (lung.ax * scale);
    let dy = (y - lung.cy) / (lung.ay * scale);
    (dx * dx + dy * dy).sqrt()
}

fn plan_corpus(params: &PhantomParams, cfg: &Config, seed: u64) -> Vec<CasePlan> {
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, "phantom/plan"));
    // Patients with 1–3 scans until the case count is reached.
    let mut scans: Vec<(bool, usize, String)> = Vec::new(); // (val, patient number, scan suffix)
    let mut used = std::collections::BTreeSet::new();
    while scans.len() < cfg.cases {
        let val = rng.random::<f64>() < params.val_fraction;
        let number = loop {
            let n = rng.random_range(1..10 * cfg.cases.max(10) + 1);
            if used.insert((val, n)) {
                break n;
            }
        };
        let roll: f64 = rng.random();
        let suffixes: &[&str] = if roll < 0.6 {
            &["a_1"]
        } else if roll < 0.85 {
            &["a_1", "a_2"]
        } else {
            &["a_1", "a_2", "b_1"]
        };
        for s in suffixes {
            if scans.len() < cfg.cases {
                scans.push((val, number, s.to_string()));
            }
        }
    }
    // Spread the corrupt-plane cases over the train cases.
    let train_idx: Vec<usize> = (0..scans.len()).filter(|&i| !scans[i].0).collect();
    let k = params.corrupt_planes.min(train_idx.len());
    let corrupt: Vec<usize> = (0..k).map(|j| train_idx[((2 * j + 1) * train_idx.len()) / (2 * k)]).collect();

    let mut class_cycle: Vec<Kind> = Vec::new();
    let mut plans = Vec::with_capacity(scans.len());
    for (i, (val, number, suffix)) in scans.into_iter().enumerate() {
        let prefix = if val { "valid" } else { "train" };
        let name = format!("{prefix}_{number}_{suffix}");
        let mut crng = ChaCha8Rng::seed_from_u64(derive_seed(seed, &format!("phantom/case/{name}")));
        let n_findings = crng.random_range(1..=params.max_findings);
        let mut findings = Vec::new();
        let mut kinds_here: Vec<Kind> = Vec::new();
        let mut placed = Vec::new();
        while findings.len() < n_findings {
            // Balanced classes: deal from a shuffled deck of all seven.
            if class_cycle.is_empty() {
                class_cycle = Kind::CLASSES.to_vec();
                for j in (1..class_cycle.len()).rev() {
                    let k = rng.random_range(0..=j);
                    class_cycle.swap(j, k);
                }
            }
            let kind = class_cycle.pop().unwrap_or(Kind::Nodule);
            if kinds_here.contains(&kind) {
                class_cycle.insert(0, kind);
                if kinds_here.len() >= 7 || class_cycle.iter().all(|k| kinds_here.contains(k)) {
                    break;
                }
                continue;
            }
            kinds_here.push(kind);
            findings.push(plan_finding(kind, cfg, params, &mut crng, &mut placed));
        }
        if crng.random::<f64>() < params.micronodule_fraction {
            findings.push(plan_finding(Kind::Micronodules, cfg, params, &mut crng, &mut placed));
        }
        if corrupt.contains(&i) {
            let z = cfg.slices / 2 + crng.random_range(0..cfg.slices / 4);
            findings.push(FindingPlan {
                kind: Kind::Consolidation,
                category: "2b",
                sentence: "Atelectasis in the right lower lobe.".into(),
                lesions: Vec::new(),
                full_plane: Some(z.min(cfg.slices - 1)),
            });
        }
        plans.push(CasePlan {
            patient_id: format!("{prefix}_{number}"),
            split: if val { "val" } else { "train" },
            seed: derive_seed(seed, &format!("phantom/texture/{name}")),
            scl_inter: if crng.random::<bool>() { -1024.0 } else { 0.0 },
            padded: crng.random::<f64>() < params.padding_fraction,
            name,
            findings,
        });
    }
    plans
}

/// Lesions planted along the pleura over a whole lung region.
fn is_pleural(kind: Kind) -> bool {
    matches!(kind, Kind::Consolidation | Kind::Effusion)
}

/// Whether two disc-like lesions would touch.
fn overlaps(a: &LesionPlan, b: &LesionPlan) -> bool {
    let d = ((a.centre[0] - b.centre[0]).powi(2) + (a.centre[1] - b.centre[1]).powi(2)).sqrt();
    a.lung == b.lung && d < a.radius + b.radius + 3.0 && (a.centre[2] - b.centre[2]).abs() < a.half_z + b.half_z + 1.0
}

/// Plan one finding; `placed` holds the case's lesions so far, so that new
/// ones do not overlap them (painting also never overwrites an earlier lesion).
fn plan_finding(
    kind: Kind,
    cfg: &Config,
    params: &PhantomParams,
    rng: &mut ChaCha8Rng,
    placed: &mut Vec<(Kind, LesionPlan)>,
) -> FindingPlan {
    let cats = kind.categories();
    let category = cats[rng.random_range(0..cats.len())];
    let z_len = cfg.slices as f64;
    let n_lesions = match kind {
        Kind::Effusion => 1,
        Kind::Micronodules => 3,
        _ => rng.random_range(1..=2usize),
    };
    let mut lung = rng.random_range(0..2usize);
    if is_pleural(kind) && placed.iter().any(|(k, l)| is_pleural(*k) && l.lung == lung) {
        lung = 1 - lung;
    }
    let mut lesions = Vec::new();
    for _ in 0..n_lesions {
        let mut candidate = None;
        for attempt in 0..40 {
            let lung = if attempt < 20 { lung } else { 1 - lung };
            let small = kind != Kind::Micronodules && rng.random::<f64>() < params.small_fraction;
            let area = if kind == Kind::Micronodules {
                cfg.hint * 0.08
            } else if small {
                cfg.hint * rng.random_range(0.15..0.6)
            } else {
                cfg.hint * rng.random_range(2.0..8.0)
            };
            // Box side ≈ 2·radius + 1 for a disc.
            let radius = ((area.sqrt() - 1.0) / 2.0).max(1.0);
            let cz = rng.random_range(0.25..0.75) * z_len;
            let half_z = match kind {
                Kind::Airway | Kind::Effusion => rng.random_range(0.15..0.3) * z_len,
                _ => (radius * rng.random_range(0.4..0.8)).clamp(2.0, z_len / 6.0),
            };
            let l = lungs(cfg.size)[lung];
            let scale = lung_scale(cz, cfg.slices);
            // Keep the lesion's centre well inside the lung.
            let theta: f64 = rng.random_range(0.0..std::f64::consts::TAU);
            let rho = rng.random_range(0.0..0.45);
            let cx = l.cx + rho * theta.cos() * l.ax * scale;
            let cy = l.cy + rho * theta.sin() * l.ay * scale;
            let angle = rng.random_range(0.0..std::f64::consts::TAU);
            let plan = LesionPlan { lung, centre: [cx, cy, cz], radius, half_z, angle, small };
            let clash = !is_pleural(kind) && placed.iter().any(|(k, other)| !is_pleural(*k) && overlaps(&plan, other));
            if !clash {
                candidate = Some(plan);
                break;
            }
        }
        // No free spot (a crowded case): plant fewer lesions.
        if let Some(plan) = candidate {
            placed.push((kind, plan.clone()));
            lesions.push(plan);
        }
    }
    let cz = lesions.first().map(|l| l.centre[2]).unwrap_or(0.0);
    let lung = lesions.first().map(|l| l.lung).unwrap_or(lung);
    let side = if lung == 0 { "right" } else { "left" };
    let lobe = if cz > 0.6 * z_len {
        "upper"
    } else if lung == 0 && cz > 0.45 * z_len {
        "middle"
    } else {
        "lower"
    };
    FindingPlan { kind, category, sentence: kind.sentence(category, side, lobe), lesions, full_plane: None }
}

/// Deterministic position hash → u64 (splitmix64 finaliser).
#[inline]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Triangular noise in [-1, 1] for a voxel index.
#[inline]
fn noise(seed: u64, idx: u64) -> f64 {
    let h = mix(seed ^ idx.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    ((h & 0xffff) + ((h >> 16) & 0xffff)) as f64 / 65535.0 - 1.0
}

/// Uniform [0, 1) hash of integer cell coordinates.
#[inline]
fn cell_hash(seed: u64, a: i64, b: i64, c: i64) -> f64 {
    let h = mix(seed ^ mix((a as u64) ^ mix((b as u64) ^ mix(c as u64))));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Ground truth of one painted lesion.
#[derive(Debug, Clone, Default)]
struct LesionTruth {
    voxels: u64,
    lo: [usize; 3],
    hi: [usize; 3],
    /// Per stored z: in-plane box (x0, y0, x1, y1) inclusive.
    per_z: BTreeMap<usize, [usize; 4]>,
}

impl LesionTruth {
    fn add(&mut self, x: usize, y: usize, z: usize) {
        if self.voxels == 0 {
            self.lo = [x, y, z];
            self.hi = [x, y, z];
        }
        self.voxels += 1;
        for (i, v) in [x, y, z].into_iter().enumerate() {
            self.lo[i] = self.lo[i].min(v);
            self.hi[i] = self.hi[i].max(v);
        }
        let b = self.per_z.entry(z).or_insert([x, y, x, y]);
        b[0] = b[0].min(x);
        b[1] = b[1].min(y);
        b[2] = b[2].max(x);
        b[3] = b[3].max(y);
    }

    fn to_json(&self, instance: usize, small: bool) -> Value {
        let max_area = self.per_z.values().map(|b| (b[2] - b[0] + 1) * (b[3] - b[1] + 1)).max().unwrap_or(0);
        json!({
            "instance": instance,
            "planted_small": small,
            "voxels": self.voxels,
            "z_range": [self.lo[2], self.hi[2] + 1],
            "bbox": {"x0": self.lo[0], "y0": self.lo[1], "x1": self.hi[0] + 1, "y1": self.hi[1] + 1},
            "max_slice_box_area": max_area,
        })
    }
}

struct Grid {
    nx: usize,
    ny: usize,
    nz: usize,
}

impl Grid {
    #[inline]
    fn idx(&self, x: usize, y: usize, z: usize) -> usize {
        x + self.nx * (y + self.ny * z)
    }
}

/// HU of healthy lung parenchyma.
const LUNG_HU: f64 = -850.0;

fn paint_anatomy(hu: &mut [i16], g: &Grid, cfg: &Config, seed: u64) {
    let n = cfg.size as f64;
    let l = lungs(cfg.size);
    let (bcx, bcy, bax, bay) = (0.5 * n, 0.52 * n, 0.44 * n, 0.33 * n);
    let (vx, vy, vr) = (0.5 * n, 0.76 * n, 0.05 * n);
    hu.par_chunks_mut(g.nx * g.ny).enumerate().for_each(|(z, plane)| {
        let scale = lung_scale(z as f64, g.nz);
        for y in 0..g.ny {
            let fy = y as f64 + 0.5;
            for x in 0..g.nx {
                let fx = x as f64 + 0.5;
                let idx = (x + g.nx * (y + g.ny * z)) as u64;
                let body = ((fx - bcx) / bax).powi(2) + ((fy - bcy) / bay).powi(2);
                let v = if body > 1.0 {
                    -1000.0 + 8.0 * noise(seed, idx)
                } else if l.iter().any(|lung| lung_rho(lung, fx, fy, scale) < 1.0) {
                    LUNG_HU + 25.0 * noise(seed, idx)
                } else if ((fx - vx).powi(2) + (fy - vy).powi(2)).sqrt() < vr {
                    let r = ((fx - vx).powi(2) + (fy - vy).powi(2)).sqrt() / vr;
                    (if r > 0.75 { 700.0 } else { 250.0 }) + 30.0 * noise(seed, idx)
                } else if body > 0.85 {
                    -100.0 + 15.0 * noise(seed, idx)
                } else {
                    40.0 + 15.0 * noise(seed, idx)
                };
                plane[x + g.nx * y] = v.round() as i16;
            }
        }
    });
}

/// Paint one lesion into the CT and its mask channel; returns its truth.
#[allow(clippy::too_many_arguments)]
fn paint_lesion(
    kind: Kind,
    lesion: &LesionPlan,
    instance: u8,
    channel: usize,
    channels: usize,
    hu: &mut [i16],
    mask: &mut [u8],
    g: &Grid,
    cfg: &Config,
    seed: u64,
) -> LesionTruth {
    let lung = lungs(cfg.size)[lesion.lung];
    let [cx, cy, cz] = lesion.centre;
    let r = lesion.radius;
    let mut truth = LesionTruth::default();
    let z0 = (cz - lesion.half_z).floor().max(0.0) as usize;
    let z1 = ((cz + lesion.half_z).ceil() as usize).min(g.nz - 1);
    let tex_seed = mix(seed ^ ((channel as u64) << 8) ^ instance as u64);
    for z in z0..=z1 {
        let dz = (z as f64 + 0.5 - cz) / lesion.half_z;
        let taper = if dz.abs() >= 1.0 { continue } else { (1.0 - dz * dz).sqrt() };
        let scale = lung_scale(z as f64, g.nz);
        if scale <= 0.0 {
            continue;
        }
        // Region of interest in-plane: the lesion disc, or the whole lung for
        // the pleura-based kinds.
        let (x0, x1, y0, y1) = match kind {
            Kind::Consolidation | Kind::Effusion => (
                lung.cx - lung.ax * scale - 1.0,
                lung.cx + lung.ax * scale + 1.0,
                lung.cy - lung.ay * scale - 1.0,
                lung.cy + lung.ay * scale + 1.0,
            ),
            _ => (cx - r - 2.0, cx + r + 2.0, cy - r - 2.0, cy + r + 2.0),
        };
        let clampx = |v: f64| (v.max(0.0) as usize).min(g.nx - 1);
        let clampy = |v: f64| (v.max(0.0) as usize).min(g.ny - 1);
        // Effusion: fluid level (flat meniscus) so that the cap area ≈ π r².
        let level = if kind == Kind::Effusion {
            effusion_level(&lung, scale, std::f64::consts::PI * r * r * taper.max(0.5))
        } else {
            0.0
        };
        for y in clampy(y0)..=clampy(y1) {
            let fy = y as f64 + 0.5;
            for x in clampx(x0)..=clampx(x1) {
                let fx = x as f64 + 0.5;
                let rho_l = lung_rho(&lung, fx, fy, scale);
                if rho_l >= 1.0 {
                    continue;
                }
                let (dx, dy) = (fx - cx, fy - cy);
                let d = (dx * dx + dy * dy).sqrt();
                let rz = r * taper;
                let idx = g.idx(x, y, z);
                let nz = noise(tex_seed, idx as u64);
                let value: Option<f64> = match kind {
                    Kind::Nodule | Kind::Micronodules => (d <= rz).then_some(50.0 + 12.0 * nz),
                    Kind::Ggo => {
                        let theta = dy.atan2(dx);
                        let lobulated = rz * (1.0 + 0.18 * (3.0 * theta + lesion.angle).sin());
                        (d <= lobulated).then(|| {
                            let w = (1.0 - (d / lobulated).powi(2)).sqrt().min(1.0);
                            LUNG_HU + (300.0 + 40.0 * nz) * (0.55 + 0.45 * w)
                        })
                    }
                    Kind::Consolidation => {
                        // Pleura-based wedge: outer half of the lung within an
                        // angular sector whose width gives the target area.
                        let (lx, ly) = ((fx - lung.cx) / lung.ax, (fy - lung.cy) / lung.ay);
                        let theta = ly.atan2(lx);
                        let area_ring = 0.75 * lung.ax * lung.ay * scale * scale;
                        // sector area = half_angle · area_ring
                        let half_angle = (std::f64::consts::PI * r * r * taper / area_ring).min(1.2);
                        let dtheta = (theta - lesion.angle + std::f64::consts::PI).rem_euclid(std::f64::consts::TAU)
                            - std::f64::consts::PI;
                        (rho_l >= 0.5 && dtheta.abs() <= half_angle).then_some(35.0 + 8.0 * nz)
                    }
                    Kind::Effusion => (fy >= level).then_some(15.0 + 5.0 * nz),
                    Kind::Emphysema => (d <= rz).then(|| {
                        let cell = (r / 3.0).max(2.5);
                        let (ix, iy, iz) = ((fx / cell).floor(), (fy / cell).floor(), (z as f64 / cell).floor());
                        let h = cell_hash(tex_seed, ix as i64, iy as i64, iz as i64);
                        let (hx, hy) = (
                            (ix + 0.3 + 0.4 * cell_hash(tex_seed ^ 1, ix as i64, iy as i64, iz as i64)) * cell,
                            (iy + 0.3 + 0.4 * cell_hash(tex_seed ^ 2, ix as i64, iy as i64, iz as i64)) * cell,
                        );
                        let hd = ((fx - hx).powi(2) + (fy - hy).powi(2)).sqrt() / cell;
                        if h < 0.75 && hd < 0.32 {
                            -1000.0
                        } else if h < 0.75 && hd < 0.45 {
                            -450.0 + 30.0 * nz
                        } else {
                            -880.0 + 20.0 * nz
                        }
                    }),
                    Kind::Fibrosis => {
                        let theta = dy.atan2(dx);
                        let edge = rz * (1.0 + 0.12 * (2.0 * theta + lesion.angle).sin());
                        (d <= edge).then(|| {
                            let period = (r / 3.5).max(3.0);
                            let (c, s) = (lesion.angle.cos(), lesion.angle.sin());
                            let u = (fx * c + fy * s).rem_euclid(period);
                            let v = (-fx * s + fy * c).rem_euclid(period);
                            if u < 1.2 || v < 1.2 { -150.0 + 30.0 * nz } else { -780.0 + 25.0 * nz }
                        })
                    }
                    Kind::Airway => {
                        // Tube along z drifting slowly in-plane.
                        let drift = (z as f64 - cz) * 0.15;
                        let (tx, ty) = (cx + drift * lesion.angle.cos(), cy + drift * lesion.angle.sin());
                        let dd = ((fx - tx).powi(2) + (fy - ty).powi(2)).sqrt();
                        (dd <= r).then(|| if dd < 0.5 * r { -1000.0 + 5.0 * nz } else { 60.0 + 15.0 * nz })
                    }
                };
                if let Some(v) = value {
                    // Never paint over an earlier lesion: masks must match what is visible.
                    if mask[idx * channels..(idx + 1) * channels].iter().any(|&m| m != 0) {
                        continue;
                    }
                    hu[idx] = v.round() as i16;
                    mask[idx * channels + channel] = instance;
                    truth.add(x, y, z);
                }
            }
        }
    }
    truth
}

/// The y of a flat fluid level in a lung at `scale` so that the dependent
/// (posterior, larger y) cap has about `area` px.
fn effusion_level(lung: &Lung, scale: f64, area: f64) -> f64 {
    let (a, b) = (lung.ax * scale, lung.ay * scale);
    let full = std::f64::consts::PI * a * b;
    let target = area.min(0.45 * full);
    // Cap of depth h (0..2b) below the level: a·b·(acos(1−u) − (1−u)√(2u−u²)), u = h/b.
    let cap = |u: f64| a * b * ((1.0 - u).acos() - (1.0 - u) * (2.0 * u - u * u).max(0.0).sqrt());
    let (mut lo, mut hi) = (0.0f64, 2.0f64);
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if cap(mid) < target { lo = mid } else { hi = mid }
    }
    lung.cy + b - lo * b
}

fn generate_case(plan: &CasePlan, cfg: &Config, root: &Path, options: WriteOptions) -> anyhow::Result<Value> {
    let g = Grid { nx: cfg.size, ny: cfg.size, nz: cfg.slices };
    let nvox = g.nx * g.ny * g.nz;
    let channels = plan.findings.len();
    let mut hu = vec![0i16; nvox];
    paint_anatomy(&mut hu, &g, cfg, plan.seed);
    let mut mask = vec![0u8; nvox * channels];
    // Lesions first, then the corrupt full planes (which may cover lesions).
    let mut painted: Vec<(Vec<Value>, u64)> = Vec::with_capacity(channels);
    for (ch, finding) in plan.findings.iter().enumerate() {
        let mut lesions = Vec::new();
        let mut voxels = 0u64;
        for (i, lesion) in finding.lesions.iter().enumerate() {
            let t =
                paint_lesion(finding.kind, lesion, (i + 1) as u8, ch, channels, &mut hu, &mut mask, &g, cfg, plan.seed);
            voxels += t.voxels;
            lesions.push(t.to_json(i + 1, lesion.small));
        }
        painted.push((lesions, voxels));
    }
    let mut findings_truth = Vec::new();
    for (ch, (finding, (lesions, mut voxels))) in plan.findings.iter().zip(painted).enumerate() {
        if let Some(z) = finding.full_plane {
            for y in 0..g.ny {
                for x in 0..g.nx {
                    let m = &mut mask[g.idx(x, y, z) * channels + ch];
                    voxels += (*m == 0) as u64;
                    *m = 1;
                }
            }
        }
        findings_truth.push(json!({
            "channel": ch,
            "category": finding.category,
            "class": finding.kind.class(),
            "sentence": finding.sentence,
            "voxels": voxels,
            "entities": if finding.full_plane.is_some() { 1 } else { finding.lesions.len() },
            "corrupt_full_plane": finding.full_plane,
            "lesions": lesions,
        }));
    }
    if plan.padded {
        // Out-of-field padding outside the circular reconstruction field.
        let (c, rad) = (cfg.size as f64 / 2.0, cfg.size as f64 * 0.49);
        hu.par_chunks_mut(g.nx * g.ny).for_each(|plane| {
            for y in 0..g.ny {
                for x in 0..g.nx {
                    if ((x as f64 + 0.5 - c).powi(2) + (y as f64 + 0.5 - c).powi(2)).sqrt() > rad {
                        plane[x + g.nx * y] = -8192;
                    }
                }
            }
        });
    }
    let inter = plan.scl_inter as i32;
    let mut raw = hu;
    for v in raw.iter_mut() {
        let stored = *v as i32 - inter;
        if stored > i16::MAX as i32 {
            bail!("HU {} does not fit int16 with scl_inter {inter}", *v);
        }
        *v = stored as i16;
    }
    let spacing = 0.7 * 512.0 / cfg.size as f64;
    let thickness = (300.0 / cfg.slices as f64).max(0.5);
    let affine = [
        [-spacing, 0.0, 0.0, spacing * cfg.size as f64 / 2.0],
        [0.0, -spacing, 0.0, spacing * cfg.size as f64 / 2.0],
        [0.0, 0.0, thickness, -thickness * cfg.slices as f64 / 2.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let file = format!("{}.nii.gz", plan.name);
    nifti::write_with(
        &root.join("images").join(&file),
        &[g.nx, g.ny, g.nz],
        &raw,
        &affine,
        Some((1.0, plan.scl_inter.into())),
        options,
    )?;
    drop(raw);
    nifti::write_with(
        &root.join("segmentations").join(&file),
        &[channels, g.nx, g.ny, g.nz],
        &mask,
        &nifti::identity(),
        None,
        options,
    )?;
    Ok(json!({
        "name": plan.name,
        "file": file,
        "patient_id": plan.patient_id,
        "split": plan.split,
        "dims": [g.nx, g.ny, g.nz],
        "spacing_mm": [spacing, spacing, thickness],
        "scl_inter": plan.scl_inter,
        "padded": plan.padded,
        "findings": findings_truth,
    }))
}

/// The `dataset.json` entry of a generated case (ReXGroundingCT fields).
fn dataset_entry(truth: &Value) -> Value {
    let mut findings = serde_json::Map::new();
    let mut categories = serde_json::Map::new();
    let mut entity_counts = serde_json::Map::new();
    let mut pixels = serde_json::Map::new();
    for f in truth["findings"].as_array().into_iter().flatten() {
        let key = f["channel"].to_string();
        findings.insert(key.clone(), f["sentence"].clone());
        categories.insert(key.clone(), f["category"].clone());
        entity_counts.insert(key.clone(), f["entities"].clone());
        pixels.insert(key, f["voxels"].clone());
    }
    json!({
        "name": truth["file"],
        "findings": findings,
        "categories": categories,
        "entity_counts": entity_counts,
        "pixels": pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rexgct::{RexgctIndex, RexgctIndexParams};
    use std::collections::BTreeSet;

    fn small_params() -> PhantomParams {
        PhantomParams {
            preset: Preset::Mini,
            cases: Some(12),
            slices: Some(16),
            size: Some(96),
            padding_fraction: 0.5,
            ..PhantomParams::default()
        }
    }

    fn run_phantom(params: &PhantomParams, out: &Path, threads: usize) {
        run_phantom_seeded(params, out, threads, 17);
    }

    fn run_phantom_seeded(params: &PhantomParams, out: &Path, threads: usize, seed: u64) {
        Phantom::validate(params).unwrap();
        let mut ctx = StageContext::builder("volumes", out).seed(seed).threads(threads).build().unwrap();
        Phantom::run(params, &mut ctx).unwrap();
    }

    fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for sub in ["", "images", "segmentations"] {
            for e in std::fs::read_dir(dir.join(sub)).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    out.insert(p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn same_seed_same_bytes_regardless_of_threads() {
        let dir = tempfile::tempdir().unwrap();
        let p = small_params();
        run_phantom(&p, &dir.path().join("a"), 1);
        run_phantom(&p, &dir.path().join("b"), 2);
        let (a, b) = (files(&dir.path().join("a")), files(&dir.path().join("b")));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        assert!(a.len() >= 2 * 12 + 2, "{:?}", a.keys());
        for (k, v) in &a {
            assert!(v == &b[k], "{k} differs between runs");
        }
        // A different seed gives a different corpus.
        run_phantom_seeded(&p, &dir.path().join("c"), 2, 99);
        assert_ne!(files(&dir.path().join("c"))["dataset.json"], a["dataset.json"]);
    }

    #[test]
    fn corpus_has_every_rule_case_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("volumes");
        let p = small_params();
        run_phantom(&p, &root, 2);
        let truth: Value = serde_json::from_slice(&std::fs::read(root.join("phantom.json")).unwrap()).unwrap();
        let hint = truth["box_min_area_hint"].as_f64().unwrap();
        let cases = truth["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 12);

        let mut classes = BTreeSet::new();
        let (mut small, mut large, mut corrupt, mut padded, mut multi_scan) = (0, 0, 0, 0, 0);
        let mut per_patient: BTreeMap<&str, usize> = BTreeMap::new();
        for case in cases {
            *per_patient.entry(case["patient_id"].as_str().unwrap()).or_default() += 1;
            padded += case["padded"].as_bool().unwrap() as usize;
            for f in case["findings"].as_array().unwrap() {
                if let Some(c) = f["class"].as_str() {
                    classes.insert(c.to_string());
                }
                corrupt += f["corrupt_full_plane"].is_number() as usize;
                for l in f["lesions"].as_array().unwrap() {
                    let area = l["max_slice_box_area"].as_f64().unwrap();
                    if l["planted_small"].as_bool().unwrap() && area > 0.0 {
                        assert!(area <= hint, "small lesion with box area {area} > hint {hint}");
                        small += 1;
                    } else if area > hint {
                        large += 1;
                    }
                }
            }
        }
        multi_scan += per_patient.values().filter(|&&n| n > 1).count();
        assert_eq!(classes.len(), 7, "{classes:?}");
        assert!(small > 0 && large > 0 && padded > 0 && multi_scan > 0, "{small} {large} {padded} {multi_scan}");
        assert_eq!(corrupt, 1);

        // CT and mask read back with the expected layout and HU.
        let case = &cases[0];
        let name = case["file"].as_str().unwrap();
        let ct = nifti::read_f32(&root.join("images").join(name)).unwrap();
        assert_eq!(ct.dims, vec![96, 96, 16]);
        assert_eq!(nifti::orientation(&ct.header.affine), ['L', 'P', 'S']);
        let mid = ct.data
            [nifti::AxialSlicer::new(&ct.header.affine, ct.dims3()).unwrap().stored_index(8) * 96 * 96 + 48 * 96 + 30];
        assert!((-1000.0..=100.0).contains(&mid), "lung/lesion HU {mid}");
        let min = ct.data.iter().cloned().fold(f32::INFINITY, f32::min);
        if case["padded"].as_bool().unwrap() {
            assert_eq!(min, -8192.0);
        } else {
            assert!(min >= -1100.0, "{min}");
        }
        let mask = nifti::read_labels(&root.join("segmentations").join(name)).unwrap();
        let nf = case["findings"].as_array().unwrap().len();
        assert_eq!(mask.dims, vec![nf, 96, 96, 16]);
        for f in case["findings"].as_array().unwrap() {
            let ch = f["channel"].as_u64().unwrap() as usize;
            let count = mask.data.iter().skip(ch).step_by(nf).filter(|&&v| v > 0).count() as u64;
            assert_eq!(count, f["voxels"].as_u64().unwrap());
        }

        // The index stage accepts the corpus as an input artifact.
        let mut ctx = StageContext::builder("index", dir.path().join("index"))
            .input("dataset", "volumes", None, &root)
            .threads(2)
            .build()
            .unwrap();
        RexgctIndex::run(&RexgctIndexParams::default(), &mut ctx).unwrap();
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index/index.json")).unwrap()).unwrap();
        assert!(index["root"].is_null());
        assert_eq!(index["cases"].as_array().unwrap().len() + index["skipped"].as_array().unwrap().len(), 12);
    }

    #[test]
    fn bad_params_are_rejected_with_the_key() {
        let p = PhantomParams { size: Some(32), ..PhantomParams::default() };
        assert_eq!(Phantom::validate(&p).unwrap_err().path, vec!["size"]);
        let p = PhantomParams { val_fraction: 1.5, ..PhantomParams::default() };
        assert_eq!(Phantom::validate(&p).unwrap_err().path, vec!["val_fraction"]);
    }
}
