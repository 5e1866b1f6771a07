//! The hub through its public API: ids, retention, resume with exact gaps,
//! wake-ups (only parked subscribers, once), SSE, a concurrency stress test
//! and a real hyper server with 1,000 stalled subscriptions.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use common::*;
use futures::{Stream, StreamExt};
use http::{Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower_backpressure::hub::{HubEvent, Subscription, sse};
use tower_backpressure::{Hub, HubConfig, SseGapMarker};

/// A waker that counts its wakes.
#[derive(Default)]
struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Counted {
    count: Arc<Count>,
    waker: Waker,
}

impl Counted {
    fn new() -> Self {
        let count = Arc::new(Count::default());
        Self {
            waker: Waker::from(count.clone()),
            count,
        }
    }

    fn wakes(&self) -> usize {
        self.count.0.load(Ordering::SeqCst)
    }

    fn poll<S: Stream + Unpin>(&self, s: &mut S) -> Poll<Option<S::Item>> {
        Pin::new(s).poll_next(&mut Context::from_waker(&self.waker))
    }
}

fn b(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn frame(id: u64, text: &str) -> Poll<Option<HubEvent<Bytes>>> {
    Poll::Ready(Some(HubEvent::Frame { id, item: b(text) }))
}

fn gap(missed: u64) -> Poll<Option<HubEvent<Bytes>>> {
    Poll::Ready(Some(HubEvent::Gap { missed }))
}

/// How many whole SSE events `text` holds.
fn complete_events(text: &[u8]) -> usize {
    text.windows(2).filter(|w| w == b"\n\n").count()
}

/// Everything a subscription has ready now.
fn drain(w: &Counted, sub: &mut Subscription) -> Vec<HubEvent<Bytes>> {
    let mut out = Vec::new();
    while let Poll::Ready(Some(e)) = w.poll(sub) {
        out.push(e);
    }
    out
}

#[test]
fn ids_strictly_increase_and_continue_after_the_producers() {
    let hub: Hub = Hub::default();
    let ids: Vec<u64> = (0..3).map(|_| hub.publish(b("a"))).collect();
    assert_eq!(ids, [0, 1, 2]);
    hub.publish_with_id(100, b("b")).unwrap();
    assert_eq!(hub.publish(b("c")), 101);
    assert_eq!(hub.publish_sse("d"), 102);
    assert_eq!((hub.newest_id(), hub.published()), (Some(102), 6));
}

#[test]
fn retention_by_frames_and_by_bytes() {
    let hub: Hub = Hub::new(HubConfig::new(5));
    for i in 0..12 {
        hub.publish(b(&i.to_string()));
    }
    assert_eq!(
        (hub.oldest_id(), hub.retained(), hub.dropped()),
        (Some(7), 5, 7)
    );

    let hub: Hub = Hub::new(HubConfig::new(100).with_retain_bytes(10));
    for _ in 0..12 {
        hub.publish(b("abcd"));
    }
    assert_eq!((hub.retained(), hub.retained_bytes()), (2, 8));
    // A frame over the byte limit is kept alone: the newest always is.
    hub.publish(Bytes::from(vec![0; 64]));
    assert_eq!((hub.retained(), hub.retained_bytes()), (1, 64));
    assert_eq!(hub.oldest_id(), hub.newest_id());
}

#[test]
fn invalid_configs_are_refused() {
    assert!(Hub::<Bytes>::try_new(HubConfig::new(0)).is_err());
    let e = Hub::<Bytes>::try_new(HubConfig::default().with_retain_bytes(0)).unwrap_err();
    assert!(e.to_string().starts_with("invalid hub config: "), "{e}");
}

#[test]
fn resume_within_and_beyond_the_retention_and_from_the_future() {
    let hub: Hub = Hub::new(HubConfig::new(4));
    for i in 0..10 {
        hub.publish(b(&i.to_string()));
    }
    // Retained: 6, 7, 8, 9.
    let w = Counted::new();
    let mut within = hub.subscribe_after(7);
    assert_eq!(
        drain(&w, &mut within),
        [8, 9].map(|i| HubEvent::Frame {
            id: i,
            item: b(&i.to_string())
        })
    );
    // Frames 3, 4, 5 are gone: a gap of exactly 3, then everything retained.
    let mut beyond = hub.subscribe_after(2);
    assert_eq!(w.poll(&mut beyond), gap(3));
    assert_eq!(w.poll(&mut beyond), frame(6, "6"));
    assert_eq!(beyond.backlog(), 3);
    // The newest and a future id start after the newest.
    let mut newest = hub.subscribe_after(9);
    let mut future = hub.subscribe_after(1_000);
    let mut live = hub.subscribe();
    for sub in [&mut newest, &mut future, &mut live] {
        assert_eq!(w.poll(sub), Poll::Pending);
    }
    hub.publish(b("10"));
    for sub in [&mut newest, &mut future, &mut live] {
        assert_eq!(
            drain(&w, sub),
            [HubEvent::Frame {
                id: 10,
                item: b("10")
            }]
        );
    }
}

#[test]
fn publish_with_id_errors_keep_everything() {
    let hub: Hub = Hub::default();
    let w = Counted::new();
    let mut sub = hub.subscribe();
    hub.publish_with_id(10, b("a")).unwrap();
    hub.publish_with_id(11, b("b")).unwrap();
    for bad in [11, 3, u64::MAX] {
        let e = hub.publish_with_id(bad, b("x")).unwrap_err();
        assert_eq!(e.id(), bad);
        assert_eq!(e.into_inner(), "x");
    }
    let e = hub.publish_with_id(0, b("y")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "hub frame id 0 is not after the newest id 11"
    );
    let e: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
    assert!(
        e.downcast_ref::<tower_backpressure::hub::PublishError<Bytes>>()
            .is_some()
    );
    assert_eq!((hub.retained(), hub.newest_id()), (2, Some(11)));
    assert_eq!(
        drain(&w, &mut sub),
        [
            HubEvent::Frame {
                id: 10,
                item: b("a")
            },
            HubEvent::Frame {
                id: 11,
                item: b("b")
            },
        ]
    );
}

#[test]
fn holes_are_gaps_of_exactly_the_missing_ids() {
    let hub: Hub = Hub::default();
    let w = Counted::new();
    let mut sub = hub.subscribe();
    for id in [5, 6, 9, 20] {
        hub.publish_with_id(id, b(&id.to_string())).unwrap();
    }
    assert_eq!(w.poll(&mut sub), frame(5, "5"));
    assert_eq!(w.poll(&mut sub), frame(6, "6"));
    assert_eq!(w.poll(&mut sub), gap(2));
    assert_eq!(w.poll(&mut sub), frame(9, "9"));
    assert_eq!(w.poll(&mut sub), gap(10));
    assert_eq!(w.poll(&mut sub), frame(20, "20"));
    // Resuming before the hub's first frame counts the ids it never had.
    let mut resumed = hub.subscribe_after(1);
    assert_eq!(w.poll(&mut resumed), gap(3));
    assert_eq!(w.poll(&mut resumed), frame(5, "5"));
}

#[test]
fn only_parked_subscribers_are_woken_and_each_once() {
    let hub: Hub = Hub::default();
    let parked = Counted::new();
    let reader = Counted::new();
    let mut waiting = hub.subscribe();
    let mut read_then_stalled = hub.subscribe();
    let _never_polled = hub.subscribe();
    assert_eq!(parked.poll(&mut waiting), Poll::Pending);
    hub.publish(b("0"));
    assert_eq!(reader.poll(&mut read_then_stalled), frame(0, "0"));
    for i in 1..1_000 {
        hub.publish(b(&i.to_string()));
    }
    assert_eq!(parked.wakes(), 1, "woken once, by the first publish");
    assert_eq!(reader.wakes(), 0, "never parked, never touched");
    // Each reads on from where it was.
    assert_eq!(parked.poll(&mut waiting), frame(0, "0"));
    assert_eq!(reader.poll(&mut read_then_stalled), frame(1, "1"));
}

#[test]
fn a_dropped_subscription_is_not_woken() {
    let hub: Hub = Hub::default();
    let w = Counted::new();
    let mut sub = hub.subscribe();
    assert_eq!(w.poll(&mut sub), Poll::Pending);
    drop(sub);
    hub.publish(b("a"));
    assert_eq!(w.wakes(), 0);
    // The waker itself is gone with the subscription: only ours is left.
    assert_eq!(Arc::strong_count(&w.count), 2);
}

#[test]
fn sse_frames_carry_the_hubs_id() {
    let hub: Hub = Hub::default();
    let w = Counted::new();
    let mut sub = hub.subscribe();
    hub.publish(b("plain"));
    hub.publish_sse("one\ntwo");
    hub.publish_with(|id| sse::frame(id, Some("tick"), "3"));
    assert_eq!(
        drain(&w, &mut sub),
        [
            HubEvent::Frame {
                id: 0,
                item: b("plain")
            },
            HubEvent::Frame {
                id: 1,
                item: b("id: 1\ndata: one\ndata: two\n\n")
            },
            HubEvent::Frame {
                id: 2,
                item: b("id: 2\nevent: tick\ndata: 3\n\n")
            },
        ]
    );
}

#[test]
fn last_event_id_from_requests() {
    let req = |v: &str| {
        Request::get("/events")
            .header("last-event-id", v)
            .body(())
            .unwrap()
    };
    assert_eq!(sse::last_event_id(&req("41")), Some(41));
    assert_eq!(sse::last_event_id(&req(" 41 ")), Some(41));
    assert_eq!(sse::last_event_id(&req("forty-one")), None);
    assert_eq!(sse::last_event_id(&req("")), None);
    assert_eq!(sse::last_event_id(&Request::new(())), None);
    assert_eq!(sse::last_event_id_from(req("7").headers()), Some(7));
}

/// Several publisher threads and subscriber tasks at once: every subscriber
/// sees strictly increasing ids, and what it got plus what it was told it
/// missed is everything published.
#[test]
fn concurrent_publishers_and_subscribers_account_for_every_id() {
    const PUBLISHERS: u64 = 4;
    const PER_PUBLISHER: u64 = 5_000;
    const SUBSCRIBERS: usize = 6;
    const TOTAL: u64 = PUBLISHERS * PER_PUBLISHER;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A small retention, so that slow subscribers fall behind it.
    let hub = Hub::with_weigher(HubConfig::new(256), |_: &(u64, u64)| 16);
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|n| {
            let mut sub = hub.subscribe();
            rt.spawn(async move {
                let slow = n % 2 == 1;
                let (mut delivered, mut missed) = (0u64, 0u64);
                let mut expect = 0u64;
                let mut last_seq = [None::<u64>; PUBLISHERS as usize];
                guard("every id", async {
                    loop {
                        match sub.next().await.expect("never ends") {
                            HubEvent::Gap { missed: m } => {
                                assert!(m > 0);
                                missed += m;
                                expect += m;
                            }
                            HubEvent::Frame {
                                id,
                                item: (publisher, seq),
                            } => {
                                assert_eq!(id, expect, "ids strictly increase, gaps exact");
                                let last = &mut last_seq[publisher as usize];
                                assert!(last.is_none_or(|l| seq > l), "per-publisher order");
                                *last = Some(seq);
                                delivered += 1;
                                expect = id + 1;
                                if id == TOTAL - 1 {
                                    return;
                                }
                            }
                        }
                        if slow {
                            tokio::task::yield_now().await;
                        }
                    }
                })
                .await;
                (delivered, missed)
            })
        })
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::with_capacity(PER_PUBLISHER as usize);
                for seq in 0..PER_PUBLISHER {
                    ids.push(hub.publish((p, seq)));
                }
                ids
            })
        })
        .collect();
    let mut all_ids = Vec::new();
    for p in publishers {
        let ids = p.join().unwrap();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        all_ids.extend(ids);
    }
    all_ids.sort_unstable();
    assert_eq!(all_ids, (0..TOTAL).collect::<Vec<_>>(), "each id once");
    assert_eq!(hub.newest_id(), Some(TOTAL - 1));
    let mut lagged = 0;
    for s in subscribers {
        let (delivered, missed) = rt.block_on(s).unwrap();
        assert_eq!(delivered + missed, TOTAL);
        lagged += u64::from(missed > 0);
    }
    // Not asserted (scheduling decides), but shown with --nocapture.
    println!("{lagged} of {SUBSCRIBERS} subscribers fell behind the retention");
}

/// A fast client reads every event from a real hyper server fed by a hub,
/// while 1,000 subscriptions stall: they are never woken and hold nothing,
/// and the hub holds one copy of each event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_client_gets_everything_while_a_thousand_stall() {
    const EVENTS: u64 = 2_000;
    let hub: Hub = Hub::default();
    let server_hub = hub.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let hub = server_hub.clone();
        async move {
            let sub = match sse::last_event_id(&req) {
                Some(id) => hub.subscribe_after(id),
                None => hub.subscribe(),
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(sub.with_gap_marker(SseGapMarker::new()))
                    .unwrap(),
            )
        }
    });
    let addr = serve(svc).await;

    // 1,000 stalled subscriptions: 500 read one event then stall, 500 wait
    // (parked) then stall.
    let readers = Counted::new();
    let waiters = Counted::new();
    let mut read_once: Vec<Subscription> = (0..500).map(|_| hub.subscribe()).collect();
    let mut parked: Vec<Subscription> = (0..500).map(|_| hub.subscribe()).collect();
    for sub in &mut parked {
        assert_eq!(waiters.poll(sub), Poll::Pending);
    }

    // The fast client's subscription exists once its headers arrive.
    let mut client = connect(addr, None).await;
    let res = get(&mut client, "/events").await;
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = res.into_body();

    hub.publish_sse("event 0");
    for sub in &mut read_once {
        assert!(matches!(
            readers.poll(sub),
            Poll::Ready(Some(HubEvent::Frame { id: 0, .. }))
        ));
    }
    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            for i in 1..EVENTS {
                hub.publish_sse(&format!("event {i}"));
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    let mut text = Vec::new();
    guard("every event", async {
        while complete_events(&text) < EVENTS as usize {
            let frame = body.frame().await.expect("open").unwrap();
            text.extend_from_slice(frame.data_ref().unwrap());
        }
    })
    .await;
    publisher.await.unwrap();
    assert_eq!(sse_ids(&text), (0..EVENTS).collect::<Vec<_>>());
    let text = String::from_utf8(text).unwrap();
    assert!(!text.contains("lagged"));
    assert!(text.starts_with("id: 0\ndata: event 0\n\n"));

    // The stalled cost nothing per event: never woken after they read, and
    // the parked ones once, by the first event.
    assert_eq!(readers.wakes(), 0);
    assert_eq!(waiters.wakes(), 500);
    // One copy of each event, in the hub, shared by every subscriber.
    assert_eq!(hub.retained(), EVENTS as usize);
    let mut first = None;
    for sub in read_once
        .iter_mut()
        .take(3)
        .chain(parked.iter_mut().take(3))
    {
        let mut events = Vec::new();
        while let Poll::Ready(Some(e)) = readers.poll(sub) {
            events.push(e);
        }
        let HubEvent::Frame { id, item } = events.pop().unwrap() else {
            panic!("a frame")
        };
        assert_eq!(id, EVENTS - 1);
        let ptr = item.as_ptr();
        assert_eq!(*first.get_or_insert(ptr), ptr, "the same bytes, not a copy");
    }
    // A reconnect with Last-Event-ID replays what followed.
    let mut again = connect(addr, None).await;
    let req = Request::get("/events")
        .header("host", "localhost")
        .header("last-event-id", (EVENTS - 3).to_string())
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = guard("headers", again.sender.send_request(req))
        .await
        .unwrap();
    let mut body = res.into_body();
    let mut text = Vec::new();
    while complete_events(&text) < 2 {
        let frame = guard("a frame", body.frame()).await.unwrap().unwrap();
        text.extend_from_slice(frame.data_ref().unwrap());
    }
    assert_eq!(sse_ids(&text), [EVENTS - 2, EVENTS - 1]);
}

/// Issue 20, hazard: nothing ended a hub's streams. Closing it (or dropping
/// its last handle) ends each subscription after the frames published
/// before; a parked one is woken to see it; one made after the close gets
/// what is retained, then its end.
#[test]
fn closing_or_dropping_the_hub_ends_every_subscription_after_its_frames() {
    let w = Counted::new();
    let hub: Hub = Hub::new(HubConfig::new(10));
    let mut parked = hub.subscribe();
    let mut behind = hub.subscribe();
    assert_eq!(w.poll(&mut parked), Poll::Pending);
    hub.publish(b("a"));
    hub.publish(b("b"));
    assert_eq!(w.poll(&mut parked), frame(0, "a"));
    assert_eq!(w.poll(&mut parked), frame(1, "b"));
    assert_eq!(w.poll(&mut parked), Poll::Pending);
    let wakes = w.count.0.load(Ordering::SeqCst);
    hub.close();
    assert!(hub.is_closed());
    assert_eq!(
        w.count.0.load(Ordering::SeqCst),
        wakes + 1,
        "the parked one is woken"
    );
    assert_eq!(w.poll(&mut parked), Poll::Ready(None));
    // Published after the close: no stream gets it.
    hub.publish(b("c"));
    assert_eq!(w.poll(&mut behind), frame(0, "a"));
    assert_eq!(w.poll(&mut behind), frame(1, "b"));
    assert_eq!(w.poll(&mut behind), Poll::Ready(None));
    let mut late = hub.subscribe_after(0);
    assert_eq!(w.poll(&mut late), frame(1, "b"));
    assert_eq!(w.poll(&mut late), Poll::Ready(None));
    assert_eq!(w.poll(&mut hub.subscribe()), Poll::Ready(None));

    // The last handle dropped closes it.
    let hub: Hub = Hub::default();
    let clone = hub.clone();
    let mut sub = hub.subscribe();
    assert_eq!(w.poll(&mut sub), Poll::Pending);
    clone.publish(b("x"));
    drop(hub);
    assert_eq!(w.poll(&mut sub), frame(0, "x"));
    assert_eq!(w.poll(&mut sub), Poll::Pending, "a handle is left");
    drop(clone);
    assert_eq!(w.poll(&mut sub), Poll::Ready(None));
}
