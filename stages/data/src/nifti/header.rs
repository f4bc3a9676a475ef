//! The NIfTI-1 (348-byte) and NIfTI-2 (540-byte) headers: parsing with
//! sanity limits, serialising, and the voxel → world affine (sform, else
//! qform, else pixdim).
//!
//! Both layouts are read into one [`NiftiHeader`] holding the wider NIfTI-2
//! field types (i64 dims, f64 pixdim/scaling/quatern/srow, i32 codes); the
//! NIfTI-1 values widen exactly, so results for NIfTI-1 files are unchanged.
//! Only the byte offsets differ between the versions (`Stored::v1` /
//! `Stored::v2`): validation, limits and the affine are one code path.

use std::path::Path;

use super::affine::{affine_to_quatern, identity, quatern_to_affine};
use super::error::NiftiError;

/// Size of the NIfTI-1 header proper.
pub const HEADER_SIZE: usize = 348;
/// Size of the NIfTI-2 header proper.
pub const HEADER_SIZE_2: usize = 540;
/// Largest accepted size of one dimension (CT volumes are ≤ ~2000). Applies
/// to NIfTI-2's 64-bit dims too: the format allows more, but nothing this
/// pipeline reads is larger, and the limit keeps lying headers cheap.
pub const MAX_DIM: usize = 32_767;
/// Largest accepted voxel payload (guards allocations against lying headers).
pub const MAX_DATA_BYTES: u64 = 32 << 30;
/// Largest accepted `vox_offset` (extensions bigger than this are not CT).
pub const MAX_VOX_OFFSET: u64 = 64 << 20;

/// Which NIfTI header layout a file uses (serialised as 1 or 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(into = "u8")]
pub enum NiftiVersion {
    /// 348-byte header, 16-bit dims, f32 fields, magic `n+1\0`.
    #[default]
    V1,
    /// 540-byte header, 64-bit dims, f64 fields, magic `n+2\0\r\n\x1a\n`.
    V2,
}

impl NiftiVersion {
    pub fn number(self) -> u8 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// Bytes of the header proper (the value of `sizeof_hdr`).
    pub fn header_size(self) -> usize {
        match self {
            Self::V1 => HEADER_SIZE,
            Self::V2 => HEADER_SIZE_2,
        }
    }

    /// Header plus the 4-byte extension flag: where voxel data starts at
    /// the earliest in a single-file image.
    pub fn min_vox_offset(self) -> u64 {
        self.header_size() as u64 + 4
    }

    /// The magic of a single-file image, as stored.
    fn magic(self) -> &'static [u8] {
        match self {
            Self::V1 => b"n+1\0",
            Self::V2 => b"n+2\0\r\n\x1a\n",
        }
    }

    /// The |w²| below which the qform quaternion's `a` is taken as 0: three
    /// epsilons of the precision the fields are stored in, as nibabel's
    /// `quaternion_threshold` (float32 for NIfTI-1, float64 for NIfTI-2).
    fn quaternion_threshold(self) -> f64 {
        match self {
            Self::V1 => 3.0 * f32::EPSILON as f64,
            Self::V2 => 3.0 * f64::EPSILON,
        }
    }
}

impl From<NiftiVersion> for u8 {
    fn from(v: NiftiVersion) -> u8 {
        v.number()
    }
}

impl std::fmt::Display for NiftiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NIfTI-{}", self.number())
    }
}

/// The version and byte order announced by `sizeof_hdr` (348 or 540, read
/// little- or big-endian), from a file's first 4 bytes; `None` if neither.
pub fn sniff(first4: &[u8]) -> Option<(NiftiVersion, bool)> {
    let b: [u8; 4] = first4.get(..4)?.try_into().ok()?;
    match (i32::from_le_bytes(b), i32::from_be_bytes(b)) {
        (348, _) => Some((NiftiVersion::V1, false)),
        (_, 348) => Some((NiftiVersion::V1, true)),
        (540, _) => Some((NiftiVersion::V2, false)),
        (_, 540) => Some((NiftiVersion::V2, true)),
        _ => None,
    }
}
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
        _ => "not a NIfTI datatype",
    }
}

/// A parsed NIfTI-1 or NIfTI-2 header. Fields have the NIfTI-2 widths; a
/// NIfTI-1 file's f32/i16 values are widened exactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NiftiHeader {
    /// NIfTI-1 or NIfTI-2 layout (from `sizeof_hdr`).
    pub version: NiftiVersion,
    /// `dim[1..=dim[0]]`.
    pub dims: Vec<usize>,
    pub datatype: DataType,
    pub bitpix: i16,
    /// Voxel sizes `pixdim[1..=dim[0]]` (nibabel's `zooms`).
    pub pixdim: Vec<f64>,
    /// `pixdim[0]`: the qform handedness (−1 or 1; 0 is read as 1).
    pub qfac: f64,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub qform_code: i32,
    pub sform_code: i32,
    pub quatern: [f64; 3],
    pub qoffset: [f64; 3],
    pub srow: [[f64; 4]; 3],
    /// Voxel → RAS+ mm: sform if `sform_code > 0`, else qform if
    /// `qform_code > 0`, else `diag(pixdim)` with zero origin (NIfTI "method
    /// 1"; nibabel would centre and x-flip an Analyze-style header instead).
    pub affine: [[f64; 4]; 4],
    pub vox_offset: u64,
    pub xyzt_units: i32,
    pub intent_code: i32,
    pub cal_min: f64,
    pub cal_max: f64,
    pub descrip: String,
    /// The file stores numbers big-endian (detected from `sizeof_hdr`).
    pub big_endian: bool,
}

/// `vox_offset` as stored: NIfTI-1 keeps it in a float, NIfTI-2 in an i64.
enum StoredOffset {
    F32(f32),
    I64(i64),
}

/// The header fields as stored, widened to NIfTI-2 types but not yet
/// validated: the only version-specific step of parsing.
struct Stored {
    ndim: i64,
    dim: [i64; 7],
    datatype: i16,
    bitpix: i16,
    /// `pixdim[0..8]` (`[0]` is qfac).
    pixdim: [f64; 8],
    vox_offset: StoredOffset,
    scl_slope: f64,
    scl_inter: f64,
    cal_max: f64,
    cal_min: f64,
    qform_code: i32,
    sform_code: i32,
    quatern: [f64; 3],
    qoffset: [f64; 3],
    srow: [[f64; 4]; 3],
    xyzt_units: i32,
    intent_code: i32,
    /// The raw 80-byte `descrip` field.
    descrip: [u8; 80],
}

impl Stored {
    /// NIfTI-1 offsets (nifti1.h).
    fn v1(r: &Fields) -> Self {
        Self {
            ndim: r.i16(40) as i64,
            dim: std::array::from_fn(|i| r.i16(42 + 2 * i) as i64),
            datatype: r.i16(70),
            bitpix: r.i16(72),
            pixdim: std::array::from_fn(|i| r.f32(76 + 4 * i) as f64),
            vox_offset: StoredOffset::F32(r.f32(108)),
            scl_slope: r.f32(112) as f64,
            scl_inter: r.f32(116) as f64,
            cal_max: r.f32(124) as f64,
            cal_min: r.f32(128) as f64,
            qform_code: r.i16(252) as i32,
            sform_code: r.i16(254) as i32,
            quatern: std::array::from_fn(|i| r.f32(256 + 4 * i) as f64),
            qoffset: std::array::from_fn(|i| r.f32(268 + 4 * i) as f64),
            srow: std::array::from_fn(|row| std::array::from_fn(|j| r.f32(280 + 16 * row + 4 * j) as f64)),
            xyzt_units: r.bytes[123] as i32,
            intent_code: r.i16(68) as i32,
            descrip: r.array(148),
        }
    }

    /// NIfTI-2 offsets (nifti2.h).
    fn v2(r: &Fields) -> Self {
        Self {
            ndim: r.i64(16),
            dim: std::array::from_fn(|i| r.i64(24 + 8 * i)),
            datatype: r.i16(12),
            bitpix: r.i16(14),
            pixdim: std::array::from_fn(|i| r.f64(104 + 8 * i)),
            vox_offset: StoredOffset::I64(r.i64(168)),
            scl_slope: r.f64(176),
            scl_inter: r.f64(184),
            cal_max: r.f64(192),
            cal_min: r.f64(200),
            qform_code: r.i32(344),
            sform_code: r.i32(348),
            quatern: std::array::from_fn(|i| r.f64(352 + 8 * i)),
            qoffset: std::array::from_fn(|i| r.f64(376 + 8 * i)),
            srow: std::array::from_fn(|row| std::array::from_fn(|j| r.f64(400 + 32 * row + 8 * j))),
            xyzt_units: r.i32(500),
            intent_code: r.i32(504),
            descrip: r.array(240),
        }
    }
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
    pub fn scaling(&self) -> (f64, f64) {
        if self.scl_slope.is_finite() && self.scl_slope != 0.0 {
            let inter = if self.scl_inter.is_finite() { self.scl_inter } else { 0.0 };
            (self.scl_slope, inter)
        } else {
            (1.0, 0.0)
        }
    }

    /// Parse a header from the start of a file: `bytes` holds at least
    /// `sizeof_hdr` bytes (348 or 540; more are ignored). `path` only names
    /// the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, NiftiError> {
        let bad =
            |field: &str, msg: String| NiftiError::Header { path: path.to_path_buf(), field: field.to_string(), msg };
        let truncated = |what: &str, expected: usize| NiftiError::Truncated {
            path: path.to_path_buf(),
            what: what.to_string(),
            expected: expected as u64,
            got: bytes.len() as u64,
        };
        let Some((version, big_endian)) = sniff(bytes) else {
            // Too short to tell, or not a NIfTI `sizeof_hdr`.
            if bytes.len() < HEADER_SIZE {
                return Err(truncated("header", HEADER_SIZE));
            }
            let le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            return Err(NiftiError::NotNifti {
                path: path.to_path_buf(),
                msg: format!("sizeof_hdr is {le} (expected 348 for NIfTI-1 or 540 for NIfTI-2); is this a NIfTI file?"),
            });
        };
        let size = version.header_size();
        if bytes.len() < size {
            return Err(truncated(&format!("{version} header"), size));
        }
        let bytes = &bytes[..size];
        check_magic(version, bytes, path)?;
        let r = Fields { bytes, big_endian };
        let stored = match version {
            NiftiVersion::V1 => Stored::v1(&r),
            NiftiVersion::V2 => Stored::v2(&r),
        };

        let ndim = stored.ndim;
        if !(1..=7).contains(&ndim) {
            return Err(bad("dim[0]", format!("{ndim}: the number of dimensions must be 1..=7")));
        }
        let ndim = ndim as usize;
        let mut dims = Vec::with_capacity(ndim);
        for (i, &d) in stored.dim.iter().enumerate().take(ndim) {
            if d < 1 || d > MAX_DIM as i64 {
                return Err(bad(&format!("dim[{}]", i + 1), format!("{d}: each dimension must be in 1..={MAX_DIM}")));
            }
            dims.push(d as usize);
        }

        let code = stored.datatype;
        let datatype = DataType::from_code(code)
            .ok_or_else(|| bad("datatype", format!("{code} ({}) is not supported", unsupported_datatype_name(code))))?;
        let bitpix = stored.bitpix;
        if bitpix as usize != datatype.size() * 8 {
            tracing::warn!(
                path = %path.display(),
                bitpix,
                datatype = datatype.name(),
                "bitpix disagrees with datatype; trusting datatype"
            );
        }

        // Saturating: the dims are bounded, but 7 of them can still overflow.
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

        let vox_offset = match stored.vox_offset {
            StoredOffset::F32(v) => {
                if !v.is_finite() || v < 0.0 || v.fract() != 0.0 {
                    return Err(bad("vox_offset", format!("{v}: must be a non-negative whole number")));
                }
                if v > MAX_VOX_OFFSET as f32 {
                    return Err(bad("vox_offset", format!("{v}: larger than the {MAX_VOX_OFFSET}-byte limit")));
                }
                v as u64
            }
            StoredOffset::I64(v) => {
                if v < 0 {
                    return Err(bad("vox_offset", format!("{v}: must be non-negative")));
                }
                v as u64
            }
        };
        let min_vox_offset = version.min_vox_offset();
        if vox_offset < min_vox_offset {
            return Err(bad(
                "vox_offset",
                format!("{vox_offset}: a single-file {version} image stores voxels at offset ≥ {min_vox_offset}"),
            ));
        }
        if vox_offset > MAX_VOX_OFFSET {
            return Err(bad("vox_offset", format!("{vox_offset}: larger than the {MAX_VOX_OFFSET}-byte limit")));
        }

        let pixdim: Vec<f64> = stored.pixdim[1..=ndim].to_vec();
        let qfac = if stored.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let (quatern, qoffset, srow) = (stored.quatern, stored.qoffset, stored.srow);
        let (qform_code, sform_code) = (stored.qform_code, stored.sform_code);
        let zooms3 = [0, 1, 2].map(|i| pixdim.get(i).copied().unwrap_or(1.0));

        let affine = if sform_code > 0 {
            let mut a = identity();
            a[..3].copy_from_slice(&srow);
            a
        } else if qform_code > 0 {
            quatern_to_affine(quatern, qoffset, zooms3, qfac, version.quaternion_threshold())
        } else {
            let mut a = identity();
            for i in 0..3 {
                a[i][i] = if zooms3[i] == 0.0 { 1.0 } else { zooms3[i] };
            }
            a
        };
        if affine.iter().flatten().any(|v| !v.is_finite()) {
            let src = if sform_code > 0 { "srow_x/y/z (sform)" } else { "quatern/qoffset/pixdim (qform)" };
            return Err(bad(src, "the affine has non-finite entries".into()));
        }

        let end = stored.descrip.iter().position(|&b| b == 0).unwrap_or(stored.descrip.len());
        let descrip = String::from_utf8_lossy(&stored.descrip[..end]).into_owned();

        Ok(Self {
            version,
            dims,
            datatype,
            bitpix,
            pixdim,
            qfac,
            scl_slope: stored.scl_slope,
            scl_inter: stored.scl_inter,
            qform_code,
            sform_code,
            quatern,
            qoffset,
            srow,
            affine,
            vox_offset,
            xyzt_units: stored.xyzt_units,
            intent_code: stored.intent_code,
            cal_max: stored.cal_max,
            cal_min: stored.cal_min,
            descrip,
            big_endian,
        })
    }

    /// Build a little-endian `version` header for `dims` of `datatype` with
    /// `affine` stored as sform and (its nearest rigid part) as qform, both
    /// code 2 ("aligned"), voxel data right after the header. Float fields
    /// hold what the file will hold (f32-rounded for NIfTI-1), so the
    /// header equals what reading the written file gives.
    pub fn for_write(
        dims: &[usize],
        datatype: DataType,
        affine: &[[f64; 4]; 4],
        scl: Option<(f64, f64)>,
        version: NiftiVersion,
    ) -> Self {
        let stored = |v: f64| match version {
            NiftiVersion::V1 => v as f32 as f64,
            NiftiVersion::V2 => v,
        };
        let (zooms, quatern, qoffset, qfac) = affine_to_quatern(affine);
        let mut pixdim: Vec<f64> = dims.iter().map(|_| 1.0).collect();
        for (i, z) in zooms.iter().enumerate().take(pixdim.len()) {
            pixdim[i] = stored(*z);
        }
        let srow = [0, 1, 2].map(|i| [0, 1, 2, 3].map(|j| stored(affine[i][j])));
        let mut stored_affine = identity();
        stored_affine[..3].copy_from_slice(&srow);
        let (scl_slope, scl_inter) = scl.unwrap_or((1.0, 0.0));
        Self {
            version,
            dims: dims.to_vec(),
            datatype,
            bitpix: (datatype.size() * 8) as i16,
            pixdim,
            qfac,
            scl_slope: stored(scl_slope),
            scl_inter: stored(scl_inter),
            qform_code: 2,
            sform_code: 2,
            quatern: quatern.map(stored),
            qoffset: qoffset.map(stored),
            srow,
            affine: stored_affine,
            vox_offset: version.min_vox_offset(),
            xyzt_units: 2 | 8, // mm, s
            intent_code: 0,
            cal_min: 0.0,
            cal_max: 0.0,
            descrip: String::new(),
            big_endian: false,
        }
    }

    /// Serialise in `self.version`'s layout and byte order: the header plus
    /// the 4-byte empty extension flag (`version.min_vox_offset()` bytes).
    /// Values a NIfTI-1 field cannot hold are saturated (i16) or rounded
    /// (f32); [`Self::for_write`] only produces values that fit.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut o = Out { b: vec![0u8; self.version.min_vox_offset() as usize], big_endian: self.big_endian };
        let pixdim = |i: usize| self.pixdim.get(i).copied().unwrap_or(1.0);
        let dim = |i: usize| self.dims.get(i).map_or(1, |&d| d as i64);
        let descrip = &self.descrip.as_bytes()[..self.descrip.len().min(79)];
        match self.version {
            NiftiVersion::V1 => {
                let i16_ = |v: i64| v.clamp(i16::MIN as i64, i16::MAX as i64) as i16;
                o.put(0, 348i32.to_le_bytes());
                o.b[38] = b'r';
                o.put(40, (self.dims.len() as i16).to_le_bytes());
                for i in 0..7 {
                    o.put(42 + 2 * i, i16_(dim(i)).to_le_bytes());
                }
                o.put(68, i16_(self.intent_code as i64).to_le_bytes());
                o.put(70, self.datatype.code().to_le_bytes());
                o.put(72, self.bitpix.to_le_bytes());
                o.put(76, (self.qfac as f32).to_le_bytes());
                for i in 0..7 {
                    o.put(80 + 4 * i, (pixdim(i) as f32).to_le_bytes());
                }
                o.put(108, (self.vox_offset as f32).to_le_bytes());
                o.put(112, (self.scl_slope as f32).to_le_bytes());
                o.put(116, (self.scl_inter as f32).to_le_bytes());
                o.b[123] = self.xyzt_units.clamp(0, 255) as u8;
                o.put(124, (self.cal_max as f32).to_le_bytes());
                o.put(128, (self.cal_min as f32).to_le_bytes());
                o.raw(148, descrip);
                o.put(252, i16_(self.qform_code as i64).to_le_bytes());
                o.put(254, i16_(self.sform_code as i64).to_le_bytes());
                for i in 0..3 {
                    o.put(256 + 4 * i, (self.quatern[i] as f32).to_le_bytes());
                    o.put(268 + 4 * i, (self.qoffset[i] as f32).to_le_bytes());
                }
                for (r, row) in self.srow.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        o.put(280 + 16 * r + 4 * j, (*v as f32).to_le_bytes());
                    }
                }
            }
            NiftiVersion::V2 => {
                o.put(0, 540i32.to_le_bytes());
                o.put(12, self.datatype.code().to_le_bytes());
                o.put(14, self.bitpix.to_le_bytes());
                o.put(16, (self.dims.len() as i64).to_le_bytes());
                for i in 0..7 {
                    o.put(24 + 8 * i, dim(i).to_le_bytes());
                }
                o.put(104, self.qfac.to_le_bytes());
                for i in 0..7 {
                    o.put(112 + 8 * i, pixdim(i).to_le_bytes());
                }
                o.put(168, (self.vox_offset as i64).to_le_bytes());
                o.put(176, self.scl_slope.to_le_bytes());
                o.put(184, self.scl_inter.to_le_bytes());
                o.put(192, self.cal_max.to_le_bytes());
                o.put(200, self.cal_min.to_le_bytes());
                o.raw(240, descrip);
                o.put(344, self.qform_code.to_le_bytes());
                o.put(348, self.sform_code.to_le_bytes());
                for i in 0..3 {
                    o.put(352 + 8 * i, self.quatern[i].to_le_bytes());
                    o.put(376 + 8 * i, self.qoffset[i].to_le_bytes());
                }
                for (r, row) in self.srow.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        o.put(400 + 32 * r + 8 * j, v.to_le_bytes());
                    }
                }
                o.put(500, self.xyzt_units.to_le_bytes());
                o.put(504, self.intent_code.to_le_bytes());
            }
        }
        // Byte strings, not numbers: stored the same in either byte order.
        let magic = self.version.magic();
        let at = match self.version {
            NiftiVersion::V1 => 344,
            NiftiVersion::V2 => 4,
        };
        o.raw(at, magic);
        o.b
    }
}

/// The magic of a `version` header: single-file only, with NIfTI-2's
/// `\r\n\x1a\n` line-ending check intact (an all-zero check is accepted, as
/// nibabel does: some writers leave it empty).
fn check_magic(version: NiftiVersion, bytes: &[u8], path: &Path) -> Result<(), NiftiError> {
    let bad = |msg: String| NiftiError::Header { path: path.to_path_buf(), field: "magic".into(), msg };
    let (at, pair) = match version {
        NiftiVersion::V1 => (344, b"ni1\0"),
        NiftiVersion::V2 => (4, b"ni2\0"),
    };
    let magic = &bytes[at..at + 4];
    if magic == pair {
        let pair = String::from_utf8_lossy(&pair[..3]);
        return Err(bad(format!(
            "`{pair}`: a .hdr/.img pair; only single-file NIfTI-1 and NIfTI-2 (`n+1`, `n+2`; .nii/.nii.gz) are supported"
        )));
    }
    if magic != &version.magic()[..4] {
        return Err(NiftiError::NotNifti {
            path: path.to_path_buf(),
            msg: format!(
                "sizeof_hdr says {version} but the magic is {magic:?} (expected {:?}); Analyze 7.5 files are not supported",
                &version.magic()[..4]
            ),
        });
    }
    if version == NiftiVersion::V2 {
        let eol = &bytes[8..12];
        if eol != b"\r\n\x1a\n" && eol != [0; 4] {
            return Err(bad(format!(
                "line-ending check bytes are {eol:?} (expected [13, 10, 26, 10]): the file was altered by a text-mode transfer"
            )));
        }
    }
    Ok(())
}

/// Endian-aware field access on the raw header bytes (whose length the
/// caller has checked against the version's header size).
struct Fields<'a> {
    bytes: &'a [u8],
    big_endian: bool,
}

impl Fields<'_> {
    /// `N` bytes at `off`, in little-endian order.
    fn le<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut b = self.array::<N>(off);
        if self.big_endian {
            b.reverse();
        }
        b
    }
    fn array<const N: usize>(&self, off: usize) -> [u8; N] {
        std::array::from_fn(|i| self.bytes[off + i])
    }
    fn i16(&self, off: usize) -> i16 {
        i16::from_le_bytes(self.le(off))
    }
    fn i32(&self, off: usize) -> i32 {
        i32::from_le_bytes(self.le(off))
    }
    fn i64(&self, off: usize) -> i64 {
        i64::from_le_bytes(self.le(off))
    }
    fn f32(&self, off: usize) -> f32 {
        f32::from_le_bytes(self.le(off))
    }
    fn f64(&self, off: usize) -> f64 {
        f64::from_le_bytes(self.le(off))
    }
}

/// Header bytes being serialised; numbers are given little-endian and
/// swapped when writing a big-endian header.
struct Out {
    b: Vec<u8>,
    big_endian: bool,
}

impl Out {
    fn put<const N: usize>(&mut self, off: usize, mut le: [u8; N]) {
        if self.big_endian {
            le.reverse();
        }
        self.b[off..off + N].copy_from_slice(&le);
    }
    fn raw(&mut self, off: usize, v: &[u8]) {
        self.b[off..off + v.len()].copy_from_slice(v);
    }
}
