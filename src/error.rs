use std::fmt;

use crate::observer::EvictReason;

/// The pump task stopped before its inner body ended: it panicked (a
/// panicking observer, or a panicking inner body) or its runtime shut down.
///
/// A buffered body ends with this error, after the data kept before it.
/// Find it with `downcast_ref::<PumpStopped>()` on the body's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PumpStopped {
    _priv: (),
}

impl PumpStopped {
    pub(crate) fn new() -> Self {
        Self { _priv: () }
    }
}

impl fmt::Display for PumpStopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the backpressure pump stopped before the response body ended")
    }
}

impl std::error::Error for PumpStopped {}

/// The layer gave up on a slow client and ended its response; the body's
/// error, which hyper turns into a reset connection (HTTP/1) or
/// `RST_STREAM` (HTTP/2).
///
/// Find it with `downcast_ref::<Evicted>()` on the body's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    reason: EvictReason,
}

impl Evicted {
    pub(crate) fn new(reason: EvictReason) -> Self {
        Self { reason }
    }

    /// The rule that fired.
    pub fn reason(&self) -> EvictReason {
        self.reason
    }
}

impl fmt::Display for Evicted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slow client evicted: {}", self.reason)
    }
}

impl std::error::Error for Evicted {}
