//! Where a client's frames wait: the one thing the state machine asks of a
//! storage.
//!
//! Two storages implement it: a private [`ClientBuffer`] ring per client,
//! and a window over a hub's shared log (`crate::hub::window`), which the
//! hub fills and which only reads the log.

use std::any::Any;
use std::task::Waker;

use bytes::{Bytes, BytesMut};

use crate::buffer::{BufferStats, ClientBuffer, Dropped, FrameClass, Gap, Weigher};

use http::HeaderMap;

use crate::config::{BufferConfig, Overflow};
use crate::observer::EvictReason;

/// The frames of one client, oldest first, with the gaps between them.
pub(crate) trait Storage<D> {
    /// The limits the storage applies.
    fn config(&self) -> &BufferConfig;
    /// Frames waiting.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes waiting, as weighed.
    fn bytes(&self) -> usize;
    /// At or over the frame limit (the producer waits under `Pause`).
    fn is_full(&self) -> bool;
    /// Under the pressure threshold.
    fn is_healthy(&self) -> bool;
    /// A frame of `weight` and `class` fits without dropping anything (a
    /// replacing frame takes its key's frame's place first).
    fn has_room_for_class(&self, weight: usize, class: FrameClass) -> bool;
    /// How many bytes the storage can grow by when a frame of `weight` and
    /// `class` arrives, after dropping what its own policy drops for it: what
    /// a memory budget has to find room for.
    fn growth(&self, weight: usize, class: FrameClass) -> usize;
    /// Counts a frame that was dropped before it reached the storage.
    fn reject(&mut self, weight: usize);
    /// Takes the oldest frame and the gap before it.
    fn pop(&mut self) -> Option<(D, Gap)>;
    /// The oldest frame's weight and the gap before it.
    fn peek_meta(&self) -> Option<(usize, Gap)>;

    /// `Flush::Coalesce`'s step after the first frame: appends the frames
    /// that follow to `joined` (`Bytes` frames only) while no gap comes
    /// before them, their weight fits in `max_bytes` with what is joined
    /// and fewer than `max_frames` were taken; returns how many it took.
    /// Taken as [`pop`](Self::pop) takes them. A window over a hub's log
    /// reads them under one lock (this default takes the log's lock twice
    /// per frame).
    fn join(&mut self, joined: &mut BytesMut, max_frames: usize, max_bytes: usize) -> usize
    where
        D: 'static,
    {
        join_each(self, joined, max_frames, max_bytes)
    }
    /// Frames lost after the last frame that waits.
    fn trailing_gap(&self) -> Gap;
    fn take_trailing_gap(&mut self) -> Gap;
    /// Drops the oldest droppable frame (a memory budget sheds it).
    fn evict_oldest(&mut self) -> Option<usize>;
    /// Empties the storage without counting: the stream has closed.
    fn discard(&mut self);
    fn stats(&self) -> BufferStats;

    /// Whether others than the producer side fill the storage (a window
    /// over a hub's log): only then is [`refresh`](Self::refresh) needed.
    fn filled_by_others(&self) -> bool {
        false
    }

    /// Brings a storage that others fill (a window over a hub's log) up to
    /// date: applies its limits to what arrived since it last looked.
    /// Returns what that dropped, or the rule that evicts its client
    /// instead (`Overflow::Disconnect`, a critical frame it would skip).
    ///
    /// With `park`, a storage that finds nothing waiting may leave the
    /// waker as [`park`](Self::park) would, in the same step; the consumer's
    /// `park` right after then has nothing more to do.
    fn refresh(&mut self, _park: Option<&Waker>) -> Result<Dropped, EvictReason> {
        Ok(Dropped::default())
    }

    /// Nothing waits: leaves `waker` with whatever fills the storage, unless
    /// something arrived meanwhile (`false`: look again). A storage the
    /// producer side fills has nothing to do: the producer wakes the
    /// consumer.
    fn park(&mut self, _waker: &Waker) -> bool {
        true
    }

    /// The storage has delivered all it ever will (a window with a limit).
    fn ended(&self) -> bool {
        false
    }

    /// The trailers that end the stream once the storage has ended.
    fn end_trailers(&mut self) -> Option<HeaderMap> {
        None
    }

    /// The stream is ending (a shutdown): hand out what waits now, nothing
    /// that arrives later. A storage the producer fills has nothing to do:
    /// the producer is stopped.
    fn stop(&mut self) {}
}

/// [`Storage::join`] a frame at a time: peek, then pop.
pub(crate) fn join_each<D: 'static, S: Storage<D> + ?Sized>(
    storage: &mut S,
    joined: &mut BytesMut,
    max_frames: usize,
    max_bytes: usize,
) -> usize {
    let mut taken = 0;
    while taken < max_frames
        && storage
            .peek_meta()
            .is_some_and(|(w, gap)| gap.is_empty() && joined.len() + w <= max_bytes)
    {
        let Some((next, _)) = storage.pop() else {
            break;
        };
        if let Some(b) = (&next as &dyn Any).downcast_ref::<Bytes>() {
            joined.extend_from_slice(b);
        }
        taken += 1;
    }
    taken
}

impl<D, S: Storage<D> + ?Sized> Storage<D> for Box<S> {
    fn config(&self) -> &BufferConfig {
        (**self).config()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn bytes(&self) -> usize {
        (**self).bytes()
    }
    fn is_full(&self) -> bool {
        (**self).is_full()
    }
    fn is_healthy(&self) -> bool {
        (**self).is_healthy()
    }
    fn has_room_for_class(&self, weight: usize, class: FrameClass) -> bool {
        (**self).has_room_for_class(weight, class)
    }
    fn growth(&self, weight: usize, class: FrameClass) -> usize {
        (**self).growth(weight, class)
    }
    fn reject(&mut self, weight: usize) {
        (**self).reject(weight)
    }
    fn pop(&mut self) -> Option<(D, Gap)> {
        (**self).pop()
    }
    fn peek_meta(&self) -> Option<(usize, Gap)> {
        (**self).peek_meta()
    }
    fn trailing_gap(&self) -> Gap {
        (**self).trailing_gap()
    }
    fn take_trailing_gap(&mut self) -> Gap {
        (**self).take_trailing_gap()
    }
    fn evict_oldest(&mut self) -> Option<usize> {
        (**self).evict_oldest()
    }
    fn discard(&mut self) {
        (**self).discard()
    }
    fn stats(&self) -> BufferStats {
        (**self).stats()
    }
    fn filled_by_others(&self) -> bool {
        (**self).filled_by_others()
    }
    fn refresh(&mut self, park: Option<&Waker>) -> Result<Dropped, EvictReason> {
        (**self).refresh(park)
    }
    fn park(&mut self, waker: &Waker) -> bool {
        (**self).park(waker)
    }
    fn ended(&self) -> bool {
        (**self).ended()
    }
    fn end_trailers(&mut self) -> Option<HeaderMap> {
        (**self).end_trailers()
    }
    fn stop(&mut self) {
        (**self).stop()
    }
    fn join(&mut self, joined: &mut BytesMut, max_frames: usize, max_bytes: usize) -> usize
    where
        D: 'static,
    {
        (**self).join(joined, max_frames, max_bytes)
    }
}

/// A storage that frames can be pushed into (it knows their weight).
pub(crate) trait Admit<D>: Storage<D> {
    /// Adds a frame under the overflow policy; returns what was dropped.
    fn push(&mut self, item: D, class: FrameClass) -> Dropped;
}

impl<D, W: Weigher<D>> Admit<D> for ClientBuffer<D, W> {
    #[inline]
    fn push(&mut self, item: D, class: FrameClass) -> Dropped {
        self.push_with(item, class, drop)
    }
}

impl<D, W> Storage<D> for ClientBuffer<D, W> {
    fn config(&self) -> &BufferConfig {
        ClientBuffer::config(self)
    }

    #[inline]
    fn len(&self) -> usize {
        ClientBuffer::len(self)
    }

    #[inline]
    fn bytes(&self) -> usize {
        ClientBuffer::bytes(self)
    }

    #[inline]
    fn is_full(&self) -> bool {
        ClientBuffer::is_full(self)
    }

    #[inline]
    fn is_healthy(&self) -> bool {
        ClientBuffer::is_healthy(self)
    }

    fn has_room_for_class(&self, weight: usize, class: FrameClass) -> bool {
        ClientBuffer::has_room_for_class(self, weight, class)
    }

    fn growth(&self, weight: usize, class: FrameClass) -> usize {
        if class == FrameClass::Critical || self.has_room_for(weight) {
            return weight;
        }
        let config = ClientBuffer::config(self);
        if config.overflow() == Overflow::DropNewest {
            // The incoming frame is the one dropped.
            return 0;
        }
        // Dropping the oldest makes room: the ring ends no fuller than its
        // byte limit, or one frame of the same count for the one dropped.
        let by_bytes = config
            .max_bytes()
            .map(|max| max.max(weight).saturating_sub(self.bytes()));
        let by_frames = self
            .peek()
            .filter(|_| self.len() >= config.capacity())
            .map(|(_, oldest, _)| weight.saturating_sub(oldest));
        match (by_bytes, by_frames) {
            (Some(a), Some(b)) => a.max(b).min(weight),
            (Some(a), None) | (None, Some(a)) => a.min(weight),
            (None, None) => weight,
        }
    }

    fn reject(&mut self, weight: usize) {
        self.count_rejected(weight)
    }

    #[inline]
    fn pop(&mut self) -> Option<(D, Gap)> {
        self.pop_with_gap()
    }

    #[inline]
    fn peek_meta(&self) -> Option<(usize, Gap)> {
        ClientBuffer::peek(self).map(|(_, weight, gap)| (weight, gap))
    }

    #[inline]
    fn trailing_gap(&self) -> Gap {
        ClientBuffer::trailing_gap(self)
    }

    fn take_trailing_gap(&mut self) -> Gap {
        ClientBuffer::take_trailing_gap(self)
    }

    fn evict_oldest(&mut self) -> Option<usize> {
        ClientBuffer::evict_oldest(self).map(|(_, w)| w)
    }

    fn discard(&mut self) {
        ClientBuffer::discard(self)
    }

    #[inline]
    fn stats(&self) -> BufferStats {
        ClientBuffer::stats(self)
    }
}
