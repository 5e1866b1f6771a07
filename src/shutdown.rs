//! Ending every open stream when the server shuts down.
//!
//! A streaming response never ends by itself, so a server's graceful
//! shutdown (axum's `with_graceful_shutdown`, hyper-util's
//! `GracefulShutdown`, tonic's `serve_with_shutdown`) waits for ever while a
//! single SSE stream is open. A [`Shutdown`] given to the layer
//! ([`BackpressureLayer::shutdown`](crate::BackpressureLayer::shutdown)) ends
//! them all on one signal:
//!
//! 1. **At the signal** ([`trigger`](Shutdown::trigger)), every stream the
//!    layer serves stops taking new frames: its producer is stopped (a
//!    hub's client gets nothing published after the signal). It gets what
//!    was waiting for it, then, for SSE, an optional `retry:` line
//!    ([`sse_retry`](Shutdown::sse_retry)) that tells the browser when to
//!    reconnect, then a clean end of stream (a gRPC stream ends with
//!    trailers `grpc-status: 14` (`UNAVAILABLE`), so that its client
//!    retries). Its observers hear `Closed` with
//!    [`CloseReason::Shutdown`](crate::CloseReason::Shutdown). Hubs handed
//!    to [`close_hub`](Shutdown::close_hub) close, which ends their
//!    subscriptions served without the layer too. Streams opened after the
//!    signal end at once.
//! 2. **At the end of the grace period** ([`grace`](Shutdown::grace),
//!    default 1 s), a stream that has not ended is closed with
//!    `CloseReason::Shutdown`, and so is its connection, if the layer knows
//!    it (serve with [`ClosableListener`](crate::conn::ClosableListener) or
//!    [`Closable`](crate::conn::Closable), see [`conn`](crate::conn)). That
//!    is what frees a client that does not read: with its TCP window at zero,
//!    hyper waits on the socket and never polls the body again, and only
//!    closing the connection lets the server's graceful shutdown finish.
//!
//! The server's own graceful shutdown then finishes as soon as the
//! connections are done: within about the grace period, however many
//! clients stall.
//!
//! # Example: axum
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use axum::{Router, routing::get};
//! use tower_backpressure::conn::{ClosableListener, ConnectionInfo};
//! use tower_backpressure::shutdown::Shutdown;
//! use tower_backpressure::{BackpressureLayer, BufferConfig, Hub};
//!
//! # async fn events() -> &'static str { "" }
//! # #[tokio::main]
//! # async fn main() {
//! let hub: Hub = Hub::default();
//! let shutdown = Shutdown::new()
//!     .grace(Duration::from_secs(1))
//!     .sse_retry(Duration::from_secs(2));
//! shutdown.close_hub(&hub);
//! let app = Router::new()
//!     .route("/events", get(events))
//!     .layer(BackpressureLayer::new(BufferConfig::default()).shutdown(shutdown.clone()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! axum::serve(
//!     ClosableListener::new(listener),
//!     app.into_make_service_with_connect_info::<ConnectionInfo>(),
//! )
//! .with_graceful_shutdown(shutdown.trigger_after(async {
//!     tokio::signal::ctrl_c().await.ok();
//! }))
//! .await
//! .unwrap();
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::conn::WeakConnection;

/// The default grace period: see [`Shutdown::grace`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// One signal that ends every stream it was given to: see the
/// [module docs](self).
///
/// Cheap to clone; clones share the signal. Give one to the layer
/// ([`BackpressureLayer::shutdown`](crate::BackpressureLayer::shutdown)),
/// keep one to [`trigger`](Self::trigger) it.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    grace: Duration,
    sse_retry: Option<Duration>,
    triggered: AtomicBool,
    /// The grace period is over.
    forced: AtomicBool,
    notify: Notify,
    streams: Mutex<Streams>,
    hubs: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

/// The streams registered, pruned as they go.
#[derive(Default)]
struct Streams {
    list: Vec<Entry>,
    /// The length after the last prune: the list is pruned when it has
    /// doubled since, so registering stays O(1) amortized.
    pruned_len: usize,
}

struct Entry {
    stream: Weak<dyn Ending>,
    connection: Option<WeakConnection>,
}

impl Entry {
    fn is_gone(&self) -> bool {
        self.stream.strong_count() == 0 && self.connection.as_ref().is_none_or(|c| !c.is_alive())
    }
}

/// A stream a shutdown ends: a client of the layer.
pub(crate) trait Ending: Send + Sync {
    /// Stops the producer; the client gets what waits, then its end.
    fn begin(&self);
    /// The grace is over: closes the stream (and its connection) now.
    fn force(&self);
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("grace", &self.inner.grace)
            .field("sse_retry", &self.inner.sse_retry)
            .field("triggered", &self.is_triggered())
            .finish_non_exhaustive()
    }
}

impl Shutdown {
    /// A signal not yet triggered, with a grace period of 1 s and no SSE
    /// `retry:` hint.
    pub fn new() -> Self {
        Self::build(DEFAULT_GRACE, None)
    }

    fn build(grace: Duration, sse_retry: Option<Duration>) -> Self {
        Self {
            inner: Arc::new(Inner {
                grace,
                sse_retry,
                triggered: AtomicBool::new(false),
                forced: AtomicBool::new(false),
                notify: Notify::new(),
                streams: Mutex::default(),
                hubs: Mutex::default(),
            }),
        }
    }

    /// How long after the signal a stream that has not ended (a client
    /// that does not read) is cut, with its connection. `Duration::ZERO`
    /// cuts every stream at the signal. A new signal: set it before giving
    /// it out.
    pub fn grace(self, grace: Duration) -> Self {
        Self::build(grace, self.inner.sse_retry)
    }

    /// The grace period.
    pub fn grace_period(&self) -> Duration {
        self.inner.grace
    }

    /// Ends each SSE stream (`text/event-stream` whose data is `Bytes`) with
    /// `retry: <ms>`: the browser's `EventSource` reconnects after that
    /// long (to another instance, or this one restarted) instead of its
    /// default of about 3 s. A new signal: set it before giving it out.
    pub fn sse_retry(self, after: Duration) -> Self {
        Self::build(self.inner.grace, Some(after))
    }

    /// The `retry:` hint, if set.
    pub fn sse_retry_hint(&self) -> Option<Duration> {
        self.inner.sse_retry
    }

    /// Ends every stream: see the [module docs](self). The grace period is
    /// timed on the current tokio runtime (without one, streams that have
    /// not ended are cut at once). Idempotent.
    pub fn trigger(&self) {
        if self.inner.triggered.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.notify.notify_waiters();
        // The layer's streams first: a hub's close would end them as
        // completed.
        for stream in self.live() {
            stream.begin();
        }
        let hubs = std::mem::take(&mut *lock(&self.inner.hubs));
        for close in hubs {
            close();
        }
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !inner.grace.is_zero() => {
                runtime.spawn(async move {
                    tokio::time::sleep(inner.grace).await;
                    force(&inner);
                });
            }
            _ => force(&inner),
        }
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::Acquire)
    }

    /// Resolves once the signal is triggered.
    pub async fn triggered(&self) {
        let notified = self.inner.notify.notified();
        if self.is_triggered() {
            return;
        }
        notified.await;
    }

    /// Waits for `signal` (e.g. `tokio::signal::ctrl_c()`), then
    /// [`trigger`](Self::trigger)s: the future to hand to axum's
    /// `with_graceful_shutdown` or tonic's `serve_with_shutdown`, so that
    /// the server stops accepting and the streams end on the same signal.
    pub async fn trigger_after<F: Future>(self, signal: F) {
        signal.await;
        self.trigger();
    }

    /// Closes `hub` at the signal ([`Hub::close`](crate::Hub::close)): its
    /// subscriptions served without the layer end too. Holds no handle on
    /// the hub.
    pub fn close_hub<T, W>(&self, hub: &crate::Hub<T, W>)
    where
        T: Send + 'static,
        W: Send + Sync + 'static,
    {
        let shared = Arc::downgrade(hub.shared());
        let close = move || {
            if let Some(shared) = shared.upgrade() {
                shared.close();
            }
        };
        if self.is_triggered() {
            close();
        } else {
            lock(&self.inner.hubs).push(Box::new(close));
        }
    }

    /// Streams the signal would end now (opened, not yet dropped).
    pub fn open_streams(&self) -> usize {
        lock(&self.inner.streams)
            .list
            .iter()
            .filter(|e| e.stream.strong_count() > 0)
            .count()
    }

    /// Registers a stream of the layer; one opened after the signal begins
    /// its end at once (and is cut if the grace is over).
    pub(crate) fn register(&self, stream: Weak<dyn Ending>, connection: Option<WeakConnection>) {
        if self.is_triggered() {
            if let Some(stream) = stream.upgrade() {
                stream.begin();
                if self.inner.forced.load(Ordering::Acquire) {
                    stream.force();
                }
            }
            return;
        }
        {
            let mut streams = lock(&self.inner.streams);
            if streams.list.len() >= (2 * streams.pruned_len).max(64) {
                streams.list.retain(|e| !e.is_gone());
                streams.pruned_len = streams.list.len();
            }
            streams.list.push(Entry {
                stream: stream.clone(),
                connection,
            });
        }
        // Triggered meanwhile: `trigger` (or the end of the grace) may have
        // gone over the list before this entry went in. Both steps are
        // idempotent.
        if self.is_triggered() {
            if let Some(stream) = stream.upgrade() {
                stream.begin();
                if self.inner.forced.load(Ordering::Acquire) {
                    stream.force();
                }
            }
        }
    }

    /// The registered streams that are still open.
    fn live(&self) -> Vec<Arc<dyn Ending>> {
        lock(&self.inner.streams)
            .list
            .iter()
            .filter_map(|e| e.stream.upgrade())
            .collect()
    }
}

impl<D, O, S> Ending for crate::client::Client<D, O, S>
where
    D: Send + 'static,
    O: crate::observer::BackpressureObserver,
    S: crate::client::Storage<D> + Send + 'static,
{
    fn begin(&self) {
        self.shutdown();
    }

    fn force(&self) {
        self.shutdown_now();
    }
}

/// Gets a client of the layer ready for `shutdown`: how it ends (for a
/// `text/event-stream` response whose data is `Bytes`, the `retry:` hint;
/// for gRPC, `UNAVAILABLE` trailers), and registers it.
pub(crate) fn register<D, O, S>(
    shutdown: &Shutdown,
    client: &Arc<crate::client::Client<D, O, S>>,
    headers: &http::HeaderMap,
    connection: Option<crate::conn::Connection>,
) where
    D: Send + 'static,
    O: crate::observer::BackpressureObserver,
    S: crate::client::Storage<D> + Send + 'static,
{
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().get(..16))
        .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"));
    let (last, trailers) = if grpc {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        trailers.insert(
            "grpc-message",
            http::HeaderValue::from_static("server%20shutting%20down"),
        );
        (None, Some(trailers))
    } else if crate::keep_alive::is_event_stream(headers) {
        let last = shutdown.inner.sse_retry.and_then(|after| {
            let hint = bytes::Bytes::from(format!("retry: {}\n\n", after.as_millis()));
            crate::keep_alive::bytes_as::<D>(&hint)
        });
        (last, None)
    } else {
        (None, None)
    };
    client.set_ending(last, trailers);
    let weak: Weak<dyn Ending> = Arc::downgrade(client) as Weak<dyn Ending>;
    shutdown.register(weak, connection.map(|c| c.downgrade()));
}

/// The grace is over: cuts every stream still open, and the connection of
/// every stream (ended or not) that may still be flushing.
fn force(inner: &Inner) {
    inner.forced.store(true, Ordering::Release);
    let entries = std::mem::take(&mut lock(&inner.streams).list);
    for entry in entries {
        if let Some(stream) = entry.stream.upgrade() {
            stream.force();
        }
        if let Some(connection) = entry.connection.and_then(|c| c.upgrade()) {
            connection.close();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Default)]
    struct Counted {
        begun: AtomicUsize,
        forced: AtomicUsize,
    }

    impl Ending for Counted {
        fn begin(&self) {
            self.begun.fetch_add(1, Ordering::SeqCst);
        }
        fn force(&self) {
            self.forced.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn register(s: &Shutdown) -> Arc<Counted> {
        let c = Arc::new(Counted::default());
        let weak: Weak<dyn Ending> = Arc::downgrade(&(c.clone() as Arc<dyn Ending>));
        s.register(weak, None);
        c
    }

    #[tokio::test(start_paused = true)]
    async fn streams_begin_at_the_signal_and_are_cut_after_the_grace() {
        let s = Shutdown::new().grace(Duration::from_millis(500));
        let a = register(&s);
        let gone = register(&s);
        drop(gone);
        assert_eq!(s.open_streams(), 1);
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.triggered().await }
        });
        tokio::task::yield_now().await;
        s.trigger();
        s.trigger();
        waiting.await.unwrap();
        assert_eq!(a.begun.load(Ordering::SeqCst), 1, "once");
        assert_eq!(a.forced.load(Ordering::SeqCst), 0, "not before the grace");
        tokio::time::sleep(Duration::from_millis(499)).await;
        assert_eq!(a.forced.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(a.forced.load(Ordering::SeqCst), 1);
        // Opened after the signal and the grace: ended and cut at once.
        let late = register(&s);
        assert_eq!(late.begun.load(Ordering::SeqCst), 1);
        assert_eq!(late.forced.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn without_a_runtime_the_signal_cuts_at_once() {
        let s = Shutdown::new();
        let a = register(&s);
        s.trigger();
        assert_eq!(a.begun.load(Ordering::SeqCst), 1);
        assert_eq!(a.forced.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_list_of_streams_stays_bounded() {
        let s = Shutdown::new();
        for _ in 0..10_000 {
            drop(register(&s));
        }
        assert!(lock(&s.inner.streams).list.len() <= 128);
    }

    #[test]
    fn a_hub_closes_at_the_signal() {
        let hub: crate::Hub = crate::Hub::default();
        let s = Shutdown::new().grace(Duration::ZERO);
        s.close_hub(&hub);
        assert!(!hub.is_closed());
        s.trigger();
        assert!(hub.is_closed());
    }
}
