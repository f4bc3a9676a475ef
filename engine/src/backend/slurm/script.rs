//! What one stage's job asks Slurm for, and the batch script that runs
//! `pipeline exec-stage <key>` with it.

use std::path::PathBuf;

use super::config::SlurmConfig;
use crate::recipe::StageOverride;
use stage_api::{DeviceRequest, Resources};

/// The `#SBATCH` options and command of one stage's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    pub job_name: String,
    /// `--output`, with `%j` for the job id.
    pub log_pattern: PathBuf,
    /// `--cpus-per-task`; `None`: a whole node (`--exclusive`), for stages
    /// that use every core they are given.
    pub cpus: Option<usize>,
    pub mem_mb: u64,
    /// GPUs per task.
    pub gpus: usize,
    /// Tasks (data-parallel ranks), each running the command via `srun`.
    pub ranks: usize,
    pub time: Option<String>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Directory the job starts in (the submitting process's).
    pub workdir: PathBuf,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// GPUs a stage's job gets: the `[executor.stage]` override, else one for a
/// stage that requires CUDA; a stage that merely accepts one (`auto`) runs
/// on the CPU unless given `gpus`.
pub fn stage_gpus(o: &StageOverride, res: &Resources) -> usize {
    o.gpus.unwrap_or(usize::from(res.device == DeviceRequest::Cuda))
}

impl JobRequest {
    /// Map a stage's resources (and its `[executor.stage]` override `o`) onto Slurm options.
    pub fn for_stage(
        cfg: &SlurmConfig,
        o: &StageOverride,
        res: &Resources,
        log_pattern: PathBuf,
        workdir: PathBuf,
        command: Vec<String>,
        job_name: String,
    ) -> Self {
        JobRequest {
            job_name,
            log_pattern,
            cpus: o.cpus.or((res.cpu > 0).then_some(res.cpu)),
            mem_mb: o.mem_mb.unwrap_or(res.memory_mb).max(1),
            gpus: stage_gpus(o, res),
            ranks: o.ranks.unwrap_or(1).max(1),
            time: o.time.clone().or_else(|| cfg.time.clone()),
            partition: cfg.partition.clone(),
            account: cfg.account.clone(),
            qos: cfg.qos.clone(),
            workdir,
            command,
        }
    }

    /// The batch script. Values are single-quoted for the shell; `#SBATCH`
    /// lines are read by sbatch, not the shell, and must not contain newlines.
    pub fn script(&self) -> String {
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        let mut lines = vec!["#!/bin/bash".to_string()];
        let mut opt = |o: String| lines.push(format!("#SBATCH {}", one_line(&o)));
        opt(format!("--job-name={}", self.job_name));
        opt(format!("--output={}", self.log_pattern.display()));
        match self.cpus {
            Some(n) => opt(format!("--cpus-per-task={n}")),
            None => opt("--exclusive".to_string()),
        }
        opt(format!("--ntasks={}", self.ranks));
        opt(format!("--mem={}M", self.mem_mb));
        if self.gpus > 0 && self.ranks > 1 {
            opt(format!("--gpus-per-task={}", self.gpus));
        } else if self.gpus > 0 {
            opt(format!("--gres=gpu:{}", self.gpus));
        }
        if let Some(t) = &self.time {
            opt(format!("--time={t}"));
        }
        if let Some(p) = &self.partition {
            opt(format!("--partition={p}"));
        }
        if let Some(a) = &self.account {
            opt(format!("--account={a}"));
        }
        if let Some(q) = &self.qos {
            opt(format!("--qos={q}"));
        }
        let log = self.log_pattern.display().to_string().replace("%j", "${SLURM_JOB_ID}");
        lines.push("# Written by `pipeline run --executor slurm`: runs one stage against the shared cache.".into());
        lines.push("set -e".into());
        lines.push(format!("cd {}", shell_quote(&self.workdir.display().to_string())));
        // Double quotes so the job id expands; the rest of the path is quoted.
        lines.push(format!("export PIPELINE_JOB_LOG=\"{}\"", log.replace(['"', '\\', '`'], "_")));
        let cmd: Vec<String> = self.command.iter().map(|a| shell_quote(a)).collect();
        if self.ranks > 1 {
            // One task per rank; a rank that dies takes the step down with it.
            lines.push(format!("exec srun --kill-on-bad-exit=1 {}", cmd.join(" ")));
        } else {
            lines.push(format!("exec {}", cmd.join(" ")));
        }
        lines.join("\n") + "\n"
    }
}

/// `'text'` with embedded quotes escaped, for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A job name Slurm shows in `squeue` (no spaces or odd characters).
pub fn job_name(recipe: &str, stage: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.@+".contains(c) { c } else { '_' }).collect()
    };
    format!("pl-{}-{}", clean(recipe), clean(stage))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stage_api::StageContext;
    use stage_api::StageKind;

    /// Uses every core; requires CUDA when `cuda` is set.
    struct Probe;
    #[derive(Debug, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct ProbeParams {
        /// Require a CUDA device.
        cuda: bool,
    }
    impl StageKind for Probe {
        type Params = ProbeParams;
        const KIND: &'static str = "probe";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "test kind";
        fn resources(p: &ProbeParams) -> Resources {
            let device = if p.cuda { DeviceRequest::Cuda } else { DeviceRequest::Cpu };
            Resources { cpu: 0, device, memory_mb: 256, libtorch: false }
        }
        fn run(_p: &ProbeParams, _ctx: &mut StageContext) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn request(cpus: Option<usize>, gpus: usize) -> JobRequest {
        JobRequest {
            job_name: "pl-mini-sft".into(),
            log_pattern: "/shared/logs/sft-%j.log".into(),
            cpus,
            mem_mb: 4096,
            gpus,
            ranks: 1,
            time: Some("02:00:00".into()),
            partition: Some("gpu".into()),
            account: None,
            qos: Some("high".into()),
            workdir: "/home/me/it's here".into(),
            command: vec!["/opt/pipeline".into(), "exec-stage".into(), "abc".into()],
        }
    }

    #[test]
    fn scripts_carry_the_resources_and_quote_paths() {
        let s = request(Some(8), 2).script();
        assert!(s.starts_with("#!/bin/bash\n#SBATCH --job-name=pl-mini-sft\n"), "{s}");
        for line in [
            "#SBATCH --output=/shared/logs/sft-%j.log",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem=4096M",
            "#SBATCH --gres=gpu:2",
            "#SBATCH --time=02:00:00",
            "#SBATCH --partition=gpu",
            "#SBATCH --qos=high",
            "cd '/home/me/it'\\''s here'",
            "export PIPELINE_JOB_LOG=\"/shared/logs/sft-${SLURM_JOB_ID}.log\"",
            "exec '/opt/pipeline' 'exec-stage' 'abc'",
        ] {
            assert!(s.lines().any(|l| l == line), "missing `{line}` in\n{s}");
        }
        assert!(!s.contains("--account") && !s.contains("--exclusive"), "{s}");
        let whole = request(None, 0).script();
        assert!(whole.contains("#SBATCH --exclusive\n") && !whole.contains("--gres"), "{whole}");
    }

    #[test]
    fn data_parallel_stages_get_one_task_per_rank_started_by_srun() {
        let s = JobRequest { ranks: 4, ..request(Some(8), 1) }.script();
        for line in [
            "#SBATCH --ntasks=4",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --gpus-per-task=1",
            "exec srun --kill-on-bad-exit=1 '/opt/pipeline' 'exec-stage' 'abc'",
        ] {
            assert!(s.lines().any(|l| l == line), "missing `{line}` in\n{s}");
        }
        assert!(!s.contains("--gres"), "{s}");
        assert!(request(Some(8), 1).script().contains("#SBATCH --ntasks=1\n"));
    }

    #[test]
    fn overrides_win_over_stage_resources() {
        let registry = stage_api::Registry::new().register::<Probe>();
        let recipe = crate::recipe::load_recipe_str(
            "[recipe]\nname = \"r\"\n[stage.a]\nkind = \"probe\"\n[stage.b]\nkind = \"probe\"\ncuda = true\n",
            std::path::Path::new("r.toml"),
            &[],
            &registry,
        )
        .unwrap();
        let (a, b) = (recipe.stage("a").unwrap(), recipe.stage("b").unwrap());
        let cfg = SlurmConfig { time: Some("10".into()), ..SlurmConfig::default() };
        let req = |o: &StageOverride, d: &crate::recipe::StageDecl| {
            JobRequest::for_stage(&cfg, o, &d.stage.resources(), "l".into(), "w".into(), vec![], "n".into())
        };
        let none = StageOverride::default();
        let ra = req(&none, a);
        assert_eq!((ra.cpus, ra.mem_mb, ra.gpus, ra.time.as_deref()), (None, 256, 0, Some("10")));
        assert_eq!(req(&none, b).gpus, 1, "a stage requiring CUDA gets a GPU");
        let o = StageOverride {
            ranks: Some(2),
            cpus: Some(4),
            gpus: Some(1),
            mem_mb: Some(8192),
            time: Some("1-00".into()),
        };
        let ra = req(&o, a);
        assert_eq!((ra.cpus, ra.mem_mb, ra.gpus, ra.time.as_deref()), (Some(4), 8192, 1, Some("1-00")));
        assert_eq!(ra.ranks, 2);
    }
}
