//! A stage kind and a recipe for the planner's tests.

use std::path::Path;

use stage_api::{InputSpec, Registry, StageContext, StageKind};

use crate::recipe::Recipe;

/// A stage kind for planner tests: params only, one optional input.
pub struct Echo;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EchoParams {
    /// A number.
    value: f64,
    /// A word.
    word: String,
}

impl StageKind for Echo {
    type Params = EchoParams;
    const KIND: &'static str = "echo";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "test kind";
    fn inputs() -> &'static [InputSpec] {
        const I: &[InputSpec] = &[InputSpec::optional("up", "upstream")];
        I
    }
    fn run(_p: &Self::Params, _ctx: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

/// `a -> b -> c`, and `d` alone.
pub const RECIPE: &str = r#"
[recipe]
name = "t"
seed = 5
[stage.a]
kind = "echo"
value = 1.5
word = "x"
[stage.b]
kind = "echo"
up = "a"
[stage.c]
kind = "echo"
up = "b"
[stage.d]
kind = "echo"
value = 2
"#;

/// `src` loaded with `--set`s and a registry of [`Echo`].
pub fn load(src: &str, sets: &[&str]) -> Recipe {
    let registry = Registry::new().register::<Echo>();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    crate::recipe::load_recipe_str(src, Path::new("t.toml"), &sets, &registry).unwrap()
}
