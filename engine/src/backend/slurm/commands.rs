//! The Slurm command-line tools we call (`sbatch`, `squeue`, `sacct`,
//! `scontrol`, `scancel`) and the parsing of what they print.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Paths of the Slurm tools (plain names: looked up on `PATH`).
#[derive(Debug, Clone)]
pub struct SlurmCommands {
    pub sbatch: PathBuf,
    pub squeue: PathBuf,
    pub sacct: PathBuf,
    pub scontrol: PathBuf,
    pub scancel: PathBuf,
}

impl Default for SlurmCommands {
    fn default() -> Self {
        Self::named(|name| PathBuf::from(name))
    }
}

/// A job's state as Slurm's accounting or controller reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    /// `COMPLETED`, `FAILED`, `NODE_FAIL`, ... (`CANCELLED by 0` -> `CANCELLED`).
    pub state: String,
    /// `exit:signal`, e.g. `1:0`.
    pub exit_code: String,
}

impl SlurmCommands {
    fn named(path: impl Fn(&str) -> PathBuf) -> Self {
        Self {
            sbatch: path("sbatch"),
            squeue: path("squeue"),
            sacct: path("sacct"),
            scontrol: path("scontrol"),
            scancel: path("scancel"),
        }
    }

    /// The tools in `dir` (tests put fakes there).
    pub fn in_dir(dir: &Path) -> Self {
        Self::named(|name| dir.join(name))
    }

    fn output(&self, program: &Path, args: &[String]) -> anyhow::Result<std::process::Output> {
        Command::new(program)
            .args(args)
            .output()
            .with_context(|| format!("running `{}` (is Slurm installed on this host?)", program.display()))
    }

    /// `sbatch --parsable [args] script`: the new job id.
    pub fn submit(&self, script: &Path, args: &[String]) -> anyhow::Result<String> {
        let mut all = vec!["--parsable".to_string()];
        all.extend(args.iter().cloned());
        all.push(script.display().to_string());
        let out = self.output(&self.sbatch, &all)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "sbatch {} failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse_sbatch(&stdout).with_context(|| format!("sbatch printed no job id: {:?}", stdout.trim()))
    }

    /// `squeue -h -j <ids> -o %i|%T`: (id, state) of the listed jobs still
    /// known to the controller. Jobs it forgot are simply absent.
    pub fn queue(&self, ids: &[String]) -> anyhow::Result<Vec<(String, String)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let args = ["-h", "-j", &ids.join(","), "-o", "%i|%T"].map(str::to_string);
        let out = self.output(&self.squeue, &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Every id unknown to the controller: squeue fails saying so.
        if !out.status.success() && !stderr.contains("Invalid job id") {
            bail!("squeue failed ({}): {}", out.status, stderr.trim());
        }
        Ok(parse_squeue(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Final state of a job that left the queue: `sacct` first (the
    /// accounting database), then `scontrol show job` (the controller keeps
    /// finished jobs for `MinJobAge`). `None`: neither knows it (yet).
    pub fn finished_state(&self, id: &str) -> Option<JobState> {
        let args = ["-n", "-P", "-j", id, "-o", "JobID,State,ExitCode"].map(str::to_string);
        let from_sacct = match self.output(&self.sacct, &args) {
            Ok(out) if out.status.success() => parse_sacct(&String::from_utf8_lossy(&out.stdout), id),
            Ok(out) => {
                tracing::debug!("sacct: {}", String::from_utf8_lossy(&out.stderr).trim());
                None
            }
            Err(e) => {
                tracing::debug!("{e:#}");
                None
            }
        };
        // sacct may still show a running state while the database catches up.
        if from_sacct.as_ref().is_some_and(|s| !is_active(&s.state)) {
            return from_sacct;
        }
        let args = ["show", "job", "-o", id].map(str::to_string);
        match self.output(&self.scontrol, &args) {
            Ok(out) if out.status.success() => parse_scontrol(&String::from_utf8_lossy(&out.stdout)).or(from_sacct),
            _ => from_sacct,
        }
    }

    /// `scancel <ids>` (best effort: a job may have ended meanwhile).
    pub fn cancel(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        match self.output(&self.scancel, ids) {
            Ok(out) if !out.status.success() => {
                tracing::warn!("scancel {}: {}", ids.join(" "), String::from_utf8_lossy(&out.stderr).trim())
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}

/// `12345` or `12345;cluster` -> `12345`.
pub fn parse_sbatch(stdout: &str) -> Option<String> {
    let line = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    let id = line.split(';').next()?.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_')).then(|| id.to_string())
}

/// Lines `id|STATE`.
pub fn parse_squeue(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let (id, state) = l.trim().split_once('|')?;
            Some((id.trim().to_string(), first_word(state)))
        })
        .filter(|(id, state)| !id.is_empty() && !state.is_empty())
        .collect()
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or("").trim_end_matches('+').to_string()
}

/// The job's own line (not `.batch`/`.extern` steps) of
/// `sacct -n -P -o JobID,State,ExitCode`; the last one if it was requeued.
pub fn parse_sacct(stdout: &str, id: &str) -> Option<JobState> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split('|');
            let (job, state, exit) = (f.next()?, f.next()?, f.next().unwrap_or(""));
            (job == id).then(|| JobState { state: first_word(state), exit_code: exit.trim().to_string() })
        })
        .rfind(|s| !s.state.is_empty())
}

/// `JobState=` and `ExitCode=` of `scontrol show job -o`.
pub fn parse_scontrol(stdout: &str) -> Option<JobState> {
    let field = |name: &str| stdout.split_whitespace().find_map(|w| w.strip_prefix(name).map(str::to_string));
    let state = field("JobState=")?;
    Some(JobState { state: first_word(&state), exit_code: field("ExitCode=").unwrap_or_default() })
}

/// Not finished yet.
pub fn is_active(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_FED"
            | "REQUEUE_HOLD"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "STOPPED"
            | "RESV_DEL_HOLD"
            | "SPECIAL_EXIT"
    )
}

/// Ended through no fault of the stage: the node died, the job was
/// preempted or never booted. Worth resubmitting.
pub fn is_lost(state: &str) -> bool {
    matches!(state, "NODE_FAIL" | "PREEMPTED" | "BOOT_FAIL" | "REVOKED")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_tools_print() {
        assert_eq!(parse_sbatch("4242\n").as_deref(), Some("4242"));
        assert_eq!(parse_sbatch("17;cluster\n").as_deref(), Some("17"));
        assert_eq!(parse_sbatch("\nSubmitted batch job 5\n"), None);
        assert_eq!(parse_sbatch(""), None);

        let q = parse_squeue("12|RUNNING\n13|PENDING\n\ngarbage\n");
        assert_eq!(q, vec![("12".into(), "RUNNING".into()), ("13".into(), "PENDING".into())]);

        let sacct = "7|CANCELLED by 0|0:15\n7.batch|CANCELLED|0:15\n8|COMPLETED|0:0\n";
        assert_eq!(parse_sacct(sacct, "7"), Some(JobState { state: "CANCELLED".into(), exit_code: "0:15".into() }));
        assert_eq!(parse_sacct(sacct, "8").unwrap().state, "COMPLETED");
        assert_eq!(parse_sacct(sacct, "9"), None);
        // A requeued job: the last line is the current attempt.
        assert_eq!(parse_sacct("5|NODE_FAIL|0:0\n5|RUNNING|0:0\n", "5").unwrap().state, "RUNNING");

        let sc = "JobId=3 JobName=x UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) ExitCode=1:0 RunTime=00:00:01";
        assert_eq!(parse_scontrol(sc), Some(JobState { state: "FAILED".into(), exit_code: "1:0".into() }));
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified"), None);
    }

    #[test]
    fn state_classes() {
        for s in ["PENDING", "RUNNING", "COMPLETING", "REQUEUED"] {
            assert!(is_active(s) && !is_lost(s), "{s}");
        }
        for s in ["NODE_FAIL", "PREEMPTED", "BOOT_FAIL"] {
            assert!(is_lost(s) && !is_active(s), "{s}");
        }
        for s in ["COMPLETED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "CANCELLED"] {
            assert!(!is_lost(s) && !is_active(s), "{s}");
        }
    }
}
