//! Events leave the client's lock before they reach the observer.
//!
//! Every step queues its events under the lock, in the order they happen;
//! whoever releases the lock then delivers the queue, with no lock held, so
//! an observer may read the client's handle, the registry or the budget. One
//! thread delivers at a time (the others leave their events to it), which
//! keeps every client's events in order.
//!
//! An observer that panics does not stop the others: every queued event
//! still reaches every observer, then the first panic is resumed in the
//! thread that delivered (unless that thread is already unwinding, where a
//! second panic would abort the process).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use crate::buffer::BufferStats;
use crate::observer::EventKind;

/// Events waiting for delivery, and whether a thread is delivering.
#[derive(Default)]
pub(super) struct Outbox {
    queue: Vec<(EventKind, BufferStats)>,
    delivering: bool,
}

impl Outbox {
    pub(super) fn push(&mut self, kind: EventKind, stats: BufferStats) {
        // Most queues hold one event (a client that keeps up has `Opened`,
        // later `Closed`): room for one, not the four a `Vec` starts with.
        if self.queue.capacity() == 0 {
            self.queue.reserve_exact(1);
        }
        self.queue.push((kind, stats));
    }

    /// Whether [`take`](Self::take) would give a queue.
    #[inline]
    pub(super) fn has_work(&self) -> bool {
        !self.queue.is_empty() && !self.delivering
    }

    /// Takes the queue if this thread should deliver it: events wait and
    /// nobody else is delivering. The caller must call
    /// [`done`](Self::done) or take again until it gets `None`.
    pub(super) fn take(&mut self) -> Option<Vec<(EventKind, BufferStats)>> {
        if !self.has_work() {
            return None;
        }
        self.delivering = true;
        Some(std::mem::take(&mut self.queue))
    }

    /// Like [`take`](Self::take) for the thread that is delivering
    /// already: swaps the delivered (now empty) `batch` for the events
    /// queued since, or, when there are none, returns `false` (the batch's
    /// allocation is then freed with it: events are rare, at most a few a
    /// second with the drop reports paced, and a queue kept allocated would
    /// cost every connection its size for as long as it is open).
    pub(super) fn take_more(&mut self, batch: &mut Vec<(EventKind, BufferStats)>) -> bool {
        debug_assert!(batch.is_empty());
        if self.queue.is_empty() {
            self.delivering = false;
            return false;
        }
        std::mem::swap(&mut self.queue, batch);
        true
    }
}

/// Calls `f` for every event, containing panics; leaves `events` empty (its
/// allocation kept) and returns the first panic in `panic`.
pub(super) fn deliver(
    events: &mut Vec<(EventKind, BufferStats)>,
    mut f: impl FnMut(EventKind, BufferStats),
    panic: &mut Option<Box<dyn Any + Send>>,
) {
    for (kind, stats) in events.drain(..) {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(kind, stats))) {
            panic.get_or_insert(p);
        }
    }
}

/// Resumes an observer's panic once every event went out, unless the thread
/// is unwinding already.
pub(super) fn resume(panic: Option<Box<dyn Any + Send>>) {
    if let Some(p) = panic {
        if !std::thread::panicking() {
            resume_unwind(p);
        }
    }
}
