//! The per-client ring buffer, usable on its own.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use bytes::{Buf, Bytes};
use http_body::Frame;

use std::sync::Arc;

use crate::config::{BufferConfig, ConfigError, Overflow};

/// How many bytes an item counts for against
/// [`BufferConfig::with_max_bytes`].
///
/// Implemented for `Bytes`, `Vec<u8>`, `String` (their length) and
/// `http_body::Frame<impl Buf>` (`remaining()` of a data frame, 0 for
/// trailers). The default method counts the shallow size of the value, so a
/// plain event type opts in with one line:
///
/// ```
/// use tower_backpressure::Weigh;
///
/// struct Tick { seq: u64 }
/// impl Weigh for Tick {}
///
/// assert_eq!(Tick { seq: 1 }.weigh(), 8);
/// ```
pub trait Weigh {
    /// The item's weight in bytes.
    fn weigh(&self) -> usize {
        std::mem::size_of_val(self)
    }
}

impl Weigh for Bytes {
    fn weigh(&self) -> usize {
        self.len()
    }
}

impl Weigh for Vec<u8> {
    fn weigh(&self) -> usize {
        self.len()
    }
}

impl Weigh for String {
    fn weigh(&self) -> usize {
        self.len()
    }
}

impl<D: Buf> Weigh for Frame<D> {
    fn weigh(&self) -> usize {
        self.data_ref().map_or(0, Buf::remaining)
    }
}

/// Computes an item's weight for a [`ClientBuffer`].
///
/// Implemented by [`ByWeigh`] (uses the item's [`Weigh`] impl) and by every
/// `Fn(&T) -> usize` closure.
pub trait Weigher<T> {
    /// The item's weight in bytes.
    fn weigh(&self, item: &T) -> usize;
}

/// The default [`Weigher`]: asks the item's [`Weigh`] implementation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByWeigh;

impl<T: Weigh> Weigher<T> for ByWeigh {
    fn weigh(&self, item: &T) -> usize {
        item.weigh()
    }
}

impl<T, F> Weigher<T> for F
where
    F: Fn(&T) -> usize,
{
    fn weigh(&self, item: &T) -> usize {
        self(item)
    }
}

/// Weighs any [`Buf`] by `remaining()`: what the layer uses for body data.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Remaining;

impl<T: Buf> Weigher<T> for Remaining {
    fn weigh(&self, item: &T) -> usize {
        item.remaining()
    }
}

/// What one push dropped to make room (or, under
/// [`Overflow::DropNewest`], the pushed item itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Frames dropped.
    pub frames: usize,
    /// Their total weight.
    pub bytes: usize,
}

/// How a frame may be treated when the buffer is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameClass {
    /// May be dropped (the default).
    #[default]
    Droppable,
    /// Never dropped. Critical frames count against the limits, but when
    /// only critical frames are left the buffer grows past its limits rather
    /// than lose one.
    Critical,
    /// Droppable, and superseded by a newer frame with the same key: only the
    /// newest frame of a key waits in the buffer (a keep-alive, a "latest
    /// price" per symbol). A superseded frame counts as
    /// [`replaced`](BufferStats::replaced), not as dropped, and leaves no gap.
    Replace(u64),
}

/// Frames lost at one point of a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gap {
    /// Frames dropped.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Gap {
    pub(crate) fn add(&mut self, other: Gap) {
        self.frames += other.frames;
        self.bytes += other.bytes;
    }

    /// No frame was lost.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }
}

/// A copyable snapshot of a [`ClientBuffer`]'s counters.
///
/// The counters keep one invariant:
/// `pushed == sent + dropped + replaced + buffered`.
///
/// `Serialize` with the `serde` feature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BufferStats {
    /// Frames waiting now.
    pub buffered: usize,
    /// Their total weight in bytes.
    pub buffered_bytes: usize,
    /// The frame limit.
    pub capacity: usize,
    /// The byte limit, if any.
    pub max_bytes: Option<usize>,
    /// Frames ever pushed (including any refused under
    /// [`Overflow::DropNewest`]).
    pub pushed: u64,
    /// Frames taken out with [`ClientBuffer::pop`] (for the layer: handed to
    /// the connection).
    pub sent: u64,
    /// Frames dropped to make room.
    pub dropped: u64,
    /// Bytes dropped to make room.
    pub dropped_bytes: u64,
    /// Frames superseded by a newer frame of the same
    /// [`FrameClass::Replace`] key.
    pub replaced: u64,
    /// The most frames ever buffered at once.
    pub high_water: usize,
    /// The most bytes ever buffered at once.
    pub high_water_bytes: usize,
    /// Below the pressure threshold (see [`ClientBuffer::is_healthy`]).
    pub healthy: bool,
}

/// `Slot::tag`: the frame is [`FrameClass::Critical`].
const CRITICAL: u64 = 1 << 63;
/// `Slot::tag`: the frame has a [`FrameClass::Replace`] key (in
/// `ClientBuffer::slot_keys`).
const KEYED: u64 = 1 << 62;
/// `Slot::tag`: the sequence number.
const SEQ: u64 = KEYED - 1;

/// One place in the ring: kept small (48 bytes for `Bytes`), as a slow
/// client's ring holds `capacity` of them. What is rare lives beside the
/// ring: gaps in `ClientBuffer::gaps`, replace keys in `slot_keys`.
struct Slot<T> {
    /// `None`: removed from the middle (a tombstone, skipped by `pop`).
    item: Option<T>,
    weight: usize,
    /// The sequence number, and the `CRITICAL` and `KEYED` flags.
    tag: u64,
}

impl<T> Slot<T> {
    fn seq(&self) -> u64 {
        self.tag & SEQ
    }

    fn is_droppable(&self) -> bool {
        self.item.is_some() && self.tag & CRITICAL == 0
    }
}

/// A bounded ring buffer for one client that drops the oldest frames.
///
/// Synchronous and lock-free inside: wrap it in your own mutex to share it,
/// or let [`BackpressureLayer`](crate::BackpressureLayer) do that for a
/// response body. Limits are in frames ([`BufferConfig::with_capacity`]) and
/// optionally in bytes ([`BufferConfig::with_max_bytes`], each item weighed by a
/// [`Weigher`]); whichever is reached first makes room by dropping, as
/// [`BufferConfig::with_overflow`] says: the oldest droppable frame
/// ([`Overflow::DropOldest`], the default, and also what the buffer itself
/// does under `Pause` and `Disconnect`, which the layer applies before
/// pushing) or the incoming one ([`Overflow::DropNewest`]).
///
/// Every drop is remembered at its place in the stream:
/// [`pop_with_gap`](Self::pop_with_gap) tells, with each item, how many
/// frames were lost right before it.
///
/// # An item larger than `max_bytes`
///
/// It is kept, alone: the ring empties to take it, and the evictions are
/// counted. A producer's frame size bounds it, so memory stays bounded by
/// `max(max_bytes, largest frame)`, and a stream of large frames still
/// reaches the client instead of being starved.
///
/// # Example: a slow client keeps the newest frames
///
/// ```
/// use tower_backpressure::{BufferConfig, ClientBuffer};
///
/// let mut buffer = ClientBuffer::with_weigher(BufferConfig::new(10), |_: &u32| 0);
/// for id in 0..20 {
///     buffer.push(id);
/// }
/// assert_eq!(buffer.len(), 10);
/// assert_eq!(buffer.stats().dropped, 10);
///
/// let (first, gap) = buffer.pop_with_gap().unwrap();
/// assert_eq!((first, gap.frames), (10, 10));
/// let rest: Vec<u32> = buffer.drain().collect();
/// assert_eq!(rest, (11..20).collect::<Vec<_>>());
/// assert!(buffer.is_empty());
/// ```
pub struct ClientBuffer<T, W = ByWeigh> {
    slots: VecDeque<Slot<T>>,
    /// Frames dropped right before a live slot, by its sequence number, in
    /// order; only slots with a gap have an entry.
    gaps: VecDeque<(u64, Gap)>,
    /// Latest live slot of each replace key.
    keys: HashMap<u64, u64>,
    /// The key of each live keyed slot, by sequence number.
    slot_keys: HashMap<u64, u64>,
    /// `config`'s byte limit, `usize::MAX` for none.
    max_bytes: usize,
    /// Shared: the layer hands every client's buffer its own configuration
    /// (no copy per connection).
    config: Arc<BufferConfig>,
    pressure_frames: usize,
    pressure_bytes: usize,
    weigher: W,
    live: usize,
    bytes: usize,
    next_seq: u64,
    /// Frames dropped after the last live slot: attached to the next push.
    trailing_gap: Gap,
    pushed: u64,
    sent: u64,
    dropped: u64,
    dropped_bytes: u64,
    replaced: u64,
    high_water: usize,
    high_water_bytes: usize,
}

impl<T, W> fmt::Debug for ClientBuffer<T, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuffer")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<T> ClientBuffer<T> {
    /// A buffer that weighs items by their [`Weigh`] impl.
    ///
    /// # Panics
    ///
    /// If `config` is invalid, with the [`ConfigError`]'s message; use
    /// [`try_new`](Self::try_new) for configuration that comes from users.
    pub fn new(config: BufferConfig) -> Self {
        Self::with_weigher(config, ByWeigh)
    }

    /// Like [`new`](Self::new), but returns the error.
    pub fn try_new(config: BufferConfig) -> Result<Self, ConfigError> {
        Self::try_with_weigher(config, ByWeigh)
    }
}

impl<T, W> ClientBuffer<T, W> {
    /// A buffer that weighs items with `weigher`.
    ///
    /// # Panics
    ///
    /// If `config` is invalid, with the [`ConfigError`]'s message.
    pub fn with_weigher(config: BufferConfig, weigher: W) -> Self {
        match Self::try_with_weigher(config, weigher) {
            Ok(buffer) => buffer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`with_weigher`](Self::with_weigher), but returns the error.
    pub fn try_with_weigher(config: BufferConfig, weigher: W) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self::with_shared_config(Arc::new(config), weigher))
    }

    /// A buffer with `config`, already validated, shared with others.
    pub(crate) fn with_shared_config(config: Arc<BufferConfig>, weigher: W) -> Self {
        Self {
            // Grow on demand, from the first push: a client that keeps up
            // never needs more than a few slots, and every connection pays
            // for the slots it holds.
            slots: VecDeque::new(),
            gaps: VecDeque::new(),
            keys: HashMap::new(),
            slot_keys: HashMap::new(),
            max_bytes: config.max_bytes().unwrap_or(usize::MAX),
            pressure_frames: config.pressure_frames(),
            pressure_bytes: config.pressure_bytes().unwrap_or(usize::MAX),
            config,
            weigher,
            live: 0,
            bytes: 0,
            next_seq: 0,
            trailing_gap: Gap::default(),
            pushed: 0,
            sent: 0,
            dropped: 0,
            dropped_bytes: 0,
            replaced: 0,
            high_water: 0,
            high_water_bytes: 0,
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &BufferConfig {
        &self.config
    }

    /// The configuration, to share with the client state around it.
    pub(crate) fn shared_config(&self) -> &Arc<BufferConfig> {
        &self.config
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.live
    }

    /// No frame waiting.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Total weight of the frames waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether an item of `weight` bytes fits without dropping anything.
    #[inline]
    pub fn has_room_for(&self, weight: usize) -> bool {
        self.live < self.config.capacity()
            && (self.live == 0 || self.bytes.saturating_add(weight) <= self.max_bytes)
    }

    /// Whether a frame of `weight` and `class` fits without dropping
    /// anything: a replacing frame first frees its key's frame.
    pub(crate) fn has_room_for_class(&self, weight: usize, class: FrameClass) -> bool {
        let FrameClass::Replace(key) = class else {
            return self.has_room_for(weight);
        };
        let Some(index) = self.keys.get(&key).and_then(|&seq| self.index_of(seq)) else {
            return self.has_room_for(weight);
        };
        let live = self.live - 1;
        let bytes = self.bytes - self.slots[index].weight;
        live < self.config.capacity()
            && (live == 0 || bytes.saturating_add(weight) <= self.max_bytes)
    }

    /// Whether the buffer is at a limit: the next push would drop.
    pub fn is_full(&self) -> bool {
        !self.has_room_for(1)
    }

    /// Below the pressure threshold: fewer than `ceil(threshold × capacity)`
    /// frames, and (with a byte limit) fewer than `ceil(threshold ×
    /// max_bytes)` bytes.
    pub fn is_healthy(&self) -> bool {
        self.live < self.pressure_frames && self.bytes < self.pressure_bytes
    }

    /// Frames dropped after the newest waiting frame, not yet attached to a
    /// frame (they will be, to the next one pushed).
    pub fn trailing_gap(&self) -> Gap {
        self.trailing_gap
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BufferStats {
        BufferStats {
            buffered: self.live,
            buffered_bytes: self.bytes,
            capacity: self.config.capacity(),
            max_bytes: self.config.max_bytes(),
            pushed: self.pushed,
            sent: self.sent,
            dropped: self.dropped,
            dropped_bytes: self.dropped_bytes,
            replaced: self.replaced,
            high_water: self.high_water,
            high_water_bytes: self.high_water_bytes,
            healthy: self.is_healthy(),
        }
    }

    /// Takes the oldest frame, counting it as sent.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        self.pop_with_gap().map(|(item, _)| item)
    }

    /// Takes the oldest frame with the frames dropped right before it.
    #[inline(always)]
    pub fn pop_with_gap(&mut self) -> Option<(T, Gap)> {
        loop {
            let slot = self.slots.pop_front()?;
            if let Some(item) = slot.item {
                self.live -= 1;
                self.bytes -= slot.weight;
                self.sent += 1;
                let seq = slot.tag & SEQ;
                if slot.tag & KEYED != 0 {
                    self.forget_key(seq);
                }
                // Entries belong to live slots, in order: the first live
                // slot's entry, if any, is the first.
                let gap = match self.gaps.front() {
                    Some(&(at, gap)) if at == seq => {
                        self.gaps.pop_front();
                        gap
                    }
                    _ => Gap::default(),
                };
                return Some((item, gap));
            }
        }
    }

    /// The weight of the oldest frame and the gap before it, without taking
    /// it.
    pub fn peek(&self) -> Option<(&T, usize, Gap)> {
        let slot = self.slots.iter().find(|s| s.item.is_some())?;
        let gap = match self.gaps.front() {
            Some(&(at, gap)) if at == slot.seq() => gap,
            _ => Gap::default(),
        };
        Some((slot.item.as_ref()?, slot.weight, gap))
    }

    /// Takes every frame, oldest first, counting each as sent.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(move || self.pop())
    }

    /// Discards every waiting frame, counting them as dropped; returns what
    /// was discarded.
    pub fn clear(&mut self) -> Dropped {
        let mut evicted = Dropped::default();
        while let Some(slot) = self.slots.pop_front() {
            if slot.item.is_some() {
                evicted.frames += 1;
                evicted.bytes += slot.weight;
            }
        }
        for (_, gap) in self.gaps.drain(..) {
            self.trailing_gap.add(gap);
        }
        self.trailing_gap.add(Gap {
            frames: evicted.frames as u64,
            bytes: evicted.bytes as u64,
        });
        self.keys.clear();
        self.slot_keys.clear();
        self.live = 0;
        self.bytes = 0;
        self.dropped += evicted.frames as u64;
        self.dropped_bytes += evicted.bytes as u64;
        evicted
    }

    /// Takes the trailing gap: the stream ends after it.
    pub(crate) fn take_trailing_gap(&mut self) -> Gap {
        std::mem::take(&mut self.trailing_gap)
    }

    /// Empties the buffer without counting anything: for a response that
    /// has closed, whose frames will never be delivered.
    pub(crate) fn discard(&mut self) {
        self.slots.clear();
        self.gaps.clear();
        self.keys.clear();
        self.slot_keys.clear();
        self.live = 0;
        self.bytes = 0;
    }

    /// Counts an incoming frame dropped before it reached the ring (a memory
    /// budget refused it).
    pub(crate) fn count_rejected(&mut self, weight: usize) {
        self.pushed += 1;
        self.dropped += 1;
        self.dropped_bytes += weight as u64;
        self.trailing_gap.add(Gap {
            frames: 1,
            bytes: weight as u64,
        });
    }

    /// Drops the oldest droppable frame; `None` if every waiting frame is
    /// critical.
    #[inline]
    pub fn evict_oldest(&mut self) -> Option<(T, usize)> {
        // Usually the front: no tombstone to leave behind.
        let (item, weight) = if self.slots.front().is_some_and(Slot::is_droppable) {
            self.remove_front()
        } else {
            let index = self.slots.iter().position(Slot::is_droppable)?;
            self.remove_at(index)
        };
        self.dropped += 1;
        self.dropped_bytes += weight as u64;
        Some((item, weight))
    }

    /// Removes the live front slot, handing its gap (plus itself) on to the
    /// next live slot.
    #[inline(always)]
    fn remove_front(&mut self) -> (T, usize) {
        let slot = self.slots.pop_front().expect("a front slot");
        let item = slot.item.expect("live slot");
        let (weight, seq) = (slot.weight, slot.tag & SEQ);
        self.live -= 1;
        self.bytes -= weight;
        if slot.tag & KEYED != 0 {
            self.forget_key(seq);
        }
        let lost = Gap {
            frames: 1,
            bytes: weight as u64,
        };
        match self
            .slots
            .front()
            .filter(|s| s.item.is_some())
            .map(Slot::seq)
        {
            // The next live slot is the new front and the first live slot
            // now; the removed slot's entry, if any, is the first, and every
            // other entry is at or after `next`.
            Some(next) => match self.gaps.front().map(|&(at, _)| at) {
                // The usual case with a slow client: the gap moves on.
                Some(at) if at == seq => {
                    if self.gaps.len() > 1 && self.gaps[1].0 == next {
                        let (_, mut gap) = self.gaps.pop_front().expect("an entry");
                        gap.add(lost);
                        self.gaps[0].1.add(gap);
                    } else {
                        let (at, gap) = &mut self.gaps[0];
                        *at = next;
                        gap.add(lost);
                    }
                }
                Some(at) if at == next => self.gaps[0].1.add(lost),
                _ => self.gaps.push_front((next, lost)),
            },
            // A tombstone follows, or nothing.
            None => {
                let mut carried = self.take_gap(seq);
                carried.add(lost);
                self.carry_gap(0, carried);
                self.compact();
            }
        }
        (item, weight)
    }

    /// Removes the live slot at `index`, handing its gap (plus itself) on to
    /// the next live slot.
    fn remove_at(&mut self, index: usize) -> (T, usize) {
        let slot = &mut self.slots[index];
        let item = slot.item.take().expect("live slot");
        let (weight, tag) = (slot.weight, slot.tag);
        let seq = tag & SEQ;
        self.live -= 1;
        self.bytes -= weight;
        if tag & KEYED != 0 {
            self.forget_key(seq);
        }
        let mut carried = self.take_gap(seq);
        carried.add(Gap {
            frames: 1,
            bytes: weight as u64,
        });
        self.carry_gap(index + 1, carried);
        self.compact();
        (item, weight)
    }

    /// Removes and returns the gap before the slot `seq`.
    fn take_gap(&mut self, seq: u64) -> Gap {
        // Usually the first entry: drops happen at the front.
        match self.gaps.front() {
            Some(&(at, gap)) if at == seq => {
                self.gaps.pop_front();
                gap
            }
            _ => match self.gaps.binary_search_by_key(&seq, |&(at, _)| at) {
                Ok(i) => self
                    .gaps
                    .remove(i)
                    .map_or_else(Gap::default, |(_, gap)| gap),
                Err(_) => Gap::default(),
            },
        }
    }

    /// Adds `gap` to the first live slot at or after `from`, or to the
    /// trailing gap.
    fn carry_gap(&mut self, from: usize, gap: Gap) {
        let next = self
            .slots
            .iter()
            .skip(from)
            .find(|s| s.item.is_some())
            .map(Slot::seq);
        let Some(seq) = next else {
            self.trailing_gap.add(gap);
            return;
        };
        match self.gaps.front_mut() {
            // Usually the front: drops happen there.
            Some((at, front)) if *at == seq => front.add(gap),
            Some((at, _)) if *at < seq => {
                match self.gaps.binary_search_by_key(&seq, |&(at, _)| at) {
                    Ok(i) => self.gaps[i].1.add(gap),
                    Err(i) => self.gaps.insert(i, (seq, gap)),
                }
            }
            _ => self.gaps.push_front((seq, gap)),
        }
    }

    /// Forgets the key of the keyed slot `seq`, unless a newer slot holds it.
    fn forget_key(&mut self, seq: u64) {
        if let Some(k) = self.slot_keys.remove(&seq) {
            if self.keys.get(&k) == Some(&seq) {
                self.keys.remove(&k);
            }
        }
    }

    /// Drops tombstones from the front, and all of them once they outnumber
    /// live slots, so the ring stays within a constant factor of its limits.
    fn compact(&mut self) {
        while self.slots.front().is_some_and(|s| s.item.is_none()) {
            self.slots.pop_front();
        }
        if self.slots.len() > 2 * self.live + 16 {
            self.slots.retain(|s| s.item.is_some());
        }
    }

    fn index_of(&self, seq: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&seq, Slot::seq).ok()
    }
}

impl<T, W: Weigher<T>> ClientBuffer<T, W> {
    /// Appends a droppable `item`, dropping frames if a limit would be
    /// exceeded; returns what was dropped.
    #[inline]
    pub fn push(&mut self, item: T) -> Dropped {
        self.push_with(item, FrameClass::Droppable, drop)
    }

    /// Appends `item` of `class`, handing every dropped item (oldest first;
    /// under [`Overflow::DropNewest`] possibly `item` itself) to `on_drop`.
    #[inline(always)]
    pub fn push_with(&mut self, item: T, class: FrameClass, on_drop: impl FnMut(T)) -> Dropped {
        let weight = self.weigher.weigh(&item);
        if !matches!(class, FrameClass::Replace(_)) {
            let tag = if class == FrameClass::Critical {
                CRITICAL
            } else {
                0
            };
            // The common cases, kept small enough to inline. A fast client:
            // there is room.
            if self.has_room_for(weight) {
                self.pushed += 1;
                self.append(item, weight, tag);
                return Dropped::default();
            }
            // A slow client: dropping the oldest frame, at the front, makes
            // room.
            if let Some(front) = self.slots.front() {
                if front.is_droppable()
                    && self.config.overflow() != Overflow::DropNewest
                    && self.live <= self.config.capacity()
                    && (self.live == 1
                        || (self.bytes - front.weight).saturating_add(weight) <= self.max_bytes)
                {
                    return self.replace_front(item, weight, tag, on_drop);
                }
            }
        }
        self.push_slow(item, weight, class, on_drop)
    }

    /// Drops the (droppable) front frame and appends `item`: the steady
    /// state of a slow client.
    #[inline]
    fn replace_front(
        &mut self,
        item: T,
        weight: usize,
        tag: u64,
        mut on_drop: impl FnMut(T),
    ) -> Dropped {
        self.pushed += 1;
        let (old, old_weight) = self.remove_front();
        self.dropped += 1;
        self.dropped_bytes += old_weight as u64;
        on_drop(old);
        self.append(item, weight, tag);
        Dropped {
            frames: 1,
            bytes: old_weight,
        }
    }

    /// Appends a slot; the limits were seen to.
    #[inline]
    fn append(&mut self, item: T, weight: usize, flags: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if !self.trailing_gap.is_empty() {
            let gap = std::mem::take(&mut self.trailing_gap);
            self.gaps.push_back((seq, gap));
        }
        self.slots.push_back(Slot {
            item: Some(item),
            weight,
            tag: seq | flags,
        });
        self.live += 1;
        self.bytes += weight;
        self.high_water = self.high_water.max(self.live);
        self.high_water_bytes = self.high_water_bytes.max(self.bytes);
    }

    /// `push_with` when something must be dropped or replaced.
    #[inline(never)]
    fn push_slow(
        &mut self,
        item: T,
        weight: usize,
        class: FrameClass,
        mut on_drop: impl FnMut(T),
    ) -> Dropped {
        self.pushed += 1;
        let key = match class {
            FrameClass::Replace(key) => {
                if let Some(index) = self.keys.get(&key).and_then(|&seq| self.index_of(seq)) {
                    let slot = &mut self.slots[index];
                    let old = slot.item.take().expect("keys point at live slots");
                    let seq = slot.seq();
                    self.live -= 1;
                    self.bytes -= slot.weight;
                    self.replaced += 1;
                    self.keys.remove(&key);
                    self.slot_keys.remove(&seq);
                    let gap = self.take_gap(seq);
                    // What was lost before the superseded frame is still lost.
                    if !gap.is_empty() {
                        self.carry_gap(index + 1, gap);
                    }
                    self.compact();
                    drop(old);
                }
                Some(key)
            }
            _ => None,
        };
        let critical = class == FrameClass::Critical;
        let mut evicted = Dropped::default();
        while !self.has_room_for(weight) {
            let drop_new = !critical
                && (self.config.overflow() == Overflow::DropNewest
                    || !(self.slots.front().is_some_and(Slot::is_droppable)
                        || self.slots.iter().any(Slot::is_droppable)));
            if drop_new {
                self.dropped += 1;
                self.dropped_bytes += weight as u64;
                self.trailing_gap.add(Gap {
                    frames: 1,
                    bytes: weight as u64,
                });
                evicted.frames += 1;
                evicted.bytes += weight;
                on_drop(item);
                return evicted;
            }
            match self.evict_oldest() {
                Some((old, w)) => {
                    evicted.frames += 1;
                    evicted.bytes += w;
                    on_drop(old);
                }
                // Only critical frames left and this one is critical too.
                None => break,
            }
        }
        let mut flags = if critical { CRITICAL } else { 0 };
        if let Some(k) = key {
            let seq = self.next_seq;
            self.keys.insert(k, seq);
            self.slot_keys.insert(seq, k);
            flags |= KEYED;
        }
        self.append(item, weight, flags);
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overflow;

    #[derive(Debug, PartialEq)]
    struct Event {
        id: u32,
    }
    impl Weigh for Event {}

    #[test]
    fn typescript_guide_slow_client_scenario() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(10));
        for id in 0..20 {
            buffer.push(Event { id });
        }
        assert_eq!(buffer.len(), 10);
        assert_eq!(buffer.stats().dropped, 10);

        let sent: Vec<u32> = buffer.drain().map(|e| e.id).collect();
        assert_eq!(buffer.len(), 0);
        assert_eq!(sent.len(), 10);
        assert_eq!(sent[0], 10);
        assert_eq!(sent, (10..=19).collect::<Vec<_>>());
        let s = buffer.stats();
        assert_eq!(
            (s.pushed, s.sent, s.dropped, s.high_water),
            (20, 10, 10, 10)
        );
    }

    #[test]
    fn push_reports_what_it_evicted_in_order() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(3));
        for i in 0..3u8 {
            assert_eq!(buffer.push(Bytes::from(vec![i; 4])), Dropped::default());
        }
        let mut gone = Vec::new();
        let ev = buffer.push_with(
            Bytes::from_static(b"new"),
            FrameClass::Droppable,
            |b: Bytes| gone.push(b[0]),
        );
        assert_eq!(
            ev,
            Dropped {
                frames: 1,
                bytes: 4
            }
        );
        assert_eq!(gone, vec![0]);
        assert_eq!(buffer.pop().unwrap()[0], 1);
    }

    #[test]
    fn byte_limit_evicts_oldest_first_and_is_never_exceeded() {
        let config = BufferConfig::new(1000).with_max_bytes(100);
        let mut buffer = ClientBuffer::new(config);
        for i in 0..50u8 {
            buffer.push(Bytes::from(vec![i; 30]));
            assert!(buffer.bytes() <= 100, "{} bytes buffered", buffer.bytes());
        }
        // 3 frames of 30 fit in 100 bytes.
        assert_eq!(buffer.len(), 3);
        let s = buffer.stats();
        assert_eq!(s.buffered_bytes, 90);
        assert_eq!(s.dropped, 47);
        assert_eq!(s.dropped_bytes, 47 * 30);
        assert_eq!(s.high_water_bytes, 90);
        let firsts: Vec<u8> = buffer.drain().map(|b| b[0]).collect();
        assert_eq!(firsts, vec![47, 48, 49]);
    }

    #[test]
    fn mixed_sizes_evict_as_many_as_needed() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(100).with_max_bytes(10));
        buffer.push(Bytes::from_static(b"aa"));
        buffer.push(Bytes::from_static(b"bbb"));
        buffer.push(Bytes::from_static(b"cccc"));
        let ev = buffer.push(Bytes::from_static(b"dddddd"));
        assert_eq!(
            ev,
            Dropped {
                frames: 2,
                bytes: 5
            }
        );
        let rest: Vec<Bytes> = buffer.drain().collect();
        assert_eq!(rest, vec![&b"cccc"[..], &b"dddddd"[..]]);
    }

    #[test]
    fn oversized_item_is_kept_alone() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(10).with_max_bytes(8));
        buffer.push(Bytes::from_static(b"abc"));
        buffer.push(Bytes::from_static(b"def"));
        let ev = buffer.push(Bytes::from(vec![b'x'; 20]));
        assert_eq!(
            ev,
            Dropped {
                frames: 2,
                bytes: 6
            }
        );
        assert_eq!(buffer.len(), 1);
        assert_eq!(buffer.bytes(), 20);
        // The next normal frame evicts the oversized one.
        let ev = buffer.push(Bytes::from_static(b"ghi"));
        assert_eq!(
            ev,
            Dropped {
                frames: 1,
                bytes: 20
            }
        );
        assert_eq!(buffer.pop().unwrap(), &b"ghi"[..]);
        assert_eq!(buffer.stats().sent, 1);
    }

    #[test]
    fn health_follows_the_threshold() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(10).with_threshold(0.5));
        for i in 0..4 {
            buffer.push(Event { id: i });
            assert!(buffer.is_healthy());
        }
        buffer.push(Event { id: 4 });
        assert!(!buffer.is_healthy());
        assert!(!buffer.stats().healthy);
        buffer.pop();
        assert!(buffer.is_healthy());
    }

    #[test]
    fn byte_threshold_counts_too() {
        let mut buffer = ClientBuffer::new(
            BufferConfig::new(100)
                .with_max_bytes(100)
                .with_threshold(0.5),
        );
        buffer.push(Bytes::from(vec![0; 49]));
        assert!(buffer.is_healthy());
        buffer.push(Bytes::from(vec![0; 1]));
        assert!(!buffer.is_healthy());
    }

    #[test]
    fn counters_keep_their_invariant() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(7).with_max_bytes(50));
        for i in 0..1000usize {
            buffer.push(Bytes::from(vec![0; i % 13]));
            if i % 3 == 0 {
                buffer.pop();
            }
            let s = buffer.stats();
            assert_eq!(s.pushed, s.sent + s.dropped + s.buffered as u64);
            assert!(s.buffered <= 7);
        }
        let cleared = buffer.clear();
        let s = buffer.stats();
        assert_eq!(s.buffered, 0);
        assert_eq!(s.pushed, s.sent + s.dropped);
        assert!(cleared.frames > 0);
    }

    #[test]
    fn frames_weigh_their_data() {
        assert_eq!(Frame::data(Bytes::from_static(b"hello")).weigh(), 5);
        assert_eq!(Frame::<Bytes>::trailers(Default::default()).weigh(), 0);
        assert_eq!(String::from("abc").weigh(), 3);
        assert_eq!(vec![1u8, 2].weigh(), 2);
    }

    #[test]
    #[should_panic(expected = "invalid buffer config: capacity must be at least 1")]
    fn invalid_config_panics_in_new() {
        let _ = ClientBuffer::<Bytes>::new(BufferConfig::new(0));
    }

    #[test]
    fn try_new_returns_the_error() {
        assert!(
            ClientBuffer::<Bytes>::try_new(BufferConfig::default().with_threshold(2.0)).is_err()
        );
    }

    fn ids(buffer: &mut ClientBuffer<Event>) -> Vec<(u32, u64)> {
        std::iter::from_fn(|| buffer.pop_with_gap())
            .map(|(e, g)| (e.id, g.frames))
            .collect()
    }

    #[test]
    fn gaps_sit_where_frames_were_lost() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(3));
        for id in 0..3 {
            buffer.push(Event { id });
        }
        assert_eq!(buffer.pop().unwrap().id, 0);
        for id in 3..7 {
            buffer.push(Event { id });
        }
        // 1, 2 and 3 were dropped, right before 4.
        assert_eq!(ids(&mut buffer), vec![(4, 3), (5, 0), (6, 0)]);
    }

    #[test]
    fn drop_newest_keeps_the_oldest_and_marks_the_gap_after_them() {
        let config = BufferConfig::new(3).with_overflow(Overflow::DropNewest);
        let mut buffer = ClientBuffer::new(config);
        for id in 0..10 {
            buffer.push(Event { id });
        }
        assert_eq!(buffer.trailing_gap().frames, 7);
        assert_eq!(ids(&mut buffer), vec![(0, 0), (1, 0), (2, 0)]);
        buffer.push(Event { id: 10 });
        assert_eq!(ids(&mut buffer), vec![(10, 7)]);
        let s = buffer.stats();
        assert_eq!((s.pushed, s.sent, s.dropped), (11, 4, 7));
    }

    #[test]
    fn critical_frames_are_never_dropped() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(3));
        buffer.push_with(Event { id: 0 }, FrameClass::Critical, drop);
        for id in 1..10 {
            buffer.push(Event { id });
        }
        // The critical frame stays first; droppable ones rotate behind it,
        // and the gap sits after it.
        assert_eq!(ids(&mut buffer), vec![(0, 0), (8, 7), (9, 0)]);

        // Only critical frames: the buffer grows past its limit.
        for id in 0..5 {
            buffer.push_with(Event { id }, FrameClass::Critical, drop);
        }
        assert_eq!(buffer.len(), 5);
        // A droppable frame cannot push one out: it is dropped itself.
        let d = buffer.push(Event { id: 99 });
        assert_eq!(d.frames, 1);
        assert_eq!(buffer.len(), 5);
        assert_eq!(buffer.trailing_gap().frames, 1);
    }

    #[test]
    fn replace_keeps_only_the_newest_of_a_key_without_a_gap() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(10));
        buffer.push_with(Event { id: 0 }, FrameClass::Replace(7), drop);
        buffer.push(Event { id: 1 });
        buffer.push_with(Event { id: 2 }, FrameClass::Replace(7), drop);
        buffer.push_with(Event { id: 3 }, FrameClass::Replace(8), drop);
        buffer.push_with(Event { id: 4 }, FrameClass::Replace(7), drop);
        assert_eq!(buffer.len(), 3);
        let s = buffer.stats();
        assert_eq!((s.replaced, s.dropped), (2, 0));
        assert_eq!(ids(&mut buffer), vec![(1, 0), (3, 0), (4, 0)]);
        let s = buffer.stats();
        assert_eq!(
            s.pushed,
            s.sent + s.dropped + s.replaced + s.buffered as u64
        );
        // After the key's frame went out, the key starts afresh.
        buffer.push_with(Event { id: 5 }, FrameClass::Replace(7), drop);
        assert_eq!(ids(&mut buffer), vec![(5, 0)]);
    }

    #[test]
    fn a_replaced_frame_hands_its_gap_on() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(2));
        buffer.push(Event { id: 0 });
        buffer.push(Event { id: 1 });
        buffer.push_with(Event { id: 2 }, FrameClass::Replace(1), drop); // drops 0
        buffer.push_with(Event { id: 3 }, FrameClass::Replace(1), drop); // replaces 2
        // 0 was lost before 1; nothing is lost between 1 and 3.
        assert_eq!(ids(&mut buffer), vec![(1, 1), (3, 0)]);
    }

    #[test]
    fn tombstones_stay_bounded_when_a_critical_frame_blocks_the_front() {
        let mut buffer = ClientBuffer::new(BufferConfig::new(4));
        buffer.push_with(Event { id: 0 }, FrameClass::Critical, drop);
        for id in 1..100_000 {
            buffer.push(Event { id });
            assert!(buffer.slots.len() <= 2 * buffer.len() + 17);
        }
        assert_eq!(buffer.len(), 4);
        let got = ids(&mut buffer);
        assert_eq!(got[0], (0, 0));
        assert_eq!(got.last().unwrap().0, 99_999);
        let lost: u64 = got.iter().map(|(_, g)| g).sum();
        assert_eq!(lost, buffer.stats().dropped);
    }

    #[test]
    fn counters_keep_their_invariant_under_every_class() {
        for overflow in [Overflow::DropOldest, Overflow::DropNewest] {
            let mut buffer = ClientBuffer::new(
                BufferConfig::new(5)
                    .with_max_bytes(60)
                    .with_overflow(overflow),
            );
            let mut seen_gap = 0;
            for i in 0..2000usize {
                let class = match i % 7 {
                    0 => FrameClass::Critical,
                    1 | 2 => FrameClass::Replace((i % 3) as u64),
                    _ => FrameClass::Droppable,
                };
                buffer.push_with(Bytes::from(vec![0; i % 17]), class, drop);
                if i % 4 == 0 {
                    if let Some((_, g)) = buffer.pop_with_gap() {
                        seen_gap += g.frames;
                    }
                }
                let s = buffer.stats();
                assert_eq!(
                    s.pushed,
                    s.sent + s.dropped + s.replaced + s.buffered as u64
                );
            }
            while let Some((_, g)) = buffer.pop_with_gap() {
                seen_gap += g.frames;
            }
            seen_gap += buffer.trailing_gap().frames;
            assert_eq!(seen_gap, buffer.stats().dropped, "{overflow:?}");
        }
    }
}
