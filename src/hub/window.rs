//! A client's window over a hub's log: the storage of a hub subscription
//! whose response goes through [`BackpressureLayer`](crate::BackpressureLayer)
//! (or whose messages go through a [`BufferedSink`](crate::BufferedSink)).
//!
//! The client's [`BufferConfig`] bounds its backlog in the shared log: what
//! is published after its cursor, up to `capacity` frames and `max_bytes`
//! bytes. Beyond that the cursor skips the oldest frames, counted exactly as
//! a [`ClientBuffer`](crate::ClientBuffer) of the same config would drop
//! them. Nothing is copied per client: a frame is cloned (a reference count
//! for `Bytes`) only when the client takes it.
//!
//! The window is brought up to date when its client reads, and by the hub's
//! sweep for clients that do not: a stalled client costs nothing per
//! publish, and one step per sweep (a binary search, not a step per frame
//! published, unless a [`Classify`] hook must see the frames it skips).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::Waker;

use http::HeaderMap;

use super::log::{Cursor, Parked};
use super::{Shared, Subscriber, Sweeper};
use crate::buffer::{BufferStats, Dropped, FrameClass, Gap};
use crate::client::Storage;
use crate::config::{BufferConfig, Overflow};
use crate::observer::EvictReason;

/// A frame's class, as the layer's [`Classify`](crate::Classify) hook says.
pub(crate) type ClassifyFn<T> = Box<dyn Fn(&T) -> FrameClass + Send + Sync>;

/// One client's window over a hub's log.
pub(crate) struct Window<T, W> {
    shared: Arc<Shared<T, W>>,
    cursor: Cursor,
    parked: Parked,
    config: BufferConfig,
    /// `None`: every frame is droppable (the default hook).
    classify: Option<ClassifyFn<T>>,
    /// Frames kept from a skip (the newest of each replace key), oldest
    /// first: delivered before the frame at the cursor.
    kept: VecDeque<(T, usize)>,
    /// Lost since the last frame taken: the gap before the next one.
    gap: Gap,
    /// The backlog at the last look, less what was taken since.
    frames: usize,
    bytes: usize,
    /// Frames still to deliver before the stream ends, if limited.
    left: Option<u64>,
    /// Sent after the last frame of a limited window.
    trailers: Option<HeaderMap>,
    /// A resumed client replays what it missed, whatever its limits: it is
    /// not slow. Its window bounds it once it has caught up to within it.
    catching_up: bool,
    /// Parked by the last `refresh`, for the consumer's `park` right after.
    parked_now: bool,
    closed: bool,
    sent: u64,
    dropped: u64,
    dropped_bytes: u64,
    replaced: u64,
    high_water: usize,
    high_water_bytes: usize,
    /// Counted in [`Hub::subscribers`](super::Hub::subscribers).
    _counted: Subscriber,
}

impl<T, W> Window<T, W> {
    pub(crate) fn new(
        shared: Arc<Shared<T, W>>,
        cursor: Cursor,
        config: BufferConfig,
        classify: Option<ClassifyFn<T>>,
        limit: Option<u64>,
        resumed: bool,
        trailers: Option<HeaderMap>,
    ) -> Self {
        Self {
            _counted: shared.subscriber(),
            trailers,
            catching_up: resumed,
            parked_now: false,
            shared,
            cursor,
            parked: Parked::default(),
            config,
            classify,
            kept: VecDeque::new(),
            gap: Gap::default(),
            frames: 0,
            bytes: 0,
            left: limit,
            closed: false,
            sent: 0,
            dropped: 0,
            dropped_bytes: 0,
            replaced: 0,
            high_water: 0,
            high_water_bytes: 0,
        }
    }

    /// Starts the window with frames delivered before the one at its
    /// cursor (a backfill), after a gap of `gap` ids.
    pub(crate) fn with_backfill(mut self, kept: VecDeque<(T, usize)>, gap: u64) -> Self {
        self.kept = kept;
        self.gap = Gap {
            frames: gap,
            bytes: 0,
        };
        self
    }

    fn max_bytes(&self) -> usize {
        self.config.max_bytes().unwrap_or(usize::MAX)
    }

    /// Frames the client can still take.
    fn waiting(&self) -> usize {
        let n = self.frames + self.kept.len();
        match self.left {
            Some(left) => n.min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => n,
        }
    }
}

impl<T: Clone + Send + 'static, W> Storage<T> for Window<T, W> {
    fn config(&self) -> &BufferConfig {
        &self.config
    }

    fn len(&self) -> usize {
        self.waiting()
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn is_full(&self) -> bool {
        self.waiting() >= self.config.capacity() || self.bytes >= self.max_bytes()
    }

    fn is_healthy(&self) -> bool {
        self.waiting() < self.config.pressure_frames()
            && self.bytes < self.config.pressure_bytes().unwrap_or(usize::MAX)
    }

    fn has_room_for_class(&self, _: usize, _: FrameClass) -> bool {
        // Nothing is pushed into a window: the hub publishes.
        true
    }

    fn growth(&self, _: usize, _: FrameClass) -> usize {
        0
    }

    fn reject(&mut self, _: usize) {}

    fn filled_by_others(&self) -> bool {
        true
    }

    fn refresh(&mut self, park: Option<&Waker>) -> Result<Dropped, EvictReason> {
        self.parked_now = false;
        if self.closed || self.ended() {
            return Ok(Dropped::default());
        }
        let mut log = self.shared.lock();
        let (frames, bytes) = log.backlog(self.cursor.next);
        if let Some(waker) = park.filter(|_| frames == 0 && self.kept.is_empty()) {
            // Nothing waits: park under this lock, not another one.
            self.frames = 0;
            self.bytes = 0;
            self.catching_up = false;
            self.parked_now = log.park(self.cursor.next, waker, &mut self.parked);
            return Ok(Dropped::default());
        }
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        let capacity = self.config.capacity();
        let max_bytes = self.max_bytes();
        let over =
            |frames: usize, bytes: usize| frames > capacity || (frames > 1 && bytes > max_bytes);
        let mut skipped = Dropped::default();
        if self.catching_up && !over(frames, bytes) {
            self.catching_up = false;
        }
        if !self.catching_up && over(frames, bytes) {
            if self.config.overflow() == Overflow::Disconnect {
                return Err(EvictReason::Overflow);
            }
            // The fewest frames to skip: the newest that fit stay, as a
            // ring that drops its oldest would keep them.
            // The backlog is the log's frames from index `i0` on.
            let i0 = log.index(self.cursor.next);
            let first = log.at(i0).map_or(0, |e| e.bytes_before);
            let end = first + bytes as u64;
            let fits = |k: usize| {
                let e = log.at(i0 + k).expect("in the backlog");
                let rest = usize::try_from(end - e.bytes_before).unwrap_or(usize::MAX);
                !over(frames - k, rest)
            };
            let (mut lo, mut hi) = (frames.saturating_sub(capacity), frames - 1);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if fits(mid) {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            let k = lo;
            let keep = log.at(i0 + k).expect("in the backlog");
            let (keep_id, keep_before) = (keep.id, keep.bytes_before);
            let mut kept_now: (usize, u64) = (0, 0);
            let replaced_before = self.replaced;
            if let Some(classify) = &self.classify {
                // The frames skipped, one by one: a critical one cannot be
                // skipped, a replace-class one leaves its key's newest.
                let mut keys: HashMap<u64, usize> = HashMap::new();
                let mut kept: Vec<(T, usize)> = Vec::new();
                for e in log.iter_from(self.cursor.next).take(k) {
                    match classify(&e.item) {
                        FrameClass::Critical => return Err(EvictReason::Overflow),
                        FrameClass::Replace(key) => {
                            if let Some(&i) = keys.get(&key) {
                                self.replaced += 1;
                                kept[i] = (e.item.clone(), e.weight);
                            } else {
                                keys.insert(key, kept.len());
                                kept.push((e.item.clone(), e.weight));
                            }
                        }
                        _ => {
                            skipped.frames += 1;
                            skipped.bytes += e.weight;
                        }
                    }
                }
                kept_now = (kept.len(), kept.iter().map(|(_, w)| *w as u64).sum());
                self.kept.extend(kept);
            } else {
                skipped.frames = k;
                skipped.bytes = usize::try_from(keep_before - first).unwrap_or(usize::MAX);
            }
            // The gap the marker announces counts ids: frames skipped here,
            // and any the log had let go of or never had.
            let from = log.effective(self.cursor.next);
            self.gap.add(Gap {
                // Superseded frames are not lost: their key's newest comes.
                frames: keep_id - from - kept_now.0 as u64 - (self.replaced - replaced_before),
                bytes: self
                    .cursor
                    .pos
                    .map_or(0, |p| keep_before.saturating_sub(p))
                    .saturating_sub(kept_now.1),
            });
            self.cursor = Cursor {
                next: keep_id,
                pos: Some(keep_before),
            };
            self.frames = frames - k;
            self.bytes = usize::try_from(end - keep_before).unwrap_or(usize::MAX);
        } else {
            self.frames = frames;
            self.bytes = bytes;
        }
        drop(log);
        self.dropped += skipped.frames as u64;
        self.dropped_bytes += skipped.bytes as u64;
        self.high_water = self.high_water.max(self.waiting());
        self.high_water_bytes = self.high_water_bytes.max(self.bytes);
        Ok(skipped)
    }

    fn park(&mut self, waker: &Waker) -> bool {
        if std::mem::take(&mut self.parked_now) {
            // Parked by the look just before, under the same client lock.
            return true;
        }
        if self.closed || !self.kept.is_empty() {
            return false;
        }
        self.shared
            .lock()
            .park(self.cursor.next, waker, &mut self.parked)
    }

    fn ended(&self) -> bool {
        self.left == Some(0)
    }

    fn end_trailers(&mut self) -> Option<HeaderMap> {
        self.trailers.take()
    }

    fn pop(&mut self) -> Option<(T, Gap)> {
        if self.closed || self.left == Some(0) {
            return None;
        }
        let (item, weight, gap) = if let Some((item, weight)) = self.kept.pop_front() {
            (item, weight, std::mem::take(&mut self.gap))
        } else {
            let log = self.shared.lock();
            let mut out = None;
            log.read(&mut self.cursor, 1, |gap, e| {
                out = Some((e.item.clone(), e.weight, gap));
            });
            drop(log);
            let (item, weight, mut gap) = out?;
            gap.add(std::mem::take(&mut self.gap));
            self.frames = self.frames.saturating_sub(1);
            (item, weight, gap)
        };
        self.bytes = self.bytes.saturating_sub(weight);
        self.sent += 1;
        if let Some(left) = &mut self.left {
            *left -= 1;
            if *left == 0 {
                // The limit ends the stream: nothing more waits for the
                // client, however much was published after this frame.
                self.kept.clear();
                self.frames = 0;
                self.bytes = 0;
            }
        }
        Some((item, gap))
    }

    fn peek_meta(&self) -> Option<(usize, Gap)> {
        if self.closed || self.left == Some(0) {
            return None;
        }
        if let Some((_, weight)) = self.kept.front() {
            return Some((*weight, self.gap));
        }
        let log = self.shared.lock();
        let e = log.iter_from(self.cursor.next).next()?;
        let mut gap = self.gap;
        gap.frames += log.gap_before(self.cursor.next);
        Some((e.weight, gap))
    }

    fn trailing_gap(&self) -> Gap {
        Gap::default()
    }

    fn take_trailing_gap(&mut self) -> Gap {
        Gap::default()
    }

    fn evict_oldest(&mut self) -> Option<usize> {
        // Not under a memory budget: the log is the shared memory.
        None
    }

    fn discard(&mut self) {
        self.closed = true;
        self.kept.clear();
        self.frames = 0;
        self.bytes = 0;
        self.shared.lock().unpark(&mut self.parked);
    }

    fn stats(&self) -> BufferStats {
        let buffered = self.waiting();
        BufferStats {
            buffered,
            buffered_bytes: self.bytes,
            capacity: self.config.capacity(),
            max_bytes: self.config.max_bytes(),
            pushed: self.sent + self.dropped + self.replaced + buffered as u64,
            sent: self.sent,
            dropped: self.dropped,
            dropped_bytes: self.dropped_bytes,
            replaced: self.replaced,
            high_water: self.high_water,
            high_water_bytes: self.high_water_bytes,
            healthy: self.is_healthy(),
        }
    }
}

impl<T, W> Drop for Window<T, W> {
    fn drop(&mut self) {
        if self.parked.may_be_parked() {
            self.shared.lock().unpark(&mut self.parked);
        }
    }
}

/// What a subscription leaves in its response's extensions for the layer
/// (see [`Subscription::into_response`](super::Subscription::into_response)):
/// how to make the client's window, type-erased over the hub's weigher.
pub(crate) trait MakeWindow<T>: Send + Sync {
    /// The window of a client with `config`, and the hub's sweep to join.
    fn window(
        &self,
        config: BufferConfig,
        classify: Option<ClassifyFn<T>>,
    ) -> (Box<dyn Storage<T> + Send>, Arc<Sweeper>);
}

/// The response extension: an `Arc<dyn MakeWindow<T>>` for the body's data
/// type `T`, behind `Any`.
#[derive(Clone)]
pub(crate) struct Tap(pub(crate) Arc<dyn Any + Send + Sync>);

impl Tap {
    pub(crate) fn new<T: 'static>(make: Arc<dyn MakeWindow<T>>) -> Self {
        Self(Arc::new(make))
    }

    /// The maker, if the body's data type is the hub's item type.
    pub(crate) fn get<T: 'static>(&self) -> Option<&Arc<dyn MakeWindow<T>>> {
        self.0.downcast_ref()
    }
}

/// The window maker of one subscription.
pub(crate) struct Source<T, W> {
    pub(crate) shared: Arc<Shared<T, W>>,
    pub(crate) cursor: Cursor,
    pub(crate) limit: Option<u64>,
    pub(crate) resumed: bool,
    pub(crate) trailers: Option<HeaderMap>,
    /// Frames to deliver before the cursor's, and the gap before them.
    pub(crate) backfill: Option<(VecDeque<(T, usize)>, u64)>,
}

impl<T, W> MakeWindow<T> for Source<T, W>
where
    T: Clone + Send + Sync + 'static,
    W: Send + Sync + 'static,
{
    fn window(
        &self,
        config: BufferConfig,
        classify: Option<ClassifyFn<T>>,
    ) -> (Box<dyn Storage<T> + Send>, Arc<Sweeper>) {
        let window = Window::new(
            self.shared.clone(),
            self.cursor,
            config,
            classify,
            self.limit,
            self.resumed,
            self.trailers.clone(),
        );
        let window = match &self.backfill {
            Some((kept, gap)) => window.with_backfill(kept.clone(), *gap),
            None => window,
        };
        (Box::new(window), self.shared.sweeper.clone())
    }
}
