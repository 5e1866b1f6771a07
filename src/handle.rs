//! The handle a handler finds in its request's extensions.

use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::buffer::BufferStats;
use crate::client::ClientInfo;
use crate::conn::Connection;
use crate::observer::CloseReason;

/// A client's health, as its [`ClientHandle`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Below the threshold (also: not buffered, or not yet).
    Healthy,
    /// Over the threshold: the client is falling behind.
    Pressure,
    /// The response has ended.
    Closed(CloseReason),
}

/// What the handle reads from a live buffered response.
pub(crate) trait ClientState: Send + Sync {
    fn stats(&self) -> BufferStats;
    /// Time since the client last took a frame (or since it connected).
    fn idle(&self) -> Duration;
}

pub(crate) struct HandleInner {
    pub(crate) info: ClientInfo,
    /// Closed when the client is evicted (HTTP/1, sinks).
    connection: Option<Connection>,
    opened_at: SystemTime,
    health: watch::Sender<Health>,
    state: OnceLock<Weak<dyn ClientState>>,
    final_stats: OnceLock<BufferStats>,
}

impl HandleInner {
    #[cfg(test)]
    pub(crate) fn new(info: ClientInfo) -> Arc<Self> {
        Self::with_connection(info, None)
    }

    pub(crate) fn with_connection(info: ClientInfo, connection: Option<Connection>) -> Arc<Self> {
        Arc::new(Self {
            info,
            connection,
            opened_at: SystemTime::now(),
            health: watch::Sender::new(Health::Healthy),
            state: OnceLock::new(),
            final_stats: OnceLock::new(),
        })
    }

    /// The connection to close when the client is evicted.
    pub(crate) fn connection(&self) -> Option<&Connection> {
        self.connection.as_ref()
    }

    pub(crate) fn attach(&self, state: Weak<dyn ClientState>) {
        let _ = self.state.set(state);
    }

    pub(crate) fn set_health(&self, health: Health) {
        self.health.send_replace(health);
    }

    pub(crate) fn set_closed(&self, reason: CloseReason, stats: BufferStats) {
        let _ = self.final_stats.set(stats);
        self.health.send_replace(Health::Closed(reason));
    }
}

/// One client's live state, for the handler that produces its stream and for
/// operators.
///
/// [`BackpressureLayer`](crate::BackpressureLayer) inserts a `ClientHandle`
/// into every request's extensions before calling the inner service, so a
/// handler can watch its own client and adapt: slow down, switch to
/// snapshots, or pause while the client is under pressure and resume once
/// it has caught up.
///
/// ```no_run
/// use std::convert::Infallible;
///
/// use axum::{Extension, response::sse::{Event, Sse}};
/// use futures::Stream;
/// use tower_backpressure::{ClientHandle, Health};
///
/// async fn events(
///     Extension(client): Extension<ClientHandle>,
/// ) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
///     let stream = futures::stream::unfold((0u64, client), |(n, mut client)| async move {
///         // Pause while the client is under pressure; resume when it recovers.
///         while client.health() == Health::Pressure {
///             client.changed().await;
///         }
///         let event = Event::default().id(n.to_string()).data("tick");
///         Some((Ok(event), (n + 1, client)))
///     });
///     Sse::new(stream)
/// }
/// ```
///
/// For a response that is not buffered (the predicate did not select it),
/// [`is_buffered`](Self::is_buffered) is `false` and health stays
/// [`Health::Healthy`].
pub struct ClientHandle {
    inner: Arc<HandleInner>,
    rx: watch::Receiver<Health>,
}

impl ClientHandle {
    pub(crate) fn new(inner: Arc<HandleInner>) -> Self {
        let rx = inner.health.subscribe();
        Self { inner, rx }
    }

    /// Who the response streams to.
    pub fn info(&self) -> &ClientInfo {
        &self.inner.info
    }

    /// When the request arrived.
    pub fn opened_at(&self) -> SystemTime {
        self.inner.opened_at
    }

    /// Whether the response goes through a buffer (so far).
    pub fn is_buffered(&self) -> bool {
        self.inner.state.get().is_some()
    }

    /// The buffer's counters: live while the response streams, final after
    /// it closed, `None` if it is not buffered.
    pub fn stats(&self) -> Option<BufferStats> {
        if let Some(stats) = self.inner.final_stats.get() {
            return Some(*stats);
        }
        let state = self.inner.state.get()?.upgrade()?;
        Some(state.stats())
    }

    /// Time since the client last took a frame, or since its response was
    /// wrapped if it has taken none; `None` unless it is streaming now.
    pub fn idle(&self) -> Option<Duration> {
        if self.inner.final_stats.get().is_some() {
            return None;
        }
        let state = self.inner.state.get()?.upgrade()?;
        Some(state.idle())
    }

    /// The current health.
    pub fn health(&self) -> Health {
        *self.rx.borrow()
    }

    /// `health() == Health::Healthy`.
    pub fn is_healthy(&self) -> bool {
        self.health() == Health::Healthy
    }

    /// Waits until the health changes (from what this handle last saw) and
    /// returns the new value. Once [`Health::Closed`] was returned, it stays.
    pub async fn changed(&mut self) -> Health {
        if matches!(*self.rx.borrow(), Health::Closed(_)) {
            return *self.rx.borrow_and_update();
        }
        // The sender lives as long as `inner`, which this handle holds.
        let _ = self.rx.changed().await;
        *self.rx.borrow_and_update()
    }
}

impl Clone for ClientHandle {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            rx: self.rx.clone(),
        }
    }
}

impl fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHandle")
            .field("info", &self.inner.info)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}
