use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Response, header};
use http_body::Body;
use pin_project::pin_project;

use std::any::TypeId;

use super::body::{BackpressureBody, Shared, Windowed};
use super::pump::Pump;
use crate::BoxError;
use crate::budget::MemoryBudget;
use crate::buffer::{ClientBuffer, Remaining};
use crate::client::Reporter;
use crate::config::BufferConfig;
use crate::handle::HandleInner;
use crate::hub::{ClassifyFn, MakeWindow, Sweep, Tap};
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
        // A hub subscription: a window over the hub's log, no pump.
        if let Some(tap) = response.extensions().get::<Tap>() {
            if let Some(source) = tap.get::<B::Data>().cloned() {
                return Poll::Ready(Ok(windowed(response, source, wrap)));
            }
        }
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
        runtime.spawn(Pump::new(
            inner,
            shared.clone(),
            wrap.classify,
            tokio::task::yield_now,
        ));
        Poll::Ready(Ok(Response::from_parts(
            parts,
            BackpressureBody::buffered(shared, wrap.marker),
        )))
    }
}

/// Serves a hub subscription's client from a window over the hub's log.
fn windowed<B, P, O, M, C>(
    response: Response<B>,
    source: Arc<dyn MakeWindow<B::Data>>,
    wrap: Wrap<P, O, M, C>,
) -> Response<BackpressureBody<B, O, M>>
where
    B: Body,
    B::Data: Send + 'static,
    O: BackpressureObserver,
    C: Classify<B::Data>,
{
    let (mut parts, inner) = response.into_parts();
    // The subscription in the body reads nothing more: the window does.
    drop(inner);
    parts.extensions.remove::<Tap>();
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Err(e) = wrap.config.validate_for_hub() {
        return Response::from_parts(parts, BackpressureBody::refused(e.into()));
    }
    let classify: Option<ClassifyFn<B::Data>> = if TypeId::of::<C>() == TypeId::of::<()>() {
        // Every frame droppable: the window skips without looking.
        None
    } else {
        let c = wrap.classify;
        Some(Box::new(move |d: &B::Data| c.classify(d)))
    };
    let (window, sweeper) = source.window(wrap.config, classify);
    let client = Windowed::new(window, wrap.handle, wrap.observer, None, Reporter::Consumer);
    client.open();
    let sweep: Arc<dyn Sweep> = client.clone();
    sweeper.attach(Arc::downgrade(&sweep));
    Response::from_parts(parts, BackpressureBody::windowed(client, wrap.marker))
}
