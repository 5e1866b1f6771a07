//! Which responses get a buffer.
//!
//! Only a body made of self-delimiting frames can lose a frame and stay
//! meaningful: one SSE event, one NDJSON line, one set of whole gRPC messages.
//! A compressed body, a file or arbitrary bytes cannot. So a [`Predicate`]
//! decides, and whatever it says, the layer never wraps a response that has a
//! `Content-Encoding` (other than `identity`) or a body of exact size.

use http::{Extensions, HeaderMap, StatusCode, Version, header};
use http_body::Body;

/// Decides whether a response is put through a buffer.
///
/// Implemented by [`DefaultPredicate`] and by closures
/// `Fn(StatusCode, Version, &HeaderMap, &Extensions) -> bool`, as in
/// tower-http's compression predicates.
///
/// ```
/// use http::{header, Extensions, HeaderMap, StatusCode, Version};
/// use tower_backpressure::{BackpressureLayer, BufferConfig, DefaultPredicate, Predicate};
///
/// // Also buffer `text/plain` streams.
/// let layer = BackpressureLayer::new(BufferConfig::default()).buffer_when(
///     |status: StatusCode, version: Version, headers: &HeaderMap, ext: &Extensions| {
///         DefaultPredicate::new().matches(status, version, headers, ext)
///             || headers
///                 .get(header::CONTENT_TYPE)
///                 .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
///     },
/// );
/// # let _ = layer;
/// ```
pub trait Predicate: Clone {
    /// `true` to put `response` through a buffer.
    fn should_buffer<B: Body>(&self, response: &http::Response<B>) -> bool;
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

    /// The test itself, for use inside a closure that extends it.
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
pub(crate) fn can_drop_frames<B: Body>(response: &http::Response<B>) -> bool {
    let encoded = response
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    !encoded && response.body().size_hint().exact().is_none()
}

#[cfg(test)]
mod tests {
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
}
