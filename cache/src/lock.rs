//! Per-key exclusive locks that survive crashes: `<root>/locks/<key>.lock`.
//!
//! The lock file holds JSON {pid, host, start_time_unix_ms, boot_id,
//! proc_start_ticks, nonce}. It is created complete and atomically: written to
//! a temp file, then hard-linked into place (`link` fails if the name exists,
//! like `create_new`, but no reader ever sees a half-written lock).
//!
//! A lock is stale when
//! - same host: the boot id changed, the pid is gone (or a zombie), or the pid
//!   now belongs to a process that started at another time than the holder
//!   (`/proc/<pid>/stat` starttime, so pid reuse is detected exactly);
//! - another host (shared filesystem): its mtime is older than the lease; the
//!   holder refreshes the mtime from a heartbeat thread while it holds it.
//!
//! Breaking a stale lock is serialised by a short-lived `<key>.lock.break`
//! guard: under it the lock is re-read, and only if it is still the very lock
//! judged stale (same nonce) is it renamed away and deleted. So two waiters
//! can never both break and then both take the lock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{CacheError, IoContext};
use crate::files::now_unix_ms;

/// How long the break guard may exist before it is presumed abandoned; it is
/// normally held for a few system calls.
const BREAK_GUARD_STALE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub pid: u32,
    pub host: String,
    pub start_time_unix_ms: u64,
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Kernel start time of the holder process (clock ticks since boot).
    #[serde(default)]
    pub proc_start_ticks: Option<u64>,
    /// Identifies this acquisition: a lock is only released or broken if it is
    /// still the one that was checked.
    pub nonce: String,
}

impl std::fmt::Display for LockInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {} (since unix ms {})", self.pid, self.host, self.start_time_unix_ms)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct LockConfig {
    /// A lock from another host is stale once its mtime is older than this.
    pub lease: Duration,
    /// How often a held lock's mtime is refreshed.
    pub heartbeat: Duration,
}

/// An exclusive lock on one key, released on Drop.
pub struct KeyLock {
    path: PathBuf,
    nonce: String,
    heartbeat: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for KeyLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLock").field("path", &self.path).finish()
    }
}

impl KeyLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.heartbeat.take() {
            drop(stop);
            let _ = handle.join();
        }
        match read_info(&self.path) {
            Ok(Some(info)) if info.nonce == self.nonce => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("could not release lock {}: {e}", self.path.display());
                }
            }
            _ => tracing::warn!("lock {} was taken over while held (judged stale?)", self.path.display()),
        }
    }
}

pub(crate) fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
}

/// Whether `/proc/<pid>/...` can answer liveness questions on this system.
fn have_procfs() -> bool {
    Path::new("/proc/self/stat").exists()
}

/// Start time (ticks since boot) of a live, non-zombie process; `None` if the
/// pid does not exist or is a zombie.
pub(crate) fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')', so split after
    // the last ')'. Fields after it start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = *fields.first()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

fn unique_nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let seed = format!("{}:{}:{}:{}", host_name(), std::process::id(), nanos, n);
    crate::Digest::of_bytes(seed.as_bytes()).short()
}

fn our_info() -> LockInfo {
    let pid = std::process::id();
    LockInfo {
        pid,
        host: host_name(),
        start_time_unix_ms: now_unix_ms(),
        boot_id: boot_id(),
        proc_start_ticks: proc_start_ticks(pid),
        nonce: unique_nonce(),
    }
}

/// The lock's holder, or `None` if there is no lock file. A file that does
/// not parse is reported as an `Invalid` error only by callers that care.
fn read_info(path: &Path) -> Result<Option<LockInfo>, CacheError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx("read lock", path),
    }
}

fn mtime_age(path: &Path) -> Option<Duration> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok())
}

/// Whether the holder described by `info` may still be running.
pub(crate) fn holder_is_live(info: &LockInfo, path: &Path, cfg: &LockConfig) -> bool {
    if info.host != host_name() {
        return mtime_age(path).is_none_or(|age| age < cfg.lease);
    }
    if let (Some(theirs), Some(ours)) = (&info.boot_id, boot_id())
        && *theirs != ours
    {
        return false;
    }
    if !have_procfs() {
        // No way to check: assume live rather than risk two holders.
        return true;
    }
    match proc_start_ticks(info.pid) {
        None => false,
        Some(now) => info.proc_start_ticks.is_none_or(|then| then == now),
    }
}

/// Atomically creates `path` holding `info`; `Ok(false)` if it already exists.
fn create_complete(path: &Path, info: &LockInfo) -> Result<bool, CacheError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".lock-tmp-").tempfile_in(dir).ctx("create temp lock in", dir)?;
    serde_json::to_writer(&mut tmp, info).map_err(|source| CacheError::Json {
        path: tmp.path().to_owned(),
        what: "lock info",
        source,
    })?;
    tmp.flush().ctx("write", tmp.path().to_owned())?;
    match std::fs::hard_link(tmp.path(), path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).ctx("create lock", path),
    }
}

/// Removes the lock at `path` if it is still the stale lock `stale`.
fn break_stale(path: &Path, stale: &LockInfo, cfg: &LockConfig) -> Result<(), CacheError> {
    let guard = path.with_extension("lock.break");
    let guard_info = our_info();
    if !create_complete(&guard, &guard_info)? {
        // Someone else is breaking it; or a breaker died holding the guard.
        let abandoned = match read_info(&guard)? {
            Some(g) => !holder_is_live(&g, &guard, cfg),
            None => false,
        } || mtime_age(&guard).is_some_and(|a| a > BREAK_GUARD_STALE);
        if abandoned {
            let _ = std::fs::remove_file(&guard);
        }
        return Ok(());
    }
    let result = (|| {
        if read_info(path)?.as_ref().map(|i| &i.nonce) != Some(&stale.nonce) {
            return Ok(()); // released or already replaced: nothing to break
        }
        let aside = path.with_extension(format!("lock.stale-{}", guard_info.nonce));
        std::fs::rename(path, &aside).ctx("move stale lock", path)?;
        tracing::info!("broke stale lock {} held by {stale}", path.display());
        std::fs::remove_file(&aside).ctx("remove stale lock", &aside)
    })();
    if read_info(&guard).ok().flatten().map(|g| g.nonce) == Some(guard_info.nonce) {
        let _ = std::fs::remove_file(&guard);
    }
    result
}

fn start_heartbeat(path: PathBuf, interval: Duration) -> Option<(mpsc::Sender<()>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("cache-lock-heartbeat".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                let touched =
                    OpenOptions::new().write(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                if let Err(e) = touched {
                    tracing::warn!("lock heartbeat {}: {e}", path.display());
                }
            }
        })
        .ok()?;
    Some((tx, handle))
}

/// Takes the lock if it is free or stale; `None` if a live holder has it.
pub(crate) fn try_lock(path: &Path, cfg: &LockConfig) -> Result<Option<KeyLock>, CacheError> {
    // Two rounds: the second one after breaking a stale lock.
    for _ in 0..2 {
        let info = our_info();
        if create_complete(path, &info)? {
            // Make the new name durable before anyone relies on it.
            if let Some(dir) = path.parent() {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
            return Ok(Some(KeyLock {
                path: path.to_owned(),
                nonce: info.nonce,
                heartbeat: start_heartbeat(path.to_owned(), cfg.heartbeat),
            }));
        }
        match read_info(path)? {
            Some(holder) if holder_is_live(&holder, path, cfg) => return Ok(None),
            Some(holder) => break_stale(path, &holder, cfg)?,
            None => {
                // Unparseable: our locks are written whole, so this is foreign
                // garbage; treat as live until it is older than the lease.
                if path.exists() && mtime_age(path).is_none_or(|a| a < cfg.lease) {
                    return Ok(None);
                }
                let _ = std::fs::remove_file(path);
            }
        }
    }
    Ok(None)
}

/// Waits (polling with exponential backoff) until the lock is taken, or
/// until `timeout` passes.
pub(crate) fn lock(path: &Path, cfg: &LockConfig, timeout: Option<Duration>) -> Result<KeyLock, CacheError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(2);
    loop {
        if let Some(l) = try_lock(path, cfg)? {
            return Ok(l);
        }
        let waited = started.elapsed();
        if let Some(limit) = timeout {
            if waited >= limit {
                let holder = read_info(path)?.map(|i| i.to_string()).unwrap_or_else(|| "an unknown holder".into());
                return Err(CacheError::LockTimeout { path: path.to_owned(), holder, waited });
            }
            delay = delay.min(limit.saturating_sub(waited).max(Duration::from_millis(1)));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// The current holder of a lock file, for `status`-like displays.
pub(crate) fn holder(path: &Path) -> Result<Option<LockInfo>, CacheError> {
    read_info(path)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    fn cfg() -> LockConfig {
        LockConfig { lease: Duration::from_secs(600), heartbeat: Duration::from_secs(60) }
    }

    fn write_lock(path: &Path, info: &LockInfo) {
        std::fs::write(path, serde_json::to_vec(info).unwrap()).unwrap();
    }

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap(); // reaped: the pid no longer exists
        pid
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let held = try_lock(&path, &cfg()).unwrap().expect("free");
        let info = holder(&path).unwrap().unwrap();
        assert_eq!(info.pid, std::process::id());
        assert_eq!(info.host, host_name());
        assert!(try_lock(&path, &cfg()).unwrap().is_none());
        drop(held);
        assert!(!path.exists());
        assert!(try_lock(&path, &cfg()).unwrap().is_some());
    }

    #[test]
    fn stale_locks_of_dead_or_reused_pids_are_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let base = our_info();

        // Holder process is gone.
        write_lock(&path, &LockInfo { pid: dead_pid(), ..base.clone() });
        let l = try_lock(&path, &cfg()).unwrap().expect("dead holder's lock is stale");
        assert_eq!(holder(&path).unwrap().unwrap().pid, std::process::id());
        drop(l);

        // The pid is alive but belongs to a process started at another time.
        let reused = LockInfo { proc_start_ticks: base.proc_start_ticks.map(|t| t + 1), ..base.clone() };
        write_lock(&path, &reused);
        assert!(try_lock(&path, &cfg()).unwrap().is_some());

        // A lock from before a reboot.
        write_lock(&path, &LockInfo { boot_id: Some("another-boot".into()), ..base.clone() });
        assert!(try_lock(&path, &cfg()).unwrap().is_some());
        // No stale leftovers or break guards remain.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn live_lock_of_this_process_is_respected_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        write_lock(&path, &our_info()); // same pid and start time: live
        assert!(try_lock(&path, &cfg()).unwrap().is_none());
        let err = lock(&path, &cfg(), Some(Duration::from_millis(50))).unwrap_err();
        assert!(matches!(err, CacheError::LockTimeout { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("k.lock") && text.contains(&format!("pid {}", std::process::id())), "{text}");
    }

    #[test]
    fn other_host_locks_expire_after_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let remote = LockInfo {
            host: format!("{}-elsewhere", host_name()),
            pid: dead_pid(), // meaningless on another host: must not matter
            ..our_info()
        };
        write_lock(&path, &remote);
        let short = LockConfig { lease: Duration::from_secs(60), ..cfg() };
        assert!(try_lock(&path, &short).unwrap().is_none(), "fresh remote lock is live");
        let old = SystemTime::now() - Duration::from_secs(120);
        File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        assert!(try_lock(&path, &short).unwrap().is_some(), "expired lease");
    }

    #[test]
    fn heartbeat_refreshes_the_mtime_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let fast = LockConfig { lease: Duration::from_secs(60), heartbeat: Duration::from_millis(20) };
        let held = try_lock(&path, &fast).unwrap().unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let age = mtime_age(&path).unwrap();
        assert!(age < Duration::from_secs(60), "mtime not refreshed: {age:?}");
        drop(held);
        assert!(!path.exists());
    }

    #[test]
    fn threads_hammering_one_key_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("k.lock"));
        let inside = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (path, inside, total) = (path.clone(), inside.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let _l = lock(&path, &cfg(), Some(Duration::from_secs(30))).unwrap();
                        assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                        std::thread::sleep(Duration::from_micros(200));
                        total.fetch_add(1, Ordering::SeqCst);
                        inside.store(false, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(total.load(Ordering::SeqCst), 100);
    }

    const CHILD_ENV: &str = "PIPELINE_CACHE_LOCK_CHILD_DIR";
    const CHILD_ROUNDS: u32 = 40;

    /// Run by `processes_hammering_one_key_never_overlap` in child processes:
    /// a non-atomic read-increment-write of a counter, safe only under the lock.
    #[test]
    #[ignore = "helper: runs only as a child process of the lock test"]
    fn lock_child_helper() {
        let Ok(dir) = std::env::var(CHILD_ENV) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let counter = dir.join("counter");
        for _ in 0..CHILD_ROUNDS {
            let _l = lock(&dir.join("k.lock"), &cfg(), Some(Duration::from_secs(60))).unwrap();
            let n: u32 = std::fs::read_to_string(&counter).unwrap().trim().parse().unwrap();
            std::thread::sleep(Duration::from_micros(300));
            std::fs::write(&counter, format!("{}\n", n + 1)).unwrap();
        }
    }

    #[test]
    fn processes_hammering_one_key_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("counter"), "0\n").unwrap();
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args(["--exact", "lock::tests::lock_child_helper", "--ignored", "--nocapture"])
                    .env(CHILD_ENV, dir.path())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let n: u32 = std::fs::read_to_string(dir.path().join("counter")).unwrap().trim().parse().unwrap();
        assert_eq!(n, 2 * CHILD_ROUNDS, "lost updates: two processes held the lock at once");
        assert!(!dir.path().join("k.lock").exists());
    }
}
