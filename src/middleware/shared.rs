//! The state shared by a pump task and the body hyper polls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use http::HeaderMap;

use crate::BoxError;
use crate::budget::{BudgetMember, MemoryBudget};
use crate::buffer::{BufferStats, ClientBuffer, Dropped, FrameClass, Remaining, Weigher};
use crate::config::BufferConfig;
use crate::config::Overflow;
use crate::handle::{ClientState, HandleInner, Health, now};
use crate::observer::{
    BackpressureEvent, BackpressureObserver, CloseReason, EventKind, EvictReason,
};

pub(crate) struct Shared<D, O, W = Remaining> {
    state: Mutex<State<D, W>>,
    pub(crate) handle: Arc<HandleInner>,
    pub(crate) config: BufferConfig,
    observer: Arc<O>,
    pub(crate) budget: Option<MemoryBudget>,
    /// The buffer's bytes, mirrored for the budget's lock-free scans.
    budget_bytes: AtomicUsize,
    /// Nothing more will come out: `is_end_stream` reads this without the
    /// lock (hyper asks after every frame).
    done: AtomicBool,
}

pub(crate) struct State<D, W = Remaining> {
    pub(crate) buffer: ClientBuffer<D, W>,
    /// Trailers from the inner body: after every kept data frame.
    pub(crate) trailers: Option<HeaderMap>,
    /// The inner body's error: after every kept data frame.
    pub(crate) error: Option<BoxError>,
    /// The inner body has ended (`None`, trailers or error).
    pub(crate) end: bool,
    /// The pump stopped before the end (it panicked or its runtime shut down).
    pub(crate) pump_stopped: bool,
    /// `Closed` has fired: the consumer is done or gone; the pump must stop.
    pub(crate) closed: bool,
    /// Evicted by a rule: the consumer ends with this error next.
    pub(crate) evicted: Option<EvictReason>,
    /// The pump waits for room (`Overflow::Pause`).
    pub(crate) pump_paused: bool,
    /// Between a `Pressure` and its `Recovered`, and since when.
    pressure: Option<Instant>,
    /// Evictions not yet reported.
    unreported: Dropped,
    /// When the client last took a frame (or the response was wrapped).
    last_taken: Instant,
    /// Since when frames have waited without the client taking one.
    pub(crate) waiting_since: Option<Instant>,
    /// Recent drop batches, for `Eviction::after_dropped_within`.
    drop_window: VecDeque<(Instant, u64)>,
    pub(crate) consumer_waker: Option<Waker>,
    pub(crate) pump_waker: Option<Waker>,
}

impl<D, W> State<D, W> {
    /// The inner body ended and everything it left was handed out.
    pub(crate) fn at_end(&self) -> bool {
        self.end
            && self.buffer.is_empty()
            && self.buffer.trailing_gap().is_empty()
            && self.trailers.is_none()
            && self.error.is_none()
    }
}

fn take_wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

pub(crate) fn wake(waker: Option<Waker>) {
    take_wake(waker)
}

impl<D: Send + 'static, O: BackpressureObserver, W: Send + 'static> Shared<D, O, W> {
    pub(crate) fn new(
        buffer: ClientBuffer<D, W>,
        handle: Arc<HandleInner>,
        observer: Arc<O>,
        budget: Option<MemoryBudget>,
    ) -> Arc<Self> {
        let config = *buffer.config();
        let shared = Arc::new(Self {
            state: Mutex::new(State {
                buffer,
                trailers: None,
                error: None,
                end: false,
                pump_stopped: false,
                closed: false,
                evicted: None,
                pump_paused: false,
                pressure: None,
                unreported: Dropped::default(),
                last_taken: now(),
                waiting_since: None,
                drop_window: VecDeque::new(),
                consumer_waker: None,
                pump_waker: None,
            }),
            handle,
            config,
            observer,
            budget,
            budget_bytes: AtomicUsize::new(0),
            done: AtomicBool::new(false),
        });
        let state: Arc<dyn ClientState> = shared.clone();
        shared.handle.attach(Arc::downgrade(&state));
        if let Some(budget) = &shared.budget {
            let member: Arc<dyn BudgetMember> = shared.clone();
            budget.join(Arc::downgrade(&member));
        }
        shared
    }
}

impl<D, O: BackpressureObserver, W> Shared<D, O, W> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<D, W>> {
        // A panicking observer poisons nothing we cannot continue from: the
        // state is updated before callbacks run.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whether anything more will come out. Called with the lock
    /// held after every change that could end the stream.
    pub(crate) fn refresh_done(&self, st: &State<D, W>) {
        let done = (st.closed && st.evicted.is_none()) || st.at_end();
        self.done.store(done, Ordering::Release);
    }

    /// Nothing more will come out (see `refresh_done`).
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub(crate) fn emit(&self, kind: EventKind, stats: BufferStats) {
        self.observer.on_event(&BackpressureEvent {
            client: &self.handle.info,
            kind,
            stats,
            handle: &self.handle,
        });
    }

    /// Brings the budget in line with the buffer after a change; `reserved`
    /// bytes were taken from the budget for it beforehand.
    pub(crate) fn settle_budget(&self, st: &State<D, W>, reserved: usize) {
        if let Some(budget) = &self.budget {
            let now = st.buffer.bytes();
            let prev = self.budget_bytes.swap(now, Ordering::AcqRel);
            budget.release((prev + reserved).saturating_sub(now));
        }
    }

    /// After a push: records drops, fires `Pressure` on the upward crossing,
    /// and applies the drop-count eviction rules. Called with the lock held;
    /// returns a rule that fired.
    pub(crate) fn after_push(
        &self,
        st: &mut State<D, W>,
        was_empty: bool,
        dropped: Dropped,
    ) -> Option<EvictReason> {
        if was_empty && !st.buffer.is_empty() && self.config.eviction().stall.is_some() {
            st.waiting_since = Some(now().max(st.last_taken));
        }
        if st.pressure.is_none() && !st.buffer.is_healthy() {
            st.pressure = Some(if self.config.eviction().pressure.is_some() {
                now()
            } else {
                st.last_taken
            });
            self.handle.set_health(Health::Pressure);
            self.emit(EventKind::Pressure, st.buffer.stats());
        }
        if dropped.frames == 0 {
            return None;
        }
        st.unreported.frames += dropped.frames;
        st.unreported.bytes += dropped.bytes;
        let rules = self.config.eviction();
        if let Some(max) = rules.dropped {
            if st.buffer.stats().dropped > max {
                return Some(EvictReason::DroppedTotal);
            }
        }
        if let Some((max, window)) = rules.dropped_within {
            let t = now();
            match st.drop_window.back_mut() {
                Some((at, n)) if *at == t => *n += dropped.frames as u64,
                _ => st.drop_window.push_back((t, dropped.frames as u64)),
            }
            while st
                .drop_window
                .front()
                .is_some_and(|(at, _)| t.duration_since(*at) > window)
            {
                st.drop_window.pop_front();
            }
            if st.drop_window.iter().map(|(_, n)| n).sum::<u64>() > max {
                return Some(EvictReason::DroppedWindow);
            }
        }
        None
    }

    /// Reports the drops gathered since the last report. Called with the
    /// lock held.
    pub(crate) fn report_drops(&self, st: &mut State<D, W>) {
        if st.unreported.frames > 0 && !st.closed {
            let Dropped { frames, bytes } = std::mem::take(&mut st.unreported);
            self.emit(
                EventKind::Dropped {
                    count: frames as u64,
                    bytes: bytes as u64,
                },
                st.buffer.stats(),
            );
        }
    }

    /// After the consumer took frames: fires `Recovered` on the downward
    /// crossing, notes the time, and returns the pump's waker if it waits for
    /// room. Called with the lock held.
    pub(crate) fn after_pop(&self, st: &mut State<D, W>) -> Option<Waker> {
        let t = now();
        st.last_taken = t;
        st.waiting_since = (!st.buffer.is_empty()).then_some(t);
        if st.pressure.is_some() && st.buffer.is_healthy() {
            st.pressure = None;
            self.handle.set_health(Health::Healthy);
            self.emit(EventKind::Recovered, st.buffer.stats());
        }
        self.settle_budget(st, 0);
        if st.end && st.buffer.is_empty() {
            self.refresh_done(st);
        }
        if st.pump_paused && !st.buffer.is_full() {
            st.pump_paused = false;
            return st.pump_waker.take();
        }
        None
    }

    /// Fires `Closed` unless it has fired, and frees what will never be
    /// delivered; the pump stops at its next look. Called with the lock held.
    pub(crate) fn close(&self, st: &mut State<D, W>, reason: CloseReason) {
        if !st.closed {
            self.report_drops(st);
            st.closed = true;
            let stats = st.buffer.stats();
            self.emit(EventKind::Closed { reason }, stats);
            self.handle.set_closed(reason, stats);
            st.buffer.discard();
            // Nothing more goes out after `Closed`.
            st.trailers = None;
            st.error = None;
            self.settle_budget(st, 0);
            self.refresh_done(st);
        }
    }

    /// Gives up on the client: `Closed` with the rule, and the consumer ends
    /// with [`Evicted`](crate::Evicted). Returns the consumer's waker.
    pub(crate) fn evict(&self, st: &mut State<D, W>, reason: EvictReason) -> Option<Waker> {
        if st.closed {
            return None;
        }
        st.evicted = Some(reason);
        self.close(st, CloseReason::Evicted(reason));
        st.consumer_waker.take()
    }

    /// The next moment a time-based eviction rule could fire.
    pub(crate) fn next_deadline(&self, st: &State<D, W>) -> Option<Instant> {
        let rules = self.config.eviction();
        let stall = rules
            .stall
            .zip(st.waiting_since)
            .filter(|_| !st.buffer.is_empty())
            .map(|(d, since)| since + d);
        let pressure = rules.pressure.zip(st.pressure).map(|(d, since)| since + d);
        match (stall, pressure) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A time-based rule that has fired by `t`.
    pub(crate) fn timed_out(&self, st: &State<D, W>, t: Instant) -> Option<EvictReason> {
        let rules = self.config.eviction();
        if let (Some(d), Some(since)) = (rules.stall, st.waiting_since) {
            if !st.buffer.is_empty() && t >= since + d {
                return Some(EvictReason::Stalled);
            }
        }
        if let (Some(d), Some(since)) = (rules.pressure, st.pressure) {
            if t >= since + d {
                return Some(EvictReason::Pressure);
            }
        }
        None
    }
}

impl<D, O: BackpressureObserver, W: Weigher<D>> Shared<D, O, W> {
    /// The class a frame is buffered as: under `Overflow::Pause` nothing is
    /// dropped, so droppable frames count as critical (at most one frame
    /// past the limits, then the producer side stops).
    pub(crate) fn effective_class(&self, class: FrameClass) -> FrameClass {
        if self.config.overflow() == Overflow::Pause && class == FrameClass::Droppable {
            FrameClass::Critical
        } else {
            class
        }
    }

    /// Takes `weight` bytes from the budget for a frame of `class`, before
    /// the lock is taken (the budget may shed other clients' frames, or this
    /// one's, under their locks). `None`: the budget refused; the frame is
    /// dropped on admission.
    pub(crate) fn reserve(&self, class: FrameClass, weight: usize) -> Option<usize> {
        match &self.budget {
            None => Some(0),
            Some(b) if class == FrameClass::Critical => {
                b.force(weight);
                Some(weight)
            }
            Some(b) => b.reserve(weight).then_some(weight),
        }
    }

    /// Puts a frame into the ring under the overflow policy, after
    /// [`reserve`](Self::reserve): returns whether the ring was empty and
    /// what was dropped, or the eviction `Overflow::Disconnect` calls for.
    /// Called with the lock held; the caller runs `after_push`.
    pub(crate) fn admit(
        &self,
        st: &mut State<D, W>,
        item: D,
        class: FrameClass,
        weight: usize,
        reserved: Option<usize>,
    ) -> Result<(bool, Dropped), EvictReason> {
        if self.config.overflow() == Overflow::Disconnect
            && class != FrameClass::Critical
            && !st.buffer.has_room_for(weight)
        {
            self.settle_budget(st, reserved.unwrap_or(0));
            return Err(EvictReason::Overflow);
        }
        let was_empty = st.buffer.is_empty();
        let dropped = match reserved {
            Some(reserved) => {
                let dropped = st.buffer.push_with(item, class, drop);
                self.settle_budget(st, reserved);
                dropped
            }
            None => {
                st.buffer.count_rejected(weight);
                if let Some(b) = &self.budget {
                    b.count_dropped(1);
                }
                Dropped {
                    frames: 1,
                    bytes: weight,
                }
            }
        };
        Ok((was_empty, dropped))
    }
}

impl<D: Send, O: BackpressureObserver, W: Send> ClientState for Shared<D, O, W> {
    fn stats(&self) -> BufferStats {
        self.lock().buffer.stats()
    }

    fn idle(&self) -> Duration {
        now().saturating_duration_since(self.lock().last_taken)
    }
}

impl<D: Send, O: BackpressureObserver, W: Send> BudgetMember for Shared<D, O, W> {
    fn budget_bytes(&self) -> usize {
        self.budget_bytes.load(Ordering::Acquire)
    }

    fn shed(&self, need: usize) -> usize {
        let mut st = self.lock();
        if st.closed {
            return 0;
        }
        let mut freed = Dropped::default();
        while freed.bytes < need {
            match st.buffer.evict_oldest() {
                Some((_, w)) => {
                    freed.frames += 1;
                    freed.bytes += w;
                }
                None => break,
            }
        }
        if freed.frames > 0 {
            if let Some(budget) = &self.budget {
                budget.count_dropped(freed.frames as u64);
            }
            let reason = self.after_push(&mut st, false, freed);
            self.settle_budget(&st, 0);
            if let Some(reason) = reason {
                take_wake(self.evict(&mut st, reason));
            } else if let Some(pump) = &st.pump_waker {
                // Its pump reports the drops, batched, when it next runs.
                pump.wake_by_ref();
            }
        }
        freed.bytes
    }
}

impl<D, O, W> Drop for Shared<D, O, W> {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(*self.budget_bytes.get_mut());
        }
    }
}
