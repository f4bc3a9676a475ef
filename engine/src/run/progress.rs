//! How a run reports progress: the scheduler hands each running stage a
//! [`ProgressSink`] and prints run-level lines (stage started, cached,
//! failed) through a [`RunProgress`]. The binary implements it (bars on a
//! terminal, plain lines otherwise); the engine prints nothing itself.

use std::sync::Arc;

use stage_api::ProgressSink;

/// Hands out one progress sink per running stage and prints run-level lines
/// without tearing whatever the sinks draw.
pub trait RunProgress: Send + Sync {
    fn stage_sink(&self, stage_id: &str) -> Arc<dyn ProgressSink>;
    /// A line for the user (stage finished, cached, failed).
    fn println(&self, line: &str);
}
