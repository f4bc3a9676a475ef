//! Helpers for the engine's integration tests: a temp workspace with its own
//! cache, recipes written into it, and the `pipeline` binary run on them.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    /// The run summary whose path the run printed.
    pub fn summary(&self) -> Value {
        let all = format!("{}\n{}", self.stdout, self.stderr);
        let line = all.lines().find_map(|l| l.split_once("summary: ").map(|(_, p)| p.trim().to_string()));
        let path = line.unwrap_or_else(|| panic!("no summary path in output:\n{all}"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }
}

/// Stage id -> status from a summary.
pub fn statuses(summary: &Value) -> std::collections::BTreeMap<String, String> {
    summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string()))
        .collect()
}

pub fn with_status(summary: &Value, status: &str) -> Vec<String> {
    statuses(summary).into_iter().filter(|(_, s)| s == status).map(|(id, _)| id).collect()
}

impl Workspace {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `pipeline <args> --cache-dir <tmp>/cache` with the temp dir as the
    /// working directory and workspace (runs/ and outputs/ land there).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
        cmd.args(args)
            .arg("--cache-dir")
            .arg(self.cache())
            .current_dir(self.path())
            .env("PIPELINE_WORKSPACE", self.path())
            .env("CI", "1")
            .env_remove("RUST_LOG")
            .env_remove("PIPELINE_CACHE_DIR");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Ran {
        Ran::from(self.command(args).output().unwrap())
    }
}

/// A diamond over the basic stages: left, right -> joined -> sum.
pub const DIAMOND: &str = r#"
[recipe]
name = "diamond"
seed = 7

[stage.left]
kind = "text"
text = "left\n"
repeat = 3

[stage.right]
kind = "text"
text = "right\n"

[stage.joined]
kind = "concat"
parts = ["left", "right"]

[stage.sum]
kind = "checksum"
input = "joined"
"#;
