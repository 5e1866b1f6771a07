//! The consumer side's steps: the next frame (or the end), gap markers, and
//! `Flush::Interval`'s releases.

use std::any::Any;
use std::task::{Context, Waker};

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use std::time::Duration;

use super::{Client, Next, State, Storage, after, now};
use crate::buffer::Gap;
use crate::config::Flush;
use crate::handle::Health;
use crate::observer::{BackpressureObserver, CloseReason, EventKind, EvictReason};
use crate::policy::{GapAction, GapMarker};

/// `Flush::Interval`'s bookkeeping, kept by the consumer side.
#[derive(Debug, Default)]
pub(crate) struct Release {
    left: usize,
    next: Option<Instant>,
}

impl Release {
    /// The frames and bytes that may go out in one batch now, or the moment
    /// of the next release.
    #[inline]
    fn allow(&mut self, flush: Flush, waiting: usize) -> Result<(usize, usize), Instant> {
        match flush {
            Flush::Immediate => Ok((1, 0)),
            Flush::Coalesce {
                max_frames,
                max_bytes,
            } => Ok((max_frames, max_bytes)),
            Flush::Interval {
                period,
                max_frames,
                max_bytes,
            } => {
                if self.left == 0 {
                    let t = now();
                    if let Some(at) = self.next.filter(|at| t < *at) {
                        return Err(at);
                    }
                    self.left = waiting;
                    self.next = Some(after(t, period));
                }
                Ok((max_frames.min(self.left), max_bytes))
            }
        }
    }
}

impl<D, O: BackpressureObserver, S: Storage<D>> Client<D, O, S> {
    /// The consumer step: the next frame (joined with those after it, up to
    /// the flush limits, when `join` and the data is `Bytes`), or the end,
    /// or `Wait` with the consumer's waker registered.
    pub(crate) fn poll_next(&self, cx: &Context<'_>, release: &mut Release, join: bool) -> Next<D>
    where
        D: 'static,
    {
        let mut st = self.lock();
        // A window over a hub's log: what was published since, within the
        // client's limits (parked at once if nothing was).
        self.look(&mut st, Some(cx.waker()));
        if let Some(reason) = st.evicted.take() {
            self.refresh_done(&st);
            return Next::Evicted(reason);
        }
        if st.closed {
            return Next::Closed;
        }
        if !st.storage.is_empty() {
            let waiting = st.storage.len();
            // A window over a hub's log hands out the hub's shared frames
            // unless a flush was chosen (see `BufferConfig::window_flush`).
            let flush = if st.storage.filled_by_others() {
                self.config.window_flush()
            } else {
                self.config.flush()
            };
            let (max_frames, max_bytes) = match release.allow(flush, waiting) {
                Ok(limits) => limits,
                Err(at) => {
                    st.register_consumer(cx);
                    return Next::Wait(Some(at));
                }
            };
            let (first, gap) = st.storage.pop().expect("not empty");
            let mut taken = 1;
            let data = if join && max_frames > 1 {
                coalesce(first, &mut st.storage, max_frames, max_bytes, &mut taken)
            } else {
                first
            };
            release.left = release.left.saturating_sub(taken);
            self.after_pop(&mut st);
            return Next::Data(data, gap);
        }
        if st.end && !st.storage.trailing_gap().is_empty() {
            return Next::TrailingGap(st.storage.take_trailing_gap());
        }
        if st.end {
            if let Some(last) = st.last.take() {
                return Next::Data(*last, Gap::default());
            }
        }
        if let Some(trailers) = st.trailers.take() {
            let reason = st.end_reason();
            self.close_locked(&mut st, reason);
            return Next::Trailers(*trailers);
        }
        if let Some(error) = st.error.take() {
            self.close_locked(&mut st, CloseReason::InnerError);
            return Next::Error(error);
        }
        if st.end {
            let reason = st.end_reason();
            self.close_locked(&mut st, reason);
            st.wake_producer = true;
            return Next::End;
        }
        if st.stopped {
            self.close_locked(&mut st, CloseReason::InnerError);
            return Next::Stopped;
        }
        st.register_consumer(cx);
        if !st.storage.park(cx.waker()) {
            // Published meanwhile: look again at once.
            st.wake_consumer = true;
        }
        Next::Wait(None)
    }

    /// Brings a storage that others fill up to date (see
    /// [`Storage::refresh`]): drops as the client's limits say, applies the
    /// rules, reports the drops, and marks the end of a limited window.
    pub(super) fn look(&self, st: &mut State<D, S>, park: Option<&Waker>) {
        // A ring that the producer fills is up to date already.
        if st.closed || !st.storage.filled_by_others() {
            return;
        }
        let was_empty = st.storage.is_empty();
        // What this look finds skipped was published since the last one.
        let since = if self.config.rules().dropped_within.is_some() {
            st.drop_window
                .get_or_insert_with(Box::default)
                .looked_at
                .replace(now())
        } else {
            None
        };
        let rule = match st.storage.refresh(park) {
            Ok(dropped) => {
                let rule = self.after_push(st, was_empty, dropped, since);
                // Also drops that waited for their interval to end.
                self.report_drops_locked(st);
                rule
            }
            Err(rule) => Some(rule),
        };
        if let Some(rule) = rule {
            self.evict(st, rule);
            return;
        }
        if !st.end && st.storage.ended() {
            st.end = true;
            st.trailers = st.storage.end_trailers().map(Box::new);
            self.refresh_done(st);
        }
    }

    /// The hub's sweep over a client that may not be reading: brings its
    /// window up to date (pressure, drops, drop rules) and applies a timed
    /// rule that is due. Returns when it wants its next look, `None` once it
    /// has closed.
    ///
    /// A client that stays stalled under pressure is looked at less and
    /// less often, down to once per `slowest` (its drops are counted all
    /// the same, and reported in larger batches); a timed rule's deadline
    /// and any read bring the sweep back to every `period`.
    pub(crate) fn sweep(&self, period: Duration, slowest: Duration) -> Option<Instant> {
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        let t = now();
        if let Some(next) = st.sweep_next.filter(|&next| t < next) {
            return Some(next);
        }
        let last_taken = st.last_taken;
        self.look(&mut st, None);
        if st.closed {
            return None;
        }
        if !st.storage.is_empty() && st.waiting_since.is_none() {
            st.waiting_since = Some(t);
        }
        if let Some(rule) = self.timed_out(&st, t) {
            self.evict(&mut st, rule);
            return None;
        }
        // Stalled under pressure since the last look: it has heard of it;
        // what changes now is only how much it missed.
        let stalled = st.pressure.is_some() && st.last_taken == last_taken;
        st.sweep_every = if stalled {
            (st.sweep_every * 2).clamp(period, slowest)
        } else {
            period
        };
        let mut next = after(t, st.sweep_every);
        if let Some(deadline) = self.next_deadline(&st) {
            next = next.min(deadline.max(t));
        }
        st.sweep_next = Some(next);
        Some(next)
    }

    /// A drain task's look before it waits on its real sink: brings a
    /// window up to date, reports the drops gathered (a drain reports for
    /// its sink), registers the drain's waker, and says whether the stream
    /// has closed, and when drops that wait for their report are due. One
    /// lock.
    pub(crate) fn drain_look(&self, cx: &Context<'_>) -> (bool, Option<Instant>) {
        let mut st = self.lock();
        self.look(&mut st, None);
        let report_at = self.report_drops_locked(&mut st);
        st.register_consumer(cx);
        (st.closed, report_at)
    }

    /// Asks `marker` what to do at a gap; a marker that ends the stream
    /// closes it with [`EvictReason::DataLoss`] (and wakes the producer, so
    /// that it stops).
    pub(crate) fn on_gap<M: GapMarker<D>>(&self, marker: &M, gap: Gap) -> GapAction<D> {
        let action = marker.on_gap(gap);
        if let GapAction::End(_) = action {
            self.close(CloseReason::Evicted(EvictReason::DataLoss));
        }
        action
    }

    /// After the consumer took frames: `Recovered` on the way down, the
    /// budget, and a wake-up for the producer if it may go on.
    pub(super) fn after_pop(&self, st: &mut State<D, S>) {
        let t = now();
        st.last_taken = t;
        st.waiting_since = (!st.storage.is_empty()).then_some(t);
        if st.pressure.is_some() && st.storage.is_healthy() {
            // The episode's drops, all of them, before its end.
            self.flush_drops_locked(st);
            st.pressure = None;
            self.handle.set_health(Health::Healthy);
            st.event(EventKind::Recovered);
        }
        self.settle(st, 0);
        if st.end && st.storage.is_empty() {
            self.refresh_done(st);
        }
        if st.producer_paused && !st.storage.is_full() {
            st.producer_paused = false;
            st.wake_producer = true;
        }
    }
}

/// Joins the frames waiting after `first` into one, up to the limits and
/// never across a gap, when the data is `Bytes`; any other data type goes
/// out frame by frame.
fn coalesce<D: 'static, S: Storage<D>>(
    first: D,
    storage: &mut S,
    max_frames: usize,
    max_bytes: usize,
    taken: &mut usize,
) -> D {
    let fits = |storage: &S, len: usize| {
        storage
            .peek_meta()
            .is_some_and(|(w, gap)| gap.is_empty() && len + w <= max_bytes)
    };
    let Some(head) = (&first as &dyn Any).downcast_ref::<Bytes>() else {
        return first;
    };
    if !fits(storage, head.len()) {
        return first;
    }
    // Room for what waits (as weighed), within the limit: a join of two
    // small frames does not take a buffer of `max_bytes`, which hyper may
    // hold until the client reads it.
    let room = head.len().saturating_add(storage.bytes()).min(max_bytes);
    let mut joined = BytesMut::with_capacity(room);
    joined.extend_from_slice(head);
    *taken += storage.join(&mut joined, max_frames.saturating_sub(*taken), max_bytes);
    let mut out: Option<D> = None;
    if let Some(slot) = (&mut out as &mut dyn Any).downcast_mut::<Option<Bytes>>() {
        *slot = Some(joined.freeze());
    }
    out.expect("D is Bytes")
}
