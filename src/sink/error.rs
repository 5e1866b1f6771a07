//! [`SinkClosed`], the error of a [`BufferedSink`](super::BufferedSink).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use crate::observer::CloseReason;

/// A [`BufferedSink`](super::BufferedSink) no longer takes messages.
///
/// [`reason`](Self::reason) tells why: the client went away
/// ([`CloseReason::ClientGone`], with the real sink's error as the
/// [`source`](std::error::Error::source)), it was evicted
/// ([`CloseReason::Evicted`]), or the sink was closed
/// ([`CloseReason::Completed`]).
#[derive(Debug, Clone)]
pub struct SinkClosed {
    reason: CloseReason,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl SinkClosed {
    pub(super) fn new(
        reason: CloseReason,
        source: Option<Arc<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self { reason, source }
    }

    /// Why the sink closed.
    pub fn reason(&self) -> CloseReason {
        self.reason
    }
}

impl fmt::Display for SinkClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            CloseReason::Evicted(rule) => {
                write!(f, "buffered sink closed: client evicted ({rule})")
            }
            reason => write!(f, "buffered sink closed: {reason}"),
        }
    }
}

impl StdError for SinkClosed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}
