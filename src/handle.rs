//! The handle a handler finds in its request's extensions.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::buffer::BufferStats;
use crate::conn::Connection;
use crate::info::ClientInfo;
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
    /// The health, and how many times it changed: what a handle's
    /// [`changed`](ClientHandle::changed) compares with what it saw. Held
    /// inline (with `changed`) rather than in a `watch` channel, which
    /// would cost every connection an allocation of its own.
    health: Mutex<(Health, u64)>,
    changed: Notify,
    state: OnceLock<Weak<dyn ClientState>>,
    /// Boxed: set once, at the end, and most of a connection's life unset.
    final_stats: OnceLock<Box<BufferStats>>,
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
            health: Mutex::new((Health::Healthy, 0)),
            changed: Notify::new(),
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
        {
            let mut current = self.health.lock().unwrap_or_else(|e| e.into_inner());
            if current.0 == health {
                return;
            }
            *current = (health, current.1.wrapping_add(1));
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn set_closed(&self, reason: CloseReason, stats: BufferStats) {
        let _ = self.final_stats.set(Box::new(stats));
        self.set_health(Health::Closed(reason));
    }

    /// The health and its version.
    fn health(&self) -> (Health, u64) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner())
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
    /// The version of the health this handle last saw.
    seen: u64,
}

impl ClientHandle {
    pub(crate) fn new(inner: Arc<HandleInner>) -> Self {
        let (_, seen) = inner.health();
        Self { inner, seen }
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
            return Some(**stats);
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
        self.inner.health().0
    }

    /// `health() == Health::Healthy`.
    pub fn is_healthy(&self) -> bool {
        self.health() == Health::Healthy
    }

    /// Waits until the health changes (from what this handle last saw) and
    /// returns the new value. Once [`Health::Closed`] was returned, it stays.
    pub async fn changed(&mut self) -> Health {
        loop {
            // Registered before the health is read: a change in between
            // wakes it.
            let notified = std::pin::pin!(self.inner.changed.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            let (health, version) = self.inner.health();
            if matches!(health, Health::Closed(_)) || version != self.seen {
                self.seen = version;
                return health;
            }
            notified.await;
        }
    }
}

impl Clone for ClientHandle {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            seen: self.seen,
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
