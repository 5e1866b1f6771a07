//! Fan-out from one shared log: a stalled client costs nothing per event,
//! and a reconnecting client resumes from its `Last-Event-ID`.
//!
//! A [`Hub`] keeps **one** log of frames, shared by every subscriber; each
//! [`Subscription`] is only a cursor into it (the id of the next frame it
//! wants). Publishing appends to the log and never waits: it does no work
//! for a subscriber that is not waiting (a stalled client is never woken,
//! locked or copied to, and holds no more than the few frames it took at its
//! last poll), and wakes each subscriber that is waiting once. The log retains the newest frames within
//! [`HubConfig`]'s limits (frames and bytes); a subscriber that falls behind
//! the retention, or crosses ids that never reached the hub, is told how
//! many ids it skipped with a [`HubEvent::Gap`].
//!
//! Every frame has a strictly increasing `u64` id: the hub's own numbering
//! ([`Hub::publish`]), or the producer's ([`Hub::publish_with_id`]), so that
//! several servers fed by one bus agree on ids and a client can resume on
//! any of them ([`Hub::subscribe_after`]).
//!
//! A subscription is a [`Stream`](futures_core::Stream) of [`HubEvent`]s, and,
//! for `Bytes` (any [`Buf`](bytes::Buf)) frames, an
//! [`http_body::Body`] a server can respond with. For SSE, [`sse`] encodes
//! each event once, with the hub's id in its `id:` line, and reads
//! `Last-Event-ID`.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use futures::StreamExt;
//! use tower_backpressure::hub::{Hub, HubConfig, HubEvent};
//!
//! # futures::executor::block_on(async {
//! let hub: Hub = Hub::new(HubConfig::new(3));
//! let mut live = hub.subscribe();
//! for text in ["a", "b", "c", "d"] {
//!     hub.publish(Bytes::from(text)); // ids 0, 1, 2, 3
//! }
//!
//! // The subscription was there before the first frame, but the hub retains
//! // only 3 frames: frame 0 is gone.
//! assert_eq!(live.next().await, Some(HubEvent::Gap { missed: 1 }));
//! assert_eq!(live.next().await, Some(HubEvent::Frame { id: 1, item: Bytes::from("b") }));
//!
//! // A client that saw frame 2 reconnects (SSE `Last-Event-ID: 2`).
//! let mut resumed = hub.subscribe_after(2);
//! assert_eq!(resumed.next().await, Some(HubEvent::Frame { id: 3, item: Bytes::from("d") }));
//! # });
//! ```
//!
//! An SSE endpoint answers each request with a subscription (a sketch; see
//! `tests/hub.rs` for a full server):
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use tower_backpressure::hub::{Subscription, sse};
//! use tower_backpressure::{ByWeigh, Hub, SseGapMarker};
//!
//! type Events = Subscription<Bytes, ByWeigh, SseGapMarker>;
//!
//! async fn events(hub: Hub, req: http::Request<()>) -> Result<http::Response<Events>, Infallible> {
//!     let subscription = match sse::last_event_id(&req) {
//!         Some(id) => hub.subscribe_after(id),
//!         None => hub.subscribe(),
//!     };
//!     Ok(http::Response::builder()
//!         .header("content-type", "text/event-stream")
//!         .body(subscription.with_gap_marker(SseGapMarker::new()))
//!         .unwrap())
//! }
//!
//! let hub: Hub = Hub::default();
//! hub.publish_sse("hello"); // "id: 0\ndata: hello\n\n"
//! # let _ = events;
//! ```
//!
//! # Retention and memory
//!
//! The hub holds each frame once, whatever the number of subscribers; a
//! subscriber reads a few frames at a time ([`Subscription`] takes up to 32
//! per lock) and holds only those between polls. A standalone subscription
//! has no limit of its own: it can fall behind by as much as the hub
//! retains, then skips to the oldest retained frame.

mod backfill;
mod config;
mod error;
pub(crate) mod log;
#[cfg(all(test, backpressure_loom))]
mod loom;
mod response;
pub mod sse;
mod subscription;
mod sweep;
mod window;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;

use self::backfill::Backfill;
pub use self::config::HubConfig;
pub use self::error::PublishError;
use self::log::{Log, MAX_ID};
pub(crate) use self::response::{Claimed, is_probe, probe};
pub use self::response::{HubBody, HubResponse};
pub use self::subscription::{HubEvent, Subscription};
pub(crate) use self::sweep::{Sweep, Sweeper};
pub(crate) use self::window::{MakeWindow, Tap, window_client};
use crate::buffer::{ByWeigh, Weigh, Weigher};
use crate::config::ConfigError;
// loom's under `cfg(backpressure_loom)`, so that the models in `loom.rs` see
// the log's lock.
use crate::sync::{AtomicUsize, Mutex, MutexGuard};

/// One log of frames shared by every subscriber: see the [module docs](self).
///
/// `Send + Sync` and cheap to clone (clones share the log). Generic over the
/// item, weighed for [`HubConfig::with_retain_bytes`] by `W` as a
/// [`ClientBuffer`](crate::ClientBuffer)'s items are: by their [`Weigh`]
/// impl ([`Hub::new`]) or any [`Weigher`] ([`Hub::with_weigher`]).
///
/// Many producers may publish at once: the log sits behind a mutex held for
/// the append only, and waiting subscribers are woken after it is released.
pub struct Hub<T = Bytes, W = ByWeigh> {
    shared: Arc<Shared<T, W>>,
}

/// What a hub's handles and subscriptions share.
pub(crate) struct Shared<T, W> {
    log: Mutex<Log<T>>,
    /// The layer's clients served from this log, swept for events.
    pub(crate) sweeper: Arc<Sweeper>,
    weigher: W,
    config: HubConfig,
    /// Live subscriptions and windows: [`Hub::subscribers`].
    subscribers: Arc<AtomicUsize>,
    /// Live [`Hub`] handles: the last one dropped closes the log.
    handles: AtomicUsize,
}

impl<T, W> Shared<T, W> {
    /// Locks the log. A panic under the lock (a `publish_with` closure or a
    /// weigher) leaves the log as it was, so a poisoned lock is used as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Log<T>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a new subscriber until the returned guard is dropped.
    pub(crate) fn subscriber(&self) -> Subscriber {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        Subscriber(Some(self.subscribers.clone()))
    }
}

/// One live subscriber of a hub (a [`Subscription`], or a client's window
/// over the log), counted in [`Hub::subscribers`] until it is dropped.
/// `Default` is a guard that counts nothing, to move the count out of a
/// subscription being rebuilt (`std::mem::take`).
#[derive(Debug, Default)]
pub(crate) struct Subscriber(Option<Arc<AtomicUsize>>);

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<T, W> Clone for Hub<T, W> {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T, W> Drop for Hub<T, W> {
    /// The last handle closes the hub (see [`Hub::close`]): nothing can
    /// publish any more, so its streams end once they have read what is
    /// there.
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.close();
        }
    }
}

impl<T, W> Shared<T, W> {
    /// Closes the log and wakes its parked readers (after the lock).
    pub(crate) fn close(&self) {
        let woken = self.lock().close();
        woken.finish();
    }
}

impl<T, W> fmt::Debug for Hub<T, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<T: Weigh> Default for Hub<T> {
    /// A hub with [`HubConfig::default`].
    fn default() -> Self {
        Self::new(HubConfig::default())
    }
}

impl<T: Weigh> Hub<T> {
    /// A hub that weighs items by their [`Weigh`] impl.
    ///
    /// # Panics
    ///
    /// If `config` is invalid, with the [`ConfigError`]'s message; use
    /// [`try_new`](Self::try_new) for configuration that comes from users.
    pub fn new(config: HubConfig) -> Self {
        Self::with_weigher(config, ByWeigh)
    }

    /// Like [`new`](Self::new), but returns the error.
    pub fn try_new(config: HubConfig) -> Result<Self, ConfigError> {
        Self::try_with_weigher(config, ByWeigh)
    }
}

impl<T, W> Hub<T, W> {
    /// A hub that weighs items with `weigher`.
    ///
    /// # Panics
    ///
    /// If `config` is invalid, with the [`ConfigError`]'s message.
    pub fn with_weigher(config: HubConfig, weigher: W) -> Self {
        match Self::try_with_weigher(config, weigher) {
            Ok(hub) => hub,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`with_weigher`](Self::with_weigher), but returns the error.
    pub fn try_with_weigher(config: HubConfig, weigher: W) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                log: Mutex::new(Log::new(config)),
                sweeper: Arc::default(),
                weigher,
                config,
                subscribers: Arc::new(AtomicUsize::new(0)),
                handles: AtomicUsize::new(1),
            }),
        })
    }

    /// A subscription to the frames published from now on: it starts after
    /// the newest frame (at the first frame, if nothing was published yet).
    pub fn subscribe(&self) -> Subscription<T, W> {
        let cursor = self.shared.lock().tail();
        Subscription::new(self.shared.clone(), cursor)
    }

    /// A subscription that resumes right after frame `id`: the SSE
    /// `Last-Event-ID` reconnect.
    ///
    /// - It first replays every frame still retained after `id`.
    /// - If frames after `id` are no longer retained, it starts at the oldest
    ///   retained frame, after a [`HubEvent::Gap`] of exactly the ids that
    ///   are gone (ids that never reached this hub included).
    /// - An id the hub has not seen yet (greater than the newest, or any id
    ///   before the first frame) is taken for one from the future, e.g. from
    ///   another server ahead of this one: the subscription starts after the
    ///   newest frame, as [`subscribe`](Self::subscribe) does.
    ///
    /// Ids keep their meaning across servers and restarts only if the
    /// producer assigns them ([`publish_with_id`](Self::publish_with_id)):
    /// the hub's own numbering starts at 0 in every process.
    pub fn subscribe_after(&self, id: u64) -> Subscription<T, W> {
        let cursor = self.shared.lock().after(id);
        Subscription::new(self.shared.clone(), cursor)
    }

    /// A subscription that first yields `frames`, fetched from elsewhere
    /// (a bus's history: frames this hub no longer retains, or never had),
    /// then the hub's frames after the last of them: for a client whose
    /// `Last-Event-ID` (`after`) is older than the hub's oldest frame.
    ///
    /// `frames` are `(id, item)`, oldest first. Those at or before `after`
    /// are left out; the rest must be one run of consecutive ids: from the
    /// first hole (or id out of order) on, the frames are left out too, and
    /// the hub's frames follow the run. Every id skipped is reported as a
    /// [`HubEvent::Gap`], exactly counted, as for any other gap: between
    /// `after` and the first frame, and between the run and the hub's
    /// frames (ids that were in neither, or that the run left out). With no
    /// frames left, this is [`subscribe_after`](Self::subscribe_after)
    /// (or [`subscribe`](Self::subscribe) without `after`).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use futures::StreamExt;
    /// use tower_backpressure::hub::{Hub, HubConfig, HubEvent};
    ///
    /// # futures::executor::block_on(async {
    /// let hub: Hub = Hub::new(HubConfig::new(2));
    /// for id in 10..15 {
    ///     hub.publish_with_id(id, Bytes::from(id.to_string())).unwrap();
    /// }
    /// // The hub retains 13 and 14; the client saw 9; the bus still has 10 and 11.
    /// let history = [(10, Bytes::from("10")), (11, Bytes::from("11"))];
    /// let mut sub = hub.subscribe_with_backfill(Some(9), history);
    /// assert_eq!(sub.next().await, Some(HubEvent::Frame { id: 10, item: Bytes::from("10") }));
    /// assert_eq!(sub.next().await, Some(HubEvent::Frame { id: 11, item: Bytes::from("11") }));
    /// assert_eq!(sub.next().await, Some(HubEvent::Gap { missed: 1 })); // 12: in neither
    /// assert_eq!(sub.next().await, Some(HubEvent::Frame { id: 13, item: Bytes::from("13") }));
    /// # });
    /// ```
    pub fn subscribe_with_backfill(
        &self,
        after: Option<u64>,
        frames: impl IntoIterator<Item = (u64, T)>,
    ) -> Subscription<T, W>
    where
        W: Weigher<T>,
    {
        let weigher = &self.shared.weigher;
        let frames = frames.into_iter().map(|(id, item)| {
            let weight = weigher.weigh(&item);
            (id, item, weight)
        });
        let backfill = Backfill::new(after, frames);
        self.subscribe_backfilled(after, backfill)
    }

    /// A subscription that starts with `backfill`.
    pub(crate) fn subscribe_backfilled(
        &self,
        after: Option<u64>,
        backfill: Backfill<T>,
    ) -> Subscription<T, W> {
        let cursor = {
            let log = self.shared.lock();
            match (backfill.cursor(&log), after) {
                (Some(cursor), _) => cursor,
                (None, Some(id)) => log.after(id),
                (None, None) => log.tail(),
            }
        };
        let mut subscription = Subscription::new(self.shared.clone(), cursor);
        subscription.seed(backfill);
        subscription
    }

    /// Ends every stream of the hub, cleanly: each [`Subscription`], and
    /// each client served through the layer, gets the frames published
    /// before the close (within its own limits, as always), then its end of
    /// stream; one that subscribes or resumes later gets what is retained,
    /// then its end. A server's shutdown calls it (see
    /// `Shutdown::close_hub`); the
    /// last [`Hub`] handle dropped calls it too.
    ///
    /// Publishing after the close still works (it never fails or waits)
    /// but reaches no stream. Idempotent.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use futures::StreamExt;
    /// use tower_backpressure::hub::{Hub, HubEvent};
    ///
    /// # futures::executor::block_on(async {
    /// let hub: Hub = Hub::default();
    /// let mut sub = hub.subscribe();
    /// hub.publish(Bytes::from("last"));
    /// hub.close();
    /// assert_eq!(sub.next().await, Some(HubEvent::Frame { id: 0, item: Bytes::from("last") }));
    /// assert_eq!(sub.next().await, None);
    /// # });
    /// ```
    pub fn close(&self) {
        self.shared.close();
    }

    /// Whether the hub has closed ([`close`](Self::close)).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().is_closed()
    }

    /// The id of the newest frame, if any was published.
    pub fn newest_id(&self) -> Option<u64> {
        self.shared.lock().newest_id()
    }

    /// The id of the oldest frame retained.
    pub fn oldest_id(&self) -> Option<u64> {
        self.shared.lock().oldest_id()
    }

    /// How many frames the hub holds (one copy each, whatever the number of
    /// subscribers).
    pub fn retained(&self) -> usize {
        self.shared.lock().len()
    }

    /// The bytes of the frames the hub holds, as weighed.
    pub fn retained_bytes(&self) -> usize {
        self.shared.lock().bytes()
    }

    /// How many frames were ever published.
    pub fn published(&self) -> u64 {
        self.shared.lock().published()
    }

    /// How many frames the retention let go of (every subscriber that had
    /// not read them yet sees them as a gap).
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped()
    }

    /// How many subscribers the hub has now: live [`Subscription`]s, and the
    /// windows of clients it serves through
    /// [`BackpressureLayer`](crate::BackpressureLayer) or a
    /// [`BufferedSink`](crate::BufferedSink) (a [`Hub::response`] counts as
    /// one, before and after the layer takes it over). Reads one atomic: no
    /// lock, cheap enough for every scrape of a metrics endpoint.
    pub fn subscribers(&self) -> usize {
        self.shared.subscribers.load(Ordering::Relaxed)
    }

    /// The retention limits.
    pub fn config(&self) -> HubConfig {
        self.shared.config
    }

    /// The state shared with subscriptions and the layer's per-client
    /// windows.
    pub(crate) fn shared(&self) -> &Arc<Shared<T, W>> {
        &self.shared
    }
}

impl<T, W: Weigher<T>> Hub<T, W> {
    /// Publishes `item` with the next id (0 for the first frame, else one
    /// after the newest) and returns that id.
    ///
    /// Never waits for a subscriber: it appends to the log, drops the oldest
    /// frames past the retention, and wakes the subscribers that were
    /// waiting for a frame (each once).
    ///
    /// # Panics
    ///
    /// If the ids are exhausted: the newest id is `u64::MAX - 1` (only
    /// [`publish_with_id`](Self::publish_with_id) can get there).
    pub fn publish(&self, item: T) -> u64 {
        let weight = self.shared.weigher.weigh(&item);
        let mut log = self.shared.lock();
        let Some(id) = log.next_id() else {
            drop(log);
            exhausted()
        };
        let pushed = log.push(id, item, weight);
        drop(log);
        pushed.finish();
        id
    }

    /// Publishes the item `f` builds from its id, and returns the id: for
    /// frames that carry their id, such as an SSE event's `id:` line
    /// ([`sse::frame`]). Every subscriber gets the one item built.
    ///
    /// `f` runs under the hub's lock, so that ids stay in order: keep it to
    /// encoding the item. If it panics nothing is published.
    ///
    /// # Panics
    ///
    /// If `f` does, or the ids are exhausted (see [`publish`](Self::publish)).
    pub fn publish_with(&self, f: impl FnOnce(u64) -> T) -> u64 {
        let mut log = self.shared.lock();
        let Some(id) = log.next_id() else {
            drop(log);
            exhausted()
        };
        let item = f(id);
        let weight = self.shared.weigher.weigh(&item);
        let pushed = log.push(id, item, weight);
        drop(log);
        pushed.finish();
        id
    }

    /// Publishes `item` with the producer's own `id`, e.g. a bus's sequence
    /// number, so that several hubs fed by one bus agree on ids.
    ///
    /// Ids must strictly increase, but may skip: ids that never reach this
    /// hub are holes, which a reader crossing them sees as a
    /// [`HubEvent::Gap`] of exactly the missing count. A later
    /// [`publish`](Self::publish) continues after `id`.
    ///
    /// # Errors
    ///
    /// [`PublishError`], with the item, if `id` is not greater than the
    /// newest id, or is `u64::MAX`; nothing already published is lost.
    pub fn publish_with_id(&self, id: u64, item: T) -> Result<(), PublishError<T>> {
        let weight = self.shared.weigher.weigh(&item);
        let mut log = self.shared.lock();
        if !log.accepts(id) {
            let newest = log.newest_id();
            drop(log);
            return Err(PublishError::new(id, newest, item));
        }
        let pushed = log.push(id, item, weight);
        drop(log);
        pushed.finish();
        Ok(())
    }
}

fn exhausted() -> ! {
    panic!("hub ids exhausted: the newest id is {MAX_ID}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn hub_is_send_sync_and_clone() {
        is_send_sync::<Hub>();
        is_send_sync::<Hub<String, fn(&String) -> usize>>();
    }

    /// Issue 20, bug 8, at the hub: a weigher that answers `usize::MAX`.
    #[test]
    fn a_huge_weight_is_published_and_the_hub_goes_on() {
        let weigher = |b: &Bytes| {
            if b.as_ref() == b"huge" {
                usize::MAX
            } else {
                b.len()
            }
        };
        let hub = Hub::with_weigher(HubConfig::new(4).with_retain_bytes(1 << 20), weigher);
        hub.publish(Bytes::from("a"));
        hub.publish(Bytes::from("huge"));
        hub.publish(Bytes::from("huge"));
        assert_eq!((hub.retained(), hub.retained_bytes()), (1, usize::MAX));
        hub.publish(Bytes::from("bc"));
        assert_eq!(
            (hub.published(), hub.newest_id(), hub.retained()),
            (4, Some(3), 1)
        );
        assert_eq!(hub.retained_bytes(), 2);
    }

    #[test]
    fn ids_strictly_increase() {
        let hub: Hub = Hub::default();
        assert_eq!(hub.newest_id(), None);
        assert_eq!(hub.publish(Bytes::from("a")), 0);
        assert_eq!(hub.publish(Bytes::from("b")), 1);
        hub.publish_with_id(10, Bytes::from("c")).unwrap();
        assert_eq!(hub.publish(Bytes::from("d")), 11);
        assert_eq!(hub.publish_with(|id| Bytes::from(id.to_string())), 12);
        assert_eq!((hub.oldest_id(), hub.newest_id()), (Some(0), Some(12)));
        assert_eq!((hub.retained(), hub.published()), (5, 5));
        let sub = hub.subscribe_after(11);
        let mut cursor = sub.cursor();
        let log = hub.shared.lock();
        assert_eq!(
            log.read(&mut cursor, 10, |_, e| assert_eq!(e.item, "12")),
            1
        );
    }

    #[test]
    fn subscribers_are_counted_while_they_live() {
        let hub: Hub = Hub::default();
        assert_eq!(hub.subscribers(), 0);
        let a = hub.subscribe();
        let b = hub
            .subscribe_after(3)
            .with_gap_marker(crate::SseGapMarker::new());
        assert_eq!(hub.subscribers(), 2);
        // A client's window, as the layer makes it, counts too.
        let (window, _) = hub
            .window_source(None, None)
            .window(Arc::new(crate::BufferConfig::new(10)), None);
        assert_eq!(hub.subscribers(), 3);
        drop((a, window));
        assert_eq!(hub.subscribers(), 1);
        // The response's subscription counts until the layer drops it.
        let response = hub.response().build();
        assert_eq!(hub.subscribers(), 2);
        drop((b, response));
        assert_eq!(hub.subscribers(), 0);
        // Clones share the count.
        let _c = hub.clone().subscribe();
        assert_eq!(hub.subscribers(), 1);
    }

    #[test]
    fn publish_with_id_errors_keep_everything() {
        let hub: Hub = Hub::default();
        hub.publish_with_id(5, Bytes::from("a")).unwrap();
        let e = hub.publish_with_id(5, Bytes::from("b")).unwrap_err();
        assert_eq!(
            (e.id(), e.newest_id(), e.item()),
            (5, Some(5), &Bytes::from("b"))
        );
        let e = hub.publish_with_id(2, Bytes::from("c")).unwrap_err();
        assert_eq!(e.to_string(), "hub frame id 2 is not after the newest id 5");
        let e = hub.publish_with_id(u64::MAX, Bytes::from("d")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hub frame id 18446744073709551615 is out of range (u64::MAX is reserved)"
        );
        assert_eq!(e.into_inner(), "d");
        assert_eq!((hub.retained(), hub.newest_id()), (1, Some(5)));
        hub.publish_with_id(MAX_ID, Bytes::new()).unwrap();
        let r = std::panic::catch_unwind(|| hub.publish(Bytes::new()));
        assert!(r.is_err());
        // The lock is not poisoned, and nothing changed.
        assert_eq!((hub.retained(), hub.newest_id()), (2, Some(MAX_ID)));
    }

    #[test]
    fn a_panicking_builder_publishes_nothing() {
        let hub: Hub = Hub::default();
        hub.publish(Bytes::from("a"));
        let h = hub.clone();
        let r = std::panic::catch_unwind(move || h.publish_with(|_| panic!("boom")));
        assert!(r.is_err());
        assert_eq!(hub.publish(Bytes::from("b")), 1);
        assert_eq!(hub.retained(), 2);
    }

    #[test]
    fn retention_by_frames_and_bytes() {
        let hub: Hub = Hub::new(HubConfig::new(4).with_retain_bytes(10));
        for _ in 0..6 {
            hub.publish(Bytes::from("abc"));
        }
        assert_eq!(
            (hub.retained(), hub.retained_bytes(), hub.dropped()),
            (3, 9, 3)
        );
        assert_eq!(hub.oldest_id(), Some(3));
        let hub: Hub<String, _> = Hub::with_weigher(HubConfig::new(4), |_: &String| 1000);
        for _ in 0..6 {
            hub.publish(String::new());
        }
        assert_eq!((hub.retained(), hub.retained_bytes()), (4, 4000));
    }

    #[test]
    #[should_panic(expected = "invalid hub config: retain_frames must be at least 1, got 0")]
    fn invalid_config_panics_with_its_message() {
        let _ = Hub::<Bytes>::new(HubConfig::new(0));
    }

    #[test]
    fn invalid_config_is_refused() {
        let e = Hub::<Bytes>::try_new(HubConfig::default().with_retain_bytes(0)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid hub config: retain_bytes")
        );
    }
}
