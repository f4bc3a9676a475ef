//! What recipe, stage, sweep and variant names may be. They become parts
//! of stage ids (`stage@variant+variant`, `stage.output`) and of file
//! names: `<cache>/logs/<run>/<id>.log`, `<id>.rank<R>.log`,
//! `<cache>/index/<recipe>/<id>.json`, `outputs/<recipe>/<id>` (written
//! through a temporary `.<id>.<pid>.tmp`), Slurm's `<id>-<job id>.log` and
//! `runs/<timestamp>-<recipe>-<n>`. The limits keep every one of them a
//! valid file name.

use super::error::RecipeError;
use super::source::{Origin, SourceMap};

/// The longest file name most file systems accept (ext4, XFS, btrfs, APFS,
/// NTFS), in bytes.
pub const FILE_NAME_MAX: usize = 255;

/// Bytes the engine adds around a stage id in a file name, at most:
/// `.<id>.<pid>.tmp` with a 10-digit pid is 16, `<id>.rank<R>.log` with a
/// 10-digit rank 19, `<id>-<job id>.log` with a 10-digit Slurm job id 15.
pub const STAGE_ID_AFFIXES: usize = 19;

/// Longest stage, sweep or variant name, in characters (ASCII: bytes).
pub const MAX_NAME_CHARS: usize = 64;

/// Longest stage id (`name@variant+variant...`), in bytes: the file names
/// made from it stay under [`FILE_NAME_MAX`] with room to spare for
/// affixes to come.
pub const MAX_STAGE_ID_BYTES: usize = 200;

/// Longest recipe name, in bytes: `runs/<24-byte timestamp>-<name>-<n>` and
/// `outputs/<name>` stay far below [`FILE_NAME_MAX`].
pub const MAX_RECIPE_NAME_BYTES: usize = 100;

const _: () = assert!(MAX_STAGE_ID_BYTES + STAGE_ID_AFFIXES <= FILE_NAME_MAX);
const _: () = assert!(MAX_RECIPE_NAME_BYTES + 24 + 6 <= FILE_NAME_MAX);

/// A stage, sweep or variant name: letters, digits, `_` and `-` only
/// (`.`, `@` and `+` separate parts of stage ids), at most
/// [`MAX_NAME_CHARS`].
pub(crate) fn check_name(sources: &SourceMap, origin: &Origin, name: &str, what: &str) -> Result<(), RecipeError> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(RecipeError::at(sources, origin, format!("invalid {what} name `{name}`"))
            .with_help("use letters, digits, `_` and `-` only (`.`, `@` and `+` separate parts of stage ids)"));
    }
    if name.len() > MAX_NAME_CHARS {
        return Err(RecipeError::at(
            sources,
            origin,
            format!("{what} name `{name}` is {} characters long: at most {MAX_NAME_CHARS} are allowed", name.len()),
        )
        .with_help("names become parts of stage ids and of log and output file names"));
    }
    Ok(())
}

/// A stage id made of a stage name and its sweep variants, at most
/// [`MAX_STAGE_ID_BYTES`]; the error points at the stage's header.
pub(crate) fn check_stage_id(sources: &SourceMap, header: &Origin, id: &str) -> Result<(), RecipeError> {
    if id.len() <= MAX_STAGE_ID_BYTES {
        return Ok(());
    }
    Err(RecipeError::at(
        sources,
        header,
        format!("stage id `{id}` is {} characters long: at most {MAX_STAGE_ID_BYTES} are allowed", id.len()),
    )
    .with_help("the id names the stage's log and output files: shorten the stage name or its sweeps' variant names"))
}

/// The recipe's name names directories (`outputs/<name>`, `runs/<time>-<name>`):
/// not empty, no path separator or control character, not starting with
/// `.`, at most [`MAX_RECIPE_NAME_BYTES`]. `origin` is where it was written;
/// `None` when it is the recipe file's name.
pub(crate) fn check_recipe_name(sources: &SourceMap, origin: Option<&Origin>, name: &str) -> Result<(), RecipeError> {
    let problem = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > MAX_RECIPE_NAME_BYTES {
        Some(format!("is {} bytes long: at most {MAX_RECIPE_NAME_BYTES} are allowed", name.len()))
    } else if name.starts_with('.') {
        Some("starts with `.`".to_string())
    } else if name.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
        Some("contains a path separator or a control character".to_string())
    } else {
        None
    };
    let Some(problem) = problem else { return Ok(()) };
    let message = format!("recipe name `{name}` {problem}");
    Err(match origin {
        Some(origin) => RecipeError::at(sources, origin, message)
            .with_help("the name names the recipe's output and run directories"),
        None => RecipeError::new(format!("{message} (it is the recipe file's name)"))
            .with_help("set `[recipe] name = \"...\"`: the name names the recipe's output and run directories"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(map: &mut SourceMap) -> Origin {
        let id = map.add("r.toml".into(), "[stage.x]\n".to_string());
        Origin::new(id, 7..8)
    }

    #[test]
    fn names_are_limited_in_characters_and_length() {
        let mut map = SourceMap::default();
        let at = origin(&mut map);
        check_name(&map, &at, &"a".repeat(MAX_NAME_CHARS), "stage").unwrap();
        let err = check_name(&map, &at, &"a".repeat(MAX_NAME_CHARS + 1), "stage").unwrap_err();
        assert!(err.message().contains("65 characters long: at most 64"), "{err}");
        let err = check_name(&map, &at, "a.b", "variant").unwrap_err();
        assert_eq!(err.message(), "invalid variant name `a.b`");
        check_stage_id(&map, &at, &"a".repeat(MAX_STAGE_ID_BYTES)).unwrap();
        assert!(check_stage_id(&map, &at, &"a".repeat(MAX_STAGE_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn recipe_names_cannot_leave_their_directory() {
        let mut map = SourceMap::default();
        let at = origin(&mut map);
        for good in ["mini", "ablation v2", "ré", &"r".repeat(MAX_RECIPE_NAME_BYTES)] {
            check_recipe_name(&map, Some(&at), good).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "a\nb", &"r".repeat(MAX_RECIPE_NAME_BYTES + 1)] {
            assert!(check_recipe_name(&map, Some(&at), bad).is_err(), "{bad:?}");
        }
        let err = check_recipe_name(&map, None, "..").unwrap_err();
        assert!(err.loc().is_none() && err.help().unwrap().contains("[recipe] name"), "{err}");
    }
}
