//! Cache keys are a promise to users: a refactor that changes no stage's
//! behaviour must not change any key (or every lab's cache goes cold).
//! `tests/fixtures/stage_keys.json` holds the keys `pipeline plan --json`
//! computes on an empty cache for every shipped recipe (provisional keys:
//! an upstream's planned key stands in for its output digest, so the whole
//! chain is covered without running anything). When a stage's results
//! change on purpose, its kind version is bumped and the fixture is
//! regenerated with `UPDATE_STAGE_KEYS=1 cargo test --test stage_keys`;
//! the diff of the fixture then lists exactly the stages whose keys moved.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

const FIXTURE: &str = "tests/fixtures/stage_keys.json";

fn recipe_files(dir: &Path, root: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("recipes dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            recipe_files(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path.strip_prefix(root).expect("relative").display().to_string());
        }
    }
}

/// stage id -> {kind, version, key} of one recipe, planned on an empty cache.
fn planned_keys(recipe: &str, cache: &Path, workspace: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["plan", recipe, "--json", "--cache-dir", cache.to_str().expect("utf8")])
        .env("PIPELINE_WORKSPACE", workspace)
        // Keys carry the device class of device-using stages: plan as a CPU host.
        .env("CUDA_VISIBLE_DEVICES", "")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running pipeline");
    assert!(
        out.status.success(),
        "plan {recipe} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).expect("plan --json prints JSON");
    let mut stages = BTreeMap::new();
    for s in plan["stages"].as_array().expect("stages") {
        stages.insert(
            s["id"].as_str().expect("id").to_string(),
            json!({"kind": s["kind"], "version": s["version"], "key": s["key"]}),
        );
    }
    json!(stages)
}

#[test]
fn stage_keys_of_every_shipped_recipe_are_unchanged() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut recipes = Vec::new();
    recipe_files(&root.join("recipes"), root, &mut recipes);
    recipes.sort();
    let mut now = BTreeMap::new();
    for recipe in &recipes {
        // A fresh cache per recipe: nothing cached, every key planned the same way.
        let cache = tmp.path().join(recipe.replace('/', "_"));
        now.insert(recipe.clone(), planned_keys(recipe, &cache, tmp.path()));
    }
    let now = json!(now);
    let fixture = root.join(FIXTURE);
    if std::env::var_os("UPDATE_STAGE_KEYS").is_some() {
        let text = serde_json::to_string_pretty(&now).expect("json") + "\n";
        std::fs::write(&fixture, text).expect("writing the fixture");
        return;
    }
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture).expect("reading the fixture")).expect("fixture JSON");
    let mut changed = Vec::new();
    for recipe in &recipes {
        let (before, after) = (&recorded[recipe.as_str()], &now[recipe.as_str()]);
        if before.is_null() {
            changed.push(format!("{recipe}: not in the fixture"));
            continue;
        }
        for (id, stage) in after.as_object().expect("stages") {
            if before[id] != *stage {
                changed.push(format!("{recipe} {id}: {} -> {stage}", before[id]));
            }
        }
        for id in before.as_object().expect("stages").keys() {
            if after[id].is_null() {
                changed.push(format!("{recipe} {id}: stage gone"));
            }
        }
    }
    assert!(
        changed.is_empty(),
        "stage keys changed (bump the kind version and regenerate the fixture only if the results changed):\n{}",
        changed.join("\n")
    );
}
