//! Ctrl-C and SIGTERM: the first sets the cancel flag the engine watches
//! (no new stage starts, running ones are told, staging dirs are dropped,
//! nothing half-published); a second exits at once with 130.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The process-wide cancel flag; the handler is installed on first use, so
/// only commands that run stages take over Ctrl-C.
pub fn cancel_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        let installed = ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("interrupted: waiting for running stages to stop (interrupt again to abort now)");
        });
        if let Err(e) = installed {
            tracing::warn!("cannot install the Ctrl-C handler: {e}");
        }
        flag
    })
    .clone()
}
