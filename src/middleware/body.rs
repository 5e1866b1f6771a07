use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use crate::BoxError;
use crate::buffer::{ClientBuffer, Remaining};
use crate::client::{Client, Next, Release, Storage, Timer};
use crate::error::{Evicted, PumpStopped};
use crate::keep_alive::Idle;
use crate::observer::{BackpressureObserver, CloseReason};
use crate::policy::{GapAction, GapMarker};

/// The client state of a buffered response: frames wait in a private ring.
pub(crate) type Shared<D, O> = Client<D, O, ClientBuffer<D, Remaining>>;

/// The client state of a hub subscription: frames wait in the hub's log,
/// behind the client's window.
pub(crate) type Windowed<D, O> = Client<D, O, Box<dyn Storage<D> + Send>>;

/// The response body of [`Backpressure`](crate::Backpressure).
///
/// Either the inner body untouched (the response was not selected, see
/// [`Predicate`](crate::Predicate)), or the consumer end of a client buffer
/// that a pump task fills from the inner body. In the second case data
/// frames come out oldest first and may have gaps (each announced by the
/// layer's [`GapMarker`], if any); trailers, an error and the end of the
/// stream come after every data frame kept before them and are never
/// dropped. The size hint is never exact.
///
/// Dropping it (hyper does when the client disconnects) stops the pump
/// within one wake-up and fires `Closed` with [`CloseReason::ClientGone`](crate::CloseReason::ClientGone) if
/// the stream had not ended.
#[pin_project]
pub struct BackpressureBody<B: Body, O: BackpressureObserver = (), M = ()> {
    #[pin]
    kind: Kind<B, O, M>,
}

#[pin_project(project = KindProj)]
enum Kind<B: Body, O: BackpressureObserver, M> {
    Passthrough {
        #[pin]
        inner: B,
    },
    Buffered {
        consumer: Consumer<B::Data, O, M>,
    },
    Windowed {
        consumer: Consumer<B::Data, O, M, Box<dyn Storage<B::Data> + Send>>,
        /// The response's body in wrappers that change no frame: it yields
        /// nothing of the hub's, but its wrappers may end it (or add a
        /// frame of their own).
        shadow: Option<Pin<Box<B>>>,
        /// The shadow ended the stream.
        ended: bool,
    },
    /// The layer cannot serve this response as asked: the error, once.
    Refused {
        error: Option<BoxError>,
    },
}

impl<B: Body, O: BackpressureObserver, M> BackpressureBody<B, O, M> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn buffered(shared: Arc<Shared<B::Data, O>>, marker: M, idle: Option<Idle>) -> Self {
        Self {
            kind: Kind::Buffered {
                consumer: Consumer {
                    shared,
                    marker,
                    pending: None,
                    timer: Timer::default(),
                    release: Release::default(),
                    idle,
                },
            },
        }
    }

    pub(crate) fn windowed(
        shared: Arc<Windowed<B::Data, O>>,
        shadow: Option<Pin<Box<B>>>,
        marker: M,
        idle: Option<Idle>,
    ) -> Self {
        Self {
            kind: Kind::Windowed {
                consumer: Consumer {
                    shared,
                    marker,
                    pending: None,
                    timer: Timer::default(),
                    release: Release::default(),
                    idle,
                },
                shadow,
                ended: false,
            },
        }
    }

    pub(crate) fn refused(error: BoxError) -> Self {
        Self {
            kind: Kind::Refused { error: Some(error) },
        }
    }

    /// Whether this body goes through a buffer (a ring of its own, or a
    /// window over a hub's log).
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. } | Kind::Windowed { .. })
    }
}

impl<B: Body, O: BackpressureObserver, M> fmt::Debug for BackpressureBody<B, O, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Buffered { .. } => "buffered",
            Kind::Windowed { .. } => "windowed",
            Kind::Refused { .. } => "refused",
        };
        f.debug_struct("BackpressureBody")
            .field("kind", &kind)
            .finish()
    }
}

impl<B, O, M> Body for BackpressureBody<B, O, M>
where
    B: Body,
    B::Data: 'static,
    B::Error: Into<BoxError>,
    O: BackpressureObserver,
    M: GapMarker<B::Data>,
{
    type Data = B::Data;
    type Error = BoxError;

    // Inlined so that a passthrough body costs a branch; the buffered path is
    // a call of its own.
    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner.poll_frame(cx).map_err(Into::into),
            KindProj::Buffered { consumer } => consumer.poll_frame(cx),
            KindProj::Windowed {
                consumer,
                shadow,
                ended,
            } => {
                if *ended {
                    return Poll::Ready(None);
                }
                if let Some(frame) = poll_shadow(shadow, consumer, cx) {
                    *ended = !matches!(&frame, Some(Ok(f)) if f.is_data());
                    return Poll::Ready(frame);
                }
                consumer.poll_frame(cx)
            }
            KindProj::Refused { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Buffered { consumer } => consumer.is_end_stream(),
            Kind::Windowed {
                consumer, ended, ..
            } => *ended || consumer.is_end_stream(),
            Kind::Refused { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            // Frames may be dropped: nothing exact can be promised.
            Kind::Buffered { .. } | Kind::Windowed { .. } | Kind::Refused { .. } => {
                SizeHint::default()
            }
        }
    }
}

/// Polls a windowed client's shadow body: `Some` if it ended (the client's
/// stream closes as completed, or with its error) or added a frame.
#[allow(clippy::type_complexity)]
fn poll_shadow<B, O, M>(
    shadow: &mut Option<Pin<Box<B>>>,
    consumer: &mut Consumer<B::Data, O, M, Box<dyn Storage<B::Data> + Send>>,
    cx: &mut Context<'_>,
) -> Option<Option<Result<Frame<B::Data>, BoxError>>>
where
    B: Body,
    B::Error: Into<BoxError>,
    O: BackpressureObserver,
{
    let body = shadow.as_mut()?;
    let frame = match body.as_mut().poll_frame(cx) {
        Poll::Pending => return None,
        Poll::Ready(frame) => frame,
    };
    let reason = match &frame {
        Some(Ok(f)) if f.is_data() => return Some(frame.map(|f| f.map_err(Into::into))),
        Some(Err(_)) => CloseReason::InnerError,
        _ => CloseReason::Completed,
    };
    *shadow = None;
    consumer.shared.close(reason);
    Some(frame.map(|f| f.map_err(Into::into)))
}

/// The end hyper polls: takes frames from the front of the buffer.
struct Consumer<D, O: BackpressureObserver, M, S: Storage<D> = ClientBuffer<D, Remaining>> {
    shared: Arc<Client<D, O, S>>,
    marker: M,
    /// A frame held back while its gap marker goes out first.
    pending: Option<D>,
    /// `Flush::Interval`: the wait for the next release.
    timer: Timer,
    release: Release,
    /// SSE keep-alive: a comment once the stream has been quiet for long.
    idle: Option<Idle>,
}

impl<D, O, M, S> Consumer<D, O, M, S>
where
    D: 'static,
    O: BackpressureObserver,
    M: GapMarker<D>,
    S: Storage<D>,
{
    #[inline(never)]
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<D>, BoxError>>> {
        let polled = self.poll_next(cx);
        let Some(idle) = &mut self.idle else {
            return polled;
        };
        match polled {
            // Not an event: nothing of the client's state sees it.
            Poll::Pending => idle
                .poll_quiet(cx)
                .map(|comment| Some(Ok(Frame::data(comment)))),
            ready => {
                idle.busy();
                ready
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<D>, BoxError>>> {
        if let Some(data) = self.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            let (data, gap) = match self.shared.poll_next(cx, &mut self.release, true) {
                Next::Data(data, gap) => (Some(data), gap),
                Next::TrailingGap(gap) => (None, gap),
                Next::Trailers(trailers) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Next::Error(error) => return Poll::Ready(Some(Err(error))),
                Next::Evicted(reason) => {
                    return Poll::Ready(Some(Err(Evicted::new(reason).into())));
                }
                Next::Stopped => return Poll::Ready(Some(Err(PumpStopped::new().into()))),
                Next::End | Next::Closed => return Poll::Ready(None),
                Next::Wait(None) => return Poll::Pending,
                Next::Wait(Some(release)) => {
                    if self.timer.poll_until(release, cx).is_pending() {
                        return Poll::Pending;
                    }
                    continue;
                }
            };
            if gap.is_empty() {
                if let Some(data) = data {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                continue;
            }
            return match self.shared.on_gap(&self.marker, gap) {
                GapAction::Skip => match data {
                    Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    // Lost after the last frame: nothing to say; the end
                    // comes next.
                    None => continue,
                },
                GapAction::Insert(marker) => {
                    self.pending = data;
                    Poll::Ready(Some(Ok(Frame::data(marker))))
                }
                GapAction::End(trailers) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.shared.is_done()
    }
}

impl<D, O: BackpressureObserver, M, S: Storage<D>> Drop for Consumer<D, O, M, S> {
    fn drop(&mut self) {
        // hyper drops a body that says `is_end_stream` without polling it
        // again: that is a completed stream, not a client gone.
        self.shared.consumer_dropped(self.pending.is_none());
    }
}
