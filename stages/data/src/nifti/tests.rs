//! Reader/writer tests on real files in a tempdir; nibabel-written fixtures
//! are checked in `tests/nifti_fixtures.rs`.

use super::*;
use std::io::Write as _;

fn lps(sx: f64, sy: f64, sz: f64) -> [[f64; 4]; 4] {
    [[-sx, 0.0, 0.0, 10.0], [0.0, -sy, 0.0, 20.0], [0.0, 0.0, sz, -30.0], [0.0, 0.0, 0.0, 1.0]]
}

#[test]
fn roundtrip_int16_with_scaling_gz_and_plain() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [4, 3, 2];
    let raw: Vec<i16> = (0..24).map(|i| i * 100 - 1000).collect();
    for name in ["ct.nii", "ct.nii.gz"] {
        let p = dir.path().join(name);
        write(&p, &dims, &raw, &lps(0.7, 0.7, 1.5), Some((2.0, -1024.0))).unwrap();
        let v = read_f32(&p).unwrap();
        assert_eq!(v.dims, dims);
        let want: Vec<f32> = raw.iter().map(|&r| r as f32 * 2.0 - 1024.0).collect();
        assert_eq!(v.data, want);
        assert_eq!(v.header.datatype, DataType::I16);
        assert_eq!(orientation(&v.header.affine), ['L', 'P', 'S']);
        for i in 0..3 {
            for j in 0..4 {
                assert!((v.header.affine[i][j] - lps(0.7, 0.7, 1.5)[i][j]).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn qform_written_by_us_matches_the_sform() {
    // Oblique rotation about z by 30° with LPS flips: the qform must encode it.
    let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
    let a = [[-0.8 * c, 0.8 * s, 0.0, 1.0], [-0.8 * s, -0.8 * c, 0.0, 2.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]];
    let h = NiftiHeader::for_write(&[2, 2, 2], DataType::U8, &a, None, NiftiVersion::V1);
    let zooms = [h.pixdim[0], h.pixdim[1], h.pixdim[2]];
    let q = affine::quatern_to_affine(h.quatern, h.qoffset, zooms, h.qfac, 3.0 * f32::EPSILON as f64);
    for i in 0..3 {
        for j in 0..4 {
            assert!((q[i][j] - a[i][j]).abs() < 1e-5, "{q:?} vs {a:?}");
        }
    }
}

#[test]
fn labels_4d_roundtrip_and_reject_negative() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mask.nii.gz");
    let data: Vec<u8> = (0..2 * 3 * 3 * 2).map(|i| (i % 3) as u8).collect();
    write(&p, &[2, 3, 3, 2], &data, &identity(), None).unwrap();
    let v = read_labels(&p).unwrap();
    assert_eq!(v.dims, vec![2, 3, 3, 2]);
    assert_eq!(v.data, data.iter().map(|&d| d as u16).collect::<Vec<_>>());

    let p = dir.path().join("neg.nii");
    write(&p, &[2, 2], &[0i16, 1, -1, 2], &identity(), None).unwrap();
    let e = read_labels(&p).unwrap_err().to_string();
    assert!(e.contains("neg.nii") && e.contains("[0, 1]") && e.contains("-1"), "{e}");

    let p = dir.path().join("frac.nii");
    write(&p, &[2], &[1.0f32, 0.5], &identity(), None).unwrap();
    assert!(read_labels(&p).unwrap_err().to_string().contains("whole numbers"));
}

#[test]
fn nan_is_an_error_naming_file_and_voxel() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nan.nii.gz");
    write(&p, &[2, 2], &[0.0f32, 1.0, f32::NAN, 3.0], &identity(), None).unwrap();
    let e = read_f32(&p).unwrap_err().to_string();
    assert!(e.contains("nan.nii.gz") && e.contains("[0, 1]") && e.contains("NaN"), "{e}");
}

#[test]
fn slope_zero_means_no_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s0.nii");
    write(&p, &[3], &[1i16, 2, 3], &identity(), Some((0.0, 50.0))).unwrap();
    assert_eq!(read_f32(&p).unwrap().data, vec![1.0, 2.0, 3.0]);
}

fn header_bytes(dims: &[i16], datatype: i16, bitpix: i16) -> Vec<u8> {
    let mut h = NiftiHeader::for_write(&[1], DataType::U8, &identity(), None, NiftiVersion::V1).to_bytes();
    h[40..42].copy_from_slice(&(dims.len() as i16).to_le_bytes());
    for (i, d) in dims.iter().enumerate() {
        h[42 + 2 * i..44 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&datatype.to_le_bytes());
    h[72..74].copy_from_slice(&bitpix.to_le_bytes());
    h
}

fn err_of(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = read_f32(&p).unwrap_err().to_string();
    assert!(e.contains(name), "error does not name the file: {e}");
    e
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // dims × datatype ≠ file size
    let mut b = header_bytes(&[4, 4], 4, 16);
    b.extend_from_slice(&[0u8; 30]); // needs 32
    let e = err_of(d, "short.nii", &b);
    assert!(e.contains("384-byte file") && e.contains("382 bytes"), "{e}");

    // wrong magic
    let mut b = header_bytes(&[1], 2, 8);
    b[344..348].copy_from_slice(b"xyz\0");
    b.push(0);
    assert!(err_of(d, "magic.nii", &b).contains("magic"));

    // not a header at all
    assert!(err_of(d, "text.nii", b"hello world, this is not nifti").contains("truncated header"));
    let mut junk = vec![7u8; 400];
    junk[0] = 1;
    assert!(err_of(d, "junk.nii", &junk).contains("sizeof_hdr"));

    // negative and zero dims, too many dims
    assert!(err_of(d, "negdim.nii", &header_bytes(&[4, -3], 2, 8)).contains("dim[2]"));
    assert!(err_of(d, "zerodim.nii", &header_bytes(&[0], 2, 8)).contains("dim[1]"));
    let mut b = header_bytes(&[1], 2, 8);
    b[40..42].copy_from_slice(&9i16.to_le_bytes());
    assert!(err_of(d, "ndim.nii", &b).contains("dim[0]"));

    // huge dims: exceeds the size limit before any allocation
    let e = err_of(d, "huge.nii", &header_bytes(&[32767, 32767, 32767], 64, 64));
    assert!(e.contains("limit"), "{e}");

    // unsupported datatype
    assert!(err_of(d, "rgb.nii", &header_bytes(&[1], 128, 24)).contains("rgb24"));

    // huge dims inside a small gzip file
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
    enc.write_all(&header_bytes(&[2000, 2000, 2000], 16, 32)).unwrap();
    let gz = enc.finish().unwrap();
    assert!(err_of(d, "bomb.nii.gz", &gz).contains("gzip file can hold"));
}

#[test]
fn truncated_and_corrupt_gzip_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("full.nii.gz");
    let data: Vec<i16> = (0..64 * 64 * 4).map(|i| (i * 7919 % 3000) as i16).collect();
    write(&p, &[64, 64, 4], &data, &identity(), None).unwrap();
    let bytes = std::fs::read(&p).unwrap();

    let e = err_of(dir.path(), "cut.nii.gz", &bytes[..bytes.len() / 2]);
    assert!(e.contains("truncated") || e.contains("ends early"), "{e}");
    // Only the 8-byte trailer (CRC + length) missing.
    let e = err_of(dir.path(), "notrailer.nii.gz", &bytes[..bytes.len() - 8]);
    assert!(e.contains("ends early") || e.contains("gzip"), "{e}");
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let e = err_of(dir.path(), "flipped.nii.gz", &bad);
    assert!(e.contains("gzip") || e.contains("truncated"), "{e}");
}

#[test]
fn writer_rejects_mismatched_data_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.nii.gz");
    let e = write(&p, &[2, 2], &[1u8, 2, 3], &identity(), None).unwrap_err().to_string();
    assert!(e.contains("4 voxels") && e.contains("3 values"), "{e}");
    assert!(!p.exists());
    let data: Vec<u8> = (0..=255).collect();
    write(&p, &[16, 16], &data, &identity(), None).unwrap();
    let a = std::fs::read(&p).unwrap();
    write(&p, &[16, 16], &data, &identity(), None).unwrap();
    assert_eq!(a, std::fs::read(&p).unwrap());
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn big_endian_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = NiftiHeader::for_write(&[3], DataType::I16, &identity(), None, NiftiVersion::V1).to_bytes();
    // Byte-swap every field we read: sizeof_hdr, dims, datatype, bitpix, pixdim, vox_offset, slope.
    let swap = |h: &mut Vec<u8>, off: usize, n: usize| h[off..off + n].reverse();
    swap(&mut h, 0, 4);
    for i in 0..8 {
        swap(&mut h, 40 + 2 * i, 2);
    }
    swap(&mut h, 70, 2);
    swap(&mut h, 72, 2);
    for i in 0..8 {
        swap(&mut h, 76 + 4 * i, 4);
    }
    for off in [108, 112, 116] {
        swap(&mut h, off, 4);
    }
    swap(&mut h, 252, 2);
    swap(&mut h, 254, 2);
    for i in 0..12 {
        swap(&mut h, 256 + 4 * i, 4);
    }
    for v in [-5i16, 0, 300] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    let p = dir.path().join("be.nii");
    std::fs::write(&p, &h).unwrap();
    let v = read_f32(&p).unwrap();
    assert!(v.header.big_endian);
    assert_eq!(v.data, vec![-5.0, 0.0, 300.0]);
}

// ---- NIfTI-2 ----

const V2: WriteOptions = WriteOptions { gz_level: 1, version: NiftiVersion::V2 };

/// An affine with entries f32 cannot hold, so that any narrowing of the
/// NIfTI-2 f64 fields shows.
fn lps_f64() -> [[f64; 4]; 4] {
    [[-0.7000000001, 0.0, 0.0, 120.123456789], [0.0, -0.7, 0.0, 80.1], [0.0, 0.0, 1.25, -300.3], [0.0, 0.0, 0.0, 1.0]]
}

#[test]
fn nifti2_roundtrip_keeps_f64_fields_gz_and_plain() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [4, 3, 2];
    let raw: Vec<i16> = (0..24).map(|i| i * 137 - 1500).collect();
    let (slope, inter) = (0.3141592653589793, -1024.1);
    for name in ["ct2.nii", "ct2.nii.gz"] {
        let p = dir.path().join(name);
        write_with(&p, &dims, &raw, &lps_f64(), Some((slope, inter)), V2).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        if !name.ends_with(".gz") {
            assert_eq!(&bytes[0..4], &540i32.to_le_bytes());
            assert_eq!(&bytes[4..12], b"n+2\0\r\n\x1a\n");
            assert_eq!(bytes.len(), 544 + 24 * 2, "header + extension flag + voxels");
        }
        let v = read_f32(&p).unwrap();
        let h = &v.header;
        assert_eq!(h.version, NiftiVersion::V2);
        assert_eq!((v.dims.as_slice(), h.datatype, h.vox_offset), (&dims[..], DataType::I16, 544));
        assert_eq!((h.scl_slope, h.scl_inter), (slope, inter), "scaling is stored as f64");
        assert_eq!(h.affine, lps_f64(), "the sform is stored as f64");
        assert_eq!(h.pixdim, vec![0.7000000001, 0.7, 1.25]);
        assert_eq!(orientation(&h.affine), ['L', 'P', 'S']);
        let want: Vec<f32> = raw.iter().map(|&r| (r as f64 * slope + inter) as f32).collect();
        assert_eq!(v.data, want);
        // The qform we wrote encodes the same affine (at f64 precision).
        let zooms = [h.pixdim[0], h.pixdim[1], h.pixdim[2]];
        let q = affine::quatern_to_affine(h.quatern, h.qoffset, zooms, h.qfac, 3.0 * f64::EPSILON);
        for i in 0..3 {
            for j in 0..4 {
                assert!((q[i][j] - lps_f64()[i][j]).abs() < 1e-12, "{q:?}");
            }
        }
    }
    // The same values written as NIfTI-1 lose the f64 precision: the check
    // above is not vacuous.
    let p = dir.path().join("ct1.nii");
    write(&p, &dims, &raw, &lps_f64(), Some((slope, inter))).unwrap();
    let h1 = read_header(&p).unwrap();
    assert_eq!(h1.version, NiftiVersion::V1);
    assert_ne!(h1.scl_slope, slope);
    assert_ne!(h1.affine, lps_f64());
}

#[test]
fn nifti2_labels_4d_and_big_endian() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mask2.nii.gz");
    let data: Vec<u8> = (0..2 * 3 * 3 * 2).map(|i| (i % 5) as u8).collect();
    write_with(&p, &[2, 3, 3, 2], &data, &identity(), None, V2).unwrap();
    let v = read_labels(&p).unwrap();
    assert_eq!((v.header.version, v.dims.clone()), (NiftiVersion::V2, vec![2, 3, 3, 2]));
    assert_eq!(v.data, data.iter().map(|&d| d as u16).collect::<Vec<_>>());

    // Big-endian: every numeric header field swapped by `to_bytes`.
    let mut h = NiftiHeader::for_write(&[3], DataType::I16, &lps_f64(), Some((0.5, 10.0)), NiftiVersion::V2);
    h.big_endian = true;
    let mut bytes = h.to_bytes();
    assert_eq!(&bytes[0..4], &540i32.to_be_bytes());
    for v in [-5i16, 0, 300] {
        bytes.extend_from_slice(&v.to_be_bytes());
    }
    let p = dir.path().join("be2.nii");
    std::fs::write(&p, &bytes).unwrap();
    let v = read_f32(&p).unwrap();
    assert_eq!(v.header, h, "the parsed header is the one serialised");
    assert_eq!(v.data, vec![7.5, 10.0, 160.0]);
}

/// A valid little-endian NIfTI-2 header (with extension flag) for `dims`
/// of u8, to corrupt field by field.
fn v2_bytes(dims: &[usize]) -> Vec<u8> {
    NiftiHeader::for_write(dims, DataType::U8, &identity(), None, NiftiVersion::V2).to_bytes()
}

#[test]
fn nifti2_bad_inputs_give_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let with_voxels = |mut h: Vec<u8>, n: usize| {
        h.extend(std::iter::repeat_n(1u8, n));
        h
    };

    // Truncated 540-byte header: not misread as the 348-byte NIfTI-1 one.
    let full = with_voxels(v2_bytes(&[2, 2]), 4);
    for cut in [100, 348, 400, 539] {
        let e = err_of(d, &format!("cut{cut}.nii"), &full[..cut]);
        assert!(e.contains(&format!("truncated NIfTI-2 header: expected 540 bytes, found {cut}")), "{e}");
    }
    // The same inside a gzip stream.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
    enc.write_all(&full[..400]).unwrap();
    let e = err_of(d, "cut400.nii.gz", &enc.finish().unwrap());
    assert!(e.contains("truncated NIfTI-2 header"), "{e}");

    // vox_offset beyond the end of the file.
    let mut b = with_voxels(v2_bytes(&[2, 2]), 4);
    b[168..176].copy_from_slice(&10_000i64.to_le_bytes());
    let e = err_of(d, "far.nii", &b);
    assert!(e.contains("at offset 10000 need a 10004-byte file, but it has 548 bytes"), "{e}");
    // ... and in a gzip file, where the size is only known at the end.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
    enc.write_all(&b).unwrap();
    let e = err_of(d, "far.nii.gz", &enc.finish().unwrap());
    assert!(e.contains("header extensions before vox_offset"), "{e}");

    // vox_offset negative, inside the header, or absurd.
    for (v, want) in [(-1i64, "-1: must be non-negative"), (352, "offset ≥ 544"), (1 << 40, "byte limit")] {
        let mut b = with_voxels(v2_bytes(&[2, 2]), 4);
        b[168..176].copy_from_slice(&v.to_le_bytes());
        let e = err_of(d, "off.nii", &b);
        assert!(e.contains("`vox_offset`") && e.contains(want), "{e}");
    }

    // Absurd 64-bit dims: rejected by field before anything is allocated.
    let mut b = v2_bytes(&[2, 2]);
    b[24..32].copy_from_slice(&(1i64 << 40).to_le_bytes());
    let e = err_of(d, "hugedim.nii", &b);
    assert!(e.contains("`dim[1]`") && e.contains("1099511627776") && e.contains("1..=32767"), "{e}");
    let mut b = v2_bytes(&[2, 2]);
    b[32..40].copy_from_slice(&(-3i64).to_le_bytes());
    assert!(err_of(d, "negdim.nii", &b).contains("`dim[2]`"));
    let mut b = v2_bytes(&[2]);
    b[16..24].copy_from_slice(&(1i64 << 33).to_le_bytes());
    assert!(err_of(d, "ndim.nii", &b).contains("`dim[0]`: 8589934592"));
    // Each dim within MAX_DIM, but the product beyond MAX_DATA_BYTES (and
    // beyond u64 if multiplied naively: 32767^7 × 8).
    let e = err_of(d, "huge.nii", &v2_bytes(&[MAX_DIM; 7]));
    assert!(e.contains("`dim`") && e.contains("limit"), "{e}");

    // Datatype read from the NIfTI-2 offset (12), not NIfTI-1's (70).
    let mut b = v2_bytes(&[1]);
    b[12..14].copy_from_slice(&128i16.to_le_bytes());
    assert!(err_of(d, "rgb2.nii", &b).contains("rgb24"));

    // Magic: a header/image pair, a mangled line-ending check, garbage.
    let mut b = with_voxels(v2_bytes(&[1]), 1);
    b[4..8].copy_from_slice(b"ni2\0");
    assert!(err_of(d, "pair.nii", &b).contains(".hdr/.img pair"));
    let mut b = with_voxels(v2_bytes(&[1]), 1);
    b[8..12].copy_from_slice(b"\n\x1a\n\0");
    let e = err_of(d, "eol.nii", &b);
    assert!(e.contains("`magic`") && e.contains("text-mode transfer"), "{e}");
    let mut b = with_voxels(v2_bytes(&[1]), 1);
    b[4..8].copy_from_slice(b"n+1\0");
    let e = err_of(d, "magic2.nii", &b);
    assert!(e.contains("not a NIfTI-1 or NIfTI-2 file") && e.contains("NIfTI-2"), "{e}");

    // An all-zero line-ending check is accepted (nibabel does too).
    let mut b = with_voxels(v2_bytes(&[1]), 1);
    b[8..12].fill(0);
    let p = d.join("eol0.nii");
    std::fs::write(&p, &b).unwrap();
    assert_eq!(read_f32(&p).unwrap().data, vec![1.0]);
}

#[test]
fn unknown_sizeof_hdr_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut junk = vec![0u8; 600];
    junk[0..4].copy_from_slice(&541i32.to_le_bytes());
    let e = err_of(dir.path(), "j.nii", &junk);
    assert!(e.contains("not a NIfTI-1 or NIfTI-2 file") && e.contains("348 for NIfTI-1 or 540 for NIfTI-2"), "{e}");
}
