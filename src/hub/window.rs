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
//! published, unless a [`Classify`](crate::Classify) hook must see the frames it skips).

use std::any::{Any, TypeId};

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;

use http::HeaderMap;

use super::log::{Cursor, Parked};
use super::{Shared, Subscriber, Sweep, Sweeper};
use crate::buffer::{BufferStats, Dropped, FrameClass, Gap};
use crate::client::{Client, Reporter, Storage, join_each};
use crate::config::{BufferConfig, ConfigError, Overflow};
use crate::handle::HandleInner;
use crate::observer::{BackpressureObserver, EvictReason};
use crate::policy::Classify;

/// A frame's class, as the layer's [`Classify`](crate::Classify) hook says.
pub(crate) type ClassifyFn<T> = Box<dyn Fn(&T) -> FrameClass + Send + Sync>;

/// A frame the window holds itself, delivered before the frame at its
/// cursor: a frame of a backfill, or the newest frame of a replace key that a
/// skip passed over.
struct Kept<T> {
    item: T,
    weight: usize,
    /// The replace key; `None` for a backfill's frame.
    key: Option<u64>,
    /// Lost between the frame before this one and this one.
    gap: Gap,
}

/// Whether `frames` and `bytes` are past a window's limits.
fn over(config: &BufferConfig, frames: usize, bytes: usize) -> bool {
    frames > config.capacity() || (frames > 1 && bytes > config.max_bytes().unwrap_or(usize::MAX))
}

/// What waits for a window's client besides the log's frames, and the counts
/// that go with it; apart from the window's other fields so that it can
/// change under the log's lock.
struct Held<T> {
    /// Frames kept from a skip (the newest of each replace key) or a
    /// backfill, oldest first: delivered before the frame at the cursor.
    kept: VecDeque<Kept<T>>,
    /// The weight of `kept`.
    kept_bytes: usize,
    /// Lost after the last kept frame (or the last frame taken): the gap
    /// before the frame at the cursor.
    gap: Gap,
    /// The log's backlog at the last look, less what was taken since.
    frames: usize,
    bytes: usize,
    /// Kept frames superseded by a newer one of their key.
    replaced: u64,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Self {
            kept: VecDeque::new(),
            kept_bytes: 0,
            gap: Gap::default(),
            frames: 0,
            bytes: 0,
            replaced: 0,
        }
    }
}

impl<T> Held<T> {
    /// The bytes waiting: the kept frames' and the log backlog's.
    fn total_bytes(&self) -> usize {
        self.bytes.saturating_add(self.kept_bytes)
    }

    /// What waits is past the limits.
    fn is_over(&self, config: &BufferConfig) -> bool {
        over(config, self.frames + self.kept.len(), self.total_bytes())
    }

    /// What waits is below the pressure threshold (whatever the client's
    /// limit on frames left to deliver).
    fn is_healthy(&self, config: &BufferConfig) -> bool {
        self.frames + self.kept.len() < config.pressure_frames()
            && self.total_bytes() < config.pressure_bytes().unwrap_or(usize::MAX)
    }

    /// Drops the oldest kept frame: its gap, and itself, go to the frame
    /// after it.
    fn drop_oldest_kept(&mut self, skipped: &mut Dropped) {
        let Some(old) = self.kept.pop_front() else {
            return;
        };
        self.kept_bytes -= old.weight;
        skipped.frames += 1;
        skipped.bytes += old.weight;
        let mut gap = old.gap;
        gap.add(Gap {
            frames: 1,
            bytes: old.weight as u64,
        });
        match self.kept.front_mut() {
            Some(next) => next.gap.add(gap),
            None => self.gap.add(gap),
        }
    }

    /// Keeps `item` of replace key `key` (skipped from the log), after the
    /// gap gathered so far; a kept frame of the same key is superseded:
    /// counted replaced, and what was lost before it is handed on.
    fn keep_newest(&mut self, key: u64, item: T, weight: usize) {
        if let Some(i) = self.kept.iter().position(|k| k.key == Some(key)) {
            let old = self.kept.remove(i).expect("found");
            self.kept_bytes -= old.weight;
            self.replaced += 1;
            match self.kept.get_mut(i) {
                Some(next) => next.gap.add(old.gap),
                None => self.gap.add(old.gap),
            }
        }
        self.kept_bytes = self.kept_bytes.saturating_add(weight);
        self.kept.push_back(Kept {
            item,
            weight,
            key: Some(key),
            gap: std::mem::take(&mut self.gap),
        });
    }

    /// Skips the fewest of the log's frames (no kept frame is left, and
    /// every frame is droppable) for the rest to fit, as a ring that drops
    /// its oldest would: the newest that fit stay. One binary search.
    fn skip_log(
        &mut self,
        cursor: &mut Cursor,
        config: &BufferConfig,
        log: &super::log::Log<T>,
    ) -> Dropped {
        let (frames, bytes) = (self.frames, self.bytes);
        // The backlog is the log's frames from index `i0` on.
        let i0 = log.index(cursor.next);
        let first = log.at(i0).map_or(0, |e| e.bytes_before);
        let end = first.saturating_add(bytes as u64);
        let fits = |k: usize| {
            let e = log.at(i0 + k).expect("in the backlog");
            let rest = usize::try_from(end - e.bytes_before).unwrap_or(usize::MAX);
            !over(config, frames - k, rest)
        };
        let (mut lo, mut hi) = (frames.saturating_sub(config.capacity()), frames - 1);
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
        // The gap counts ids: the frames skipped here, and any the log had
        // let go of or never had.
        let from = log.effective(cursor.next);
        self.gap.add(Gap {
            frames: keep_id - from,
            bytes: cursor.pos.map_or(0, |p| keep_before.saturating_sub(p)),
        });
        *cursor = Cursor {
            next: keep_id,
            pos: Some(keep_before),
        };
        self.frames = frames - k;
        self.bytes = usize::try_from(end - keep_before).unwrap_or(usize::MAX);
        Dropped {
            frames: k,
            bytes: usize::try_from(keep_before - first).unwrap_or(usize::MAX),
        }
    }
}

/// One client's window over a hub's log.
///
/// What waits for the client is its kept frames, then the log's frames from
/// its cursor on; both count against its limits.
pub(crate) struct Window<T, W> {
    shared: Arc<Shared<T, W>>,
    cursor: Cursor,
    parked: Parked,
    /// Shared with the client (and the layer's other clients).
    config: Arc<BufferConfig>,
    /// `None`: every frame is droppable (the default hook).
    classify: Option<ClassifyFn<T>>,
    /// What waits for the client, besides the log.
    held: Held<T>,
    /// Frames still to deliver before the stream ends, if limited.
    left: Option<u64>,
    /// Sent after the last frame of a limited window.
    trailers: Option<Box<HeaderMap>>,
    /// A resumed client replays what it missed, whatever its limits: it is
    /// not slow. Its window bounds it once it has caught up to below its
    /// pressure threshold, where a client that keeps up stays: bound as
    /// soon as it was back within its capacity, at the window's edge, it
    /// lost the next frame published before its next read.
    catching_up: bool,
    /// Parked by the last `refresh`, for the consumer's `park` right after.
    parked_now: bool,
    /// The hub closed and the client has had every frame published before.
    hub_ended: bool,
    closed: bool,
    sent: u64,
    dropped: u64,
    dropped_bytes: u64,
    high_water: usize,
    high_water_bytes: usize,
    /// Counted in [`Hub::subscribers`](super::Hub::subscribers).
    _counted: Subscriber,
}

impl<T, W> Window<T, W> {
    pub(crate) fn new(
        shared: Arc<Shared<T, W>>,
        cursor: Cursor,
        config: Arc<BufferConfig>,
        classify: Option<ClassifyFn<T>>,
        limit: Option<u64>,
        resumed: bool,
        trailers: Option<HeaderMap>,
    ) -> Self {
        Self {
            _counted: shared.subscriber(),
            trailers: trailers.map(Box::new),
            catching_up: resumed,
            parked_now: false,
            hub_ended: false,
            shared,
            cursor,
            parked: Parked::default(),
            config,
            classify,
            held: Held::default(),
            left: limit,
            closed: false,
            sent: 0,
            dropped: 0,
            dropped_bytes: 0,
            high_water: 0,
            high_water_bytes: 0,
        }
    }

    /// Starts the window with frames delivered before the one at its
    /// cursor (a backfill), after a gap of `gap` ids.
    pub(crate) fn with_backfill(mut self, kept: VecDeque<(T, usize)>, gap: u64) -> Self {
        let mut gap = Gap {
            frames: gap,
            bytes: 0,
        };
        for (item, weight) in kept {
            self.held.kept_bytes = self.held.kept_bytes.saturating_add(weight);
            self.held.kept.push_back(Kept {
                item,
                weight,
                key: None,
                gap: std::mem::take(&mut gap),
            });
        }
        self.held.gap = gap;
        self
    }

    fn max_bytes(&self) -> usize {
        self.config.max_bytes().unwrap_or(usize::MAX)
    }

    /// Frames the client can still take.
    fn waiting(&self) -> usize {
        let n = self.held.frames + self.held.kept.len();
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
        self.held.total_bytes()
    }

    fn is_full(&self) -> bool {
        self.waiting() >= self.config.capacity() || self.held.total_bytes() >= self.max_bytes()
    }

    fn is_healthy(&self) -> bool {
        self.waiting() < self.config.pressure_frames()
            && self.held.total_bytes() < self.config.pressure_bytes().unwrap_or(usize::MAX)
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
        if frames == 0 && self.held.kept.is_empty() && log.finished(self.cursor.next) {
            // The hub closed, and this client has had all it will get.
            log.unpark(&mut self.parked);
            self.held.frames = 0;
            self.held.bytes = 0;
            self.hub_ended = true;
            return Ok(Dropped::default());
        }
        if let Some(waker) = park.filter(|_| frames == 0 && self.held.kept.is_empty()) {
            // Nothing waits: park under this lock, not another one.
            self.held.frames = 0;
            self.held.bytes = 0;
            self.catching_up = false;
            self.parked_now = log.park(self.cursor.next, waker, &mut self.parked);
            return Ok(Dropped::default());
        }
        self.held.frames = frames;
        self.held.bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        let mut skipped = Dropped::default();
        if self.catching_up && self.held.is_healthy(&self.config) {
            self.catching_up = false;
        }
        if !self.catching_up && self.held.is_over(&self.config) {
            if self.config.overflow() == Overflow::Disconnect {
                return Err(EvictReason::Overflow);
            }
            if let Some(classify) = &self.classify {
                // The log's frames one by one from the cursor: a critical one
                // cannot be skipped, a replace-class one is kept as its
                // key's newest (superseding the one kept before), the rest
                // are lost; then, if the kept frames alone are too many, the
                // oldest of them.
                while self.held.is_over(&self.config) && self.held.frames > 0 {
                    let mut out = None;
                    log.read(&mut self.cursor, 1, |gap, e| {
                        let class = classify(&e.item);
                        let item = matches!(class, FrameClass::Replace(_)).then(|| e.item.clone());
                        out = Some((gap, e.weight, class, item));
                    });
                    let Some((gap, weight, class, item)) = out else {
                        break;
                    };
                    self.held.frames -= 1;
                    self.held.bytes = self.held.bytes.saturating_sub(weight);
                    self.held.gap.add(gap);
                    match (class, item) {
                        (FrameClass::Critical, _) => return Err(EvictReason::Overflow),
                        (FrameClass::Replace(key), Some(item)) => {
                            self.held.keep_newest(key, item, weight);
                        }
                        _ => {
                            skipped.frames += 1;
                            skipped.bytes += weight;
                            self.held.gap.add(Gap {
                                frames: 1,
                                bytes: weight as u64,
                            });
                        }
                    }
                }
                while self.held.is_over(&self.config) && !self.held.kept.is_empty() {
                    self.held.drop_oldest_kept(&mut skipped);
                }
            } else {
                // Every frame droppable, the oldest first: the kept ones (a
                // backfill's), then the log's.
                while self.held.is_over(&self.config) && !self.held.kept.is_empty() {
                    self.held.drop_oldest_kept(&mut skipped);
                }
                if self.held.is_over(&self.config) {
                    let more = self.held.skip_log(&mut self.cursor, &self.config, &log);
                    skipped.frames += more.frames;
                    skipped.bytes += more.bytes;
                }
            }
        }
        drop(log);
        self.dropped += skipped.frames as u64;
        self.dropped_bytes += skipped.bytes as u64;
        self.high_water = self.high_water.max(self.waiting());
        self.high_water_bytes = self.high_water_bytes.max(self.held.total_bytes());
        Ok(skipped)
    }

    fn park(&mut self, waker: &Waker) -> bool {
        if std::mem::take(&mut self.parked_now) {
            // Parked by the look just before, under the same client lock.
            return true;
        }
        if self.closed || !self.held.kept.is_empty() {
            return false;
        }
        let mut log = self.shared.lock();
        if log.finished(self.cursor.next) {
            // Closed meanwhile: the next look ends the stream.
            return false;
        }
        log.park(self.cursor.next, waker, &mut self.parked)
    }

    fn ended(&self) -> bool {
        self.left == Some(0) || self.hub_ended
    }

    fn stop(&mut self) {
        // What waits now is the last the client gets.
        let waiting = self.waiting() as u64;
        self.left = Some(self.left.map_or(waiting, |left| left.min(waiting)));
        self.trailers = None;
    }

    fn end_trailers(&mut self) -> Option<HeaderMap> {
        self.trailers.take().map(|t| *t)
    }

    fn pop(&mut self) -> Option<(T, Gap)> {
        if self.closed || self.left == Some(0) {
            return None;
        }
        let (item, gap) = if let Some(kept) = self.held.kept.pop_front() {
            self.held.kept_bytes -= kept.weight;
            (kept.item, kept.gap)
        } else {
            let log = self.shared.lock();
            let mut out = None;
            log.read(&mut self.cursor, 1, |gap, e| {
                out = Some((e.item.clone(), e.weight, gap));
            });
            drop(log);
            let (item, weight, mut gap) = out?;
            gap.add(std::mem::take(&mut self.held.gap));
            self.held.frames = self.held.frames.saturating_sub(1);
            self.held.bytes = self.held.bytes.saturating_sub(weight);
            (item, gap)
        };
        self.sent += 1;
        if let Some(left) = &mut self.left {
            *left -= 1;
            if *left == 0 {
                // The limit ends the stream: nothing more waits for the
                // client, however much was published after this frame.
                self.held.kept.clear();
                self.held.kept_bytes = 0;
                self.held.frames = 0;
                self.held.bytes = 0;
            }
        }
        Some((item, gap))
    }

    fn join(&mut self, joined: &mut BytesMut, max_frames: usize, max_bytes: usize) -> usize
    where
        T: 'static,
    {
        // Kept frames, a gap to hand on, a limit to count down: as `pop`
        // takes them, one at a time.
        if self.closed
            || !self.held.kept.is_empty()
            || !self.held.gap.is_empty()
            || self.left.is_some()
        {
            return join_each(self, joined, max_frames, max_bytes);
        }
        // Every frame under one lock, copied where it lies (no clone).
        let log = self.shared.lock();
        let mut weight = 0usize;
        let taken = log.read_while(&mut self.cursor, max_frames, |gap, e| {
            let Some(bytes) = (&e.item as &dyn Any).downcast_ref::<Bytes>() else {
                return false;
            };
            if !gap.is_empty() || joined.len().saturating_add(e.weight) > max_bytes {
                return false;
            }
            joined.extend_from_slice(bytes);
            weight = weight.saturating_add(e.weight);
            true
        });
        drop(log);
        self.held.frames = self.held.frames.saturating_sub(taken);
        self.held.bytes = self.held.bytes.saturating_sub(weight);
        self.sent += taken as u64;
        taken
    }

    fn peek_meta(&self) -> Option<(usize, Gap)> {
        if self.closed || self.left == Some(0) {
            return None;
        }
        if let Some(kept) = self.held.kept.front() {
            return Some((kept.weight, kept.gap));
        }
        let log = self.shared.lock();
        let e = log.iter_from(self.cursor.next).next()?;
        let mut gap = self.held.gap;
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
        self.held.kept.clear();
        self.held.kept_bytes = 0;
        self.held.frames = 0;
        self.held.bytes = 0;
        self.shared.lock().unpark(&mut self.parked);
    }

    fn stats(&self) -> BufferStats {
        let buffered = self.waiting();
        BufferStats {
            buffered,
            buffered_bytes: self.held.total_bytes(),
            capacity: self.config.capacity(),
            max_bytes: self.config.max_bytes(),
            pushed: self.sent + self.dropped + self.held.replaced + buffered as u64,
            sent: self.sent,
            dropped: self.dropped,
            dropped_bytes: self.dropped_bytes,
            replaced: self.held.replaced,
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
/// (see [`HubResponse::build`](super::HubResponse::build)):
/// how to make the client's window, type-erased over the hub's weigher.
pub(crate) trait MakeWindow<T>: Send + Sync {
    /// The window of a client with `config`, and the hub's sweep to join.
    fn window(
        &self,
        config: Arc<BufferConfig>,
        classify: Option<ClassifyFn<T>>,
    ) -> (Box<dyn Storage<T> + Send>, Arc<Sweeper>);
}

/// The state of a client served from a window over a hub's log.
pub(crate) type WindowClient<T, O> = Client<T, O, Box<dyn Storage<T> + Send>>;

/// A client served from a window over a hub's log, set up as every front
/// door needs it: the configuration checked (a window cannot honour every
/// one), the window made, the client opened (`Opened` fires) and attached
/// to the hub's sweep, without which a client that stops reading would
/// never hear of its own stall. The layer and `BufferedSink` both call it.
pub(crate) fn window_client<T, O, C>(
    source: &dyn MakeWindow<T>,
    config: Arc<BufferConfig>,
    classify: C,
    handle: Arc<HandleInner>,
    observer: Arc<O>,
) -> Result<Arc<WindowClient<T, O>>, ConfigError>
where
    T: Send + 'static,
    O: BackpressureObserver,
    C: Classify<T>,
{
    config.validate_for_hub()?;
    let classify: Option<ClassifyFn<T>> = if TypeId::of::<C>() == TypeId::of::<()>() {
        // Every frame droppable: the window skips without looking.
        None
    } else {
        Some(Box::new(move |item: &T| classify.classify(item)))
    };
    let (window, sweeper) = source.window(config.clone(), classify);
    let client = Client::new(window, config, handle, observer, None, Reporter::Consumer);
    client.open();
    let sweep: Arc<dyn Sweep> = client.clone();
    sweeper.attach(Arc::downgrade(&sweep));
    Ok(client)
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
        config: Arc<BufferConfig>,
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
