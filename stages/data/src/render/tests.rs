use super::*;
use crate::slices::SliceItem;
use serde_json::json;

#[test]
fn window_maps_hu_exactly() {
    let g = window_to_gray(&[-8192.0, -1000.0, -999.0, 0.0, 1000.0, 3000.0], -1000.0, 1000.0);
    // (v + 1000) * 255 / 2000 + 0.5, floored: -999 -> 0.6275 -> 0; 0 -> 128.
    assert_eq!(g, vec![0, 0, 0, 128, 255, 255]);
    let lung = RenderParams { window: Some(Window { level: -600.0, width: 1500.0 }), ..Default::default() };
    assert_eq!(lung.hu_range(), (-1350.0, 150.0));
    assert_eq!(window_to_gray(&[-1350.0, -600.0, 150.0], -1350.0, 150.0), vec![0, 128, 255]);
}

/// With `resize` the output has the model processor's size (HF's rule: a
/// 14 px side rounds to 0 before the area check, so 14 x 500 -> 28 x 336),
/// and a slice the processor refuses is an error naming its size.
#[test]
fn resize_gives_the_processor_size() {
    let p = RenderParams { clip: [0.0, 255.0], zoom: false, draw_box: false, ..Default::default() };
    for ((rows, cols), (h, w)) in [((160, 160), (168, 168)), ((96, 128), (84, 140)), ((14, 500), (28, 336))] {
        let c = compose(&vec![0.0; rows * cols], rows, cols, &[], &p).unwrap();
        assert_eq!((c.image.height(), c.image.width()), (h, w), "{rows} x {cols}");
    }
    let e = compose(&[0.0; 2 * 500], 2, 500, &[], &p).unwrap_err();
    assert!(matches!(e, RenderError::Resize { rows: 2, cols: 500, .. }), "{e}");
    assert!(e.to_string().contains("aspect ratio"), "{e}");
}

const ROWS: usize = 60;
const COLS: usize = 90;

/// A slice whose grey value at (row r, col c) is `(c + 2r) % 256` under clip [0, 255].
fn ramp() -> Vec<f32> {
    (0..ROWS * COLS).map(|i| ((i % COLS + 2 * (i / COLS)) % 256) as f32).collect()
}

fn gray(c: u32, r: u32) -> Rgb<u8> {
    let v = ((c + 2 * r) % 256) as u8;
    Rgb([v, v, v])
}

fn native_params() -> RenderParams {
    RenderParams { clip: [0.0, 255.0], resize: false, patch_side: PatchSide::Pixels(24), ..Default::default() }
}

const RED: Rgb<u8> = Rgb([255, 0, 0]);
const GREEN: Rgb<u8> = Rgb([0, 255, 0]);

#[test]
fn zoom_patch_border_and_box_pixels_are_exact() {
    let lesion = BBox { x0: 50, y0: 30, x1: 70, y1: 40 };
    let small = BBox { x0: 5, y0: 50, x1: 10, y1: 55 };
    let c = compose(&ramp(), ROWS, COLS, &[small, lesion], &native_params()).unwrap();
    let img = &c.image;
    assert_eq!((img.width(), img.height()), (90, 60));
    assert_eq!(c.zoom_box, Some(lesion), "largest box");
    assert_eq!(c.image_boxes, vec![small, lesion]);
    assert_eq!(c.patch, Some(BBox { x0: 0, y0: 0, x1: 24, y1: 24 }));
    // Crop: side ceil(20 * 1.2) = 24, centred: x0 = (50 + 70 - 24) / 2 = 48, y0 = (30 + 40 - 24) / 2 = 23.
    for y in 0..24 {
        for x in 0..24 {
            let want = if x < 3 || y < 3 || x >= 21 || y >= 21 { GREEN } else { gray(48 + x, 23 + y) };
            assert_eq!(*img.get_pixel(x, y), want, "patch pixel ({x}, {y})");
        }
    }
    // Right of / below the patch the slice is untouched.
    assert_eq!(*img.get_pixel(24, 0), gray(24, 0));
    assert_eq!(*img.get_pixel(0, 24), gray(0, 24));
    // Red ring of 3 px just outside the lesion box: x 47..73, y 27..43.
    for y in 27..43 {
        for x in 47..73 {
            let inside = (50..70).contains(&x) && (30..40).contains(&y);
            let want = if inside { gray(x, y) } else { RED };
            assert_eq!(*img.get_pixel(x, y), want, "box pixel ({x}, {y})");
        }
    }
    assert_eq!(*img.get_pixel(46, 35), gray(46, 35));
    assert_eq!(*img.get_pixel(73, 35), gray(73, 35));
    assert_eq!(*img.get_pixel(60, 26), gray(60, 26));
    // The small box is not the zoom box: no ring around it.
    assert_eq!(*img.get_pixel(4, 52), gray(4, 52));
}

#[test]
fn union_box_crop_is_shifted_inside_the_slice() {
    let a = BBox { x0: 80, y0: 0, x1: 90, y1: 10 };
    let b = BBox { x0: 70, y0: 5, x1: 85, y1: 20 };
    let p = RenderParams { zoom_box: ZoomBox::Union, draw_box: false, ..native_params() };
    let c = compose(&ramp(), ROWS, COLS, &[a, b], &p).unwrap();
    assert_eq!(c.zoom_box, Some(BBox { x0: 70, y0: 0, x1: 90, y1: 20 }));
    // side 24: centred start x = (70 + 90 - 24) / 2 = 68 -> clamped to 90 - 24 = 66; y = -2 -> 0.
    assert_eq!(*c.image.get_pixel(10, 10), gray(66 + 10, 10));
    // No red anywhere (draw_box = false).
    assert!(c.image.pixels().all(|p| *p != RED));
}

#[test]
fn zoom_off_leaves_the_corner_alone() {
    let p = RenderParams { zoom: false, ..native_params() };
    let c = compose(&ramp(), ROWS, COLS, &[BBox { x0: 50, y0: 30, x1: 70, y1: 40 }], &p).unwrap();
    assert_eq!(c.patch, None);
    assert_eq!(*c.image.get_pixel(1, 1), gray(1, 1));
    assert_eq!(*c.image.get_pixel(49, 35), RED);
}

#[test]
fn resize_scales_boxes_and_patch_fraction() {
    let hu: Vec<f32> = vec![0.0; 100 * 100];
    let b = BBox { x0: 10, y0: 20, x1: 31, y1: 41 };
    let c = compose(&hu, 100, 100, &[b], &RenderParams::default()).unwrap();
    assert_eq!((c.image.width(), c.image.height()), (112, 112));
    // 1.12x: floor(11.2) = 11, floor(22.4) = 22, ceil(34.72) = 35, ceil(45.92) = 46.
    assert_eq!(c.image_boxes, vec![BBox { x0: 11, y0: 22, x1: 35, y1: 46 }]);
    // Patch side round(112 / 3) = 37 with the green border on its edge.
    assert_eq!(c.patch, Some(BBox { x0: 0, y0: 0, x1: 37, y1: 37 }));
    assert_eq!(*c.image.get_pixel(36, 36), GREEN);
    assert_eq!(*c.image.get_pixel(33, 33), Rgb([128, 128, 128]));
    assert_eq!(*c.image.get_pixel(40, 40), Rgb([128, 128, 128]));
    assert_eq!(*c.image.get_pixel(37, 37), RED, "ring around the scaled box");
}

#[test]
fn bad_shapes_and_boxes_are_errors() {
    let err = compose(&[0.0; 10], 3, 4, &[], &native_params()).unwrap_err();
    assert_eq!(err, RenderError::Shape { len: 10, rows: 3, cols: 4 });
    let outside = BBox { x0: 80, y0: 0, x1: 91, y1: 5 };
    assert!(matches!(compose(&ramp(), ROWS, COLS, &[outside], &native_params()), Err(RenderError::BoxOutside(..))));
}

#[test]
fn png_roundtrips_and_is_byte_reproducible() {
    let c = compose(&ramp(), ROWS, COLS, &[BBox { x0: 50, y0: 30, x1: 70, y1: 40 }], &RenderParams::default()).unwrap();
    let a = encode_png(&c.image, PngCompression::Fast).unwrap();
    let b = encode_png(&c.image, PngCompression::Fast).unwrap();
    assert_eq!(a, b);
    let back = image::load_from_memory(&a).unwrap().to_rgb8();
    assert_eq!(back, c.image);
}

/// End to end: CT on disk (RAS storage, so slicing flips), items, index.
#[test]
fn stage_renders_reproducible_pngs_from_nifti() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("images")).unwrap();
    let (x, y, z) = (COLS, ROWS, 4);
    // Stored RAS: display col = x flipped, row = y flipped. Value = display ramp.
    let mut ct = vec![0i16; x * y * z];
    for k in 0..z {
        for sy in 0..y {
            for sx in 0..x {
                let (r, c) = (y - 1 - sy, x - 1 - sx);
                ct[sx + x * (sy + y * k)] = ((c + 2 * r) % 256) as i16 * 2 + k as i16;
            }
        }
    }
    let affine = [[0.7, 0.0, 0.0, 0.0], [0.0, 0.7, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
    // Stored values v with slope 0.5: HU = v / 2 -> grey = c + 2r (+ k / 2).
    nifti::write(&root.join("images/c1.nii.gz"), &[x, y, z], &ct, &affine, Some((0.5, 0.0))).unwrap();
    let index = dir.path().join("index");
    std::fs::create_dir_all(&index).unwrap();
    jsonl::write_json(
        &index.join("index.json"),
        &json!({"root": root, "classes": ["nodule_mass"], "cases": [{"name": "c1", "patient_id": "p1", "split": "train",
                 "ct": "images/c1.nii.gz", "mask": "segmentations/c1.nii.gz", "findings": []}]}),
    )
    .unwrap();
    let slices = dir.path().join("slices");
    std::fs::create_dir_all(&slices).unwrap();
    let item = |k: usize| SliceItem {
        id: format!("c1/nodule_mass/{k:03}"),
        case: "c1".into(),
        patient_id: "p1".into(),
        split: "train".into(),
        class: "nodule_mass".into(),
        slice: k,
        stored_slice: k,
        rows: ROWS,
        cols: COLS,
        boxes: vec![BBox { x0: 50, y0: 30, x1: 70, y1: 40 }],
        spacing_mm: [0.7, 0.7, 2.0],
    };
    jsonl::write(&slices.join("items.jsonl"), &[item(0), item(2)]).unwrap();
    let run = |name: &str| {
        let out = dir.path().join(name);
        let mut ctx = StageContext::builder("render", &out)
            .input("slices", "s", None, &slices)
            .input("index", "i", None, &index)
            .threads(2)
            .build()
            .unwrap();
        Render::run(&native_params(), &mut ctx).unwrap();
        out
    };
    let (a, b) = (run("a"), run("b"));
    let items: Vec<RenderedItem> = jsonl::read(&a.join("items.jsonl")).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].image, "images/c1__nodule_mass__000.png");
    assert_eq!((items[1].width, items[1].height), (90, 60));
    for it in &items {
        let bytes = std::fs::read(a.join(&it.image)).unwrap();
        assert_eq!(bytes, std::fs::read(b.join(&it.image)).unwrap(), "byte-reproducible");
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        // Outside patch and box, pixel = display ramp (+ k / 2 rounded half up).
        let k = it.item.slice as u32;
        let expect = |c: u32, r: u32| {
            let v = ((c + 2 * r) % 256) as f32 + k as f32 / 2.0;
            let g = (v + 0.5).floor() as u8;
            Rgb([g, g, g])
        };
        assert_eq!(*img.get_pixel(30, 50), expect(30, 50));
        assert_eq!(*img.get_pixel(89, 0), expect(89, 0));
        assert_eq!(*img.get_pixel(49, 35), RED);
    }
    // A mismatching item geometry is a clear error.
    let mut bad = item(1);
    bad.rows = 61;
    jsonl::write(&slices.join("items.jsonl"), &[bad]).unwrap();
    let mut ctx = StageContext::builder("render", dir.path().join("c"))
        .input("slices", "s", None, &slices)
        .input("index", "i", None, &index)
        .build()
        .unwrap();
    let err = format!("{:#}", Render::run(&native_params(), &mut ctx).unwrap_err());
    assert!(err.contains("expects slice 1 of 61x90"), "{err}");
}
