//! Waiting for a condition with a bound, instead of sleeping for a guessed time.

use std::fmt;
use std::time::{Duration, Instant};

/// How often [`wait_until`] asks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A condition did not come true in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    /// What was awaited.
    pub what: String,
    /// How long it was awaited.
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:.1?} waiting for {}",
            self.after, self.what
        )
    }
}

impl std::error::Error for TimedOut {}

/// Calls `probe` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value;
/// `probe` is always called at least once, even with a zero timeout.
///
/// `what` describes the condition for the error message.
///
/// # Errors
/// [`TimedOut`] when `timeout` passes with `probe` still returning `None`.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(TimedOut {
                what: what.to_owned(),
                after: elapsed,
            });
        }
        std::thread::sleep(POLL_INTERVAL.min(timeout - elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value() {
        let mut calls = 0;
        let got = wait_until(Duration::from_secs(5), "third call", || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(got, Ok(3));
    }

    #[test]
    fn times_out_with_a_description() {
        let err = wait_until(Duration::from_millis(50), "never", || None::<()>).unwrap_err();
        assert_eq!(err.what, "never");
        assert!(err.after >= Duration::from_millis(50));
        assert!(err.to_string().contains("waiting for never"));
    }
}
