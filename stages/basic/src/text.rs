//! `text`: write a text file from params; optionally slow or failing, for
//! exercising the scheduler (cancellation, `--keep-going`, concurrency).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{ParamError, StageContext, StageKind};

/// Upper bound on the written size, so a typo in `repeat` cannot fill a disk.
const MAX_BYTES: u64 = 1 << 30;
/// Cancellation is checked at least this often while sleeping.
const SLEEP_STEP: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TextParams {
    /// Content of `text.txt`.
    pub text: String,
    /// How many times `text` is written.
    // MAX_BYTES of a one-byte text; `validate` bounds text length x repeat.
    #[schemars(range(max = 1_073_741_824))]
    pub repeat: u64,
    /// Fail (after the delay) instead of writing anything.
    pub fail: bool,
    /// Sleep this long before working, checking for cancellation.
    // A day: an engine exercise never waits longer.
    #[schemars(range(max = 86_400_000))]
    pub delay_ms: u64,
}

impl Default for TextParams {
    fn default() -> Self {
        Self { text: String::new(), repeat: 1, fail: false, delay_ms: 0 }
    }
}

pub struct Text;

impl StageKind for Text {
    type Params = TextParams;
    const KIND: &'static str = "text";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Write `text.txt` with `text` repeated `repeat` times; `delay_ms` and `fail` make it slow or failing.";

    fn validate(params: &TextParams) -> Result<(), ParamError> {
        let bytes = (params.text.len() as u64).saturating_mul(params.repeat);
        if bytes > MAX_BYTES {
            return Err(ParamError::new(
                &["repeat"],
                format!("would write {bytes} bytes, more than the limit of {MAX_BYTES}"),
            ));
        }
        Ok(())
    }

    fn run(params: &TextParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(params.delay_ms);
        loop {
            ctx.check_cancelled()?;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(SLEEP_STEP.min(deadline - now));
        }
        if params.fail {
            bail!("stage `{}` failed because its params say `fail = true`", ctx.stage_id());
        }
        let dest = ctx.output_dir().join("text.txt");
        std::fs::write(&dest, params.text.repeat(params.repeat as usize))
            .with_context(|| format!("writing {}", dest.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn writes_repeated_text() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut ctx = StageContext::builder("t", &out).build().unwrap();
        Text::run(&TextParams { text: "ab".into(), repeat: 3, ..TextParams::default() }, &mut ctx).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("text.txt")).unwrap(), "ababab");
    }

    #[test]
    fn fail_param_fails_without_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut ctx = StageContext::builder("broken", &out).build().unwrap();
        let err = Text::run(&TextParams { fail: true, ..TextParams::default() }, &mut ctx).unwrap_err();
        assert!(err.to_string().contains("stage `broken` failed"), "{err}");
        assert!(!out.join("text.txt").exists());
    }

    #[test]
    fn delay_stops_early_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut ctx = StageContext::builder("slow", dir.path().join("out")).cancel_flag(flag.clone()).build().unwrap();
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                flag.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        let err = Text::run(&TextParams { delay_ms: 60_000, ..TextParams::default() }, &mut ctx).unwrap_err();
        setter.join().unwrap();
        assert!(err.to_string().contains("cancelled"), "{err}");
        // Far below the 60 s delay: it noticed the flag.
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn absurd_sizes_are_rejected() {
        let p = TextParams { text: "x".repeat(1024), repeat: 1 << 30, ..TextParams::default() };
        assert_eq!(Text::validate(&p).unwrap_err().path, ["repeat"]);
    }
}
