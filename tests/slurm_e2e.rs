//! `recipes/ci.toml` through a real single-node Slurm cluster started by
//! `tools/setup-slurm.sh`: every stage an `sbatch` job running
//! `pipeline exec-stage`, the jobs visible in `sacct`, a rerun submitting
//! nothing, and the outputs identical to a local run's.
//!
//! Skips (printing why) only where Slurm cannot start; under `CI` as root it
//! must run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Start (or find) the cluster; `Err(reason)` when Slurm cannot run here.
fn cluster() -> Result<(), String> {
    let out = Command::new("bash").arg(repo().join("tools/setup-slurm.sh")).output().expect("running setup-slurm.sh");
    match out.status.code() {
        Some(0) => Ok(()),
        Some(3) => Err(text(&out).trim().to_string()),
        _ => panic!("tools/setup-slurm.sh failed ({}):\n{}", out.status, text(&out)),
    }
}

fn pipeline(args: &[&str], workspace: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .env("PIPELINE_WORKSPACE", workspace)
        .current_dir(repo())
        .output()
        .expect("running pipeline")
}

/// The run summary named on the last line of `pipeline run`.
fn summary(out: &Output) -> serde_json::Value {
    let all = text(out);
    let path = all
        .lines()
        .rev()
        .find_map(|l| l.split_once("summary: ").map(|(_, p)| p.trim().to_string()))
        .unwrap_or_else(|| panic!("no summary path in:\n{all}"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("summary.json")).expect("summary json")
}

/// (stage id, (status, key)) in the summary's (topological) order.
fn stages(summary: &serde_json::Value) -> Vec<(String, (String, String))> {
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            (field("id"), (field("status"), field("key")))
        })
        .collect()
}

/// The files of a cached output (path -> blake3), without provenance.json.
fn files(cache: &Path, key: &str) -> BTreeMap<String, String> {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cache.join("records").join(format!("{key}.json"))).unwrap())
            .unwrap();
    record["manifest"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["path"] != "provenance.json")
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["digest"].as_str().unwrap().to_string()))
        .collect()
}

/// `recipes/ci.toml` made small: every stage still runs (as a Slurm job),
/// on less data and fewer steps. What the ci recipe learns is checked by
/// `tests/recipes_e2e.rs`; this test is about the executor, and runs the
/// recipe twice (locally and on Slurm), so it must be cheap.
const SMALL: [&str; 9] = [
    "volumes.cases=12",
    "sft.epochs=1",
    "grpo.steps=2",
    "grpo.checkpoint_every=1",
    "eval.max_new_tokens=16",
    "eval_sft.max_new_tokens=16",
    "eval_nothink.max_new_tokens=16",
    "eval_general_sft.max_new_tokens=16",
    "eval_general.max_new_tokens=16",
];

#[test]
fn ci_recipe_runs_through_a_real_slurm_cluster() {
    if let Err(reason) = cluster() {
        if std::env::var_os("CI").is_some() && is_root() {
            panic!("Slurm must run in CI (root here), but it cannot start:\n{reason}");
        }
        eprintln!("SKIPPED ci_recipe_runs_through_a_real_slurm_cluster: Slurm cannot start here:\n{reason}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (local_cache, slurm_cache): (PathBuf, PathBuf) = (tmp.path().join("local"), tmp.path().join("slurm"));
    let (local_ws, slurm_ws) = (tmp.path().join("ws-local"), tmp.path().join("ws-slurm"));

    let mut local_args =
        vec!["run", "recipes/ci.toml", "--executor", "local", "--cache-dir", local_cache.to_str().unwrap()];
    local_args.extend(SMALL.iter().flat_map(|s| ["--set", s]));
    let local = pipeline(&local_args, &local_ws);
    assert!(local.status.success(), "local run failed:\n{}", text(&local));

    // One node is the "shared" filesystem: the cache is on the local disk.
    let mut slurm_args = vec![
        "run",
        "recipes/ci.toml",
        "--executor",
        "slurm",
        "--set",
        "executor.poll_interval=0.5",
        "--cache-dir",
        slurm_cache.to_str().unwrap(),
    ];
    slurm_args.extend(SMALL.iter().flat_map(|s| ["--set", s]));
    let first = pipeline(&slurm_args, &slurm_ws);
    let first_text = text(&first);
    assert!(first.status.success(), "Slurm run failed:\n{first_text}");
    let ran = stages(&summary(&first));
    assert!(ran.iter().all(|(_, (status, _))| status == "ran"), "{ran:?}\n{first_text}");

    // Every stage was a Slurm job, and accounting knows each one finished.
    let jobs: Vec<String> = first_text
        .lines()
        .filter_map(|l| l.split_once("(Slurm job ").and_then(|(_, rest)| rest.split(',').next()).map(str::to_string))
        .collect();
    assert_eq!(jobs.len(), ran.len(), "one job per stage:\n{first_text}");
    // slurmdbd records jobs asynchronously (a just-finished job can still
    // show a placeholder name such as `allocation`): ask again for a while.
    let mut tries = 0;
    let (sacct, sacct_text) = loop {
        let sacct = Command::new("sacct")
            .args(["-n", "-P", "-X", "-o", "JobID,JobName,State", "-j", &jobs.join(",")])
            .output()
            .expect("sacct");
        let sacct_text = String::from_utf8_lossy(&sacct.stdout).to_string();
        let recorded = jobs.iter().all(|job| {
            sacct_text.lines().any(|l| {
                l.split('|').next() == Some(job.as_str()) && l.ends_with("|COMPLETED") && l.contains("|pl-ci-")
            })
        });
        tries += 1;
        if recorded || tries >= 30 {
            break (sacct, sacct_text);
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    for job in &jobs {
        let line = sacct_text.lines().find(|l| l.split('|').next() == Some(job.as_str()));
        let line = line.unwrap_or_else(|| panic!("sacct does not know job {job}:\n{sacct_text}{}", text(&sacct)));
        assert!(line.ends_with("|COMPLETED") && line.contains("|pl-ci-"), "{line}");
    }

    // A rerun submits nothing.
    let second = pipeline(&slurm_args, &slurm_ws);
    let second_text = text(&second);
    assert!(second.status.success() && second_text.contains(": 0 ran,"), "rerun ran something:\n{second_text}");
    assert!(!second_text.contains("(Slurm job "), "rerun submitted a job:\n{second_text}");

    // The same keys and bytes as the local executor's run, for every stage:
    // outputs hold results only (timings and where a training stage resumed
    // from go to provenance.json, which no digest covers), so identical
    // inputs give identical outputs and every downstream key stays.
    let local_stages: BTreeMap<String, (String, String)> = stages(&summary(&local)).into_iter().collect();
    assert_eq!(local_stages.len(), ran.len());
    for (id, (_, key)) in &ran {
        let local_key = &local_stages.get(id).unwrap_or_else(|| panic!("no local stage `{id}`")).1;
        assert_eq!(local_key, key, "stage `{id}`: another key under Slurm than locally");
        let (l, r) = (files(&local_cache, key), files(&slurm_cache, key));
        let differing: Vec<&String> = l.keys().chain(r.keys()).filter(|p| l.get(*p) != r.get(*p)).collect();
        assert!(differing.is_empty(), "stage `{id}`: {differing:?} differ between the executors");
    }
}
