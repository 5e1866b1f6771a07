//! The pluggable trait that hears backpressure events.
//!
//! [`BackpressureObserver`] is one small trait in the style of tower-http's
//! `trace` hooks. It is implemented by:
//!
//! - `()`: off (the default of [`BackpressureLayer`](crate::BackpressureLayer));
//! - every `Fn(&BackpressureEvent<'_>) + Send + Sync + 'static` closure;
//! - `Arc<O>` for a shared observer;
//! - a pair `(A, B)` of observers, both of which hear every event (nest pairs
//!   to fan out further);
//! - [`TracingObserver`] (feature `tracing`, on by default), which logs.
//!
//! # When events fire
//!
//! For every wrapped response (and every [`BufferedSink`](crate::BufferedSink)
//! and hub window), in this order:
//!
//! | event | fires | at most |
//! |---|---|---|
//! | [`Opened`](EventKind::Opened) | when the response is wrapped | once, first |
//! | [`Pressure`](EventKind::Pressure) | the buffer crosses its threshold upward | once per episode |
//! | [`Dropped`](EventKind::Dropped) | frames were dropped since the last report | once per [`drop_report_interval`](crate::BufferConfig::with_drop_report_interval) (default 1 s), plus one flush before `Recovered`, at the producer's end and before `Closed` |
//! | [`Recovered`](EventKind::Recovered) | the client took enough frames to be back under the threshold | once per episode, after its `Pressure` |
//! | [`Closed`](EventKind::Closed) | the stream ended, for any [`CloseReason`]: also when the body is dropped before its end | once, last |
//!
//! So a client that stalls for a minute while its producer yields one frame
//! per wake-up costs its observers about sixty `Dropped` events, not one per
//! frame. `Dropped` reports come in batches:
//!
//! - the first drop after a quiet interval is reported at once (with every
//!   frame the same wake-up dropped), so an alert does not wait;
//! - drops within the interval after a report are summed, and reported when
//!   the interval is over (the reporting task arms a timer for it, so a sum
//!   does not wait for the next drop);
//! - whatever is still summed is reported right before `Recovered` and
//!   before `Closed` (and when the producer ends): the `count`s of all of a
//!   client's `Dropped` events add up to its
//!   [`BufferStats::dropped`](crate::BufferStats::dropped), and `Closed`'s
//!   stats carry the total.
//!
//! A client served from a [`Hub`](crate::Hub) window that does not read is
//! looked at by the hub's sweep, every 100 ms and, while it stays stalled,
//! less and less often down to once a second; its drops are reported at
//! those looks, within the same interval.
//!
//! # Callbacks run on the hot path, outside any lock
//!
//! Events are queued under the client's lock as they happen and delivered
//! right after it is released, by the thread that made them happen (the
//! pump task, hyper's connection task, a task sending into a
//! [`BufferedSink`](crate::BufferedSink), or the task whose frame made a
//! [`MemoryBudget`](crate::MemoryBudget) shed this client's frames). So a
//! callback may read anything the crate offers: the event's
//! [`handle`](BackpressureEvent::handle), a
//! [`ClientRegistry`](crate::ClientRegistry) snapshot, the budget's stats.
//! One client's events reach the observer one at a time and in order.
//!
//! A callback must be quick and must not block or await: record a number,
//! send on a non-blocking channel, log. It must not wait for another
//! client's events (they may be delivered by the same thread).
//!
//! # If a callback panics
//!
//! The client's state is complete before any observer hears of a change: a
//! `Closed` client is closed (its [`ClientHandle`] says
//! so, its buffer and budget bytes are freed) whatever its observers do. The
//! panic is caught, the remaining events still reach every observer (both
//! halves of a pair hear every event), and then the panic is resumed in the
//! thread that delivered: the pump task stops (the response ends with
//! [`PumpStopped`](crate::PumpStopped) after the frames kept before it), or
//! hyper's connection task unwinds as for any panicking body. A panic during
//! delivery from a thread that is already unwinding is not resumed, so an
//! observer never turns a panic into an abort.

use std::fmt;
use std::sync::Arc;

use crate::buffer::BufferStats;
use crate::handle::{ClientHandle, HandleInner};
use crate::info::ClientInfo;

/// One backpressure event of one client.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub struct BackpressureEvent<'a> {
    /// Who the response streams to.
    pub client: &'a ClientInfo,
    /// What happened.
    pub kind: EventKind,
    /// The client's buffer right after it happened.
    pub stats: BufferStats,
    /// Behind [`handle`](Self::handle).
    pub(crate) handle: &'a Arc<HandleInner>,
}

impl BackpressureEvent<'_> {
    /// The [`ClientHandle`] of the client this event is about: the same
    /// client the request's extensions and [`ClientRegistry`](crate::ClientRegistry)
    /// hold a handle to, with its live stats and health.
    ///
    /// Cheap (it clones an `Arc`), so an observer can take one on
    /// [`Opened`](EventKind::Opened) and keep it, e.g. to build its own table
    /// of live clients. A handle kept past [`Closed`](EventKind::Closed)
    /// stays valid: it reports [`Health::Closed`](crate::Health::Closed)
    /// and the final stats.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use std::sync::{Arc, Mutex};
    ///
    /// use tower_backpressure::{
    ///     BackpressureEvent, BackpressureLayer, BackpressureObserver, BufferConfig, ClientHandle,
    ///     ClientId, EventKind, Health,
    /// };
    ///
    /// /// Live clients, by id, for an admin page of our own.
    /// #[derive(Clone, Default)]
    /// struct LiveClients(Arc<Mutex<HashMap<ClientId, ClientHandle>>>);
    ///
    /// impl LiveClients {
    ///     fn under_pressure(&self) -> Vec<ClientHandle> {
    ///         let clients = self.0.lock().unwrap();
    ///         clients.values().filter(|c| c.health() == Health::Pressure).cloned().collect()
    ///     }
    /// }
    ///
    /// impl BackpressureObserver for LiveClients {
    ///     fn on_event(&self, event: &BackpressureEvent<'_>) {
    ///         // On the hot path: only a short lock, never a wait.
    ///         match event.kind {
    ///             EventKind::Opened => {
    ///                 self.0.lock().unwrap().insert(event.client.id(), event.handle());
    ///             }
    ///             EventKind::Closed { .. } => {
    ///                 self.0.lock().unwrap().remove(&event.client.id());
    ///             }
    ///             _ => {}
    ///         }
    ///     }
    /// }
    ///
    /// let clients = LiveClients::default();
    /// let layer = BackpressureLayer::new(BufferConfig::default()).observer(clients.clone());
    /// assert!(clients.under_pressure().is_empty());
    /// # let _ = layer;
    /// ```
    pub fn handle(&self) -> ClientHandle {
        ClientHandle::new(self.handle.clone())
    }
}

impl fmt::Debug for BackpressureEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackpressureEvent")
            .field("client", self.client)
            .field("kind", &self.kind)
            .field("stats", &self.stats)
            .finish()
    }
}

/// What happened to a client's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The response was wrapped and its pump started.
    Opened,
    /// The buffer crossed the threshold upward: the client is falling behind.
    Pressure,
    /// Frames were evicted since the last report.
    Dropped {
        /// Frames evicted.
        count: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// The buffer is back under the threshold.
    Recovered,
    /// The response ended; the last event of a client.
    Closed {
        /// Why it ended.
        reason: CloseReason,
    },
}

/// Why a wrapped response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// Every kept frame, the trailers and the end of the stream were handed
    /// to the connection.
    Completed,
    /// The body was dropped before its end: the client disconnected (or the
    /// server dropped the response).
    ClientGone,
    /// The inner body failed (or its pump stopped); the error was handed to
    /// the connection after the data kept before it.
    InnerError,
    /// The layer gave up on the client (an [`Overflow::Disconnect`](crate::Overflow::Disconnect)
    /// policy, an [`Eviction`](crate::Eviction) rule, or a gap marker that
    /// ends the stream).
    Evicted(EvictReason),
    /// The server shut down ([`Shutdown`](crate::shutdown::Shutdown)): the
    /// stream ended cleanly after the frames it had, or was cut at the end
    /// of the grace period.
    Shutdown,
}

/// The rule that ended a slow client's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EvictReason {
    /// The buffer was full under [`Overflow::Disconnect`](crate::Overflow::Disconnect).
    Overflow,
    /// More frames dropped in total than [`Eviction::after_dropped`](crate::Eviction::after_dropped) allows.
    DroppedTotal,
    /// More frames dropped within the window of
    /// [`Eviction::after_dropped_within`](crate::Eviction::after_dropped_within).
    DroppedWindow,
    /// No frame taken for [`Eviction::after_stall`](crate::Eviction::after_stall)
    /// while frames waited.
    Stalled,
    /// Over the threshold for [`Eviction::after_pressure_for`](crate::Eviction::after_pressure_for).
    Pressure,
    /// A [`GapMarker`](crate::GapMarker) ended the stream at a gap (e.g.
    /// gRPC `DATA_LOSS`).
    DataLoss,
}

impl EvictReason {
    /// A short lowercase name, e.g. `stalled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            EvictReason::Overflow => "overflow",
            EvictReason::DroppedTotal => "dropped_total",
            EvictReason::DroppedWindow => "dropped_window",
            EvictReason::Stalled => "stalled",
            EvictReason::Pressure => "pressure",
            EvictReason::DataLoss => "data_loss",
        }
    }
}

impl fmt::Display for EvictReason {
    /// The [`as_str`](Self::as_str) name, e.g. `stalled`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CloseReason {
    /// A short lowercase name: `completed`, `client_gone`, `inner_error`,
    /// `evicted`, `shutdown`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::Completed => "completed",
            CloseReason::ClientGone => "client_gone",
            CloseReason::InnerError => "inner_error",
            CloseReason::Evicted(_) => "evicted",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for CloseReason {
    /// The [`as_str`](Self::as_str) name, with the rule for an eviction:
    /// `completed`, `client_gone`, `inner_error`, `evicted (stalled)`.
    ///
    /// ```
    /// use tower_backpressure::{CloseReason, EvictReason};
    ///
    /// assert_eq!(CloseReason::ClientGone.to_string(), "client_gone");
    /// let evicted = CloseReason::Evicted(EvictReason::Stalled);
    /// assert_eq!(format!("closed ({evicted})"), "closed (evicted (stalled))");
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Evicted(rule) => write!(f, "evicted ({rule})"),
            reason => f.write_str(reason.as_str()),
        }
    }
}

/// Hears the backpressure events of every wrapped response.
///
/// See the [module docs](self) for when each event fires. Callbacks run on
/// the hot path and must not block.
///
/// # Example
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use tower_backpressure::{BackpressureLayer, BufferConfig, EventKind};
///
/// let dropped = Arc::new(AtomicU64::new(0));
/// let counter = dropped.clone();
/// let layer = BackpressureLayer::new(BufferConfig::default()).observer(
///     move |event: &tower_backpressure::BackpressureEvent<'_>| {
///         if let EventKind::Dropped { count, .. } = event.kind {
///             counter.fetch_add(count, Ordering::Relaxed);
///         }
///     },
/// );
/// # let _ = layer;
/// ```
pub trait BackpressureObserver: Send + Sync + 'static {
    /// Called for every event.
    fn on_event(&self, event: &BackpressureEvent<'_>);
}

impl BackpressureObserver for () {
    #[inline]
    fn on_event(&self, _: &BackpressureEvent<'_>) {}
}

impl<F> BackpressureObserver for F
where
    F: Fn(&BackpressureEvent<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &BackpressureEvent<'_>) {
        self(event)
    }
}

impl<O: BackpressureObserver + ?Sized> BackpressureObserver for Arc<O> {
    fn on_event(&self, event: &BackpressureEvent<'_>) {
        (**self).on_event(event)
    }
}

impl<A, B> BackpressureObserver for (A, B)
where
    A: BackpressureObserver,
    B: BackpressureObserver,
{
    fn on_event(&self, event: &BackpressureEvent<'_>) {
        // The second hears every event even if the first panics.
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.0.on_event(event);
        }));
        self.1.on_event(event);
        if let Err(panic) = first {
            std::panic::resume_unwind(panic);
        }
    }
}

#[cfg(feature = "tracing")]
pub use self::tracing_observer::TracingObserver;

#[cfg(feature = "tracing")]
mod tracing_observer {
    use super::*;

    /// Logs backpressure through the `tracing` crate (feature `tracing`).
    ///
    /// - `warn` when a client comes under pressure, with its buffer's numbers:
    ///   `client 7 backpressure: 812/1000 buffered, 0 dropped`;
    /// - `info` when it recovers;
    /// - `debug` when a response opens or closes, and for each batch of drops
    ///   (at most one line per client per
    ///   [`drop_report_interval`](crate::BufferConfig::with_drop_report_interval),
    ///   plus one before `Recovered` and `Closed`: see [When events
    ///   fire](crate::observer#when-events-fire)).
    ///
    /// Fields: `client`, `peer`, `path`, `buffered`, `capacity`, `dropped`.
    #[cfg_attr(docsrs, doc(cfg(feature = "tracing")))]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct TracingObserver {
        _priv: (),
    }

    impl TracingObserver {
        /// A new observer.
        pub fn new() -> Self {
            Self::default()
        }
    }

    /// With a byte limit, the bytes too: the byte threshold may be the one
    /// that tripped.
    fn bytes_note(s: &BufferStats) -> String {
        s.max_bytes
            .map(|max| format!(" ({}/{max} bytes)", s.buffered_bytes))
            .unwrap_or_default()
    }

    impl BackpressureObserver for TracingObserver {
        fn on_event(&self, event: &BackpressureEvent<'_>) {
            let c = event.client;
            let s = &event.stats;
            let id = c.id().as_u64();
            let peer = c.peer_addr().map(tracing::field::display);
            let path = c.path();
            match event.kind {
                EventKind::Opened => tracing::debug!(
                    client = id,
                    peer,
                    path,
                    capacity = s.capacity,
                    "client {id} stream opened"
                ),
                EventKind::Pressure => tracing::warn!(
                    client = id,
                    peer,
                    path,
                    buffered = s.buffered,
                    capacity = s.capacity,
                    buffered_bytes = s.buffered_bytes,
                    dropped = s.dropped,
                    "client {id} backpressure: {}/{} buffered{}, {} dropped",
                    s.buffered,
                    s.capacity,
                    bytes_note(s),
                    s.dropped
                ),
                EventKind::Dropped { count, bytes } => tracing::debug!(
                    client = id,
                    peer,
                    path,
                    count,
                    bytes,
                    dropped = s.dropped,
                    "client {id} dropped {count} frames ({bytes} bytes)"
                ),
                EventKind::Recovered => tracing::info!(
                    client = id,
                    peer,
                    path,
                    buffered = s.buffered,
                    capacity = s.capacity,
                    dropped = s.dropped,
                    "client {id} recovered: {}/{} buffered{}, {} dropped",
                    s.buffered,
                    s.capacity,
                    bytes_note(s),
                    s.dropped
                ),
                EventKind::Closed {
                    reason: CloseReason::Evicted(rule),
                } => tracing::warn!(
                    client = id,
                    peer,
                    path,
                    reason = "evicted",
                    rule = rule.as_str(),
                    sent = s.sent,
                    dropped = s.dropped,
                    "client {id} evicted ({rule}): {} sent, {} dropped",
                    s.sent,
                    s.dropped
                ),
                EventKind::Closed { reason } => tracing::debug!(
                    client = id,
                    peer,
                    path,
                    reason = reason.as_str(),
                    sent = s.sent,
                    dropped = s.dropped,
                    "client {id} stream closed ({reason}): {} sent, {} dropped",
                    s.sent,
                    s.dropped
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http::{Method, Uri};

    use super::*;

    fn event(handle: &Arc<HandleInner>, kind: EventKind) -> BackpressureEvent<'_> {
        BackpressureEvent {
            client: &handle.info,
            kind,
            stats: BufferStats::default(),
            handle,
        }
    }

    #[test]
    fn pairs_closures_and_arcs_all_hear_every_event() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let a = {
            let seen = seen.clone();
            move |e: &BackpressureEvent<'_>| seen.lock().unwrap().push(("a", e.kind))
        };
        let b = Arc::new({
            let seen = seen.clone();
            move |e: &BackpressureEvent<'_>| seen.lock().unwrap().push(("b", e.kind))
        });
        let observer = ((a, b), ());
        let client = HandleInner::new(ClientInfo::new(Method::GET, Uri::from_static("/"), None));
        observer.on_event(&event(&client, EventKind::Pressure));
        observer.on_event(&event(
            &client,
            EventKind::Closed {
                reason: CloseReason::Completed,
            },
        ));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("a", EventKind::Pressure),
                ("b", EventKind::Pressure),
                (
                    "a",
                    EventKind::Closed {
                        reason: CloseReason::Completed
                    }
                ),
                (
                    "b",
                    EventKind::Closed {
                        reason: CloseReason::Completed
                    }
                ),
            ]
        );
    }

    #[test]
    fn reasons_display_as_their_names_with_the_rule() {
        let rules = [
            (EvictReason::Overflow, "overflow"),
            (EvictReason::DroppedTotal, "dropped_total"),
            (EvictReason::DroppedWindow, "dropped_window"),
            (EvictReason::Stalled, "stalled"),
            (EvictReason::Pressure, "pressure"),
            (EvictReason::DataLoss, "data_loss"),
        ];
        for (rule, name) in rules {
            assert_eq!(rule.to_string(), name);
            assert_eq!(rule.to_string(), rule.as_str());
            assert_eq!(
                CloseReason::Evicted(rule).to_string(),
                format!("evicted ({name})")
            );
        }
        assert_eq!(CloseReason::Completed.to_string(), "completed");
        assert_eq!(CloseReason::ClientGone.to_string(), "client_gone");
        assert_eq!(CloseReason::InnerError.to_string(), "inner_error");
    }

    #[cfg(feature = "tracing")]
    #[test]
    fn tracing_observer_warns_with_the_guide_numbers() {
        let logs = crate::test_logs::Logs::default();
        let subscriber = logs.subscriber();
        let client = HandleInner::new(ClientInfo::new(
            Method::GET,
            Uri::from_static("/events"),
            None,
        ));
        let id = client.info.id();
        let o = TracingObserver::new();
        tracing::subscriber::with_default(subscriber, || {
            let mut e = event(&client, EventKind::Pressure);
            e.stats.buffered = 812;
            e.stats.capacity = 1000;
            e.stats.dropped = 3;
            o.on_event(&e);
            o.on_event(&event(&client, EventKind::Recovered));
            o.on_event(&event(
                &client,
                EventKind::Closed {
                    reason: CloseReason::ClientGone,
                },
            ));
        });
        let out = logs.text();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].contains("WARN"), "{out}");
        assert!(
            lines[0].contains(&format!(
                "client {id} backpressure: 812/1000 buffered, 3 dropped"
            )),
            "{out}"
        );
        assert!(
            lines[1].contains("INFO") && lines[1].contains("recovered"),
            "{out}"
        );
        assert!(
            lines[2].contains("DEBUG") && lines[2].contains("client_gone"),
            "{out}"
        );
    }
}
