//! Recipe errors, rendered like rustc/cargo diagnostics:
//!
//! ```text
//! error: unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)
//!   --> recipes/mini.toml:12:1
//!    |
//! 12 | box_min_aera = 1300
//!    | ^^^^^^^^^^^^
//!    = help: did you mean `box_min_area`?
//! ```

use std::fmt;

use super::source::{Origin, SourceLoc, SourceMap};

/// Anything wrong with a recipe, located where it was written.
///
/// Boxed: it travels through every `Result` of the loader and should stay
/// one pointer wide.
#[derive(Debug, Clone)]
pub struct RecipeError(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    message: String,
    loc: Option<SourceLoc>,
    /// The text of the line `loc` points into (kept so `Display` needs no I/O).
    line_text: Option<String>,
    help: Option<String>,
    notes: Vec<String>,
}

impl RecipeError {
    /// An error without a location (e.g. the recipe file cannot be read).
    pub fn new(message: impl Into<String>) -> Self {
        Self(Box::new(Inner { message: message.into(), loc: None, line_text: None, help: None, notes: Vec::new() }))
    }

    pub(crate) fn at(sources: &SourceMap, origin: &Origin, message: impl Into<String>) -> Self {
        let (loc, line) = sources.locate(origin);
        let mut err = Self::new(message);
        err.0.loc = Some(loc);
        err.0.line_text = Some(line);
        err
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.0.help = Some(help.into());
        self
    }

    pub fn with_help_opt(self, help: Option<String>) -> Self {
        match help {
            Some(h) => self.with_help(h),
            None => self,
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.0.notes.push(note.into());
        self
    }

    /// The one-line message, without location or hints.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    pub fn loc(&self) -> Option<&SourceLoc> {
        self.0.loc.as_ref()
    }

    pub fn help(&self) -> Option<&str> {
        self.0.help.as_deref()
    }

    pub fn notes(&self) -> &[String] {
        &self.0.notes
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let this = &self.0;
        write!(f, "error: {}", this.message)?;
        let gutter = match &this.loc {
            Some(loc) => loc.line.to_string().len(),
            None => 0,
        };
        let pad = " ".repeat(gutter);
        if let Some(loc) = &this.loc {
            write!(f, "\n{pad}--> {loc}")?;
            if let Some(line) = &this.line_text {
                // Tabs would shift the carets; show them as one space.
                let shown = line.replace('\t', " ");
                let carets = "^".repeat(loc.len.max(1));
                let indent = " ".repeat(loc.col.saturating_sub(1));
                write!(f, "\n{pad} |\n{} | {shown}\n{pad} | {indent}{carets}", loc.line)?;
            }
        }
        for note in &this.notes {
            write!(f, "\n{pad} = note: {note}")?;
        }
        if let Some(help) = &this.help {
            write!(f, "\n{pad} = help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RecipeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_rustc() {
        let mut map = SourceMap::default();
        let text = "[stage.slices]\n".repeat(11) + "box_min_aera = 1300\n";
        let id = map.add("recipes/mini.toml".into(), text.clone());
        let start = text.find("box_min_aera").unwrap();
        let err = RecipeError::at(
            &map,
            &Origin::new(id, start..start + 12),
            "unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)",
        )
        .with_help("did you mean `box_min_area`?");
        let expected = "\
error: unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)
  --> recipes/mini.toml:12:1
   |
12 | box_min_aera = 1300
   | ^^^^^^^^^^^^
   = help: did you mean `box_min_area`?";
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn errors_without_location_are_one_line() {
        let err = RecipeError::new("cannot read `x.toml`: not found");
        assert_eq!(err.to_string(), "error: cannot read `x.toml`: not found");
        assert!(err.loc().is_none());
    }
}
