//! Paths read from recipes and data files that name files inside a dataset
//! or an input artifact: they must not climb out of it with `..`.

use std::path::{Component, Path};

/// Relative, and made only of plain names (and `.`): joined to a
/// directory, it stays inside it (symlinks aside).
pub fn is_plain_relative(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// A path that is either given absolute on purpose (used as is) or
/// relative and [`is_plain_relative`].
pub fn stays_inside(path: &Path) -> bool {
    path.is_absolute() || is_plain_relative(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_stay_inside() {
        for ok in ["images", "./images/a.png", "a/b/c", ""] {
            assert!(is_plain_relative(Path::new(ok)) && stays_inside(Path::new(ok)), "{ok}");
        }
        for bad in ["..", "../x", "a/../../b", "a/.."] {
            assert!(!is_plain_relative(Path::new(bad)) && !stays_inside(Path::new(bad)), "{bad}");
        }
        assert!(!is_plain_relative(Path::new("/data/images")));
        assert!(stays_inside(Path::new("/data/images")));
    }
}
