//! The drain task: takes messages from a sink's buffer at the client's pace
//! and sends them into the real sink.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures_sink::Sink;
use tokio::time::Instant;

use super::Core;
use crate::BoxError;
use crate::buffer::ClientBuffer;
use crate::buffer::Weigher;
use crate::client::{Next, Release, Storage, Timer, after, now};
use crate::observer::{BackpressureObserver, CloseReason, EvictReason};
use crate::policy::{Classify, GapAction, GapMarker};

pub(super) struct Drain<T, S, O: BackpressureObserver, W, C, M, St: Storage<T> = ClientBuffer<T, W>>
{
    core: Arc<Core<T, O, W, C, St>>,
    /// `None` once given up or closed.
    sink: Option<Pin<Box<S>>>,
    marker: M,
    /// A message taken from the buffer that waits for the real sink: the
    /// message after its gap marker, or a marker before the end.
    pending: Option<T>,
    /// Messages and bytes sent since the last flush.
    unflushed: (usize, usize),
    /// Flush after this many messages or bytes.
    limits: (usize, usize),
    release: Release,
    /// `Flush::Interval`: the next release, while messages wait for it.
    release_at: Option<Instant>,
    /// The next moment a timed eviction rule could fire.
    rule_at: Option<Instant>,
    /// When drops that wait for their report are due.
    report_at: Option<Instant>,
    /// Set once the real sink is being closed.
    close_deadline: Option<Instant>,
    /// Everything was delivered: flush, then close the real sink.
    finishing: bool,
    /// `Closed` has fired; the real sink is being closed.
    closing: bool,
    timer: Timer,
    finished: bool,
}

// Nothing is pinned structurally: the real sink is boxed.
impl<T, S, O: BackpressureObserver, W, C, M, St: Storage<T>> Unpin for Drain<T, S, O, W, C, M, St> {}

impl<T, S, O, W, C, M, St> Drain<T, S, O, W, C, M, St>
where
    St: Storage<T> + Send + 'static,
    T: Send + 'static,
    S: Sink<T>,
    S::Error: Into<BoxError>,
    O: BackpressureObserver,
    W: Weigher<T> + Send + Sync + 'static,
    C: Classify<T>,
    M: GapMarker<T>,
{
    pub(super) fn new(core: Arc<Core<T, O, W, C, St>>, sink: S, marker: M) -> Self {
        let limits = core
            .client
            .config()
            .sink_flush()
            .limits()
            .unwrap_or((1, usize::MAX));
        Self {
            core,
            sink: Some(Box::pin(sink)),
            marker,
            pending: None,
            unflushed: (0, 0),
            limits,
            release: Release::default(),
            release_at: None,
            rule_at: None,
            report_at: None,
            close_deadline: None,
            finishing: false,
            closing: false,
            timer: Timer::default(),
            finished: false,
        }
    }

    fn run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let core = self.core.clone();
        let client = &*core.client;
        loop {
            if self.closing {
                return self.poll_close_sink(cx);
            }
            if self.sink.is_none() {
                return Poll::Ready(());
            }
            if self.finishing {
                if self.unflushed.0 > 0 {
                    if let Some(out) = self.flush(cx) {
                        return out;
                    }
                }
                self.start_closing();
                continue;
            }
            self.rule_at = client.check_timers();
            if self.core.deadline.get().is_some_and(|at| now() >= *at) {
                // The client took nothing more in time: give up on it.
                client.close(CloseReason::Evicted(EvictReason::Stalled));
            }
            // One look under the lock: the drain reports drops (batched,
            // once per run), and leaves its waker, so that closes,
            // evictions and drops to report wake it while it waits for the
            // real sink.
            let (closed, report_at) = client.drain_look(cx);
            self.report_at = report_at;
            if closed {
                if self.core.abandoned.load(Ordering::Acquire) {
                    self.start_closing();
                    continue;
                }
                // Evicted or given up on: drop the real sink.
                return self.stop(None);
            }
            if self.unflushed.0 >= self.limits.0 || self.unflushed.1 >= self.limits.1 {
                if let Some(out) = self.flush(cx) {
                    return out;
                }
                continue;
            }
            // Take a message only when the client can take it: until then
            // it waits (and may be dropped) in the buffer.
            match self.sink().poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return self.stop(Some(e.into())),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(item) = self.pending.take() {
                if let Err(e) = self.send(item) {
                    return self.stop(Some(e));
                }
                continue;
            }
            self.release_at = None;
            match client.poll_next(cx, &mut self.release, false) {
                Next::Data(item, gap) => {
                    let item = if gap.is_empty() {
                        item
                    } else {
                        match client.on_gap(&self.marker, gap) {
                            GapAction::Skip => item,
                            GapAction::Insert(marker) => {
                                self.pending = Some(item);
                                marker
                            }
                            GapAction::End(_) => {
                                self.start_closing();
                                continue;
                            }
                        }
                    };
                    if let Err(e) = self.send(item) {
                        return self.stop(Some(e));
                    }
                }
                Next::TrailingGap(gap) => match client.on_gap(&self.marker, gap) {
                    GapAction::Skip => {}
                    GapAction::Insert(marker) => self.pending = Some(marker),
                    GapAction::End(_) => self.start_closing(),
                },
                Next::Wait(release) => {
                    self.release_at = release;
                    if self.unflushed.0 > 0 {
                        if let Some(out) = self.flush(cx) {
                            return out;
                        }
                        continue;
                    }
                    return Poll::Pending;
                }
                // Everything was delivered: flush, then close the real sink.
                Next::End | Next::Trailers(_) => self.finishing = true,
                Next::Closed if self.core.abandoned.load(Ordering::Acquire) => self.start_closing(),
                Next::Closed | Next::Evicted(_) | Next::Error(_) | Next::Stopped => {
                    return self.stop(None);
                }
            }
        }
    }

    /// Flushes the real sink: `None` once flushed, else what `run` returns
    /// (pending, or the end of the task if the sink failed).
    fn flush(&mut self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        match self.sink().poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.unflushed = (0, 0);
                None
            }
            Poll::Ready(Err(e)) => Some(self.stop(Some(e.into()))),
            Poll::Pending => Some(Poll::Pending),
        }
    }

    /// The real sink; only called while it is there.
    fn sink(&mut self) -> Pin<&mut S> {
        self.sink
            .as_mut()
            .expect("the real sink is kept until the end")
            .as_mut()
    }

    /// Hands `item` to the real sink (after its `poll_ready`).
    fn send(&mut self, item: T) -> Result<(), BoxError> {
        let weight = self.core.weigher.weigh(&item);
        self.sink().start_send(item).map_err(Into::into)?;
        self.unflushed.0 += 1;
        self.unflushed.1 = self.unflushed.1.saturating_add(weight);
        Ok(())
    }

    /// Closes the real sink politely (it flushes first), within the close
    /// deadline; nothing more is delivered.
    fn start_closing(&mut self) {
        self.pending = None;
        self.closing = true;
        let deadline = match self.core.deadline.get() {
            Some(at) => *at,
            None => after(now(), self.core.close_timeout),
        };
        self.close_deadline.get_or_insert(deadline);
    }

    /// Closes the real sink, within the close deadline.
    fn poll_close_sink(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = *self
            .close_deadline
            .get_or_insert_with(|| after(now(), self.core.close_timeout));
        if let Some(sink) = self.sink.as_mut() {
            if now() < deadline && sink.as_mut().poll_close(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.sink = None;
        Poll::Ready(())
    }

    /// Ends the task: the client failed (`error`), or the stream closed
    /// (evicted, or given up on).
    fn stop(&mut self, error: Option<BoxError>) -> Poll<()> {
        if let Some(error) = error {
            let _ = self.core.failure.set(Arc::from(error));
        }
        self.core.client.close(CloseReason::ClientGone);
        self.sink = None;
        self.pending = None;
        Poll::Ready(())
    }

    /// Wakes the task for the next timed rule, release or deadline.
    fn arm_timer(&mut self, cx: &mut Context<'_>) {
        let deadline = if self.closing {
            self.close_deadline
        } else {
            [
                self.rule_at,
                self.report_at,
                self.release_at,
                self.core.deadline.get().copied(),
            ]
            .into_iter()
            .flatten()
            .min()
        };
        if let Some(deadline) = deadline {
            self.timer.arm(deadline, cx);
        }
    }
}

impl<T, S, O, W, C, M, St> Future for Drain<T, S, O, W, C, M, St>
where
    St: Storage<T> + Send + 'static,
    T: Send + 'static,
    S: Sink<T>,
    S::Error: Into<BoxError>,
    O: BackpressureObserver,
    W: Weigher<T> + Send + Sync + 'static,
    C: Classify<T>,
    M: GapMarker<T>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.run(cx) {
            Poll::Ready(()) => {
                this.finished = true;
                Poll::Ready(())
            }
            Poll::Pending => {
                this.arm_timer(cx);
                Poll::Pending
            }
        }
    }
}

impl<T, S, O: BackpressureObserver, W, C, M, St: Storage<T>> Drop for Drain<T, S, O, W, C, M, St> {
    fn drop(&mut self) {
        if !self.finished {
            // Stopped before its end: it panicked, or its runtime shut down.
            self.core.client.close(CloseReason::InnerError);
        }
    }
}
