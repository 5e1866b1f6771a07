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
//!   [`Overflow::Pause`](crate::Overflow::Pause), which means exactly that): the message goes into the
//!   ring, which applies the [`BufferConfig`]'s overflow policy;
//! - a *drain* task, spawned by [`Builder::spawn`], takes messages oldest first
//!   and sends them into the real sink at the client's pace, with the
//!   [`GapMarker`](crate::GapMarker)'s message before the first message after a gap;
//! - the same [`BackpressureObserver`] events fire (`Opened`, `Pressure`,
//!   `Dropped`, `Recovered`, `Closed` exactly once), so a
//!   [`ClientRegistry`](crate::ClientRegistry) lists the client, and the
//!   [`Eviction`](crate::Eviction) rules, [`Flush`](crate::Flush) strategies, frame classes
//!   and a [`MemoryBudget`](crate::MemoryBudget) apply as they do to a response body.
//!
//! # Keep-alive
//!
//! A `BufferedSink` sends no keep-alive of its own: it is generic over its
//! message type and cannot make a Ping. tungstenite and axum answer a
//! peer's Ping by themselves; to keep a quiet connection through proxies
//! and find a vanished peer, send a Ping from the application on a timer
//! (into the `BufferedSink`, as a critical frame if a
//! [`Classify`] hook marks frames). SSE responses get
//! comment lines from the layer instead ([`KeepAlive`](crate::KeepAlive)).
//!
//! # Closing
//!
//! [`close`](futures_util::SinkExt::close) (or dropping the `BufferedSink`)
//! cleans up after the client: the drain task delivers what is
//! still buffered, then closes the real sink, within the
//! [close timeout](Builder::close_timeout) (5 s by default). A client that
//! takes nothing in that time is given up on: `Closed` reports
//! [`EvictReason::Stalled`](crate::EvictReason::Stalled) and the real sink is dropped without closing.
//! When the real sink fails (the client went away), the drain task ends at
//! once, `Closed` reports [`CloseReason::ClientGone`], and the next send
//! returns [`SinkClosed`]. No task outlives the sink by more than the close
//! timeout.
//!
//! # Flush strategies
//!
//! The drain task calls the real sink's `poll_flush` after each message
//! ([`Flush::Immediate`](crate::Flush::Immediate), and with a config whose flush was not set), after up to `max_frames` messages or `max_bytes`
//! bytes ([`Flush::Coalesce`](crate::Flush::Coalesce) set with
//! [`with_flush`](crate::BufferConfig::with_flush); messages are never joined), or once per
//! release every `period` ([`Flush::Interval`](crate::Flush::Interval)), and always before it waits
//! for more messages. The default config's [`Flush::Coalesce`](crate::Flush::Coalesce) joins the
//! frames of a response body; a sink with that default still flushes after each message.
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

mod builder;
mod drain;
mod error;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_sink::Sink;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use self::builder::Builder;
pub use self::error::SinkClosed;
use crate::buffer::{BufferStats, ByWeigh, ClientBuffer, Weigher};
use crate::client::{Client, End, Produce, Pushed, after, now};
use crate::config::{BufferConfig, ConfigError};
use crate::handle::{ClientHandle, HandleInner, Health};
use crate::info::ClientInfo;
use crate::observer::{BackpressureObserver, CloseReason};
use crate::policy::Classify;

/// How long closing may take by default; see [`Builder::close_timeout`].
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sending end of a per-client buffer whose drain task feeds a real
/// [`Sink`].
///
/// Built by [`BufferedSink::builder`]; see the [module docs](self). As a
/// `Sink<T>`:
///
/// - `poll_ready` is always ready, except under [`Overflow::Pause`](crate::Overflow::Pause) while the
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
            connection: None,
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
        Poll::Ready(match error.reason() {
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

/// A client fed from a [`Hub`](crate::hub::Hub) by a drain task; from
/// [`Builder::spawn_hub`].
///
/// There is nothing to send: the hub's publishes are the messages. Dropping
/// it leaves the drain task running until the client goes or is evicted;
/// [`abandon`](Self::abandon) ends it when the client leaves (its read half
/// ended or it sent a Close frame).
pub struct HubSink {
    core: Arc<dyn Watch>,
    drain: Option<JoinHandle<()>>,
}

/// What a [`HubSink`] reads of its client, whatever the types.
trait Watch: Send + Sync {
    fn handle(&self) -> &Arc<HandleInner>;
    fn stats(&self) -> BufferStats;
    fn abandon(&self);
}

impl<T, O, W, C, St> Watch for Core<T, O, W, C, St>
where
    T: Send + 'static,
    O: BackpressureObserver,
    W: Send + Sync,
    C: Send + Sync,
    St: crate::client::Storage<T> + Send + 'static,
{
    fn handle(&self) -> &Arc<HandleInner> {
        self.client.handle()
    }

    fn stats(&self) -> BufferStats {
        self.client.stats()
    }

    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.client.abandon();
    }
}

impl HubSink {
    fn new(core: Arc<dyn Watch>, drain: JoinHandle<()>) -> Self {
        Self {
            core,
            drain: Some(drain),
        }
    }

    /// A handle to watch this client's health and counters.
    pub fn handle(&self) -> ClientHandle {
        ClientHandle::new(self.core.handle().clone())
    }

    /// The window's counters now.
    pub fn stats(&self) -> BufferStats {
        self.core.stats()
    }

    /// Waits until the drain task has ended: the client went, was evicted,
    /// or its real sink closed.
    pub async fn closed(&mut self) {
        if let Some(drain) = &mut self.drain {
            let _ = drain.await;
            self.drain = None;
        }
    }

    /// The client has left: `Closed` with [`CloseReason::ClientGone`], the
    /// real sink is closed without delivering anything more (within the
    /// close timeout), and the drain task ends.
    pub async fn abandon(mut self) {
        self.core.abandon();
        self.closed().await;
    }
}

impl fmt::Debug for HubSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSink")
            .field("client", &self.core.handle().info)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What the sending end and the drain task share.
struct Core<T, O, W, C, St = ClientBuffer<T, W>> {
    client: Arc<Client<T, O, St>>,
    classify: C,
    weigher: W,
    /// The real sink's error, when it failed.
    failure: OnceLock<Arc<dyn std::error::Error + Send + Sync>>,
    /// [`BufferedSink::abandon`]: close the real sink politely, deliver
    /// nothing more.
    abandoned: AtomicBool,
    close_timeout: Duration,
    /// Set when the producer finished: what is buffered must be delivered
    /// by then.
    deadline: OnceLock<Instant>,
}

impl<T, O, W, C> Producer<T> for Core<T, O, W, C>
where
    T: Send + 'static,
    O: BackpressureObserver,
    W: Weigher<T> + Send + Sync + 'static,
    C: Classify<T>,
{
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), SinkClosed>> {
        match self.client.poll_produce(cx) {
            Produce::Ready { .. } => Poll::Ready(Ok(())),
            Produce::Paused => Poll::Pending,
            Produce::Closed => Poll::Ready(Err(self.closed_error())),
        }
    }

    fn push(&self, item: T) -> Result<(), SinkClosed> {
        let class = self.classify.classify(&item);
        let weight = self.weigher.weigh(&item);
        match self.client.push(item, class, weight) {
            Pushed::Taken | Pushed::Paused => Ok(()),
            Pushed::Closed => Err(self.closed_error()),
        }
    }

    fn finish(&self) {
        let _ = self.deadline.set(after(now(), self.close_timeout));
        self.client.finish(End::Eof);
    }

    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.client.abandon();
    }

    fn check(&self) -> Result<(), SinkClosed> {
        if self.client.is_finished() {
            return Err(self.closed_error());
        }
        Ok(())
    }

    fn handle(&self) -> &Arc<HandleInner> {
        self.client.handle()
    }

    fn stats(&self) -> BufferStats {
        self.client.stats()
    }

    fn closed_error(&self) -> SinkClosed {
        let reason = match ClientHandle::new(self.client.handle().clone()).health() {
            Health::Closed(reason) => reason,
            // Closed by the producer, still delivering.
            _ => CloseReason::Completed,
        };
        SinkClosed::new(reason, self.failure.get().cloned())
    }
}
