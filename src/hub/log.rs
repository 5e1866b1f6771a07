//! The shared log and its cursors: the core every reader of a hub uses (its
//! [`Subscription`](super::Subscription)s, and the per-client windows of the
//! layer).
//!
//! # Cursors
//!
//! A reader's position is a [`Cursor`]: `next`, **the id of the next frame it
//! wants**, and `pos`, the number of bytes published before that frame when
//! it is known. A reader at cursor `c` is handed the retained frames with
//! `id >= c`, oldest first; before a frame with id `i` it has skipped
//! `i - c` ids (frames the log no longer retains, and ids that never
//! reached it), after which its cursor is `i + 1`.
//!
//! One cursor is special: [`Cursor::START`] (`next == 0`) wants the hub's
//! first frame *whatever its id*: the ids below the first frame ever
//! published were never part of this log, so a reader that wanted everything
//! from the start missed none of them. That is where a reader made before
//! anything was published stands (a producer's own ids rarely start at 0).
//! Every other cursor counts every id it skips, holes included: a client
//! resuming from `Last-Event-ID: 500` on a hub whose first frame is 1000
//! missed 501..=999.
//!
//! # Costs
//!
//! Every operation is O(1) or O(log n) in the number of retained frames (a
//! binary search on ids), plus O(k) for the k frames read; none depends on
//! the number of readers. The log knows nothing of its readers except the
//! parked ones (readers that found nothing new and left a waker): the next
//! push takes the whole parked list, and each of them is woken once.
//!
//! The log sits behind the hub's mutex: lock it once, then read, look at the
//! backlog and park under the same guard.

use std::collections::VecDeque;
use std::task::Waker;

use super::config::HubConfig;
use crate::buffer::Gap;

/// The highest id a frame can have: `u64::MAX` is reserved, so that the
/// cursor after any frame (`id + 1`) exists.
pub(crate) const MAX_ID: u64 = u64::MAX - 1;

/// A retained frame.
#[derive(Debug)]
pub(crate) struct Entry<T> {
    /// Strictly increasing along the log.
    pub(crate) id: u64,
    pub(crate) item: T,
    /// As weighed by the hub's weigher.
    pub(crate) weight: usize,
    /// The total weight of every frame published before this one.
    pub(crate) bytes_before: u64,
}

/// A reader's position in the log: see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// The id of the next frame wanted.
    pub(crate) next: u64,
    /// The bytes published before that frame, when known (not when a reader
    /// resumed from an id older than the log retains).
    pub(crate) pos: Option<u64>,
}

impl Cursor {
    /// The hub's first frame, whatever its id.
    pub(crate) const START: Cursor = Cursor {
        next: 0,
        pos: Some(0),
    };
}

/// A reader's place in the parked list, kept by the reader (the log keeps no
/// state per reader). Stale once a push has drained the list.
#[derive(Debug, Default)]
pub(crate) struct Parked {
    /// The round of the parked list and the index in it.
    slot: Option<(u64, usize)>,
}

impl Parked {
    /// The reader may still be in the parked list (a push may have drained
    /// it since): [`Log::unpark`] before it goes.
    pub(crate) fn may_be_parked(&self) -> bool {
        self.slot.is_some()
    }
}

/// What a push leaves to do once the lock is released: wake the parked
/// readers, and drop the frame the retention let go of.
#[must_use = "wake the parked readers once the lock is released"]
pub(crate) struct Pushed<T> {
    wakers: Vec<Option<Waker>>,
    _evicted: Option<Entry<T>>,
}

impl<T> Pushed<T> {
    /// Wakes each reader that was parked, once; drops the evicted frame.
    pub(crate) fn finish(self) {
        for waker in self.wakers.into_iter().flatten() {
            waker.wake();
        }
    }
}

/// The log of one hub: its retained frames, oldest first, and its parked
/// readers.
#[derive(Debug)]
pub(crate) struct Log<T> {
    entries: VecDeque<Entry<T>>,
    retain_frames: usize,
    /// `usize::MAX` for no limit.
    retain_bytes: usize,
    /// Weight of the retained frames: wide enough that a weigher's value
    /// cannot overflow it (each is at most `usize::MAX`).
    bytes: u128,
    /// Weight of every frame ever published.
    total_bytes: u64,
    /// The id of the first frame ever published.
    first_id: Option<u64>,
    published: u64,
    dropped: u64,
    /// Wakers of the readers parked since the last push; `None` where a
    /// reader left (its index is in `free`).
    parked: Vec<Option<Waker>>,
    free: Vec<usize>,
    /// How many times a push took the parked list: tells a reader whether
    /// its place in it is still its own.
    round: u64,
    /// Set by [`close`](Self::close): the cursor after the newest frame
    /// then. Readers get the frames before it, then end; frames pushed
    /// after it reach no reader.
    closed_at: Option<u64>,
}

impl<T> Log<T> {
    pub(crate) fn new(config: HubConfig) -> Self {
        Self {
            entries: VecDeque::new(),
            retain_frames: config.retain_frames(),
            retain_bytes: config.retain_bytes().unwrap_or(usize::MAX),
            bytes: 0,
            total_bytes: 0,
            first_id: None,
            published: 0,
            dropped: 0,
            parked: Vec::new(),
            free: Vec::new(),
            round: 0,
            closed_at: None,
        }
    }

    /// Closes the log: every reader ends once it has read the frames
    /// retained now (a reader that resumes later ends at once, after them),
    /// and the parked readers are woken to see it. Idempotent. O(1), plus
    /// the parked readers.
    pub(crate) fn close(&mut self) -> Pushed<T> {
        if self.closed_at.is_none() {
            self.closed_at = Some(self.tail().next);
        }
        self.round += 1;
        self.free.clear();
        Pushed {
            wakers: std::mem::take(&mut self.parked),
            _evicted: None,
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed_at.is_some()
    }

    /// The index past the last frame a reader may get: every retained frame,
    /// or those before the close.
    fn end_index(&self) -> usize {
        match self.closed_at {
            None => self.entries.len(),
            Some(end) => self.entries.partition_point(|e| e.id < end),
        }
    }

    /// A reader at `next` has read everything it ever will: the log is
    /// closed and no frame before the close is left for it. O(log n).
    pub(crate) fn finished(&self, next: u64) -> bool {
        self.closed_at.is_some() && self.index(next) >= self.end_index()
    }

    /// The id of the newest frame. O(1).
    pub(crate) fn newest_id(&self) -> Option<u64> {
        self.entries.back().map(|e| e.id)
    }

    /// The id of the oldest retained frame. O(1).
    pub(crate) fn oldest_id(&self) -> Option<u64> {
        self.entries.front().map(|e| e.id)
    }

    /// Frames retained. O(1).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes retained. O(1).
    pub(crate) fn bytes(&self) -> usize {
        usize::try_from(self.bytes).unwrap_or(usize::MAX)
    }

    /// Frames ever published. O(1).
    pub(crate) fn published(&self) -> u64 {
        self.published
    }

    /// Frames the retention let go of. O(1).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The id a push without one gets: after the newest, or 0. `None` once
    /// the ids are exhausted. O(1).
    pub(crate) fn next_id(&self) -> Option<u64> {
        match self.newest_id() {
            None => Some(0),
            Some(MAX_ID) => None,
            Some(n) => Some(n + 1),
        }
    }

    /// Whether a frame with `id` can be pushed: ids strictly increase and
    /// stay at or below [`MAX_ID`]. O(1).
    pub(crate) fn accepts(&self, id: u64) -> bool {
        id <= MAX_ID && self.newest_id().is_none_or(|n| id > n)
    }

    /// The cursor after the newest frame: what a reader that wants only
    /// what comes next starts from ([`Cursor::START`] before the first
    /// frame). O(1).
    pub(crate) fn tail(&self) -> Cursor {
        match self.newest_id() {
            None => Cursor::START,
            Some(n) => Cursor {
                next: n + 1,
                pos: Some(self.total_bytes),
            },
        }
    }

    /// The cursor right after frame `id` (a `Last-Event-ID` resume): the
    /// [`tail`](Self::tail) if `id` is the newest or a future id (greater
    /// than the newest, or anything before the first frame), else `id + 1`,
    /// from which a read replays every retained frame after `id`, after a
    /// gap of the ids no longer retained. O(log n).
    pub(crate) fn after(&self, id: u64) -> Cursor {
        match self.newest_id() {
            Some(n) if id < n => {
                let next = id + 1;
                Cursor {
                    next,
                    pos: self.position(next),
                }
            }
            _ => self.tail(),
        }
    }

    /// The id a read from `next` counts from (see [`Cursor::START`]).
    pub(crate) fn effective(&self, next: u64) -> u64 {
        if next == Cursor::START.next {
            self.first_id.unwrap_or(next)
        } else {
            next
        }
    }

    /// Index of the first retained frame with an id at or after `next`.
    /// O(1) where the ids have no holes, else O(log n).
    pub(crate) fn index(&self, next: u64) -> usize {
        let from = self.effective(next);
        // Ids without holes (the common case): the frame is where its id
        // says. O(1).
        if let Some(front) = self.entries.front() {
            let Some(guess) = from.checked_sub(front.id) else {
                return 0;
            };
            match usize::try_from(guess).map(|i| (i, self.entries.get(i))) {
                Ok((i, Some(e))) if e.id == from => return i,
                Ok((_, None)) if self.entries.back().is_some_and(|b| b.id < from) => {
                    return self.entries.len();
                }
                _ => {}
            }
        }
        self.entries.partition_point(|e| e.id < from)
    }

    /// Bytes published before the first frame a reader at `next` can get,
    /// if known: not when `next` is older than the retention and frames
    /// were dropped. O(log n).
    pub(crate) fn position(&self, next: u64) -> Option<u64> {
        let from = self.effective(next);
        let i = self.index(next);
        match self.entries.get(i) {
            None => Some(self.total_bytes),
            // The frames between the one before and this one are holes.
            Some(e) if i > 0 || e.id == from => Some(e.bytes_before),
            // Everything ever published is at or after `from`.
            Some(_) if self.first_id.is_none_or(|first| from <= first) => Some(0),
            Some(_) => None,
        }
    }

    /// A frame with an id at or after `next` is retained: a read would get
    /// something. O(1).
    pub(crate) fn has_from(&self, next: u64) -> bool {
        if self.closed_at.is_some() {
            return self.index(next) < self.end_index();
        }
        self.newest_id().is_some_and(|n| n >= self.effective(next))
    }

    /// How many retained frames and bytes have an id at or after `next`:
    /// what a reader there has still to read. O(log n).
    pub(crate) fn backlog(&self, next: u64) -> (usize, u64) {
        let i = self.index(next);
        let end = self.end_index();
        if i >= end {
            return (0, 0);
        }
        let end_bytes = self
            .entries
            .get(end)
            .map_or(self.total_bytes, |e| e.bytes_before);
        (end - i, end_bytes - self.entries[i].bytes_before)
    }

    /// How many ids a reader at `next` skips before the first frame it can
    /// get (frames no longer retained and holes); 0 if it is up to date.
    /// O(log n).
    pub(crate) fn gap_before(&self, next: u64) -> u64 {
        let from = self.effective(next);
        let i = self.index(next);
        if i >= self.end_index() {
            return 0;
        }
        self.entries.get(i).map_or(0, |e| e.id - from)
    }

    /// The retained frame at `index` (see [`index`](Self::index)). O(1).
    pub(crate) fn at(&self, index: usize) -> Option<&Entry<T>> {
        self.entries.get(index)
    }

    /// The retained frames with an id at or after `next`, oldest first.
    /// O(log n) to find the first, O(1) per frame.
    pub(crate) fn iter_from(&self, next: u64) -> impl Iterator<Item = &Entry<T>> {
        let end = self.end_index();
        let start = self.index(next).min(end);
        self.entries.range(start..end)
    }

    /// Reads up to `max` frames from `cursor`, oldest first, handing each to
    /// `f` with the gap before it (ids skipped, and their bytes when
    /// known, else 0), and moves the cursor past them. Returns how many
    /// were read; 0 leaves the cursor as it was. O(log n + k).
    pub(crate) fn read(
        &self,
        cursor: &mut Cursor,
        max: usize,
        mut f: impl FnMut(Gap, &Entry<T>),
    ) -> usize {
        let mut expect = self.effective(cursor.next);
        let mut read = 0;
        for e in self.iter_from(cursor.next).take(max) {
            let mut gap = Gap::default();
            if e.id > expect {
                gap.frames = e.id - expect;
                gap.bytes = cursor.pos.map_or(0, |p| e.bytes_before.saturating_sub(p));
            }
            f(gap, e);
            expect = e.id + 1;
            cursor.pos = Some(e.bytes_before.saturating_add(e.weight as u64));
            read += 1;
        }
        if read > 0 {
            cursor.next = expect;
        }
        read
    }

    /// Reads frames from `cursor` as [`read`](Self::read) does, up to
    /// `max`, for as long as `take` accepts them: `take` sees each frame
    /// with the gap before it, and a frame it refuses (`false`) stays at
    /// the cursor. Returns how many were taken. O(log n + k).
    pub(crate) fn read_while(
        &self,
        cursor: &mut Cursor,
        max: usize,
        mut take: impl FnMut(Gap, &Entry<T>) -> bool,
    ) -> usize {
        let mut expect = self.effective(cursor.next);
        let mut read = 0;
        for e in self.iter_from(cursor.next).take(max) {
            let mut gap = Gap::default();
            if e.id > expect {
                gap.frames = e.id - expect;
                gap.bytes = cursor.pos.map_or(0, |p| e.bytes_before.saturating_sub(p));
            }
            if !take(gap, e) {
                break;
            }
            expect = e.id + 1;
            cursor.pos = Some(e.bytes_before.saturating_add(e.weight as u64));
            read += 1;
        }
        if read > 0 {
            cursor.next = expect;
        }
        read
    }

    /// Leaves `waker` to be woken by the next push, unless a frame at or
    /// after `next` is already there (then nothing is registered, and any
    /// earlier registration of `parked` is withdrawn). Returns whether it
    /// parked. Parking again before the next push replaces the waker in
    /// place. O(1) (amortized).
    pub(crate) fn park(&mut self, next: u64, waker: &Waker, parked: &mut Parked) -> bool {
        if self.has_from(next) {
            self.unpark(parked);
            return false;
        }
        match parked.slot {
            Some((round, i)) if round == self.round => match &mut self.parked[i] {
                Some(w) if w.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            },
            _ => {
                let waker = Some(waker.clone());
                let i = match self.free.pop() {
                    Some(i) => {
                        self.parked[i] = waker;
                        i
                    }
                    None => {
                        self.parked.push(waker);
                        self.parked.len() - 1
                    }
                };
                parked.slot = Some((self.round, i));
            }
        }
        true
    }

    /// Withdraws the waker `parked` left, if a push has not taken it yet: a
    /// reader that goes away calls this. O(1).
    pub(crate) fn unpark(&mut self, parked: &mut Parked) {
        if let Some((round, i)) = parked.slot.take() {
            if round == self.round {
                self.parked[i] = None;
                self.free.push(i);
            }
        }
    }

    /// Readers parked now. O(parked).
    #[cfg(test)]
    pub(crate) fn parked_len(&self) -> usize {
        self.parked.iter().filter(|w| w.is_some()).count()
    }

    /// Appends a frame (its id must be [accepted](Self::accepts)), drops
    /// the oldest past the retention, and takes the parked list. Call
    /// [`Pushed::finish`] once the lock is released. O(1) (amortized), plus
    /// the frames dropped.
    ///
    /// A weigher's huge value (up to `usize::MAX`) cannot overflow the byte
    /// counts (the retained bytes are counted in `u128`, the running total
    /// saturates), and nothing here can panic once the entry is in: the log
    /// stays whole.
    pub(crate) fn push(&mut self, id: u64, item: T, weight: usize) -> Pushed<T> {
        debug_assert!(self.accepts(id), "id {id} after {:?}", self.newest_id());
        let bytes_before = self.total_bytes;
        let total_bytes = bytes_before.saturating_add(weight as u64);
        self.first_id.get_or_insert(id);
        self.entries.push_back(Entry {
            id,
            item,
            weight,
            bytes_before,
        });
        self.total_bytes = total_bytes;
        self.bytes += weight as u128;
        self.published += 1;
        let mut evicted = None;
        while self.entries.len() > self.retain_frames
            || (self.bytes > self.retain_bytes as u128 && self.entries.len() > 1)
        {
            let old = self.entries.pop_front().expect("more than one frame");
            self.bytes -= old.weight as u128;
            self.dropped += 1;
            // The first one is dropped after the lock; any more (a heavy
            // frame under a byte limit) here.
            if evicted.is_none() {
                evicted = Some(old);
            }
        }
        let wakers = if self.parked.is_empty() {
            Vec::new()
        } else {
            self.round += 1;
            self.free.clear();
            std::mem::take(&mut self.parked)
        };
        Pushed {
            wakers,
            _evicted: evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn log(frames: usize) -> Log<u64> {
        Log::new(HubConfig::new(frames))
    }

    fn push(log: &mut Log<u64>, id: u64, weight: usize) {
        log.push(id, id, weight).finish();
    }

    fn read_all(log: &Log<u64>, cursor: &mut Cursor) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        log.read(cursor, usize::MAX, |gap, e| {
            out.push((gap.frames, gap.bytes, e.id))
        });
        out
    }

    #[test]
    fn retention_by_frames_and_bytes() {
        let mut l = Log::new(HubConfig::new(3).with_retain_bytes(25));
        for id in 0..5 {
            push(&mut l, id, 10);
        }
        // 25 bytes hold two frames of 10.
        assert_eq!((l.oldest_id(), l.newest_id()), (Some(3), Some(4)));
        assert_eq!((l.len(), l.bytes(), l.dropped()), (2, 20, 3));
        // A frame heavier than the limit is kept alone.
        push(&mut l, 5, 100);
        assert_eq!((l.oldest_id(), l.len(), l.bytes()), (Some(5), 1, 100));
        let mut l = log(3);
        for id in 0..10 {
            push(&mut l, id, 1);
        }
        assert_eq!((l.oldest_id(), l.len(), l.published()), (Some(7), 3, 10));
    }

    /// Issue 20, bug 8: a weigher's huge value overflowed the byte total
    /// under the lock, after the entry went in.
    #[test]
    fn a_huge_weight_saturates_and_leaves_the_log_whole() {
        let mut l = Log::new(HubConfig::new(3).with_retain_bytes(100));
        push(&mut l, 0, 10);
        push(&mut l, 1, usize::MAX);
        // Heavier than the limit: kept alone, as any heavy frame.
        assert_eq!(
            (l.oldest_id(), l.newest_id(), l.len()),
            (Some(1), Some(1), 1)
        );
        assert_eq!((l.bytes(), l.published(), l.dropped()), (usize::MAX, 2, 1));
        push(&mut l, 2, usize::MAX);
        push(&mut l, 3, 5);
        assert_eq!((l.oldest_id(), l.len(), l.bytes()), (Some(3), 1, 5));
        // Readers still get every frame, in order.
        let mut c = Cursor::START;
        let ids: Vec<u64> = read_all(&l, &mut c).iter().map(|r| r.2).collect();
        assert_eq!(ids, [3]);
        assert_eq!(
            l.backlog(3),
            (1, 0),
            "saturated: the bytes are no longer told apart"
        );
        push(&mut l, 4, 1);
        assert_eq!(
            read_all(&l, &mut c).iter().map(|r| r.2).collect::<Vec<_>>(),
            [4]
        );
    }

    #[test]
    fn ids_strictly_increase() {
        let mut l = log(10);
        assert_eq!(l.next_id(), Some(0));
        assert!(l.accepts(0) && l.accepts(MAX_ID) && !l.accepts(u64::MAX));
        push(&mut l, 5, 1);
        assert!(!l.accepts(5) && !l.accepts(4) && l.accepts(6));
        assert_eq!(l.next_id(), Some(6));
        push(&mut l, MAX_ID, 1);
        assert_eq!(l.next_id(), None);
        assert!(!l.accepts(u64::MAX));
    }

    #[test]
    fn index_agrees_with_a_search_with_and_without_holes() {
        for ids in [
            vec![0, 1, 2, 3, 4, 5],
            vec![3, 4, 9, 10, 11, 20],
            vec![7],
            vec![u64::MAX - 3, MAX_ID],
        ] {
            let mut l = log(4);
            for &id in &ids {
                push(&mut l, id, 1);
            }
            let search = |from: u64| l.entries.partition_point(|e| e.id < from);
            let probes = (0..25).chain(
                ids.iter()
                    .flat_map(|&id| [id.saturating_sub(1), id, id.saturating_add(1)]),
            );
            for next in probes {
                if next == Cursor::START.next {
                    continue;
                }
                assert_eq!(l.index(next), search(next), "ids {ids:?}, next {next}");
            }
        }
    }

    #[test]
    fn backlog_gap_and_position() {
        let mut l = log(4);
        for id in [10, 11, 15, 16, 17, 18] {
            push(&mut l, id, 10);
        }
        // Retained: 15, 16, 17, 18 (bytes_before 20, 30, 40, 50).
        assert_eq!(l.backlog(16), (3, 30));
        assert_eq!(l.backlog(19), (0, 0));
        assert_eq!(l.backlog(12), (4, 40));
        // 12, 13, 14 skipped (11 was dropped, 12..=14 are holes).
        assert_eq!(l.gap_before(12), 3);
        assert_eq!(l.gap_before(16), 0);
        assert_eq!(l.gap_before(19), 0);
        // START counts from the first frame ever published (10).
        assert_eq!(l.gap_before(Cursor::START.next), 5);
        assert_eq!(l.position(16), Some(30));
        assert_eq!(l.position(19), Some(60));
        assert_eq!(l.position(12), None);
        assert_eq!(l.position(5), Some(0));
        assert_eq!(l.position(0), Some(0));
    }

    #[test]
    fn reads_report_exact_gaps() {
        let mut l = log(3);
        let mut start = Cursor::START;
        assert_eq!(l.tail(), Cursor::START);
        for id in [100, 101, 102, 105, 106] {
            push(&mut l, id, 10);
        }
        // 100, 101 dropped; 103, 104 never published.
        assert_eq!(
            read_all(&l, &mut start),
            [(2, 20, 102), (2, 0, 105), (0, 0, 106)]
        );
        // Holes have no bytes.
        let mut hole = Cursor {
            next: 103,
            pos: l.position(103),
        };
        assert_eq!(read_all(&l, &mut hole), [(2, 0, 105), (0, 0, 106)]);
        assert_eq!(
            start,
            Cursor {
                next: 107,
                pos: Some(50)
            }
        );
        assert_eq!(read_all(&l, &mut start), []);
        assert_eq!(start.next, 107);
        // Batches.
        let mut c = l.after(102);
        assert_eq!(c.next, 103);
        assert_eq!(l.read(&mut c, 1, |_, e| assert_eq!(e.id, 105)), 1);
        assert_eq!(l.read(&mut c, 1, |_, e| assert_eq!(e.id, 106)), 1);
        assert_eq!(l.read(&mut c, 1, |_, _| unreachable!()), 0);
    }

    #[test]
    fn after_resumes_or_starts_at_the_tail() {
        let mut l = log(3);
        assert_eq!(l.after(7), Cursor::START);
        for id in 0..6 {
            push(&mut l, id, 1);
        }
        // Retained 3, 4, 5.
        assert_eq!(l.after(3).next, 4);
        assert_eq!(l.after(5), l.tail());
        assert_eq!(l.after(99), l.tail());
        assert_eq!(l.after(u64::MAX), l.tail());
        let mut gone = l.after(0);
        assert_eq!((gone.next, gone.pos), (1, None));
        assert_eq!(read_all(&l, &mut gone), [(2, 0, 3), (0, 0, 4), (0, 0, 5)]);
    }

    #[test]
    fn park_wakes_once_and_unpark_withdraws() {
        let mut l = log(10);
        let (a_count, a) = counter();
        let (b_count, b) = counter();
        let (mut pa, mut pb) = (Parked::default(), Parked::default());
        assert!(l.park(0, &a, &mut pa));
        assert!(l.park(0, &a, &mut pa), "parking again replaces");
        assert!(l.park(0, &b, &mut pb));
        assert_eq!(l.parked_len(), 2);
        l.unpark(&mut pb);
        assert!(!pb.may_be_parked());
        assert_eq!(l.parked_len(), 1);
        push(&mut l, 0, 1);
        assert_eq!(a_count.0.load(Ordering::SeqCst), 1);
        assert_eq!(b_count.0.load(Ordering::SeqCst), 0);
        assert_eq!(l.parked_len(), 0);
        // Nothing parked: later pushes wake nobody.
        push(&mut l, 1, 1);
        assert_eq!(a_count.0.load(Ordering::SeqCst), 1);
        // A stale registration is not withdrawn from the new round.
        assert!(!l.park(0, &a, &mut pa), "frames are there");
        assert!(!pa.may_be_parked());
        assert!(l.park(2, &b, &mut pb));
        let mut stale = Parked { slot: Some((0, 0)) };
        l.unpark(&mut stale);
        assert_eq!(l.parked_len(), 1);
        // A left place is reused.
        l.unpark(&mut pb);
        assert!(l.park(2, &a, &mut pa));
        assert_eq!(l.parked.len(), 1);
        push(&mut l, 2, 1);
        assert_eq!(a_count.0.load(Ordering::SeqCst), 2);
        assert_eq!(b_count.0.load(Ordering::SeqCst), 0);
    }
}
