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

mod budget;
pub(crate) mod clock;
mod consumer;
mod events;
#[cfg(all(test, backpressure_loom))]
mod loom;
mod producer;
mod rules;
mod storage;

use std::any::Any;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Waker};
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

pub(crate) use self::clock::{Timer, after, now};
pub(crate) use self::consumer::Release;
use self::events::Outbox;
pub(crate) use self::storage::{Admit, Storage, join_each};
use crate::BoxError;
use crate::budget::{BudgetMember, MemoryBudget};
use crate::buffer::{BufferStats, Dropped, Gap};
use crate::config::BufferConfig;
use crate::handle::{ClientState, HandleInner};
use crate::observer::{
    BackpressureEvent, BackpressureObserver, CloseReason, EventKind, EvictReason,
};
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

/// What the `after_dropped_within` rule keeps.
#[derive(Default)]
struct DropWindow {
    /// Drops in buckets of a 64th of the rule's window, and their sum:
    /// constant work per push whatever the rate.
    buckets: VecDeque<(Instant, u64)>,
    sum: u64,
    /// When the last look at a window counted its drops: the drops the
    /// next look finds happened since then, not at that look.
    looked_at: Option<Instant>,
}

/// One client's stream, shared by its producer and consumer sides.
pub(crate) struct Client<D, O, S> {
    state: Mutex<State<D, S>>,
    handle: Arc<HandleInner>,
    /// The storage's configuration, shared with it (and, through the
    /// layer, with every client of the layer).
    config: Arc<BufferConfig>,
    observer: Arc<O>,
    budget: Option<MemoryBudget>,
    reporter: Reporter,
    /// The storage's bytes, mirrored for the budget's lock-free scans.
    budget_bytes: AtomicUsize,
    /// Nothing more will come out: `is_end_stream` reads this without the
    /// lock (hyper asks after every frame).
    done: AtomicBool,
    /// Drops wait to be reported (`State::unreported` is not empty): the
    /// pump reads this without the lock, so that a run that dropped
    /// nothing takes no lock to report nothing.
    drops_pending: AtomicBool,
}

struct State<D, S> {
    storage: S,
    /// Boxed, as most streams end without trailers.
    trailers: Option<Box<HeaderMap>>,
    error: Option<BoxError>,
    /// The producer has ended (end of stream, trailers, error).
    end: bool,
    /// The end came from a shutdown: `Closed` says so.
    shutdown: bool,
    /// A frame that goes out after the kept ones, before the end (a
    /// shutdown's SSE `retry:` hint); boxed, as only a shutdown sets it.
    last: Option<Box<D>>,
    /// How a shutdown ends this stream, if one may: the last frame and the
    /// trailers (boxed: most clients never shut down).
    ending: Option<Box<(Option<D>, Option<HeaderMap>)>>,
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
    /// The earliest moment of the next `Dropped` report (one
    /// `drop_report_interval` after the last); `None` before the first.
    drop_report_at: Option<Instant>,
    /// When the client last took a frame (or the stream opened).
    last_taken: Instant,
    /// Since when frames have waited without the client taking one.
    waiting_since: Option<Instant>,
    /// The `after_dropped_within` rule's state, made with its first use
    /// (boxed: most clients have no such rule, and every one pays for what
    /// its state holds inline).
    drop_window: Option<Box<DropWindow>>,
    /// The hub's sweep: when it next looks at this client, and how long it
    /// waits after that if the client stays stalled.
    sweep_next: Option<Instant>,
    sweep_every: Duration,
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
            && self.last.is_none()
    }

    /// Why the stream closes once its end has gone out.
    fn end_reason(&self) -> CloseReason {
        if self.shutdown {
            CloseReason::Shutdown
        } else {
            CloseReason::Completed
        }
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
#[inline]
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
        // Most steps leave nothing to do after the unlock.
        if !guard.wake_producer && !guard.wake_consumer && !guard.outbox.has_work() {
            return;
        }
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
            events::deliver(
                &mut batch,
                |kind, stats| client.emit(kind, stats),
                &mut panic,
            );
            if !client.raw_lock().outbox.take_more(&mut batch) {
                break;
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
        config: Arc<BufferConfig>,
        handle: Arc<HandleInner>,
        observer: Arc<O>,
        budget: Option<MemoryBudget>,
        reporter: Reporter,
    ) -> Arc<Self> {
        debug_assert_eq!(*storage.config(), *config, "the storage's configuration");
        let client = Arc::new(Self {
            state: Mutex::new(State {
                storage,
                trailers: None,
                error: None,
                end: false,
                shutdown: false,
                last: None,
                ending: None,
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
                drop_report_at: None,
                last_taken: now(),
                waiting_since: None,
                drop_window: None,
                sweep_next: None,
                sweep_every: Duration::ZERO,
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
            drops_pending: AtomicBool::new(false),
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
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.lock().event(EventKind::Opened);
        }));
        if let Err(panic) = opened {
            // The stream will never start: close it, so that nothing (a
            // registry, a handle) waits for it.
            self.close(CloseReason::ClientGone);
            std::panic::resume_unwind(panic);
        }
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

    /// Closes the stream with `reason` unless it has closed, and wakes both
    /// sides.
    pub(crate) fn close(&self, reason: CloseReason) {
        self.close_with(|_| reason);
    }

    /// The consumer is gone (dropped): completed (or shut down) if
    /// everything was handed out (`delivered`, and the producer's end
    /// reached), else `ClientGone`.
    pub(crate) fn consumer_dropped(&self, delivered: bool) {
        self.close_with(|st| {
            if delivered && st.at_end() {
                st.end_reason()
            } else {
                CloseReason::ClientGone
            }
        });
    }

    /// The server is shutting down: the producer stops, the client gets
    /// what waits for it now, then the last frame (if any), then the end of
    /// its stream (with the trailers, if any) set by
    /// [`set_ending`](Self::set_ending), and `Closed` says
    /// [`CloseReason::Shutdown`]. A stream that has ended or closed already
    /// is left to finish.
    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        if st.closed || st.end {
            return;
        }
        let (last, trailers) = st.ending.take().map_or((None, None), |e| *e);
        // A window: what was published up to now, within its limits.
        self.look(&mut st, None);
        if st.closed || st.end {
            return;
        }
        st.storage.stop();
        st.end = true;
        st.shutdown = true;
        st.last = last.map(Box::new);
        st.trailers = trailers.map(Box::new);
        if self.reporter == Reporter::Producer {
            self.report_drops_locked(&mut st);
        }
        self.refresh_done(&st);
        st.wake_consumer = true;
        st.wake_producer = true;
    }

    /// How [`shutdown`](Self::shutdown) ends the stream: `last` after the
    /// kept frames, then `trailers` (or a plain end).
    pub(crate) fn set_ending(&self, last: Option<D>, trailers: Option<HeaderMap>) {
        if last.is_some() || trailers.is_some() {
            self.lock().ending = Some(Box::new((last, trailers)));
        }
    }

    /// The shutdown's grace is over: a stream still open closes now, with
    /// [`CloseReason::Shutdown`], and its connection (when the layer knows
    /// it) is closed, so that a client that does not read cannot hold the
    /// server's shutdown.
    pub(crate) fn shutdown_now(&self) {
        self.close(CloseReason::Shutdown);
        if let Some(connection) = self.handle.connection() {
            connection.close();
        }
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
        self.flush_drops_locked(st);
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
}

impl<D: Send, O: BackpressureObserver, S: Storage<D> + Send> ClientState for Client<D, O, S> {
    fn stats(&self) -> BufferStats {
        self.raw_lock().storage.stats()
    }

    fn idle(&self) -> Duration {
        now().saturating_duration_since(self.raw_lock().last_taken)
    }
}

impl<D, O, S> Drop for Client<D, O, S> {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.budget_bytes.load(Ordering::Acquire));
        }
    }
}
