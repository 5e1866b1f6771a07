//! Model checks of the hub's hand-off under loom: a publisher appends to
//! the shared log while a reader (a client's window over it, driven by the
//! client state machine, or a plain [`Subscription`]) refreshes, parks and
//! pops, in every interleaving within a preemption bound.
//!
//! ```text
//! RUSTFLAGS="--cfg backpressure_loom" cargo test --release --lib hub::loom
//! ```
//!
//! What they check: no lost wake-up (a reader that parked is woken by the
//! push after it; a lost one shows as a model that never ends, see
//! `src/client/loom.rs`), ids in order, every id published after the
//! cursor either delivered or counted in exactly one gap, the window's
//! counters exact (`sent + dropped + replaced + buffered` is every frame
//! published after its cursor), and the `Dropped` reports adding up.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use futures_core::Stream;
use http::{Method, Uri};
use loom::sync::atomic::AtomicBool;

use super::window::Window;
use super::{Hub, HubConfig, HubEvent};
use crate::buffer::ByWeigh;
use crate::client::{Client, Next, Release, Reporter};
use crate::config::BufferConfig;
use crate::handle::HandleInner;
use crate::info::ClientInfo;
use crate::observer::{BackpressureEvent, BackpressureObserver, CloseReason, EventKind};
use crate::sync::Mutex;

type Windowed = Client<Bytes, Recorder, Window<Bytes, ByWeigh>>;

/// Records every event, in the order delivered.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<EventKind>>>);

impl BackpressureObserver for Recorder {
    fn on_event(&self, event: &BackpressureEvent<'_>) {
        self.0.lock().unwrap().push(event.kind);
    }
}

impl Recorder {
    fn events(&self) -> Vec<EventKind> {
        self.0.lock().unwrap().clone()
    }

    /// The frames that `Dropped` events reported, in all.
    fn dropped(&self) -> u64 {
        self.events()
            .iter()
            .map(|kind| match kind {
                EventKind::Dropped { count, .. } => *count,
                _ => 0,
            })
            .sum()
    }

    /// The reason of the one `Closed`, which comes last.
    fn closed(&self) -> CloseReason {
        let events = self.events();
        assert_eq!(events.first(), Some(&EventKind::Opened), "{events:?}");
        let closes = events
            .iter()
            .filter(|k| matches!(k, EventKind::Closed { .. }))
            .count();
        assert_eq!(closes, 1, "{events:?}");
        match events.last() {
            Some(EventKind::Closed { reason }) => *reason,
            other => panic!("the last event is {other:?}, not Closed: {events:?}"),
        }
    }
}

/// A waker that sets a flag loom can see.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

fn flag() -> (Arc<Flag>, Waker) {
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    (flag, waker)
}

/// Waits for a wake-up; a lost one spins until loom gives up on the model.
fn park(flag: &Flag) {
    while flag
        .0
        .compare_exchange(
            true,
            false,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        )
        .is_err()
    {
        loom::thread::yield_now();
    }
}

fn frame(seq: u8) -> Bytes {
    Bytes::from(vec![seq; 4])
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.max_branches = 100_000;
    builder.check(f);
}

/// A client reading through a window over `hub`'s log from its tail (as
/// the layer makes one for a [`Hub::response`]), not attached to a sweep.
fn window_client(hub: &Hub, config: BufferConfig, limit: Option<u64>) -> (Arc<Windowed>, Recorder) {
    let recorder = Recorder::default();
    let cursor = hub.shared().lock().tail();
    let config = Arc::new(config);
    let window = Window::new(
        hub.shared().clone(),
        cursor,
        config.clone(),
        None,
        limit,
        false,
        None,
    );
    let info = ClientInfo::new(Method::GET, Uri::from_static("/"), None);
    let client = Windowed::new(
        window,
        config,
        HandleInner::new(info),
        Arc::new(recorder.clone()),
        None,
        Reporter::Consumer,
    );
    client.open();
    (client, recorder)
}

/// Publishes frames `0..n` (ids `0..n`).
fn publisher(hub: &Hub, n: u8) -> loom::thread::JoinHandle<()> {
    let hub = hub.clone();
    loom::thread::spawn(move || {
        for seq in 0..n {
            assert_eq!(hub.publish(frame(seq)), u64::from(seq));
        }
    })
}

/// What a window's client got: each frame's first byte (its id) and the
/// ids skipped before it.
#[derive(Debug, Default)]
struct Got {
    ids: Vec<u8>,
    gaps: Vec<u64>,
    ended: bool,
}

impl Got {
    /// Ids strictly increase, and each gap counts exactly the ids between
    /// a frame and the one before it (from `0`).
    fn check(&self) {
        let mut expect = 0u64;
        for (&id, &gap) in self.ids.iter().zip(&self.gaps) {
            let id = u64::from(id);
            assert!(id >= expect, "ids go backwards: {self:?}");
            assert_eq!(gap, id - expect, "inexact gap before {id}: {self:?}");
            expect = id + 1;
        }
    }
}

/// Takes frames until the stream ends or `last` arrives (the newest frame,
/// which drop-oldest always keeps), parking whenever there is nothing.
fn consume(client: &Windowed, last: Option<u8>) -> Got {
    let (flag, waker) = flag();
    let cx = Context::from_waker(&waker);
    let mut release = Release::default();
    let mut got = Got::default();
    loop {
        match client.poll_next(&cx, &mut release, false) {
            Next::Data(data, gap) => {
                got.ids.push(data[0]);
                got.gaps.push(gap.frames);
                if last == Some(data[0]) {
                    return got;
                }
            }
            Next::Wait(None) => park(&flag),
            Next::End => {
                got.ended = true;
                return got;
            }
            Next::Wait(Some(_))
            | Next::TrailingGap(_)
            | Next::Trailers(_)
            | Next::Error(_)
            | Next::Evicted(_)
            | Next::Stopped
            | Next::Closed => panic!("unexpected in {got:?}"),
        }
    }
}

#[test]
fn a_window_that_keeps_up_gets_every_frame_in_order_then_its_end() {
    model(|| {
        let hub: Hub = Hub::new(HubConfig::new(4));
        // A limited window: its stream ends after three frames.
        let (client, recorder) = window_client(&hub, BufferConfig::new(4), Some(3));
        let publisher = publisher(&hub, 3);
        let got = consume(&client, None);
        publisher.join().unwrap();
        assert!(got.ended, "{got:?}");
        assert_eq!(got.ids, [0, 1, 2]);
        assert_eq!(got.gaps, [0, 0, 0]);
        assert_eq!(recorder.closed(), CloseReason::Completed);
        let stats = client.stats();
        assert_eq!((stats.sent, stats.dropped, stats.buffered), (3, 0, 0));
    });
}

#[test]
fn a_window_that_falls_behind_gets_exact_gaps_and_exact_counts() {
    model(|| {
        let hub: Hub = Hub::new(HubConfig::new(4));
        // Room for one frame: whatever the reader missed is skipped.
        let (client, recorder) = window_client(&hub, BufferConfig::new(1), None);
        let publisher = publisher(&hub, 4);
        let got = consume(&client, Some(3));
        publisher.join().unwrap();
        got.check();
        let stats = client.stats();
        // Every frame published after the cursor is accounted for once.
        assert_eq!(stats.pushed, 4, "{stats:?}");
        assert_eq!(
            stats.sent + stats.dropped + stats.replaced + stats.buffered as u64,
            4,
            "{stats:?}"
        );
        assert_eq!(stats.sent as usize, got.ids.len());
        // Nothing skipped but what the window dropped (the log retains all).
        assert_eq!(got.gaps.iter().sum::<u64>(), stats.dropped, "{got:?}");
        client.consumer_dropped(true);
        assert_eq!(recorder.closed(), CloseReason::ClientGone);
        // The reports add up: what waited for its interval went out with
        // `Closed`.
        assert_eq!(recorder.dropped(), client.stats().dropped);
    });
}

#[test]
fn a_window_behind_the_retention_counts_what_the_log_let_go() {
    model(|| {
        // The log retains one frame: a reader that is late misses the rest.
        let hub: Hub = Hub::new(HubConfig::new(1));
        let (client, recorder) = window_client(&hub, BufferConfig::new(4), None);
        let publisher = publisher(&hub, 3);
        let got = consume(&client, Some(2));
        publisher.join().unwrap();
        got.check();
        assert_eq!(
            got.ids.len() as u64 + got.gaps.iter().sum::<u64>(),
            3,
            "every id delivered or counted once: {got:?}"
        );
        client.consumer_dropped(true);
        assert_eq!(recorder.closed(), CloseReason::ClientGone);
    });
}

#[test]
fn a_subscription_is_woken_for_every_frame_and_skips_exactly_what_is_gone() {
    model(|| {
        let hub: Hub = Hub::new(HubConfig::new(2));
        let mut sub = hub.subscribe();
        let publisher = publisher(&hub, 3);
        let (flag, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let mut got = Got::default();
        let mut gap = 0;
        while got.ids.last() != Some(&2) {
            match Pin::new(&mut sub).poll_next(&mut cx) {
                Poll::Ready(Some(HubEvent::Frame { id, item })) => {
                    assert_eq!(u64::from(item[0]), id);
                    got.ids.push(item[0]);
                    got.gaps.push(std::mem::take(&mut gap));
                }
                Poll::Ready(Some(HubEvent::Gap { missed })) => gap += missed,
                Poll::Ready(None) => panic!("a hub's subscription does not end"),
                Poll::Pending => park(&flag),
            }
        }
        publisher.join().unwrap();
        got.check();
        assert_eq!(got.ids.len() as u64 + got.gaps.iter().sum::<u64>(), 3);
    });
}

#[test]
fn the_sweep_racing_a_reader_loses_no_wake_up_and_no_count() {
    let mut builder = loom::model::Builder::new();
    // Three threads: a smaller bound keeps the model to seconds.
    builder.preemption_bound = Some(2);
    builder.max_branches = 100_000;
    builder.check(|| {
        let hub: Hub = Hub::new(HubConfig::new(4));
        let (client, recorder) = window_client(&hub, BufferConfig::new(1), None);
        let publisher = publisher(&hub, 3);
        // The hub's sweep looks at the client (brings its window up to
        // date, reports its drops) while it reads.
        let sweep = {
            let client = client.clone();
            loom::thread::spawn(move || {
                let period = std::time::Duration::from_millis(100);
                client.sweep(period, period * 10);
            })
        };
        let got = consume(&client, Some(2));
        publisher.join().unwrap();
        sweep.join().unwrap();
        got.check();
        let stats = client.stats();
        assert_eq!(stats.pushed, 3, "{stats:?}");
        assert_eq!(got.gaps.iter().sum::<u64>(), stats.dropped, "{got:?}");
        client.consumer_dropped(true);
        assert_eq!(recorder.closed(), CloseReason::ClientGone);
        assert_eq!(recorder.dropped(), client.stats().dropped);
    });
}
