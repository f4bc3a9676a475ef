//! Following a submitted job to its end: batched `squeue` polls shared by
//! every stage in flight, the final state from `sacct`/`scontrol`, lost jobs
//! resubmitted, failures reported with the job's log.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use pipeline_cache::ActionRecord;

use super::commands::{SlurmCommands, is_active, is_lost};

/// One `squeue` call answers for every job of the run: stage threads ask the
/// board, which polls at most once per interval.
pub struct JobBoard {
    pub cmds: SlurmCommands,
    interval: Duration,
    state: Mutex<BoardState>,
}

#[derive(Default)]
struct BoardState {
    /// Job id -> when it was submitted (a snapshot older than that says nothing about it).
    watched: HashMap<String, Instant>,
    snapshot: HashMap<String, String>,
    polled_at: Option<Instant>,
}

impl JobBoard {
    pub fn new(cmds: SlurmCommands, interval: Duration) -> Self {
        Self { cmds, interval, state: Mutex::new(BoardState::default()) }
    }

    pub fn watch(&self, id: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.watched.insert(id.to_string(), Instant::now());
        }
    }

    pub fn unwatch(&self, id: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.watched.remove(id);
        }
    }

    /// Every job still watched (for cancellation).
    pub fn watched(&self) -> Vec<String> {
        self.state.lock().map(|s| s.watched.keys().cloned().collect()).unwrap_or_default()
    }

    /// `id`'s state in the queue (`None`: the controller no longer lists it),
    /// from a snapshot taken after its submission and at most one interval old.
    pub fn queue_state(&self, id: &str) -> anyhow::Result<Option<String>> {
        let mut s = self.state.lock().map_err(|_| anyhow::anyhow!("job board poisoned"))?;
        let since = s.watched.get(id).copied();
        let fresh = match (s.polled_at, since) {
            (Some(at), Some(sub)) => at >= sub && at.elapsed() < self.interval,
            _ => false,
        };
        if !fresh {
            let ids: BTreeSet<String> = s.watched.keys().cloned().chain(std::iter::once(id.to_string())).collect();
            let ids: Vec<String> = ids.into_iter().collect();
            let now = Instant::now();
            s.snapshot = self.cmds.queue(&ids)?.into_iter().collect();
            s.polled_at = Some(now);
        }
        Ok(s.snapshot.get(id).cloned())
    }
}

/// Consecutive failed `squeue` calls tolerated (a controller restart).
const MAX_QUEUE_ERRORS: u32 = 60;

#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub poll: Duration,
    pub max_resubmits: u32,
    /// Polls a job may be unknown to squeue, sacct and scontrol before it
    /// counts as lost (accounting lags a little behind the queue).
    pub vanish_polls: u32,
}

/// What happened to a job that left the queue.
enum Ending {
    Completed,
    Failed { state: String, exit_code: String },
    Lost(String),
}

/// Submit a stage's job and follow it until its record is published.
/// Lost jobs are resubmitted up to `max_resubmits` times. Returns the record
/// and the id of the job that produced it.
pub struct JobWatch<'a> {
    pub board: &'a JobBoard,
    pub opts: &'a WatchOptions,
    pub cancel: &'a AtomicBool,
    /// Submits the job, returning its id.
    pub submit: &'a dyn Fn() -> anyhow::Result<String>,
    /// The stage's published record that counts as job `id`'s result, if any.
    pub published: &'a dyn Fn(&str) -> anyhow::Result<Option<ActionRecord>>,
    /// The log file of a job id.
    pub log_of: &'a dyn Fn(&str) -> PathBuf,
    /// A line for the user.
    pub notify: &'a dyn Fn(&str),
}

impl JobWatch<'_> {
    pub fn run(&self) -> anyhow::Result<(ActionRecord, String)> {
        let mut resubmits = 0;
        loop {
            let id = (self.submit)()?;
            self.board.watch(&id);
            let ending = self.follow(&id);
            self.board.unwatch(&id);
            let ending = ending?;
            // Whatever Slurm says, a published record is the stage's result.
            // After a completion, give a shared filesystem's attribute cache
            // a few polls to show the record written on another host.
            let checks = if matches!(ending, Ending::Completed) { 5 } else { 1 };
            for attempt in 0..checks {
                if let Some(record) = (self.published)(&id)? {
                    return Ok((record, id));
                }
                if attempt + 1 < checks && self.wait_or_cancelled() {
                    bail!("cancelled while reading the outputs of Slurm job {id}");
                }
            }
            let log = (self.log_of)(&id);
            match ending {
                Ending::Completed => {
                    bail!("Slurm job {id} COMPLETED but published no outputs; log: {}{}", log.display(), log_tail(&log))
                }
                Ending::Failed { state, exit_code } => bail!(
                    "Slurm job {id} ended {state} (exit code {exit_code}); log: {}{}",
                    log.display(),
                    log_tail(&log)
                ),
                Ending::Lost(why) if resubmits < self.opts.max_resubmits => {
                    resubmits += 1;
                    (self.notify)(&format!(
                        "lost Slurm job {id} ({why}); resubmitting ({resubmits} of {})",
                        self.opts.max_resubmits
                    ));
                }
                Ending::Lost(why) => bail!(
                    "Slurm job {id} was lost ({why}) after {resubmits} resubmission(s) (max_resubmits = {}); log: {}{}",
                    self.opts.max_resubmits,
                    log.display(),
                    log_tail(&log)
                ),
            }
        }
    }

    /// Poll until the job leaves the queue, or cancel it when the run is interrupted.
    fn follow(&self, id: &str) -> anyhow::Result<Ending> {
        let mut unknown = 0;
        let mut errors = 0;
        loop {
            if self.wait_or_cancelled() {
                self.board.cmds.cancel(&[id.to_string()]);
                bail!("cancelled: Slurm job {id} was cancelled (scancel)");
            }
            match self.board.queue_state(id) {
                Ok(Some(state)) if is_active(&state) => {
                    (unknown, errors) = (0, 0);
                    continue;
                }
                // squeue may list a job briefly in its final state.
                Ok(_) => errors = 0,
                // The controller may be restarting: keep polling for a while.
                Err(e) if errors < MAX_QUEUE_ERRORS => {
                    if errors == 0 {
                        tracing::warn!("polling Slurm job {id}: {e:#}; retrying");
                    }
                    errors += 1;
                    continue;
                }
                Err(e) => return Err(e.context(format!("polling Slurm job {id} failed {errors} times in a row"))),
            }
            match self.board.cmds.finished_state(id) {
                Some(s) if is_active(&s.state) => unknown += 1,
                Some(s) if s.state == "COMPLETED" => return Ok(Ending::Completed),
                Some(s) if is_lost(&s.state) => return Ok(Ending::Lost(s.state)),
                Some(s) => return Ok(Ending::Failed { state: s.state, exit_code: s.exit_code }),
                None => unknown += 1,
            }
            if unknown >= self.opts.vanish_polls {
                return Ok(Ending::Lost("vanished: squeue, sacct and scontrol no longer know it".into()));
            }
        }
    }

    /// Sleep one poll interval in short steps; true once cancelled.
    fn wait_or_cancelled(&self) -> bool {
        let until = Instant::now() + self.opts.poll;
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(50)));
        }
    }
}

/// The last lines of a job log, indented, for error messages.
pub fn log_tail(path: &Path) -> String {
    const LINES: usize = 20;
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LINES)..];
            if tail.is_empty() {
                "\n  (the log is empty)".to_string()
            } else {
                format!("\n  last lines of the log:\n    {}", tail.join("\n    "))
            }
        }
        Err(e) => format!("\n  (cannot read the log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_cache::{Digest, Manifest};
    use std::os::unix::fs::PermissionsExt;

    /// A fake Slurm in a temp dir: `sbatch` numbers jobs from 101 and logs
    /// each submission; `squeue` lists nothing (every job already ended);
    /// `sacct` answers from `states/<id>` files the test writes.
    fn fake_slurm(states: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let script = |name: &str, body: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        script(
            "sbatch",
            format!(
                "n=$(cat {d}/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/count; echo \"$@\" >> {d}/submitted; echo $((100+n))"
            ),
        );
        script("squeue", "exit 0".into());
        script(
            "sacct",
            format!(
                "id=$4; [ -f {d}/states/$id ] && echo \"$id|$(cat {d}/states/$id)\"; echo \"$id.batch|COMPLETED|0:0\"; exit 0"
            ),
        );
        script("scancel", format!("echo \"$@\" >> {d}/cancelled"));
        std::fs::create_dir(dir.path().join("states")).unwrap();
        for (id, state) in states {
            std::fs::write(dir.path().join("states").join(id), state).unwrap();
        }
        dir
    }

    fn record() -> ActionRecord {
        ActionRecord {
            key: Digest::of_bytes(b"k"),
            created_unix_ms: 0,
            manifest: Manifest::default(),
            meta: serde_json::json!({}),
        }
    }

    fn opts(max_resubmits: u32) -> WatchOptions {
        WatchOptions { poll: Duration::from_millis(10), max_resubmits, vanish_polls: 3 }
    }

    /// Runs a watch whose stage publishes once `published_after` jobs were submitted.
    fn watch(dir: &Path, max_resubmits: u32, published_after: Option<u32>) -> anyhow::Result<(ActionRecord, String)> {
        let board = JobBoard::new(SlurmCommands::in_dir(dir), Duration::from_millis(5));
        let cancel = AtomicBool::new(false);
        let script = dir.join("job.sh");
        let submit = || board.cmds.submit(&script, &[]);
        let count = || std::fs::read_to_string(dir.join("count")).ok().and_then(|s| s.trim().parse::<u32>().ok());
        let published = |_: &str| Ok(published_after.filter(|n| count() >= Some(*n)).map(|_| record()));
        let log_of = |id: &str| dir.join(format!("job-{id}.log"));
        let notes = Mutex::new(Vec::<String>::new());
        let notify = |l: &str| notes.lock().unwrap().push(l.to_string());
        let w = JobWatch {
            board: &board,
            opts: &opts(max_resubmits),
            cancel: &cancel,
            submit: &submit,
            published: &published,
            log_of: &log_of,
            notify: &notify,
        };
        w.run()
    }

    #[test]
    fn a_lost_job_is_resubmitted_and_its_replacement_counts() {
        let dir = fake_slurm(&[("101", "NODE_FAIL|0:0"), ("102", "COMPLETED|0:0")]);
        let (_, job) = watch(dir.path(), 2, Some(2)).unwrap();
        assert_eq!(job, "102");
        let submitted = std::fs::read_to_string(dir.path().join("submitted")).unwrap();
        assert_eq!(submitted.lines().count(), 2, "{submitted}");
        assert!(submitted.lines().all(|l| l.starts_with("--parsable ") && l.ends_with("job.sh")), "{submitted}");
    }

    #[test]
    fn resubmission_stops_at_the_limit() {
        let dir = fake_slurm(&[("101", "PREEMPTED|0:0"), ("102", "NODE_FAIL|0:0")]);
        let err = format!("{:#}", watch(dir.path(), 1, None).unwrap_err());
        assert!(err.contains("Slurm job 102 was lost (NODE_FAIL) after 1 resubmission"), "{err}");
        // A job nobody knows any more (purged without accounting) is lost too.
        let dir = fake_slurm(&[]);
        let err = format!("{:#}", watch(dir.path(), 0, None).unwrap_err());
        assert!(err.contains("Slurm job 101 was lost (vanished"), "{err}");
    }

    #[test]
    fn a_failed_job_is_an_error_with_its_log() {
        let dir = fake_slurm(&[("101", "FAILED|1:0")]);
        std::fs::write(dir.path().join("job-101.log"), "starting\nerror: stage `x` failed: disk full\n").unwrap();
        let err = format!("{:#}", watch(dir.path(), 3, None).unwrap_err());
        let log = dir.path().join("job-101.log");
        assert!(err.contains("Slurm job 101 ended FAILED (exit code 1:0)"), "{err}");
        assert!(err.contains(&format!("log: {}", log.display())), "{err}");
        assert!(err.contains("error: stage `x` failed: disk full"), "{err}");
        // Failures are not resubmitted.
        assert_eq!(std::fs::read_to_string(dir.path().join("count")).unwrap().trim(), "1");
    }

    #[test]
    fn a_completed_job_yields_its_record_and_cancellation_scancels() {
        let dir = fake_slurm(&[("101", "COMPLETED|0:0")]);
        assert_eq!(watch(dir.path(), 0, Some(1)).unwrap().1, "101");
        // Completed without a record: an error naming the log.
        let dir = fake_slurm(&[("101", "COMPLETED|0:0")]);
        let err = format!("{:#}", watch(dir.path(), 0, None).unwrap_err());
        assert!(err.contains("COMPLETED but published no outputs"), "{err}");

        // A job that stays running until the run is interrupted.
        let dir = fake_slurm(&[]);
        let d = dir.path();
        std::fs::write(d.join("squeue"), "#!/bin/bash\necho \"101|RUNNING\"\n").unwrap();
        let board = JobBoard::new(SlurmCommands::in_dir(d), Duration::from_millis(5));
        let cancel = AtomicBool::new(false);
        let script = d.join("job.sh");
        let submit = || board.cmds.submit(&script, &[]);
        let published = |_: &str| Ok(None);
        let log_of = |id: &str| d.join(id);
        let notify = |_: &str| {};
        let w = JobWatch {
            board: &board,
            opts: &opts(0),
            cancel: &cancel,
            submit: &submit,
            published: &published,
            log_of: &log_of,
            notify: &notify,
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                cancel.store(true, Ordering::SeqCst);
            });
            let err = w.run().unwrap_err().to_string();
            assert!(err.contains("cancelled: Slurm job 101"), "{err}");
        });
        assert_eq!(std::fs::read_to_string(d.join("cancelled")).unwrap().trim(), "101");
    }
}
