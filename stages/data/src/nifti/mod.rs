//! NIfTI-1 and NIfTI-2 reading and writing (`.nii`, `.nii.gz`),
//! orientation, and display-oriented axial slicing.
//!
//! # Why our own reader
//! The `nifti` crate (0.17) is a good general reader: it can stream a volume
//! slice by slice (`ReaderStreamedOptions`) and write gzip at a chosen
//! compression level. It does not fit this pipeline for other reasons:
//! - **Flat slices, not `ndarray`.** Its typed, scaled volume access is
//!   through `ndarray` arrays (or per-voxel getters); every stage here works
//!   on flat `Vec<T>` in NIfTI order, so each read would add a conversion
//!   and an `ndarray` dependency.
//! - **Header limits before allocation.** Every header field is checked
//!   (dims within [`MAX_DIM`], payload within [`MAX_DATA_BYTES`], `vox_offset`
//!   within the file, a gzip file's claimed size within what deflate can
//!   expand to) before a byte of voxel memory is allocated, so a lying or
//!   corrupt header is an error, not an out-of-memory abort.
//! - **Errors that name the file and the field** (`ct.nii.gz: invalid
//!   header field `dim[2]`: …`), with voxel coordinates for bad values.
//! - **Orientation and display slicing integrated**: the affine follows
//!   nibabel's rules (sform > qform > pixdim, qform computed in f64), and
//!   [`AxialSlicer`] turns it into the display convention the renderers use.
//! - **NIfTI-2**, which that crate does not read (its header type is the
//!   NIfTI-1 one; a 540-byte header is rejected as an invalid format).
//!
//! The format is a fixed header plus a raw array, so a focused reader is
//! small: it streams the gzip stream (flate2 with the fast `zlib-rs`
//! inflate) chunk by chunk straight into the typed output (peak memory is
//! the output plus one chunk), and both header versions parse into one
//! [`NiftiHeader`] so that everything after the header is one code path.
//!
//! # What is supported
//! Single-file NIfTI-1 (`n+1`, 348-byte header) and NIfTI-2 (`n+2`,
//! 540-byte header with 64-bit dims and f64 pixdim/scaling/affine fields),
//! told apart by `sizeof_hdr`; little or big endian (detected from
//! `sizeof_hdr` too), plain or gzip (detected by magic bytes), 1–7
//! dimensions, datatypes u8/i8/i16/u16/i32/u32/i64/u64/f32/f64,
//! `scl_slope`/`scl_inter` (slope 0 = no scaling), affine from sform (code >
//! 0), else qform, else pixdim. NIfTI-2 dims are held to the same
//! [`MAX_DIM`] and [`MAX_DATA_BYTES`] limits as NIfTI-1. The writer writes
//! little-endian NIfTI-1 by default, NIfTI-2 with [`WriteOptions::version`].
//! Not supported (clear error): `.hdr/.img` pairs (`ni1`/`ni2`), Analyze,
//! complex/RGB datatypes, CIFTI semantics (a CIFTI-2 file reads as the plain
//! NIfTI-2 array it is, if its dims fit the limits).
//!
//! The affine and orientation conventions are those of nibabel
//! ([`orientation`] mirrors `aff2axcodes`); see [`orient`] for the
//! display convention of [`AxialSlicer`].

mod affine;
mod error;
mod header;
pub mod orient;
mod read;
mod scalar;
mod write;

use std::path::Path;

pub use affine::identity;
pub use error::NiftiError;
pub use header::{
    DataType, HEADER_SIZE, HEADER_SIZE_2, MAX_DATA_BYTES, MAX_DIM, MAX_VOX_OFFSET, NiftiHeader, NiftiVersion,
};
pub use orient::{AxialSlicer, ChannelLayout, orientation};
pub(crate) use read::VoxelReader;
pub use scalar::NiftiScalar;
pub(crate) use scalar::{decode_chunk, dispatch_datatype};
pub use write::{WriteOptions, write, write_with};

/// A decoded volume: header, dims (= `header.dims`) and voxels in NIfTI
/// order (x fastest).
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    pub header: NiftiHeader,
    pub dims: Vec<usize>,
    pub data: Vec<T>,
}

impl<T> Volume<T> {
    /// The first three dims (1 where the volume has fewer).
    pub fn dims3(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.dims.get(i).copied().unwrap_or(1))
    }
}

/// Read and validate only the header (file size included for `.nii`).
pub fn read_header(path: &Path) -> Result<NiftiHeader, NiftiError> {
    Ok(VoxelReader::open(path)?.header)
}

/// Unravel a linear voxel index into coordinates, for error messages.
fn coords(dims: &[usize], mut i: u64) -> Vec<u64> {
    dims.iter()
        .map(|&d| {
            let c = i % d as u64;
            i /= d as u64;
            c
        })
        .collect()
}

/// Read as f32 with `scl_slope`/`scl_inter` applied (slope 0 = none, as the
/// standard says; the product is formed in f64 then rounded, like nibabel's
/// `get_fdata().astype(float32)`). NaN or infinite values are an error.
pub fn read_f32(path: &Path) -> Result<Volume<f32>, NiftiError> {
    let reader = VoxelReader::open(path)?;
    let header = reader.header.clone();
    let n = header.num_voxels() as usize;
    let mut data: Vec<f32> = Vec::with_capacity(n);
    let (slope, inter) = header.scaling();
    let scaled = header.has_scaling();
    let (dt, be) = (header.datatype, header.big_endian);
    reader.for_each_chunk(|bytes| {
        let start = data.len();
        dispatch_datatype!(dt, S => {
            if scaled {
                decode_chunk::<S>(bytes, be, |v| data.push((v.to_f64() * slope + inter) as f32));
            } else {
                decode_chunk::<S>(bytes, be, |v| data.push(v.to_f32()));
            }
        });
        if (dt.is_float() || scaled)
            && let Some(off) = data[start..].iter().position(|v| !v.is_finite())
        {
            let i = (start + off) as u64;
            return Err(NiftiError::Value {
                path: path.to_path_buf(),
                msg: format!(
                    "voxel {:?} (index {i}) is {} after scaling; CT intensities must be finite",
                    coords(&header.dims, i),
                    data[start + off]
                ),
            });
        }
        Ok(())
    })?;
    Ok(Volume { dims: header.dims.clone(), header, data })
}

/// Read an integer label volume (masks) as u16, with no scaling applied.
/// Float files are accepted when every value is a whole number; negative,
/// fractional, non-finite or > 65535 values are an error.
pub fn read_labels(path: &Path) -> Result<Volume<u16>, NiftiError> {
    let reader = VoxelReader::open(path)?;
    let header = reader.header.clone();
    if header.has_scaling() {
        tracing::warn!(
            path = %path.display(),
            slope = header.scl_slope,
            inter = header.scl_inter,
            "label volume has scl_slope/scl_inter; labels are read unscaled"
        );
    }
    let n = header.num_voxels() as usize;
    let mut data: Vec<u16> = Vec::with_capacity(n);
    let (dt, be) = (header.datatype, header.big_endian);
    reader.for_each_chunk(|bytes| {
        let mut bad: Option<(usize, f64)> = None;
        // Fast paths: u8/u16 masks need no checks (the common case).
        match dt {
            DataType::U8 => {
                decode_chunk::<u8>(bytes, be, |v| data.push(v as u16));
                return Ok(());
            }
            DataType::U16 => {
                decode_chunk::<u16>(bytes, be, |v| data.push(v));
                return Ok(());
            }
            _ => {}
        }
        dispatch_datatype!(dt, S => {
            decode_chunk::<S>(bytes, be, |v| {
                let f = v.to_f64();
                // u16 range and whole numbers only; remember the first offender.
                if (0.0..=65535.0).contains(&f) && f.fract() == 0.0 {
                    data.push(f as u16);
                } else {
                    if bad.is_none() {
                        bad = Some((data.len(), f));
                    }
                    data.push(0);
                }
            });
        });
        if let Some((i, v)) = bad {
            return Err(NiftiError::Value {
                path: path.to_path_buf(),
                msg: format!(
                    "voxel {:?} (index {i}) is {v}; labels must be whole numbers in 0..=65535 ({} data)",
                    coords(&header.dims, i as u64),
                    dt.name()
                ),
            });
        }
        Ok(())
    })?;
    Ok(Volume { dims: header.dims.clone(), header, data })
}

#[cfg(test)]
mod tests;
