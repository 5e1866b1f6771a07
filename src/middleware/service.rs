use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::BackpressureBody;
use super::future::{RequestParts, ResponseFuture};
use super::layer::BackpressureLayer;
use crate::BoxError;
use crate::client::peer_addr;
use crate::config::BufferConfig;
use crate::observer::BackpressureObserver;
use crate::predicate::{DefaultPredicate, Predicate};

/// Middleware that puts streaming response bodies through a per-client
/// drop-oldest buffer filled by a pump task.
///
/// See the [crate docs](crate) for an example.
pub struct Backpressure<S, P = DefaultPredicate, O = ()> {
    pub(crate) inner: S,
    pub(crate) config: BufferConfig,
    pub(crate) predicate: P,
    pub(crate) observer: Arc<O>,
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

impl<S, P, O> Backpressure<S, P, O> {
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

impl<S: Clone, P: Clone, O> Clone for Backpressure<S, P, O> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config,
            predicate: self.predicate.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug, O> fmt::Debug for Backpressure<S, P, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backpressure")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("predicate", &self.predicate)
            .finish_non_exhaustive()
    }
}

impl<S, P, O, ReqBody, ResBody> Service<Request<ReqBody>> for Backpressure<S, P, O>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
    P: Predicate,
    O: BackpressureObserver,
{
    type Response = Response<BackpressureBody<ResBody, O>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, P, O>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Clones here are reference counts or inline values: no allocation.
        let request = RequestParts {
            method: req.method().clone(),
            uri: req.uri().clone(),
            peer: peer_addr(req.extensions()),
        };
        ResponseFuture::new(
            self.inner.call(req),
            request,
            self.config,
            self.predicate.clone(),
            self.observer.clone(),
        )
    }
}
