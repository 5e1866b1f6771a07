//! SSE keep-alive and the headers that make proxies stream: a stream quiet
//! for the interval gets exactly one comment line, then goes on; a busy
//! stream gets none, nor does one with keep-alive off or one that is not
//! SSE; a comment is not an event (stats and observer events are those of
//! the events alone). On the per-client path, on a window over a hub's
//! log, and on a hub's SSE response served without the layer. Time is
//! tokio's paused clock: every wait below is exact.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_backpressure::hub::{Hub, HubConfig};
use tower_backpressure::{BackpressureLayer, BoxError, BufferConfig, CloseReason, KeepAlive};

const SSE: &str = "text/event-stream";

/// The next frame's data, as text.
async fn next<B>(body: &mut B) -> String
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let frame = guard("a frame", body.frame())
        .await
        .expect("the stream goes on")
        .expect("a frame");
    String::from_utf8(frame.into_data().expect("data").to_vec()).unwrap()
}

/// Nothing comes out of `body` for ten minutes.
async fn quiet<B>(body: &mut B)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let waited = tokio::time::timeout(Duration::from_secs(600), body.frame()).await;
    assert!(waited.is_err(), "expected nothing, got {waited:?}");
}

/// A client of `layer` whose body is fed through the returned producer.
async fn per_client(
    layer: BackpressureLayer,
    content_type: &'static str,
) -> (
    Producer,
    tower_backpressure::BackpressureBody<
        http_body_util::StreamBody<BoxStream>,
        std::sync::Arc<dyn tower_backpressure::BackpressureObserver>,
    >,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    let (producer, body) = channel_body(16, None);
    let (observer, events) = recorder();
    let observer: std::sync::Arc<dyn tower_backpressure::BackpressureObserver> =
        std::sync::Arc::new(observer);
    let svc = ServiceBuilder::new()
        .layer(layer.observer(observer))
        .service(one_response(body, content_type));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    (producer, response.into_body(), events)
}

fn layer() -> BackpressureLayer {
    BackpressureLayer::new(BufferConfig::new(16))
}

#[tokio::test(start_paused = true)]
async fn a_quiet_stream_gets_one_comment_after_the_interval_then_goes_on() {
    let (producer, mut body, mut events) = per_client(layer(), SSE).await;
    producer.tx.send(Bytes::from("id: 0\n\n")).await.unwrap();
    assert_eq!(next(&mut body).await, "id: 0\n\n");
    let start = Instant::now();
    assert_eq!(next(&mut body).await, ":\n\n");
    assert_eq!(start.elapsed(), Duration::from_secs(15));
    producer.tx.send(Bytes::from("id: 1\n\n")).await.unwrap();
    assert_eq!(next(&mut body).await, "id: 1\n\n");
    // Quiet again: one more comment, 15 s after the last event.
    let start = Instant::now();
    assert_eq!(next(&mut body).await, ":\n\n");
    assert_eq!(start.elapsed(), Duration::from_secs(15));
    drop(producer.tx);
    assert!(guard("the end", body.frame()).await.is_none());
    // Two events, two comments: the stats and the observer saw the events.
    let closed = closed_as(&mut events, CloseReason::Completed).await;
    assert_eq!((closed.stats.pushed, closed.stats.sent), (2, 2));
    let mut kinds = Vec::new();
    while let Ok(seen) = events.try_recv() {
        kinds.push(seen.kind);
    }
    assert!(kinds.is_empty(), "no event after Closed: {kinds:?}");
}

#[tokio::test(start_paused = true)]
async fn the_comment_text_and_interval_are_the_layers() {
    let keep_alive = KeepAlive::new()
        .interval(Duration::from_millis(200))
        .text("keep-alive");
    let (producer, mut body, _events) = per_client(layer().keep_alive(Some(keep_alive)), SSE).await;
    let start = Instant::now();
    assert_eq!(next(&mut body).await, ": keep-alive\n\n");
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    drop(producer);
}

#[tokio::test(start_paused = true)]
async fn keep_alive_off_sends_no_comment() {
    let (producer, mut body, _events) = per_client(layer().keep_alive(None), SSE).await;
    producer.tx.send(Bytes::from("id: 0\n\n")).await.unwrap();
    assert_eq!(next(&mut body).await, "id: 0\n\n");
    quiet(&mut body).await;
    producer.tx.send(Bytes::from("id: 1\n\n")).await.unwrap();
    assert_eq!(next(&mut body).await, "id: 1\n\n");
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_is_not_sse_gets_no_comment() {
    let (producer, mut body, _events) = per_client(layer(), "application/x-ndjson").await;
    quiet(&mut body).await;
    producer.tx.send(Bytes::from("{}\n")).await.unwrap();
    assert_eq!(next(&mut body).await, "{}\n");
}

#[tokio::test(start_paused = true)]
async fn a_busy_stream_gets_no_comment() {
    let (producer, mut body, mut events) = per_client(layer(), SSE).await;
    let start = Instant::now();
    // An event every 10 s for 200 s: never quiet for 15.
    for seq in 0..20 {
        let event = format!("id: {seq}\n\n");
        producer.tx.send(Bytes::from(event.clone())).await.unwrap();
        assert_eq!(next(&mut body).await, event);
        tokio::time::sleep_until(start + Duration::from_secs(10 * (seq + 1))).await;
    }
    drop(producer.tx);
    assert!(guard("the end", body.frame()).await.is_none());
    let closed = closed_as(&mut events, CloseReason::Completed).await;
    assert_eq!(closed.stats.sent, 20);
}

#[tokio::test(start_paused = true)]
async fn a_window_over_a_hub_gets_comments_that_are_not_events() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    let (observer, mut events) = recorder();
    let svc = ServiceBuilder::new()
        .layer(layer().observer(observer))
        .service(service_fn(move |_req: Request<()>| {
            let response = app.response().build();
            async move { Ok::<_, Infallible>(response) }
        }));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    assert!(body.is_buffered());
    hub.publish_sse("a");
    assert_eq!(next(&mut body).await, "id: 0\ndata: a\n\n");
    let start = Instant::now();
    assert_eq!(next(&mut body).await, ":\n\n");
    assert_eq!(start.elapsed(), Duration::from_secs(15));
    hub.publish_sse("b");
    assert_eq!(next(&mut body).await, "id: 1\ndata: b\n\n");
    drop(body);
    let closed = closed_as(&mut events, CloseReason::ClientGone).await;
    assert_eq!(closed.stats.sent, 2);
}

#[tokio::test(start_paused = true)]
async fn a_hub_response_without_the_layer_gets_comments_not_counted_against_its_limit() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-end", HeaderValue::from_static("1"));
    let mut body = hub
        .response()
        .limit(Some(2))
        .trailers(trailers)
        .build()
        .into_body();
    hub.publish_sse("a");
    assert_eq!(next(&mut body).await, "id: 0\ndata: a\n\n");
    let start = Instant::now();
    assert_eq!(next(&mut body).await, ":\n\n");
    assert_eq!(start.elapsed(), Duration::from_secs(15));
    hub.publish_sse("b");
    assert_eq!(next(&mut body).await, "id: 1\ndata: b\n\n");
    // The limit counts the two events; the trailers end it.
    let end = guard("trailers", body.frame()).await.unwrap().unwrap();
    assert_eq!(end.into_trailers().unwrap()["x-end"], "1");
    assert!(guard("the end", body.frame()).await.is_none());

    let mut off = hub.response().keep_alive(None).build().into_body();
    quiet(&mut off).await;
    let mut ndjson = hub
        .response()
        .content_type(HeaderValue::from_static("application/x-ndjson"))
        .build()
        .into_body();
    quiet(&mut ndjson).await;
}

/// The response headers of `layer` over a service answering `response`.
async fn headers_through(
    layer: BackpressureLayer,
    response: Response<http_body_util::Empty<Bytes>>,
) -> http::HeaderMap {
    let response = std::sync::Mutex::new(Some(response));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<()>| {
            let response = response.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(response) }
        }));
    svc.oneshot(Request::new(()))
        .await
        .unwrap()
        .headers()
        .clone()
}

fn response_of(content_type: &'static str) -> http::response::Builder {
    Response::builder().header(header::CONTENT_TYPE, content_type)
}

#[tokio::test]
async fn the_layer_tells_proxies_not_to_buffer_sse_unless_the_app_said_otherwise() {
    let empty = http_body_util::Empty::<Bytes>::new;
    let sse = headers_through(layer(), response_of(SSE).body(empty()).unwrap()).await;
    assert_eq!(sse["x-accel-buffering"], "no");
    let set = response_of(SSE)
        .header("x-accel-buffering", "yes")
        .body(empty())
        .unwrap();
    let set = headers_through(layer(), set).await;
    assert_eq!(set.get_all("x-accel-buffering").iter().count(), 1);
    assert_eq!(set["x-accel-buffering"], "yes");
    let off = headers_through(
        layer().proxy_buffering_header(false),
        response_of(SSE).body(empty()).unwrap(),
    )
    .await;
    assert!(off.get("x-accel-buffering").is_none());
    let ndjson = headers_through(
        layer(),
        response_of("application/x-ndjson").body(empty()).unwrap(),
    )
    .await;
    assert!(ndjson.get("x-accel-buffering").is_none());
}

#[tokio::test]
async fn a_hubs_sse_response_says_no_cache_and_no_proxy_buffering() {
    let hub: Hub = Hub::default();
    let response = hub.response().build();
    assert_eq!(response.headers()[header::CONTENT_TYPE], SSE);
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    // Through the layer too.
    let app = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(service_fn(move |_req: Request<()>| {
            let response = app.response().build().map(|b| b.map_err(BoxError::from));
            async move { Ok::<_, Infallible>(response) }
        }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
}

#[tokio::test(start_paused = true)]
async fn comments_do_not_keep_a_stalled_client_alive() {
    use tower_backpressure::{EvictReason, Eviction};
    let config =
        BufferConfig::new(16).with_eviction(Eviction::none().after_stall(Duration::from_secs(20)));
    let keep_alive = KeepAlive::new().interval(Duration::from_secs(5));
    let layer = BackpressureLayer::new(config).keep_alive(Some(keep_alive));
    let (producer, mut body, mut events) = per_client(layer, SSE).await;
    producer.tx.send(Bytes::from("id: 0\n\n")).await.unwrap();
    assert_eq!(next(&mut body).await, "id: 0\n\n");
    assert_eq!(next(&mut body).await, ":\n\n");
    // The client stops reading with an event waiting: 20 s later the
    // stall rule evicts it, comments or not.
    producer.tx.send(Bytes::from("id: 1\n\n")).await.unwrap();
    let closed = closed_as(&mut events, CloseReason::Evicted(EvictReason::Stalled)).await;
    assert_eq!(closed.stats.sent, 1);
    let end = guard("the eviction", body.frame()).await.unwrap();
    assert!(end.is_err(), "{end:?}");
}

#[tokio::test(start_paused = true)]
async fn a_subscription_served_as_a_body_gets_comments_when_asked() {
    use futures::StreamExt;
    use tower_backpressure::SseGapMarker;
    use tower_backpressure::hub::HubEvent;

    let hub: Hub = Hub::new(HubConfig::new(100));
    let mut body = hub
        .subscribe()
        .with_gap_marker(SseGapMarker::new())
        .keep_alive(Some(KeepAlive::new()));
    hub.publish_sse("a");
    assert_eq!(next(&mut body).await, "id: 0\ndata: a\n\n");
    let start = Instant::now();
    assert_eq!(next(&mut body).await, ":\n\n");
    assert_eq!(start.elapsed(), Duration::from_secs(15));
    hub.publish_sse("b");
    assert_eq!(next(&mut body).await, "id: 1\ndata: b\n\n");

    // Off by default, and never in the `Stream` view.
    let mut plain = hub.subscribe();
    quiet(&mut plain).await;
    let mut events = hub.subscribe_after(1).keep_alive(Some(KeepAlive::new()));
    let waited = tokio::time::timeout(Duration::from_secs(600), events.next()).await;
    assert!(waited.is_err(), "{waited:?}");
    hub.publish_sse("c");
    assert!(matches!(
        events.next().await,
        Some(HubEvent::Frame { id: 2, .. })
    ));
}
