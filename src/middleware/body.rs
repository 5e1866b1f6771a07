use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::shared::Shared;
use crate::BoxError;
use crate::observer::{BackpressureObserver, CloseReason};

/// How many frames the pump takes from the inner body in one poll before it
/// yields to the runtime (an inner body that is always ready must not starve
/// other tasks).
const PUMP_BUDGET: usize = 128;

/// The response body of [`Backpressure`](crate::Backpressure).
///
/// Either the inner body untouched (the response was not selected, see
/// [`Predicate`](crate::Predicate)), or the consumer end of a client buffer
/// that a pump task fills from the inner body. In the second case data
/// frames come out oldest first and may have gaps; trailers, an error and
/// the end of the stream come after every data frame kept before them and
/// are never dropped. The size hint is never exact.
///
/// Dropping it (hyper does when the client disconnects) stops the pump
/// within one wake-up and fires `Closed` with
/// [`CloseReason::ClientGone`] if the stream had not ended.
#[pin_project]
pub struct BackpressureBody<B: Body, O: BackpressureObserver = ()> {
    #[pin]
    kind: Kind<B, O>,
}

#[pin_project(project = KindProj)]
enum Kind<B: Body, O: BackpressureObserver> {
    Passthrough {
        #[pin]
        inner: B,
    },
    Buffered {
        consumer: Consumer<B::Data, O>,
    },
}

impl<B: Body, O: BackpressureObserver> BackpressureBody<B, O> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn buffered(shared: Arc<Shared<B::Data, O>>) -> Self {
        Self {
            kind: Kind::Buffered {
                consumer: Consumer { shared },
            },
        }
    }

    /// Whether this body goes through a buffer.
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }
}

impl<B: Body, O: BackpressureObserver> fmt::Debug for BackpressureBody<B, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Buffered { .. } => "buffered",
        };
        f.debug_struct("BackpressureBody")
            .field("kind", &kind)
            .finish()
    }
}

impl<B, O> Body for BackpressureBody<B, O>
where
    B: Body,
    B::Error: Into<BoxError>,
    O: BackpressureObserver,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner.poll_frame(cx).map_err(Into::into),
            KindProj::Buffered { consumer } => consumer.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Buffered { consumer } => consumer.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            // Frames may be dropped: nothing exact can be promised.
            Kind::Buffered { .. } => SizeHint::default(),
        }
    }
}

/// The end hyper polls: takes frames from the front of the buffer.
struct Consumer<D, O: BackpressureObserver> {
    shared: Arc<Shared<D, O>>,
}

impl<D, O: BackpressureObserver> Consumer<D, O> {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<D>, BoxError>>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if let Some(data) = st.buffer.pop() {
            shared.after_pop(&mut st);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = st.trailers.take() {
            shared.close(&mut st, CloseReason::Completed);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if let Some(error) = st.error.take() {
            shared.close(&mut st, CloseReason::InnerError);
            return Poll::Ready(Some(Err(error)));
        }
        if st.end || st.closed {
            shared.close(&mut st, CloseReason::Completed);
            return Poll::Ready(None);
        }
        if st.pump_stopped {
            shared.close(&mut st, CloseReason::InnerError);
            return Poll::Ready(Some(Err(crate::PumpStopped::new().into())));
        }
        match &st.consumer_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.consumer_waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let st = self.shared.lock();
        st.closed || (st.end && st.buffer.is_empty() && st.trailers.is_none() && st.error.is_none())
    }
}

impl<D, O: BackpressureObserver> Drop for Consumer<D, O> {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.shared.lock();
            // hyper drops a body that says `is_end_stream` without polling
            // it again: that is a completed stream, not a client gone.
            let reason = if st.at_end() {
                CloseReason::Completed
            } else {
                CloseReason::ClientGone
            };
            self.shared.close(&mut st, reason);
            st.pump_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The task that drains the inner body into the buffer as fast as it yields
/// frames.
#[pin_project(PinnedDrop)]
pub(crate) struct Pump<B: Body, O: BackpressureObserver> {
    #[pin]
    inner: B,
    shared: Arc<Shared<B::Data, O>>,
    finished: bool,
}

impl<B: Body, O: BackpressureObserver> Pump<B, O> {
    pub(crate) fn new(inner: B, shared: Arc<Shared<B::Data, O>>) -> Self {
        Self {
            inner,
            shared,
            finished: false,
        }
    }
}

impl<B, O> Future for Pump<B, O>
where
    B: Body,
    B::Error: Into<BoxError>,
    O: BackpressureObserver,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let shared = &**this.shared;
        {
            let mut st = shared.lock();
            if st.closed {
                *this.finished = true;
                return Poll::Ready(());
            }
            match &st.pump_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.pump_waker = Some(cx.waker().clone()),
            }
        }
        let mut budget = PUMP_BUDGET;
        let result = loop {
            let frame = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            let mut st = shared.lock();
            if st.closed {
                *this.finished = true;
                return Poll::Ready(());
            }
            let ended = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let evicted = st.buffer.push(data);
                        shared.after_push(&mut st, evicted);
                        false
                    }
                    Err(frame) => {
                        // Trailers are the last frame of a body.
                        st.trailers = frame.into_trailers().ok();
                        true
                    }
                },
                Some(Err(error)) => {
                    st.error = Some(error.into());
                    true
                }
                None => true,
            };
            if ended {
                st.end = true;
                shared.report_drops(&mut st);
            }
            let waker = st.consumer_waker.take();
            drop(st);
            if let Some(w) = waker {
                w.wake();
            }
            if ended {
                *this.finished = true;
                return Poll::Ready(());
            }
            budget -= 1;
            if budget == 0 {
                cx.waker().wake_by_ref();
                break Poll::Pending;
            }
        };
        let mut st = shared.lock();
        shared.report_drops(&mut st);
        result
    }
}

#[pin_project::pinned_drop]
impl<B: Body, O: BackpressureObserver> PinnedDrop for Pump<B, O> {
    fn drop(self: Pin<&mut Self>) {
        if self.finished {
            return;
        }
        // Stopped before the end: the task panicked or its runtime shut down.
        let waker = {
            let mut st = self.shared.lock();
            st.pump_stopped = true;
            st.consumer_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}
