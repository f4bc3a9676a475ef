//! The engine under hostile process conditions: killed mid-stage,
//! interrupted, and two runs sharing one cache.

mod engine_support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use engine_support::{Workspace, statuses, with_status};

fn slow_recipe(delay_ms: u64) -> String {
    format!(
        r#"
[recipe]
name = "slow"

[stage.slow]
kind = "text"
text = "done\n"
repeat = 2
delay_ms = {delay_ms}

[stage.sum]
kind = "checksum"
input = "slow"
"#
    )
}

/// Wait until the stage `slow` has started (its log file exists).
fn wait_for_stage_start(cache: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let started = std::fs::read_dir(cache.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|run| run.path().join("slow.log").exists());
        if started {
            // Let it get into the stage body.
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "run ended before the stage started");
        assert!(Instant::now() < deadline, "stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_mid_stage_leaves_nothing_reusable_and_next_run_completes() {
    let ws = Workspace::new();
    let recipe = ws.write("slow.toml", &slow_recipe(1500));
    let r = recipe.to_str().unwrap();
    let mut child = ws.command(&["run", r]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_stage_start(&ws.cache(), &mut child);
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();

    let plan = ws.run(&["plan", r]).ok().stdout;
    assert!(plan.contains("2 to run, 0 cached"), "a killed stage must not look cached:\n{plan}");
    let summary = ws.run(&["run", r]).ok().summary();
    assert_eq!(with_status(&summary, "ran"), vec!["slow", "sum"]);
    let text = std::fs::read_to_string(ws.path().join("outputs/slow/slow/text.txt")).unwrap();
    assert_eq!(text, "done\ndone\n");
}

#[test]
fn sigterm_cancels_the_run_without_publishing() {
    let ws = Workspace::new();
    let recipe = ws.write("slow.toml", &slow_recipe(20_000));
    let r = recipe.to_str().unwrap();
    let mut child = ws.command(&["run", r]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_stage_start(&ws.cache(), &mut child);
    let t0 = Instant::now();
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(15), "the stage did not notice the cancellation");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));

    let plan = ws.run(&["plan", r]).ok().stdout;
    assert!(plan.contains("2 to run, 0 cached"), "{plan}");
    // The summary of the cancelled run says so.
    let runs: Vec<_> = std::fs::read_dir(ws.path().join("runs")).unwrap().flatten().collect();
    assert_eq!(runs.len(), 1);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs[0].path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "cancelled");
    assert_eq!(statuses(&summary)["sum"], "not_run");
}

#[test]
fn two_concurrent_runs_on_one_cache_agree() {
    let ws = Workspace::new();
    let recipe = ws.write("slow.toml", &slow_recipe(700));
    let r = recipe.to_str().unwrap();
    let a = ws.command(&["run", r]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let b = ws.command(&["run", r]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let summary = |o: &std::process::Output| {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{text}\n{}", String::from_utf8_lossy(&o.stderr));
        let path = text.lines().find_map(|l| l.split_once("summary: ").map(|(_, p)| p.trim().to_string())).unwrap();
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let (sa, sb) = (summary(&a), summary(&b));
    for i in 0..2 {
        assert_eq!(sa["stages"][i]["key"], sb["stages"][i]["key"]);
        assert_eq!(sa["stages"][i]["output"], sb["stages"][i]["output"]);
    }
    // The slow stage ran once; the other run waited on its lock and reused it.
    let ran = [&sa, &sb].iter().filter(|s| statuses(s)["slow"] == "ran").count();
    assert_eq!(ran, 1, "{sa}\n{sb}");
}
