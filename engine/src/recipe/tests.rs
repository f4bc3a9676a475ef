//! Recipe loading tests over a small registry of stand-in kinds shaped like
//! the real ones (inputs, named outputs, nested params, `validate`).

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;
use stage_api::StageContext;
use stage_api::params::ParamError;
use stage_api::{InputSpec, OutputSpec, StageKind};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct PhantomParams {
    /// Number of synthetic cases.
    cases: u64,
}
impl Default for PhantomParams {
    fn default() -> Self {
        Self { cases: 10 }
    }
}
struct Phantom;
impl StageKind for Phantom {
    type Params = PhantomParams;
    const KIND: &'static str = "phantom";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Synthetic volumes.";
    fn validate(p: &PhantomParams) -> Result<(), ParamError> {
        if p.cases == 0 {
            return Err(ParamError::new(&["cases"], "must be at least 1"));
        }
        Ok(())
    }
    fn run(_: &PhantomParams, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct SlicesParams {
    box_min_area: u64,
    connectivity: u8,
}
impl Default for SlicesParams {
    fn default() -> Self {
        Self { box_min_area: 1300, connectivity: 8 }
    }
}
struct Slices;
impl StageKind for Slices {
    type Params = SlicesParams;
    const KIND: &'static str = "lesion_slices";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Slices with lesions.";
    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[InputSpec::one("input", "Volumes.")];
        INPUTS
    }
    fn validate(p: &SlicesParams) -> Result<(), ParamError> {
        if p.connectivity != 4 && p.connectivity != 8 {
            return Err(ParamError::new(&["connectivity"], "must be 4 or 8"));
        }
        Ok(())
    }
    fn run(_: &SlicesParams, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct SplitParams {
    ratio: f64,
}
struct Split;
impl StageKind for Split {
    type Params = SplitParams;
    const KIND: &'static str = "split";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Train/test split.";
    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[InputSpec::one("input", "Slices.")];
        INPUTS
    }
    fn outputs(_: &SplitParams) -> Vec<OutputSpec> {
        vec![OutputSpec::new("train", "training rows"), OutputSpec::new("test", "test rows")]
    }
    fn run(_: &SplitParams, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct Weights {
    #[schemars(range(min = 0.0, max = 10.0))]
    format: f64,
    validity: f64,
    correctness: f64,
}
impl Default for Weights {
    fn default() -> Self {
        Self { format: 1.0, validity: 1.0, correctness: 2.0 }
    }
}
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct GrpoParams {
    #[schemars(range(min = 1, max = 100_000))]
    steps: u64,
    lr: f64,
    reward_weights: Weights,
}
impl Default for GrpoParams {
    fn default() -> Self {
        Self { steps: 1500, lr: 1e-6, reward_weights: Weights::default() }
    }
}
struct Grpo;
impl StageKind for Grpo {
    type Params = GrpoParams;
    const KIND: &'static str = "grpo";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "GRPO.";
    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[InputSpec::one("data", "Training rows.")];
        INPUTS
    }
    fn run(_: &GrpoParams, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct EvalParams {
    max_new_tokens: u64,
}
struct Eval;
impl StageKind for Eval {
    type Params = EvalParams;
    const KIND: &'static str = "eval";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Evaluate.";
    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[InputSpec::one("model", "Model."), InputSpec::optional("data", "Test rows.")];
        INPUTS
    }
    fn run(_: &EvalParams, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct ReportParams {
    title: String,
}
struct Report;
impl StageKind for Report {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "Gather evaluations.";
    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[InputSpec::many("evals", "Evaluations.")];
        INPUTS
    }
    fn run(_: &ReportParams, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

fn registry() -> Registry {
    Registry::new()
        .register::<Phantom>()
        .register::<Slices>()
        .register::<Split>()
        .register::<Grpo>()
        .register::<Eval>()
        .register::<Report>()
}

const MINI: &str = r#"[recipe]
name = "mini"
seed = 17

[stage.volumes]
kind = "phantom"
cases = 40

[stage.slices]
kind = "lesion_slices"
input = "volumes"
box_min_area = 1300

[stage.split]
kind = "split"
input = "slices"

[stage.grpo]
kind = "grpo"
data = "split.train"

[stage.eval]
kind = "eval"
model = "grpo"
data = "split.test"

[stage.report]
kind = "report"
evals = ["eval"]
"#;

fn load(src: &str, sets: &[&str]) -> Result<Recipe, RecipeError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    load_recipe_str(src, Path::new("recipes/mini.toml"), &sets, &registry())
}

fn load_err(src: &str, sets: &[&str]) -> RecipeError {
    match load(src, sets) {
        Ok(r) => panic!("expected an error, got stages {:?}", r.stages.iter().map(|s| &s.id).collect::<Vec<_>>()),
        Err(e) => e,
    }
}

/// (file, line, column) of an error.
fn at(err: &RecipeError) -> (String, usize, usize) {
    let loc = err.loc().unwrap_or_else(|| panic!("error without location: {err}"));
    (loc.file.display().to_string(), loc.line, loc.col)
}

fn ids(recipe: &Recipe) -> Vec<&str> {
    recipe.stages.iter().map(|s| s.id.as_str()).collect()
}

#[test]
fn loads_a_linear_recipe_in_dependency_order() {
    let r = load(MINI, &[]).unwrap();
    assert_eq!(r.name, "mini");
    assert_eq!(r.seed, 17);
    assert_eq!(r.dir(), Path::new("recipes"));
    assert_eq!(ids(&r), ["volumes", "slices", "split", "grpo", "eval", "report"]);
    let grpo = r.stage("grpo").unwrap();
    assert_eq!(grpo.inputs["data"][0].stage, "split");
    assert_eq!(grpo.inputs["data"][0].output.as_deref(), Some("train"));
    assert_eq!((grpo.inputs["data"][0].loc.line, grpo.inputs["data"][0].loc.col), (20, 8));
    assert_eq!(grpo.seed, 17);
    assert_eq!(grpo.stage.canonical_params()["reward_weights"]["correctness"], 2.0);
    assert_eq!(r.stage("volumes").unwrap().stage.canonical_params()["cases"], 40);
    assert_eq!((grpo.loc.line, grpo.loc.col), (18, 1));
    assert!(!r.stage("eval").unwrap().inputs.contains_key("missing"));
    assert_eq!(r.stage("report").unwrap().dependencies(), ["eval"]);
}

#[test]
fn toml_syntax_error_is_located() {
    let e = load_err("[recipe]\nname = \"x\"\nseed = = 3\n", &[]);
    assert!(e.message().starts_with("invalid TOML:"), "{}", e.message());
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 3, 8));
}

#[test]
fn unknown_top_level_table() {
    let e = load_err(&format!("{MINI}\n[stages.x]\nkind = \"phantom\"\n"), &[]);
    assert_eq!(e.message(), "unknown top-level table `stages`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 31, 2));
    assert_eq!(e.help(), Some("did you mean `[stage]`?"));
}

#[test]
fn unknown_key_in_recipe_table() {
    let e = load_err(&MINI.replace("seed = 17", "sed = 17"), &[]);
    assert_eq!(e.message(), "unknown key `sed` in `[recipe]`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 3, 1));
    assert_eq!(e.help(), Some("did you mean `seed`?"));
}

#[test]
fn missing_kind_points_at_the_stage_header() {
    let e = load_err(&MINI.replace("kind = \"split\"\n", ""), &[]);
    assert_eq!(e.message(), "stage `split` has no `kind`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 14, 1));
    assert_eq!(e.loc().unwrap().len, "[stage.split]".len());
}

#[test]
fn unknown_kind_suggests_a_registered_one() {
    let e = load_err(&MINI.replace("\"phantom\"", "\"phantm\""), &[]);
    assert_eq!(e.message(), "unknown stage kind `phantm` for stage `volumes`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 6, 8));
    assert_eq!(e.help(), Some("did you mean `phantom`?"));
}

#[test]
fn unknown_param_renders_like_rustc() {
    let src = MINI.replace("box_min_area = 1300", "box_min_aera = 1300");
    let e = load_err(&src, &[]);
    assert_eq!(e.message(), "unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 12, 1));
    let expected = "\
error: unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)
  --> recipes/mini.toml:12:1
   |
12 | box_min_aera = 1300
   | ^^^^^^^^^^^^
   = help: did you mean `box_min_area`?";
    assert_eq!(e.to_string(), expected);
}

#[test]
fn param_near_an_input_name_suggests_the_input() {
    let e = load_err(&MINI.replace("model = \"grpo\"", "model = \"grpo\"\ndat = \"split.test\""), &[]);
    assert!(e.message().starts_with("unknown parameter `dat`"), "{}", e.message());
}

#[test]
fn param_type_error_points_at_the_value() {
    let e = load_err(&MINI.replace("cases = 40", "cases = \"many\""), &[]);
    assert!(
        e.message().starts_with("parameter `cases` of stage `volumes` (kind `phantom`): invalid type"),
        "{}",
        e.message()
    );
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 7, 9));
    assert_eq!(e.loc().unwrap().len, 6);
    assert!(!e.message().contains('\n'), "{}", e.message());
}

#[test]
fn nested_param_type_error_points_at_the_nested_value() {
    let src = MINI.replace("data = \"split.train\"", "data = \"split.train\"\nreward_weights = { format = \"high\" }");
    let e = load_err(&src, &[]);
    assert!(e.message().starts_with("parameter `reward_weights.format` of stage `grpo`"), "{}", e.message());
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 21, 29));
}

#[test]
fn validate_error_points_at_the_key() {
    let e = load_err(&MINI.replace("box_min_area = 1300", "connectivity = 6"), &[]);
    assert_eq!(e.message(), "parameter `connectivity` of stage `slices` (kind `lesion_slices`): must be 4 or 8");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 12, 1));
}

#[test]
fn validate_error_from_set_points_into_the_argument() {
    let e = load_err(MINI, &["volumes.cases=0"]);
    assert_eq!(e.message(), "parameter `cases` of stage `volumes` (kind `phantom`): must be at least 1");
    assert_eq!(at(&e), ("<--set #1>".to_string(), 1, 9));
}

#[test]
fn missing_required_input() {
    let e = load_err(&MINI.replace("input = \"slices\"\n", ""), &[]);
    assert_eq!(e.message(), "stage `split` (kind `split`) is missing required input `input`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 14, 1));
    assert_eq!(e.help(), Some("add `input = \"STAGE\"` (Slices.)"));
}

#[test]
fn input_referencing_an_unknown_stage() {
    let e = load_err(&MINI.replace("input = \"slices\"", "input = \"slice\""), &[]);
    assert_eq!(e.message(), "input `input` of stage `split` (kind `split`) references unknown stage `slice`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 16, 9));
    assert_eq!(e.help(), Some("did you mean `slices`?"));
}

#[test]
fn input_referencing_an_unknown_output() {
    let e = load_err(&MINI.replace("\"split.train\"", "\"split.trian\""), &[]);
    assert_eq!(e.message(), "stage `split` (kind `split`) has no output `trian`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 20, 8));
    assert_eq!(e.help(), Some("did you mean `split.train`?"));
}

#[test]
fn many_ness_mismatch_both_ways() {
    let e = load_err(&MINI.replace("evals = [\"eval\"]", "evals = \"eval\""), &[]);
    assert_eq!(
        e.message(),
        "input `evals` of stage `report` (kind `report`) takes a list of stages, found a single string"
    );
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 29, 9));
    assert_eq!(e.help(), Some("write `evals = [\"eval\"]`"));

    let e = load_err(&MINI.replace("input = \"slices\"", "input = [\"slices\"]"), &[]);
    assert_eq!(e.message(), "input `input` of stage `split` (kind `split`) takes one stage, found a list");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 16, 9));
}

#[test]
fn dependency_cycle_lists_the_cycle() {
    let src = MINI.replace("input = \"volumes\"", "input = \"split\"");
    let e = load_err(&src, &[]);
    assert_eq!(e.message(), "dependency cycle: `slices` -> `split` -> `slices`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 16, 9));
    // A stage reading itself.
    let e = load_err(&MINI.replace("input = \"slices\"", "input = \"split\""), &[]);
    assert_eq!(e.message(), "dependency cycle: `split` -> `split`");
}

#[test]
fn after_orders_without_data() {
    let src = format!("{MINI}\n[stage.first]\nkind = \"phantom\"\n");
    let src = src.replace("cases = 40", "cases = 40\nafter = [\"first\"]");
    let r = load(&src, &[]).unwrap();
    assert_eq!(ids(&r)[..2], ["first", "volumes"]);
    assert_eq!(r.stage("volumes").unwrap().after, ["first"]);
    let e = load_err(&src.replace("after = [\"first\"]", "after = \"first\""), &[]);
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 8, 9));
}

#[test]
fn per_stage_seed_overrides_the_recipe_seed() {
    let r = load(&MINI.replace("cases = 40", "cases = 40\nseed = 3"), &[]).unwrap();
    assert_eq!(r.stage("volumes").unwrap().seed, 3);
    assert_eq!(r.stage("slices").unwrap().seed, 17);
    let e = load_err(&MINI.replace("cases = 40", "cases = 40\nseed = -1"), &[]);
    assert_eq!(e.message(), "`stage.volumes.seed` must be a non-negative integer, found integer -1");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 8, 8));
}

#[test]
fn extends_merges_and_locates_values_in_the_base_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("base")).unwrap();
    std::fs::write(dir.path().join("base/common.toml"), MINI).unwrap();
    let top = "[recipe]\nname = \"child\"\nextends = \"base/common.toml\"\n\n[stage.grpo]\nsteps = 10\nreward_weights.validity = 0.0\n";
    std::fs::write(dir.path().join("child.toml"), top).unwrap();
    let r = load_recipe(&dir.path().join("child.toml"), &[], &registry()).unwrap();
    assert_eq!(r.name, "child");
    assert_eq!(r.seed, 17);
    assert_eq!(r.files.len(), 2);
    let p = r.stage("grpo").unwrap().stage.canonical_params();
    assert_eq!((p["steps"].as_u64(), p["reward_weights"]["validity"].as_f64()), (Some(10), Some(0.0)));
    assert_eq!(p["reward_weights"]["correctness"], 2.0);
    assert_eq!(ids(&r), ["volumes", "slices", "split", "grpo", "eval", "report"]);

    // A bad value inherited from the base is reported in the base file.
    std::fs::write(dir.path().join("base/common.toml"), MINI.replace("cases = 40", "cases = -4")).unwrap();
    let e = load_recipe(&dir.path().join("child.toml"), &[], &registry()).unwrap_err();
    assert!(e.loc().unwrap().file.ends_with("base/common.toml"), "{e}");
    assert_eq!((e.loc().unwrap().line, e.loc().unwrap().col), (7, 9));
}

#[test]
fn bad_extends_points_at_the_extends_value() {
    let dir = tempfile::tempdir().unwrap();
    let top = "[recipe]\nextends = \"missing.toml\"\n";
    std::fs::write(dir.path().join("r.toml"), top).unwrap();
    let e = load_recipe(&dir.path().join("r.toml"), &[], &registry()).unwrap_err();
    assert!(e.message().starts_with("cannot read extended recipe"), "{}", e.message());
    assert!(e.message().contains("missing.toml"));
    assert_eq!((e.loc().unwrap().line, e.loc().unwrap().col), (2, 11));

    std::fs::write(dir.path().join("a.toml"), "[recipe]\nextends = \"b.toml\"\n").unwrap();
    std::fs::write(dir.path().join("b.toml"), "[recipe]\nseed = 1\nextends = \"a.toml\"\n").unwrap();
    let e = load_recipe(&dir.path().join("a.toml"), &[], &registry()).unwrap_err();
    assert!(e.message().starts_with("`extends` cycle:"), "{}", e.message());
    assert!(e.loc().unwrap().file.ends_with("b.toml"));
    assert_eq!((e.loc().unwrap().line, e.loc().unwrap().col), (3, 11));

    let e = load_err("[recipe]\nextends = 3\n", &[]);
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 2, 11));
}

const SWEEP: &str = r#"
[sweep.rewards]
stage = "grpo"
variants = { no_validity = { reward_weights = { validity = 0.0 } }, all = {} }
"#;

#[test]
fn sweep_duplicates_downstream_and_expands_many_inputs() {
    let r = load(&format!("{MINI}{SWEEP}"), &[]).unwrap();
    // Variants keep declaration order, not alphabetical order.
    assert_eq!(
        ids(&r),
        ["volumes", "slices", "split", "grpo@no_validity", "grpo@all", "eval@no_validity", "eval@all", "report"]
    );
    let nv = r.stage("grpo@no_validity").unwrap();
    assert_eq!(nv.name, "grpo");
    assert_eq!(nv.variant.as_deref(), Some("no_validity"));
    assert_eq!(nv.stage.canonical_params()["reward_weights"]["validity"], 0.0);
    assert_eq!(r.stage("grpo@all").unwrap().stage.canonical_params()["reward_weights"]["validity"], 1.0);
    assert_eq!(r.stage("eval@all").unwrap().inputs["model"][0].stage, "grpo@all");
    assert_eq!(r.stage("eval@all").unwrap().inputs["data"][0].stage, "split");
    let evals: Vec<&str> = r.stage("report").unwrap().inputs["evals"].iter().map(|i| i.stage.as_str()).collect();
    assert_eq!(evals, ["eval@no_validity", "eval@all"]);
    assert_eq!(r.sweeps[0].variants, ["no_validity", "all"]);
}

#[test]
fn sweep_variants_as_an_array_and_pinned_references() {
    let sweep = r#"
[sweep.lr]
stage = "grpo"
variants = [ { name = "low", lr = 1e-7 }, { name = "high", lr = 1e-5 } ]
"#;
    let src = format!("{MINI}{sweep}").replace("model = \"grpo\"", "model = \"grpo@high\"");
    let r = load(&src, &[]).unwrap();
    assert_eq!(ids(&r), ["volumes", "slices", "split", "grpo@low", "grpo@high", "eval", "report"]);
    assert_eq!(r.stage("grpo@low").unwrap().stage.canonical_params()["lr"], 1e-7);
    assert_eq!(r.stage("eval").unwrap().inputs["model"][0].stage, "grpo@high");

    let e = load_err(&src.replace("grpo@high", "grpo@hihg"), &[]);
    assert_eq!(e.message(), "stage `grpo` has no variant `hihg`");
    assert_eq!(e.help(), Some("did you mean `high`?"));
}

#[test]
fn independent_sweeps_multiply_downstream() {
    let src = format!(
        "{MINI}{SWEEP}\n[sweep.slicing]\nstage = \"slices\"\nvariants = {{ a = {{ box_min_area = 900 }}, b = {{}} }}\n"
    );
    let r = load(&src, &[]).unwrap();
    let evals: Vec<&str> = r.stage("report").unwrap().inputs["evals"].iter().map(|i| i.stage.as_str()).collect();
    // Sweeps combine in declaration order: `rewards` first.
    assert_eq!(evals, ["eval@no_validity+a", "eval@no_validity+b", "eval@all+a", "eval@all+b"]);
    let e = r.stage("eval@all+b").unwrap();
    assert_eq!(e.inputs["model"][0].stage, "grpo@all+b");
    assert_eq!(e.inputs["data"][0].stage, "split@b");
    assert_eq!(r.stage("slices@a").unwrap().stage.canonical_params()["box_min_area"], 900);
    assert_eq!(r.stages.len(), 3 + 2 + 4 + 4 + 1);
    // Every stage comes after its dependencies.
    for (i, s) in r.stages.iter().enumerate() {
        for dep in s.dependencies() {
            assert!(r.stages[..i].iter().any(|d| d.id == dep), "{} before {dep}", s.id);
        }
    }
}

#[test]
fn sweep_errors() {
    let e = load_err(&format!("{MINI}{}", SWEEP.replace("\"grpo\"", "\"grop\"")), &[]);
    assert_eq!(e.message(), "sweep `rewards` names unknown stage `grop`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 32, 9));
    assert_eq!(e.help(), Some("did you mean `grpo`?"));

    let twice = format!("{MINI}{SWEEP}\n[sweep.again]\nstage = \"grpo\"\nvariants = {{ x = {{}} }}\n");
    let e = load_err(&twice, &[]);
    assert_eq!(e.message(), "stage `grpo` is swept twice (by `rewards` and `again`)");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 36, 9));

    // Variant overrides are checked like the stage table itself.
    let e = load_err(&format!("{MINI}{}", SWEEP.replace("validity = 0.0", "validty = 0.0")), &[]);
    assert!(
        e.message()
            .starts_with("parameter `reward_weights.validty` of stage `grpo@no_validity` (kind `grpo`): unknown field"),
        "{}",
        e.message()
    );
    // Unknown keys point at the key.
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 33, 49));
}

#[test]
fn set_overrides_params_with_shorthand_and_nested_keys() {
    let r = load(MINI, &["grpo.steps=10", "stage.grpo.reward_weights.format=0", "recipe.seed=5", "split.ratio=0.25"])
        .unwrap();
    let p = r.stage("grpo").unwrap().stage.canonical_params();
    assert_eq!(p["steps"], 10);
    assert_eq!(p["reward_weights"]["format"], 0.0);
    assert_eq!(p["reward_weights"]["correctness"], 2.0);
    assert_eq!(r.seed, 5);
    assert_eq!(r.stage("volumes").unwrap().seed, 5);
    assert_eq!(r.stage("split").unwrap().stage.canonical_params()["ratio"], 0.25);
}

#[test]
fn set_value_that_is_not_toml_is_a_string() {
    let r = load(MINI, &["report.title=/mnt/rexgct"]).unwrap();
    assert_eq!(r.stage("report").unwrap().stage.canonical_params()["title"], "/mnt/rexgct");
}

#[test]
fn bad_set_arguments() {
    let e = load_err(MINI, &["grpo.steps=10", "grpo.steps"]);
    assert_eq!(e.message(), "invalid `--set` argument `grpo.steps`: expected `KEY=VALUE`");
    assert_eq!(at(&e), ("<--set #2>".to_string(), 1, 1));

    let e = load_err(MINI, &["stage.gpro.steps=10"]);
    assert_eq!(e.message(), "`--set` names unknown stage `gpro`");
    assert_eq!(at(&e), ("<--set #1>".to_string(), 1, 7));
    assert_eq!(e.help(), Some("did you mean `grpo`?"));

    let e = load_err(MINI, &["grpo.steps=\"ten\""]);
    assert!(
        e.message().starts_with("parameter `steps` of stage `grpo` (kind `grpo`): invalid type"),
        "{}",
        e.message()
    );
    assert_eq!(at(&e), ("<--set #1>".to_string(), 1, 12));
    assert!(e.to_string().contains("1 | grpo.steps=\"ten\"\n  |            ^^^^^"), "{e}");

    let e = load_err(MINI, &["grpo.stesp=3"]);
    assert_eq!(at(&e), ("<--set #1>".to_string(), 1, 6));
    assert_eq!(e.help(), Some("did you mean `steps`?"));
}

#[test]
fn digest_follows_content_not_formatting() {
    let a = load(MINI, &[]).unwrap();
    let b = load(&MINI.replace("cases = 40", "cases   =   40 # comment"), &[]).unwrap();
    let c = load(MINI, &["volumes.cases=41"]).unwrap();
    assert_eq!(a.digest, b.digest);
    assert_ne!(a.digest, c.digest);
    assert_eq!(a.digest.len(), 64);
}

#[test]
fn stage_selectors() {
    let src = format!(
        "{MINI}{SWEEP}\n[sweep.slicing]\nstage = \"slices\"\nvariants = {{ a = {{ box_min_area = 900 }}, b = {{}} }}\n"
    );
    let r = load(&src, &[]).unwrap();
    let sel = |s: &str| resolve_stage_selector(&r, s).map(|v| v.iter().map(|d| d.id.clone()).collect::<Vec<_>>());
    assert_eq!(sel("grpo").unwrap(), ["grpo@no_validity+a", "grpo@no_validity+b", "grpo@all+a", "grpo@all+b"]);
    assert_eq!(sel("grpo@all+a").unwrap(), ["grpo@all+a"]);
    assert_eq!(sel("grpo@a").unwrap(), ["grpo@no_validity+a", "grpo@all+a"]);
    assert_eq!(sel("volumes").unwrap(), ["volumes"]);
    let e = sel("reprot").unwrap_err();
    assert_eq!(e.message(), "no stage `reprot` in recipe `mini`");
    assert_eq!(e.help(), Some("did you mean `report`?"));
}

#[test]
fn every_error_kind_has_a_location() {
    // A compact cross-check that no recipe error path forgets its location.
    let cases: BTreeMap<&str, String> = BTreeMap::from([
        ("stage not a table", format!("{MINI}\n[stage]\nextra = 3\n")),
        ("variant kind", format!("{MINI}{}", SWEEP.replace("all = {}", "all = { kind = \"eval\" }"))),
        ("bad stage name", MINI.replace("[stage.report]", "[stage.\"re.port\"]")),
        ("ref not a string", MINI.replace("input = \"slices\"", "input = 3")),
    ]);
    for (what, src) in cases {
        let e = load_err(&src, &[]);
        assert!(e.loc().is_some(), "{what}: {e}");
    }
}

#[test]
fn executor_table_is_parsed_with_defaults_and_stage_overrides() {
    use crate::recipe::{ExecutorKind, StageOverride};
    let r = load(MINI, &[]).unwrap();
    assert_eq!(r.executor.kind, ExecutorKind::Local);
    assert_eq!(r.executor.slurm.poll_interval_s, 5.0);
    let src = format!(
        "{MINI}\n[executor]\nkind = \"slurm\"\npartition = \"gpu\"\naccount = \"lab\"\ntime = \"02:00:00\"\nqos = \"normal\"\nextra_args = [\"--constraint=a100\"]\npoll_interval = 0.5\nmax_resubmits = 4\nlog_dir = \"logs\"\n[executor.stage.grpo]\ncpus = 8\ngpus = 2\nmem = \"64G\"\ntime = 90\n"
    );
    let r = load(&src, &["executor.account=other"]).unwrap();
    let s = &r.executor.slurm;
    assert_eq!(r.executor.kind, ExecutorKind::Slurm);
    assert_eq!((s.partition.as_deref(), s.account.as_deref()), (Some("gpu"), Some("other")));
    assert_eq!((s.time.as_deref(), s.qos.as_deref()), (Some("02:00:00"), Some("normal")));
    assert_eq!(s.extra_args, ["--constraint=a100"]);
    assert_eq!((s.poll_interval_s, s.max_resubmits), (0.5, 4));
    assert_eq!(s.log_dir.as_deref(), Some(Path::new("logs")));
    let grpo =
        StageOverride { ranks: None, cpus: Some(8), gpus: Some(2), mem_mb: Some(65536), time: Some("90".into()) };
    assert_eq!(r.executor.stage_override("grpo", "grpo"), grpo);
    assert_eq!(r.executor.stage_override("eval", "eval"), StageOverride::default());
    // The executor never enters a key, but a --set of it is a recipe value like any other.
    assert_eq!(load(&src, &["executor.kind=local"]).unwrap().executor.kind, ExecutorKind::Local);
}

#[test]
fn executor_mistakes_are_located() {
    let base = format!("{MINI}\n[executor]\nkind = \"slurm\"\n");
    let e = load_err(&format!("{base}partiton = \"gpu\"\n"), &[]);
    assert_eq!(e.message(), "unknown key `partiton` in `[executor]`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 33, 1));
    assert_eq!(e.help(), Some("did you mean `partition`?"));

    let e = load_err(&format!("{MINI}\n[executor]\nkind = \"pbs\"\n"), &[]);
    assert_eq!(e.message(), "unknown executor kind `pbs`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 32, 8));

    let e = load_err(&format!("{base}[executor.stage.evl]\ncpus = 2\n"), &[]);
    assert_eq!(e.message(), "`[executor.stage.evl]` names no stage of the recipe");
    assert_eq!(e.help(), Some("did you mean `eval`?"));
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 33, 17));

    let e = load_err(&format!("{base}[executor.stage.eval]\ngpu = 1\n"), &[]);
    assert_eq!(e.message(), "unknown key `gpu` in `[executor.stage.eval]`");
    assert_eq!(e.help(), Some("did you mean `gpus`?"));

    let e = load_err(&format!("{base}[executor.stage.eval]\nmem = \"lots\"\n"), &[]);
    assert_eq!(e.message(), "`executor.stage.eval.mem` must be a memory size, found string");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 34, 7));

    let e = load_err(&format!("{base}[executor.stage.eval]\nranks = 2\n"), &[]);
    assert!(e.message().starts_with("stage `eval` (kind `"), "{}", e.message());
    assert!(e.message().ends_with("runs as one process: `ranks` must be 1"), "{}", e.message());
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 34, 9));
    assert!(load(&format!("{base}[executor.stage.eval]\nranks = 1\n"), &[]).is_ok());

    let e = load_err(&format!("{base}time = \"2h\"\n"), &[]);
    assert_eq!(e.message(), "`executor.time`: `2h` is not a Slurm time limit");

    let e = load_err(&base, &["executor.poll_interval=0"]);
    assert_eq!(e.message(), "`executor.poll_interval` must be a number of seconds in (0, 3600], found integer");
    assert_eq!(at(&e).0, "<--set #1>");
}

// ---- bounds on every input ---------------------------------------------------

#[test]
fn params_out_of_their_declared_range_point_at_the_value_and_name_the_range() {
    let e = load_err(&MINI.replace("[stage.grpo]\n", "[stage.grpo]\nsteps = 1000000000000\n"), &[]);
    assert_eq!(
        e.message(),
        "parameter `steps` of stage `grpo` (kind `grpo`): 1000000000000 is out of range: expected 1..=100000"
    );
    let loc = e.loc().unwrap();
    assert_eq!((loc.col, loc.len), (9, 13), "{e}");
    // Nested keys, from `--set`.
    let e = load_err(MINI, &["grpo.reward_weights.format=11"]);
    assert_eq!(
        e.message(),
        "parameter `reward_weights.format` of stage `grpo` (kind `grpo`): 11 is out of range: expected 0.0..=10.0"
    );
    assert_eq!(at(&e), ("<--set #1>".to_string(), 1, 28));
    // The boundaries themselves are in range.
    load(MINI, &["grpo.steps=100000", "grpo.reward_weights.format=10"]).unwrap();
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn recipe_files_above_the_size_limit_are_refused_before_being_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let filler = format!("# {}\n", "x".repeat(1023)).repeat((MAX_RECIPE_BYTES / 1024) as usize + 1);
    let big = write(dir.path(), "big.toml", &format!("{MINI}{filler}"));
    let e = load_recipe(&big, &[], &registry()).unwrap_err();
    assert!(e.message().starts_with("cannot read recipe `"), "{e}");
    assert!(e.message().ends_with("may hold at most 4 MiB"), "{e}");

    // An `extends` chain counts as one recipe: each file fits, together they do not.
    let half = format!("# {}\n", "x".repeat(1023)).repeat((MAX_RECIPE_BYTES / 1024 / 2) as usize);
    write(dir.path(), "base.toml", &format!("{MINI}{half}"));
    write(dir.path(), "middle.toml", &format!("[recipe]\nextends = \"base.toml\"\n{half}"));
    let top = write(dir.path(), "top.toml", "[recipe]\nextends = \"middle.toml\"\n");
    let e = load_recipe(&top, &[], &registry()).unwrap_err();
    assert!(e.message().starts_with("cannot read extended recipe `"), "{e}");
    assert!(e.message().contains("base.toml"), "{e}");
    assert!(e.loc().unwrap().file.ends_with("middle.toml"), "{e}");
    // Without the filler of the middle file, it loads.
    write(dir.path(), "middle.toml", "[recipe]\nextends = \"base.toml\"\n");
    load_recipe(&top, &[], &registry()).unwrap();

    let text = format!("{MINI}{filler}");
    let e = load_recipe_str(&text, Path::new("r.toml"), &[], &registry()).unwrap_err();
    assert!(e.message().ends_with("may hold at most 4 MiB"), "{e}");
}

#[cfg(unix)]
#[test]
fn devices_fifos_and_directories_are_refused_as_recipes() {
    let dir = tempfile::tempdir().unwrap();
    let top = write(dir.path(), "r.toml", "[recipe]\nextends = \"/dev/zero\"\n");
    let e = load_recipe(&top, &[], &registry()).unwrap_err();
    assert_eq!(e.message(), "cannot read extended recipe `/dev/zero`: it is a character device, not a regular file");
    assert_eq!(at(&e).1, 2);

    let fifo = dir.path().join("fifo.toml");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // Nobody writes to the FIFO: reading it would block forever.
    let e = load_recipe(&fifo, &[], &registry()).unwrap_err();
    assert!(e.message().ends_with("it is a FIFO, not a regular file"), "{e}");
    write(dir.path(), "r.toml", "[recipe]\nextends = \"fifo.toml\"\n");
    let e = load_recipe(&top, &[], &registry()).unwrap_err();
    assert!(e.message().ends_with("it is a FIFO, not a regular file"), "{e}");

    let e = load_recipe(dir.path(), &[], &registry()).unwrap_err();
    assert!(e.message().ends_with("it is a directory, not a regular file"), "{e}");
}

#[test]
fn errors_about_huge_or_deeply_nested_values_stay_short() {
    // A 1 MB string that is never closed: a TOML syntax error on a 1 MB line.
    let src = format!("{MINI}[stage.report]\ntitle = \"{}\n", "a".repeat(1_000_000));
    let shown = load_err(&src, &[]).to_string();
    assert!(shown.len() < 1024, "{} bytes: {}", shown.len(), &shown[..shown.len().min(2000)]);
    assert!(shown.starts_with("error: invalid TOML"), "{shown}");

    // A 1 MB string of the wrong type: serde's message quotes the value.
    let src = MINI.replace("[stage.grpo]\n", &format!("[stage.grpo]\nsteps = \"{}\"\n", "a".repeat(1_000_000)));
    let shown = load_err(&src, &[]).to_string();
    assert!(shown.len() < 1024, "{} bytes", shown.len());
    assert!(shown.contains("invalid type: string"), "{shown}");

    // 100 000 nested arrays: the parser's recursion limit, as a located error.
    let depth = 100_000;
    let src = format!("{MINI}[stage.report]\ntitle = {}{}\n", "[".repeat(depth), "]".repeat(depth));
    let e = load_err(&src, &[]);
    let shown = e.to_string();
    assert!(shown.len() < 1024, "{} bytes", shown.len());
    assert!(e.message().starts_with("invalid TOML"), "{shown}");
    assert_eq!(at(&e).1, MINI.lines().count() + 2, "{shown}");
}

#[test]
fn stage_names_and_the_ids_made_of_them_are_limited() {
    let long = "s".repeat(names::MAX_NAME_CHARS + 1);
    let e = load_err(&format!("{MINI}[stage.{long}]\nkind = \"phantom\"\n"), &[]);
    assert!(e.message().starts_with("stage name `sss"), "{e}");
    assert!(e.message().ends_with("is 65 characters long: at most 64 are allowed"), "{e}");
    load(&format!("{MINI}[stage.{}]\nkind = \"phantom\"\n", &long[1..]), &[]).unwrap();

    // A stage varying with three sweeps of 64-character variant names.
    let chain = |last: &str| {
        let [a, b, c] = ["a", "b", "c"].map(|x| x.repeat(names::MAX_NAME_CHARS));
        format!(
            "[stage.v]\nkind = \"phantom\"\n[stage.s]\nkind = \"lesion_slices\"\ninput = \"v\"\n\
             [stage.{last}]\nkind = \"split\"\ninput = \"s\"\n\
             [sweep.x]\nstage = \"v\"\nvariants = {{ {a} = {{}} }}\n\
             [sweep.y]\nstage = \"s\"\nvariants = {{ {b} = {{}} }}\n\
             [sweep.z]\nstage = \"{last}\"\nvariants = {{ {c} = {{}} }}\n"
        )
    };
    let r = load(&chain("ppppp"), &[]).unwrap();
    assert_eq!(r.stages[2].id.len(), names::MAX_STAGE_ID_BYTES);
    let e = load_err(&chain("pppppp"), &[]);
    assert!(e.message().ends_with("is 201 characters long: at most 200 are allowed"), "{e}");
    assert_eq!(at(&e).1, 6, "points at the stage's header: {e}");
}

#[test]
fn recipe_names_must_make_valid_directory_names() {
    let e = load_err(&MINI.replace("name = \"mini\"", "name = \"../../x\""), &[]);
    assert_eq!(e.message(), "recipe name `../../x` starts with `.`");
    assert_eq!(at(&e), ("recipes/mini.toml".to_string(), 2, 8));
    let e = load_err(&MINI.replace("name = \"mini\"", &format!("name = \"{}\"", "r".repeat(101))), &[]);
    assert!(e.message().ends_with("is 101 bytes long: at most 100 are allowed"), "{e}");
    // The default name is the file's: a file named `..toml` has none usable.
    let src = MINI.replace("name = \"mini\"\n", "");
    let e = load_recipe_str(&src, Path::new("dir/..toml"), &[], &registry()).unwrap_err();
    assert!(e.message().contains("(it is the recipe file's name)"), "{e}");
}

#[test]
fn executor_counts_have_ranges() {
    let e = load_err(&format!("{MINI}[executor.stage.grpo]\nranks = 1000000000\n"), &[]);
    assert_eq!(e.message(), "`executor.stage.grpo.ranks` = 1000000000 is out of range: expected 1..=1024");
    let e = load_err(&format!("{MINI}[executor.stage.grpo]\ncpus = 0\n"), &[]);
    assert_eq!(e.message(), "`executor.stage.grpo.cpus` = 0 is out of range: expected 1..=4096");
    let e = load_err(&format!("{MINI}[executor]\nmax_resubmits = 5000000000\n"), &[]);
    assert!(e.message().ends_with("expected 0..=100"), "{e}");
}

#[test]
fn numerics_defaults_to_fast_and_is_checked() {
    use crate::numerics::{Numerics, NumericsMode};
    assert_eq!(load(MINI, &[]).unwrap().numerics, Numerics::default());
    let r = load(MINI, &["recipe.numerics=reproducible", "recipe.numerics_threads=2"]).unwrap();
    assert_eq!(r.numerics, Numerics { mode: NumericsMode::Reproducible, threads: 2 });
    let err = load_err(MINI, &["recipe.numerics=turbo"]);
    assert!(err.to_string().contains(r#"must be "fast" or "reproducible", found "turbo""#), "{err}");
    let err = load_err(MINI, &["recipe.numerics_threads=0"]);
    assert!(err.to_string().contains("`recipe.numerics_threads` must be an integer from 1 to 1024, found 0"), "{err}");
}
