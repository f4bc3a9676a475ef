//! The Slurm backend's settings: the job-wide keys of a recipe's
//! `[executor]` table (see `crate::recipe::executor` for the syntax and
//! the per-stage `[executor.stage.X]` overrides) and Slurm's own value
//! syntax for time limits and memory sizes. Plain data: the recipe loader
//! fills it, so it imports nothing of the engine.

use std::path::PathBuf;

/// Slurm settings of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Default `--time` of every job (Slurm syntax: `MM`, `HH:MM:SS`, `D-HH:MM`, ...).
    pub time: Option<String>,
    pub qos: Option<String>,
    /// Passed to `sbatch` as they are, before the script.
    pub extra_args: Vec<String>,
    pub poll_interval_s: f64,
    pub max_resubmits: u32,
    /// Where job logs go; relative paths resolve against the recipe's directory.
    /// `None`: `<cache>/logs/<run id>/slurm/`.
    pub log_dir: Option<PathBuf>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            partition: None,
            account: None,
            time: None,
            qos: None,
            extra_args: Vec::new(),
            poll_interval_s: 5.0,
            max_resubmits: 2,
            log_dir: None,
        }
    }
}

/// Slurm's time formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.
pub fn valid_slurm_time(text: &str) -> bool {
    let (days, rest) = match text.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, text),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = rest.split(':').collect();
    days.is_none_or(digits) && parts.iter().all(|p| digits(p)) && parts.len() <= 3
}

/// Memory as Slurm writes it: MiB as an integer, or a string with a K/M/G/T
/// suffix (binary units, like `sbatch --mem`).
pub fn parse_mem_mb(text: &str) -> Option<u64> {
    let text = text.trim();
    let (num, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&text[..i], text[i..].trim()),
        None => (text, ""),
    };
    let n: u64 = num.parse().ok()?;
    let mb = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" | "M" => n,
        "K" => n.div_ceil(1024),
        "G" => n.checked_mul(1024)?,
        "T" => n.checked_mul(1024 * 1024)?,
        _ => return None,
    };
    (mb > 0).then_some(mb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_time_syntax() {
        assert_eq!(parse_mem_mb("4096"), Some(4096));
        assert_eq!(parse_mem_mb("16G"), Some(16 * 1024));
        assert_eq!(parse_mem_mb("500M"), Some(500));
        assert_eq!(parse_mem_mb("2GiB"), Some(2048));
        assert_eq!(parse_mem_mb("1T"), Some(1024 * 1024));
        assert_eq!(parse_mem_mb("2048K"), Some(2));
        assert_eq!(parse_mem_mb("lots"), None);
        assert_eq!(parse_mem_mb("0"), None);
        for ok in ["30", "30:00", "02:00:00", "1-00", "1-12:00", "2-00:00:00"] {
            assert!(valid_slurm_time(ok), "{ok}");
        }
        for bad in ["", "1h", "1-", "-1", "1:2:3:4", "a:00"] {
            assert!(!valid_slurm_time(bad), "{bad}");
        }
    }
}
