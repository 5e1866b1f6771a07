use std::fmt;

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
