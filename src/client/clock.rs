//! The clock of every timed rule, and the one reusable timer the I/O loops
//! share.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The clock of every timed rule: tokio's, so that tests with paused time
/// see rules fire as they would in real time.
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// About 30 years: what "never" saturates to (tokio's own timer wheel
/// clamps anything later).
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `at + d`, saturating: a duration too long to add (`Duration::MAX`, a
/// natural "never") gives a moment that does not come, never a panic.
pub(crate) fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d.min(FAR))
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// A reusable timer, set to whatever deadline is polled next: one allocation
/// per stream, not one per wait.
#[derive(Default)]
pub(crate) struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Timer {
    /// Polls the timer set to `deadline`.
    pub(crate) fn poll_until(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
    }

    /// Arms the timer for `deadline` so that the task is polled again then;
    /// a deadline already passed wakes it at once.
    pub(crate) fn arm(&mut self, deadline: Instant, cx: &mut Context<'_>) {
        if self.poll_until(deadline, cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_saturates_instead_of_panicking() {
        let t = Instant::now();
        assert!(after(t, Duration::MAX) > after(t, Duration::from_secs(86_400 * 365)));
        assert_eq!(after(t, Duration::from_secs(1)), t + Duration::from_secs(1));
    }
}
