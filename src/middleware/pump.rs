//! The pump: the task that drains a response's inner body into its client's
//! buffer as fast as the body yields frames (as tower's `buffer::worker`
//! drains its channel).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::Body;
use pin_project::pin_project;

use super::body::Shared;
use crate::BoxError;
use crate::buffer::Weigher;
use crate::client::{End, Produce, Pushed, Timer};
use crate::observer::BackpressureObserver;
use crate::policy::Classify;

/// How many frames the pump takes from the inner body in one poll before it
/// yields to the runtime (an inner body that is always ready must not starve
/// other tasks).
const PUMP_BUDGET: usize = 128;

/// The task that drains the inner body into the buffer.
///
/// It ends when the client's stream closes, or when the inner body has ended
/// and no timed eviction rule is left to watch over the frames that still
/// wait. The inner body is dropped as soon as it ends.
///
/// `Y` is the future of `tokio::task::yield_now` (`make` makes one), kept in
/// place: see `Pump::poll`.
#[pin_project(PinnedDrop)]
pub(crate) struct Pump<B: Body, O: BackpressureObserver, C, Y> {
    /// `None` once it has ended.
    #[pin]
    inner: Option<B>,
    shared: Arc<Shared<B::Data, O>>,
    classify: C,
    timer: Timer,
    /// A pending yield: see `Pump::poll`.
    #[pin]
    deferral: Option<Y>,
    make: fn() -> Y,
    finished: bool,
}

impl<B: Body, O: BackpressureObserver, C, Y> Pump<B, O, C, Y> {
    /// `make` is `tokio::task::yield_now` (a parameter, so that its future,
    /// whose type has no name, lives in the pump and not in a `Box` per
    /// yield).
    pub(crate) fn new(
        inner: B,
        shared: Arc<Shared<B::Data, O>>,
        classify: C,
        make: fn() -> Y,
    ) -> Self {
        Self {
            inner: Some(inner),
            shared,
            classify,
            timer: Timer::default(),
            deferral: None,
            make,
            finished: false,
        }
    }
}

impl<B, O, C, Y> Future for Pump<B, O, C, Y>
where
    B: Body,
    B::Data: Send + 'static,
    B::Error: Into<BoxError>,
    O: BackpressureObserver,
    C: Classify<B::Data>,
    Y: Future<Output = ()>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let shared = &**this.shared;
        if this.inner.is_some() {
            match shared.poll_produce(cx) {
                Produce::Closed => {
                    *this.finished = true;
                    return Poll::Ready(());
                }
                Produce::Paused => {}
                Produce::Ready { behind } => {
                    // A client that is behind (frames still wait for it)
                    // does not wait for what comes next: let the tasks of
                    // clients that do go first, and drain once the worker
                    // has run them. Stalled clients then add work, but not
                    // delay, to fast ones. `yield_now` defers the pump until
                    // the worker has run every task that is ready and those
                    // they wake (a waker that wakes its own task would only
                    // put it behind the tasks queued at the time).
                    if behind {
                        if this.deferral.is_none() {
                            this.deferral.set(Some((this.make)()));
                        }
                        let deferral = this.deferral.as_mut().as_pin_mut().expect("set");
                        if deferral.poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    this.deferral.set(None);
                    drain(this.inner.as_mut(), shared, this.classify, cx);
                }
            }
        } else if !shared.register_producer(cx) {
            *this.finished = true;
            return Poll::Ready(());
        }
        // Drops are reported at most once per interval: those that wait for
        // theirs need the pump back when it is over.
        let report_at = if this.inner.is_some() {
            shared.report_drops()
        } else {
            None
        };
        // Watch the timed eviction rules, also after the inner body ended,
        // for as long as frames wait.
        let rule_at = shared.check_timers();
        match rule_at.into_iter().chain(report_at).min() {
            Some(at) => this.timer.arm(at, cx),
            None if this.inner.is_none() || shared.is_closed() => {
                *this.finished = true;
                return Poll::Ready(());
            }
            None => {}
        }
        Poll::Pending
    }
}

/// Takes frames from the inner body until it is pending, has ended, the
/// producer must wait, or the budget of one poll is spent.
fn drain<B, O, C>(
    mut inner: Pin<&mut Option<B>>,
    shared: &Shared<B::Data, O>,
    classify: &C,
    cx: &mut Context<'_>,
) where
    B: Body,
    B::Data: Send + 'static,
    B::Error: Into<BoxError>,
    O: BackpressureObserver,
    C: Classify<B::Data>,
{
    for _ in 0..PUMP_BUDGET {
        let Some(body) = inner.as_mut().as_pin_mut() else {
            return;
        };
        let end = match body.poll_frame(cx) {
            Poll::Pending => return,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let class = classify.classify(&data);
                    let weight = crate::buffer::Remaining.weigh(&data);
                    match shared.push(data, class, weight) {
                        Pushed::Taken => continue,
                        Pushed::Paused | Pushed::Closed => return,
                    }
                }
                // Trailers are the last frame of a body.
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => End::Trailers(trailers),
                    Err(_) => continue,
                },
            },
            Poll::Ready(Some(Err(error))) => End::Error(error.into()),
            Poll::Ready(None) => End::Eof,
        };
        // The inner body has ended: drop it now, and let the end go after
        // the kept data.
        inner.set(None);
        shared.finish(end);
        return;
    }
    // Spent: come back after the other tasks had their turn.
    cx.waker().wake_by_ref();
}

#[pin_project::pinned_drop]
impl<B: Body, O: BackpressureObserver, C, Y> PinnedDrop for Pump<B, O, C, Y> {
    fn drop(self: Pin<&mut Self>) {
        if !self.finished {
            // Stopped before the end: the task panicked or its runtime shut
            // down.
            self.shared.producer_stopped();
        }
    }
}
