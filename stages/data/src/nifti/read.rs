//! Streaming voxel reader for NIfTI-1/NIfTI-2 `.nii` / `.nii.gz` (gzip detected by its magic
//! bytes, not the extension). Voxels are decoded chunk by chunk straight
//! into the typed output, so peak memory is the output plus one chunk.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::error::NiftiError;
use super::header::{HEADER_SIZE, HEADER_SIZE_2, NiftiHeader, sniff};

/// Bytes decoded per chunk (a multiple of every datatype size).
const CHUNK_BYTES: usize = 1 << 20;
/// Deflate cannot expand data by more than ~1032:1; a gzip file claiming
/// more voxel bytes than that is lying (or truncated) and is rejected
/// before anything is allocated.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// An open NIfTI file positioned at its voxel data.
pub(crate) struct VoxelReader {
    pub header: NiftiHeader,
    path: PathBuf,
    inner: Box<dyn Read + Send>,
    gz: bool,
}

/// Read exactly `buf.len()` bytes or report how many were there.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl VoxelReader {
    pub fn open(path: &Path) -> Result<Self, NiftiError> {
        let io = |context: &str, source: std::io::Error| NiftiError::Io {
            path: path.to_path_buf(),
            context: context.to_string(),
            source,
        };
        let mut file = File::open(path).map_err(|e| io("opening", e))?;
        let file_len = file.metadata().map_err(|e| io("reading metadata of", e))?.len();
        let mut magic = [0u8; 2];
        let n = read_full(&mut file, &mut magic).map_err(|e| io("reading", e))?;
        let gz = n == 2 && magic == [0x1f, 0x8b];
        // Re-open rather than seek so the gzip decoder sees the whole stream.
        let file = File::open(path).map_err(|e| io("opening", e))?;
        let mut inner: Box<dyn Read + Send> = if gz {
            Box::new(MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)))
        } else {
            Box::new(BufReader::with_capacity(1 << 16, file))
        };
        // `sizeof_hdr` says how long the header is (348 or 540): read no
        // further, so that a small NIfTI-1 file's voxels are not consumed.
        let mut hbuf = [0u8; HEADER_SIZE_2];
        let mut got = read_full(&mut inner, &mut hbuf[..4]).map_err(|e| gz_error(path, e))?;
        if got == 4 {
            let size = sniff(&hbuf).map_or(HEADER_SIZE, |(version, _)| version.header_size());
            got += read_full(&mut inner, &mut hbuf[4..size]).map_err(|e| gz_error(path, e))?;
        }
        let header = NiftiHeader::parse(&hbuf[..got], path)?;

        let needed = header.vox_offset + header.data_bytes();
        if gz {
            if needed > file_len.saturating_mul(MAX_DEFLATE_RATIO) + (1 << 20) {
                return Err(NiftiError::Size {
                    path: path.to_path_buf(),
                    msg: format!(
                        "header dims {:?} × {} bytes need {needed} bytes, more than a {file_len}-byte gzip file can hold",
                        header.dims,
                        header.datatype.size()
                    ),
                });
            }
        } else if file_len < needed {
            return Err(NiftiError::Size {
                path: path.to_path_buf(),
                msg: format!(
                    "header dims {:?} × {} bytes ({}) at offset {} need a {needed}-byte file, but it has {file_len} bytes",
                    header.dims,
                    header.datatype.name(),
                    header.data_bytes(),
                    header.vox_offset
                ),
            });
        } else if file_len > needed {
            tracing::warn!(path = %path.display(), extra = file_len - needed, "trailing bytes after the voxel data ignored");
        }

        // Skip the extension block(s) up to vox_offset.
        let skip = header.vox_offset - header.version.header_size() as u64;
        let skipped =
            std::io::copy(&mut (&mut inner).take(skip), &mut std::io::sink()).map_err(|e| gz_error(path, e))?;
        if skipped < skip {
            return Err(NiftiError::Truncated {
                path: path.to_path_buf(),
                what: "header extensions before vox_offset".into(),
                expected: skip,
                got: skipped,
            });
        }
        Ok(Self { header, path: path.to_path_buf(), inner, gz })
    }

    /// Feed the voxel bytes to `f` in chunks holding whole voxels, then
    /// check the stream end (which also verifies the gzip CRC).
    pub fn for_each_chunk(mut self, mut f: impl FnMut(&[u8]) -> Result<(), NiftiError>) -> Result<(), NiftiError> {
        let total = self.header.data_bytes();
        let elem = self.header.datatype.size();
        let mut buf = vec![0u8; CHUNK_BYTES.min(total as usize).max(elem)];
        let mut done: u64 = 0;
        while done < total {
            let want = ((total - done) as usize).min(buf.len());
            let got = read_full(&mut self.inner, &mut buf[..want]).map_err(|e| gz_error(&self.path, e))?;
            if got < want {
                return Err(NiftiError::Truncated {
                    path: self.path.clone(),
                    what: "voxel data".into(),
                    expected: total,
                    got: done + got as u64,
                });
            }
            f(&buf[..want])?;
            done += want as u64;
        }
        if self.gz {
            // Drain to EOF: the decoder checks the CRC and length only there.
            let extra = std::io::copy(&mut self.inner, &mut std::io::sink()).map_err(|e| gz_error(&self.path, e))?;
            if extra > 0 {
                tracing::warn!(path = %self.path.display(), extra, "trailing bytes after the voxel data ignored");
            }
        }
        Ok(())
    }
}

fn gz_error(path: &Path, e: std::io::Error) -> NiftiError {
    match e.kind() {
        ErrorKind::UnexpectedEof => {
            NiftiError::Gzip { path: path.to_path_buf(), msg: "the gzip stream ends early (truncated file?)".into() }
        }
        ErrorKind::InvalidInput | ErrorKind::InvalidData => {
            NiftiError::Gzip { path: path.to_path_buf(), msg: format!("corrupt gzip data: {e}") }
        }
        _ => NiftiError::Io { path: path.to_path_buf(), context: "reading".into(), source: e },
    }
}
