//! The error of a stage's params, shared by parsing ([`crate::params`]) and
//! range checks ([`crate::ranges`]).

/// A params problem, located by its key path inside the stage table (the
/// engine turns the path into file:line:column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// Key path inside the stage table, e.g. `["reward_weights", "format"]`;
    /// empty when the problem is the table as a whole.
    pub path: Vec<String>,
    pub message: String,
    /// e.g. "did you mean `box_min_area`?"
    pub hint: Option<String>,
}

impl ParamError {
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        Self { path: path.iter().map(|s| s.to_string()).collect(), message: message.into(), hint: None }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}
