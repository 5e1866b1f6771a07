use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::BackpressureBody;
use super::future::{ResponseFuture, Wrap};
use super::layer::BackpressureLayer;
use crate::BoxError;
use crate::budget::MemoryBudget;
use crate::config::BufferConfig;
use crate::handle::{ClientHandle, HandleInner};
use crate::info::{ClientInfo, connection, peer_addr, route};
use crate::keep_alive::StreamOptions;
use crate::observer::BackpressureObserver;
use crate::policy::{Classify, GapMarker};
use crate::predicate::{DefaultPredicate, Predicate};

/// Middleware that puts streaming response bodies through a per-client
/// drop-oldest buffer filled by a pump task.
///
/// Built by [`BackpressureLayer`]; see the [crate docs](crate) for an
/// example. Before calling the inner service it inserts a [`ClientHandle`]
/// into the request's extensions.
pub struct Backpressure<S, P = DefaultPredicate, O = (), M = (), C = ()> {
    pub(crate) inner: S,
    pub(crate) config: Arc<BufferConfig>,
    pub(crate) predicate: P,
    pub(crate) observer: Arc<O>,
    pub(crate) marker: M,
    pub(crate) classify: C,
    pub(crate) budget: Option<MemoryBudget>,
    pub(crate) stream: StreamOptions,
}

impl<S> Backpressure<S> {
    /// Wraps `inner` with the default predicate and no observer.
    ///
    /// # Panics
    ///
    /// If `config` is invalid; see [`BackpressureLayer::try_new`].
    pub fn new(inner: S, config: BufferConfig) -> Self {
        BackpressureLayer::new(config).into_service(inner)
    }

    /// A [`BackpressureLayer`] with `config`.
    ///
    /// # Panics
    ///
    /// If `config` is invalid.
    pub fn layer(config: BufferConfig) -> BackpressureLayer {
        BackpressureLayer::new(config)
    }
}

impl<S, P, O, M, C> Backpressure<S, P, O, M, C> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The buffer configuration.
    pub fn config(&self) -> &BufferConfig {
        &self.config
    }
}

impl<S: Clone, P: Clone, O, M: Clone, C: Clone> Clone for Backpressure<S, P, O, M, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
            predicate: self.predicate.clone(),
            observer: self.observer.clone(),
            marker: self.marker.clone(),
            classify: self.classify.clone(),
            budget: self.budget.clone(),
            stream: self.stream.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug, O, M, C> fmt::Debug for Backpressure<S, P, O, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backpressure")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("predicate", &self.predicate)
            .finish_non_exhaustive()
    }
}

impl<S, P, O, M, C, ReqBody, ResBody> Service<Request<ReqBody>> for Backpressure<S, P, O, M, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
    P: Predicate,
    O: BackpressureObserver,
    M: GapMarker<ResBody::Data>,
    C: Classify<ResBody::Data>,
{
    type Response = Response<BackpressureBody<ResBody, O, M>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, P, O, M, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Method and URI clones are reference counts or inline values.
        let mut info = ClientInfo::new(
            req.method().clone(),
            owned(req.uri()),
            peer_addr(req.extensions()),
        );
        if let Some(route) = route(req.extensions()) {
            info = info.with_route(route);
        }
        // An HTTP/1 connection carries this response alone: evicting its
        // client closes it. HTTP/2 connections carry other streams.
        let connection = (req.version() <= http::Version::HTTP_11)
            .then(|| connection(req.extensions()))
            .flatten();
        let handle = HandleInner::with_connection(info, connection);
        req.extensions_mut()
            .insert(ClientHandle::new(handle.clone()));
        let wrap = Wrap {
            handle,
            config: self.config.clone(),
            predicate: self.predicate.clone(),
            observer: self.observer.clone(),
            marker: self.marker.clone(),
            classify: self.classify.clone(),
            budget: self.budget.clone(),
            stream: self.stream.clone(),
        };
        ResponseFuture::new(self.inner.call(req), wrap)
    }
}

/// A copy of `uri` that owns its bytes. A URI that hyper parsed shares the
/// connection's read buffer: a clone kept for as long as the response
/// streams would keep that whole buffer (about 4 KiB and more) alive per
/// client, for nothing but its path.
///
/// Most streaming routes are asked for by the same URI (`/events`): the
/// first [`SHARED_URIS`] distinct ones are kept, and a request for one of
/// them shares its bytes instead of copying them again.
fn owned(uri: &http::Uri) -> http::Uri {
    static SHARED: std::sync::Mutex<Vec<http::Uri>> = std::sync::Mutex::new(Vec::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = shared.iter().find(|known| *known == uri) {
        return known.clone();
    }
    let copy = copied(uri);
    if shared.len() < SHARED_URIS {
        shared.push(copy.clone());
    }
    copy
}

/// How many URIs [`owned`] keeps to share.
const SHARED_URIS: usize = 64;

/// A copy of `uri` that owns its bytes.
fn copied(uri: &http::Uri) -> http::Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = uri.scheme().cloned();
    parts.authority = uri
        .authority()
        .and_then(|a| http::uri::Authority::try_from(a.as_str()).ok());
    parts.path_and_query = uri
        .path_and_query()
        .and_then(|p| http::uri::PathAndQuery::try_from(p.as_str()).ok());
    http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::owned;

    #[test]
    fn an_owned_uri_does_not_share_the_request_buffer() {
        // As hyper parses it: a slice of a larger read buffer.
        let buffer = Bytes::from(vec![b'/'; 4096]);
        let uri = http::Uri::from_maybe_shared(buffer.slice(0..16)).unwrap();
        let copy = owned(&uri);
        assert_eq!(copy, uri);
        drop(uri);
        // Only `buffer` (and nothing of `copy`) holds the 4 KiB now.
        assert!(buffer.is_unique(), "the copy keeps the read buffer alive");
    }

    #[test]
    fn requests_for_the_same_uri_share_one_copy() {
        let parse = |s: &str| {
            let buffer = Bytes::from(format!("{s} HTTP/1.1"));
            http::Uri::from_maybe_shared(buffer.slice(0..s.len())).unwrap()
        };
        let a = owned(&parse("/shared/events?x=1"));
        let b = owned(&parse("/shared/events?x=1"));
        let c = owned(&parse("/shared/events?x=2"));
        assert_eq!(a, b);
        assert_eq!(a.path().as_ptr(), b.path().as_ptr(), "one copy, shared");
        assert_ne!(a.path().as_ptr(), c.path().as_ptr());
        assert_eq!(c.query(), Some("x=2"));
    }
}
