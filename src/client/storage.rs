//! Where a client's frames wait: the one thing the state machine asks of a
//! storage.
//!
//! Today that is a private [`ClientBuffer`] ring per client; a window over a
//! shared log fits the same trait.

use crate::buffer::{BufferStats, ClientBuffer, Dropped, FrameClass, Gap, Weigher};
use crate::config::{BufferConfig, Overflow};

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
    /// The oldest frame, its weight and the gap before it.
    fn peek(&self) -> Option<(&D, usize, Gap)>;
    /// Frames lost after the last frame that waits.
    fn trailing_gap(&self) -> Gap;
    fn take_trailing_gap(&mut self) -> Gap;
    /// Drops the oldest droppable frame (a memory budget sheds it).
    fn evict_oldest(&mut self) -> Option<usize>;
    /// Empties the storage without counting: the stream has closed.
    fn discard(&mut self);
    fn stats(&self) -> BufferStats;
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
    fn peek(&self) -> Option<(&D, usize, Gap)> {
        ClientBuffer::peek(self)
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
