//! Exit codes: 0 ok, 1 failure, 2 a recipe or usage mistake (130, an
//! interrupted run, is returned by `run` itself).

use pipeline_engine::plan::DagError;
use pipeline_engine::recipe::RecipeError;

/// A mistake in how a command was called (exit code 2, like recipe errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error: 2 for recipe and usage mistakes, 1 otherwise.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|e| e.is::<RecipeError>() || e.is::<UsageError>() || e.is::<DagError>());
    if usage { 2 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_and_usage_mistakes_exit_2_anywhere_in_the_chain() {
        assert_eq!(exit_code_for(&anyhow::Error::new(UsageError("x".into()))), 2);
        assert_eq!(exit_code_for(&anyhow::Error::new(DagError::UnknownStage("x".into())).context("while planning")), 2);
        assert_eq!(exit_code_for(&anyhow::Error::new(RecipeError::new("bad"))), 2);
        assert_eq!(exit_code_for(&anyhow::anyhow!("disk full")), 1);
    }
}
