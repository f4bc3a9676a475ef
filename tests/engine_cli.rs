//! The engine through the `pipeline` binary: caching, selective reruns,
//! forcing, corruption recovery, failures and recipe errors.

mod engine_support;

use engine_support::{DIAMOND, Workspace, statuses, with_status};

#[test]
fn rerun_reuses_every_stage_and_runs_nothing() {
    let ws = Workspace::new();
    let recipe = ws.write("diamond.toml", DIAMOND);
    let r = recipe.to_str().unwrap();
    let first = ws.run(&["run", r]).ok().summary();
    assert_eq!(with_status(&first, "ran").len(), 4, "{first}");
    assert_eq!(first["status"], "succeeded");

    let plan = ws.run(&["plan", r]).ok();
    assert!(plan.stdout.contains("0 to run, 4 cached"), "{}", plan.stdout);
    let second = ws.run(&["run", r]).ok().summary();
    assert_eq!(with_status(&second, "cached").len(), 4, "{second}");
    assert!(with_status(&second, "ran").is_empty());
    // Same keys both times, and the outputs link points at the cached artifact.
    assert_eq!(first["stages"][3]["key"], second["stages"][3]["key"]);
    let sum = std::fs::read_to_string(ws.path().join("outputs/diamond/sum/provenance.json")).unwrap();
    assert!(sum.contains("\"stage_id\": \"sum\""), "{sum}");
}

#[test]
fn changing_a_param_reruns_only_that_stage_and_its_descendants() {
    let ws = Workspace::new();
    let recipe = ws.write("diamond.toml", DIAMOND);
    let r = recipe.to_str().unwrap();
    ws.run(&["run", r]).ok();

    let plan = ws.run(&["plan", r, "--set", "stage.right.text=changed"]).ok().stdout;
    let line = |id: &str| plan.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_default().to_string();
    assert!(line("right").contains(" run ") && line("right").contains("params changed: right.text"), "{plan}");
    assert!(line("joined").contains("input `parts` changed (upstream `right` will rerun)"), "{plan}");
    assert!(line("sum").contains(" run "), "{plan}");
    assert!(line("left").contains(" cached "), "{plan}");

    let summary = ws.run(&["run", r, "--set", "stage.right.text=changed"]).ok().summary();
    assert_eq!(with_status(&summary, "ran"), vec!["joined", "right", "sum"]);
    assert_eq!(with_status(&summary, "cached"), vec!["left"]);

    // `why` explains against the last run, which is now the changed one.
    let why = ws.run(&["why", r, "right", "--set", "stage.right.text=third"]).ok().stdout;
    assert!(why.contains(r#"right: run (params changed: right.text "changed" -> "third")"#), "{why}");
}

#[test]
fn force_downstream_and_until_select_the_right_stages() {
    let ws = Workspace::new();
    let recipe = ws.write("diamond.toml", DIAMOND);
    let r = recipe.to_str().unwrap();
    ws.run(&["run", r]).ok();

    let plan = ws.run(&["plan", r, "--force-downstream", "joined"]).ok().stdout;
    assert!(plan.contains("forced (--force-downstream of joined)"), "{plan}");
    let summary = ws.run(&["run", r, "--force-downstream", "joined"]).ok().summary();
    assert_eq!(with_status(&summary, "ran"), vec!["joined", "sum"]);
    assert_eq!(with_status(&summary, "cached"), vec!["left", "right"]);

    let summary = ws.run(&["run", r, "--until", "left", "--force"]).ok().summary();
    let st = statuses(&summary);
    assert_eq!(st["left"], "ran");
    assert_eq!((st["right"].as_str(), st["sum"].as_str()), ("not_selected", "not_selected"));
}

#[test]
fn corrupt_blob_is_reported_by_verify_and_recomputed_by_run() {
    let ws = Workspace::new();
    let recipe = ws.write("diamond.toml", DIAMOND);
    let r = recipe.to_str().unwrap();
    let first = ws.run(&["run", r]).ok().summary();
    let out =
        |s: &serde_json::Value| s["stages"].as_array().unwrap().iter().find(|x| x["id"] == "left").unwrap().clone();
    let left_text = std::fs::read_to_string(ws.path().join("outputs/diamond/left/text.txt")).unwrap();

    // Corrupt every blob holding the left stage's text.
    let mut corrupted = 0;
    for entry in walk(&ws.cache().join("blobs")) {
        if std::fs::read_to_string(&entry).is_ok_and(|t| t == left_text) {
            let mut perms = std::fs::metadata(&entry).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&entry, perms).unwrap();
            std::fs::write(&entry, "garbage").unwrap();
            corrupted += 1;
        }
    }
    assert_eq!(corrupted, 1, "expected exactly one blob with the left text");

    let verify = ws.run(&["verify"]);
    assert_eq!(verify.code, 1, "{}", verify.stdout);
    assert!(verify.stdout.contains("corrupt blob"), "{}", verify.stdout);

    let second = ws.run(&["run", r]).ok().summary();
    assert_eq!(statuses(&second)["left"], "ran", "{second}");
    assert_eq!(out(&first)["key"], out(&second)["key"]);
    let again = std::fs::read_to_string(ws.path().join("outputs/diamond/left/text.txt")).unwrap();
    assert_eq!(again, left_text);
    assert_eq!(ws.run(&["verify"]).code, 0);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out
}

#[test]
fn keep_going_runs_independent_branches_and_skips_dependents() {
    let ws = Workspace::new();
    let recipe = ws.write(
        "fail.toml",
        r#"
[recipe]
name = "fail"

[stage.bad]
kind = "text"
fail = true

[stage.after_bad]
kind = "checksum"
input = "bad"

[stage.good]
kind = "text"
text = "fine"
delay_ms = 300

[stage.after_good]
kind = "checksum"
input = "good"
"#,
    );
    let ran = ws.run(&["run", recipe.to_str().unwrap(), "--keep-going"]);
    assert_eq!(ran.code, 1, "{}\n{}", ran.stdout, ran.stderr);
    let summary = ran.summary();
    let st = statuses(&summary);
    assert_eq!(st["bad"], "failed");
    assert_eq!(st["after_bad"], "skipped");
    assert_eq!((st["good"].as_str(), st["after_good"].as_str()), ("ran", "ran"));
    assert!(ran.stderr.contains("error: stage `bad` failed (log: "), "{}", ran.stderr);
    // The log holds the error chain.
    let log = summary["stages"].as_array().unwrap().iter().find(|s| s["id"] == "bad").unwrap()["log"].clone();
    let log = std::fs::read_to_string(log.as_str().unwrap()).unwrap();
    assert!(log.contains("error: stage `bad` (text) failed"), "{log}");
    // Events the stage's span emitted were routed to its file too.
    assert!(log.contains("INFO") && log.contains("running text"), "{log}");
}

#[test]
fn recipe_errors_exit_2_with_file_line_and_column() {
    let ws = Workspace::new();
    let recipe = ws.write("bad.toml", "[recipe]\nname = \"bad\"\n\n[stage.t]\nkind = \"text\"\nrepaet = 3\n");
    let ran = ws.run(&["run", recipe.to_str().unwrap()]);
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("bad.toml:6:1"), "{}", ran.stderr);
    let ran = ws.run(&["plan", recipe.to_str().unwrap(), "--until", "nope"]);
    assert_eq!(ran.code, 2, "{}", ran.stderr);
}

#[test]
fn dag_status_show_and_kinds_describe_the_recipe() {
    let ws = Workspace::new();
    let recipe = ws.write("diamond.toml", DIAMOND);
    let r = recipe.to_str().unwrap();
    let dot = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline")).args(["dag", r, "--dot"]).output().unwrap();
    let dot = String::from_utf8_lossy(&dot.stdout);
    assert!(dot.contains("\"joined\" -> \"sum\""), "{dot}");
    ws.run(&["run", r]).ok();
    let status = ws.run(&["status", r]).ok().stdout;
    assert!(status.lines().any(|l| l.starts_with("sum ") && l.contains(" yes ")), "{status}");
    let show = ws.run(&["show", r, "left"]).ok().stdout;
    assert!(
        show.contains("\"repeat\": 3") && show.contains("text.txt") && show.contains("\"stage_id\": \"left\""),
        "{show}"
    );
    let kinds = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline")).arg("kinds").output().unwrap();
    assert!(String::from_utf8_lossy(&kinds.stdout).contains("checksum"));
}

#[test]
fn gc_keeps_what_recipes_reference_and_clean_drops_stages() {
    let ws = Workspace::new();
    let recipe = ws.write("diamond.toml", DIAMOND);
    let r = recipe.to_str().unwrap();
    ws.run(&["run", r]).ok();
    ws.run(&["run", r, "--set", "stage.right.text=other"]).ok();
    // The current recipe references 4 outputs; the 3 of the --set run are garbage.
    let gc = ws.run(&["gc", r]).ok().stdout;
    assert!(gc.contains("kept 4 outputs") && gc.contains("removed 3 record(s)"), "{gc}");
    assert!(ws.run(&["plan", r]).ok().stdout.contains("0 to run"));
    ws.run(&["clean", r, "sum"]).ok();
    let plan = ws.run(&["plan", r]).ok().stdout;
    assert!(plan.contains("1 to run, 3 cached"), "{plan}");
}

#[test]
fn example_recipes_load_and_plan() {
    let ws = Workspace::new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let plan = ws.run(&["plan", path.to_str().unwrap()]).ok().stdout;
            assert!(plan.contains("to run"), "{plan}");
            assert!(!plan.contains("warning"), "{}: {plan}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2);
}
