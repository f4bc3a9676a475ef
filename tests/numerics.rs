//! `[recipe] numerics` through the real binary, on a small `recipes/ci.toml`
//! (8 phantom cases, 8 SFT steps, 2 GRPO steps):
//! * reproducible mode gives the same SFT weights and loss / grad-norm curve
//!   whatever kernels and cores the process was started with
//!   (`ATEN_CPU_CAPABILITY`, `taskset`) and with 1 or 2 intra-op threads;
//!   fast mode does not;
//! * the same settings twice give the same `sft` and `grpo` output bytes.
//!
//! Each run is a separate process: the kernel selection is per process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Data small enough for a few seconds per stage; SFT and GRPO long
/// enough to take several optimizer steps with clipping.
const SMALL: &[&str] = &[
    "--set",
    "stage.volumes.cases=8",
    "--set",
    "stage.sft.max_steps=8",
    "--set",
    "stage.grpo.steps=2",
    "--set",
    "stage.grpo.checkpoint_every=1",
];

/// Variables that select kernels or threads: cleared for every run so the
/// caller's environment does not leak in; each run sets its own.
const KNOBS: &[&str] = &[
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
];

struct Run<'a> {
    cache: &'a Path,
    workspace: &'a Path,
    /// Extra environment of the process.
    env: &'a [(&'a str, &'a str)],
    /// `taskset -c` core list (the cores a host gives the process), if any.
    cores: Option<&'a str>,
}

impl Run<'_> {
    fn pipeline(&self, args: &[&str]) -> Output {
        let bin = env!("CARGO_BIN_EXE_pipeline");
        let mut cmd = match self.cores {
            Some(cores) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cores, bin]);
                c
            }
            None => Command::new(bin),
        };
        for k in KNOBS {
            cmd.env_remove(k);
        }
        let cache = self.cache.to_str().expect("utf8 path");
        let out = cmd
            .args(args)
            .args(["--cache-dir", cache])
            .args(SMALL)
            .envs(self.env.iter().copied())
            .env("PIPELINE_WORKSPACE", self.workspace)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running pipeline");
        assert!(
            out.status.success(),
            "pipeline {args:?} with {:?} on cores {:?} failed:\n{}{}",
            self.env,
            self.cores,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What a training run leaves that must be reproducible: the weights' bytes
/// and the `[step, loss, grad_norm]` rows of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trained {
    weights: String,
    curve: Vec<String>,
}

fn trained(stage_dir: &Path) -> Trained {
    let weights = blake3::hash(&std::fs::read(stage_dir.join("model.safetensors")).expect("weights")).to_hex();
    let metrics = std::fs::read_to_string(stage_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let curve = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("metrics row"))
        .filter(|row| row.get("loss").is_some())
        .map(|row| format!("{} {} {}", row["step"], row["loss"], row["grad_norm"]))
        .collect();
    Trained { weights: weights.to_string(), curve }
}

/// blake3 of every output file but `provenance.json` (times, hosts).
fn output_bytes(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.file_name().is_some_and(|n| n != "provenance.json") {
                let digest = blake3::hash(&std::fs::read(&path).expect("output file")).to_hex().to_string();
                out.insert(path.strip_prefix(root).expect("under root").to_path_buf(), digest);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    assert!(!out.is_empty(), "no outputs in {}", dir.display());
    out
}

fn has_taskset() -> bool {
    Command::new("taskset").arg("-V").output().is_ok_and(|o| o.status.success())
}

#[test]
fn reproducible_sft_ignores_host_kernels_and_threads_and_fast_does_not() {
    assert!(has_taskset(), "this test needs `taskset` (util-linux) to give the process 1 or 2 cores");
    let two_cores = std::thread::available_parallelism().map(|n| n.get() >= 2).unwrap_or(false);
    let (one, both) = ("0", if two_cores { "0-1" } else { "0" });
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cache, ws) = (tmp.path().join("cache"), tmp.path().to_path_buf());
    let sft_dir = ws.join("outputs/ci/sft");
    let base = Run { cache: &cache, workspace: &ws, env: &[], cores: None };
    base.pipeline(&["run", "recipes/ci.toml", "--until", "sft"]);
    let provenance = json(&sft_dir.join("provenance.json"));
    assert_eq!(provenance["numerics"]["mode"], "reproducible", "{provenance}");
    assert_eq!(provenance["numerics"]["env"]["MKL_CBWR"], "AVX2,STRICT", "{provenance}");
    assert_eq!(provenance["threads"], 1, "{provenance}");

    // (ATen capability the process is started with, its cores, numerics_threads)
    let settings = [("default", one, "1"), ("avx512", both, "1"), ("default", both, "2"), ("avx2", one, "2")];
    let mut reproducible = Vec::new();
    for (cap, cores, threads) in settings {
        let env = [("ATEN_CPU_CAPABILITY", cap), ("MKL_CBWR", "COMPATIBLE"), ("OMP_NUM_THREADS", "3")];
        let run = Run { cache: &cache, workspace: &ws, env: &env, cores: Some(cores) };
        let set_threads = format!("recipe.numerics_threads={threads}");
        run.pipeline(&["run", "recipes/ci.toml", "--until", "sft", "--force", "sft", "--set", &set_threads]);
        let prov = json(&sft_dir.join("provenance.json"));
        assert_eq!(prov["threads"].to_string(), threads, "the stage runs with numerics_threads: {prov}");
        assert_eq!(prov["numerics"]["env"]["ATEN_CPU_CAPABILITY"], "avx2", "pinned over the caller's: {prov}");
        reproducible.push(((cap, cores, threads), trained(&sft_dir)));
    }
    let (first_setting, first) = &reproducible[0];
    assert!(first.curve.len() >= 8, "expected 8 logged steps: {:?}", first.curve);
    for (setting, t) in &reproducible[1..] {
        assert_eq!(t, first, "reproducible mode: {setting:?} differs from {first_setting:?}");
    }

    // Fast mode: the same two kernel selections and core counts give other bits.
    let mut fast = Vec::new();
    for (cap, cores) in [("default", one), ("avx512", both)] {
        let env = [("ATEN_CPU_CAPABILITY", cap)];
        let run = Run { cache: &cache, workspace: &ws, env: &env, cores: Some(cores) };
        run.pipeline(&["run", "recipes/ci.toml", "--until", "sft", "--force", "sft", "--set", "recipe.numerics=fast"]);
        let prov = json(&sft_dir.join("provenance.json"));
        assert_eq!(prov["numerics"]["mode"], "fast", "{prov}");
        fast.push(trained(&sft_dir));
    }
    assert_ne!(fast[0], fast[1], "fast mode gave the same bits for ATen `default` on 1 core and `avx512` on {both}");
}

#[test]
fn same_settings_twice_give_the_same_sft_and_grpo_outputs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cache, ws) = (tmp.path().join("cache"), tmp.path().to_path_buf());
    let run = Run { cache: &cache, workspace: &ws, env: &[], cores: None };
    let outputs = |stage: &str| output_bytes(&ws.join("outputs/ci").join(stage));
    run.pipeline(&["run", "recipes/ci.toml", "--until", "grpo"]);
    let (sft, grpo) = (outputs("sft"), outputs("grpo"));
    assert!(grpo.contains_key(Path::new("model.safetensors")), "{grpo:?}");
    run.pipeline(&["run", "recipes/ci.toml", "--until", "grpo", "--force-downstream", "sft"]);
    assert_eq!(outputs("sft"), sft, "sft: two runs with the same settings differ");
    assert_eq!(outputs("grpo"), grpo, "grpo: two runs with the same settings differ");
}
