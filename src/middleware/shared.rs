//! The state shared by a pump task and the body hyper polls.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use http::HeaderMap;

use crate::BoxError;
use crate::buffer::{BufferStats, ClientBuffer, Evicted, Remaining};
use crate::client::ClientInfo;
use crate::observer::{BackpressureEvent, BackpressureObserver, CloseReason, EventKind};

pub(crate) struct Shared<D, O> {
    state: Mutex<State<D>>,
    pub(crate) client: ClientInfo,
    observer: Arc<O>,
}

pub(crate) struct State<D> {
    pub(crate) buffer: ClientBuffer<D, Remaining>,
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
    /// Between a `Pressure` and its `Recovered`.
    pressure: bool,
    /// Evictions not yet reported.
    unreported: Evicted,
    pub(crate) consumer_waker: Option<Waker>,
    pub(crate) pump_waker: Option<Waker>,
}

impl<D> State<D> {
    /// The inner body ended and everything it left was handed out.
    pub(crate) fn at_end(&self) -> bool {
        self.end && self.buffer.is_empty() && self.trailers.is_none() && self.error.is_none()
    }
}

impl<D, O: BackpressureObserver> Shared<D, O> {
    pub(crate) fn new(
        buffer: ClientBuffer<D, Remaining>,
        client: ClientInfo,
        observer: Arc<O>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                buffer,
                trailers: None,
                error: None,
                end: false,
                pump_stopped: false,
                closed: false,
                pressure: false,
                unreported: Evicted::default(),
                consumer_waker: None,
                pump_waker: None,
            }),
            client,
            observer,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State<D>> {
        // A panicking observer poisons nothing we cannot continue from: the
        // state is updated before callbacks run.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn emit(&self, kind: EventKind, stats: BufferStats) {
        self.observer.on_event(&BackpressureEvent {
            client: &self.client,
            kind,
            stats,
        });
    }

    /// After a push: records evictions and fires `Pressure` on the upward
    /// crossing. Called with the lock held.
    pub(crate) fn after_push(&self, st: &mut State<D>, evicted: Evicted) {
        st.unreported.frames += evicted.frames;
        st.unreported.bytes += evicted.bytes;
        if !st.pressure && !st.buffer.is_healthy() {
            st.pressure = true;
            self.emit(EventKind::Pressure, st.buffer.stats());
        }
    }

    /// Reports the evictions gathered since the last report, once per pump
    /// wake-up. Called with the lock held.
    pub(crate) fn report_drops(&self, st: &mut State<D>) {
        if st.unreported.frames > 0 && !st.closed {
            let Evicted { frames, bytes } = std::mem::take(&mut st.unreported);
            self.emit(
                EventKind::Dropped {
                    count: frames as u64,
                    bytes: bytes as u64,
                },
                st.buffer.stats(),
            );
        }
    }

    /// After a pop: fires `Recovered` on the downward crossing. Called with
    /// the lock held.
    pub(crate) fn after_pop(&self, st: &mut State<D>) {
        if st.pressure && st.buffer.is_healthy() {
            st.pressure = false;
            self.emit(EventKind::Recovered, st.buffer.stats());
        }
    }

    /// Fires `Closed` unless it has fired; the pump stops at its next look.
    /// Called with the lock held.
    pub(crate) fn close(&self, st: &mut State<D>, reason: CloseReason) {
        if !st.closed {
            self.report_drops(st);
            st.closed = true;
            self.emit(EventKind::Closed { reason }, st.buffer.stats());
        }
    }
}
