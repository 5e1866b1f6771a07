use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;
use tokio::time::{Instant, Sleep};

use super::shared::{Shared, State, wake};
use crate::BoxError;
use crate::config::{Flush, Overflow};
use crate::error::Evicted;
use crate::handle::now;
use crate::observer::{BackpressureObserver, CloseReason, EvictReason};
use crate::policy::{Classify, GapAction, GapMarker};

/// How many frames the pump takes from the inner body in one poll before it
/// yields to the runtime (an inner body that is always ready must not starve
/// other tasks).
const PUMP_BUDGET: usize = 128;

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
/// within one wake-up and fires `Closed` with [`CloseReason::ClientGone`] if
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
}

impl<B: Body, O: BackpressureObserver, M> BackpressureBody<B, O, M> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn buffered(shared: Arc<Shared<B::Data, O>>, marker: M) -> Self {
        Self {
            kind: Kind::Buffered {
                consumer: Consumer {
                    shared,
                    marker,
                    pending: None,
                    timer: None,
                    release_left: 0,
                    next_release: None,
                },
            },
        }
    }

    /// Whether this body goes through a buffer.
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }
}

impl<B: Body, O: BackpressureObserver, M> fmt::Debug for BackpressureBody<B, O, M> {
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
struct Consumer<D, O: BackpressureObserver, M> {
    shared: Arc<Shared<D, O>>,
    marker: M,
    /// A frame held back while its gap marker goes out first.
    pending: Option<D>,
    /// `Flush::Interval`: the wait for the next release.
    timer: Option<Pin<Box<Sleep>>>,
    /// `Flush::Interval`: frames that may still go out in this release.
    release_left: usize,
    next_release: Option<Instant>,
}

impl<D, O, M> Consumer<D, O, M>
where
    D: Buf + 'static,
    O: BackpressureObserver,
    M: GapMarker<D>,
{
    #[inline(never)]
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<D>, BoxError>>> {
        if let Some(data) = self.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let shared = &*self.shared;
        let mut st = shared.lock();
        if let Some(reason) = st.evicted.take() {
            shared.refresh_done(&st);
            return Poll::Ready(Some(Err(Evicted::new(reason).into())));
        }
        if st.closed {
            return Poll::Ready(None);
        }
        if !st.buffer.is_empty() {
            let (max_frames, max_bytes) = match shared.config.flush() {
                Flush::Immediate => (1, 0),
                Flush::Coalesce {
                    max_frames,
                    max_bytes,
                } => (max_frames, max_bytes),
                Flush::Interval {
                    period,
                    max_frames,
                    max_bytes,
                } => {
                    if self.release_left == 0 {
                        let t = now();
                        if let Some(at) = self.next_release.filter(|at| t < *at) {
                            // Only the timer wakes it: new frames wait for the
                            // release anyway (an eviction is seen then too).
                            if poll_until(&mut self.timer, at, cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                        self.release_left = st.buffer.len();
                        self.next_release = Some(now() + period);
                    }
                    (max_frames.min(self.release_left), max_bytes)
                }
            };
            let (first, gap) = st.buffer.pop_with_gap().expect("not empty");
            let mut taken = 1;
            let data = if max_frames > 1 {
                coalesce(first, &mut st, max_frames, max_bytes, &mut taken)
            } else {
                first
            };
            self.release_left = self.release_left.saturating_sub(taken);
            let pump = shared.after_pop(&mut st);
            let out = if gap.is_empty() {
                Poll::Ready(Some(Ok(Frame::data(data))))
            } else {
                match self.marker.on_gap(gap) {
                    GapAction::Skip => Poll::Ready(Some(Ok(Frame::data(data)))),
                    GapAction::Insert(marker) => {
                        self.pending = Some(data);
                        Poll::Ready(Some(Ok(Frame::data(marker))))
                    }
                    GapAction::End(trailers) => {
                        shared.close(&mut st, CloseReason::Evicted(EvictReason::DataLoss));
                        let pump = st.pump_waker.take();
                        drop(st);
                        wake(pump);
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                }
            };
            drop(st);
            wake(pump);
            return out;
        }
        if st.end && !st.buffer.trailing_gap().is_empty() {
            // Frames were lost after the last one delivered: say so before
            // the end.
            let gap = st.buffer.take_trailing_gap();
            match self.marker.on_gap(gap) {
                GapAction::Skip => {}
                GapAction::Insert(marker) => return Poll::Ready(Some(Ok(Frame::data(marker)))),
                GapAction::End(trailers) => {
                    shared.close(&mut st, CloseReason::Evicted(EvictReason::DataLoss));
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
        }
        if let Some(trailers) = st.trailers.take() {
            shared.close(&mut st, CloseReason::Completed);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if let Some(error) = st.error.take() {
            shared.close(&mut st, CloseReason::InnerError);
            return Poll::Ready(Some(Err(error)));
        }
        if st.end {
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
        self.pending.is_none() && self.shared.is_done()
    }
}

/// Joins the frames waiting after `first` into one, up to the limits and
/// never across a gap, when the data is `Bytes`; any other data type goes
/// out frame by frame.
fn coalesce<D: Buf + 'static>(
    first: D,
    st: &mut State<D>,
    max_frames: usize,
    max_bytes: usize,
    taken: &mut usize,
) -> D {
    let fits = |st: &State<D>, len: usize| {
        st.buffer
            .peek()
            .is_some_and(|(_, w, gap)| gap.is_empty() && len + w <= max_bytes)
    };
    let Some(head) = (&first as &dyn Any).downcast_ref::<Bytes>() else {
        return first;
    };
    if !fits(st, head.len()) {
        return first;
    }
    let mut joined = BytesMut::with_capacity(max_bytes.min(64 * 1024));
    joined.extend_from_slice(head);
    while *taken < max_frames && fits(st, joined.len()) {
        let (next, _) = st.buffer.pop_with_gap().expect("peeked");
        if let Some(b) = (&next as &dyn Any).downcast_ref::<Bytes>() {
            joined.extend_from_slice(b);
        }
        *taken += 1;
    }
    let mut out: Option<D> = None;
    if let Some(slot) = (&mut out as &mut dyn Any).downcast_mut::<Option<Bytes>>() {
        *slot = Some(joined.freeze());
    }
    out.expect("D is Bytes")
}

impl<D, O: BackpressureObserver, M> Drop for Consumer<D, O, M> {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.shared.lock();
            // hyper drops a body that says `is_end_stream` without polling
            // it again: that is a completed stream, not a client gone.
            let reason = if st.at_end() && self.pending.is_none() {
                CloseReason::Completed
            } else {
                CloseReason::ClientGone
            };
            self.shared.close(&mut st, reason);
            st.pump_waker.take()
        };
        wake(waker);
    }
}

/// The task that drains the inner body into the buffer as fast as it yields
/// frames.
#[pin_project(PinnedDrop)]
pub(crate) struct Pump<B: Body, O: BackpressureObserver, C> {
    #[pin]
    inner: B,
    shared: Arc<Shared<B::Data, O>>,
    classify: C,
    timer: Option<Pin<Box<Sleep>>>,
    /// A pending `yield_now`: see `Pump::poll`.
    deferral: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    finished: bool,
}

impl<B: Body, O: BackpressureObserver, C> Pump<B, O, C> {
    pub(crate) fn new(inner: B, shared: Arc<Shared<B::Data, O>>, classify: C) -> Self {
        Self {
            inner,
            shared,
            classify,
            timer: None,
            deferral: None,
            finished: false,
        }
    }
}

impl<B, O, C> Future for Pump<B, O, C>
where
    B: Body,
    B::Data: Send,
    B::Error: Into<BoxError>,
    O: BackpressureObserver,
    C: Classify<B::Data>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let shared = &**this.shared;
        let overflow = shared.config.overflow();
        let mut paused;
        let behind;
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
            if let Some(reason) = shared.timed_out(&st, now()) {
                let consumer = shared.evict(&mut st, reason);
                drop(st);
                wake(consumer);
                *this.finished = true;
                return Poll::Ready(());
            }
            if overflow == Overflow::Pause && st.buffer.is_full() {
                st.pump_paused = true;
            }
            paused = st.pump_paused;
            behind = !st.buffer.is_empty();
        }
        // A client that is behind (frames still wait for it) does not wait
        // for what comes next: let the tasks of clients that do go first,
        // and drain once the worker has run them. Stalled clients then add
        // work, but not delay, to fast ones.
        if behind && !paused {
            let deferral = this
                .deferral
                .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            if deferral.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        *this.deferral = None;
        let mut budget = PUMP_BUDGET;
        while !paused {
            let frame = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(frame) => frame,
            };
            let data = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => Some(data),
                    Err(frame) => {
                        // Trailers are the last frame of a body.
                        let mut st = shared.lock();
                        st.trailers = frame.into_trailers().ok();
                        return finish(this.finished, shared, st);
                    }
                },
                Some(Err(error)) => {
                    let mut st = shared.lock();
                    st.error = Some(error.into());
                    return finish(this.finished, shared, st);
                }
                None => None,
            };
            let Some(data) = data else {
                let st = shared.lock();
                return finish(this.finished, shared, st);
            };
            let class = shared.effective_class(this.classify.classify(&data));
            let weight = data.remaining();
            let reserved = shared.reserve(class, weight);
            let mut st = shared.lock();
            if st.closed {
                shared.settle_budget(&st, reserved.unwrap_or(0));
                *this.finished = true;
                return Poll::Ready(());
            }
            let evict = match shared.admit(&mut st, data, class, weight, reserved) {
                Ok((was_empty, dropped)) => shared.after_push(&mut st, was_empty, dropped),
                Err(reason) => Some(reason),
            };
            if let Some(reason) = evict {
                let consumer = shared.evict(&mut st, reason);
                drop(st);
                wake(consumer);
                *this.finished = true;
                return Poll::Ready(());
            }
            if overflow == Overflow::Pause && st.buffer.is_full() {
                st.pump_paused = true;
                paused = true;
            }
            let consumer = st.consumer_waker.take();
            drop(st);
            wake(consumer);
            budget -= 1;
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
        }
        let mut st = shared.lock();
        shared.report_drops(&mut st);
        // Wake up for the next time-based eviction rule.
        if let Some(at) = shared.next_deadline(&st) {
            drop(st);
            if poll_until(this.timer, at, cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}

/// Polls a reusable timer set to `deadline`.
fn poll_until(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if timer.deadline() != deadline {
        timer.as_mut().reset(deadline);
    }
    timer.as_mut().poll(cx)
}

/// The inner body has ended: the end goes after the kept data.
fn finish<D, O: BackpressureObserver>(
    finished: &mut bool,
    shared: &Shared<D, O>,
    mut st: std::sync::MutexGuard<'_, State<D>>,
) -> Poll<()> {
    st.end = true;
    shared.report_drops(&mut st);
    shared.refresh_done(&st);
    let consumer = st.consumer_waker.take();
    drop(st);
    wake(consumer);
    *finished = true;
    Poll::Ready(())
}

#[pin_project::pinned_drop]
impl<B: Body, O: BackpressureObserver, C> PinnedDrop for Pump<B, O, C> {
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
        wake(waker);
    }
}
