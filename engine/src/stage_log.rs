//! Per-stage log files: a `tracing` layer that writes every event emitted
//! inside a `stage` span (see [`stage_span`]) to that stage's log file.
//!
//! The executor opens a file per stage with [`StageLogs::open`]; the binary
//! installs [`StageLogLayer`] next to its console layer. Threads of a stage's
//! rayon pool enter the stage span (see the executor), so work done in
//! parallel is routed too.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Name of the span the executor opens around a stage; its `stage` field is
/// the stage id and its `run` field the run id.
pub const STAGE_SPAN: &str = "stage";

/// The span that routes a stage's events to its log file.
pub fn stage_span(run_id: &str, stage_id: &str) -> tracing::Span {
    tracing::info_span!(STAGE_SPAN, stage = %stage_id, run = %run_id)
}

/// Key of a stage's log file in [`StageLogs`]: stage ids repeat across runs,
/// and runs may share a process (tests, a future server).
pub fn log_key(run_id: &str, stage_id: &str) -> String {
    format!("{run_id}/{stage_id}")
}

/// Open log files by [`log_key`].
#[derive(Default)]
pub struct StageLogs {
    files: Mutex<HashMap<String, Arc<Mutex<File>>>>,
}

impl StageLogs {
    /// The process-wide router (the tracing subscriber is process-wide too).
    pub fn global() -> &'static StageLogs {
        static LOGS: OnceLock<StageLogs> = OnceLock::new();
        LOGS.get_or_init(StageLogs::default)
    }

    /// Start routing the events of the stage with log key `key` to `path` (created, truncated).
    pub fn open(&self, key: &str, path: &Path) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = File::create(path)?;
        if let Ok(mut files) = self.files.lock() {
            files.insert(key.to_string(), Arc::new(Mutex::new(file)));
        }
        Ok(())
    }

    /// Append a line directly (e.g. the error chain of a failed stage).
    pub fn write_line(&self, key: &str, line: &str) {
        let file = self.files.lock().ok().and_then(|f| f.get(key).cloned());
        if let Some(file) = file
            && let Ok(mut f) = file.lock()
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Stop routing and close the file.
    pub fn close(&self, key: &str) {
        if let Ok(mut files) = self.files.lock() {
            files.remove(key);
        }
    }
}

/// Log key stored in a stage span's extensions.
struct StageOfSpan(String);

/// The layer; install it with `tracing_subscriber::registry().with(StageLogLayer::global())`.
pub struct StageLogLayer {
    logs: &'static StageLogs,
}

impl StageLogLayer {
    pub fn global() -> Self {
        Self { logs: StageLogs::global() }
    }
}

#[derive(Default)]
struct FieldText {
    stage: Option<String>,
    run: Option<String>,
    message: String,
    rest: String,
}

impl Visit for FieldText {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "stage" => self.stage = Some(value.to_string()),
            "run" => self.run = Some(value.to_string()),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "stage" => self.stage = Some(format!("{value:?}")),
            "run" => self.run = Some(format!("{value:?}")),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for StageLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != STAGE_SPAN {
            return;
        }
        let mut fields = FieldText::default();
        attrs.record(&mut fields);
        if let (Some(stage), Some(run), Some(span)) = (fields.stage, fields.run, ctx.span(id)) {
            span.extensions_mut().insert(StageOfSpan(log_key(&run, &stage)));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else { return };
        let stage = scope.from_root().find_map(|span| span.extensions().get::<StageOfSpan>().map(|s| s.0.clone()));
        let Some(stage) = stage else { return };
        let mut fields = FieldText::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        self.logs.write_line(
            &stage,
            &format!("{now} {:>5} {}: {}{}", meta.level(), meta.target(), fields.message, fields.rest),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn events_inside_a_stage_span_reach_its_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let logs: &'static StageLogs = Box::leak(Box::default());
        let subscriber = tracing_subscriber::registry().with(StageLogLayer { logs });
        let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        logs.open("r/a", &a).unwrap();
        logs.open("r/b", &b).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any stage");
            stage_span("r", "a").in_scope(|| {
                tracing::info_span!("inner").in_scope(|| tracing::warn!(step = 3, "hello from a"));
            });
            let span = stage_span("r", "b");
            // Like a stage's pool thread: another thread entering the stage span
            // (the scoped test subscriber must be carried over by hand).
            let dispatch = tracing::dispatcher::get_default(|d| d.clone());
            std::thread::scope(|s| {
                s.spawn(|| {
                    tracing::dispatcher::with_default(&dispatch, || span.in_scope(|| tracing::info!("worker of b")))
                });
            });
        });
        logs.write_line("r/a", "error: boom");
        logs.close("r/a");
        logs.write_line("r/a", "after close");
        let a = std::fs::read_to_string(&a).unwrap();
        let b = std::fs::read_to_string(&b).unwrap();
        assert!(a.contains("WARN") && a.contains("hello from a step=3"), "{a}");
        assert!(a.ends_with("error: boom\n"), "{a}");
        assert!(!a.contains("outside") && !a.contains("worker of b"), "{a}");
        assert!(b.contains("worker of b") && !b.contains("hello"), "{b}");
    }
}
