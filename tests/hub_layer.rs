//! A hub subscription through `BackpressureLayer`: the client's window over
//! the shared log behaves as a `ClientBuffer` of the same config would, its
//! events come from the hub's sweep while it does not read, and it costs
//! nothing per publish.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::FutureExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_backpressure::hub::{Hub, HubBody, HubConfig};
use tower_backpressure::{
    BackpressureBody, BackpressureLayer, BackpressureObserver, BufferConfig, ClientBuffer,
    ClientRegistry, CloseReason, EventKind, Flush, Gap, GapAction, Overflow,
};

type Body = BackpressureBody<HubBody, Arc<dyn BackpressureObserver>, Marker>;

/// A gap marker whose frame says how many frames the gap holds.
#[derive(Clone, Copy)]
struct Marker;

impl tower_backpressure::GapMarker<Bytes> for Marker {
    fn on_gap(&self, gap: Gap) -> GapAction<Bytes> {
        GapAction::Insert(Bytes::from(format!("gap:{}", gap.frames)))
    }
}

/// One client's response from `hub`, through the layer with `config`.
///
/// The frames published here carry no delimiter: each is one event, and
/// the tests read them one body frame each, so the clients hand them out
/// one by one (`Flush::Immediate`, not the default's joins).
async fn client(
    hub: &Hub,
    config: BufferConfig,
    after: Option<u64>,
) -> (
    Body,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
    ClientRegistry,
) {
    limited_client(hub, config, after, None).await
}

/// The same, ending after `limit` frames.
async fn limited_client(
    hub: &Hub,
    config: BufferConfig,
    after: Option<u64>,
    limit: Option<u64>,
) -> (
    Body,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
    ClientRegistry,
) {
    let (observer, events) = recorder();
    let registry = ClientRegistry::new();
    let hub = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(
            BackpressureLayer::new(config.with_flush(Flush::Immediate))
                .observer(Arc::new((observer, registry.clone())) as Arc<dyn BackpressureObserver>)
                .gap_marker(Marker),
        )
        .service(service_fn(move |_req: Request<()>| {
            let response: Response<HubBody> =
                hub.response().resume_after(after).limit(limit).build();
            async move { Ok::<_, Infallible>(response) }
        }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    (response.into_body(), events, registry)
}

/// Takes what the body has now, up to `n` frames, as text.
fn take(body: &mut Body, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                let data = frame.into_data().expect("data");
                out.push(String::from_utf8(data.to_vec()).unwrap());
            }
            _ => break,
        }
    }
    out
}

/// The same, from a `ClientBuffer`: gaps as the marker renders them. A
/// frame after a marker that was the last item taken is held, as the body
/// holds it, and comes first next time.
fn take_ring(ring: &mut ClientBuffer<Bytes>, held: &mut Option<String>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    if n > 0 {
        out.extend(held.take());
    }
    while out.len() < n {
        let Some((data, gap)) = ring.pop_with_gap() else {
            break;
        };
        let data = String::from_utf8(data.to_vec()).unwrap();
        if !gap.is_empty() {
            out.push(format!("gap:{}", gap.frames));
            if out.len() == n {
                *held = Some(data);
                break;
            }
        }
        out.push(data);
    }
    out
}

/// A small deterministic generator for the operation sequences.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test]
async fn a_window_delivers_what_a_client_buffer_of_the_same_config_would() {
    for (seed, config) in [
        (1, BufferConfig::new(4)),
        (2, BufferConfig::new(16)),
        (3, BufferConfig::new(1000).with_max_bytes(64)),
        (4, BufferConfig::new(8).with_max_bytes(100)),
        (5, BufferConfig::new(1)),
    ] {
        let hub: Hub = Hub::new(HubConfig::default().with_retain_frames(100_000));
        let (mut body, _events, _registry) = client(&hub, config, None).await;
        let mut ring = ClientBuffer::new(config);
        let mut held = None;
        let mut rng = Rng(seed * 7919);
        let mut seq = 0u64;
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            // Publish a burst, then read some: the same on both sides.
            for _ in 0..rng.next(12) {
                let len = 1 + rng.next(30) as usize;
                let frame = Bytes::from(format!("{seq:0len$}"));
                hub.publish(frame.clone());
                ring.push(frame);
                seq += 1;
            }
            let n = rng.next(10) as usize;
            let mine = take(&mut body, n);
            let theirs = take_ring(&mut ring, &mut held, mine.len());
            got.extend(mine);
            want.extend(theirs);
        }
        got.extend(take(&mut body, usize::MAX));
        want.extend(take_ring(&mut ring, &mut held, usize::MAX));
        if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
            panic!(
                "config {config:?}: first difference at {i}: window {:?}, ring {:?}",
                &got[i.saturating_sub(4)..(i + 4).min(got.len())],
                &want[i.saturating_sub(4)..(i + 4).min(want.len())]
            );
        }
        assert_eq!(got, want, "config {config:?}");
        assert!(!got.is_empty());
    }
}

/// A hub's window hands out the hub's shared frames one at a time by
/// default (a join would copy them, and a client that stops reading would
/// keep that copy in hyper); with a coalescing flush chosen, what waits goes
/// out joined, never across a gap, and the marker stands alone at it.
#[tokio::test]
async fn a_window_joins_what_waits_only_when_asked_and_never_across_a_gap() {
    for (config, want, after) in [
        (
            BufferConfig::new(5),
            vec!["gap:15", "15;", "16;", "17;", "18;", "19;"],
            vec!["20;", "21;", "22;"],
        ),
        (
            BufferConfig::new(5).with_flush(Flush::default()),
            vec!["gap:15", "15;16;17;18;19;"],
            vec!["20;21;22;"],
        ),
    ] {
        let hub: Hub = Hub::default();
        let svc = {
            let hub = hub.clone();
            ServiceBuilder::new()
                .layer(BackpressureLayer::new(config).gap_marker(Marker))
                .service(service_fn(move |_req: Request<()>| {
                    let response: Response<HubBody> = hub.response().build();
                    async move { Ok::<_, Infallible>(response) }
                }))
        };
        let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        for i in 0..20u64 {
            hub.publish(Bytes::from(format!("{i};")));
        }
        let mut read = Vec::new();
        while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
            read.push(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap());
        }
        assert_eq!(read, want, "{config:?}");
        for i in 20..23u64 {
            hub.publish(Bytes::from(format!("{i};")));
        }
        let mut read = Vec::new();
        while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
            read.push(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap());
        }
        assert_eq!(read, after, "{config:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_window_hears_of_pressure_and_drops_from_the_sweep() {
    let hub: Hub = Hub::default();
    let (mut body, mut events, registry) = client(&hub, BufferConfig::new(10), None).await;
    let mut seen = Vec::new();
    wait_for(&mut events, &mut seen, |s| s.kind == EventKind::Opened).await;
    // The client reads nothing; 100 events are published.
    for i in 0..100u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    // Nothing happens per publish; the sweep looks within its period.
    tokio::time::advance(Duration::from_millis(150)).await;
    let dropped = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Dropped { .. })
    })
    .await;
    assert_eq!(
        dropped.kind,
        EventKind::Dropped {
            count: 90,
            bytes: 170
        }
    );
    assert!(seen.iter().any(|s| s.kind == EventKind::Pressure));
    assert_eq!(registry.len(), 1);
    // Read again: one exact gap, then the newest ten.
    let read = take(&mut body, 11);
    let want: Vec<String> = std::iter::once("gap:90".to_owned())
        .chain((90..100).map(|i: u64| i.to_string()))
        .collect();
    assert_eq!(read, want);
    drop(body);
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::ClientGone
        }
    );
    assert!(registry.is_empty());
    // Closed once.
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn a_resume_replays_what_the_hub_retains_after_the_last_event_id() {
    let hub: Hub = Hub::new(HubConfig::default().with_retain_frames(50));
    for i in 0..100u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    // Within the retention: everything after 79, even beyond the client's
    // window of 10 (a client that reconnects is not slow).
    let (mut body, _e, _r) = client(&hub, BufferConfig::new(10), Some(79)).await;
    let read = take(&mut body, 100);
    assert_eq!(
        read,
        (80..100).map(|i: u64| i.to_string()).collect::<Vec<_>>()
    );
    // Beyond it: the gap of exactly the ids that are gone, then the rest.
    let (mut body, _e, _r) = client(&hub, BufferConfig::new(100), Some(9)).await;
    let read = take(&mut body, 100);
    assert_eq!(read[0], "gap:40");
    assert_eq!(
        read[1..],
        (50..100).map(|i: u64| i.to_string()).collect::<Vec<_>>()[..]
    );
}

#[tokio::test]
async fn a_limited_response_ends_after_exactly_its_frames() {
    let hub: Hub = Hub::new(HubConfig::default().with_retain_frames(100));
    for i in 0..50u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    // Resumed with a backlog of 40, more than the limit: 5 frames, the end.
    let (mut body, mut events, registry) =
        limited_client(&hub, BufferConfig::new(10), Some(9), Some(5)).await;
    assert_eq!(take(&mut body, 100), ["10", "11", "12", "13", "14"]);
    assert!(body.frame().await.is_none(), "the end, after 5 frames");
    let mut seen = Vec::new();
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    assert_eq!((closed.stats.sent, closed.stats.buffered), (5, 0));
    assert!(registry.is_empty());
    // Live, with frames published after the limit: the same.
    let (mut body, _e, _r) = limited_client(&hub, BufferConfig::new(10), None, Some(3)).await;
    for i in 50..60u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    assert_eq!(take(&mut body, 100), ["50", "51", "52"]);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn pause_is_refused_with_a_clear_error() {
    let hub: Hub = Hub::default();
    let config = BufferConfig::new(10).with_overflow(Overflow::Pause);
    let (mut body, _e, _r) = client(&hub, config, None).await;
    let err = body.frame().await.expect("an error").unwrap_err();
    assert!(
        err.to_string()
            .contains("Overflow::Pause cannot bound a hub subscription"),
        "{err}"
    );
}

#[tokio::test]
async fn a_fast_client_gets_every_event_while_a_thousand_windows_stall() {
    let hub: Hub = Hub::new(HubConfig::default().with_retain_frames(1000));
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        stalled.push(client(&hub, BufferConfig::new(16), None).await);
    }
    let (mut fast, mut events, _registry) = client(&hub, BufferConfig::new(16), None).await;
    let mut got = Vec::new();
    for i in 0..5000u64 {
        hub.publish(Bytes::from(i.to_string()));
        // The fast client keeps up: it reads after every publish.
        got.extend(take(&mut fast, usize::MAX));
    }
    assert_eq!(
        got,
        (0..5000).map(|i: u64| i.to_string()).collect::<Vec<_>>()
    );
    // One copy of each retained frame, in the hub.
    assert_eq!(hub.retained(), 1000);
    let mut seen = Vec::new();
    while let Ok(s) = events.try_recv() {
        seen.push(s);
    }
    assert!(
        seen.iter()
            .all(|s| !matches!(s.kind, EventKind::Dropped { .. })),
        "the fast client lost nothing"
    );
    drop(stalled);
}

/// One client's response, with a classify hook.
async fn classified_client(
    hub: &Hub,
    config: BufferConfig,
    classify: fn(&Bytes) -> tower_backpressure::FrameClass,
) -> (
    BackpressureBody<HubBody, Arc<dyn BackpressureObserver>, Marker>,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    let (observer, events) = recorder();
    let hub = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(
            // One body frame per frame, as `client`.
            BackpressureLayer::new(config.with_flush(Flush::Immediate))
                .observer(Arc::new(observer) as Arc<dyn BackpressureObserver>)
                .gap_marker(Marker)
                .classify(classify),
        )
        .service(service_fn(move |_req: Request<()>| {
            let response: Response<HubBody> = hub.response().build();
            async move { Ok::<_, Infallible>(response) }
        }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    (response.into_body(), events)
}

#[tokio::test]
async fn a_window_that_skips_keeps_the_newest_frame_of_every_replace_key() {
    use tower_backpressure::FrameClass;
    let hub: Hub = Hub::default();
    // "p<key>=<value>": the latest price per symbol; anything else droppable.
    let (mut body, _events) =
        classified_client(&hub, BufferConfig::new(4), |b: &Bytes| match b.first() {
            Some(b'p') => FrameClass::Replace(u64::from(b[1])),
            _ => FrameClass::Droppable,
        })
        .await;
    for frame in ["pa=1", "x1", "pb=1", "pa=2", "x2", "pb=2", "x3", "x4", "x5"] {
        hub.publish(Bytes::from(frame));
    }
    let read = take(&mut body, 100);
    // The window of four: of what it skipped, the newest frame of each key
    // stays (pa=1 and pb=1 are superseded, not lost), x1..x3 are gone, each
    // announced where it was; x4 and x5 fill the rest.
    assert_eq!(
        read,
        ["gap:1", "pa=2", "gap:1", "pb=2", "gap:1", "x4", "x5"]
    );
    // With room for two, the two prices are what it holds; the rest is one
    // gap before the next frame.
    let hub: Hub = Hub::default();
    let (mut body, _events) =
        classified_client(&hub, BufferConfig::new(2), |b: &Bytes| match b.first() {
            Some(b'p') => FrameClass::Replace(u64::from(b[1])),
            _ => FrameClass::Droppable,
        })
        .await;
    for frame in ["pa=1", "x1", "pb=1", "pa=2", "x2", "pb=2", "x3", "x4", "x5"] {
        hub.publish(Bytes::from(frame));
    }
    assert_eq!(take(&mut body, 100), ["gap:1", "pa=2", "gap:1", "pb=2"]);
    hub.publish(Bytes::from("x6"));
    assert_eq!(take(&mut body, 100), ["gap:3", "x6"]);
}

#[tokio::test]
async fn a_window_that_would_skip_a_critical_frame_evicts_its_client() {
    use tower_backpressure::{EvictReason, Evicted, FrameClass};
    let hub: Hub = Hub::default();
    let (mut body, mut events) = classified_client(&hub, BufferConfig::new(2), |b: &Bytes| {
        if b.starts_with(b"!") {
            FrameClass::Critical
        } else {
            FrameClass::Droppable
        }
    })
    .await;
    for frame in ["a", "!b", "c", "d", "e"] {
        hub.publish(Bytes::from(frame));
    }
    let err = body.frame().await.expect("an error").unwrap_err();
    assert_eq!(
        err.downcast_ref::<Evicted>().map(Evicted::reason),
        Some(EvictReason::Overflow)
    );
    let mut seen = Vec::new();
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Evicted(EvictReason::Overflow)
        }
    );
}

#[tokio::test]
async fn a_disconnect_window_evicts_instead_of_skipping() {
    use tower_backpressure::{EvictReason, Evicted};
    let hub: Hub = Hub::default();
    let config = BufferConfig::new(4).with_overflow(Overflow::Disconnect);
    let (mut body, _events, registry) = client(&hub, config, None).await;
    for i in 0..4u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    // Four fit: nothing is skipped.
    assert_eq!(take(&mut body, 2), ["0", "1"]);
    for i in 4..9u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    let err = body.frame().await.expect("an error").unwrap_err();
    assert_eq!(
        err.downcast_ref::<Evicted>().map(Evicted::reason),
        Some(EvictReason::Overflow)
    );
    assert!(body.frame().await.is_none());
    assert!(registry.is_empty());
}

#[tokio::test]
async fn a_limited_response_ends_after_its_frames_and_a_client_that_leaves_frees_its_window() {
    let hub: Hub = Hub::default();
    let (observer, mut events) = recorder();
    let h = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(16)).observer(observer))
        .service(service_fn(move |_req: Request<()>| {
            let response: Response<HubBody> = h.response().limit(Some(3)).build();
            async move { Ok::<_, Infallible>(response) }
        }));
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    for i in 0..10u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    let data = body.collect().await.unwrap().to_bytes();
    assert_eq!(data, "012");
    let mut seen = Vec::new();
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    assert_eq!(closed.stats.sent, 3);
}

#[tokio::test]
async fn a_hub_sink_feeds_a_real_sink_from_a_window_with_an_exact_gap() {
    use futures::StreamExt;
    use tower_backpressure::BufferedSink;
    let hub: Hub = Hub::default();
    let (tx, mut rx) = futures::channel::mpsc::channel::<Bytes>(0);
    let (observer, mut events) = recorder();
    let sink = BufferedSink::builder(BufferConfig::new(4))
        .observer(observer)
        .gap_marker(Marker)
        .spawn_hub(&hub, None, tx)
        .unwrap();
    // The client reads nothing while 20 are published: its window keeps 4
    // (plus what the channel holds).
    for i in 0..20u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    let mut seen = Vec::new();
    // Read until the newest arrives.
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("19") {
        let item = guard("a message", rx.next()).await.expect("open");
        got.push(String::from_utf8(item.to_vec()).unwrap());
    }
    let gap = got
        .iter()
        .position(|m| m.starts_with("gap:"))
        .expect("a gap");
    let missed: u64 = got[gap][4..].parse().unwrap();
    let delivered: Vec<u64> = got
        .iter()
        .filter(|m| !m.starts_with("gap:"))
        .map(|m| m.parse().unwrap())
        .collect();
    assert_eq!(delivered.len() as u64 + missed, 20, "{got:?}");
    assert!(delivered.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert_eq!(sink.stats().dropped, missed);
    sink.abandon().await;
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::ClientGone
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stays_stalled_is_swept_less_often_and_its_drops_still_add_up() {
    let hub: Hub = Hub::new(HubConfig::default().with_retain_frames(100_000));
    let (body, mut events, _registry) = client(&hub, BufferConfig::new(10), None).await;
    let mut published = 0u64;
    // Four seconds of 1,000 events per second; the client reads nothing.
    for _ in 0..400 {
        for _ in 0..10 {
            hub.publish(Bytes::from(published.to_string()));
            published += 1;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    // Let the sweep task run what is due.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let mut batches = 0;
    let mut dropped = 0;
    while let Ok(seen) = events.try_recv() {
        if let EventKind::Dropped { count, .. } = seen.kind {
            batches += 1;
            dropped += count;
        }
    }
    // Every drop is counted: all but the window of ten.
    assert_eq!(dropped, published - 10);
    // Swept every 100 ms at first, then less and less often, down to once
    // a second: far fewer reports than the 60 sweeps of six seconds.
    assert!(
        (3..=15).contains(&batches),
        "{batches} Dropped events in 6 s"
    );
    drop(body);
}

/// Issue 20, bug 2: `Replace(key)` conflation in a window kept every
/// superseded frame, outside its limits. A client that never reads,
/// capacity 2; each sweep sees one `Replace(1)` price and three droppable
/// frames, 50 rounds. The window holds the newest price only (the others
/// counted replaced), stays within its capacity, and each gap stands where
/// its frames were skipped.
#[tokio::test(start_paused = true)]
async fn a_stalled_window_keeps_only_the_newest_of_a_key_within_its_capacity() {
    use tower_backpressure::FrameClass;
    let hub: Hub = Hub::default();
    let (observer, _events) = recorder();
    let registry = ClientRegistry::new();
    let svc = {
        let hub = hub.clone();
        ServiceBuilder::new()
            .layer(
                BackpressureLayer::new(BufferConfig::new(2))
                    .observer(
                        Arc::new((observer, registry.clone())) as Arc<dyn BackpressureObserver>
                    )
                    .gap_marker(Marker)
                    .classify(|b: &Bytes| match b.first() {
                        Some(b'p') => FrameClass::Replace(1),
                        _ => FrameClass::Droppable,
                    }),
            )
            .service(service_fn(move |_req: Request<()>| {
                let response: Response<HubBody> = hub.response().build();
                async move { Ok::<_, Infallible>(response) }
            }))
    };
    let mut body: BackpressureBody<HubBody, Arc<dyn BackpressureObserver>, Marker> =
        svc.oneshot(Request::new(())).await.unwrap().into_body();
    let handle = registry.handles().pop().expect("one client");
    for round in 0..50 {
        hub.publish(Bytes::from(format!("p={round}")));
        for i in 0..3 {
            hub.publish(Bytes::from(format!("x{round}.{i}")));
        }
        // Long enough for the sweep, however far it has backed off.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = handle.stats().expect("buffered");
        assert!(
            s.buffered <= 2,
            "round {round}: {} buffered, capacity 2: {s:?}",
            s.buffered
        );
        assert_eq!(
            s.pushed,
            s.sent + s.dropped + s.replaced + s.buffered as u64,
            "{s:?}"
        );
    }
    let s = handle.stats().expect("buffered");
    assert!(
        s.replaced >= 48,
        "superseded prices are counted replaced: {s:?}"
    );
    let read = take(&mut body, 1000);
    let prices: Vec<&String> = read.iter().filter(|f| f.starts_with('p')).collect();
    assert_eq!(prices, ["p=49"], "only the newest price waits: {read:?}");
    // Every id is delivered, announced lost, or superseded.
    let delivered = read.iter().filter(|f| !f.starts_with("gap:")).count() as u64;
    let announced: u64 = read
        .iter()
        .filter_map(|f| f.strip_prefix("gap:"))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    let s = handle.stats().expect("buffered");
    assert_eq!(delivered + announced + s.replaced, 200, "{read:?} {s:?}");
    // The price stands after the droppable frames skipped before it.
    assert_eq!(read.last().map(String::as_str), Some("x49.2"), "{read:?}");
}

/// Issue 20, bug 3, as a user meets it: an observer that panics once (on
/// the first pressure episode, heard from the hub's sweep) ended the sweep
/// task for good, and a stalled client was never evicted.
#[tokio::test(start_paused = true)]
async fn a_panicking_observer_does_not_stop_stalled_clients_from_being_evicted() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower_backpressure::{EvictReason, Eviction};
    let hub: Hub = Hub::default();
    let (observer, mut events) = recorder();
    let panicked = Arc::new(AtomicBool::new(false));
    let panicker = {
        let panicked = panicked.clone();
        move |e: &tower_backpressure::BackpressureEvent<'_>| {
            if matches!(e.kind, EventKind::Pressure) && !panicked.swap(true, Ordering::SeqCst) {
                panic!("an observer's bug");
            }
        }
    };
    let config = BufferConfig::new(4)
        .with_eviction(Eviction::none().after_stall(Duration::from_millis(200)));
    let svc = {
        let hub = hub.clone();
        ServiceBuilder::new()
            .layer(
                BackpressureLayer::new(config)
                    .observer(Arc::new((observer, panicker)) as Arc<dyn BackpressureObserver>),
            )
            .service(service_fn(move |_req: Request<()>| {
                let response: Response<HubBody> = hub.response().build();
                async move { Ok::<_, Infallible>(response) }
            }))
    };
    // Two clients that never read.
    let first = svc.clone().oneshot(Request::new(())).await.unwrap();
    let second = svc.oneshot(Request::new(())).await.unwrap();
    for i in 0..10u64 {
        hub.publish(Bytes::from(i.to_string()));
    }
    let mut seen = Vec::new();
    let mut evicted = 0;
    while evicted < 2 {
        let closed = wait_for(&mut events, &mut seen, |s| {
            matches!(s.kind, EventKind::Closed { .. })
        })
        .await;
        assert_eq!(
            closed.kind,
            EventKind::Closed {
                reason: CloseReason::Evicted(EvictReason::Stalled)
            }
        );
        evicted += 1;
    }
    assert!(panicked.load(Ordering::SeqCst), "the observer did panic");
    drop((first, second));
}

/// A client of `hub` that never reads, with `config`; its events.
async fn stalled_client(
    hub: &Hub,
    config: BufferConfig,
) -> (Body, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let (body, events, _registry) = client(hub, config, None).await;
    (body, events)
}

/// Publishes `n` frames, `per_ms` every millisecond, in paused time.
async fn publish_paced(hub: &Hub, n: u64, per_ms: u64) {
    for i in 0..n {
        hub.publish(Bytes::from(i.to_string()));
        if (i + 1) % per_ms == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Issue 20, bug 4: the sweep looks at a stalled client less and less often
/// (down to once a second) and counted each look's drops as if they had all
/// happened at that moment. 1,000 frames/s to a client that never reads,
/// capacity 10, rule "600 drops within 500 ms": the client's real rate is
/// about 500 per 500 ms, and it must not be evicted; at 2,000 frames/s
/// (about 1,000 per 500 ms) it must be.
#[tokio::test(start_paused = true)]
async fn a_drop_window_rule_judges_the_rate_the_client_really_had() {
    use tower_backpressure::{EvictReason, Eviction};
    let config = BufferConfig::new(10)
        .with_eviction(Eviction::none().after_dropped_within(600, Duration::from_millis(500)));
    let hub: Hub = Hub::default();
    let (body, mut events) = stalled_client(&hub, config).await;
    publish_paced(&hub, 5_000, 1).await;
    let mut drops = Vec::new();
    while let Ok(seen) = events.try_recv() {
        match seen.kind {
            EventKind::Dropped { count, .. } => drops.push(count),
            EventKind::Closed { reason } => {
                panic!("closed ({reason:?}) at 1,000 frames/s; drop reports {drops:?}")
            }
            _ => {}
        }
    }
    assert!(drops.iter().sum::<u64>() > 4_000, "{drops:?}");
    drop(body);

    let hub: Hub = Hub::default();
    let (_body, mut events) = stalled_client(&hub, config).await;
    let publish = publish_paced(&hub, 8_000, 2);
    let mut seen = Vec::new();
    let closed = tokio::select! {
        closed = wait_for(&mut events, &mut seen, |s| matches!(s.kind, EventKind::Closed { .. })) => closed,
        () = publish => panic!("not evicted at 2,000 frames/s: {seen:?}"),
    };
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Evicted(EvictReason::DroppedWindow)
        }
    );
}

/// Issue 20, hazard: a hub's windows stayed pending for ever once the hub
/// was gone. Through the layer, a client that reads gets the frames
/// published before the close, then a clean end (`Completed`); one that
/// does not read is brought to its end by the sweep as soon as it reads.
#[tokio::test(start_paused = true)]
async fn a_closed_hub_ends_its_windows_cleanly() {
    let hub: Hub = Hub::default();
    let (mut reader, mut events, _registry) = client(&hub, BufferConfig::new(8), None).await;
    let (mut late, _late_events, _late_registry) = client(&hub, BufferConfig::new(8), None).await;
    hub.publish(Bytes::from("a"));
    assert_eq!(take(&mut reader, 10), ["a"]);
    let pending = tokio::spawn(async move {
        let frame = reader.frame().await;
        (frame.map(|f| f.unwrap().into_data().unwrap()), reader)
    });
    tokio::task::yield_now().await;
    hub.publish(Bytes::from("b"));
    drop(hub);
    let (frame, mut reader) = guard("the frame before the close", pending).await.unwrap();
    assert_eq!(frame.as_deref(), Some(&b"b"[..]));
    assert!(
        guard("the end", reader.frame()).await.is_none(),
        "a clean end"
    );
    let mut seen = Vec::new();
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    // The other one reads later: both frames, then the end.
    assert_eq!(take(&mut late, 10), ["a", "b"]);
    assert!(guard("the end", late.frame()).await.is_none());
}

/// A join over a hub's window takes no more frames or bytes than the flush
/// allows, in order, and stops at a hole in the hub's ids (the marker goes
/// out alone at it).
#[tokio::test]
async fn a_window_join_stops_at_the_flush_limits_and_at_a_hole_in_the_ids() {
    for (flush, want) in [
        (
            Flush::coalesce(3, 64 * 1024),
            vec!["0;1;2;", "3;4;", "gap:5", "10;11;"],
        ),
        (
            Flush::coalesce(100, 5),
            // "10;11;" would be 6 bytes.
            vec!["0;1;", "2;3;", "4;", "gap:5", "10;", "11;"],
        ),
    ] {
        let hub: Hub = Hub::default();
        let svc = {
            let hub = hub.clone();
            ServiceBuilder::new()
                .layer(
                    BackpressureLayer::new(BufferConfig::new(100).with_flush(flush))
                        .gap_marker(Marker),
                )
                .service(service_fn(move |_req: Request<()>| {
                    let response: Response<HubBody> = hub.response().build();
                    async move { Ok::<_, Infallible>(response) }
                }))
        };
        let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        for i in (0..5u64).chain(10..12) {
            hub.publish_with_id(i, Bytes::from(format!("{i};")))
                .unwrap();
        }
        let mut read = Vec::new();
        while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
            read.push(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap());
        }
        assert_eq!(read, want, "{flush:?}");
    }
}

/// What a window hands hyper by default is the hub's own frame, not a copy:
/// a client that stops reading holds no private copy in hyper's buffer.
#[tokio::test]
async fn a_window_hands_out_the_hubs_own_frames_by_default() {
    let hub: Hub = Hub::default();
    let svc = {
        let hub = hub.clone();
        ServiceBuilder::new()
            .layer(BackpressureLayer::new(BufferConfig::default()))
            .service(service_fn(move |_req: Request<()>| {
                let response: Response<HubBody> = hub.response().build();
                async move { Ok::<_, Infallible>(response) }
            }))
    };
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let published: Vec<Bytes> = (0..10u64)
        .map(|i| Bytes::from(format!("event {i}\n")))
        .collect();
    for frame in &published {
        hub.publish(frame.clone());
    }
    for want in &published {
        let got = body.frame().now_or_never().unwrap().unwrap().unwrap();
        let got = got.into_data().unwrap();
        assert_eq!(got, want);
        assert_eq!(got.as_ptr(), want.as_ptr(), "the hub's frame, not a copy");
    }
}
