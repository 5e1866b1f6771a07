//! A hub response that starts with frames fetched from elsewhere
//! (`HubResponse::backfill`), through `BackpressureLayer` and without it:
//! the backfilled frames, then the hub's after them, every gap between them
//! reported exactly as any other (here by `SseGapMarker`).

use std::convert::Infallible;

use bytes::Bytes;
use futures::FutureExt as _;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use tower::{ServiceBuilder, ServiceExt as _, service_fn};
use tower_backpressure::hub::{Hub, HubBody, HubConfig};
use tower_backpressure::{BackpressureLayer, BufferConfig, Flush, SseGapMarker};

/// The hub holds 20..30 (retains 10 of 0..30).
fn hub() -> Hub {
    let hub: Hub = Hub::new(HubConfig::new(10));
    for id in 0..30 {
        hub.publish_with_id(id, Bytes::from(format!("{id};")))
            .unwrap();
    }
    hub
}

fn history(ids: impl IntoIterator<Item = u64>) -> Vec<(u64, Bytes)> {
    ids.into_iter()
        .map(|id| (id, Bytes::from(format!("{id};"))))
        .collect()
}

/// What a client resuming after `after` with `backfill` reads now, through
/// the layer, as one string (a gap is `[N]`).
async fn through_layer(hub: &Hub, after: u64, backfill: Vec<(u64, Bytes)>) -> String {
    let hub = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)).gap_marker(SseGapMarker::new()))
        .service(service_fn(move |_req: Request<()>| {
            let response: Response<HubBody> = hub
                .response()
                .resume_after(Some(after))
                .backfill(backfill.clone())
                .build();
            async move { Ok::<_, Infallible>(response) }
        }));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let mut out = String::new();
    for _ in 0..1000 {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                let data = frame.into_data().expect("data");
                out.push_str(&render(&data));
            }
            _ => break,
        }
    }
    out
}

/// A frame as text; an SSE gap marker as `[N]`.
fn render(data: &[u8]) -> String {
    let text = std::str::from_utf8(data).unwrap();
    match text.strip_prefix("event: lagged\ndata: {\"dropped\":") {
        Some(rest) => format!("[{}]", rest.split('}').next().unwrap()),
        None => text.to_owned(),
    }
}

/// The same without the layer: the response's own body (gaps silent), and
/// the subscription stream (gaps as events).
async fn without_layer(hub: &Hub, after: u64, backfill: Vec<(u64, Bytes)>) -> String {
    let mut sub = hub.subscribe_with_backfill(Some(after), backfill);
    let mut out = String::new();
    for _ in 0..1000 {
        match futures::StreamExt::next(&mut sub).now_or_never() {
            Some(Some(tower_backpressure::hub::HubEvent::Frame { item, .. })) => {
                out.push_str(std::str::from_utf8(&item).unwrap());
            }
            Some(Some(tower_backpressure::hub::HubEvent::Gap { missed })) => {
                out.push_str(&format!("[{missed}]"));
            }
            _ => break,
        }
    }
    out
}

fn ids(range: std::ops::Range<u64>) -> String {
    range.map(|id| format!("{id};")).collect()
}

#[tokio::test]
async fn backfilled_frames_come_first_then_the_hubs_without_a_gap() {
    let hub = hub();
    let want = ids(10..30);
    assert_eq!(through_layer(&hub, 9, history(10..20)).await, want);
    assert_eq!(without_layer(&hub, 9, history(10..20)).await, want);
    // Overlapping the hub's frames: no duplicate.
    assert_eq!(through_layer(&hub, 9, history(5..25)).await, want);
    assert_eq!(without_layer(&hub, 9, history(5..25)).await, want);
}

#[tokio::test]
async fn gaps_around_the_backfill_are_counted_exactly() {
    let hub = hub();
    // 10..12 gone from the history too; 17..20 in neither.
    let want = format!("[3]{}[3]{}", ids(13..17), ids(20..30));
    assert_eq!(through_layer(&hub, 9, history(13..17)).await, want);
    assert_eq!(without_layer(&hub, 9, history(13..17)).await, want);
    // A hole inside the history: the run before it, then one gap to the
    // hub's frames (the frames after the hole are left out, and counted).
    let mut holey = history(10..13);
    holey.extend(history(15..20));
    let want = format!("{}[7]{}", ids(10..13), ids(20..30));
    assert_eq!(through_layer(&hub, 9, holey.clone()).await, want);
    assert_eq!(without_layer(&hub, 9, holey).await, want);
    // Nothing left to backfill: a plain resume.
    let want = format!("[10]{}", ids(20..30));
    assert_eq!(through_layer(&hub, 9, history(0..10)).await, want);
    assert_eq!(without_layer(&hub, 9, Vec::new()).await, want);
}

/// Reads what is ready now from a body, as one string (a gap is `[N]`).
async fn read_ready<B>(body: &mut B) -> String
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut out = String::new();
    for _ in 0..1000 {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => out.push_str(&render(&frame.into_data().expect("data"))),
            _ => break,
        }
    }
    out
}

/// Issue 20, bug 1: a backfill that reaches past the hub's newest id. The
/// hub holds 10; the client saw 9 and the bus's history has 10..=13; then
/// 11..=14 reach the hub. Each id arrives once, in order.
#[tokio::test]
async fn a_backfill_past_the_hubs_newest_frame_is_not_delivered_twice() {
    let fresh = || {
        let hub: Hub = Hub::new(HubConfig::new(10));
        hub.publish_with_id(10, Bytes::from("10;")).unwrap();
        hub
    };
    let publish_rest = |hub: &Hub| {
        for id in 11..=14 {
            hub.publish_with_id(id, Bytes::from(format!("{id};")))
                .unwrap();
        }
    };
    let want = ids(10..15);

    // Without the layer: the subscription stream.
    let hub = fresh();
    let mut sub = hub.subscribe_with_backfill(Some(9), history(10..14));
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(futures::StreamExt::next(&mut sub).await.unwrap());
    }
    publish_rest(&hub);
    while let Some(Some(e)) = futures::StreamExt::next(&mut sub).now_or_never() {
        seen.push(e);
    }
    let ids_seen: Vec<String> = seen
        .iter()
        .map(|e| match e {
            tower_backpressure::hub::HubEvent::Frame { id, .. } => id.to_string(),
            tower_backpressure::hub::HubEvent::Gap { missed } => format!("[{missed}]"),
        })
        .collect();
    assert_eq!(ids_seen, ["10", "11", "12", "13", "14"]);

    // Through the layer, with `HubResponse::backfill`.
    let hub = fresh();
    let svc = {
        let hub = hub.clone();
        ServiceBuilder::new()
            .layer(BackpressureLayer::new(BufferConfig::new(100)).gap_marker(SseGapMarker::new()))
            .service(service_fn(move |_req: Request<()>| {
                let response: Response<HubBody> = hub
                    .response()
                    .resume_after(Some(9))
                    .backfill(history(10..14))
                    .build();
                async move { Ok::<_, Infallible>(response) }
            }))
    };
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let mut got = read_ready(&mut body).await;
    publish_rest(&hub);
    got.push_str(&read_ready(&mut body).await);
    assert_eq!(got, want);
}

/// Found by the hub soak: a resumed client replays what it missed whatever
/// its window, but its window bound it again as soon as its backlog was
/// back within the window's capacity: right at the edge, so that one frame
/// published before its next read was skipped (and announced), though the
/// client read as fast as it could. It is bound again once it is below its
/// pressure threshold (here 5 of 10 frames), as a client that keeps up is.
#[tokio::test]
async fn a_resumed_client_that_reads_on_loses_nothing_when_its_replay_ends() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    for id in 0..30 {
        hub.publish_with_id(id, Bytes::from(format!("{id};")))
            .unwrap();
    }
    let svc = {
        let hub = hub.clone();
        ServiceBuilder::new()
            .layer(
                // One frame per read: the client steps through its replay.
                BackpressureLayer::new(
                    BufferConfig::new(10)
                        .with_threshold(0.5)
                        .with_flush(Flush::Immediate),
                )
                .gap_marker(SseGapMarker::new()),
            )
            .service(service_fn(move |_req: Request<()>| {
                // Resumed after 0: 29 frames to replay, a window of 10.
                let response: Response<HubBody> = hub.response().resume_after(Some(0)).build();
                async move { Ok::<_, Infallible>(response) }
            }))
    };
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    // The client reads one frame at a time up to id 20 (9 frames left, 21..=29).
    let mut got = String::new();
    while !got.ends_with("20;") {
        let frame = body
            .frame()
            .now_or_never()
            .expect("ready")
            .unwrap()
            .unwrap();
        got.push_str(&render(&frame.into_data().expect("data")));
    }
    // Two frames arrive before its next read (11 waiting, one over 10).
    for id in 30..32 {
        hub.publish_with_id(id, Bytes::from(format!("{id};")))
            .unwrap();
    }
    got.push_str(&read_ready(&mut body).await);
    assert_eq!(got, ids(1..32), "every id, no gap");
}
