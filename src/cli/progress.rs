//! Progress of a run on the console: indicatif bars on a terminal, plain
//! lines otherwise (pipes, files, CI). The engine's [`RunProgress`] is
//! implemented here so the engine itself never draws or prints.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipeline_engine::run::progress::RunProgress;
use stage_api::{LogProgress, ProgressSink};

/// Bars when stderr is a terminal and `CI` is unset, plain lines otherwise.
pub fn for_terminal(quiet: bool) -> Arc<dyn RunProgress> {
    let interactive = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
    if interactive && !quiet { Arc::new(BarProgress::new()) } else { Arc::new(PlainProgress { quiet }) }
}

/// Plain lines on stdout; stage progress goes through `tracing` (and so into
/// the stage's log file).
pub struct PlainProgress {
    pub quiet: bool,
}

impl RunProgress for PlainProgress {
    fn stage_sink(&self, _stage_id: &str) -> Arc<dyn ProgressSink> {
        Arc::new(LogProgress::default())
    }
    fn println(&self, line: &str) {
        if !self.quiet {
            println!("{line}");
        }
    }
}

/// One indicatif bar per running stage under a shared `MultiProgress`.
pub struct BarProgress {
    multi: MultiProgress,
}

impl BarProgress {
    pub fn new() -> Self {
        Self { multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()) }
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl RunProgress for BarProgress {
    fn stage_sink(&self, stage_id: &str) -> Arc<dyn ProgressSink> {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_prefix(stage_id.to_string());
        bar.set_style(spinner_style());
        bar.enable_steady_tick(Duration::from_millis(120));
        Arc::new(StageBar { bar, log: LogProgress::default() })
    }
    fn println(&self, line: &str) {
        if self.multi.println(line).is_err() {
            println!("{line}");
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} [{bar:30}] {pos}/{len} [{elapsed}<{eta}]")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// A stage's bar; also logs (to the stage's log file) like [`LogProgress`].
struct StageBar {
    bar: ProgressBar,
    log: LogProgress,
}

impl ProgressSink for StageBar {
    fn start(&self, phase: &str, total: u64) {
        self.bar.reset();
        if total > 0 {
            self.bar.set_style(bar_style());
            self.bar.set_length(total);
        } else {
            self.bar.set_style(spinner_style());
        }
        self.bar.set_message(phase.to_string());
        self.log.start(phase, total);
    }
    fn advance(&self, units: u64) {
        self.bar.inc(units);
        self.log.advance(units);
    }
    fn message(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
        self.log.message(msg);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
        self.log.finish();
    }
}

impl Drop for StageBar {
    fn drop(&mut self) {
        // A failed or cancelled stage never calls finish: don't leave its bar behind.
        self.bar.finish_and_clear();
    }
}
