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
//! - **Duplicates.** An id not newer than the hub's newest (a redelivery
//!   after a reconnect, or the seam between a bus's history and its live
//!   messages) is skipped and counted ([`FeedStats::duplicates`]).
//! - **End.** The feed returns when the stream ends, with a [`FeedReport`]
//!   of what it did; the hub and its clients go on.
//!
//! [`FeedStats`] is a cheap-to-clone handle on atomic counters (frames
//! fed, duplicates, ids missed, items without a valid id, connection
//! state and reconnects) that an operator can read at any time, e.g. to
//! export them as metrics. A bus adapter reports its connection's ups and
//! downs through [`FeedStats::record_connected`] and
//! [`FeedStats::record_disconnected`].
//!
//! With the `nats` feature, [`nats`] feeds a hub from a NATS
//! subject, or from a JetStream stream that also warms a new server's hub
//! and serves clients from its history.
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

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// Skipped: its id was not newer than the newest (or out of range).
    Duplicate,
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
}

/// Publishes every `(id, item)` of `stream` into `target` under its id,
/// until the stream ends: see the [module docs](self).
///
/// Counts into `stats` as it goes (and `target`'s clients see each hole as
/// a gap at once); returns what this call did. Never fails: a duplicate is
/// skipped and counted. A bus that reconnects by itself can keep one
/// stream going; one that needs a new stream per connection calls `feed`
/// again with the same hub and stats (ids then continue where they were,
/// and redeliveries are skipped).
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
            Fed::Duplicate => report.duplicates += 1,
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
/// assert_eq!((stats.fed(), stats.missed(), stats.duplicates()), (2, 2, 1));
/// ```
pub fn feed_one<I, P>(target: &P, stats: &FeedStats, id: u64, item: I) -> Fed
where
    P: Publish<I> + ?Sized,
{
    let before = target.newest_id();
    match target.publish_with_id(id, item) {
        Ok(()) => {
            // The first frame of an empty hub has nothing before it to miss.
            let missed = before.map_or(0, |newest| id - newest - 1);
            let c = &stats.inner;
            c.fed.fetch_add(1, Ordering::Relaxed);
            c.missed.fetch_add(missed, Ordering::Relaxed);
            c.newest.store(id, Ordering::Relaxed);
            Fed::Published { missed }
        }
        Err(_) => {
            stats.inner.duplicates.fetch_add(1, Ordering::Relaxed);
            Fed::Duplicate
        }
    }
}

/// Counters of a feed, shared: see the [module docs](self).
///
/// Cheap to clone (clones share the counters) and `Send + Sync`; every
/// getter is one atomic load, so a `/metrics` handler can read them on
/// every scrape. Counters only grow, from the handle's creation, across
/// every [`feed`] and reconnect that uses it.
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

#[derive(Default)]
struct Counters {
    fed: AtomicU64,
    duplicates: AtomicU64,
    missed: AtomicU64,
    invalid: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    connected: AtomicBool,
    /// The newest id fed; meaningful once `fed > 0`.
    newest: AtomicU64,
}

impl FeedStats {
    /// New counters, all zero, not connected.
    pub fn new() -> Self {
        Self::default()
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

    /// The id of the newest frame fed, if any.
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
                    duplicates: 0,
                    missed: 3 + 93
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
            let second = feed(&hub, &stats, frames(&[1, 2, 3, 3, u64::MAX, 4])).await;
            assert_eq!(
                first,
                FeedReport {
                    fed: 3,
                    duplicates: 0,
                    missed: 0
                }
            );
            assert_eq!(
                second,
                FeedReport {
                    fed: 2,
                    duplicates: 4,
                    missed: 0
                }
            );
            assert_eq!((stats.fed(), stats.duplicates(), stats.missed()), (5, 4, 0));
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
