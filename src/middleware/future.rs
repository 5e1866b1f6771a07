use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Method, Response, Uri, header};
use http_body::Body;
use pin_project::pin_project;

use super::body::{BackpressureBody, Pump};
use super::shared::Shared;
use crate::BoxError;
use crate::buffer::{ClientBuffer, Remaining};
use crate::client::ClientInfo;
use crate::config::BufferConfig;
use crate::observer::{BackpressureObserver, EventKind};
use crate::predicate::{Predicate, can_drop_frames};

/// What the service kept of the request to name the client.
pub(crate) struct RequestParts {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) peer: Option<SocketAddr>,
}

/// Response future of [`Backpressure`](crate::Backpressure).
#[pin_project]
pub struct ResponseFuture<F, P, O> {
    #[pin]
    inner: F,
    request: Option<RequestParts>,
    config: BufferConfig,
    predicate: P,
    observer: Arc<O>,
}

impl<F, P, O> ResponseFuture<F, P, O> {
    pub(crate) fn new(
        inner: F,
        request: RequestParts,
        config: BufferConfig,
        predicate: P,
        observer: Arc<O>,
    ) -> Self {
        Self {
            inner,
            request: Some(request),
            config,
            predicate,
            observer,
        }
    }
}

impl<F, P, O> fmt::Debug for ResponseFuture<F, P, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<F, P, O, B, E> Future for ResponseFuture<F, P, O>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    P: Predicate,
    O: BackpressureObserver,
{
    type Output = Result<Response<BackpressureBody<B, O>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let request = this
            .request
            .take()
            .expect("ResponseFuture polled after completion");
        if !(this.predicate.should_buffer(&response) && can_drop_frames(&response)) {
            return Poll::Ready(Ok(response.map(BackpressureBody::passthrough)));
        }
        // The pump is a tokio task; without a runtime, leave the body alone.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Poll::Ready(Ok(response.map(BackpressureBody::passthrough)));
        };
        let (mut parts, inner) = response.into_parts();
        // Frames may be dropped: the length is no longer known.
        parts.headers.remove(header::CONTENT_LENGTH);
        let client = ClientInfo::new(request.method, request.uri, request.peer);
        let buffer = ClientBuffer::with_weigher(*this.config, Remaining);
        let shared = Arc::new(Shared::new(buffer, client, this.observer.clone()));
        shared.emit(EventKind::Opened, shared.lock().buffer.stats());
        runtime.spawn(Pump::new(inner, shared.clone()));
        Poll::Ready(Ok(Response::from_parts(
            parts,
            BackpressureBody::buffered(shared),
        )))
    }
}
