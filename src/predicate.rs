//! Which responses get a buffer.
//!
//! Only a body made of self-delimiting frames can lose a frame and stay
//! meaningful: one SSE event, one NDJSON line, one set of whole gRPC messages.
//! A compressed body, a file or arbitrary bytes cannot. So a [`Predicate`]
//! decides, and whatever it says, the layer never wraps a response that has a
//! `Content-Encoding` (other than `identity`) or a body of exact size.
//! A response the predicate selects but that is already encoded means a
//! compression layer sits inside this one: the layer lets it through and,
//! with the `tracing` feature, says so at `DEBUG` (put the layer inside the
//! compression layer instead).
//!
//! Predicates combine with [`Predicate::and`], [`Predicate::or`] and
//! [`Predicate::not`] (into [`And`], [`Or`] and [`Not`]), so the
//! [`DefaultPredicate`] can be extended rather than rewritten.

use http::{Extensions, HeaderMap, StatusCode, Version, header};
use http_body::Body;

/// Decides whether a response is put through a buffer.
///
/// Implemented by [`DefaultPredicate`], by closures
/// `Fn(StatusCode, Version, &HeaderMap, &Extensions) -> bool`, as in
/// tower-http's compression predicates, and by the combinators
/// [`and`](Self::and), [`or`](Self::or) and [`not`](Self::not), which extend
/// a predicate instead of rewriting it.
///
/// ```
/// use http::{header, Extensions, HeaderMap, StatusCode, Version};
/// use tower_backpressure::{BackpressureLayer, BufferConfig, DefaultPredicate, Predicate};
///
/// // The streaming types, and also `text/plain` streams.
/// let text_plain = |_: StatusCode, _: Version, headers: &HeaderMap, _: &Extensions| {
///     headers
///         .get(header::CONTENT_TYPE)
///         .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
/// };
/// let layer = BackpressureLayer::new(BufferConfig::default())
///     .buffer_when(DefaultPredicate::new().or(text_plain));
/// # let _ = layer;
///
/// // The streaming types, but only for successful responses and never on
/// // an internal route.
/// let internal = |_: StatusCode, _: Version, _: &HeaderMap, ext: &Extensions| {
///     ext.get::<Internal>().is_some()
/// };
/// # #[derive(Clone)] struct Internal;
/// let predicate = DefaultPredicate::new()
///     .and(|status: StatusCode, _: Version, _: &HeaderMap, _: &Extensions| status.is_success())
///     .and(internal.not());
///
/// let sse = |status: u16| {
///     http::Response::builder()
///         .status(status)
///         .header(header::CONTENT_TYPE, "text/event-stream")
///         .body(http_body_util::Empty::<bytes::Bytes>::new())
///         .unwrap()
/// };
/// assert!(predicate.should_buffer(&sse(200)));
/// assert!(!predicate.should_buffer(&sse(503)));
/// ```
pub trait Predicate: Clone {
    /// `true` to put `response` through a buffer.
    fn should_buffer<B: Body>(&self, response: &http::Response<B>) -> bool;

    /// Buffers a response only if both `self` and `other` select it
    /// (`other` is not asked when `self` says no).
    fn and<Other>(self, other: Other) -> And<Self, Other>
    where
        Self: Sized,
        Other: Predicate,
    {
        And {
            lhs: self,
            rhs: other,
        }
    }

    /// Buffers a response if `self` or `other` selects it (`other` is not
    /// asked when `self` says yes).
    fn or<Other>(self, other: Other) -> Or<Self, Other>
    where
        Self: Sized,
        Other: Predicate,
    {
        Or {
            lhs: self,
            rhs: other,
        }
    }

    /// Buffers a response only if `self` does not select it.
    ///
    /// Whatever a predicate says, a response with a `Content-Encoding` or a
    /// body of exact size is never buffered: `not` cannot select those.
    fn not(self) -> Not<Self>
    where
        Self: Sized,
    {
        Not { inner: self }
    }
}

impl<F> Predicate for F
where
    F: Fn(StatusCode, Version, &HeaderMap, &Extensions) -> bool + Clone,
{
    fn should_buffer<B: Body>(&self, response: &http::Response<B>) -> bool {
        self(
            response.status(),
            response.version(),
            response.headers(),
            response.extensions(),
        )
    }
}

/// Two predicates that must both select a response.
///
/// Created with [`Predicate::and`].
#[derive(Debug, Clone, Copy, Default)]
pub struct And<Lhs, Rhs> {
    lhs: Lhs,
    rhs: Rhs,
}

impl<Lhs, Rhs> Predicate for And<Lhs, Rhs>
where
    Lhs: Predicate,
    Rhs: Predicate,
{
    fn should_buffer<B: Body>(&self, response: &http::Response<B>) -> bool {
        self.lhs.should_buffer(response) && self.rhs.should_buffer(response)
    }
}

/// Two predicates of which either may select a response.
///
/// Created with [`Predicate::or`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Or<Lhs, Rhs> {
    lhs: Lhs,
    rhs: Rhs,
}

impl<Lhs, Rhs> Predicate for Or<Lhs, Rhs>
where
    Lhs: Predicate,
    Rhs: Predicate,
{
    fn should_buffer<B: Body>(&self, response: &http::Response<B>) -> bool {
        self.lhs.should_buffer(response) || self.rhs.should_buffer(response)
    }
}

/// A predicate turned around: selects what it does not.
///
/// Created with [`Predicate::not`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Not<P> {
    inner: P,
}

impl<P> Predicate for Not<P>
where
    P: Predicate,
{
    fn should_buffer<B: Body>(&self, response: &http::Response<B>) -> bool {
        !self.inner.should_buffer(response)
    }
}

/// Buffers streaming content types: `text/event-stream`,
/// `application/x-ndjson`, `application/jsonl` and `application/grpc*`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPredicate {
    _priv: (),
}

impl DefaultPredicate {
    /// The default predicate.
    pub fn new() -> Self {
        Self::default()
    }

    /// The test itself, for use inside a closure; to extend the default,
    /// [`Predicate::and`], [`or`](Predicate::or) and [`not`](Predicate::not)
    /// are simpler.
    pub fn matches(
        &self,
        _status: StatusCode,
        _version: Version,
        headers: &HeaderMap,
        _extensions: &Extensions,
    ) -> bool {
        let Some(ct) = headers.get(header::CONTENT_TYPE) else {
            return false;
        };
        let ct = ct.as_bytes();
        let essence = ct.split(|&b| b == b';').next().unwrap_or(ct);
        let essence = essence.trim_ascii();
        [
            &b"text/event-stream"[..],
            b"application/x-ndjson",
            b"application/jsonl",
        ]
        .iter()
        .any(|t| essence.eq_ignore_ascii_case(t))
            || essence
                .get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
    }
}

impl Predicate for DefaultPredicate {
    fn should_buffer<B: Body>(&self, response: &http::Response<B>) -> bool {
        self.matches(
            response.status(),
            response.version(),
            response.headers(),
            response.extensions(),
        )
    }
}

/// The rule no predicate overrides: no `Content-Encoding` (but `identity`),
/// no exact body size.
///
/// Asked only of a response the predicate selected, once per response. A
/// selected response that is already encoded (a compression layer inside
/// this one) is a stack in the wrong order, which the layer otherwise gets
/// through in silence: with the `tracing` feature, it says so at `DEBUG`.
pub(crate) fn can_drop_frames<B: Body>(response: &http::Response<B>) -> bool {
    let mut encodings = response.headers().get_all(header::CONTENT_ENCODING).iter();
    let encoded = encodings.find(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if let Some(_encoding) = encoded {
        #[cfg(feature = "tracing")]
        tracing::debug!(
            content_encoding = ?_encoding,
            "response not buffered: it already has a Content-Encoding; \
             put BackpressureLayer inside the compression layer, so that it sees the frames before they are compressed"
        );
        return false;
    }
    response.body().size_hint().exact().is_none()
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use bytes::Bytes;
    use http_body_util::{Full, StreamBody};

    use super::*;

    type EmptyStream =
        StreamBody<futures_util::stream::Empty<Result<http_body::Frame<Bytes>, std::io::Error>>>;

    fn streaming(ct: &str) -> http::Response<EmptyStream> {
        http::Response::builder()
            .header(header::CONTENT_TYPE, ct)
            .body(StreamBody::new(futures_util::stream::empty()))
            .unwrap()
    }

    #[test]
    fn default_matches_streaming_types_only() {
        let p = DefaultPredicate::new();
        for ct in [
            "text/event-stream",
            "text/event-stream; charset=utf-8",
            "Text/Event-Stream",
            "application/x-ndjson",
            "application/jsonl",
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web",
        ] {
            assert!(p.should_buffer(&streaming(ct)), "{ct}");
        }
        for ct in [
            "text/html",
            "application/json",
            "application/octet-stream",
            "text/event",
        ] {
            assert!(!p.should_buffer(&streaming(ct)), "{ct}");
        }
        let none = http::Response::new(StreamBody::new(futures_util::stream::empty::<
            Result<http_body::Frame<Bytes>, std::io::Error>,
        >()));
        assert!(!p.should_buffer(&none));
    }

    fn plain_text(_: StatusCode, _: Version, headers: &HeaderMap, _: &Extensions) -> bool {
        headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
    }

    fn success(status: StatusCode, _: Version, _: &HeaderMap, _: &Extensions) -> bool {
        status.is_success()
    }

    fn with_status(ct: &str, status: StatusCode) -> http::Response<EmptyStream> {
        let mut r = streaming(ct);
        *r.status_mut() = status;
        r
    }

    #[test]
    fn or_extends_the_default() {
        let p = DefaultPredicate::new().or(plain_text);
        assert!(p.should_buffer(&streaming("text/event-stream")));
        assert!(p.should_buffer(&streaming("text/plain; charset=utf-8")));
        assert!(!p.should_buffer(&streaming("text/html")));
        // The default alone does not take text/plain.
        assert!(!DefaultPredicate::new().should_buffer(&streaming("text/plain")));
    }

    #[test]
    fn and_narrows_the_default() {
        let p = DefaultPredicate::new().and(success);
        assert!(p.should_buffer(&with_status("text/event-stream", StatusCode::OK)));
        assert!(!p.should_buffer(&with_status(
            "text/event-stream",
            StatusCode::SERVICE_UNAVAILABLE
        )));
        assert!(!p.should_buffer(&with_status("text/html", StatusCode::OK)));
    }

    #[test]
    fn not_turns_a_predicate_around_and_combinators_nest() {
        let grpc = |_: StatusCode, _: Version, h: &HeaderMap, _: &Extensions| {
            h.get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        };
        // Every default type but gRPC, plus text/plain.
        let p = DefaultPredicate::new().and(grpc.not()).or(plain_text);
        assert!(p.should_buffer(&streaming("application/x-ndjson")));
        assert!(!p.should_buffer(&streaming("application/grpc")));
        assert!(p.should_buffer(&streaming("text/plain")));
        assert!(!p.should_buffer(&streaming("text/html")));
        assert!(
            DefaultPredicate::new()
                .not()
                .should_buffer(&streaming("text/html"))
        );
    }

    #[test]
    fn and_and_or_short_circuit() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let asked = Arc::new(AtomicUsize::new(0));
        let counting = {
            let asked = asked.clone();
            move |_: StatusCode, _: Version, _: &HeaderMap, _: &Extensions| {
                asked.fetch_add(1, Ordering::Relaxed);
                true
            }
        };
        let html = streaming("text/html");
        let sse = streaming("text/event-stream");
        assert!(
            !DefaultPredicate::new()
                .and(counting.clone())
                .should_buffer(&html)
        );
        assert!(
            DefaultPredicate::new()
                .or(counting.clone())
                .should_buffer(&sse)
        );
        assert_eq!(asked.load(Ordering::Relaxed), 0);
        assert!(
            DefaultPredicate::new()
                .and(counting.clone())
                .should_buffer(&sse)
        );
        assert!(DefaultPredicate::new().or(counting).should_buffer(&html));
        assert_eq!(asked.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn combinators_of_copy_predicates_are_copy_and_debug() {
        fn copy_debug<T: Copy + fmt::Debug>(_: T) {}
        let p = DefaultPredicate::new()
            .and(DefaultPredicate::new().not())
            .or(DefaultPredicate::new());
        copy_debug(p);
        assert!(format!("{p:?}").starts_with("Or { lhs: And {"));
    }

    #[test]
    fn encoded_or_exact_bodies_are_never_dropped_from() {
        let mut r = streaming("text/event-stream");
        assert!(can_drop_frames(&r));
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, "identity".parse().unwrap());
        assert!(can_drop_frames(&r));
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert!(!can_drop_frames(&r));

        let full = http::Response::new(Full::new(Bytes::from_static(b"data: x\n\n")));
        assert!(!can_drop_frames(&full));
    }

    /// A selected response that is already compressed is let through with
    /// one `DEBUG` line that says why and what to change; an identity or
    /// unencoded one, without.
    #[cfg(feature = "tracing")]
    #[test]
    fn an_encoded_response_says_why_it_is_not_buffered() {
        let logs = crate::test_logs::Logs::default();
        let subscriber = logs.subscriber();
        tracing::subscriber::with_default(subscriber, || {
            let mut r = streaming("text/event-stream");
            assert!(can_drop_frames(&r));
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, "identity".parse().unwrap());
            assert!(can_drop_frames(&r));
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
            assert!(!can_drop_frames(&r));
        });
        let out = logs.text();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert!(lines[0].contains("DEBUG"), "{out}");
        assert!(lines[0].contains("already has a Content-Encoding"), "{out}");
        assert!(lines[0].contains("content_encoding=\"gzip\""), "{out}");
        assert!(
            lines[0].contains("put BackpressureLayer inside the compression layer"),
            "{out}"
        );
    }
}
