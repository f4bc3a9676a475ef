//! The OpenAI-compatible `/chat/completions` client shared by the eval's
//! `http` backend and the judge's: one POST retried after timeouts,
//! connection errors, 429, 5xx and unparseable replies, with exponential
//! backoff that a `Retry-After` header overrides, and a bearer token read
//! from an environment variable at run time. The token never leaves this
//! module: it is not in errors, logs, `Debug` output, params or cache keys.
//!
//! Plain `http://` only (no TLS stack is built): reach a remote server
//! through an SSH tunnel or a local proxy.

use std::fmt;
use std::time::{Duration, Instant};

/// What keeps a client from being built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("param `{param}`: environment variable `{var}` (the API key) is not set or not valid unicode")]
    MissingKey { param: String, var: String },
}

/// How to reach the server and how hard to try.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended).
    pub url: String,
    /// Whole exchange of one attempt: connect, send, generation, reply.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// Wait after the first failed attempt; doubles after each further one.
    pub backoff: Duration,
    /// Longest wait between attempts (also caps `Retry-After`).
    pub max_backoff: Duration,
}

/// A bearer token; `Debug` shows a placeholder and nothing prints it.
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token in the environment variable `var` (named by param `param`,
    /// for the error), read at run time; None when no variable is named.
    pub fn from_env(var: Option<&str>, param: &str) -> Result<Option<Self>, ClientError> {
        match var {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(k) => Ok(Some(Self(k))),
                Err(_) => Err(ClientError::MissingKey { param: param.into(), var: var.into() }),
            },
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptError {
    pub message: String,
    /// HTTP status, when the server answered.
    pub status: Option<u16>,
    /// A later attempt may succeed (timeouts, connection errors, 429, 5xx, unparseable replies).
    pub retryable: bool,
    /// The server's `Retry-After`, in seconds.
    pub retry_after: Option<Duration>,
}

/// A reply parsed as JSON, and the attempts it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub body: serde_json::Value,
    pub attempts: u32,
}

/// The request failed for good.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The last attempt's error.
    pub last: AttemptError,
    pub attempts: u32,
    /// Given up because `stop` said so (not because retries ran out).
    pub stopped: bool,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.stopped {
            "stopped"
        } else if self.last.retryable {
            "retries exhausted"
        } else {
            "not retryable"
        };
        let s = if self.attempts == 1 { "" } else { "s" };
        write!(f, "{} ({} attempt{s}, {why})", self.last.message, self.attempts)
    }
}

/// A blocking client; share it between threads by reference.
#[derive(Debug)]
pub struct ChatClient {
    agent: ureq::Agent,
    endpoint: String,
    api_key: Option<ApiKey>,
    config: ClientConfig,
}

impl ChatClient {
    pub fn new(config: ClientConfig, api_key: Option<ApiKey>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let endpoint = format!("{}/chat/completions", config.url.trim_end_matches('/'));
        Self { agent, endpoint, api_key, config }
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn attempt(&self, body: &str) -> Result<serde_json::Value, AttemptError> {
        let fail = |message: String, status: Option<u16>, retryable: bool| AttemptError {
            message,
            status,
            retryable,
            retry_after: None,
        };
        let mut req = self.agent.post(&self.endpoint).header("Content-Type", "application/json");
        if let Some(ApiKey(k)) = &self.api_key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp =
            req.send(body).map_err(|e| fail(format!("request to {} failed: {e}", self.endpoint), None, true))?;
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| fail(format!("reading the reply of {}: {e}", self.endpoint), Some(status), true))?;
        if status != 200 {
            let snippet: String = text.chars().take(300).collect();
            return Err(AttemptError {
                message: format!("HTTP {status} from {}: {snippet}", self.endpoint),
                status: Some(status),
                retryable: status == 429 || status >= 500,
                retry_after,
            });
        }
        // A cut-off or garbled body (a proxy, a dying worker) may come out whole next time.
        serde_json::from_str(&text).map_err(|e| {
            let snippet: String = text.chars().take(120).collect();
            fail(format!("reply of {} is not JSON ({e}): {snippet:?}", self.endpoint), Some(status), true)
        })
    }

    /// POST `body`, retrying as configured. `stop` is polled while waiting
    /// between attempts (a cancelled run, or another request failed for good).
    pub fn post(&self, body: &serde_json::Value, stop: &dyn Fn() -> bool) -> Result<Reply, Failure> {
        let text = body.to_string();
        let mut attempt = 1;
        loop {
            match self.attempt(&text) {
                Ok(body) => return Ok(Reply { body, attempts: attempt }),
                Err(e) => {
                    if !e.retryable || attempt > self.config.retries {
                        return Err(Failure { last: e, attempts: attempt, stopped: false });
                    }
                    let wait = retry_wait(attempt, self.config.backoff, self.config.max_backoff, e.retry_after);
                    tracing::warn!(attempt, wait_s = wait.as_secs_f64(), error = %e.message, "request failed, retrying");
                    if !sleep_unless(wait, stop) {
                        return Err(Failure { last: e, attempts: attempt, stopped: true });
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// Sleep `wait`, polling `stop`; false when stopped early.
fn sleep_unless(wait: Duration, stop: &dyn Fn() -> bool) -> bool {
    let end = Instant::now() + wait;
    loop {
        if stop() {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// The wait after failed attempt number `attempt` (1-based): the server's
/// `Retry-After` when it sent one, else `backoff * 2^(attempt-1)`; never
/// more than `max`.
pub fn retry_wait(attempt: u32, backoff: Duration, max: Duration, retry_after: Option<Duration>) -> Duration {
    let exponential = backoff.saturating_mul(1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX));
    retry_after.unwrap_or(exponential).min(max)
}

/// `Retry-After` in its delay-seconds form; an HTTP date (rare on API
/// servers) gives None and the client falls back to its backoff.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u64>().ok().map(Duration::from_secs)
}

/// `choices[0].message.content` of a chat completion (an error saying
/// what the reply holds instead).
pub fn message_content(reply: &serde_json::Value) -> Result<&str, String> {
    let message = reply.pointer("/choices/0/message").ok_or_else(|| {
        let keys: Vec<&str> = reply.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        format!("reply has no `choices[0].message` (keys: {})", keys.join(", "))
    })?;
    match message.get("content") {
        Some(serde_json::Value::String(s)) => Ok(s),
        _ if message.get("reasoning_content").is_some_and(|r| !r.is_null()) => {
            Err("reply has `reasoning_content` but no `content` string: run the server without a reasoning parser so \
             the completion arrives whole"
                .into())
        }
        _ => Err("reply has no `choices[0].message.content` string".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_and_retry_after_wins_within_the_cap() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(retry_wait(1, ms(100), s(60), None), ms(100));
        assert_eq!(retry_wait(2, ms(100), s(60), None), ms(200));
        assert_eq!(retry_wait(4, ms(100), s(60), None), ms(800));
        assert_eq!(retry_wait(40, ms(100), s(60), None), s(60), "no overflow, capped");
        // The server knows better than our backoff, up and down.
        assert_eq!(retry_wait(1, ms(100), s(60), Some(s(7))), s(7));
        assert_eq!(retry_wait(3, s(10), s(60), Some(s(0))), s(0));
        assert_eq!(retry_wait(1, ms(100), s(5), Some(s(3600))), s(5), "capped");
        assert_eq!(parse_retry_after(" 12 "), Some(s(12)));
        assert_eq!(parse_retry_after("0"), Some(s(0)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn content_errors_say_what_is_there() {
        let ok = serde_json::json!({"choices": [{"message": {"content": "x"}}]});
        assert_eq!(message_content(&ok), Ok("x"));
        let e = message_content(&serde_json::json!({"error": "no"})).unwrap_err();
        assert!(e.contains("keys: error"), "{e}");
        let r = serde_json::json!({"choices": [{"message": {"content": null, "reasoning_content": "hm"}}]});
        assert!(message_content(&r).unwrap_err().contains("reasoning parser"));
    }

    #[test]
    fn a_missing_key_names_the_variable_and_the_key_never_prints() {
        let e = ApiKey::from_env(Some("MEDREASON_SURELY_UNSET_VAR_1234"), "http.api_key_env").unwrap_err().to_string();
        assert!(e.contains("MEDREASON_SURELY_UNSET_VAR_1234") && e.contains("http.api_key_env"), "{e}");
        assert!(ApiKey::from_env(None, "x").unwrap().is_none());
        let cfg = ClientConfig {
            url: "http://127.0.0.1:9/v1/".into(),
            timeout: Duration::from_secs(1),
            retries: 0,
            backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        };
        let c = ChatClient::new(cfg, Some(ApiKey::new("sk-very-secret")));
        assert_eq!(c.endpoint(), "http://127.0.0.1:9/v1/chat/completions");
        assert!(!format!("{c:?}").contains("sk-very-secret"));
    }
}
