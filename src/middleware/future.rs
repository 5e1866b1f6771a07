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
use crate::buffer::{ClientBuffer, Remaining, Weigher};
use crate::client::{End, Reporter};
use crate::config::BufferConfig;
use crate::handle::HandleInner;
use crate::hub::{Claimed, MakeWindow, Tap, is_probe, probe, window_client};
use crate::keep_alive::{Idle, StreamOptions, no_proxy_buffering};
use crate::observer::BackpressureObserver;
use crate::policy::{Classify, GapMarker};
use crate::predicate::{Predicate, can_drop_frames};

/// What wrapping a response needs, besides the response.
pub(crate) struct Wrap<P, O, M, C> {
    pub(crate) handle: Arc<HandleInner>,
    pub(crate) config: Arc<BufferConfig>,
    pub(crate) predicate: P,
    pub(crate) observer: Arc<O>,
    pub(crate) marker: M,
    pub(crate) classify: C,
    pub(crate) budget: Option<MemoryBudget>,
    pub(crate) stream: StreamOptions,
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
        // A hub's response: how to make the client's window, and the
        // claim on the hub's body. Taken out whatever the path: nothing
        // after the layer may serve the hub's frames in place of the body.
        let mut response = response;
        if wrap.stream.no_proxy_buffering {
            no_proxy_buffering(response.headers_mut());
        }
        let tap = response.extensions_mut().remove::<Tap>();
        let claim = response.extensions_mut().remove::<Claimed>();
        if !(wrap.predicate.should_buffer(&response) && can_drop_frames(&response)) {
            return Poll::Ready(Ok(response.map(BackpressureBody::passthrough)));
        }
        // The pump is a tokio task; without a runtime, leave the body alone.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Poll::Ready(Ok(response.map(BackpressureBody::passthrough)));
        };
        let source = tap.as_ref().and_then(|tap| tap.get::<B::Data>().cloned());
        let (Some(source), Some(Claimed(claim))) = (source, &claim) else {
            if let Some(Claimed(claim)) = claim {
                claim.layered();
            }
            return Poll::Ready(Ok(buffered(response, None, &runtime, wrap)));
        };
        let (parts, inner) = response.into_parts();
        // The hub's body itself: the window replaces it.
        if claim.is_body::<B>() {
            drop(inner);
            return Poll::Ready(Ok(windowed(parts, None, source, wrap)));
        }
        if probe::<B::Data>().is_none() {
            claim.layered();
            let response = Response::from_parts(parts, inner);
            return Poll::Ready(Ok(buffered(response, None, &runtime, wrap)));
        }
        // A body in wrappers: the window replaces it only if they change no
        // frame (a box, an error map, an end on a signal): the body's token
        // must come out of them as it went in. The body stays, read by the
        // window only for its end (its wrappers may end it).
        let mut inner = Box::pin(inner);
        claim.arm();
        let polled = inner.as_mut().poll_frame(cx);
        let probed = claim.probed();
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if probed && frame.data_ref().is_some_and(is_probe) {
                claim.shadow();
                return Poll::Ready(Ok(windowed(parts, Some(inner), source, wrap)));
            }
        }
        // Changed on the way: the body is served as it was made (its
        // keep-alive is the layer's).
        claim.layered();
        let early = match polled {
            // What the wrappers made of the token: not for the client.
            Poll::Ready(Some(Ok(frame))) if probed && frame.is_data() => None,
            Poll::Pending => None,
            Poll::Ready(other) => Some(other),
        };
        let response = Response::from_parts(parts, inner);
        Poll::Ready(Ok(buffered(response, early, &runtime, wrap)))
    }
}

/// What the layer took from a body before it chose the path: a frame (or
/// the end) that goes first.
type Early<I> = Option<Option<Result<http_body::Frame<<I as Body>::Data>, <I as Body>::Error>>>;

/// Serves `response` from a ring of the client's own, filled by a pump.
fn buffered<B, I, P, O, M, C>(
    response: Response<I>,
    early: Early<I>,
    runtime: &tokio::runtime::Handle,
    wrap: Wrap<P, O, M, C>,
) -> Response<BackpressureBody<B, O, M>>
where
    B: Body<Data = I::Data>,
    I: Body + Send + 'static,
    I::Data: Send + 'static,
    I::Error: Into<BoxError>,
    O: BackpressureObserver,
    C: Classify<I::Data>,
{
    let (mut parts, inner) = response.into_parts();
    // Frames may be dropped: the length is no longer known.
    parts.headers.remove(header::CONTENT_LENGTH);
    let idle = Idle::for_response::<I::Data>(wrap.stream.keep_alive.as_ref(), &parts.headers);
    let buffer = ClientBuffer::with_shared_config(wrap.config.clone(), Remaining);
    let connection = wrap.handle.connection().cloned();
    let shared = Shared::new(
        buffer,
        wrap.config,
        wrap.handle,
        wrap.observer,
        wrap.budget,
        Reporter::Producer,
    );
    shared.open();
    if let Some(shutdown) = &wrap.stream.shutdown {
        crate::shutdown::register(shutdown, &shared, &parts.headers, connection);
    }
    let end = match early {
        None => None,
        Some(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) => {
                let class = wrap.classify.classify(&data);
                let weight = Remaining.weigh(&data);
                let _ = shared.push(data, class, weight);
                None
            }
            Err(frame) => frame.into_trailers().ok().map(End::Trailers),
        },
        Some(Some(Err(error))) => Some(End::Error(error.into())),
        Some(None) => Some(End::Eof),
    };
    match end {
        // The body has ended: nothing to pump.
        Some(end) => shared.finish(end),
        None => {
            runtime.spawn(Pump::new(
                inner,
                shared.clone(),
                wrap.classify,
                tokio::task::yield_now,
            ));
        }
    }
    Response::from_parts(parts, BackpressureBody::buffered(shared, wrap.marker, idle))
}

/// Serves a hub subscription's client from a window over the hub's log;
/// `shadow`, if any, is the response's body in wrappers, polled only for
/// its end.
fn windowed<B, P, O, M, C>(
    mut parts: http::response::Parts,
    shadow: Option<Pin<Box<B>>>,
    source: Arc<dyn MakeWindow<B::Data>>,
    wrap: Wrap<P, O, M, C>,
) -> Response<BackpressureBody<B, O, M>>
where
    B: Body,
    B::Data: Send + 'static,
    O: BackpressureObserver,
    C: Classify<B::Data>,
{
    parts.headers.remove(header::CONTENT_LENGTH);
    let idle = Idle::for_response::<B::Data>(wrap.stream.keep_alive.as_ref(), &parts.headers);
    let connection = wrap.handle.connection().cloned();
    let client = match window_client(
        &*source,
        wrap.config,
        wrap.classify,
        wrap.handle,
        wrap.observer,
    ) {
        Ok(client) => client,
        Err(e) => return Response::from_parts(parts, BackpressureBody::refused(e.into())),
    };
    if let Some(shutdown) = &wrap.stream.shutdown {
        crate::shutdown::register(shutdown, &client, &parts.headers, connection);
    }
    Response::from_parts(
        parts,
        BackpressureBody::windowed(client, shadow, wrap.marker, idle),
    )
}
