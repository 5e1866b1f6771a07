//! A per-client buffer in front of any [`Sink`]: for WebSocket and other
//! message streams that are not a response body.
//!
//! A WebSocket server writes messages into a sink (axum's `WebSocket`,
//! tokio-tungstenite's `WebSocketStream`, the write half of either). Writing
//! into it directly makes the producer wait for the slowest client. A
//! [`BufferedSink`] puts the same [`ClientBuffer`] as
//! [`BackpressureLayer`](crate::BackpressureLayer) in between:
//!
//! - sending into a `BufferedSink` never waits for the client (except under
//!   [`Overflow::Pause`], which means exactly that): the message goes into the
//!   ring, which applies the [`BufferConfig`]'s overflow policy;
//! - a *drain* task, spawned by [`Builder::spawn`], takes messages oldest first
//!   and sends them into the real sink at the client's pace, with the
//!   [`GapMarker`]'s message before the first message after a gap;
//! - the same [`BackpressureObserver`] events fire (`Opened`, `Pressure`,
//!   `Dropped`, `Recovered`, `Closed` exactly once), so a
//!   [`ClientRegistry`](crate::ClientRegistry) lists the client, and the
//!   [`Eviction`](crate::Eviction) rules, [`Flush`] strategies, frame classes
//!   and a [`MemoryBudget`] apply as they do to a response body.
//!
//! # Closing
//!
//! [`close`](futures_util::SinkExt::close) (or dropping the `BufferedSink`)
//! cleans up after the client: the drain task delivers what is
//! still buffered, then closes the real sink, within the
//! [close timeout](Builder::close_timeout) (5 s by default). A client that
//! takes nothing in that time is given up on: `Closed` reports
//! [`EvictReason::Stalled`] and the real sink is dropped without closing.
//! When the real sink fails (the client went away), the drain task ends at
//! once, `Closed` reports [`CloseReason::ClientGone`], and the next send
//! returns [`SinkClosed`]. No task outlives the sink by more than the close
//! timeout.
//!
//! # Flush strategies
//!
//! The drain task calls the real sink's `poll_flush` after each message
//! ([`Flush::Immediate`]), after up to `max_frames` messages or `max_bytes`
//! bytes ([`Flush::Coalesce`]; messages are never joined), or once per
//! release every `period` ([`Flush::Interval`]), and always before it waits
//! for more messages.
//!
//! # Example
//!
//! ```
//! use futures::{SinkExt, StreamExt};
//! use tower_backpressure::{BufferConfig, BufferedSink, Gap, GapAction};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // The real sink: a channel with room for one message, read by a "client".
//! let (tx, rx) = futures::channel::mpsc::channel::<String>(0);
//! let mut sink = BufferedSink::builder(BufferConfig::new(3))
//!     .gap_marker(|gap: Gap| GapAction::Insert(format!("lagged {}", gap.frames)))
//!     .spawn(tx);
//!
//! // The producer never waits, however slowly the client reads: here the
//! // client reads nothing until the end, so only the newest 3 are kept.
//! for seq in 0..10 {
//!     sink.send(format!("tick {seq}")).await.unwrap();
//! }
//! // Deliver what is buffered, then close the real sink.
//! let (closed, received) = tokio::join!(sink.close(), rx.collect::<Vec<_>>());
//! closed.unwrap();
//! assert_eq!(received, ["lagged 7", "tick 7", "tick 8", "tick 9"]);
//! # }
//! ```
//!
//! With axum, split the socket and buffer its write half (the
//! `ws_server` example is a complete server):
//!
//! ```no_run
//! use axum::extract::ws::{Message, WebSocket};
//! use futures::{SinkExt, StreamExt};
//! use tokio::sync::broadcast;
//! use tower_backpressure::{BufferConfig, BufferedSink, ClientRegistry};
//!
//! async fn client(socket: WebSocket, registry: ClientRegistry, mut ticks: broadcast::Receiver<String>) {
//!     let (tx, mut rx) = socket.split();
//!     let mut sink = BufferedSink::builder(BufferConfig::default())
//!         .observer(registry)
//!         .weigh(|m: &Message| match m {
//!             Message::Text(text) => text.len(),
//!             _ => 0,
//!         })
//!         .spawn(tx);
//!     loop {
//!         tokio::select! {
//!             Ok(tick) = ticks.recv() => {
//!                 // Never waits for the client; fails once it is gone.
//!                 if sink.send(Message::text(tick)).await.is_err() {
//!                     break;
//!                 }
//!             }
//!             incoming = rx.next() => match incoming {
//!                 // The client left: drop what is buffered for it.
//!                 Some(Ok(Message::Close(_)) | Err(_)) | None => return sink.abandon().await,
//!                 // Pings are answered by the socket.
//!                 Some(Ok(_)) => {}
//!             },
//!         }
//!     }
//!     // Deliver what is buffered, then close the socket.
//!     let _ = sink.close().await;
//! }
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_sink::Sink;
use http::{Method, Uri};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::BoxError;
use crate::budget::MemoryBudget;
use crate::buffer::{BufferStats, ByWeigh, ClientBuffer, Weigher};
use crate::client::ClientInfo;
use crate::config::{BufferConfig, ConfigError, Flush, Overflow};
use crate::handle::{ClientHandle, HandleInner, Health, now};
use crate::middleware::shared::{Shared, wake};
use crate::observer::{BackpressureObserver, CloseReason, EventKind, EvictReason};
use crate::policy::{Classify, GapAction, GapMarker};

/// How long closing may take by default; see [`Builder::close_timeout`].
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sending end of a per-client buffer whose drain task feeds a real
/// [`Sink`].
///
/// Built by [`BufferedSink::builder`]; see the [module docs](self). As a
/// `Sink<T>`:
///
/// - `poll_ready` is always ready, except under [`Overflow::Pause`] while the
///   buffer is full; it fails with [`SinkClosed`] once the client is gone,
///   evicted or the sink closed;
/// - `start_send` puts the message into the buffer (dropping as the overflow
///   policy says);
/// - `poll_flush` never waits: the buffer is the destination;
/// - `poll_close` waits until the drain task has delivered what is buffered
///   and closed the real sink, within the close timeout; it returns `Ok` if
///   every message kept was delivered.
///
/// Dropping it closes it the same way, in the background.
pub struct BufferedSink<T> {
    core: Arc<dyn Producer<T>>,
    drain: Option<JoinHandle<()>>,
}

/// The type-independent side of a sink's state: what the sending end needs.
trait Producer<T>: Send + Sync {
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), SinkClosed>>;
    fn push(&self, item: T) -> Result<(), SinkClosed>;
    /// The producer is done: deliver the rest, then close.
    fn finish(&self);
    /// The client left: drop the rest, then close.
    fn abandon(&self);
    fn check(&self) -> Result<(), SinkClosed>;
    fn handle(&self) -> &Arc<HandleInner>;
    fn stats(&self) -> BufferStats;
    fn closed_error(&self) -> SinkClosed;
}

impl BufferedSink<()> {
    /// A [`Builder`] with `config`, no observer, no gap marker, every message
    /// droppable and weighed by its [`Weigh`](crate::Weigh) impl.
    ///
    /// # Panics
    ///
    /// If `config` is invalid, with the [`ConfigError`]'s message; use
    /// [`try_builder`](Self::try_builder) for configuration read at run time.
    pub fn builder(config: BufferConfig) -> Builder {
        match Self::try_builder(config) {
            Ok(builder) => builder,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`builder`](Self::builder), but returns the error.
    pub fn try_builder(config: BufferConfig) -> Result<Builder, ConfigError> {
        config.validate()?;
        Ok(Builder {
            config,
            observer: Arc::new(()),
            marker: (),
            classify: (),
            weigher: ByWeigh,
            budget: None,
            info: None,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
        })
    }
}

impl<T> BufferedSink<T> {
    /// A handle to watch this client's health and counters, as the layer
    /// puts in request extensions.
    pub fn handle(&self) -> ClientHandle {
        ClientHandle::new(self.core.handle().clone())
    }

    /// Who the messages go to.
    pub fn info(&self) -> &ClientInfo {
        &self.core.handle().info
    }

    /// The buffer's counters now.
    pub fn stats(&self) -> BufferStats {
        self.core.stats()
    }

    /// The client has left (its read half ended, failed or received a Close
    /// frame): drops what is still buffered, fires `Closed` with
    /// [`CloseReason::ClientGone`], closes the real sink without delivering
    /// anything more (within the close timeout, so that a WebSocket's reply
    /// to the client's Close frame still goes out) and waits for the drain
    /// task to end.
    ///
    /// Use [`close`](futures_util::SinkExt::close) instead when the server
    /// ends the stream: it delivers what is buffered first.
    pub async fn abandon(mut self) {
        self.core.abandon();
        if let Some(drain) = self.drain.take() {
            let _ = drain.await;
        }
    }

    /// The sink no longer takes messages: the client is gone or evicted, or
    /// the sink was closed.
    pub fn is_closed(&self) -> bool {
        self.core.check().is_err()
    }
}

impl<T> fmt::Debug for BufferedSink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferedSink")
            .field("client", self.info())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<T> Sink<T> for BufferedSink<T> {
    type Error = SinkClosed;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SinkClosed>> {
        self.core.poll_room(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: T) -> Result<(), SinkClosed> {
        self.core.push(item)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), SinkClosed>> {
        Poll::Ready(self.core.check())
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SinkClosed>> {
        let this = self.get_mut();
        this.core.finish();
        if let Some(drain) = &mut this.drain {
            // A drain task that panicked (an observer did) has fired
            // `Closed` from its drop guard: the outcome is read below.
            let _ = ready!(Pin::new(drain).poll(cx));
            this.drain = None;
        }
        let error = this.core.closed_error();
        Poll::Ready(match error.reason {
            CloseReason::Completed => Ok(()),
            _ => Err(error),
        })
    }
}

impl<T> Drop for BufferedSink<T> {
    fn drop(&mut self) {
        // The drain task delivers the rest within the close timeout.
        self.core.finish();
    }
}

/// Builds a [`BufferedSink`]; from [`BufferedSink::builder`].
///
/// Pluggable parts change the builder's type, as on
/// [`BackpressureLayer`](crate::BackpressureLayer). A builder is `Clone`
/// when its parts are: keep one per server and clone it for each client.
pub struct Builder<O = (), M = (), C = (), W = ByWeigh> {
    config: BufferConfig,
    observer: Arc<O>,
    marker: M,
    classify: C,
    weigher: W,
    budget: Option<MemoryBudget>,
    info: Option<ClientInfo>,
    close_timeout: Duration,
}

impl<O, M, C, W> Builder<O, M, C, W> {
    /// Replaces the observer that hears backpressure events, e.g.
    /// `(registry.clone(), TracingObserver::new())`.
    pub fn observer<O2: BackpressureObserver>(self, observer: O2) -> Builder<O2, M, C, W> {
        self.shared_observer(Arc::new(observer))
    }

    /// Like [`observer`](Self::observer), with an observer already shared
    /// (no allocation per client).
    pub fn shared_observer<O2: BackpressureObserver>(
        self,
        observer: Arc<O2>,
    ) -> Builder<O2, M, C, W> {
        Builder {
            config: self.config,
            observer,
            marker: self.marker,
            classify: self.classify,
            weigher: self.weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
        }
    }

    /// Sets the [`GapMarker`] whose message goes before the first message
    /// after a gap (e.g. `{"type":"lagged","dropped":N}`).
    ///
    /// [`GapAction::End`] closes the sink at the gap: `Closed` reports
    /// [`EvictReason::DataLoss`] and the trailers are ignored (a sink has
    /// none).
    pub fn gap_marker<M2>(self, marker: M2) -> Builder<O, M2, C, W> {
        Builder {
            config: self.config,
            observer: self.observer,
            marker,
            classify: self.classify,
            weigher: self.weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
        }
    }

    /// Sets the [`Classify`] hook that marks messages droppable, critical or
    /// replaceable by key. It runs in the sending task, for every message.
    pub fn classify<C2>(self, classify: C2) -> Builder<O, M, C2, W> {
        Builder {
            config: self.config,
            observer: self.observer,
            marker: self.marker,
            classify,
            weigher: self.weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
        }
    }

    /// Sets how a message is weighed against
    /// [`BufferConfig::max_bytes`] and a [`MemoryBudget`]: any
    /// `Fn(&T) -> usize + Clone` (a closure that captures nothing is), or a
    /// [`Weigher`].
    pub fn weigh<W2>(self, weigher: W2) -> Builder<O, M, C, W2> {
        Builder {
            config: self.config,
            observer: self.observer,
            marker: self.marker,
            classify: self.classify,
            weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
        }
    }

    /// Puts this client under a shared [`MemoryBudget`], with the layer's
    /// clients and other sinks.
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Who the messages go to, as events and the registry show it; e.g.
    /// `ClientInfo::new(Method::GET, uri, Some(peer))` from the upgrade
    /// request. Default: `GET /` from an unknown peer, with a fresh id.
    pub fn client(mut self, info: ClientInfo) -> Self {
        self.info = Some(info);
        self
    }

    /// How long closing may take: delivering what is buffered, then closing
    /// the real sink. Default [`DEFAULT_CLOSE_TIMEOUT`] (5 s).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The buffer configuration.
    pub fn config(&self) -> &BufferConfig {
        &self.config
    }

    /// Spawns the drain task that feeds `sink` and returns the sending end.
    ///
    /// `Opened` fires now.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn<T, S>(self, sink: S) -> BufferedSink<T>
    where
        T: Send + 'static,
        S: Sink<T> + Send + 'static,
        S::Error: Into<BoxError>,
        O: BackpressureObserver,
        M: GapMarker<T>,
        C: Classify<T>,
        W: Weigher<T> + Clone + Send + Sync + 'static,
    {
        let info = self
            .info
            .unwrap_or_else(|| ClientInfo::new(Method::GET, Uri::from_static("/"), None));
        let buffer = ClientBuffer::with_weigher(self.config, self.weigher.clone());
        let shared = Shared::new(buffer, HandleInner::new(info), self.observer, self.budget);
        let core = Arc::new(Core {
            shared,
            classify: self.classify,
            weigher: self.weigher,
            failure: OnceLock::new(),
            abandoned: AtomicBool::new(false),
        });
        let stats = core.shared.lock().buffer.stats();
        core.shared.emit(EventKind::Opened, stats);
        let limits = match self.config.flush() {
            Flush::Immediate => (1, usize::MAX),
            Flush::Coalesce {
                max_frames,
                max_bytes,
            }
            | Flush::Interval {
                max_frames,
                max_bytes,
                ..
            } => (max_frames, max_bytes),
        };
        let drain = Drain {
            core: core.clone(),
            sink: Some(Box::pin(sink)),
            marker: self.marker,
            pending: None,
            unflushed: (0, 0),
            limits,
            release_left: 0,
            next_release: None,
            close_timeout: self.close_timeout,
            close_deadline: None,
            closing: false,
            timer: None,
            finished: false,
        };
        let drain = tokio::spawn(drain);
        BufferedSink {
            core,
            drain: Some(drain),
        }
    }
}

impl<O, M: Clone, C: Clone, W: Clone> Clone for Builder<O, M, C, W> {
    fn clone(&self) -> Self {
        Self {
            config: self.config,
            observer: self.observer.clone(),
            marker: self.marker.clone(),
            classify: self.classify.clone(),
            weigher: self.weigher.clone(),
            budget: self.budget.clone(),
            info: self.info.clone(),
            close_timeout: self.close_timeout,
        }
    }
}

impl<O, M, C, W> fmt::Debug for Builder<O, M, C, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .field("client", &self.info)
            .field("close_timeout", &self.close_timeout)
            .finish_non_exhaustive()
    }
}

/// A [`BufferedSink`] no longer takes messages.
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

/// What the sending end and the drain task share.
struct Core<T, O, W, C> {
    shared: Arc<Shared<T, O, W>>,
    classify: C,
    weigher: W,
    /// The real sink's error, when it failed.
    failure: OnceLock<Arc<dyn StdError + Send + Sync>>,
    /// [`BufferedSink::abandon`]: close the real sink politely, deliver
    /// nothing more.
    abandoned: AtomicBool,
}

impl<T, O, W, C> Producer<T> for Core<T, O, W, C>
where
    T: Send + 'static,
    O: BackpressureObserver,
    W: Weigher<T> + Send + Sync + 'static,
    C: Classify<T>,
{
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), SinkClosed>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if st.closed || st.end {
            drop(st);
            return Poll::Ready(Err(self.closed_error()));
        }
        if shared.config.overflow() == Overflow::Pause && st.buffer.is_full() {
            st.pump_paused = true;
            match &st.pump_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.pump_waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn push(&self, item: T) -> Result<(), SinkClosed> {
        let shared = &*self.shared;
        // `Pause`: nothing dropped; `poll_ready` waits for room.
        let class = shared.effective_class(self.classify.classify(&item));
        let weight = self.weigher.weigh(&item);
        let reserved = shared.reserve(class, weight);
        let mut st = shared.lock();
        if st.closed || st.end {
            shared.settle_budget(&st, reserved.unwrap_or(0));
            drop(st);
            return Err(self.closed_error());
        }
        let mut wake_drain = false;
        let evict = match shared.admit(&mut st, item, class, weight, reserved) {
            Ok((was_empty, dropped)) => {
                // The drain task waits for a message, or has drops to report.
                wake_drain = was_empty || dropped.frames > 0;
                shared.after_push(&mut st, was_empty, dropped)
            }
            Err(reason) => Some(reason),
        };
        if let Some(reason) = evict {
            let drain = shared.evict(&mut st, reason);
            drop(st);
            wake(drain);
            return Err(self.closed_error());
        }
        if shared.config.overflow() == Overflow::Pause && st.buffer.is_full() {
            st.pump_paused = true;
        }
        let drain = if wake_drain {
            st.consumer_waker.take()
        } else {
            None
        };
        drop(st);
        wake(drain);
        Ok(())
    }

    fn finish(&self) {
        let mut st = self.shared.lock();
        if st.end {
            return;
        }
        st.end = true;
        self.shared.refresh_done(&st);
        let drain = st.consumer_waker.take();
        drop(st);
        wake(drain);
    }

    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        let mut st = self.shared.lock();
        self.shared.close(&mut st, CloseReason::ClientGone);
        st.end = true;
        self.shared.refresh_done(&st);
        let drain = st.consumer_waker.take();
        drop(st);
        wake(drain);
    }

    fn check(&self) -> Result<(), SinkClosed> {
        let st = self.shared.lock();
        if st.closed || st.end {
            drop(st);
            return Err(self.closed_error());
        }
        Ok(())
    }

    fn handle(&self) -> &Arc<HandleInner> {
        &self.shared.handle
    }

    fn stats(&self) -> BufferStats {
        self.shared.lock().buffer.stats()
    }

    fn closed_error(&self) -> SinkClosed {
        let reason = match ClientHandle::new(self.shared.handle.clone()).health() {
            Health::Closed(reason) => reason,
            // Closed by the producer, still delivering.
            _ => CloseReason::Completed,
        };
        SinkClosed {
            reason,
            source: self.failure.get().cloned(),
        }
    }
}

/// The task that takes messages from the buffer at the client's pace and
/// sends them into the real sink.
struct Drain<T, S, O: BackpressureObserver, W, C, M> {
    core: Arc<Core<T, O, W, C>>,
    /// `None` once given up or closed.
    sink: Option<Pin<Box<S>>>,
    marker: M,
    /// A message held back while its gap marker goes first.
    pending: Option<T>,
    /// Messages and bytes sent since the last flush.
    unflushed: (usize, usize),
    /// Flush after this many messages or bytes.
    limits: (usize, usize),
    /// `Flush::Interval`: messages that may still go out in this release.
    release_left: usize,
    next_release: Option<Instant>,
    close_timeout: Duration,
    /// Set once the producer is done (or the sink ends at a gap).
    close_deadline: Option<Instant>,
    /// `Closed` has fired; the real sink is being closed.
    closing: bool,
    timer: Option<Pin<Box<Sleep>>>,
    finished: bool,
}

// Nothing is pinned structurally: the real sink is boxed.
impl<T, S, O: BackpressureObserver, W, C, M> Unpin for Drain<T, S, O, W, C, M> {}

/// What the drain task does next, decided under the lock.
enum Step {
    /// Closed or evicted: drop the real sink.
    Stop,
    /// Abandoned: close the real sink, deliver nothing more.
    Close,
    SendPending,
    Flush,
    Send,
    /// Nothing to send now (empty, or until the next release).
    Wait,
    /// The producer is done and frames were lost after the last one kept.
    TrailingGap(crate::buffer::Gap),
    /// The producer is done and everything was sent.
    Finish,
}

impl<T, S, O, W, C, M> Drain<T, S, O, W, C, M>
where
    T: Send + 'static,
    S: Sink<T>,
    S::Error: Into<BoxError>,
    O: BackpressureObserver,
    W: Weigher<T> + Send + Sync + 'static,
    C: Classify<T>,
    M: GapMarker<T>,
{
    fn run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.closing {
                return self.poll_close_sink(cx);
            }
            if self.sink.is_none() {
                return Poll::Ready(());
            }
            match self.decide(cx) {
                Step::Stop => return self.stop(None),
                Step::Close => {
                    self.pending = None;
                    self.closing = true;
                }
                Step::SendPending => {
                    if let Err(e) = ready!(self.sink().poll_ready(cx)) {
                        return self.stop(Some(e.into()));
                    }
                    let item = self.pending.take().expect("pending");
                    if let Err(e) = self.send(item) {
                        return self.stop(Some(e));
                    }
                }
                Step::Flush => {
                    if let Err(e) = ready!(self.sink().poll_flush(cx)) {
                        return self.stop(Some(e.into()));
                    }
                    self.unflushed = (0, 0);
                }
                Step::Send => {
                    // Take a message only when the client can take it: until
                    // then it waits (and may be dropped) in the buffer.
                    if let Err(e) = ready!(self.sink().poll_ready(cx)) {
                        return self.stop(Some(e.into()));
                    }
                    let shared = &*self.core.shared;
                    let mut st = shared.lock();
                    if st.closed {
                        continue;
                    }
                    let Some((item, gap)) = st.buffer.pop_with_gap() else {
                        continue;
                    };
                    self.release_left = self.release_left.saturating_sub(1);
                    let producer = shared.after_pop(&mut st);
                    drop(st);
                    wake(producer);
                    let item = if gap.is_empty() {
                        item
                    } else {
                        match self.marker.on_gap(gap) {
                            GapAction::Skip => item,
                            GapAction::Insert(marker) => {
                                self.pending = Some(item);
                                marker
                            }
                            GapAction::End(_) => {
                                self.end_at_gap();
                                continue;
                            }
                        }
                    };
                    if let Err(e) = self.send(item) {
                        return self.stop(Some(e));
                    }
                }
                Step::Wait => {
                    if self.unflushed.0 > 0 {
                        if let Err(e) = ready!(self.sink().poll_flush(cx)) {
                            return self.stop(Some(e.into()));
                        }
                        self.unflushed = (0, 0);
                        continue;
                    }
                    return Poll::Pending;
                }
                Step::TrailingGap(gap) => match self.marker.on_gap(gap) {
                    GapAction::Skip => {}
                    GapAction::Insert(marker) => self.pending = Some(marker),
                    GapAction::End(_) => self.end_at_gap(),
                },
                Step::Finish => {
                    if self.unflushed.0 > 0 {
                        if let Err(e) = ready!(self.sink().poll_flush(cx)) {
                            return self.stop(Some(e.into()));
                        }
                        self.unflushed = (0, 0);
                    }
                    let shared = &*self.core.shared;
                    let mut st = shared.lock();
                    shared.close(&mut st, CloseReason::Completed);
                    drop(st);
                    self.closing = true;
                }
            }
        }
    }

    /// Looks at the shared state and picks the next step.
    fn decide(&mut self, cx: &mut Context<'_>) -> Step {
        let shared = &*self.core.shared;
        let mut st = shared.lock();
        match &st.consumer_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.consumer_waker = Some(cx.waker().clone()),
        }
        shared.report_drops(&mut st);
        if st.closed {
            if self.core.abandoned.load(Ordering::Acquire) {
                return Step::Close;
            }
            return Step::Stop;
        }
        let t = now();
        if let Some(reason) = shared.timed_out(&st, t) {
            let _ = shared.evict(&mut st, reason);
            return Step::Stop;
        }
        if st.end {
            match self.close_deadline {
                None => self.close_deadline = Some(t + self.close_timeout),
                Some(at) if t >= at => {
                    // The client took nothing more in time: give up on it.
                    shared.close(&mut st, CloseReason::Evicted(EvictReason::Stalled));
                    return Step::Stop;
                }
                Some(_) => {}
            }
        }
        if self.pending.is_some() {
            return Step::SendPending;
        }
        if self.unflushed.0 >= self.limits.0 || self.unflushed.1 >= self.limits.1 {
            return Step::Flush;
        }
        if !st.buffer.is_empty() {
            if let Flush::Interval { period, .. } = shared.config.flush() {
                if self.release_left == 0 {
                    if self.next_release.is_some_and(|at| t < at) {
                        return Step::Wait;
                    }
                    self.release_left = st.buffer.len();
                    self.next_release = Some(t + period);
                }
            }
            return Step::Send;
        }
        if st.end {
            let gap = st.buffer.take_trailing_gap();
            if !gap.is_empty() {
                return Step::TrailingGap(gap);
            }
            return Step::Finish;
        }
        Step::Wait
    }

    /// The real sink; only called while it is there.
    fn sink(&mut self) -> Pin<&mut S> {
        self.sink
            .as_mut()
            .expect("the real sink is kept until the end")
            .as_mut()
    }

    /// Hands `item` to the real sink (after its `poll_ready`).
    fn send(&mut self, item: T) -> Result<(), BoxError> {
        let weight = self.core.weigher.weigh(&item);
        self.sink().start_send(item).map_err(Into::into)?;
        self.unflushed.0 += 1;
        self.unflushed.1 = self.unflushed.1.saturating_add(weight);
        Ok(())
    }

    /// A gap marker ended the stream: close the real sink politely.
    fn end_at_gap(&mut self) {
        let shared = &*self.core.shared;
        let mut st = shared.lock();
        shared.close(&mut st, CloseReason::Evicted(EvictReason::DataLoss));
        let producer = st.pump_waker.take();
        drop(st);
        wake(producer);
        self.pending = None;
        self.closing = true;
        if self.close_deadline.is_none() {
            self.close_deadline = Some(now() + self.close_timeout);
        }
    }

    /// Closes the real sink, within the close deadline.
    fn poll_close_sink(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = *self
            .close_deadline
            .get_or_insert_with(|| now() + self.close_timeout);
        if let Some(sink) = self.sink.as_mut() {
            if now() < deadline && sink.as_mut().poll_close(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.sink = None;
        Poll::Ready(())
    }

    /// Ends the task: the client failed (`error`), or the buffer closed
    /// (evicted, or given up at close).
    fn stop(&mut self, error: Option<BoxError>) -> Poll<()> {
        let shared = &*self.core.shared;
        if let Some(error) = error {
            let _ = self.core.failure.set(Arc::from(error));
        }
        let mut st = shared.lock();
        shared.close(&mut st, CloseReason::ClientGone);
        let producer = st.pump_waker.take();
        drop(st);
        wake(producer);
        self.sink = None;
        self.pending = None;
        Poll::Ready(())
    }

    /// Wakes the task for the next timed rule, release or the close deadline.
    fn arm_timer(&mut self, cx: &mut Context<'_>) {
        let deadline = if self.closing {
            self.close_deadline
        } else {
            let shared = &*self.core.shared;
            let st = shared.lock();
            let mut next = shared.next_deadline(&st);
            let mut earliest = |at: Option<Instant>| {
                if let Some(at) = at {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            };
            earliest(self.close_deadline);
            if self.release_left == 0 && !st.buffer.is_empty() {
                earliest(self.next_release);
            }
            next
        };
        let Some(deadline) = deadline else { return };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }
}

impl<T, S, O, W, C, M> Future for Drain<T, S, O, W, C, M>
where
    T: Send + 'static,
    S: Sink<T>,
    S::Error: Into<BoxError>,
    O: BackpressureObserver,
    W: Weigher<T> + Send + Sync + 'static,
    C: Classify<T>,
    M: GapMarker<T>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.run(cx) {
            Poll::Ready(()) => {
                this.finished = true;
                Poll::Ready(())
            }
            Poll::Pending => {
                this.arm_timer(cx);
                Poll::Pending
            }
        }
    }
}

impl<T, S, O: BackpressureObserver, W, C, M> Drop for Drain<T, S, O, W, C, M> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Stopped before its end: it panicked, or its runtime shut down.
        let shared = &*self.core.shared;
        let mut st = shared.lock();
        shared.close(&mut st, CloseReason::InnerError);
        let producer = st.pump_waker.take();
        drop(st);
        wake(producer);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures::channel::mpsc;
    use futures::{SinkExt, StreamExt};
    use tokio::sync::mpsc as tmpsc;

    use super::*;
    use crate::observer::BackpressureEvent;
    use crate::{ClientRegistry, Eviction, Gap};

    fn recorder() -> (
        impl Fn(&BackpressureEvent<'_>) + Send + Sync + 'static,
        tmpsc::UnboundedReceiver<(EventKind, BufferStats)>,
    ) {
        let (tx, rx) = tmpsc::unbounded_channel();
        (
            move |e: &BackpressureEvent<'_>| {
                let _ = tx.send((e.kind, e.stats));
            },
            rx,
        )
    }

    async fn closed(
        events: &mut tmpsc::UnboundedReceiver<(EventKind, BufferStats)>,
    ) -> (CloseReason, BufferStats) {
        loop {
            let (kind, stats) = tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .expect("a Closed event in time")
                .expect("observer alive");
            if let EventKind::Closed { reason } = kind {
                return (reason, stats);
            }
        }
    }

    fn lagged(gap: Gap) -> GapAction<i64> {
        GapAction::Insert(-(gap.frames as i64))
    }

    fn eight(_: &i64) -> usize {
        8
    }

    /// Records what reaches it; `fail` makes every call fail.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<(Vec<i64>, usize, bool)>>);

    impl Sink<i64> for Log {
        type Error = std::io::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, item: i64) -> std::io::Result<()> {
            self.0.lock().unwrap().0.push(item);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.0.lock().unwrap().1 += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.0.lock().unwrap().2 = true;
            Poll::Ready(Ok(()))
        }
    }

    // On a current-thread runtime the drain task runs only when the test
    // awaits something that is pending: every send below happens while the
    // client (the channel's receiver) has taken nothing.

    #[tokio::test]
    async fn a_stalled_client_gets_the_newest_messages_after_a_marker() {
        let (tx, rx) = mpsc::channel::<i64>(0);
        let (observer, mut events) = recorder();
        let mut sink = BufferedSink::builder(BufferConfig::new(4))
            .observer(observer)
            .gap_marker(lagged)
            .weigh(eight)
            .spawn(tx);
        for i in 0..100 {
            sink.send(i).await.unwrap();
        }
        assert_eq!(sink.stats().buffered, 4);
        let (result, got) = tokio::join!(sink.close(), rx.collect::<Vec<i64>>());
        result.unwrap();
        assert_eq!(got, [-96, 96, 97, 98, 99]);

        let mut kinds = Vec::new();
        while let Ok((kind, stats)) = events.try_recv() {
            kinds.push(kind);
            if let EventKind::Closed { .. } = kind {
                assert_eq!((stats.pushed, stats.sent, stats.dropped), (100, 4, 96));
            }
        }
        assert_eq!(
            kinds,
            [
                EventKind::Opened,
                EventKind::Pressure,
                EventKind::Dropped {
                    count: 96,
                    bytes: 96 * 8
                },
                EventKind::Recovered,
                EventKind::Closed {
                    reason: CloseReason::Completed
                },
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_keeps_up_gets_every_message_in_order() {
        const N: i64 = 2000;
        let (tx, rx) = mpsc::channel::<i64>(0);
        // Room for everything: nothing can be lost, whatever the timing.
        let mut sink = BufferedSink::builder(BufferConfig::new(N as usize))
            .weigh(eight)
            .spawn(tx);
        let reader = tokio::spawn(rx.collect::<Vec<i64>>());
        for i in 0..N {
            sink.send(i).await.unwrap();
        }
        sink.close().await.unwrap();
        assert_eq!(reader.await.unwrap(), (0..N).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn coalesce_flushes_once_per_batch() {
        let log = Log::default();
        let mut sink =
            BufferedSink::builder(BufferConfig::new(1000).with_flush(Flush::coalesce(10, 1 << 20)))
                .weigh(eight)
                .spawn(log.clone());
        for i in 0..95 {
            sink.send(i).await.unwrap();
        }
        sink.close().await.unwrap();
        let (items, flushes, closed) = log.0.lock().unwrap().clone();
        assert_eq!(items, (0..95).collect::<Vec<_>>());
        assert_eq!(flushes, 10, "9 full batches, then the rest before closing");
        assert!(closed, "the real sink is closed");
    }

    #[tokio::test(start_paused = true)]
    async fn interval_releases_at_most_once_per_period() {
        let log = Log::default();
        let period = Duration::from_millis(100);
        let mut sink =
            BufferedSink::builder(BufferConfig::new(1000).with_flush(Flush::interval(period)))
                .weigh(eight)
                .spawn(log.clone());
        let start = Instant::now();
        for i in 0..5 {
            sink.send(i).await.unwrap();
        }
        // The first release goes out at once.
        while sink.stats().sent < 5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        for i in 5..10 {
            sink.send(i).await.unwrap();
        }
        // The next one waits for the period.
        sink.close().await.unwrap();
        assert_eq!(start.elapsed(), period);
        let (items, flushes, _) = log.0.lock().unwrap().clone();
        assert_eq!(items, (0..10).collect::<Vec<_>>());
        assert_eq!(flushes, 2, "one flush per release");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_closes_the_sink() {
        let (tx, rx) = mpsc::channel::<i64>(0);
        drop(rx);
        let (observer, mut events) = recorder();
        let mut sink = BufferedSink::builder(BufferConfig::new(8))
            .observer(observer)
            .weigh(eight)
            .spawn(tx);
        sink.send(1).await.unwrap();
        let (reason, _) = closed(&mut events).await;
        assert_eq!(reason, CloseReason::ClientGone);
        assert!(sink.is_closed());
        let err = sink.send(2).await.unwrap_err();
        assert_eq!(err.reason(), CloseReason::ClientGone);
        assert!(err.source().is_some(), "the real sink's error is kept");
        assert_eq!(err.to_string(), "buffered sink closed: client_gone");
        assert_eq!(
            sink.close().await.unwrap_err().reason(),
            CloseReason::ClientGone
        );
        assert!(events.try_recv().is_err(), "nothing after Closed");
    }

    #[tokio::test]
    async fn pause_makes_the_producer_wait_and_loses_nothing() {
        let (tx, rx) = mpsc::channel::<i64>(0);
        let mut sink = BufferedSink::builder(BufferConfig::new(2).with_overflow(Overflow::Pause))
            .weigh(eight)
            .spawn(tx);
        let produce = async {
            for i in 0..50 {
                sink.send(i).await.unwrap();
            }
            sink.close().await.unwrap();
            sink.stats()
        };
        let (stats, got) = tokio::join!(produce, rx.collect::<Vec<i64>>());
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert_eq!((stats.dropped, stats.sent), (0, 50));
        assert!(stats.high_water <= 2, "high water {}", stats.high_water);
    }

    #[tokio::test]
    async fn disconnect_evicts_on_overflow_and_drops_the_real_sink() {
        let (tx, rx) = mpsc::channel::<i64>(0);
        let (observer, mut events) = recorder();
        let mut sink =
            BufferedSink::builder(BufferConfig::new(2).with_overflow(Overflow::Disconnect))
                .observer(observer)
                .weigh(eight)
                .spawn(tx);
        sink.send(0).await.unwrap();
        sink.send(1).await.unwrap();
        let err = sink.send(2).await.unwrap_err();
        let evicted = CloseReason::Evicted(EvictReason::Overflow);
        assert_eq!(err.reason(), evicted);
        assert_eq!(closed(&mut events).await.0, evicted);
        // The drain task ends and drops the real sink: the channel ends.
        let got = tokio::time::timeout(Duration::from_secs(30), rx.collect::<Vec<i64>>())
            .await
            .unwrap();
        assert!(got.is_empty(), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn closing_a_stalled_client_is_bounded_by_the_close_timeout() {
        let (tx, _rx) = mpsc::channel::<i64>(0);
        let (observer, mut events) = recorder();
        let mut sink = BufferedSink::builder(BufferConfig::new(4))
            .observer(observer)
            .weigh(eight)
            .close_timeout(Duration::from_secs(2))
            .spawn(tx);
        for i in 0..10 {
            sink.send(i).await.unwrap();
        }
        let start = Instant::now();
        let err = sink.close().await.unwrap_err();
        assert_eq!(err.reason(), CloseReason::Evicted(EvictReason::Stalled));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let (reason, stats) = closed(&mut events).await;
        assert_eq!(reason, CloseReason::Evicted(EvictReason::Stalled));
        assert_eq!(stats.sent, 1, "the channel took one message");
    }

    #[tokio::test(start_paused = true)]
    async fn the_stall_rule_evicts_a_client_that_takes_nothing() {
        let (tx, _rx) = mpsc::channel::<i64>(0);
        let (observer, mut events) = recorder();
        let mut sink = BufferedSink::builder(
            BufferConfig::new(8)
                .with_eviction(Eviction::none().after_stall(Duration::from_secs(1))),
        )
        .observer(observer)
        .weigh(eight)
        .spawn(tx);
        for i in 0..4 {
            sink.send(i).await.unwrap();
        }
        let (reason, _) = closed(&mut events).await;
        assert_eq!(reason, CloseReason::Evicted(EvictReason::Stalled));
        assert_eq!(
            sink.send(4).await.unwrap_err().reason(),
            CloseReason::Evicted(EvictReason::Stalled)
        );
    }

    #[tokio::test]
    async fn dropping_the_sink_still_delivers_what_is_buffered() {
        let (tx, rx) = mpsc::channel::<i64>(0);
        let mut sink = BufferedSink::builder(BufferConfig::new(100))
            .weigh(eight)
            .spawn(tx);
        for i in 0..20 {
            sink.send(i).await.unwrap();
        }
        drop(sink);
        assert_eq!(rx.collect::<Vec<_>>().await, (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn abandon_drops_the_rest_and_closes_the_real_sink() {
        let (tx, rx) = mpsc::channel::<i64>(0);
        let (observer, mut events) = recorder();
        let mut sink = BufferedSink::builder(BufferConfig::new(100))
            .observer(observer)
            .weigh(eight)
            .spawn(tx);
        for i in 0..10 {
            sink.send(i).await.unwrap();
        }
        let handle = sink.handle();
        sink.abandon().await;
        let (reason, stats) = closed(&mut events).await;
        assert_eq!(reason, CloseReason::ClientGone);
        assert_eq!((stats.pushed, stats.sent), (10, 0));
        assert_eq!(handle.health(), Health::Closed(CloseReason::ClientGone));
        // The real sink was closed, with nothing delivered.
        assert!(rx.collect::<Vec<i64>>().await.is_empty());
    }

    #[tokio::test]
    async fn a_gap_marker_that_ends_closes_with_data_loss() {
        let (tx, rx) = mpsc::channel::<i64>(0);
        let mut sink = BufferedSink::builder(BufferConfig::new(2))
            .gap_marker(|_: Gap| GapAction::<i64>::End(http::HeaderMap::new()))
            .weigh(eight)
            .spawn(tx);
        for i in 0..10 {
            sink.send(i).await.unwrap();
        }
        let (result, got) = tokio::join!(sink.close(), rx.collect::<Vec<i64>>());
        assert_eq!(
            result.unwrap_err().reason(),
            CloseReason::Evicted(EvictReason::DataLoss)
        );
        assert!(got.is_empty(), "nothing after the gap: {got:?}");
    }

    #[tokio::test]
    async fn the_registry_lists_an_open_sink() {
        let registry = ClientRegistry::new();
        let (tx, rx) = mpsc::channel::<i64>(0);
        let info = ClientInfo::new(Method::GET, Uri::from_static("/ws"), None);
        let id = info.id();
        let mut sink = BufferedSink::builder(BufferConfig::new(8))
            .observer(registry.clone())
            .client(info)
            .weigh(eight)
            .spawn(tx);
        assert_eq!(sink.info().id(), id);
        assert!(sink.handle().is_buffered());
        let snapshot = registry.snapshot();
        assert_eq!(snapshot.clients.len(), 1);
        assert_eq!(snapshot.clients[0].path, "/ws");
        sink.send(1).await.unwrap();
        let (result, got) = tokio::join!(sink.close(), rx.collect::<Vec<i64>>());
        result.unwrap();
        assert_eq!(got, [1]);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_memory_budget_bounds_many_stalled_sinks() {
        let budget = MemoryBudget::new(100);
        let mut receivers = Vec::new();
        let mut sinks = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = mpsc::channel::<i64>(0);
            receivers.push(rx);
            sinks.push(
                BufferedSink::builder(BufferConfig::new(1000))
                    .memory_budget(budget.clone())
                    .weigh(|_: &i64| 10)
                    .spawn(tx),
            );
        }
        for i in 0..50 {
            for sink in &mut sinks {
                sink.send(i).await.unwrap();
                assert!(budget.used() <= 100, "{} bytes", budget.used());
            }
        }
        assert_eq!(budget.used(), 100);
        assert!(budget.stats().dropped >= 150 - 10);
    }

    #[test]
    fn an_invalid_config_is_refused_at_construction() {
        let err = BufferedSink::try_builder(BufferConfig::new(0)).unwrap_err();
        assert!(err.to_string().contains("capacity"));
    }
}
