use super::*;
use crate::nifti;
use serde_json::json;

/// numpy: `np.round(np.linspace(0, n - 1, min(n, cap))).astype(int)`.
#[test]
fn linspace_matches_numpy() {
    let cases: &[(usize, usize, &[usize])] = &[
        (30, 20, &[0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29]),
        (21, 20, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]),
        (40, 20, &[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39]),
        (101, 20, &[0, 5, 11, 16, 21, 26, 32, 37, 42, 47, 53, 58, 63, 68, 74, 79, 84, 89, 95, 100]),
        (7, 4, &[0, 2, 4, 6]),
        (5, 20, &[0, 1, 2, 3, 4]),
        (1, 20, &[0]),
        (0, 20, &[]),
        // Exact halves round to even: 2.5 -> 2, 4.5 -> 4.
        (6, 3, &[0, 2, 5]),
        (10, 3, &[0, 4, 9]),
    ];
    for (n, cap, want) in cases {
        assert_eq!(linspace_indices(*n, *cap), *want, "n={n} cap={cap}");
    }
}

#[test]
fn mask_layouts_are_detected_from_ct_dims() {
    let ct = [64, 48, 10];
    assert_eq!(mask_layout(&[64, 48, 10], ct), Some(ChannelLayout::Last { channels: 1 }));
    assert_eq!(mask_layout(&[3, 64, 48, 10], ct), Some(ChannelLayout::First { channels: 3 }));
    assert_eq!(mask_layout(&[64, 48, 10, 3], ct), Some(ChannelLayout::Last { channels: 3 }));
    assert_eq!(mask_layout(&[3, 48, 64, 10], ct), None);
    assert_eq!(mask_layout(&[64, 48, 11], ct), None);
}

const R: usize = 96; // rows (stored y)
const C: usize = 128; // cols (stored x)
const Z: usize = 40;

/// LPS storage: display = stored order.
fn lps() -> [[f64; 4]; 4] {
    [[-0.7, 0.0, 0.0, 0.0], [0.0, -0.8, 0.0, 0.0], [0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 1.0]]
}

/// Planted mask channels (x fastest), each a 3D volume.
/// - channel 0 (class `nodule_mass`): 40x40 square at x 10..50, y 20..60 on
///   z 0..30 (area 1600 > 1300), and a 30x30 one (900, dropped) on z 30..35;
/// - channel 1 (class `nodule_mass` too): 1301 = 1301? no: a 37x36 box
///   (1332) at x 70..107 y 50..86 on z 5..8, and on z 8 a 26x50 box (exactly
///   1300: dropped);
/// - channel 2 (class `effusion_thickening`): the whole plane z 36 (corrupt,
///   dropped by max_box_fraction) and a 2-pixel diagonal pair on z 37 joined
///   only by 8-connectivity into a box of 60x60 drawn as a diagonal line.
fn channels() -> Vec<Vec<u16>> {
    let mut ch = vec![vec![0u16; R * C * Z]; 3];
    let idx = |x: usize, y: usize, z: usize| x + C * (y + R * z);
    let fill = |v: &mut Vec<u16>, xs: std::ops::Range<usize>, ys: std::ops::Range<usize>, z: usize, l: u16| {
        for y in ys {
            for x in xs.clone() {
                v[idx(x, y, z)] = l;
            }
        }
    };
    for z in 0..30 {
        fill(&mut ch[0], 10..50, 20..60, z, 1);
    }
    for z in 30..35 {
        fill(&mut ch[0], 10..40, 20..50, z, 2);
    }
    for z in 5..8 {
        fill(&mut ch[1], 70..107, 50..86, z, 1);
    }
    fill(&mut ch[1], 70..96, 10..60, 8, 1);
    fill(&mut ch[2], 0..C, 0..R, 36, 1);
    for i in 0..60 {
        ch[2][idx(20 + i, 20 + i, 37)] = 1;
    }
    ch
}

fn interleave_first(ch: &[Vec<u16>]) -> Vec<u16> {
    let n = ch[0].len();
    let mut out = Vec::with_capacity(n * ch.len());
    for v in 0..n {
        for c in ch {
            out.push(c[v]);
        }
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    index: PathBuf,
}

/// Dataset root with one case and an index pointing at it (root = the dir).
fn fixture(affine: [[f64; 4]; 4], mask_layout: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("segmentations")).unwrap();
    let ct: Vec<i16> = (0..R * C * Z).map(|i| (i % 2000) as i16 - 1000).collect();
    nifti::write(&root.join("images/train_1_a_1.nii.gz"), &[C, R, Z], &ct, &affine, Some((1.0, 0.0))).unwrap();
    let ch = channels();
    let mask_path = root.join("segmentations/train_1_a_1.nii.gz");
    match mask_layout {
        "first" => nifti::write(&mask_path, &[3, C, R, Z], &interleave_first(&ch), &nifti::identity(), None).unwrap(),
        "last" => nifti::write(&mask_path, &[C, R, Z, 3], &ch.concat(), &nifti::identity(), None).unwrap(),
        "wrong" => nifti::write(&mask_path, &[3, R, C, Z], &interleave_first(&ch), &nifti::identity(), None).unwrap(),
        other => panic!("{other}"),
    }
    let index_dir = dir.path().join("index");
    std::fs::create_dir_all(&index_dir).unwrap();
    let index = json!({
        "root": root, "classes": ["nodule_mass", "effusion_thickening"], "class_names": {},
        "cases": [{"name": "train_1_a_1", "patient_id": "train_1", "split": "train",
                   "ct": "images/train_1_a_1.nii.gz", "mask": "segmentations/train_1_a_1.nii.gz",
                   "findings": [
                       {"channel": 0, "category": "2d", "class": "nodule_mass", "sentence": "a"},
                       {"channel": 1, "category": "2d", "class": "nodule_mass", "sentence": "b"},
                       {"channel": 2, "category": "2e", "class": "effusion_thickening", "sentence": "c"}]}],
        "skipped": []});
    jsonl::write_json(&index_dir.join("index.json"), &index).unwrap();
    Fixture { _dir: dir, root, index: index_dir }
}

fn run(f: &Fixture, params: &LesionSlicesParams, name: &str) -> anyhow::Result<(Vec<SliceItem>, SliceStats)> {
    let out = f._dir.path().join(name);
    let mut ctx = StageContext::builder("slices", &out).input("index", "idx", None, &f.index).threads(2).build()?;
    LesionSlices::run(params, &mut ctx)?;
    Ok((jsonl::read(&out.join("items.jsonl"))?, jsonl::read_json(&out.join("stats.json"))?))
}

fn b(x0: u32, y0: u32, x1: u32, y1: u32) -> BBox {
    BBox { x0, y0, x1, y1 }
}

#[test]
fn rules_boxes_and_cap_on_a_planted_mask() {
    let f = fixture(lps(), "first");
    let p = LesionSlicesParams { max_slices: 20, ..Default::default() };
    let (items, stats) = run(&f, &p, "out").unwrap();
    let nodules: Vec<&SliceItem> = items.iter().filter(|i| i.class == "nodule_mass").collect();
    // 30 kept slices (z 0..30; z 30..35 has only a 900 px box) -> 20 sampled.
    let ks: Vec<usize> = nodules.iter().map(|i| i.slice).collect();
    assert_eq!(ks, vec![0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29]);
    let by_k = |k: usize| nodules.iter().find(|i| i.slice == k).unwrap();
    assert_eq!(by_k(0).boxes, vec![b(10, 20, 50, 60)]);
    // z 5..8: both channels ORed -> two boxes, the 37x36 one (1332) kept.
    assert_eq!(by_k(5).boxes, vec![b(10, 20, 50, 60), b(70, 50, 107, 86)]);
    // z 8: the 26x50 = 1300 box is dropped (strict rule), the square stays.
    assert_eq!(by_k(8).boxes, vec![b(10, 20, 50, 60)]);
    assert_eq!(by_k(8).id, "train_1_a_1/nodule_mass/008");
    assert_eq!((by_k(8).rows, by_k(8).cols, by_k(8).stored_slice), (R, C, 8));
    assert!((by_k(8).spacing_mm[0] - 0.8).abs() < 1e-6 && (by_k(8).spacing_mm[2] - 1.5).abs() < 1e-6);
    // Effusion: full plane dropped as implausible; diagonal line kept only with 8-connectivity.
    let eff: Vec<&SliceItem> = items.iter().filter(|i| i.class == "effusion_thickening").collect();
    assert_eq!(eff.len(), 1);
    assert_eq!((eff[0].slice, eff[0].boxes.clone()), (37, vec![b(20, 20, 80, 80)]));
    assert_eq!(stats.boxes_dropped_large, 1);
    // dropped small: 1300 box on z 8 + 900 px boxes on z 30..35.
    assert_eq!(stats.boxes_dropped_small, 1 + 5);
    assert_eq!(stats.slices_without_surviving_box, 5 + 1);
    assert_eq!(stats.slices_kept_before_cap, 31);
    assert_eq!(stats.items_per_class["nodule_mass"], 20);

    let four = LesionSlicesParams { connectivity: Connectivity::Four, ..p.clone() };
    let (items4, _) = run(&f, &four, "out4").unwrap();
    assert!(items4.iter().all(|i| i.class != "effusion_thickening"), "1-px pieces are below the area rule");

    // cap_scope = case: 21 (slice, class) items sampled to 20 over the whole case.
    let case = LesionSlicesParams { cap_scope: CapScope::Case, ..p.clone() };
    let (items_c, _) = run(&f, &case, "outc").unwrap();
    assert_eq!(items_c.len(), 20);
    assert!(items_c.iter().any(|i| i.class == "effusion_thickening"), "last item (k = 37) always sampled");
    let small_cap = LesionSlicesParams { max_slices: 3, ..p };
    let (items_s, _) = run(&f, &small_cap, "outs").unwrap();
    let ks: Vec<(String, usize)> = items_s.iter().map(|i| (i.class.clone(), i.slice)).collect();
    assert_eq!(
        ks,
        vec![
            ("effusion_thickening".into(), 37),
            ("nodule_mass".into(), 0),
            ("nodule_mass".into(), 14),
            ("nodule_mass".into(), 29)
        ]
    );
}

#[test]
fn channel_last_layout_gives_the_same_items() {
    let p = LesionSlicesParams::default();
    let (a, _) = run(&fixture(lps(), "first"), &p, "o").unwrap();
    let (b, _) = run(&fixture(lps(), "last"), &p, "o").unwrap();
    assert_eq!(a, b);
}

#[test]
fn ras_storage_is_flipped_to_display_orientation() {
    // x -> R and y -> A: display columns and rows run against storage.
    let mut ras = lps();
    ras[0][0] = 0.7;
    ras[1][1] = 0.8;
    let (items, _) = run(&fixture(ras, "first"), &LesionSlicesParams::default(), "o").unwrap();
    let first = items.iter().find(|i| i.class == "nodule_mass" && i.slice == 0).unwrap();
    // stored x 10..50 -> display cols C-50..C-10; stored y 20..60 -> rows R-60..R-20.
    assert_eq!(first.boxes, vec![b((C - 50) as u32, (R - 60) as u32, (C - 10) as u32, (R - 20) as u32)]);
}

#[test]
fn mask_shape_mismatch_is_a_clear_error_and_nothing_is_written() {
    let f = fixture(lps(), "wrong");
    let err = format!("{:#}", run(&f, &LesionSlicesParams::default(), "o").unwrap_err());
    assert!(err.contains("case `train_1_a_1`") && err.contains("match neither the CT dims"), "{err}");
    assert!(!f._dir.path().join("o/items.jsonl").exists());
}

#[test]
fn missing_mask_and_bad_channel_name_the_file() {
    let f = fixture(lps(), "first");
    let idx_path = f.index.join("index.json");
    let text = std::fs::read_to_string(&idx_path).unwrap().replace("\"channel\": 2", "\"channel\": 7");
    std::fs::write(&idx_path, text).unwrap();
    let err = format!("{:#}", run(&f, &LesionSlicesParams::default(), "o").unwrap_err());
    assert!(err.contains("finding channel 7") && err.contains("3 channel(s)"), "{err}");
    std::fs::remove_file(f.root.join("segmentations/train_1_a_1.nii.gz")).unwrap();
    let err = format!("{:#}", run(&f, &LesionSlicesParams::default(), "o2").unwrap_err());
    assert!(err.contains("segmentations/train_1_a_1.nii.gz"), "{err}");
}
