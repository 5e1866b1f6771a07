//! Model checks of the producer/consumer hand-off under loom: every
//! interleaving (within a preemption bound) of pushes, the end, polls,
//! drops, sheds and evictions.
//!
//! ```text
//! RUSTFLAGS="--cfg backpressure_loom" cargo test --release --lib client::loom
//! ```
//!
//! A lost wake-up shows as a model that never ends: each side waits for its
//! waker by spinning on `loom::thread::yield_now` (with `compare_exchange`:
//! loom does not let a `swap` loop observe the other thread's store), which
//! loom turns into a failure once the model exceeds its branch bound.

use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use bytes::Bytes;
use http::{Method, Uri};
use loom::sync::atomic::AtomicBool;

use super::{Client, End, Next, Produce, Pushed, Release, Reporter};
use crate::budget::MemoryBudget;
use crate::buffer::{ClientBuffer, FrameClass, Remaining};
use crate::config::{BufferConfig, Overflow};
use crate::handle::HandleInner;
use crate::info::ClientInfo;
use crate::observer::{BackpressureEvent, CloseReason, EventKind, EvictReason};
use crate::sync::Mutex;

type TestClient = Client<Bytes, Recorder, ClientBuffer<Bytes, Remaining>>;

/// Records every event, in the order delivered.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<EventKind>>>);

impl crate::observer::BackpressureObserver for Recorder {
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

    /// `Opened` first, `Pressure`/`Recovered` alternating, one `Closed`,
    /// last; returns its reason.
    fn check_order(&self) -> CloseReason {
        let events = self.events();
        assert_eq!(events.first(), Some(&EventKind::Opened), "{events:?}");
        let mut pressure = false;
        for kind in &events[1..events.len() - 1] {
            match kind {
                EventKind::Pressure => {
                    assert!(!pressure, "{events:?}");
                    pressure = true;
                }
                EventKind::Recovered => {
                    assert!(pressure, "{events:?}");
                    pressure = false;
                }
                EventKind::Dropped { .. } => {}
                other => panic!("unexpected {other:?} in {events:?}"),
            }
        }
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

fn client(config: BufferConfig, budget: Option<MemoryBudget>) -> (Arc<TestClient>, Recorder) {
    let recorder = Recorder::default();
    let info = ClientInfo::new(Method::GET, Uri::from_static("/"), None);
    let client = TestClient::new(
        ClientBuffer::with_weigher(config, Remaining),
        Arc::new(config),
        HandleInner::new(info),
        Arc::new(recorder.clone()),
        budget,
        Reporter::Producer,
    );
    client.open();
    (client, recorder)
}

fn frame(seq: u8) -> Bytes {
    Bytes::from(vec![seq; 4])
}

/// The producer side: pushes `n` frames (waiting for room under `Pause`),
/// then ends the stream; stops early when the stream closes.
fn produce(client: &TestClient, n: u8) {
    let (flag, waker) = flag();
    let cx = Context::from_waker(&waker);
    for seq in 0..n {
        loop {
            match client.poll_produce(&cx) {
                Produce::Closed => return,
                Produce::Paused => park(&flag),
                Produce::Ready { .. } => break,
            }
        }
        match client.push(frame(seq), FrameClass::Droppable, 4) {
            Pushed::Closed => return,
            Pushed::Taken | Pushed::Paused => {}
        }
        client.report_drops();
    }
    client.finish(End::Eof);
}

/// What the consumer saw.
#[derive(Debug, PartialEq)]
enum Outcome {
    End,
    Closed,
    Evicted(EvictReason),
}

/// The consumer side: takes frames until the end; checks on the way that
/// `is_done` is only true when nothing more comes.
fn consume(client: &TestClient, stop_after: Option<usize>) -> (Vec<u8>, Option<Outcome>) {
    let (flag, waker) = flag();
    let cx = Context::from_waker(&waker);
    let mut release = Release::default();
    let mut got = Vec::new();
    loop {
        if stop_after == Some(got.len()) {
            client.consumer_dropped(true);
            return (got, None);
        }
        let done = client.is_done();
        let next = client.poll_next(&cx, &mut release, false);
        if done {
            assert!(
                matches!(next, Next::End | Next::Closed),
                "is_done() was true but more came"
            );
        }
        match next {
            Next::Data(data, _) => got.push(data[0]),
            Next::TrailingGap(_) => {}
            Next::End => return (got, Some(Outcome::End)),
            Next::Closed => return (got, Some(Outcome::Closed)),
            Next::Evicted(rule) => return (got, Some(Outcome::Evicted(rule))),
            Next::Wait(_) => park(&flag),
            Next::Trailers(_) | Next::Error(_) | Next::Stopped => unreachable!(),
        }
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.max_branches = 100_000;
    builder.check(f);
}

fn increasing(got: &[u8]) -> bool {
    got.windows(2).all(|w| w[0] < w[1])
}

#[test]
fn every_kept_frame_then_the_end() {
    model(|| {
        let (client, recorder) = client(BufferConfig::new(2), None);
        let producer = {
            let client = client.clone();
            loom::thread::spawn(move || produce(&client, 3))
        };
        let (got, outcome) = consume(&client, None);
        producer.join().unwrap();
        assert_eq!(outcome, Some(Outcome::End));
        assert!(increasing(&got), "{got:?}");
        // Drop-oldest keeps the newest: the last frame always arrives.
        assert_eq!(got.last(), Some(&2), "{got:?}");
        assert_eq!(recorder.check_order(), CloseReason::Completed);
        let stats = client.stats();
        assert_eq!(stats.pushed, stats.sent + stats.dropped + stats.replaced);
        assert_eq!(stats.sent as usize, got.len());
        // The reports add up (a run with nothing to report reads an atomic
        // instead of the state: it must never skip a drop).
        assert_eq!(recorder.dropped(), stats.dropped);
    });
}

#[test]
fn pause_loses_no_frame_and_no_wake_up() {
    model(|| {
        let config = BufferConfig::new(1).with_overflow(Overflow::Pause);
        let (client, recorder) = client(config, None);
        let producer = {
            let client = client.clone();
            loom::thread::spawn(move || produce(&client, 3))
        };
        let (got, outcome) = consume(&client, None);
        producer.join().unwrap();
        assert_eq!(outcome, Some(Outcome::End));
        assert_eq!(got, [0, 1, 2]);
        assert_eq!(recorder.check_order(), CloseReason::Completed);
    });
}

#[test]
fn a_consumer_that_goes_wakes_a_paused_producer() {
    model(|| {
        let config = BufferConfig::new(1).with_overflow(Overflow::Pause);
        let (client, recorder) = client(config, None);
        let producer = {
            let client = client.clone();
            // More than fits: the producer pauses until the consumer goes.
            loom::thread::spawn(move || produce(&client, 4))
        };
        let (got, _) = consume(&client, Some(1));
        // The producer must end: woken by the close, it sees it.
        producer.join().unwrap();
        assert_eq!(got, [0]);
        assert_eq!(recorder.check_order(), CloseReason::ClientGone);
    });
}

#[test]
fn a_disconnect_eviction_reaches_the_consumer_once() {
    model(|| {
        let config = BufferConfig::new(1).with_overflow(Overflow::Disconnect);
        let (client, recorder) = client(config, None);
        let producer = {
            let client = client.clone();
            loom::thread::spawn(move || produce(&client, 3))
        };
        let (got, outcome) = consume(&client, None);
        producer.join().unwrap();
        assert!(increasing(&got), "{got:?}");
        match outcome {
            // The consumer kept up: nothing overflowed.
            Some(Outcome::End) => assert_eq!(got, [0, 1, 2]),
            Some(Outcome::Evicted(rule)) => {
                assert_eq!(rule, EvictReason::Overflow);
                assert_eq!(
                    recorder.check_order(),
                    CloseReason::Evicted(EvictReason::Overflow)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(client.is_done(), "nothing more after the end or eviction");
    });
}

#[test]
fn a_budget_shed_races_the_consumer_and_the_budget_returns_to_zero() {
    model(|| {
        // Room for two frames in all: the second client's pushes shed the
        // first client's frames while its consumer takes them.
        let budget = MemoryBudget::new(8);
        let (a, recorder_a) = client(BufferConfig::new(4), Some(budget.clone()));
        let (b, recorder_b) = client(BufferConfig::new(4), Some(budget.clone()));
        assert_eq!(a.push(frame(0), FrameClass::Droppable, 4), Pushed::Taken);
        assert_eq!(a.push(frame(1), FrameClass::Droppable, 4), Pushed::Taken);
        let shedder = {
            let b = b.clone();
            loom::thread::spawn(move || {
                assert_eq!(b.push(frame(9), FrameClass::Droppable, 4), Pushed::Taken);
                b.finish(End::Eof);
            })
        };
        a.finish(End::Eof);
        let (got, outcome) = consume(&a, None);
        shedder.join().unwrap();
        assert_eq!(outcome, Some(Outcome::End));
        assert!(increasing(&got), "{got:?}");
        assert!(budget.used() <= budget.limit());
        let (got_b, _) = consume(&b, None);
        assert_eq!(got_b, [9]);
        assert_eq!(recorder_a.check_order(), CloseReason::Completed);
        assert_eq!(recorder_b.check_order(), CloseReason::Completed);
        assert_eq!(budget.used(), 0, "every byte returned");
    });
}
