//! docs/recipes.md carries a generated reference of every stage kind; it
//! must match the registry of the binary, so it cannot drift.
//! Regenerate with `pipeline kinds --doc docs/recipes.md --write`.

use std::process::Command;

#[test]
fn recipe_reference_matches_the_registry() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["kinds", "--doc", "docs/recipes.md"])
        .current_dir(root)
        .output()
        .expect("running pipeline");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_registered_kind_is_documented() {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline")).args(["kinds"]).output().expect("running pipeline");
    let kinds = String::from_utf8_lossy(&out.stdout);
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/recipes.md")).expect("docs/recipes.md");
    let mut n = 0;
    for line in kinds.lines() {
        let kind = line.split_whitespace().next().expect("kind name");
        assert!(doc.contains(&format!("### `{kind}`")), "`{kind}` missing from docs/recipes.md");
        n += 1;
    }
    assert!(n >= 10, "expected the full registry, got {n} kinds:\n{kinds}");
}
