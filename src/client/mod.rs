//! One client's stream: the state machine that every way of serving a
//! client drives.
//!
//! A client's stream has two sides. The *producer* side puts frames in (the
//! pump task of a response body, or the task sending into a
//! [`BufferedSink`](crate::BufferedSink)); the *consumer* side takes them out
//! at the client's pace (the body hyper polls, or the sink's drain task).
//! [`Client`] holds everything that happens between the two, written once:
//! admission under the overflow policy and the memory budget, pressure
//! episodes, batched drop reports, the eviction rules, gap markers, interval
//! releases, the end of the stream (trailers, error) after the kept frames,
//! closing exactly once, and each side's waker. Where the frames wait is a
//! [`Storage`].
//!
//! The I/O loops stay with their users (`middleware::{body, pump}`,
//! `sink::drain`); each of their steps is one call here.

mod clock;
mod events;
mod info;
#[cfg(all(test, backpressure_loom))]
mod loom;
mod storage;

use std::any::Any;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use tokio::time::Instant;

pub(crate) use self::clock::{Timer, after, now};
use self::events::Outbox;
pub use self::info::{ClientId, ClientInfo, PeerAddr};
pub(crate) use self::info::{connection, peer_addr, route};
pub(crate) use self::storage::{Admit, Storage};
use crate::BoxError;
use crate::budget::{BudgetMember, MemoryBudget};
use crate::buffer::{BufferStats, Dropped, FrameClass, Gap};
use crate::config::{BufferConfig, Flush, Overflow};
use crate::handle::{ClientState, HandleInner, Health};
use crate::observer::{
    BackpressureEvent, BackpressureObserver, CloseReason, EventKind, EvictReason,
};
use crate::policy::{GapAction, GapMarker};
use crate::sync::{AtomicBool, AtomicUsize, Mutex, MutexGuard};

/// The side that reports drops, batched, each time its task runs: the
/// producer's pump for a response body, the consumer's drain for a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reporter {
    Producer,
    Consumer,
}

/// How the producer's stream ended.
pub(crate) enum End {
    Eof,
    Trailers(HeaderMap),
    Error(BoxError),
}

/// What became of a frame the producer pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Taken (kept, or dropped as the overflow policy says).
    Taken,
    /// Taken, and the producer must wait for room (`Overflow::Pause`).
    Paused,
    /// Not taken: the stream is closed, finished or was just evicted.
    Closed,
}

/// What the producer side may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Produce {
    /// Push; `behind`: frames wait for the client.
    Ready { behind: bool },
    /// Wait for room; the producer's waker is registered.
    Paused,
    /// Stop: the stream is closed.
    Closed,
}

/// What the consumer side gets next.
pub(crate) enum Next<D> {
    /// A frame (possibly several joined) and the gap before it.
    Data(D, Gap),
    /// The producer ended and frames were lost after the last one delivered.
    TrailingGap(Gap),
    /// The producer's trailers; the stream has closed (completed).
    Trailers(HeaderMap),
    /// The producer's error; the stream has closed.
    Error(BoxError),
    /// A rule gave up on the client; the stream has closed.
    Evicted(EvictReason),
    /// The producer's task stopped before the end; the stream has closed.
    Stopped,
    /// Everything was delivered; the stream has closed (completed).
    End,
    /// Closed before (the client went, or the eviction was reported).
    Closed,
    /// Nothing now: the consumer's waker is registered; frames that wait
    /// are held until the given release.
    Wait(Option<Instant>),
}

/// `Flush::Interval`'s bookkeeping, kept by the consumer side.
#[derive(Debug, Default)]
pub(crate) struct Release {
    left: usize,
    next: Option<Instant>,
}

impl Release {
    /// The frames and bytes that may go out in one batch now, or the moment
    /// of the next release.
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

/// One client's stream, shared by its producer and consumer sides.
pub(crate) struct Client<D, O, S> {
    state: Mutex<State<D, S>>,
    handle: Arc<HandleInner>,
    config: BufferConfig,
    observer: Arc<O>,
    budget: Option<MemoryBudget>,
    reporter: Reporter,
    /// The storage's bytes, mirrored for the budget's lock-free scans.
    budget_bytes: AtomicUsize,
    /// Nothing more will come out: `is_end_stream` reads this without the
    /// lock (hyper asks after every frame).
    done: AtomicBool,
}

struct State<D, S> {
    storage: S,
    trailers: Option<HeaderMap>,
    error: Option<BoxError>,
    /// The producer has ended (end of stream, trailers, error).
    end: bool,
    /// The producer's task stopped before the end.
    stopped: bool,
    /// `Closed` has fired: the producer must stop.
    closed: bool,
    /// Evicted by a rule: the consumer ends with this error next.
    evicted: Option<EvictReason>,
    /// The producer waits for room.
    producer_paused: bool,
    producer: Option<Waker>,
    consumer: Option<Waker>,
    /// Wake the producer / the consumer once the lock is released.
    wake_producer: bool,
    wake_consumer: bool,
    /// Between a `Pressure` and its `Recovered`, and since when.
    pressure: Option<Instant>,
    /// Drops not yet reported.
    unreported: Dropped,
    /// When the client last took a frame (or the stream opened).
    last_taken: Instant,
    /// Since when frames have waited without the client taking one.
    waiting_since: Option<Instant>,
    /// Drops in buckets of a 64th of `after_dropped_within`'s window, and
    /// their sum: constant work per push whatever the rate.
    drop_window: VecDeque<(Instant, u64)>,
    drop_window_sum: u64,
    outbox: Outbox,
    _data: std::marker::PhantomData<fn() -> D>,
}

impl<D, S: Storage<D>> State<D, S> {
    /// The producer ended and everything it left was handed out.
    fn at_end(&self) -> bool {
        self.end
            && self.storage.is_empty()
            && self.storage.trailing_gap().is_empty()
            && self.trailers.is_none()
            && self.error.is_none()
    }

    fn event(&mut self, kind: EventKind) {
        let stats = self.storage.stats();
        self.outbox.push(kind, stats);
    }

    fn register_consumer(&mut self, cx: &Context<'_>) {
        register(&mut self.consumer, cx);
    }
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Wakes a waker taken out of the state, after the lock is released.
pub(crate) fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// The client's lock. Dropping it releases the lock, then delivers the
/// events queued under it (see `events`).
struct Locked<'a, D, O: BackpressureObserver, S: Storage<D>> {
    client: &'a Client<D, O, S>,
    guard: Option<MutexGuard<'a, State<D, S>>>,
}

impl<D, O: BackpressureObserver, S: Storage<D>> Deref for Locked<'_, D, O, S> {
    type Target = State<D, S>;
    fn deref(&self) -> &State<D, S> {
        self.guard.as_ref().expect("locked")
    }
}

impl<D, O: BackpressureObserver, S: Storage<D>> DerefMut for Locked<'_, D, O, S> {
    fn deref_mut(&mut self) -> &mut State<D, S> {
        self.guard.as_mut().expect("locked")
    }
}

impl<D, O: BackpressureObserver, S: Storage<D>> Drop for Locked<'_, D, O, S> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let producer = std::mem::take(&mut guard.wake_producer)
            .then(|| guard.producer.take())
            .flatten();
        let consumer = std::mem::take(&mut guard.wake_consumer)
            .then(|| guard.consumer.take())
            .flatten();
        let batch = guard.outbox.take();
        drop(guard);
        // Wakers first: an observer that panics below must not leave a side
        // waiting for a wake-up that never comes.
        wake(producer);
        wake(consumer);
        let Some(mut batch) = batch else {
            return;
        };
        let client = self.client;
        let mut panic: Option<Box<dyn Any + Send>> = None;
        loop {
            events::deliver(batch, |kind, stats| client.emit(kind, stats), &mut panic);
            match client.raw_lock().outbox.take_more() {
                Some(more) => batch = more,
                None => break,
            }
        }
        events::resume(panic);
    }
}

impl<D, O, S> Client<D, O, S>
where
    D: Send + 'static,
    O: BackpressureObserver,
    S: Storage<D> + Send + 'static,
{
    /// A client over `storage`, attached to its handle and budget. `Opened`
    /// fires with [`open`](Self::open).
    pub(crate) fn new(
        storage: S,
        handle: Arc<HandleInner>,
        observer: Arc<O>,
        budget: Option<MemoryBudget>,
        reporter: Reporter,
    ) -> Arc<Self> {
        let config = *storage.config();
        let client = Arc::new(Self {
            state: Mutex::new(State {
                storage,
                trailers: None,
                error: None,
                end: false,
                stopped: false,
                closed: false,
                evicted: None,
                producer_paused: false,
                producer: None,
                consumer: None,
                wake_producer: false,
                wake_consumer: false,
                pressure: None,
                unreported: Dropped::default(),
                last_taken: now(),
                waiting_since: None,
                drop_window: VecDeque::new(),
                drop_window_sum: 0,
                outbox: Outbox::default(),
                _data: std::marker::PhantomData,
            }),
            handle,
            config,
            observer,
            budget,
            reporter,
            budget_bytes: AtomicUsize::new(0),
            done: AtomicBool::new(false),
        });
        let state: Arc<dyn ClientState> = client.clone();
        client.handle.attach(Arc::downgrade(&state));
        if let Some(budget) = &client.budget {
            let member: Arc<dyn BudgetMember> = client.clone();
            budget.join(Arc::downgrade(&member));
        }
        client
    }
}

impl<D, O: BackpressureObserver, S: Storage<D>> Client<D, O, S> {
    fn raw_lock(&self) -> MutexGuard<'_, State<D, S>> {
        // Nothing is left half-done under the lock: observers run outside
        // it, and every step completes its changes before it unlocks.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> Locked<'_, D, O, S> {
        Locked {
            client: self,
            guard: Some(self.raw_lock()),
        }
    }

    fn emit(&self, kind: EventKind, stats: BufferStats) {
        self.observer.on_event(&BackpressureEvent {
            client: &self.handle.info,
            kind,
            stats,
            handle: &self.handle,
        });
    }

    /// The handle's shared part.
    pub(crate) fn handle(&self) -> &Arc<HandleInner> {
        &self.handle
    }

    /// The configuration the storage applies.
    pub(crate) fn config(&self) -> &BufferConfig {
        &self.config
    }

    /// Fires `Opened`: the first event of a client.
    pub(crate) fn open(&self) {
        self.lock().event(EventKind::Opened);
    }

    /// The storage's counters now.
    pub(crate) fn stats(&self) -> BufferStats {
        self.raw_lock().storage.stats()
    }

    /// Nothing more will come out of the consumer side.
    #[inline]
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Records whether anything more will come out. Called after every
    /// change that could end the stream. A pending eviction error still
    /// has to come out.
    fn refresh_done(&self, st: &State<D, S>) {
        let done = st.evicted.is_none() && (st.closed || st.at_end());
        self.done.store(done, Ordering::Release);
    }

    /// The stream has closed (the client left, was evicted, or everything
    /// was delivered): the producer should stop.
    pub(crate) fn is_closed(&self) -> bool {
        self.raw_lock().closed
    }

    /// The stream no longer takes frames: closed, or the producer ended.
    pub(crate) fn is_finished(&self) -> bool {
        let st = self.raw_lock();
        st.closed || st.end
    }

    // ----- the producer side -----

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
    fn effective_class(&self, class: FrameClass) -> FrameClass {
        if self.config.overflow() == Overflow::Pause && class == FrameClass::Droppable {
            FrameClass::Critical
        } else {
            class
        }
    }

    /// Reports the drops gathered since the last report: at most once per
    /// run of the reporting side's task.
    pub(crate) fn report_drops(&self) {
        let mut st = self.lock();
        self.report_drops_locked(&mut st);
    }

    fn report_drops_locked(&self, st: &mut State<D, S>) {
        if st.unreported.frames > 0 && !st.closed {
            let Dropped { frames, bytes } = std::mem::take(&mut st.unreported);
            st.event(EventKind::Dropped {
                count: frames as u64,
                bytes: bytes as u64,
            });
        }
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
            End::Trailers(t) => st.trailers = Some(t),
            End::Error(e) => st.error = Some(e),
        }
        if self.reporter == Reporter::Producer {
            self.report_drops_locked(&mut st);
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

    // ----- the consumer side -----

    /// The consumer step: the next frame (joined with those after it, up to
    /// the flush limits, when `join` and the data is `Bytes`), or the end,
    /// or `Wait` with the consumer's waker registered.
    pub(crate) fn poll_next(&self, cx: &Context<'_>, release: &mut Release, join: bool) -> Next<D>
    where
        D: 'static,
    {
        let mut st = self.lock();
        if let Some(reason) = st.evicted.take() {
            self.refresh_done(&st);
            return Next::Evicted(reason);
        }
        if st.closed {
            return Next::Closed;
        }
        if !st.storage.is_empty() {
            let waiting = st.storage.len();
            let (max_frames, max_bytes) = match release.allow(self.config.flush(), waiting) {
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
        if let Some(trailers) = st.trailers.take() {
            self.close_locked(&mut st, CloseReason::Completed);
            return Next::Trailers(trailers);
        }
        if let Some(error) = st.error.take() {
            self.close_locked(&mut st, CloseReason::InnerError);
            return Next::Error(error);
        }
        if st.end {
            self.close_locked(&mut st, CloseReason::Completed);
            st.wake_producer = true;
            return Next::End;
        }
        if st.stopped {
            self.close_locked(&mut st, CloseReason::InnerError);
            return Next::Stopped;
        }
        st.register_consumer(cx);
        Next::Wait(None)
    }

    /// Registers the consumer's waker while it waits for something else
    /// (the client's connection): a close, an eviction or drops to report
    /// wake it.
    pub(crate) fn watch(&self, cx: &Context<'_>) {
        self.raw_lock().register_consumer(cx);
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
    fn after_pop(&self, st: &mut State<D, S>) {
        let t = now();
        st.last_taken = t;
        st.waiting_since = (!st.storage.is_empty()).then_some(t);
        if st.pressure.is_some() && st.storage.is_healthy() {
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

    // ----- both sides -----

    /// Closes the stream with `reason` unless it has closed, and wakes both
    /// sides.
    pub(crate) fn close(&self, reason: CloseReason) {
        self.close_with(|_| reason);
    }

    /// The consumer is gone (dropped): completed if everything was handed
    /// out (`delivered`, and the producer's end reached), else `ClientGone`.
    pub(crate) fn consumer_dropped(&self, delivered: bool) {
        self.close_with(|st| {
            if delivered && st.at_end() {
                CloseReason::Completed
            } else {
                CloseReason::ClientGone
            }
        });
    }

    /// The producer will put nothing more, and the client should get
    /// nothing more: closes with `ClientGone` and marks the end.
    pub(crate) fn abandon(&self) {
        let mut st = self.lock();
        self.close_locked(&mut st, CloseReason::ClientGone);
        st.end = true;
        self.refresh_done(&st);
        st.wake_consumer = true;
    }

    fn close_with(&self, reason: impl FnOnce(&State<D, S>) -> CloseReason) {
        let mut st = self.lock();
        let reason = reason(&st);
        self.close_locked(&mut st, reason);
    }

    /// Fires `Closed` unless it has fired, and frees what will never be
    /// delivered. Every change is made before any observer hears of it.
    fn close_locked(&self, st: &mut State<D, S>, reason: CloseReason) {
        if st.closed {
            return;
        }
        self.report_drops_locked(st);
        st.closed = true;
        let stats = st.storage.stats();
        self.handle.set_closed(reason, stats);
        st.outbox.push(EventKind::Closed { reason }, stats);
        if let CloseReason::Evicted(rule) = reason {
            // A client that never reads again would keep its connection
            // (and the buffers under it) open: close it. A gap marker that
            // ends the stream ends it politely instead.
            if rule != EvictReason::DataLoss {
                if let Some(connection) = self.handle.connection() {
                    connection.close();
                }
            }
        }
        st.storage.discard();
        // Nothing more goes out after `Closed`.
        st.trailers = None;
        st.error = None;
        st.producer_paused = false;
        self.settle(st, 0);
        self.refresh_done(st);
        // Both sides learn of it: the producer stops, the consumer ends.
        st.wake_producer = true;
        st.wake_consumer = true;
    }

    /// Gives up on the client: `Closed` with the rule, and the consumer
    /// ends with [`Evicted`](crate::Evicted).
    fn evict(&self, st: &mut State<D, S>, reason: EvictReason) {
        if st.closed {
            return;
        }
        st.evicted = Some(reason);
        self.close_locked(st, CloseReason::Evicted(reason));
    }

    /// Brings the budget in line with the storage after a change; `reserved`
    /// bytes were taken from the budget for it beforehand.
    fn settle(&self, st: &State<D, S>, reserved: usize) {
        if let Some(budget) = &self.budget {
            // Only changed under the client's lock. Bytes are returned to
            // the budget before the mirror goes down, so that a shed that
            // finds nothing here finds the budget already freed.
            let now = st.storage.bytes();
            let held = self
                .budget_bytes
                .load(Ordering::Acquire)
                .saturating_add(reserved);
            if held > now {
                budget.release(held - now);
                self.budget_bytes.store(now, Ordering::Release);
            } else {
                self.budget_bytes.store(now, Ordering::Release);
                if now > held {
                    // The storage grew more than was reserved (a weigher
                    // that is not deterministic): count what it holds.
                    budget.force(now - held);
                }
            }
        }
    }

    /// After a push: records drops, fires `Pressure` on the way up, and
    /// applies the drop-count rules; returns a rule that fired.
    fn after_push(
        &self,
        st: &mut State<D, S>,
        was_empty: bool,
        dropped: Dropped,
    ) -> Option<EvictReason> {
        let rules = self.config.eviction();
        if was_empty && !st.storage.is_empty() && rules.stall.is_some() {
            st.waiting_since = Some(now().max(st.last_taken));
        }
        if st.pressure.is_none() && !st.storage.is_healthy() {
            st.pressure = Some(if rules.pressure.is_some() {
                now()
            } else {
                st.last_taken
            });
            self.handle.set_health(Health::Pressure);
            st.event(EventKind::Pressure);
        }
        if dropped.frames == 0 {
            return None;
        }
        st.unreported.frames += dropped.frames;
        st.unreported.bytes += dropped.bytes;
        if let Some(max) = rules.dropped {
            if st.storage.stats().dropped > max {
                return Some(EvictReason::DroppedTotal);
            }
        }
        if let Some((max, window)) = rules.dropped_within {
            let t = now();
            let frames = dropped.frames as u64;
            let bucket = window / 64;
            match st.drop_window.back_mut() {
                Some((at, n)) if t.saturating_duration_since(*at) <= bucket => *n += frames,
                _ => st.drop_window.push_back((t, frames)),
            }
            st.drop_window_sum += frames;
            while let Some(&(at, n)) = st.drop_window.front() {
                if t.saturating_duration_since(at) <= window {
                    break;
                }
                st.drop_window.pop_front();
                st.drop_window_sum -= n;
            }
            if st.drop_window_sum > max {
                return Some(EvictReason::DroppedWindow);
            }
        }
        None
    }

    /// The next moment a timed rule could fire.
    fn next_deadline(&self, st: &State<D, S>) -> Option<Instant> {
        let rules = self.config.eviction();
        let stall = rules
            .stall
            .zip(st.waiting_since)
            .filter(|_| !st.storage.is_empty())
            .map(|(d, since)| after(since, d));
        let pressure = rules
            .pressure
            .zip(st.pressure)
            .map(|(d, since)| after(since, d));
        match (stall, pressure) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A timed rule that has fired by `t`.
    fn timed_out(&self, st: &State<D, S>, t: Instant) -> Option<EvictReason> {
        let rules = self.config.eviction();
        if let (Some(d), Some(since)) = (rules.stall, st.waiting_since) {
            if !st.storage.is_empty() && t >= after(since, d) {
                return Some(EvictReason::Stalled);
            }
        }
        if let (Some(d), Some(since)) = (rules.pressure, st.pressure) {
            if t >= after(since, d) {
                return Some(EvictReason::Pressure);
            }
        }
        None
    }
}

impl<D, O: BackpressureObserver, S: Admit<D>> Client<D, O, S> {
    /// Takes room in the memory budget for what the frame adds to the
    /// storage, after what the storage's own policy drops for it. Runs with
    /// no lock held: the budget may shed other clients' frames (or this
    /// one's) under their locks. `Err` holds what was taken anyway.
    fn reserve(&self, class: FrameClass, weight: usize) -> Result<usize, usize> {
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
        let evict = if overflow == Overflow::Disconnect
            && class != FrameClass::Critical
            && (refused || !st.storage.has_room_for(weight))
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
                self.settle(&st, taken);
                // A `Pause` client over the budget waits for its client,
                // if it has frames that its client will take.
                if refused && !was_empty {
                    st.producer_paused = true;
                }
            }
            self.after_push(&mut st, was_empty, dropped)
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

fn has_timed_rule(config: &BufferConfig) -> bool {
    let rules = config.eviction();
    rules.stall.is_some() || rules.pressure.is_some()
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
            .peek()
            .is_some_and(|(_, w, gap)| gap.is_empty() && len + w <= max_bytes)
    };
    let Some(head) = (&first as &dyn Any).downcast_ref::<Bytes>() else {
        return first;
    };
    if !fits(storage, head.len()) {
        return first;
    }
    let mut joined = BytesMut::with_capacity(max_bytes.min(64 * 1024));
    joined.extend_from_slice(head);
    while *taken < max_frames && fits(storage, joined.len()) {
        let (next, _) = storage.pop().expect("peeked");
        if let Some(b) = (&next as &dyn Any).downcast_ref::<Bytes>() {
            joined.extend_from_slice(b);
        }
        *taken += 1;
    }
    let mut out: Option<D> = None;
    if let Some(slot) = (&mut out as &mut dyn Any).downcast_mut::<Option<Bytes>>() {
        *slot = Some(joined.freeze());
    }
    out.expect("D is Bytes")
}

impl<D: Send, O: BackpressureObserver, S: Storage<D> + Send> ClientState for Client<D, O, S> {
    fn stats(&self) -> BufferStats {
        self.raw_lock().storage.stats()
    }

    fn idle(&self) -> Duration {
        now().saturating_duration_since(self.raw_lock().last_taken)
    }
}

impl<D: Send, O: BackpressureObserver, S: Storage<D> + Send> BudgetMember for Client<D, O, S> {
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
            match st.storage.evict_oldest() {
                Some(w) => {
                    freed.frames += 1;
                    freed.bytes += w;
                }
                None => break,
            }
        }
        if freed.frames == 0 {
            return 0;
        }
        if let Some(budget) = &self.budget {
            budget.count_dropped(freed.frames as u64);
        }
        let reason = self.after_push(&mut st, false, freed);
        self.settle(&st, 0);
        if let Some(reason) = reason {
            self.evict(&mut st, reason);
            st.wake_consumer = true;
        } else {
            // The reporting side reports the drops, batched, when it runs.
            match self.reporter {
                Reporter::Producer => st.wake_producer = true,
                Reporter::Consumer => st.wake_consumer = true,
            }
        }
        freed.bytes
    }
}

impl<D, O, S> Drop for Client<D, O, S> {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.budget_bytes.load(Ordering::Acquire));
        }
    }
}
