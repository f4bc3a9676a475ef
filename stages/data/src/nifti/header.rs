//! The 348-byte NIfTI-1 header: parsing with sanity limits, serialising,
//! and the voxel → world affine (sform, else qform, else pixdim).

use std::path::Path;

use super::NiftiError;

/// Size of the NIfTI-1 header proper.
pub const HEADER_SIZE: usize = 348;
/// Header plus the 4-byte extension flag: where voxel data starts at the
/// earliest in a single-file (`n+1`) image.
pub const MIN_VOX_OFFSET: u64 = 352;
/// Largest accepted size of one dimension (CT volumes are ≤ ~2000).
pub const MAX_DIM: usize = 32_767;
/// Largest accepted voxel payload (guards allocations against lying headers).
pub const MAX_DATA_BYTES: u64 = 32 << 30;
/// Largest accepted `vox_offset` (extensions bigger than this are not CT).
pub const MAX_VOX_OFFSET: u64 = 64 << 20;

/// Voxel datatypes this reader supports (the NIfTI-1 codes in `code()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl DataType {
    pub fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            4 => Self::I16,
            8 => Self::I32,
            16 => Self::F32,
            64 => Self::F64,
            256 => Self::I8,
            512 => Self::U16,
            768 => Self::U32,
            1024 => Self::I64,
            1280 => Self::U64,
            _ => return None,
        })
    }

    pub fn code(self) -> i16 {
        match self {
            Self::U8 => 2,
            Self::I16 => 4,
            Self::I32 => 8,
            Self::F32 => 16,
            Self::F64 => 64,
            Self::I8 => 256,
            Self::U16 => 512,
            Self::U32 => 768,
            Self::I64 => 1024,
            Self::U64 => 1280,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64)
    }

    /// Name as nibabel prints it (`int16`, `float32`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "uint8",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::U16 => "uint16",
            Self::I32 => "int32",
            Self::U32 => "uint32",
            Self::I64 => "int64",
            Self::U64 => "uint64",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }
}

/// Human name of a datatype code we do not support, for error messages.
fn unsupported_datatype_name(code: i16) -> &'static str {
    match code {
        0 => "unknown (0)",
        1 => "binary",
        32 => "complex64",
        128 => "rgb24",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "rgba32",
        _ => "not a NIfTI-1 datatype",
    }
}

/// A parsed NIfTI-1 header.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NiftiHeader {
    /// `dim[1..=dim[0]]`.
    pub dims: Vec<usize>,
    pub datatype: DataType,
    pub bitpix: i16,
    /// Voxel sizes `pixdim[1..=dim[0]]` (nibabel's `zooms`).
    pub pixdim: Vec<f32>,
    /// `pixdim[0]`: the qform handedness (−1 or 1; 0 is read as 1).
    pub qfac: f32,
    pub scl_slope: f32,
    pub scl_inter: f32,
    pub qform_code: i16,
    pub sform_code: i16,
    pub quatern: [f32; 3],
    pub qoffset: [f32; 3],
    pub srow: [[f32; 4]; 3],
    /// Voxel → RAS+ mm: sform if `sform_code > 0`, else qform if
    /// `qform_code > 0`, else `diag(pixdim)` with zero origin (NIfTI "method
    /// 1"; nibabel would centre and x-flip an Analyze-style header instead).
    pub affine: [[f64; 4]; 4],
    pub vox_offset: u64,
    pub xyzt_units: u8,
    pub intent_code: i16,
    pub cal_min: f32,
    pub cal_max: f32,
    pub descrip: String,
    /// The file stores numbers big-endian (detected from `sizeof_hdr`).
    pub big_endian: bool,
}

impl NiftiHeader {
    pub fn num_voxels(&self) -> u64 {
        self.dims.iter().map(|&d| d as u64).product()
    }

    pub fn data_bytes(&self) -> u64 {
        self.num_voxels() * self.datatype.size() as u64
    }

    /// Whether scl_slope/scl_inter change values (slope 0 or NaN = no
    /// scaling, as the standard says).
    pub fn has_scaling(&self) -> bool {
        let slope_active = self.scl_slope.is_finite() && self.scl_slope != 0.0;
        slope_active && (self.scl_slope != 1.0 || (self.scl_inter.is_finite() && self.scl_inter != 0.0))
    }

    /// The effective (slope, intercept) applied to stored values.
    pub fn scaling(&self) -> (f32, f32) {
        if self.scl_slope.is_finite() && self.scl_slope != 0.0 {
            let inter = if self.scl_inter.is_finite() { self.scl_inter } else { 0.0 };
            (self.scl_slope, inter)
        } else {
            (1.0, 0.0)
        }
    }

    /// Parse the first [`HEADER_SIZE`] bytes of a file. `path` only names
    /// the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, NiftiError> {
        let bad =
            |field: &str, msg: String| NiftiError::Header { path: path.to_path_buf(), field: field.to_string(), msg };
        if bytes.len() < HEADER_SIZE {
            return Err(NiftiError::Truncated {
                path: path.to_path_buf(),
                what: "header".into(),
                expected: HEADER_SIZE as u64,
                got: bytes.len() as u64,
            });
        }
        let le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let be = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let big_endian = match (le, be) {
            (348, _) => false,
            (_, 348) => true,
            (540, _) | (_, 540) => {
                return Err(bad("sizeof_hdr", "540: this is a NIfTI-2 file; only NIfTI-1 is supported".into()));
            }
            _ => {
                return Err(NiftiError::NotNifti {
                    path: path.to_path_buf(),
                    msg: format!("sizeof_hdr is {le} (expected 348); is this a NIfTI file?"),
                });
            }
        };
        let r = Fields { bytes, big_endian };

        let magic = &bytes[344..348];
        match magic {
            b"n+1\0" => {}
            b"ni1\0" => {
                return Err(bad(
                    "magic",
                    "`ni1`: a .hdr/.img pair; only single-file NIfTI-1 (`n+1`, .nii/.nii.gz) is supported".into(),
                ));
            }
            other => {
                return Err(NiftiError::NotNifti {
                    path: path.to_path_buf(),
                    msg: format!("magic is {:?} (expected \"n+1\\0\"); Analyze 7.5 files are not supported", other),
                });
            }
        }

        let ndim = r.i16(40);
        if !(1..=7).contains(&ndim) {
            return Err(bad("dim[0]", format!("{ndim}: the number of dimensions must be 1..=7")));
        }
        let ndim = ndim as usize;
        let mut dims = Vec::with_capacity(ndim);
        for i in 1..=ndim {
            let d = r.i16(40 + 2 * i);
            if d < 1 || d as usize > MAX_DIM {
                return Err(bad(&format!("dim[{i}]"), format!("{d}: each dimension must be in 1..={MAX_DIM}")));
            }
            dims.push(d as usize);
        }

        let code = r.i16(70);
        let datatype = DataType::from_code(code)
            .ok_or_else(|| bad("datatype", format!("{code} ({}) is not supported", unsupported_datatype_name(code))))?;
        let bitpix = r.i16(72);
        if bitpix as usize != datatype.size() * 8 {
            tracing::warn!(
                path = %path.display(),
                bitpix,
                datatype = datatype.name(),
                "bitpix disagrees with datatype; trusting datatype"
            );
        }

        let mut bytes_total: u64 = datatype.size() as u64;
        for &d in &dims {
            bytes_total = bytes_total.saturating_mul(d as u64);
        }
        if bytes_total > MAX_DATA_BYTES {
            return Err(bad(
                "dim",
                format!(
                    "{dims:?} × {} bytes = {bytes_total} bytes exceeds the {MAX_DATA_BYTES}-byte limit",
                    datatype.size()
                ),
            ));
        }

        let qfac_raw = r.f32(76);
        let pixdim: Vec<f32> = (1..=ndim).map(|i| r.f32(76 + 4 * i)).collect();
        let vox_offset_f = r.f32(108);
        if !vox_offset_f.is_finite() || vox_offset_f < 0.0 || vox_offset_f.fract() != 0.0 {
            return Err(bad("vox_offset", format!("{vox_offset_f}: must be a non-negative whole number")));
        }
        let vox_offset = vox_offset_f as u64;
        if vox_offset < MIN_VOX_OFFSET {
            return Err(bad(
                "vox_offset",
                format!("{vox_offset}: a single-file NIfTI stores voxels at offset ≥ {MIN_VOX_OFFSET}"),
            ));
        }
        if vox_offset > MAX_VOX_OFFSET {
            return Err(bad("vox_offset", format!("{vox_offset}: larger than the {MAX_VOX_OFFSET}-byte limit")));
        }

        let quatern = [r.f32(256), r.f32(260), r.f32(264)];
        let qoffset = [r.f32(268), r.f32(272), r.f32(276)];
        let srow = [
            [r.f32(280), r.f32(284), r.f32(288), r.f32(292)],
            [r.f32(296), r.f32(300), r.f32(304), r.f32(308)],
            [r.f32(312), r.f32(316), r.f32(320), r.f32(324)],
        ];
        let qform_code = r.i16(252);
        let sform_code = r.i16(254);
        let qfac = if qfac_raw < 0.0 { -1.0 } else { 1.0 };
        let zooms3 = [0, 1, 2].map(|i| pixdim.get(i).copied().unwrap_or(1.0));

        let affine = if sform_code > 0 {
            let mut a = identity();
            for (i, row) in srow.iter().enumerate() {
                for j in 0..4 {
                    a[i][j] = row[j] as f64;
                }
            }
            a
        } else if qform_code > 0 {
            quatern_to_affine(quatern, qoffset, zooms3, qfac)
        } else {
            let mut a = identity();
            for i in 0..3 {
                a[i][i] = if zooms3[i] == 0.0 { 1.0 } else { zooms3[i] as f64 };
            }
            a
        };
        if affine.iter().flatten().any(|v| !v.is_finite()) {
            let src = if sform_code > 0 { "srow_x/y/z (sform)" } else { "quatern/qoffset/pixdim (qform)" };
            return Err(bad(src, "the affine has non-finite entries".into()));
        }

        let descrip_raw = &bytes[148..228];
        let end = descrip_raw.iter().position(|&b| b == 0).unwrap_or(descrip_raw.len());
        let descrip = String::from_utf8_lossy(&descrip_raw[..end]).into_owned();

        Ok(Self {
            dims,
            datatype,
            bitpix,
            pixdim,
            qfac,
            scl_slope: r.f32(112),
            scl_inter: r.f32(116),
            qform_code,
            sform_code,
            quatern,
            qoffset,
            srow,
            affine,
            vox_offset,
            xyzt_units: bytes[123],
            intent_code: r.i16(68),
            cal_max: r.f32(124),
            cal_min: r.f32(128),
            descrip,
            big_endian,
        })
    }

    /// Build a little-endian header for `dims` of `datatype` with `affine`
    /// stored as sform and (its nearest rigid part) as qform, both code 2
    /// ("aligned"), voxel data at offset 352.
    pub fn for_write(dims: &[usize], datatype: DataType, affine: &[[f64; 4]; 4], scl: Option<(f32, f32)>) -> Self {
        let (zooms, quatern, qoffset, qfac) = affine_to_quatern(affine);
        let mut pixdim: Vec<f32> = dims.iter().map(|_| 1.0).collect();
        for (i, z) in zooms.iter().enumerate().take(pixdim.len()) {
            pixdim[i] = *z as f32;
        }
        let srow = [0, 1, 2].map(|i| [0, 1, 2, 3].map(|j| affine[i][j] as f32));
        let mut stored_affine = identity();
        for i in 0..3 {
            for j in 0..4 {
                stored_affine[i][j] = srow[i][j] as f64;
            }
        }
        let (scl_slope, scl_inter) = scl.unwrap_or((1.0, 0.0));
        Self {
            dims: dims.to_vec(),
            datatype,
            bitpix: (datatype.size() * 8) as i16,
            pixdim,
            qfac,
            scl_slope,
            scl_inter,
            qform_code: 2,
            sform_code: 2,
            quatern,
            qoffset,
            srow,
            affine: stored_affine,
            vox_offset: MIN_VOX_OFFSET,
            xyzt_units: 2 | 8, // mm, s
            intent_code: 0,
            cal_min: 0.0,
            cal_max: 0.0,
            descrip: String::new(),
            big_endian: false,
        }
    }

    /// Serialise as 348 little-endian bytes + the 4-byte empty extension flag.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; MIN_VOX_OFFSET as usize];
        let put = |b: &mut Vec<u8>, off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(&mut b, 0, &348i32.to_le_bytes());
        b[38] = b'r';
        put(&mut b, 40, &(self.dims.len() as i16).to_le_bytes());
        for (i, &d) in self.dims.iter().enumerate().take(7) {
            put(&mut b, 42 + 2 * i, &(d as i16).to_le_bytes());
        }
        for i in self.dims.len()..7 {
            put(&mut b, 42 + 2 * i, &1i16.to_le_bytes());
        }
        put(&mut b, 68, &self.intent_code.to_le_bytes());
        put(&mut b, 70, &self.datatype.code().to_le_bytes());
        put(&mut b, 72, &self.bitpix.to_le_bytes());
        put(&mut b, 76, &self.qfac.to_le_bytes());
        for i in 0..7 {
            let v = self.pixdim.get(i).copied().unwrap_or(1.0);
            put(&mut b, 80 + 4 * i, &v.to_le_bytes());
        }
        put(&mut b, 108, &(self.vox_offset as f32).to_le_bytes());
        put(&mut b, 112, &self.scl_slope.to_le_bytes());
        put(&mut b, 116, &self.scl_inter.to_le_bytes());
        b[123] = self.xyzt_units;
        put(&mut b, 124, &self.cal_max.to_le_bytes());
        put(&mut b, 128, &self.cal_min.to_le_bytes());
        let d = self.descrip.as_bytes();
        let n = d.len().min(79);
        put(&mut b, 148, &d[..n]);
        put(&mut b, 252, &self.qform_code.to_le_bytes());
        put(&mut b, 254, &self.sform_code.to_le_bytes());
        for i in 0..3 {
            put(&mut b, 256 + 4 * i, &self.quatern[i].to_le_bytes());
            put(&mut b, 268 + 4 * i, &self.qoffset[i].to_le_bytes());
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                put(&mut b, 280 + 16 * r + 4 * j, &v.to_le_bytes());
            }
        }
        put(&mut b, 344, b"n+1\0");
        b
    }
}

/// Endian-aware field access on the raw header bytes.
struct Fields<'a> {
    bytes: &'a [u8],
    big_endian: bool,
}

impl Fields<'_> {
    fn i16(&self, off: usize) -> i16 {
        let b = [self.bytes[off], self.bytes[off + 1]];
        if self.big_endian { i16::from_be_bytes(b) } else { i16::from_le_bytes(b) }
    }
    fn f32(&self, off: usize) -> f32 {
        let b = [self.bytes[off], self.bytes[off + 1], self.bytes[off + 2], self.bytes[off + 3]];
        if self.big_endian { f32::from_be_bytes(b) } else { f32::from_le_bytes(b) }
    }
}

pub fn identity() -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    a
}

/// The qform affine (NIfTI-1 "method 2"), computed in f64 like nibabel.
pub fn quatern_to_affine(q: [f32; 3], offset: [f32; 3], zooms: [f32; 3], qfac: f32) -> [[f64; 4]; 4] {
    let (mut b, mut c, mut d) = (q[0] as f64, q[1] as f64, q[2] as f64);
    let w2 = 1.0 - (b * b + c * c + d * d);
    // nibabel treats |w2| below float32 eps as 0 so that unit quaternions
    // stored in float32 do not produce NaN.
    let a = if w2 < -3.0 * f32::EPSILON as f64 {
        let n = (b * b + c * c + d * d).sqrt();
        b /= n;
        c /= n;
        d /= n;
        0.0
    } else if w2 < 3.0 * f32::EPSILON as f64 {
        0.0
    } else {
        w2.sqrt()
    };
    let r = [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ];
    let z = [zooms[0] as f64, zooms[1] as f64, zooms[2] as f64 * if qfac < 0.0 { -1.0 } else { 1.0 }];
    let mut out = identity();
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = r[i][j] * z[j];
        }
        out[i][3] = offset[i] as f64;
    }
    out
}

/// Decompose an affine into zooms, quaternion (b, c, d), offset and qfac for
/// the qform; the rotation is the nearest orthonormal matrix (polar
/// decomposition), so shears are dropped there (the sform keeps them).
pub fn affine_to_quatern(affine: &[[f64; 4]; 4]) -> ([f64; 3], [f32; 3], [f32; 3], f32) {
    let mut m = [[0.0f64; 3]; 3];
    let mut zooms = [1.0f64; 3];
    for j in 0..3 {
        let n = (0..3).map(|i| affine[i][j] * affine[i][j]).sum::<f64>().sqrt();
        zooms[j] = if n > 0.0 { n } else { 1.0 };
        for i in 0..3 {
            m[i][j] = if n > 0.0 {
                affine[i][j] / n
            } else if i == j {
                1.0
            } else {
                0.0
            };
        }
    }
    let mut r = super::orient::nearest_rotation(m);
    let mut qfac = 1.0f32;
    if det3(&r) < 0.0 {
        qfac = -1.0;
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    // Quaternion from a proper rotation (Shepperd's method, as in nifti1_io).
    let (xx, yy, zz) = (r[0][0], r[1][1], r[2][2]);
    let trace = xx + yy + zz + 1.0;
    let (mut a, mut b, mut c, mut d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + xx - (yy + zz);
        let yd = 1.0 + yy - (xx + zz);
        let zd = 1.0 + zz - (xx + yy);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
        if a < 0.0 {
            a = -a;
            b = -b;
            c = -c;
            d = -d;
        }
    }
    let _ = a;
    let offset = [affine[0][3] as f32, affine[1][3] as f32, affine[2][3] as f32];
    (zooms, [b as f32, c as f32, d as f32], offset, qfac)
}

pub fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}
