//! `items.jsonl` files: the hand-over format between the data stages (one
//! JSON object per line, sorted by `id`). Readers report the file and line of
//! a bad record.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {source}")]
    Parse { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: serde_json::Error },
}

/// Read every record of a JSON-lines file (blank lines are skipped).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, JsonlError> {
    let io = |source| JsonlError::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|source| JsonlError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        out.push(record);
    }
    Ok(out)
}

/// Write records, one per line.
pub fn write<T: Serialize>(path: &Path, records: &[T]) -> Result<(), JsonlError> {
    let io = |source| JsonlError::Io { path: path.to_path_buf(), source };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    for r in records {
        serde_json::to_writer(&mut w, r).map_err(|source| JsonlError::Write { path: path.to_path_buf(), source })?;
        w.write_all(b"\n").map_err(io)?;
    }
    w.flush().map_err(io)
}

/// Write pretty JSON (reports, stats) with a trailing newline.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), JsonlError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| JsonlError::Write { path: path.to_path_buf(), source })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|source| JsonlError::Io { path: path.to_path_buf(), source })
}

/// Read a JSON document.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, JsonlError> {
    let text = std::fs::read_to_string(path).map_err(|source| JsonlError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| JsonlError::Parse {
        path: path.to_path_buf(),
        line: source.line(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bad_line_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("items.jsonl");
        write(&p, &[serde_json::json!({"id": "a"}), serde_json::json!({"id": "b"})]).unwrap();
        let back: Vec<serde_json::Value> = read(&p).unwrap();
        assert_eq!(back.len(), 2);
        std::fs::write(&p, "{\"id\": 1}\n{oops\n").unwrap();
        let err = read::<serde_json::Value>(&p).unwrap_err().to_string();
        assert!(err.contains("items.jsonl:2:"), "{err}");
    }
}
