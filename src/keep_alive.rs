//! SSE keep-alive: a comment line on a stream that has been quiet for a
//! while, so that proxies and load balancers that cut idle connections
//! (nginx, cloud load balancers: 30–60 s) keep it, and so that a peer that
//! vanished without a FIN is noticed (only a write finds it).
//!
//! [`BackpressureLayer::keep_alive`](crate::BackpressureLayer::keep_alive)
//! sets it for every `text/event-stream` response the layer buffers (per
//! client, or a window over a hub's log); [`HubResponse::keep_alive`](crate::hub::HubResponse::keep_alive)
//! for a hub's SSE response served without the layer. Both are on by
//! default, every 15 seconds, as axum's `Sse::keep_alive`. A bare
//! [`Subscription`](crate::hub::Subscription) served as a body gets them
//! with [`Subscription::keep_alive`](crate::hub::Subscription::keep_alive)
//! (off by default: it may not be SSE).
//!
//! The timer is armed when the body is first polled with nothing to send,
//! not reset on every frame: a busy stream reads no clock.
//!
//! A comment is not an event: `EventSource` ignores it, it is not counted
//! in a client's stats (`sent`, `pushed`), it fires no observer event, and
//! it does not make a stalled client look alive (it does not reset a stall
//! rule). It is written only when the body is polled and has nothing to
//! send: a client that does not read is not polled, and gets none.
//!
//! Other transports keep their own: for gRPC, HTTP/2 PING frames
//! (`tonic::transport::Server::http2_keepalive_interval`, set in
//! `examples/grpc_server.rs`); for WebSocket, a Ping message, which only the
//! application can make (a [`BufferedSink`](crate::BufferedSink) is generic
//! over its message type; tungstenite and axum answer a peer's Ping by
//! themselves): send one on a timer next to the sink.

use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, header};
use tokio::time::Instant;

use crate::client::{Timer, after, now};

/// When and what an idle SSE stream is sent: a comment line after
/// [`interval`](Self::interval) without a frame.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::{BackpressureLayer, BufferConfig, KeepAlive};
///
/// // `: ping` after 20 s of quiet.
/// let layer = BackpressureLayer::new(BufferConfig::default())
///     .keep_alive(Some(KeepAlive::new().interval(Duration::from_secs(20)).text("ping")));
/// assert_eq!(layer.get_keep_alive().unwrap().comment(), ": ping\n\n");
///
/// // Off.
/// let layer = BackpressureLayer::new(BufferConfig::default()).keep_alive(None);
/// assert!(layer.get_keep_alive().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct KeepAlive {
    interval: Duration,
    comment: Bytes,
}

impl KeepAlive {
    /// An empty comment (`:\n\n`) after 15 seconds of quiet.
    pub fn new() -> Self {
        Self {
            interval: Duration::from_secs(15),
            comment: Bytes::from_static(b":\n\n"),
        }
    }

    /// How long a stream may stay quiet before it gets a comment.
    ///
    /// # Panics
    ///
    /// If `interval` is zero (a comment on every poll); to turn keep-alive
    /// off, pass `None` where a `KeepAlive` is asked for.
    pub fn interval(mut self, interval: Duration) -> Self {
        assert!(
            !interval.is_zero(),
            "a keep-alive interval must be more than zero; pass `None` to turn keep-alive off"
        );
        self.interval = interval;
        self
    }

    /// The comment's text: `: <text>\n\n`.
    ///
    /// # Panics
    ///
    /// If `text` contains a line break (it would end the comment).
    pub fn text(mut self, text: &str) -> Self {
        assert!(
            !text.contains(['\r', '\n']),
            "an SSE comment cannot contain a line break: {text:?}"
        );
        let mut comment = BytesMut::with_capacity(text.len() + 4);
        comment.put_slice(b": ");
        comment.put_slice(text.as_bytes());
        comment.put_slice(b"\n\n");
        self.comment = comment.freeze();
        self
    }

    /// The interval.
    pub fn get_interval(&self) -> Duration {
        self.interval
    }

    /// The bytes sent: a whole comment, `:` to the blank line.
    pub fn comment(&self) -> &Bytes {
        &self.comment
    }
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self::new()
    }
}

/// What the layer does for the streams it serves besides buffering them:
/// keep-alive comments and the header that keeps proxies from buffering
/// (SSE responses), and the shutdown that ends them.
#[derive(Debug, Clone)]
pub(crate) struct StreamOptions {
    pub(crate) keep_alive: Option<KeepAlive>,
    pub(crate) no_proxy_buffering: bool,
    pub(crate) shutdown: Option<crate::shutdown::Shutdown>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            keep_alive: Some(KeepAlive::new()),
            no_proxy_buffering: true,
            shutdown: None,
        }
    }
}

/// `X-Accel-Buffering`: nginx (and proxies that follow it) stream a
/// response that says `no` instead of buffering it.
pub(crate) const X_ACCEL_BUFFERING: &str = "x-accel-buffering";

/// Adds `X-Accel-Buffering: no` to an SSE response that has no such
/// header (a value the application set stays).
pub(crate) fn no_proxy_buffering(headers: &mut HeaderMap) {
    if is_event_stream(headers) && !headers.contains_key(X_ACCEL_BUFFERING) {
        headers.insert(X_ACCEL_BUFFERING, http::HeaderValue::from_static("no"));
    }
}

/// `headers` say `text/event-stream` (any case, any parameters).
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        let essence = v.split(|b| *b == b';').next().unwrap_or(v);
        essence
            .trim_ascii()
            .eq_ignore_ascii_case(b"text/event-stream")
    })
}

/// `bytes` as a body's data type `D`, if `D` is `Bytes` (a comment, a
/// shutdown's `retry:` hint: only `Bytes` bodies get one).
pub(crate) fn bytes_as<D: 'static>(bytes: &Bytes) -> Option<D> {
    // Downcast in place: no allocation, for every stream that asks.
    let mut slot = Some(bytes.clone());
    (&mut slot as &mut dyn std::any::Any)
        .downcast_mut::<Option<D>>()
        .and_then(Option::take)
}

/// One stream's keep-alive: the timer, armed when the stream goes quiet.
pub(crate) struct Idle {
    keep_alive: KeepAlive,
    timer: Timer,
    /// When the comment is due; `None` while the stream is busy (armed at
    /// the first poll that finds nothing, so a busy stream reads no clock).
    due: Option<Instant>,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("keep_alive", &self.keep_alive)
            .field("due", &self.due)
            .finish_non_exhaustive()
    }
}

impl Idle {
    /// The keep-alive of a response with `headers` and data `D`: only for
    /// `text/event-stream` with `Bytes` data.
    pub(crate) fn for_response<D: 'static>(
        keep_alive: Option<&KeepAlive>,
        headers: &HeaderMap,
    ) -> Option<Self> {
        if !is_event_stream(headers) {
            return None;
        }
        Self::new::<D>(keep_alive)
    }

    /// The keep-alive of a body known to be SSE, with data `D` (only
    /// `Bytes` gets one).
    pub(crate) fn new<D: 'static>(keep_alive: Option<&KeepAlive>) -> Option<Self> {
        let keep_alive = keep_alive?;
        bytes_as::<D>(&keep_alive.comment)?;
        Some(Self {
            keep_alive: keep_alive.clone(),
            timer: Timer::default(),
            due: None,
        })
    }

    /// A frame went out: the stream is busy.
    #[inline]
    pub(crate) fn busy(&mut self) {
        self.due = None;
    }

    /// The stream has nothing to send: the comment if it has been quiet
    /// for the interval, else `Pending` with the timer armed.
    pub(crate) fn poll_quiet<D: 'static>(&mut self, cx: &mut Context<'_>) -> Poll<D> {
        let due = *self
            .due
            .get_or_insert_with(|| after(now(), self.keep_alive.interval));
        if self.timer.poll_until(due, cx).is_pending() {
            return Poll::Pending;
        }
        self.due = None;
        match bytes_as(&self.keep_alive.comment) {
            Some(comment) => Poll::Ready(comment),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn only_event_streams_get_comments() {
        let mut headers = HeaderMap::new();
        assert!(!is_event_stream(&headers));
        for (value, sse) in [
            ("text/event-stream", true),
            ("Text/Event-Stream; charset=utf-8", true),
            ("application/x-ndjson", false),
            ("text/event-streams", false),
        ] {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_event_stream(&headers), sse, "{value}");
        }
        let ka = KeepAlive::new();
        assert!(Idle::for_response::<Bytes>(Some(&ka), &headers).is_none());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        assert!(Idle::for_response::<Bytes>(Some(&ka), &headers).is_some());
        assert!(Idle::for_response::<Bytes>(None, &headers).is_none());
        // Not bytes: no comment can be made.
        assert!(Idle::for_response::<Vec<u8>>(Some(&ka), &headers).is_none());
    }

    #[test]
    fn comments_are_whole() {
        assert_eq!(KeepAlive::new().comment(), ":\n\n");
        assert_eq!(
            KeepAlive::new().text("keep-alive").comment(),
            ": keep-alive\n\n"
        );
        assert_eq!(KeepAlive::default().get_interval(), Duration::from_secs(15));
    }

    #[test]
    #[should_panic(expected = "a keep-alive interval must be more than zero")]
    fn a_zero_interval_is_refused() {
        let _ = KeepAlive::new().interval(Duration::ZERO);
    }

    #[test]
    #[should_panic(expected = "an SSE comment cannot contain a line break")]
    fn a_comment_cannot_break_lines() {
        let _ = KeepAlive::new().text("a\nb");
    }
}
