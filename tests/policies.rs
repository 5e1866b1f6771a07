//! Slow-client policies against a real server with a stalled client:
//! overflow modes, eviction rules, gap markers, frame classes and the shared
//! memory budget.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request};
use http_body::Body;
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_backpressure::{
    BackpressureLayer, BufferConfig, CloseReason, EventKind, EvictReason, Evicted, Eviction,
    FrameClass, GrpcDataLoss, MemoryBudget, NdjsonGapMarker, Overflow, SseGapMarker,
};

const N: u64 = 20_000;
const SIZE: usize = 1000;

/// A real server streaming one `text/event-stream` response through
/// `layer`, a stalled client, and a producer that sends `N` events.
macro_rules! stalled {
    ($layer:expr) => {{
        let (producer, body) = channel_body(8, None);
        let svc = ServiceBuilder::new()
            .layer($layer)
            .service(one_response(body, "text/event-stream"));
        let addr = serve(svc).await;
        let mut client = connect(addr, Some(4096)).await;
        let response = common::get(&mut client, "/events").await;
        assert_eq!(response.status(), 200);
        let Producer {
            tx,
            inner_done,
            inner_dropped,
        } = producer;
        let produced = tokio::spawn(produce(tx, N, SIZE));
        (client, response, produced, inner_done, inner_dropped)
    }};
}

#[tokio::test]
async fn drop_oldest_with_sse_markers_announces_every_gap_with_its_count() {
    let (observer, mut events) = recorder();
    let layer = BackpressureLayer::new(BufferConfig::new(64))
        .observer(observer)
        .gap_marker(SseGapMarker::new());
    let (_client, response, produced, inner_done, _) = stalled!(layer);
    guard("the producer", produced).await.unwrap();
    guard("the end of the inner body", inner_done)
        .await
        .unwrap();

    let read = read_all(response.into_body()).await;
    let items = parse_sse(&read.data);
    let (delivered, lost) = check_gaps(&items, N);
    assert!(lost > 0, "the stalled client lost frames");
    assert_eq!(
        items.last(),
        Some(&Sse::Id(N - 1)),
        "the newest frame arrives last"
    );
    let s = closed(&mut events).await.stats;
    assert_eq!((s.sent, s.dropped), (delivered, lost));
}

#[tokio::test]
async fn drop_newest_keeps_the_oldest_and_announces_the_lost_tail() {
    let (observer, mut events) = recorder();
    let config = BufferConfig::new(64).with_overflow(Overflow::DropNewest);
    let layer = BackpressureLayer::new(config)
        .observer(observer)
        .gap_marker(SseGapMarker::new());
    let (_client, response, produced, inner_done, _) = stalled!(layer);
    guard("the producer", produced).await.unwrap();
    guard("the end of the inner body", inner_done)
        .await
        .unwrap();

    let read = read_all(response.into_body()).await;
    let items = parse_sse(&read.data);
    let (delivered, lost) = check_gaps(&items, N);
    assert_eq!(items[0], Sse::Id(0), "the oldest frames are kept");
    assert!(
        matches!(items.last(), Some(Sse::Lagged(_))),
        "the newest were dropped, and the stream says so before its end"
    );
    let s = closed(&mut events).await.stats;
    assert_eq!(
        (s.sent, s.dropped, s.sent + s.dropped),
        (delivered, lost, N)
    );
}

#[tokio::test]
async fn pause_loses_nothing_and_keeps_the_buffer_within_one_frame_of_its_limit() {
    let (observer, mut events) = recorder();
    let config = BufferConfig::new(64).with_overflow(Overflow::Pause);
    let layer = BackpressureLayer::new(config).observer(observer);
    let (_client, response, produced, _inner_done, _) = stalled!(layer);
    // The client reads only once the buffer is full: the producer cannot have
    // finished (20 MB do not fit in the server's buffers).
    let mut all = Vec::new();
    wait_for(&mut events, &mut all, |s| s.kind == EventKind::Pressure).await;
    assert!(!produced.is_finished(), "the producer waits for the client");

    let read = read_all(response.into_body()).await;
    assert_eq!(sse_ids(&read.data), (0..N).collect::<Vec<_>>());
    guard("the producer", produced).await.unwrap();
    let s = closed(&mut events).await.stats;
    assert_eq!((s.sent, s.dropped), (N, 0));
    assert!(s.high_water <= 65, "{} frames at once", s.high_water);
}

#[tokio::test]
async fn pause_blocks_the_producer_exactly_when_the_buffer_is_full() {
    let (observer, mut events) = recorder();
    let (producer, body) = channel_body(16, None);
    let svc = ServiceBuilder::new()
        .layer(
            BackpressureLayer::new(
                BufferConfig::new(10)
                    .with_threshold(1.0)
                    .with_overflow(Overflow::Pause),
            )
            .observer(observer),
        )
        .service(one_response(body, "text/event-stream"));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    for seq in 0..10 {
        producer.tx.try_send(sse_event(seq, 40)).unwrap();
    }
    let mut all = Vec::new();
    let full = wait_for(&mut events, &mut all, |s| s.kind == EventKind::Pressure).await;
    assert_eq!(full.stats.buffered, 10);
    // The pump has stopped pulling: the channel takes exactly its capacity.
    let mut accepted = 0;
    while producer.tx.try_send(sse_event(10 + accepted, 40)).is_ok() {
        accepted += 1;
    }
    assert_eq!(accepted, 16);
    drop(producer.tx);
    let mut ids = Vec::new();
    while let Some(frame) = body.frame().await {
        ids.extend(sse_ids(&frame.unwrap().into_data().unwrap()));
    }
    assert_eq!(ids, (0..26).collect::<Vec<_>>(), "nothing lost, in order");
}

#[tokio::test]
async fn disconnect_ends_the_response_with_an_error_and_stops_the_pump() {
    let (observer, mut events) = recorder();
    let config = BufferConfig::new(64).with_overflow(Overflow::Disconnect);
    let layer = BackpressureLayer::new(config).observer(observer);
    let (_client, response, produced, _, inner_dropped) = stalled!(layer);
    let c = closed(&mut events).await;
    assert_eq!(
        c.kind,
        EventKind::Closed {
            reason: CloseReason::Evicted(EvictReason::Overflow)
        }
    );
    guard("the inner body to be dropped", inner_dropped)
        .await
        .unwrap();
    guard("the producer to see the stream gone", produced)
        .await
        .unwrap();
    // The client sees a broken stream, not a clean end.
    let read = guard("the body", response.into_body().collect()).await;
    assert!(read.is_err(), "an evicted client must not see a clean end");
}

async fn evicted_by(eviction: Eviction, want: EvictReason) -> Seen {
    let (observer, mut events) = recorder();
    let layer =
        BackpressureLayer::new(BufferConfig::new(64).with_eviction(eviction)).observer(observer);
    let (_client, response, _produced, _, inner_dropped) = stalled!(layer);
    let c = closed(&mut events).await;
    assert_eq!(
        c.kind,
        EventKind::Closed {
            reason: CloseReason::Evicted(want)
        }
    );
    guard("the inner body to be dropped", inner_dropped)
        .await
        .unwrap();
    let err = guard("the body", response.into_body().collect()).await;
    assert!(err.is_err());
    c
}

#[tokio::test]
async fn eviction_after_too_many_drops_in_total() {
    let c = evicted_by(
        Eviction::none().after_dropped(100),
        EvictReason::DroppedTotal,
    )
    .await;
    assert_eq!(c.stats.dropped, 101, "more than 100, and not one more");
}

#[tokio::test]
async fn eviction_after_too_many_drops_in_a_window() {
    let c = evicted_by(
        Eviction::none().after_dropped_within(50, Duration::from_secs(60)),
        EvictReason::DroppedWindow,
    )
    .await;
    assert!(c.stats.dropped > 50);
}

#[tokio::test]
async fn eviction_after_a_stall() {
    let c = evicted_by(
        Eviction::none().after_stall(Duration::from_millis(100)),
        EvictReason::Stalled,
    )
    .await;
    assert!(c.stats.buffered > 0, "frames were waiting");
}

#[tokio::test]
async fn eviction_after_pressure_for_too_long() {
    evicted_by(
        Eviction::none().after_pressure_for(Duration::from_millis(100)),
        EvictReason::Pressure,
    )
    .await;
}

/// The evicted body's error names the rule, for code that inspects it.
#[tokio::test]
async fn the_body_error_is_evicted_with_the_rule() {
    let (producer, body) = channel_body(64, None);
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(
            BufferConfig::new(4).with_overflow(Overflow::Disconnect),
        ))
        .service(one_response(body, "text/event-stream"));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    for seq in 0..5 {
        producer.tx.send(sse_event(seq, 40)).await.unwrap();
    }
    guard("the pump to stop", producer.inner_dropped)
        .await
        .unwrap();
    let err = body.frame().await.unwrap().unwrap_err();
    let evicted = err.downcast_ref::<Evicted>().expect("an Evicted error");
    assert_eq!(evicted.reason(), EvictReason::Overflow);
    assert!(body.frame().await.is_none());
    assert!(body.is_end_stream());
}

fn in_process<M, C>(
    layer: BackpressureLayer<tower_backpressure::DefaultPredicate, (), M, C>,
    content_type: &'static str,
) -> (
    Producer,
    impl std::future::Future<
        Output = tower_backpressure::BackpressureBody<http_body_util::StreamBody<BoxStream>, (), M>,
    >,
)
where
    M: tower_backpressure::GapMarker<Bytes>,
    C: tower_backpressure::Classify<Bytes>,
{
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let (producer, body) = channel_body(1024, Some(trailers));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(one_response(body, content_type));
    let fut = async move { svc.oneshot(Request::new(())).await.unwrap().into_body() };
    (producer, fut)
}

#[tokio::test]
async fn grpc_data_loss_ends_the_call_after_the_kept_messages() {
    let layer = BackpressureLayer::new(BufferConfig::new(5)).gap_marker(GrpcDataLoss::new());
    let (producer, body) = in_process(layer, "application/grpc");
    let mut body = body.await;
    for i in 0..3u8 {
        producer.tx.send(Bytes::from(vec![i; 8])).await.unwrap();
        let got = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(got[0], i, "messages before the gap arrive");
    }
    for i in 3..50u8 {
        producer.tx.send(Bytes::from(vec![i; 8])).await.unwrap();
    }
    drop(producer.tx);
    guard("the pump to finish", producer.inner_done)
        .await
        .unwrap();
    let trailers = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    assert_eq!(
        trailers["grpc-status"], "15",
        "DATA_LOSS, not the producer's OK"
    );
    assert!(
        trailers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("42%20frames%20of%20messages%20dropped")
    );
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn ndjson_marker_is_one_line_before_the_next_kept_line() {
    let layer = BackpressureLayer::new(BufferConfig::new(3)).gap_marker(NdjsonGapMarker::new());
    let (producer, body) = in_process(layer, "application/x-ndjson");
    let body = body.await;
    for i in 0..10 {
        producer
            .tx
            .send(Bytes::from(format!("{{\"seq\":{i}}}\n")))
            .await
            .unwrap();
    }
    drop(producer.tx);
    guard("the pump to finish", producer.inner_done)
        .await
        .unwrap();
    let collected = body.collect().await.unwrap();
    let text = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    assert_eq!(
        text,
        "{\"type\":\"lagged\",\"dropped\":7}\n{\"seq\":7}\n{\"seq\":8}\n{\"seq\":9}\n"
    );
}

#[tokio::test]
async fn critical_frames_survive_and_replaceable_frames_keep_only_the_newest() {
    // Frames starting with '!' are critical; ':' are keep-alives that
    // replace each other; the rest are droppable. They carry no delimiter:
    // one body frame each.
    let config = BufferConfig::new(4).with_flush(tower_backpressure::Flush::Immediate);
    let layer = BackpressureLayer::new(config).classify(|b: &Bytes| match b[0] {
        b'!' => FrameClass::Critical,
        b':' => FrameClass::Replace(0),
        _ => FrameClass::Droppable,
    });
    let (producer, body) = in_process(layer, "text/event-stream");
    let body = body.await;
    for frame in [
        "!a", "1", ":k1", "2", "3", ":k2", "4", "!b", "5", "6", ":k3", "7", "8",
    ] {
        producer.tx.send(Bytes::from(frame)).await.unwrap();
    }
    drop(producer.tx);
    guard("the pump to finish", producer.inner_done)
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            got.push(String::from_utf8(data.to_vec()).unwrap());
        }
    }
    assert_eq!(got, vec!["!a", "!b", "7", "8"]);
}

#[tokio::test]
async fn a_shared_budget_bounds_many_stalled_clients_and_spares_a_fast_one() {
    const CLIENTS: usize = 6;
    const PER_CLIENT: u64 = 5_000;
    const BUDGET: usize = 256 * 1024;
    let budget = MemoryBudget::new(BUDGET);
    let (observer, mut events) = recorder();
    // Per client, the buffer alone would hold 4 MB: only the budget binds.
    let layer = BackpressureLayer::new(BufferConfig::new(4000))
        .observer(observer)
        .memory_budget(budget.clone());
    let mut producers = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..CLIENTS {
        let (producer, body) = channel_body(8, None);
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(one_response(body, "text/event-stream"));
        let addr = serve(svc).await;
        let mut client = connect(addr, Some(4096)).await;
        let response = common::get(&mut client, "/events").await;
        stalled.push((client, response));
        producers.push(producer);
    }
    for p in producers {
        guard("a producer", produce(p.tx, PER_CLIENT, SIZE)).await;
        guard("the end of an inner body", p.inner_done)
            .await
            .unwrap();
    }
    let stats = budget.stats();
    assert!(stats.peak <= BUDGET, "peak {} over the budget", stats.peak);
    assert!(stats.used <= BUDGET);
    assert!(stats.dropped > 0, "the budget had to drop");
    assert_eq!(stats.clients, CLIENTS);

    // A client that keeps up loses nothing while the others are over budget.
    let (producer, body) = channel_body(8, None);
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(one_response(body, "text/event-stream"));
    let addr = serve(svc).await;
    let mut fast = connect(addr, None).await;
    let response = common::get(&mut fast, "/events").await;
    let reader = tokio::spawn(read_all(response.into_body()));
    guard("the fast producer", produce(producer.tx, 2_000, 100)).await;
    let read = guard("the fast client", reader).await.unwrap();
    assert_eq!(sse_ids(&read.data), (0..2_000).collect::<Vec<_>>());
    assert!(budget.stats().peak <= BUDGET);

    // Every stalled client's frames were counted: sent + dropped == produced.
    drop(stalled);
    let mut all = Vec::new();
    let mut closed = 0;
    while closed < CLIENTS + 1 {
        let s = wait_for(&mut events, &mut all, |s| {
            matches!(s.kind, EventKind::Closed { .. })
        })
        .await;
        let st = s.stats;
        assert_eq!(st.pushed, st.sent + st.dropped + st.buffered as u64);
        closed += 1;
    }
    assert_eq!(budget.used(), 0, "closed clients return their bytes");
}
