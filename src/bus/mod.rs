//! Feeding a [`Hub`] from a message bus, so that many servers serve one
//! stream and a client can resume on any of them.
//!
//! Every server runs its own hub and feeds it from the same bus: a
//! [`Stream`] of `(id, item)` whose ids are the **publisher's**, so that
//! every hub holds the same frames under the same ids and a client's SSE
//! `Last-Event-ID` means the same event on every server.
//!
//! ```text
//! publisher ──(id, item)──▶ bus ──▶ server 1: feed ─▶ Hub ─▶ clients
//!                               └─▶ server 2: feed ─▶ Hub ─▶ clients
//! ```
//!
//! [`feed`] publishes each item with [`Hub::publish_with_id`], and never
//! stops on a frame it cannot take:
//!
//! - **Holes.** Ids that never reached this server (dropped by the bus,
//!   or sent while it was disconnected) are holes in its hub's ids; a
//!   client reading across one gets a [`HubEvent::Gap`](crate::hub::HubEvent::Gap)
//!   (and, through the layer, a gap marker such as SSE's `event: lagged`)
//!   with exactly the number of ids missed. [`FeedStats::missed`] adds them up.
//! - **Duplicates.** An id not newer than the hub's newest, and not far
//!   behind it (a redelivery after a reconnect, or the seam between a bus's
//!   history and its live messages), is skipped and counted
//!   ([`FeedStats::duplicates`]).
//! - **Outliers.** An id too far from the hub's newest to be a hole or a
//!   redelivery (see below) is skipped and counted ([`FeedStats::outliers`]):
//!   one stray id cannot stall the feed or use up the hub's ids.
//! - **Epochs.** A publisher whose ids move far for good (it restarted at
//!   0, or renumbered) starts a new epoch, counted in
//!   [`FeedStats::epochs`]: the feed goes on (see below).
//! - **End.** The feed returns when the stream ends, with a [`FeedReport`]
//!   of what it did; the hub and its clients go on.
//!
//! # Outliers and epochs
//!
//! Two bounds, set on the [`FeedStats`], decide what an id far from the
//! hub's newest means:
//!
//! - [`max_gap`](FeedStats::max_gap) (default 2^32): an id up to that many
//!   ids ahead of the newest is published, and the ids skipped are a hole.
//! - [`max_rewind`](FeedStats::max_rewind) (default 65,536): an id not newer
//!   than the newest, and at most that far back, is a redelivery, skipped
//!   as a duplicate. Set it to at least what the bus may deliver again.
//!
//! An id outside both is an **outlier** ([`Fed::Outlier`]): skipped and
//! counted (with the `tracing` feature, the first of a run is logged as a
//! warning), and remembered. If the next id is near the newest again, that
//! was all. If the next id follows the outlier instead (no more than
//! `max_gap` ids after it), the publisher's ids really moved, and a **new
//! epoch** starts with that id ([`Fed::Epoch`], and a `tracing` warning with
//! the `tracing` feature):
//!
//! - **Ahead, for good** (the publisher renumbered upwards): ids stay the
//!   publisher's; clients see one gap of exactly the ids skipped.
//! - **Back, for good** (a publisher that restarted at 0, e.g. `[…, 99_999,
//!   0, 1, 2]`): the hub's ids must keep increasing, so from then on the
//!   publisher's ids are published shifted to go on right after the hub's
//!   newest: 0 would have been 100,000, so 1 is published as 100,001, 2 as
//!   100,002, and so on (redeliveries of the new epoch are duplicates in its
//!   terms). Clients see one gap marker, for the outlier, then the stream
//!   continues; none of them is stuck, and the hub stays publishable.
//!
//! Ids are the hub's in what clients see (SSE `id:` lines built from the
//! published id), so a client that resumes with `Last-Event-ID` on the
//! same server continues across the epoch without gap or duplicate. After a
//! restart backwards, though, the hub's ids are no longer the publisher's:
//! another server agrees with this one only if it crossed the same reset
//! from the same newest id, and a server that started after the reset
//! numbers as the publisher does (a client moving there may resume at the
//! wrong place, or be served from the newest frame on), and a bus's
//! history ([`nats::history`]) no longer matches the hub's ids. A
//! publisher that restarts should continue after its last id (as
//! `nats_publisher` does with JetStream, from [`nats::last_id`]); the epoch
//! is a safety net that keeps the feed alive, not a protocol. What an epoch
//! costs is the item that started it: skipped as an outlier, it is the
//! one-id gap clients see.
//!
//! ```
//! use bytes::Bytes;
//! use futures::StreamExt;
//! use tower_backpressure::Hub;
//! use tower_backpressure::bus::{FeedStats, feed};
//! use tower_backpressure::hub::HubEvent;
//!
//! # futures::executor::block_on(async {
//! let hub: Hub = Hub::default();
//! let stats = FeedStats::new().max_rewind(100);
//! let old = futures::stream::iter((0..1_000).map(|id| (id, Bytes::from("old"))));
//! feed(&hub, &stats, old).await;
//! let mut client = hub.subscribe_after(998);
//! // The publisher restarted: 0, 1, 2 again.
//! let new = futures::stream::iter((0..3).map(|id| (id, Bytes::from(format!("new {id}")))));
//! let report = feed(&hub, &stats, new).await;
//! assert_eq!((report.fed, report.outliers, report.epochs, report.missed), (2, 1, 1, 1));
//!
//! assert_eq!(client.next().await, Some(HubEvent::Frame { id: 999, item: Bytes::from("old") }));
//! assert_eq!(client.next().await, Some(HubEvent::Gap { missed: 1 })); // the new 0
//! assert_eq!(client.next().await, Some(HubEvent::Frame { id: 1_001, item: Bytes::from("new 1") }));
//! assert_eq!(client.next().await, Some(HubEvent::Frame { id: 1_002, item: Bytes::from("new 2") }));
//! # });
//! ```
//!
//! [`FeedStats`] is a cheap-to-clone handle on the feed's shared state: the
//! bounds and the epoch above, and atomic counters (frames fed, duplicates,
//! ids missed, items without a valid id, outliers, epochs, connection state
//! and reconnects) that an operator can read at any time, e.g. to export
//! them as metrics. A bus adapter reports its connection's ups and
//! downs through [`FeedStats::record_connected`] and
//! [`FeedStats::record_disconnected`].
//!
//! With the `nats` feature, [`nats`] feeds a hub from a NATS
//! subject, or from a JetStream stream that also warms a new server's hub
//! and serves clients from its history. With the `redis` feature,
//! [`redis`](mod@redis) does the same from a Redis stream (`XADD` with the
//! event's id as the entry's id, `XREAD BLOCK`, `XRANGE`).
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use futures::StreamExt;
//! use tower_backpressure::Hub;
//! use tower_backpressure::bus::{FeedStats, feed};
//! use tower_backpressure::hub::HubEvent;
//!
//! # futures::executor::block_on(async {
//! let hub: Hub = Hub::default();
//! let mut client = hub.subscribe();
//! let stats = FeedStats::new();
//! // Id 2 never arrived; id 1 was delivered twice.
//! let bus = futures::stream::iter([0, 1, 1, 3].map(|id| (id, Bytes::from(id.to_string()))));
//! let report = feed(&hub, &stats, bus).await;
//! assert_eq!((report.fed, report.duplicates, report.missed), (3, 1, 1));
//! assert_eq!((stats.fed(), stats.duplicates(), stats.missed()), (3, 1, 1));
//!
//! assert_eq!(client.next().await, Some(HubEvent::Frame { id: 0, item: Bytes::from("0") }));
//! assert_eq!(client.next().await, Some(HubEvent::Frame { id: 1, item: Bytes::from("1") }));
//! assert_eq!(client.next().await, Some(HubEvent::Gap { missed: 1 }));
//! assert_eq!(client.next().await, Some(HubEvent::Frame { id: 3, item: Bytes::from("3") }));
//! # });
//! ```

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_core::Stream;
use futures_util::StreamExt as _;

use crate::buffer::Weigher;
use crate::hub::Hub;

/// What [`feed`] publishes into: a [`Hub`], or anything that keeps
/// frames under strictly increasing ids (e.g. a server's pair of hubs, one
/// per format, fed from one bus).
pub trait Publish<I> {
    /// The newest id published, if any.
    fn newest_id(&self) -> Option<u64>;

    /// Publishes `item` under `id`; gives it back if `id` is not greater
    /// than the newest id (or is out of range).
    fn publish_with_id(&self, id: u64, item: I) -> Result<(), I>;
}

impl<T, W: Weigher<T>> Publish<T> for Hub<T, W> {
    fn newest_id(&self) -> Option<u64> {
        Hub::newest_id(self)
    }

    fn publish_with_id(&self, id: u64, item: T) -> Result<(), T> {
        Hub::publish_with_id(self, id, item).map_err(crate::hub::PublishError::into_inner)
    }
}

impl<I, P: Publish<I> + ?Sized> Publish<I> for &P {
    fn newest_id(&self) -> Option<u64> {
        (**self).newest_id()
    }

    fn publish_with_id(&self, id: u64, item: I) -> Result<(), I> {
        (**self).publish_with_id(id, item)
    }
}

impl<I, P: Publish<I> + ?Sized> Publish<I> for Arc<P> {
    fn newest_id(&self) -> Option<u64> {
        (**self).newest_id()
    }

    fn publish_with_id(&self, id: u64, item: I) -> Result<(), I> {
        (**self).publish_with_id(id, item)
    }
}

/// What [`feed_one`] did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// Published, after `missed` ids that never arrived (0: none).
    Published {
        /// Ids between the previous newest and this one.
        missed: u64,
    },
    /// Skipped: its id was not newer than the newest, but no further back
    /// than [`FeedStats::max_rewind`] (a redelivery), or the target refused
    /// it.
    Duplicate,
    /// Skipped: its id was further from the newest than the bounds allow
    /// ([`FeedStats::max_gap`] ahead, [`FeedStats::max_rewind`] behind), and
    /// the id before it did not announce it. If the next id follows it, a
    /// new epoch starts there ([`Fed::Epoch`]); if not, it was a single
    /// outlier, and nothing else changes.
    Outlier,
    /// Published as the first frame of a new epoch: the id follows an
    /// [`Outlier`](Fed::Outlier), so the publisher's ids really moved (it
    /// restarted, or renumbered). See the [module docs](self#outliers-and-epochs).
    Epoch {
        /// Ids between the hub's previous newest and this frame (at least
        /// the outlier that started the epoch, which was skipped).
        missed: u64,
    },
}

/// What one [`feed`] did, from its start to the end of its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FeedReport {
    /// Frames published.
    pub fed: u64,
    /// Items skipped because their id was not newer than the newest.
    pub duplicates: u64,
    /// Ids that never arrived: the holes between the frames published
    /// (each is one exactly counted gap for the clients reading across it).
    pub missed: u64,
    /// Items skipped because their id was too far from the newest
    /// ([`Fed::Outlier`]).
    pub outliers: u64,
    /// New epochs started: the publisher's ids moved for good
    /// ([`Fed::Epoch`]).
    pub epochs: u64,
}

/// Publishes every `(id, item)` of `stream` into `target` under its id,
/// until the stream ends: see the [module docs](self).
///
/// Counts into `stats` as it goes (and `target`'s clients see each hole as
/// a gap at once); returns what this call did. Never fails: a duplicate or
/// an outlier is skipped and counted, and a publisher whose ids restart
/// starts a new epoch (see the [module docs](self#outliers-and-epochs)).
/// A bus that reconnects by itself can keep one stream going; one that
/// needs a new stream per connection calls `feed` again with the same hub
/// and stats (ids then continue where they were, and redeliveries are
/// skipped: set [`FeedStats::max_rewind`] to at least how far back the new
/// stream may start).
///
/// `target` should have no other publisher: ids decide what is a hole and
/// what a duplicate.
pub async fn feed<I, P, S>(target: &P, stats: &FeedStats, stream: S) -> FeedReport
where
    P: Publish<I> + ?Sized,
    S: Stream<Item = (u64, I)>,
{
    let mut stream = std::pin::pin!(stream);
    let mut report = FeedReport::default();
    while let Some((id, item)) = stream.next().await {
        match feed_one(target, stats, id, item) {
            Fed::Published { missed } => {
                report.fed += 1;
                report.missed += missed;
            }
            Fed::Epoch { missed } => {
                report.fed += 1;
                report.missed += missed;
                report.epochs += 1;
            }
            Fed::Duplicate => report.duplicates += 1,
            Fed::Outlier => report.outliers += 1,
        }
    }
    report
}

/// Publishes one `(id, item)` as [`feed`] does, and counts it into
/// `stats`: for a bus that hands messages to a callback rather than a
/// [`Stream`].
///
/// ```
/// use bytes::Bytes;
/// use tower_backpressure::Hub;
/// use tower_backpressure::bus::{Fed, FeedStats, feed_one};
///
/// let hub: Hub = Hub::default();
/// let stats = FeedStats::new();
/// assert_eq!(feed_one(&hub, &stats, 7, Bytes::from("a")), Fed::Published { missed: 0 });
/// assert_eq!(feed_one(&hub, &stats, 10, Bytes::from("b")), Fed::Published { missed: 2 });
/// assert_eq!(feed_one(&hub, &stats, 9, Bytes::from("c")), Fed::Duplicate);
/// // Far beyond anything a gap could explain: skipped.
/// assert_eq!(feed_one(&hub, &stats, u64::MAX - 1, Bytes::from("d")), Fed::Outlier);
/// assert_eq!(feed_one(&hub, &stats, 11, Bytes::from("e")), Fed::Published { missed: 0 });
/// assert_eq!((stats.fed(), stats.missed(), stats.duplicates(), stats.outliers()), (3, 2, 1, 1));
/// ```
///
/// Calls that share `stats` take turns (a lock held across the publish),
/// so that they agree on the epoch. If another publisher races this one
/// on `target`, the count of ids missed may be short, never wrapped.
pub fn feed_one<I, P>(target: &P, stats: &FeedStats, id: u64, item: I) -> Fed
where
    P: Publish<I> + ?Sized,
{
    let c = &*stats.inner;
    let mut epoch = c.epoch.lock().unwrap_or_else(PoisonError::into_inner);
    let (max_gap, max_rewind) = (
        c.max_gap.load(Ordering::Relaxed),
        c.max_rewind.load(Ordering::Relaxed),
    );
    let newest = target.newest_id();
    let mapped = epoch.map(id);
    let Some(newest) = newest else {
        // An empty target: nothing to compare with.
        epoch.suspect = None;
        return match publish(target, c, None, mapped.unwrap_or(id), item) {
            Some(missed) => Fed::Published { missed },
            None => c.duplicate(),
        };
    };
    let near = mapped.filter(|&h| {
        if h > newest {
            h - newest - 1 <= max_gap
        } else {
            newest - h <= max_rewind
        }
    });
    if let Some(h) = near {
        epoch.suspect = None;
        return match publish(target, c, Some(newest), h, item) {
            Some(missed) => Fed::Published { missed },
            None => c.duplicate(),
        };
    }
    // Far from the newest: a new epoch if it follows the previous outlier,
    // else an outlier itself.
    let follows = epoch
        .suspect
        .is_some_and(|s| id > s && id - s - 1 <= max_gap);
    if !follows {
        // Only the first of a run of outliers is logged, not each of them.
        let first = epoch.suspect.replace(id).is_none();
        return c.outlier(id, newest, first);
    }
    let suspect = epoch.suspect.take().unwrap_or(id);
    let next = match mapped {
        // Far ahead, for good: the ids stay the publisher's.
        Some(h) if h > newest => *epoch,
        // Back, for good (a restart): the ids go on after the newest.
        _ => Epoch {
            origin: suspect,
            base: newest.saturating_add(1),
            suspect: None,
        },
    };
    let Some(h) = next.map(id) else {
        epoch.suspect = Some(id);
        return c.outlier(id, newest, false);
    };
    match publish(target, c, Some(newest), h, item) {
        Some(missed) => {
            *epoch = next;
            c.epochs.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "tracing")]
            tracing::warn!(
                id,
                published_as = h,
                previous_newest = newest,
                missed,
                "bus feed: the publisher's ids moved for good; a new epoch starts"
            );
            Fed::Epoch { missed }
        }
        None => {
            epoch.suspect = Some(id);
            c.outlier(id, newest, false)
        }
    }
}

/// Publishes `item` under the target's id `h`; the ids missed since
/// `newest` if it took it.
fn publish<I, P>(target: &P, c: &Counters, newest: Option<u64>, h: u64, item: I) -> Option<u64>
where
    P: Publish<I> + ?Sized,
{
    target.publish_with_id(h, item).ok()?;
    // Checked: a racing publisher may have moved `newest` past `h`.
    let missed = newest.map_or(0, |n| h.saturating_sub(n).saturating_sub(1));
    c.fed.fetch_add(1, Ordering::Relaxed);
    c.missed.fetch_add(missed, Ordering::Relaxed);
    c.newest.store(h, Ordering::Relaxed);
    Some(missed)
}

/// How the publisher's ids map to the target's: `base + (id - origin)`.
/// The first epoch is the identity.
#[derive(Debug, Clone, Copy, Default)]
struct Epoch {
    origin: u64,
    base: u64,
    /// The publisher's id of the last outlier, if the item after it has
    /// not come yet.
    suspect: Option<u64>,
}

impl Epoch {
    /// The target's id of the publisher's `id`; `None` if it is before the
    /// epoch's start or past the last id.
    fn map(&self, id: u64) -> Option<u64> {
        self.base.checked_add(id.checked_sub(self.origin)?)
    }
}

/// Counters of a feed, shared: see the [module docs](self).
///
/// Cheap to clone (clones share the counters) and `Send + Sync`; every
/// getter is one atomic load, so a `/metrics` handler can read them on
/// every scrape. Counters only grow, from the handle's creation, across
/// every [`feed`] and reconnect that uses it.
///
/// It also holds what the feed must remember between items: its bounds
/// ([`max_gap`](Self::max_gap), [`max_rewind`](Self::max_rewind)) and its
/// epoch (how the publisher's ids map to the hub's). Keep one per hub, for
/// every [`feed`] into it: a new `FeedStats` after a publisher restarted
/// would not know the epoch.
///
/// ```
/// use tower_backpressure::bus::FeedStats;
///
/// let stats = FeedStats::new();
/// stats.record_connected(); // the first connection
/// stats.record_disconnected();
/// stats.record_connected(); // a reconnect
/// assert_eq!((stats.reconnects(), stats.disconnects(), stats.is_connected()), (1, 1, true));
/// ```
#[derive(Clone, Default)]
pub struct FeedStats {
    inner: Arc<Counters>,
}

struct Counters {
    fed: AtomicU64,
    duplicates: AtomicU64,
    missed: AtomicU64,
    invalid: AtomicU64,
    outliers: AtomicU64,
    epochs: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    connected: AtomicBool,
    /// The newest id fed; meaningful once `fed > 0`.
    newest: AtomicU64,
    max_gap: AtomicU64,
    max_rewind: AtomicU64,
    epoch: Mutex<Epoch>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            fed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            outliers: AtomicU64::new(0),
            epochs: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            newest: AtomicU64::new(0),
            max_gap: AtomicU64::new(DEFAULT_MAX_GAP),
            max_rewind: AtomicU64::new(DEFAULT_MAX_REWIND),
            epoch: Mutex::new(Epoch::default()),
        }
    }
}

impl Counters {
    fn duplicate(&self) -> Fed {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
        Fed::Duplicate
    }

    /// Counts an outlier; logs it if it is the `first` of a run.
    fn outlier(&self, _id: u64, _newest: u64, _first: bool) -> Fed {
        self.outliers.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "tracing")]
        if _first {
            tracing::warn!(
                id = _id,
                newest = _newest,
                "bus feed: an id far from the newest skipped as an outlier"
            );
        }
        Fed::Outlier
    }
}

/// [`FeedStats::max_gap`]'s default: 2^32 ids.
const DEFAULT_MAX_GAP: u64 = 1 << 32;

/// [`FeedStats::max_rewind`]'s default: 65,536 ids.
const DEFAULT_MAX_REWIND: u64 = 1 << 16;

impl FeedStats {
    /// New counters, all zero, not connected, with the default bounds
    /// ([`max_gap`](Self::max_gap) 2^32, [`max_rewind`](Self::max_rewind)
    /// 65,536).
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest hole a feed takes as ids that never arrived (default
    /// 2^32, about 50 days at 1,000 ids a second): an id further ahead of
    /// the newest is an outlier, skipped unless the next id follows it
    /// (see the [module docs](self#outliers-and-epochs)). Applies to every
    /// clone of these stats; set it before feeding.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_backpressure::Hub;
    /// use tower_backpressure::bus::{Fed, FeedStats, feed_one};
    ///
    /// let hub: Hub = Hub::default();
    /// let stats = FeedStats::new().max_gap(100);
    /// assert_eq!(feed_one(&hub, &stats, 0, Bytes::from("a")), Fed::Published { missed: 0 });
    /// assert_eq!(feed_one(&hub, &stats, 101, Bytes::from("b")), Fed::Published { missed: 100 });
    /// assert_eq!(feed_one(&hub, &stats, 1_000, Bytes::from("c")), Fed::Outlier);
    /// ```
    pub fn max_gap(self, ids: u64) -> Self {
        self.inner.max_gap.store(ids, Ordering::Relaxed);
        self
    }

    /// How far back of the newest an id is still a redelivery, skipped as
    /// a [duplicate](Self::duplicates) (default 65,536): set it to at least
    /// what the bus may deliver again (a history read before live
    /// messages, a replay after a reconnect). An id further back is an
    /// outlier, and a new epoch if the next id follows it: a publisher
    /// that restarted (see the [module docs](self#outliers-and-epochs)).
    /// Applies to every clone of these stats; set it before feeding.
    pub fn max_rewind(self, ids: u64) -> Self {
        self.inner.max_rewind.store(ids, Ordering::Relaxed);
        self
    }

    /// Frames published into the hub.
    pub fn fed(&self) -> u64 {
        self.inner.fed.load(Ordering::Relaxed)
    }

    /// Items skipped because their id was not newer than the newest: bus
    /// redeliveries, and the seam between a history and live messages.
    pub fn duplicates(&self) -> u64 {
        self.inner.duplicates.load(Ordering::Relaxed)
    }

    /// Ids that never reached the hub: the sum of the holes between the
    /// frames fed (each hole is one gap, of exactly that many ids, for the
    /// clients that read across it).
    pub fn missed(&self) -> u64 {
        self.inner.missed.load(Ordering::Relaxed)
    }

    /// Messages the bus adapter dropped because they carried no valid id
    /// (see [`record_invalid`](Self::record_invalid)).
    pub fn invalid(&self) -> u64 {
        self.inner.invalid.load(Ordering::Relaxed)
    }

    /// Items skipped because their id was too far from the newest
    /// ([`Fed::Outlier`]): a stray id, or the first of a new epoch.
    pub fn outliers(&self) -> u64 {
        self.inner.outliers.load(Ordering::Relaxed)
    }

    /// New epochs started: times the publisher's ids moved far for good
    /// ([`Fed::Epoch`]), e.g. a publisher that restarted at 0.
    pub fn epochs(&self) -> u64 {
        self.inner.epochs.load(Ordering::Relaxed)
    }

    /// The id of the newest frame fed, if any, as the target holds it (the
    /// publisher's, unless a restart started an epoch whose ids go on after
    /// the newest).
    pub fn newest_id(&self) -> Option<u64> {
        (self.fed() > 0).then(|| self.inner.newest.load(Ordering::Relaxed))
    }

    /// Connections to the bus made after the first: reconnects after an
    /// outage.
    pub fn reconnects(&self) -> u64 {
        self.inner
            .connects
            .load(Ordering::Relaxed)
            .saturating_sub(1)
    }

    /// Times the connection to the bus was lost.
    pub fn disconnects(&self) -> u64 {
        self.inner.disconnects.load(Ordering::Relaxed)
    }

    /// Whether the bus is connected now (as last recorded). While it is
    /// not, the hub keeps serving its clients what it holds.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Records a connection to the bus (the first, or a reconnect).
    pub fn record_connected(&self) {
        self.inner.connects.fetch_add(1, Ordering::Relaxed);
        self.inner.connected.store(true, Ordering::Relaxed);
    }

    /// Records the loss of the connection to the bus.
    pub fn record_disconnected(&self) {
        self.inner.disconnects.fetch_add(1, Ordering::Relaxed);
        self.inner.connected.store(false, Ordering::Relaxed);
    }

    /// Records a message dropped because it had no valid id.
    pub fn record_invalid(&self) {
        self.inner.invalid.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for FeedStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedStats")
            .field("fed", &self.fed())
            .field("duplicates", &self.duplicates())
            .field("missed", &self.missed())
            .field("invalid", &self.invalid())
            .field("outliers", &self.outliers())
            .field("epochs", &self.epochs())
            .field("newest_id", &self.newest_id())
            .field("reconnects", &self.reconnects())
            .field("disconnects", &self.disconnects())
            .field("connected", &self.is_connected())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures_util::StreamExt as _;

    use super::*;
    use crate::hub::{HubConfig, HubEvent};

    fn frames(ids: &[u64]) -> impl Stream<Item = (u64, Bytes)> + use<> {
        let items: Vec<_> = ids
            .iter()
            .map(|&id| (id, Bytes::from(id.to_string())))
            .collect();
        futures_util::stream::iter(items)
    }

    fn frame(id: u64) -> Option<HubEvent<Bytes>> {
        Some(HubEvent::Frame {
            id,
            item: Bytes::from(id.to_string()),
        })
    }

    #[test]
    fn holes_are_one_exact_gap_each() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::default();
            let mut sub = hub.subscribe();
            let stats = FeedStats::new();
            let report = feed(&hub, &stats, frames(&[100, 101, 105, 106, 200])).await;
            assert_eq!(
                report,
                FeedReport {
                    fed: 5,
                    missed: 3 + 93,
                    ..FeedReport::default()
                }
            );
            assert_eq!(sub.next().await, frame(100));
            assert_eq!(sub.next().await, frame(101));
            assert_eq!(sub.next().await, Some(HubEvent::Gap { missed: 3 }));
            assert_eq!(sub.next().await, frame(105));
            assert_eq!(sub.next().await, frame(106));
            assert_eq!(sub.next().await, Some(HubEvent::Gap { missed: 93 }));
            assert_eq!(sub.next().await, frame(200));
            assert_eq!(stats.newest_id(), Some(200));
        });
    }

    #[test]
    fn duplicates_are_skipped_and_counted_and_the_feed_goes_on() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::new(HubConfig::new(100));
            let stats = FeedStats::new();
            // A redelivery after a reconnect, then the live messages.
            let first = feed(&hub, &stats, frames(&[0, 1, 2])).await;
            // `u64::MAX` is no redelivery: an outlier, skipped as well.
            let second = feed(&hub, &stats, frames(&[1, 2, 3, 3, u64::MAX, 4])).await;
            assert_eq!(
                first,
                FeedReport {
                    fed: 3,
                    ..FeedReport::default()
                }
            );
            assert_eq!(
                second,
                FeedReport {
                    fed: 2,
                    duplicates: 3,
                    outliers: 1,
                    ..FeedReport::default()
                }
            );
            assert_eq!((stats.fed(), stats.duplicates(), stats.missed()), (5, 3, 0));
            assert_eq!((stats.outliers(), stats.epochs()), (1, 0));
            let mut sub = hub.subscribe_after(0);
            for id in 1..=4 {
                assert_eq!(sub.next().await, frame(id));
            }
            // The stream ended; the hub still serves what it holds.
            assert_eq!((hub.retained(), hub.newest_id()), (5, Some(4)));
        });
    }

    #[test]
    fn an_empty_stream_feeds_nothing_and_stats_are_shared() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::default();
            let stats = FeedStats::new();
            let seen = stats.clone();
            assert_eq!(feed(&hub, &stats, frames(&[])).await, FeedReport::default());
            assert_eq!((seen.newest_id(), seen.reconnects()), (None, 0));
            seen.record_connected();
            seen.record_invalid();
            assert!(stats.is_connected());
            assert_eq!((stats.invalid(), stats.reconnects()), (1, 0));
            stats.record_disconnected();
            assert!(!seen.is_connected());
            assert!(format!("{seen:?}").contains("disconnects: 1"));
        });
    }

    /// One outlier id (`u64::MAX - 1` amid 0..=4) is skipped: the clients
    /// get 0..=4 with no gap, later ids are not taken for duplicates, and
    /// the hub can still be published to.
    #[test]
    fn one_outlier_id_is_skipped_and_the_feed_goes_on() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::new(HubConfig::new(100));
            let mut sub = hub.subscribe();
            let stats = FeedStats::new();
            let report = feed(&hub, &stats, frames(&[0, 1, u64::MAX - 1, 2, 3, 4])).await;
            assert_eq!((report.fed, report.duplicates, report.missed), (5, 0, 0));
            assert_eq!((report.outliers, report.epochs), (1, 0));
            assert_eq!((stats.fed(), stats.duplicates(), stats.missed()), (5, 0, 0));
            assert_eq!(
                (stats.outliers(), stats.epochs(), stats.invalid()),
                (1, 0, 0)
            );
            for id in 0..=4 {
                assert_eq!(sub.next().await, frame(id));
            }
            assert_eq!((hub.newest_id(), stats.newest_id()), (Some(4), Some(4)));
            // Still publishable: the next id follows 4.
            assert_eq!(hub.publish(Bytes::from("5")), 5);
            assert_eq!(sub.next().await, frame(5));
        });
    }

    /// An outlier as the newest id must not leave the hub at its last id:
    /// a later `publish` gets the id after the real newest.
    #[test]
    fn an_outlier_does_not_exhaust_the_hub_ids() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::default();
            let stats = FeedStats::new();
            feed(&hub, &stats, frames(&[0, 1, u64::MAX - 1])).await;
            assert_eq!(hub.publish(Bytes::from("2")), 2);
        });
    }

    /// A publisher that restarts at 0 long after the hub passed its
    /// retention starts a new epoch: its frames keep reaching the clients.
    #[test]
    fn a_publisher_reset_to_zero_keeps_the_feed_alive() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::new(HubConfig::new(100));
            let stats = FeedStats::new();
            let before: Vec<u64> = (0..100_000).collect();
            feed(&hub, &stats, frames(&before)).await;
            let mut sub = hub.subscribe();
            let report = feed(&hub, &stats, frames(&[0, 1, 2, 3])).await;
            assert_eq!(
                report,
                FeedReport {
                    fed: 3,
                    missed: 1,
                    outliers: 1,
                    epochs: 1,
                    ..FeedReport::default()
                }
            );
            assert_eq!((stats.epochs(), stats.newest_id()), (1, Some(100_003)));
            // 0 confirms nothing yet; 1, 2, 3 follow it: a new epoch whose
            // ids continue after the hub's newest, one gap for the 0.
            assert_eq!(sub.next().await, Some(HubEvent::Gap { missed: 1 }));
            let mut got = Vec::new();
            for _ in 0..3 {
                match sub.next().await {
                    Some(HubEvent::Frame { id, item }) => got.push((id, item)),
                    other => panic!("a frame: {other:?}"),
                }
            }
            assert_eq!(
                got,
                [
                    (100_001, Bytes::from("1")),
                    (100_002, Bytes::from("2")),
                    (100_003, Bytes::from("3"))
                ]
            );
            assert_eq!(hub.publish(Bytes::from("x")), 100_004);
        });
    }

    /// `feed_one` says what it did with each item of a reset, and a client
    /// that resumes with the last id it saw before the reset continues
    /// across the seam: the one gap, then the new epoch, in order.
    #[test]
    fn a_reset_is_an_outlier_then_an_epoch_and_a_resume_crosses_it() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::new(HubConfig::new(100));
            let stats = FeedStats::new().max_rewind(10);
            for id in 0..50 {
                feed_one(&hub, &stats, id, Bytes::from(id.to_string()));
            }
            // A redelivery within 10 ids is a duplicate.
            assert_eq!(feed_one(&hub, &stats, 40, Bytes::new()), Fed::Duplicate);
            assert_eq!(feed_one(&hub, &stats, 0, Bytes::from("0")), Fed::Outlier);
            assert_eq!(
                feed_one(&hub, &stats, 1, Bytes::from("1")),
                Fed::Epoch { missed: 1 }
            );
            assert_eq!(
                feed_one(&hub, &stats, 2, Bytes::from("2")),
                Fed::Published { missed: 0 }
            );
            // Redeliveries of the new epoch are duplicates in its terms.
            assert_eq!(feed_one(&hub, &stats, 1, Bytes::new()), Fed::Duplicate);
            let mut resumed = hub.subscribe_after(48);
            assert_eq!(resumed.next().await, frame(49));
            assert_eq!(resumed.next().await, Some(HubEvent::Gap { missed: 1 }));
            // The publisher's 1 and 2, under the ids after the hub's newest.
            for (id, data) in [(51, "1"), (52, "2")] {
                let item = Bytes::from(data);
                assert_eq!(resumed.next().await, Some(HubEvent::Frame { id, item }));
            }
            assert_eq!(
                (
                    stats.fed(),
                    stats.duplicates(),
                    stats.outliers(),
                    stats.epochs()
                ),
                (52, 2, 1, 1)
            );
        });
    }

    /// A stray id far behind, followed by the stream as it was: skipped,
    /// no epoch.
    #[test]
    fn a_stray_old_id_is_one_outlier_not_an_epoch() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::new(HubConfig::new(10));
            let stats = FeedStats::new().max_rewind(5);
            let report = feed(&hub, &stats, frames(&[100, 101, 3, 102, 103])).await;
            assert_eq!((report.fed, report.outliers, report.epochs), (4, 1, 0));
            assert_eq!(hub.newest_id(), Some(103));
        });
    }

    /// Ids that jump far ahead and stay there: the first is skipped, then
    /// the feed goes on under the publisher's ids, with one exact gap.
    #[test]
    fn a_sustained_jump_ahead_keeps_the_publishers_ids() {
        futures_executor_block_on(async {
            let hub: Hub = Hub::new(HubConfig::new(10));
            let stats = FeedStats::new().max_gap(1_000);
            let mut sub = hub.subscribe();
            let report = feed(&hub, &stats, frames(&[1, 1_000_000, 1_000_001, 1_000_002])).await;
            assert_eq!((report.fed, report.outliers, report.epochs), (3, 1, 1));
            assert_eq!(report.missed, 1_000_000 - 1);
            assert_eq!(sub.next().await, frame(1));
            assert_eq!(sub.next().await, Some(HubEvent::Gap { missed: 999_999 }));
            assert_eq!(sub.next().await, frame(1_000_001));
            assert_eq!(sub.next().await, frame(1_000_002));
        });
    }

    /// A target whose `newest_id` has already seen a racing publisher's id
    /// (reserved, not yet published) while ours is still accepted: the
    /// count of ids missed must not underflow.
    #[test]
    fn a_racing_publisher_does_not_underflow_the_missed_count() {
        struct Racing {
            hub: Hub,
            /// What another publisher reserved between our `newest_id` and
            /// our `publish_with_id`.
            reserved: u64,
        }
        impl Publish<Bytes> for Racing {
            fn newest_id(&self) -> Option<u64> {
                Some(self.reserved)
            }
            fn publish_with_id(&self, id: u64, item: Bytes) -> Result<(), Bytes> {
                Publish::publish_with_id(&self.hub, id, item)
            }
        }
        let target = Racing {
            hub: Hub::new(HubConfig::new(100)),
            reserved: 10,
        };
        let stats = FeedStats::new();
        assert_eq!(
            feed_one(&target, &stats, 6, Bytes::from("6")),
            Fed::Published { missed: 0 }
        );
        assert_eq!(
            feed_one(&target, &stats, 7, Bytes::from("7")),
            Fed::Published { missed: 0 }
        );
        assert_eq!((stats.fed(), stats.missed()), (2, 0));
        assert_eq!(target.hub.newest_id(), Some(7));
    }

    proptest::proptest! {
        /// Whatever the ids (runs, redeliveries, strays, resets, ids near
        /// `u64::MAX`): no panic, every item is fed, a duplicate or an
        /// outlier, a reader from the start sees increasing ids whose gaps
        /// add up to `missed`, and the hub stays publishable unless its ids
        /// really reached the end.
        #[test]
        fn any_ids_keep_the_feed_and_its_counts_whole(
            ids in proptest::collection::vec(
                proptest::prop_oneof![
                    0..40u64,
                    1_000..1_040u64,
                    (u64::MAX - 40)..=u64::MAX,
                    proptest::num::u64::ANY,
                ],
                0..60,
            ),
        ) {
            futures_executor_block_on(async {
                let hub: Hub = Hub::new(HubConfig::new(100));
                let mut sub = hub.subscribe();
                let stats = FeedStats::new().max_gap(100).max_rewind(10);
                let report = feed(&hub, &stats, frames(&ids)).await;
                assert_eq!(
                    report.fed + report.duplicates + report.outliers,
                    ids.len() as u64,
                    "{report:?}"
                );
                assert!(report.epochs <= report.outliers);
                assert_eq!(
                    (stats.fed(), stats.duplicates(), stats.missed(), stats.outliers()),
                    (report.fed, report.duplicates, report.missed, report.outliers)
                );
                let (mut frames_read, mut gaps, mut last) = (0, 0, None);
                for _ in 0..report.fed {
                    loop {
                        match sub.next().await {
                            Some(HubEvent::Frame { id, .. }) => {
                                assert!(last < Some(id), "{last:?} then {id}");
                                last = Some(id);
                                frames_read += 1;
                                break;
                            }
                            Some(HubEvent::Gap { missed }) => gaps += missed,
                            other => panic!("{other:?}"),
                        }
                    }
                }
                assert_eq!((frames_read, gaps), (report.fed, report.missed));
                assert_eq!(stats.newest_id(), hub.newest_id());
                if hub.newest_id() < Some(u64::MAX - 1) {
                    hub.publish(Bytes::new());
                }
            });
        }
    }

    /// A tiny executor: the feeds above never wait.
    fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..1000 {
            if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
        }
        panic!("the feed waited");
    }
}
