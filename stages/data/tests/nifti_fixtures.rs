//! NIfTI-1 and NIfTI-2 files written by nibabel (`tools/nifti_fixtures.py`,
//! committed under `tests/fixtures/nifti/`) read back value-exact, with
//! nibabel's affine, axis codes and display slices.

use std::path::PathBuf;

use serde_json::Value;
use stages_data::nifti::{self, AxialSlicer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti")
}

fn expected() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["files"].as_object().unwrap().clone()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn nibabel_fixtures_read_back_exactly() {
    let files = expected();
    assert!(files.len() >= 12, "fixture set incomplete: {:?}", files.keys());
    let version_of = |e: &Value| e["version"].as_u64().unwrap();
    let nifti2 = files.values().filter(|e| version_of(e) == 2).count();
    assert!(nifti2 >= 5, "expected ≥ 5 NIfTI-2 fixtures, found {nifti2}");
    for (name, e) in &files {
        let path = fixtures().join(name);
        let header = nifti::read_header(&path).unwrap();
        let v2 = version_of(e) == 2;
        assert_eq!(header.version.number() as u64, version_of(e), "{name}: version");
        assert_eq!(header.big_endian, e["big_endian"].as_bool().unwrap(), "{name}: byte order");
        let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(header.dims, shape, "{name}");
        assert_eq!(header.datatype.name(), e["datatype"].as_str().unwrap(), "{name}");
        assert_eq!(header.sform_code as i64, e["sform_code"].as_i64().unwrap(), "{name}: sform_code");
        assert_eq!(header.qform_code as i64, e["qform_code"].as_i64().unwrap(), "{name}: qform_code");
        let zooms = f64s(&e["zooms"]);
        assert_eq!(header.pixdim.len(), zooms.len(), "{name}: zooms");
        for (z, want) in header.pixdim.iter().zip(zooms) {
            // NIfTI-2 pixdim is f64 in the file and in nibabel: exact. (The
            // fixtures use zooms such as 0.7000000001 that f32 cannot hold.)
            let tol = if v2 { 0.0 } else { 1e-6 };
            assert!((z - want).abs() <= tol, "{name}: zooms {:?}", header.pixdim);
        }
        let affine = e["affine"].as_array().unwrap();
        for (got_row, want_row) in header.affine.iter().zip(affine) {
            for (got, want) in got_row.iter().zip(f64s(want_row)) {
                // nibabel computes the qform in f64 from the stored fields, as
                // we do; NIfTI-2 fields are f64, so only rounding differs.
                let tol = if v2 { 1e-12 } else { 1e-5 };
                assert!((got - want).abs() < tol, "{name}: affine {:?} vs {affine:?}", header.affine);
            }
        }
        let codes: String = nifti::orientation(&header.affine).iter().collect();
        assert_eq!(codes, e["axcodes"].as_str().unwrap(), "{name}");

        let want = f64s(&e["values"]);
        let values: Vec<f64> = if e["labels"].as_bool().unwrap() {
            nifti::read_labels(&path).unwrap().data.iter().map(|&v| v as f64).collect()
        } else {
            let v = nifti::read_f32(&path).unwrap();
            if let (Some(s), Some(i)) = (e["scl_slope"].as_f64(), e["scl_inter"].as_f64()) {
                // Exact: nibabel reads the same f32 (NIfTI-1) or f64 (NIfTI-2) field.
                assert_eq!(v.header.scaling(), (s, i), "{name}: scl_slope/scl_inter");
            }
            v.data.iter().map(|&v| v as f64).collect()
        };
        assert_eq!(values.len(), want.len(), "{name}");
        for (i, (got, w)) in values.iter().zip(&want).enumerate() {
            // Value-exact: nibabel's float64 result rounded to f32 is ours.
            assert_eq!(*got, (*w as f32) as f64, "{name}: voxel {i}");
        }

        if let Some(k) = e.get("display_k").and_then(Value::as_u64) {
            let v = nifti::read_f32(&path).unwrap();
            let slicer = AxialSlicer::new(&v.header.affine, v.dims3()).unwrap();
            let dd: Vec<usize> =
                e["display_dims"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(slicer.slice_dims(), (dd[0], dd[1]), "{name}: display dims");
            let mut out = Vec::new();
            slicer.slice(&v.data, k as usize, &mut out);
            let want: Vec<f32> = f64s(&e["display_slice"]).iter().map(|&x| x as f32).collect();
            assert_eq!(out, want, "{name}: display slice {k}");
        }
    }
}

#[test]
fn truncated_fixture_copies_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "ct_i16_scaled.nii.gz",
        "ct_i16_scaled.nii",
        "f32_oblique.nii",
        "n2_ct_i16_scaled.nii.gz",
        "n2_ct_i16_scaled.nii",
        "n2_f32_oblique_bigendian.nii",
    ] {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        for cut in [10, 200, 348, 353, 540, 545, bytes.len() - 1].into_iter().filter(|&c| c < bytes.len()) {
            let p = dir.path().join(format!("cut{cut}_{name}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = nifti::read_f32(&p).unwrap_err().to_string();
            assert!(err.contains(&format!("cut{cut}_{name}")), "{err}");
            // A NIfTI-2 file cut inside its 540-byte header is not misread
            // as a NIfTI-1 one (348 bytes would be enough for that).
            if name.starts_with("n2_") && !name.ends_with(".gz") && (348..540).contains(&cut) {
                assert!(err.contains("truncated NIfTI-2 header: expected 540 bytes"), "{err}");
            }
        }
    }
}
