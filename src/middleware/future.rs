use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Response, header};
use http_body::Body;
use pin_project::pin_project;

use super::body::{BackpressureBody, Shared};
use super::pump::Pump;
use crate::BoxError;
use crate::budget::MemoryBudget;
use crate::buffer::{ClientBuffer, Remaining};
use crate::client::Reporter;
use crate::config::BufferConfig;
use crate::handle::HandleInner;
use crate::observer::BackpressureObserver;
use crate::policy::{Classify, GapMarker};
use crate::predicate::{Predicate, can_drop_frames};

/// What wrapping a response needs, besides the response.
pub(crate) struct Wrap<P, O, M, C> {
    pub(crate) handle: Arc<HandleInner>,
    pub(crate) config: BufferConfig,
    pub(crate) predicate: P,
    pub(crate) observer: Arc<O>,
    pub(crate) marker: M,
    pub(crate) classify: C,
    pub(crate) budget: Option<MemoryBudget>,
}

/// Response future of [`Backpressure`](crate::Backpressure).
#[pin_project]
pub struct ResponseFuture<F, P, O, M = (), C = ()> {
    #[pin]
    inner: F,
    wrap: Option<Wrap<P, O, M, C>>,
}

impl<F, P, O, M, C> ResponseFuture<F, P, O, M, C> {
    pub(crate) fn new(inner: F, wrap: Wrap<P, O, M, C>) -> Self {
        Self {
            inner,
            wrap: Some(wrap),
        }
    }
}

impl<F, P, O, M, C> fmt::Debug for ResponseFuture<F, P, O, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, P, O, M, C, B, E> Future for ResponseFuture<F, P, O, M, C>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Send + 'static,
    B::Data: Send + 'static,
    B::Error: Into<BoxError>,
    P: Predicate,
    O: BackpressureObserver,
    M: GapMarker<B::Data>,
    C: Classify<B::Data>,
{
    type Output = Result<Response<BackpressureBody<B, O, M>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let wrap = this
            .wrap
            .take()
            .expect("ResponseFuture polled after completion");
        if !(wrap.predicate.should_buffer(&response) && can_drop_frames(&response)) {
            return Poll::Ready(Ok(response.map(BackpressureBody::passthrough)));
        }
        // The pump is a tokio task; without a runtime, leave the body alone.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Poll::Ready(Ok(response.map(BackpressureBody::passthrough)));
        };
        let (mut parts, inner) = response.into_parts();
        // Frames may be dropped: the length is no longer known.
        parts.headers.remove(header::CONTENT_LENGTH);
        let buffer = ClientBuffer::with_weigher(wrap.config, Remaining);
        let shared = Shared::new(
            buffer,
            wrap.handle,
            wrap.observer,
            wrap.budget,
            Reporter::Producer,
        );
        shared.open();
        runtime.spawn(Pump::new(inner, shared.clone(), wrap.classify));
        Poll::Ready(Ok(Response::from_parts(
            parts,
            BackpressureBody::buffered(shared, wrap.marker),
        )))
    }
}
