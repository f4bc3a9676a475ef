//! The one error type of NIfTI reading and writing.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing NIfTI; every variant
/// names the file.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("{context} {}: {source}", path.display())]
    Io { path: PathBuf, context: String, source: std::io::Error },
    #[error("{}: not a NIfTI-1 or NIfTI-2 file: {msg}", path.display())]
    NotNifti { path: PathBuf, msg: String },
    #[error("{}: invalid header field `{field}`: {msg}", path.display())]
    Header { path: PathBuf, field: String, msg: String },
    #[error("{}: truncated {what}: expected {expected} bytes, found {got}", path.display())]
    Truncated { path: PathBuf, what: String, expected: u64, got: u64 },
    #[error("{}: file size does not match the header: {msg}", path.display())]
    Size { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Gzip { path: PathBuf, msg: String },
    #[error("{}: bad voxel value: {msg}", path.display())]
    Value { path: PathBuf, msg: String },
    #[error("orientation: {0}")]
    Orientation(String),
    #[error("{0}")]
    InvalidArgument(String),
}
