//! A cursor into a hub's log, read as a `Stream` or as a response body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_core::Stream;
use http_body::{Body, Frame};

use super::log::{Cursor, Parked};
use super::{Shared, Subscriber};
use crate::buffer::{ByWeigh, Gap};
use crate::keep_alive::{Idle, KeepAlive};
use crate::policy::{GapAction, GapMarker};

/// How many frames a subscription takes from the log per lock.
const BATCH: usize = 32;

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent<T> {
    /// A frame, with its id.
    Frame {
        /// The frame's id.
        id: u64,
        /// The frame (a clone of the one the hub holds: a reference count
        /// for `Bytes`).
        item: T,
    },
    /// Ids skipped before the next frame: frames the hub no longer retained
    /// when the subscriber got there (it fell behind the retention), and ids
    /// that never reached the hub (holes in a producer's ids). Always
    /// followed by a frame.
    Gap {
        /// How many ids were skipped.
        missed: u64,
    },
}

/// One subscriber's cursor into a [`Hub`](super::Hub)'s log, from
/// [`Hub::subscribe`](super::Hub::subscribe) or
/// [`Hub::subscribe_after`](super::Hub::subscribe_after).
///
/// - A [`Stream`] of [`HubEvent`]s, in id order, that ends only when the
///   hub closes ([`Hub::close`](super::Hub::close), or its last handle is
///   dropped), after the frames published before that.
/// - For frames that are a [`Buf`] (`Bytes`), an [`http_body::Body`] whose
///   data frames are the hub's frames. Gaps are silent by default; with
///   [`with_gap_marker`](Self::with_gap_marker) a [`GapMarker`] renders each
///   one (e.g. [`SseGapMarker`](crate::SseGapMarker)'s `event: lagged`), or
///   ends the body with its trailers. The body never reports an exact size
///   and its error type is [`Infallible`].
///
/// A subscription costs the hub nothing while it is not polled: publishing
/// never touches it. When it is polled and nothing is new it leaves its
/// waker, and the next publish wakes it once. It takes up to 32 frames per
/// poll that finds some (under one lock, cloning each: a reference count
/// for `Bytes`), and holds at most those between polls. Dropping it
/// withdraws its waker.
///
/// A standalone subscription has no limit of its own: it can fall behind by
/// as much as the hub retains.
pub struct Subscription<T = Bytes, W = ByWeigh, M = ()> {
    shared: Arc<Shared<T, W>>,
    cursor: Cursor,
    parked: Parked,
    /// Frames taken from the log, not handed out yet, each with the gap
    /// before it.
    ready: VecDeque<(Gap, u64, T)>,
    marker: M,
    /// The gap marker ended the body.
    ended: bool,
    /// SSE keep-alive of the [`Body`] view (see `keep_alive`).
    idle: Option<Idle>,
    /// Counted in [`Hub::subscribers`](super::Hub::subscribers).
    _counted: Subscriber,
}

// No field is pinned.
impl<T, W, M> Unpin for Subscription<T, W, M> {}

impl<T, W, M> fmt::Debug for Subscription<T, W, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("next", &self.cursor.next)
            .field("ready", &self.ready.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<T, W> Subscription<T, W> {
    pub(crate) fn new(shared: Arc<Shared<T, W>>, cursor: Cursor) -> Self {
        Self {
            _counted: shared.subscriber(),
            shared,
            cursor,
            parked: Parked::default(),
            ready: VecDeque::new(),
            marker: (),
            ended: false,
            idle: None,
        }
    }
}

impl<T, W, M> Subscription<T, W, M> {
    /// Renders gaps in the [`Body`] view with `marker`: its frame is
    /// inserted before the first frame after each gap, or its trailers end
    /// the body ([`GapAction::End`]). The marker's [`Gap`] counts the ids
    /// skipped and, when known, their bytes (0 for holes, and for a
    /// subscription that resumed from an id older than the retention).
    ///
    /// The [`Stream`] view is not affected: it yields [`HubEvent::Gap`].
    pub fn with_gap_marker<M2>(mut self, marker: M2) -> Subscription<T, W, M2> {
        Subscription {
            shared: self.shared.clone(),
            cursor: self.cursor,
            parked: std::mem::take(&mut self.parked),
            ready: std::mem::take(&mut self.ready),
            marker,
            ended: self.ended,
            idle: self.idle.take(),
            _counted: std::mem::take(&mut self._counted),
        }
    }

    /// Served as an SSE body without [`BackpressureLayer`](crate::BackpressureLayer):
    /// sends a comment line once the [`Body`] view has had nothing to send
    /// for the [`KeepAlive`]'s interval, so that proxies keep the
    /// connection (`None`, the default: no comment). Only for `Bytes`
    /// frames. The comment is not a frame of the hub: the [`Stream`] view
    /// and the cursor do not see it. [`Hub::response`](super::Hub::response)
    /// sets this by itself for SSE.
    ///
    /// ```
    /// use tower_backpressure::{Hub, KeepAlive};
    ///
    /// let hub: Hub = Hub::default();
    /// let body = hub.subscribe().keep_alive(Some(KeepAlive::new()));
    /// # let _ = body;
    /// ```
    pub fn keep_alive(mut self, keep_alive: Option<KeepAlive>) -> Self
    where
        T: 'static,
    {
        self.idle = Idle::new::<T>(keep_alive.as_ref());
        self
    }

    /// The gap marker.
    pub fn gap_marker(&self) -> &M {
        &self.marker
    }

    /// How many frames the hub retains that this subscription has not
    /// handed out yet: how far behind it is.
    pub fn backlog(&self) -> usize {
        self.ready.len() + self.shared.lock().backlog(self.cursor.next).0
    }

    /// Frames to hand out before the log's (a backfill), and the gap before
    /// the first of them.
    pub(crate) fn seed(&mut self, backfill: super::backfill::Backfill<T>) {
        let mut gap = Gap {
            frames: backfill.gap,
            bytes: 0,
        };
        for (id, item, _) in backfill.frames {
            self.ready.push_back((std::mem::take(&mut gap), id, item));
        }
    }

    /// The cursor in the log (past the frames taken and not handed out).
    pub(crate) fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next frame and the gap before it; `None` once the hub has closed
    /// and nothing is left for it; else parks.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Option<(Gap, u64, T)>>
    where
        T: Clone,
    {
        if let Some(next) = self.ready.pop_front() {
            return Poll::Ready(Some(next));
        }
        let mut log = self.shared.lock();
        let ready = &mut self.ready;
        let read = log.read(&mut self.cursor, BATCH, |gap, e| {
            ready.push_back((gap, e.id, e.item.clone()))
        });
        if read == 0 {
            if log.finished(self.cursor.next) {
                log.unpark(&mut self.parked);
                drop(log);
                self.ended = true;
                return Poll::Ready(None);
            }
            let parked = log.park(self.cursor.next, cx.waker(), &mut self.parked);
            debug_assert!(parked, "nothing to read, so it parks");
            return Poll::Pending;
        }
        if self.parked.may_be_parked() {
            // Woken, or polled for another reason: no wake-up is needed.
            log.unpark(&mut self.parked);
        }
        drop(log);
        Poll::Ready(Some(self.ready.pop_front().expect("read a frame")))
    }

    /// Ends the body: frees what it holds.
    fn end(&mut self) {
        self.ended = true;
        self.ready.clear();
        self.unpark();
    }

    fn unpark(&mut self) {
        if self.parked.may_be_parked() {
            self.shared.lock().unpark(&mut self.parked);
        }
    }
}

impl<T, W, M> Drop for Subscription<T, W, M> {
    fn drop(&mut self) {
        self.unpark();
    }
}

impl<T: Clone, W, M> Stream for Subscription<T, W, M> {
    type Item = HubEvent<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<HubEvent<T>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let Some((gap, id, item)) = ready!(this.poll_ready(cx)) else {
            return Poll::Ready(None);
        };
        if !gap.is_empty() {
            this.ready.push_front((Gap::default(), id, item));
            return Poll::Ready(Some(HubEvent::Gap { missed: gap.frames }));
        }
        Poll::Ready(Some(HubEvent::Frame { id, item }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.ready.len(), None)
    }
}

impl<T, W, M> Body for Subscription<T, W, M>
where
    T: Buf + Clone + 'static,
    M: GapMarker<T>,
{
    type Data = T;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<T>, Infallible>>> {
        let this = self.get_mut();
        let polled = this.poll_body(cx);
        match (&mut this.idle, polled) {
            (Some(idle), Poll::Pending) => idle
                .poll_quiet(cx)
                .map(|comment| Some(Ok(Frame::data(comment)))),
            (Some(idle), ready) => {
                idle.busy();
                ready
            }
            (None, polled) => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

impl<T, W, M> Subscription<T, W, M>
where
    T: Buf + Clone,
    M: GapMarker<T>,
{
    /// The [`Body`] view's next frame, keep-alive aside.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<T>, Infallible>>> {
        let this = self;
        if this.ended {
            return Poll::Ready(None);
        }
        let Some((gap, id, item)) = ready!(this.poll_ready(cx)) else {
            return Poll::Ready(None);
        };
        if !gap.is_empty() {
            match this.marker.on_gap(gap) {
                GapAction::Insert(marker) => {
                    this.ready.push_front((Gap::default(), id, item));
                    return Poll::Ready(Some(Ok(Frame::data(marker))));
                }
                GapAction::End(trailers) => {
                    this.end();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                GapAction::Skip => {}
            }
        }
        Poll::Ready(Some(Ok(Frame::data(item))))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use http::HeaderMap;

    use super::*;
    use crate::SseGapMarker;
    use crate::hub::{Hub, HubConfig};

    type Polled = Poll<Option<Result<Frame<Bytes>, Infallible>>>;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Counted {
        count: Arc<Count>,
        waker: Waker,
    }

    impl Counted {
        fn new() -> Self {
            let count = Arc::new(Count(AtomicUsize::new(0)));
            Self {
                waker: Waker::from(count.clone()),
                count,
            }
        }

        fn wakes(&self) -> usize {
            self.count.0.load(Ordering::SeqCst)
        }

        fn poll<S: Stream + Unpin>(&self, s: &mut S) -> Poll<Option<S::Item>> {
            Pin::new(s).poll_next(&mut Context::from_waker(&self.waker))
        }

        fn poll_body<B>(&self, b: &mut B) -> Polled
        where
            B: Body<Data = Bytes, Error = Infallible> + Unpin,
        {
            Pin::new(b).poll_frame(&mut Context::from_waker(&self.waker))
        }
    }

    fn frame(id: u64, text: &'static str) -> Poll<Option<HubEvent<Bytes>>> {
        Poll::Ready(Some(HubEvent::Frame {
            id,
            item: Bytes::from(text),
        }))
    }

    fn gap(missed: u64) -> Poll<Option<HubEvent<Bytes>>> {
        Poll::Ready(Some(HubEvent::Gap { missed }))
    }

    #[test]
    fn subscribe_starts_after_the_newest() {
        let hub: Hub = Hub::default();
        let w = Counted::new();
        let mut early = hub.subscribe();
        hub.publish(Bytes::from("a"));
        let mut late = hub.subscribe();
        assert_eq!(w.poll(&mut late), Poll::Pending);
        hub.publish(Bytes::from("b"));
        assert_eq!(w.poll(&mut early), frame(0, "a"));
        assert_eq!(w.poll(&mut early), frame(1, "b"));
        assert_eq!(w.poll(&mut late), frame(1, "b"));
        assert_eq!(w.poll(&mut late), Poll::Pending);
    }

    #[test]
    fn an_empty_hub_fed_with_producer_ids_has_no_gap_before_its_first_frame() {
        let hub: Hub = Hub::default();
        let w = Counted::new();
        let mut sub = hub.subscribe();
        hub.publish_with_id(1000, Bytes::from("a")).unwrap();
        hub.publish_with_id(1003, Bytes::from("b")).unwrap();
        assert_eq!(w.poll(&mut sub), frame(1000, "a"));
        // 1001 and 1002 never reached the hub.
        assert_eq!(w.poll(&mut sub), gap(2));
        assert_eq!(w.poll(&mut sub), frame(1003, "b"));
    }

    #[test]
    fn subscribe_after_within_and_beyond_the_retention() {
        let hub: Hub = Hub::new(HubConfig::new(3));
        for text in ["a", "b", "c", "d", "e"] {
            hub.publish(Bytes::from(text));
        }
        // Retained: 2, 3, 4.
        let w = Counted::new();
        let mut within = hub.subscribe_after(2);
        assert_eq!(w.poll(&mut within), frame(3, "d"));
        assert_eq!(w.poll(&mut within), frame(4, "e"));
        assert_eq!(w.poll(&mut within), Poll::Pending);
        let mut beyond = hub.subscribe_after(0);
        assert_eq!(beyond.backlog(), 3);
        assert_eq!(w.poll(&mut beyond), gap(1));
        assert_eq!(w.poll(&mut beyond), frame(2, "c"));
        let mut newest = hub.subscribe_after(4);
        let mut future = hub.subscribe_after(99);
        assert_eq!(w.poll(&mut newest), Poll::Pending);
        assert_eq!(w.poll(&mut future), Poll::Pending);
        hub.publish(Bytes::from("f"));
        assert_eq!(w.poll(&mut newest), frame(5, "f"));
        assert_eq!(w.poll(&mut future), frame(5, "f"));
    }

    #[test]
    fn a_reader_behind_the_retention_skips_exactly_what_is_gone() {
        let hub: Hub = Hub::new(HubConfig::new(4));
        let w = Counted::new();
        let mut sub = hub.subscribe();
        hub.publish(Bytes::from("0"));
        assert_eq!(w.poll(&mut sub), frame(0, "0"));
        for i in 1..=10 {
            hub.publish(Bytes::from(i.to_string()));
        }
        assert_eq!(sub.backlog(), 4);
        assert_eq!(w.poll(&mut sub), gap(6));
        assert_eq!(w.poll(&mut sub), frame(7, "7"));
    }

    #[test]
    fn a_parked_subscriber_is_woken_once_a_stalled_one_never() {
        let hub: Hub = Hub::default();
        let parked = Counted::new();
        let stalled = Counted::new();
        let mut a = hub.subscribe();
        let mut b = hub.subscribe();
        assert_eq!(parked.poll(&mut a), Poll::Pending);
        hub.publish(Bytes::from("x"));
        assert_eq!(stalled.poll(&mut b), frame(0, "x"));
        // `b` read and stalls; `a` was woken and stalls.
        for _ in 0..100 {
            hub.publish(Bytes::from("y"));
        }
        assert_eq!((parked.wakes(), stalled.wakes()), (1, 0));
        assert_eq!(hub.shared.lock().parked_len(), 0);
    }

    #[test]
    fn a_subscriber_polled_with_frames_waiting_withdraws_its_waker() {
        let hub: Hub = Hub::default();
        let w = Counted::new();
        let mut sub = hub.subscribe();
        assert_eq!(w.poll(&mut sub), Poll::Pending);
        assert_eq!(hub.shared.lock().parked_len(), 1);
        hub.publish(Bytes::from("a"));
        assert_eq!(w.poll(&mut sub), frame(0, "a"));
        assert_eq!(w.poll(&mut sub), Poll::Pending);
        assert_eq!(w.poll(&mut sub), Poll::Pending);
        assert_eq!(hub.shared.lock().parked_len(), 1, "parking again replaces");
        hub.publish(Bytes::from("b"));
        assert_eq!(w.wakes(), 2);
    }

    #[test]
    fn dropping_a_subscription_withdraws_its_waker() {
        let hub: Hub = Hub::default();
        let w = Counted::new();
        let mut sub = hub.subscribe();
        assert_eq!(w.poll(&mut sub), Poll::Pending);
        assert_eq!(hub.shared.lock().parked_len(), 1);
        drop(sub);
        assert_eq!(hub.shared.lock().parked_len(), 0);
        hub.publish(Bytes::from("a"));
        assert_eq!(w.wakes(), 0);
    }

    #[test]
    fn a_batch_is_taken_under_one_lock() {
        let hub: Hub = Hub::default();
        let w = Counted::new();
        let mut sub = hub.subscribe();
        for _ in 0..40 {
            hub.publish(Bytes::from("a"));
        }
        assert!(matches!(w.poll(&mut sub), Poll::Ready(Some(_))));
        assert_eq!(sub.ready.len(), BATCH - 1);
        assert_eq!(sub.cursor().next, BATCH as u64);
        assert_eq!(sub.backlog(), 39);
    }

    #[test]
    fn body_without_marker_skips_gaps() {
        let hub: Hub = Hub::new(HubConfig::new(2));
        let w = Counted::new();
        let mut sub = hub.subscribe();
        for text in ["a", "b", "c"] {
            hub.publish(Bytes::from(text));
        }
        let Poll::Ready(Some(Ok(f))) = w.poll_body(&mut sub) else {
            panic!("a frame")
        };
        assert_eq!(f.into_data().unwrap(), "b");
        assert!(!sub.is_end_stream());
        assert_eq!(Body::size_hint(&sub).exact(), None);
    }

    #[test]
    fn body_renders_gaps_with_the_marker() {
        let hub: Hub = Hub::new(HubConfig::new(2));
        let w = Counted::new();
        let mut sub = hub.subscribe().with_gap_marker(SseGapMarker::new());
        for text in ["a", "b", "c"] {
            hub.publish(Bytes::from(text));
        }
        let mut data = Vec::new();
        while let Poll::Ready(Some(Ok(f))) = w.poll_body(&mut sub) {
            data.push(f.into_data().unwrap());
        }
        assert_eq!(data, ["event: lagged\ndata: {\"dropped\":1}\n\n", "b", "c"]);
    }

    #[test]
    fn body_ends_with_the_markers_trailers() {
        let hub: Hub = Hub::new(HubConfig::new(2));
        let w = Counted::new();
        let marker = |gap: Gap| {
            let mut h = HeaderMap::new();
            h.insert("missed", gap.frames.into());
            h.insert("bytes", gap.bytes.into());
            GapAction::<Bytes>::End(h)
        };
        let mut sub = hub.subscribe().with_gap_marker(marker);
        for text in ["a", "bb", "ccc", "dddd"] {
            hub.publish(Bytes::from(text));
        }
        let Poll::Ready(Some(Ok(f))) = w.poll_body(&mut sub) else {
            panic!("trailers")
        };
        let trailers = f.into_trailers().unwrap();
        assert_eq!(trailers["missed"], "2");
        assert_eq!(trailers["bytes"], "3");
        assert!(sub.is_end_stream());
        assert!(matches!(w.poll_body(&mut sub), Poll::Ready(None)));
    }
}
