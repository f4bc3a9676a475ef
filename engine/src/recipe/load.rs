//! Reading a recipe file and the chain of files it `extends`, within
//! [`MAX_RECIPE_BYTES`] and from regular files only.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::error::RecipeError;
use super::source::{Origin, SourceId, SourceMap};
use super::tree::{Table, parse_document};

/// The most a recipe may weigh: the file named on the command line and
/// every file it `extends`, together. Recipes are a few KB (`full.toml` is
/// 7 KB); the limit keeps a mistake such as `extends = "/dev/zero"` or a
/// multi-GB file from exhausting memory, and leaves room for generated
/// recipes a thousand times larger than the shipped ones.
pub const MAX_RECIPE_BYTES: u64 = 4 * 1024 * 1024;

/// Why a recipe file could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(std::io::Error),
    /// A directory, FIFO, device or socket: a FIFO would block, a device
    /// such as `/dev/zero` would never end.
    NotAFile(&'static str),
    /// More than the bytes left of [`MAX_RECIPE_BYTES`].
    TooLarge,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::NotAFile(what) => write!(f, "it is {what}, not a regular file"),
            ReadError::TooLarge => write!(
                f,
                "a recipe with the files it extends may hold at most {} MiB",
                MAX_RECIPE_BYTES / (1024 * 1024)
            ),
        }
    }
}

/// Read a recipe file of at most `budget` bytes. Refuses anything but a
/// regular file before reading it (opened non-blocking, so a FIFO put in
/// its place meanwhile cannot block either), and never reads more than
/// `budget + 1` bytes, whatever the file claims its size is.
pub(crate) fn read_recipe_file(path: &Path, budget: u64) -> Result<String, ReadError> {
    let meta = std::fs::metadata(path).map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile(file_type_name(&meta.file_type())));
    }
    let file = open_nonblocking(path).map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile(file_type_name(&meta.file_type())));
    }
    if meta.len() > budget {
        return Err(ReadError::TooLarge);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(budget.saturating_add(1)).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() as u64 > budget {
        return Err(ReadError::TooLarge);
    }
    String::from_utf8(bytes)
        .map_err(|_| ReadError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is not UTF-8 text")))
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

fn file_type_name(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() { "a directory" } else { "not a regular file" }
}

/// Parse source `top` and every file it extends (transitively), deep-merged
/// base first. Returns the merged tree; `files` receives the paths in
/// reading order (top first) and ranks are set so base files sort first.
pub(crate) fn load_chain(
    sources: &mut SourceMap,
    top: SourceId,
    files: &mut Vec<PathBuf>,
) -> Result<Table, RecipeError> {
    let mut chain: Vec<(SourceId, PathBuf)> = vec![(top, identity(sources.name(top)))];
    let mut docs: Vec<Table> = Vec::new();
    let mut used = sources.text(top).len() as u64;
    loop {
        let (id, _) = chain[chain.len() - 1].clone();
        let mut doc = parse_document(sources, id)?;
        let extends = take_extends(sources, &mut doc)?;
        docs.push(doc);
        let Some((rel, origin)) = extends else { break };
        let base_path = sources.name(id).parent().unwrap_or(Path::new("")).join(&rel);
        let base_identity = identity(&base_path);
        if let Some(pos) = chain.iter().position(|(_, p)| *p == base_identity) {
            let cycle: Vec<String> = chain[pos..]
                .iter()
                .map(|(sid, _)| sources.name(*sid).display().to_string())
                .chain(std::iter::once(base_path.display().to_string()))
                .collect();
            return Err(RecipeError::at(sources, &origin, format!("`extends` cycle: {}", cycle.join(" -> "))));
        }
        let text = read_recipe_file(&base_path, MAX_RECIPE_BYTES.saturating_sub(used)).map_err(|e| {
            let err = RecipeError::at(
                sources,
                &origin,
                format!("cannot read extended recipe `{}`: {e}", base_path.display()),
            );
            match e {
                ReadError::TooLarge => err,
                _ => err.with_help("`extends` is a path relative to the file that contains it"),
            }
        })?;
        used += text.len() as u64;
        let base_id = sources.add(base_path, text);
        chain.push((base_id, base_identity));
    }
    files.extend(chain.iter().map(|(id, _)| sources.name(*id).to_path_buf()));
    // Base files declare first: rank them before the files extending them.
    for (rank, (id, _)) in chain.iter().rev().enumerate() {
        sources.set_rank(*id, rank);
    }
    let mut merged = Table::default();
    for doc in docs.into_iter().rev() {
        merged.merge(doc);
    }
    Ok(merged)
}

/// Path used to recognise the same file reached twice (cycle detection).
fn identity(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Remove `recipe.extends` from a parsed file, returning its path and origin.
fn take_extends(sources: &SourceMap, doc: &mut Table) -> Result<Option<(String, Origin)>, RecipeError> {
    let Some(recipe) = doc.entries.get_mut("recipe") else { return Ok(None) };
    let super::tree::NodeValue::Table(recipe) = &mut recipe.value.value else { return Ok(None) };
    let Some(entry) = recipe.remove("extends") else { return Ok(None) };
    match entry.value.as_str() {
        Some(path) if !path.is_empty() => Ok(Some((path.to_string(), entry.value.origin))),
        _ => Err(RecipeError::at(
            sources,
            &entry.value.origin,
            format!("`extends` must be a path to a recipe file, found {}", entry.value.type_name()),
        )
        .with_help("write `extends = \"base.toml\"` (relative to this file)")),
    }
}
