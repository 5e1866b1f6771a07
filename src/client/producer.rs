//! The producer side's steps: admission under the overflow policy and the
//! memory budget, the end of the stream, the timed rules' watch.

use std::sync::atomic::Ordering;
use std::task::Context;

use tokio::time::Instant;

use super::rules::has_timed_rule;
use super::{Admit, Client, End, Produce, Pushed, Reporter, State, Storage, after, now, register};
use crate::buffer::{Dropped, FrameClass};
use crate::config::Overflow;
use crate::observer::{BackpressureObserver, EventKind, EvictReason};

impl<D, O: BackpressureObserver, S: Storage<D>> Client<D, O, S> {
    /// Where the producer stands; registers its waker, and applies a timed
    /// rule that is due.
    pub(crate) fn poll_produce(&self, cx: &Context<'_>) -> Produce {
        let mut st = self.lock();
        if st.closed || st.end {
            return Produce::Closed;
        }
        register(&mut st.producer, cx);
        if has_timed_rule(&self.config) {
            if let Some(reason) = self.timed_out(&st, now()) {
                self.evict(&mut st, reason);
                st.wake_consumer = true;
                return Produce::Closed;
            }
        }
        if self.config.overflow() == Overflow::Pause && st.storage.is_full() {
            st.producer_paused = true;
        }
        if st.producer_paused {
            return Produce::Paused;
        }
        Produce::Ready {
            behind: !st.storage.is_empty(),
        }
    }

    /// Registers the producer's waker (to hear of the close); `false` if
    /// the stream has closed.
    pub(crate) fn register_producer(&self, cx: &Context<'_>) -> bool {
        let mut st = self.lock();
        register(&mut st.producer, cx);
        !st.closed
    }

    /// The class a frame is stored as: under `Overflow::Pause` nothing is
    /// dropped, so droppable frames count as critical.
    pub(super) fn effective_class(&self, class: FrameClass) -> FrameClass {
        if self.config.overflow() == Overflow::Pause && class != FrameClass::Critical {
            // Nor replaced: a frame that takes another's place under its
            // key may still need room that only a drop could make.
            FrameClass::Critical
        } else {
            class
        }
    }

    /// Reports the drops gathered since the last report if the report is
    /// due (at most one per `drop_report_interval`); otherwise returns the
    /// moment it will be, for the reporting side's timer. Takes no lock when
    /// there are none.
    pub(crate) fn report_drops(&self) -> Option<Instant> {
        if !self.drops_pending.load(Ordering::Acquire) {
            return None;
        }
        let mut st = self.lock();
        self.report_drops_locked(&mut st)
    }

    /// [`report_drops`](Self::report_drops) under the lock.
    pub(super) fn report_drops_locked(&self, st: &mut State<D, S>) -> Option<Instant> {
        if st.unreported.frames == 0 || st.closed {
            return None;
        }
        let t = now();
        if let Some(at) = st.drop_report_at.filter(|&at| t < at) {
            return Some(at);
        }
        self.report_drops_at(st, t);
        None
    }

    /// Reports every drop gathered, due or not: before `Recovered`, before
    /// `Closed` and at the producer's end, so that the reports add up.
    pub(super) fn flush_drops_locked(&self, st: &mut State<D, S>) {
        if st.unreported.frames > 0 && !st.closed {
            self.report_drops_at(st, now());
        }
    }

    fn report_drops_at(&self, st: &mut State<D, S>, t: Instant) {
        self.drops_pending.store(false, Ordering::Release);
        let Dropped { frames, bytes } = std::mem::take(&mut st.unreported);
        st.drop_report_at = Some(after(t, self.config.drop_report_interval()));
        st.event(EventKind::Dropped {
            count: frames as u64,
            bytes: bytes as u64,
        });
    }

    /// The producer ended: what it left goes after the kept frames.
    pub(crate) fn finish(&self, end: End) {
        let mut st = self.lock();
        if st.end {
            return;
        }
        st.end = true;
        match end {
            End::Eof => {}
            End::Trailers(t) => st.trailers = Some(Box::new(t)),
            End::Error(e) => st.error = Some(e),
        }
        if self.reporter == Reporter::Producer {
            // Nothing reports after the producer's task: what waits goes
            // out now.
            self.flush_drops_locked(&mut st);
        }
        self.refresh_done(&st);
        st.wake_consumer = true;
    }

    /// The producer's task stopped before the end (it panicked, or its
    /// runtime shut down): the consumer ends with an error after the kept
    /// frames.
    pub(crate) fn producer_stopped(&self) {
        let mut st = self.lock();
        if st.end {
            return;
        }
        st.stopped = true;
        st.wake_consumer = true;
    }

    /// Applies a timed eviction rule that is due; returns when the next one
    /// could be, if frames wait (or pressure lasts) and the stream is open.
    pub(crate) fn check_timers(&self) -> Option<Instant> {
        if !has_timed_rule(&self.config) {
            return None;
        }
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        if let Some(reason) = self.timed_out(&st, now()) {
            self.evict(&mut st, reason);
            st.wake_consumer = true;
            return None;
        }
        self.next_deadline(&st)
    }
}

impl<D, O: BackpressureObserver, S: Admit<D>> Client<D, O, S> {
    /// Takes room in the memory budget for what the frame adds to the
    /// storage, after what the storage's own policy drops for it. Runs with
    /// no lock held: the budget may shed other clients' frames (or this
    /// one's) under their locks. `Err` holds what was taken anyway.
    pub(super) fn reserve(&self, class: FrameClass, weight: usize) -> Result<usize, usize> {
        let Some(budget) = &self.budget else {
            return Ok(0);
        };
        let pause = self.config.overflow() == Overflow::Pause;
        let need = self.raw_lock().storage.growth(weight, class);
        if class == FrameClass::Critical && !pause {
            budget.force(need);
            return Ok(need);
        }
        if budget.reserve(need) {
            Ok(need)
        } else if pause {
            // Nothing is dropped under `Pause`: keep the frame, then wait.
            budget.force(need);
            Err(need)
        } else {
            Err(0)
        }
    }

    /// The producer step: puts a frame into the storage under the overflow
    /// policy and the budget, applies the drop rules, and wakes the
    /// consumer when it waits for this.
    pub(crate) fn push(&self, item: D, class: FrameClass, weight: usize) -> Pushed {
        let class = self.effective_class(class);
        let reserved = self.reserve(class, weight);
        let mut st = self.lock();
        let taken = match reserved {
            Ok(n) | Err(n) => n,
        };
        if st.closed || st.end {
            self.settle(&st, taken);
            return Pushed::Closed;
        }
        let overflow = self.config.overflow();
        let was_empty = st.storage.is_empty();
        let refused = reserved.is_err();
        let mut dropped = Dropped::default();
        // `Disconnect` drops nothing: a frame that needs room evicts the
        // client.
        let evict = if overflow == Overflow::Disconnect
            && (refused || !st.storage.has_room_for_class(weight, class))
        {
            self.settle(&st, taken);
            Some(EvictReason::Overflow)
        } else {
            if refused && overflow != Overflow::Pause {
                // The budget has no room even after shedding: this frame
                // is the one dropped.
                st.storage.reject(weight);
                if let Some(b) = &self.budget {
                    b.count_dropped(1);
                }
                dropped = Dropped {
                    frames: 1,
                    bytes: weight,
                };
            } else {
                dropped = st.storage.push(item, class);
                if let Some(budget) = self.budget.as_ref().filter(|_| !refused) {
                    // The budget took `taken` for this frame. If the storage
                    // grew more (the budget shed this client's own oldest
                    // frame, so the ring kept what it meant to drop), drop
                    // the oldest again to stay within what was taken.
                    let allowed = self
                        .budget_bytes
                        .load(Ordering::Acquire)
                        .saturating_add(taken);
                    while st.storage.bytes() > allowed {
                        let Some(weight) = st.storage.evict_oldest() else {
                            break;
                        };
                        budget.count_dropped(1);
                        dropped.frames += 1;
                        dropped.bytes += weight;
                    }
                }
                self.settle(&st, taken);
                // A `Pause` client over the budget waits for its client,
                // if it has frames that its client will take.
                if refused && !was_empty {
                    st.producer_paused = true;
                }
            }
            let rule = self.after_push(&mut st, was_empty, dropped, None);
            if overflow == Overflow::Disconnect && dropped.frames > 0 {
                Some(EvictReason::Overflow)
            } else {
                rule
            }
        };
        if let Some(reason) = evict {
            self.evict(&mut st, reason);
            st.wake_consumer = true;
            return Pushed::Closed;
        }
        if overflow == Overflow::Pause && st.storage.is_full() {
            st.producer_paused = true;
        }
        let paused = st.producer_paused;
        if was_empty || (dropped.frames > 0 && self.reporter == Reporter::Consumer) {
            st.wake_consumer = true;
        }
        drop(st);
        if paused {
            Pushed::Paused
        } else {
            Pushed::Taken
        }
    }
}
