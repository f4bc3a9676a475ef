//! NIfTI-1 / NIfTI-2 writer: `.nii` or `.nii.gz` by extension, atomic (temp file in
//! the same directory, then rename), byte-reproducible (fixed gzip level,
//! no timestamp or file name in the gzip header).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::{Compression, GzBuilder};

use super::NiftiScalar;
use super::error::NiftiError;
use super::header::{MAX_DIM, NiftiHeader, NiftiVersion};

/// How to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// gzip level 0..=9 for `.nii.gz` (nibabel writes level 1 too: CT
    /// compresses little better at 6 and takes several times longer).
    pub gz_level: u32,
    /// Header layout. NIfTI-1 (the default) is what every tool reads; NIfTI-2
    /// (f64 affine and scaling fields) is written for tests of the reader.
    pub version: NiftiVersion,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { gz_level: 1, version: NiftiVersion::V1 }
    }
}

/// Write `data` (NIfTI order, x fastest) with `dims` and `affine` (stored
/// as sform and qform); `scl` = (slope, intercept) recorded in the header
/// (values are written as given: they are the stored values). Float header
/// fields are rounded to f32 in a NIfTI-1 file.
pub fn write<T: NiftiScalar>(
    path: &Path,
    dims: &[usize],
    data: &[T],
    affine: &[[f64; 4]; 4],
    scl: Option<(f64, f64)>,
) -> Result<(), NiftiError> {
    write_with(path, dims, data, affine, scl, WriteOptions::default())
}

pub fn write_with<T: NiftiScalar>(
    path: &Path,
    dims: &[usize],
    data: &[T],
    affine: &[[f64; 4]; 4],
    scl: Option<(f64, f64)>,
    options: WriteOptions,
) -> Result<(), NiftiError> {
    let invalid = |msg: String| NiftiError::InvalidArgument(format!("writing {}: {msg}", path.display()));
    if dims.is_empty() || dims.len() > 7 {
        return Err(invalid(format!("{} dimensions; NIfTI holds 1..=7", dims.len())));
    }
    if let Some(d) = dims.iter().find(|&&d| d == 0 || d > MAX_DIM) {
        return Err(invalid(format!("dimension {d} out of 1..={MAX_DIM}")));
    }
    let n: usize = dims.iter().product();
    if n != data.len() {
        return Err(invalid(format!("dims {dims:?} hold {n} voxels but {} values were given", data.len())));
    }
    if affine.iter().flatten().any(|v| !v.is_finite()) {
        return Err(invalid("the affine has non-finite entries".into()));
    }
    if options.gz_level > 9 {
        return Err(invalid(format!("gzip level {} out of 0..=9", options.gz_level)));
    }
    let header = NiftiHeader::for_write(dims, T::DATATYPE, affine, scl, options.version);
    let gz = path.extension().is_some_and(|e| e == "gz");

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let io = |context: &str, p: &Path, source: std::io::Error| NiftiError::Io {
        path: p.to_path_buf(),
        context: context.to_string(),
        source,
    };
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
        let out = BufWriter::with_capacity(1 << 20, file);
        let file = if gz {
            let mut enc = GzBuilder::new().mtime(0).write(out, Compression::new(options.gz_level));
            write_body(&mut enc, &header, data).map_err(|e| io("writing", &tmp, e))?;
            enc.finish().map_err(|e| io("writing", &tmp, e))?
        } else {
            let mut out = out;
            write_body(&mut out, &header, data).map_err(|e| io("writing", &tmp, e))?;
            out
        };
        let file = file.into_inner().map_err(|e| io("writing", &tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io("syncing", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("renaming a temp file onto", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_body<T: NiftiScalar>(w: &mut impl Write, header: &NiftiHeader, data: &[T]) -> std::io::Result<()> {
    w.write_all(&header.to_bytes())?;
    let per_chunk = (1 << 20) / T::SIZE;
    let mut buf = Vec::with_capacity(per_chunk * T::SIZE);
    for chunk in data.chunks(per_chunk) {
        buf.clear();
        for &v in chunk {
            v.write_le(&mut buf);
        }
        w.write_all(&buf)?;
    }
    Ok(())
}
