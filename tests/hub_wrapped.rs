//! A hub's response that the application changed before the layer saw it:
//! the layer serves a client from a window over the hub's log only while
//! the body is still the hub's own, and only where its predicate buffers.
//! A body whose frames were mapped, or that a compression layer encoded,
//! goes out as the application made it; a body that the application ends
//! on a signal still ends on it. Real hyper server and client on loopback.

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http::{HeaderValue, Request, Response, header};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_backpressure::hub::{Hub, HubBody, HubConfig};
use tower_backpressure::{BackpressureLayer, BoxError, BufferConfig};

const NDJSON: &str = "application/x-ndjson";

/// The hub's NDJSON response, as the application's handler builds it.
fn ndjson_response(hub: &Hub) -> Response<HubBody> {
    hub.response()
        .content_type(HeaderValue::from_static(NDJSON))
        .build()
}

/// `GET /` on a connection of its own; the response once its headers came.
async fn open(addr: std::net::SocketAddr) -> Response<Incoming> {
    let mut client = connect(addr, None).await;
    let response = get(&mut client, "/").await;
    assert_eq!(response.status(), 200);
    // The connection task lives as long as the response is read.
    std::mem::forget(client.sender);
    response
}

/// Reads data frames until `want` came, failing as soon as what came is
/// not the start of it.
async fn read_exactly(body: &mut Incoming, want: &[u8]) {
    let mut data = Vec::new();
    while data.len() < want.len() {
        let frame = guard("a frame", body.frame())
            .await
            .expect("the stream goes on")
            .expect("a frame");
        if let Ok(bytes) = frame.into_data() {
            data.extend_from_slice(&bytes);
        }
        assert!(
            want.starts_with(&data),
            "got {:?}, expected {:?}",
            String::from_utf8_lossy(&data),
            String::from_utf8_lossy(want)
        );
    }
}

#[tokio::test]
async fn a_hub_body_whose_frames_were_mapped_is_served_as_mapped() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)))
        .service(service_fn(move |_req: Request<Incoming>| {
            // The handler renders each line as the client wants it.
            let response = ndjson_response(&app).map(|body| {
                body.map_frame(|frame| {
                    frame.map_data(|line| {
                        Bytes::from(format!("> {}", String::from_utf8_lossy(&line)))
                    })
                })
            });
            async move { Ok::<_, Infallible>(response) }
        }));
    let addr = serve(svc).await;
    let response = open(addr).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], NDJSON);
    let mut body = response.into_body();
    for line in ["{\"n\":1}\n", "{\"n\":2}\n", "{\"n\":3}\n"] {
        hub.publish(Bytes::from(line));
    }
    read_exactly(&mut body, b"> {\"n\":1}\n> {\"n\":2}\n> {\"n\":3}\n").await;
}

/// A stand-in for a compression layer inside `BackpressureLayer`: it sets
/// `Content-Encoding` and encodes every frame (here: reverses its bytes).
fn reversed<B>(response: Response<B>) -> Response<UnsyncBoxBody<Bytes, BoxError>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = response.into_parts();
    parts
        .headers
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("x-rev"));
    let body = body
        .map_frame(|frame| {
            frame.map_data(|data| data.iter().rev().copied().collect::<Vec<u8>>().into())
        })
        .map_err(Into::into)
        .boxed_unsync();
    Response::from_parts(parts, body)
}

#[tokio::test]
async fn a_hub_body_under_content_encoding_is_not_replaced() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)))
        .map_response(reversed)
        .service(service_fn(move |_req: Request<Incoming>| {
            let response = ndjson_response(&app);
            async move { Ok::<_, Infallible>(response) }
        }));
    let addr = serve(svc).await;
    let response = open(addr).await;
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "x-rev");
    let mut body = response.into_body();
    for line in ["ab\n", "cd\n"] {
        hub.publish(Bytes::from(line));
    }
    // Encoded, as the header says.
    read_exactly(&mut body, b"\nba\ndc").await;
}

#[tokio::test]
async fn a_hub_body_under_tower_http_compression_is_valid_gzip() {
    use std::io::Read as _;

    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)))
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .service(service_fn(move |_req: Request<Incoming>| {
            let response = ndjson_response(&app);
            async move { Ok::<_, Infallible>(response) }
        }));
    let addr = serve(svc).await;
    let mut client = connect(addr, None).await;
    let req = Request::get("/")
        .header("host", "localhost")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = guard("response headers", client.sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
    let mut body = response.into_body();
    let lines: Vec<String> = (0..50).map(|n| format!("{{\"n\":{n}}}\n")).collect();
    for line in &lines {
        hub.publish(Bytes::from(line.clone()));
    }
    // The hub ends nothing by itself: read until the lines decode.
    let want = lines.concat();
    let mut gz = Vec::new();
    loop {
        let frame = guard("a frame", body.frame())
            .await
            .expect("the stream goes on")
            .expect("a frame");
        gz.extend_from_slice(&frame.into_data().unwrap());
        assert!(
            [0x1f, 0x8b].starts_with(&gz[..gz.len().min(2)]),
            "not gzip: {:?}",
            String::from_utf8_lossy(&gz)
        );
        let mut text = String::new();
        // A gzip stream cut short decodes as far as it goes, then fails.
        let _ = flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text);
        assert!(
            want.starts_with(&text),
            "not the hub's lines, in order: {text:?}"
        );
        if text == want {
            break;
        }
    }
}

#[tokio::test]
async fn a_hub_body_ended_on_a_signal_still_ends_when_the_signal_fires() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)))
        .service(service_fn(move |_req: Request<Incoming>| {
            let mut stopped = stopped.clone();
            // As axum handlers end an SSE stream on shutdown.
            let response = ndjson_response(&app).map(|body| {
                let frames = body
                    .into_data_stream()
                    .map(|data| data.map(Frame::data))
                    .take_until(async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                StreamBody::new(frames)
            });
            async move { Ok::<_, Infallible>(response) }
        }));
    let addr = serve(svc).await;
    let mut body = open(addr).await.into_body();
    hub.publish(Bytes::from("a\n"));
    read_exactly(&mut body, b"a\n").await;
    stop.send_replace(true);
    let end = guard("the end of the stream", async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => assert!(frame.is_data(), "{frame:?}"),
                Some(Err(e)) => panic!("a clean end, not {e}"),
                None => return,
            }
        }
    });
    end.await;
}

#[tokio::test]
async fn a_plain_hub_body_still_gets_a_window_and_no_pump_task() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    // As axum and tonic hand it on: boxed, its type erased.
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)))
        .service(service_fn(move |_req: Request<()>| {
            let response = ndjson_response(&app).map(|body| body.boxed_unsync());
            async move { Ok::<_, Infallible>(response) }
        }));
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks = metrics.num_alive_tasks();
    let response = svc.oneshot(Request::new(())).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(
        format!("{body:?}"),
        "BackpressureBody { kind: \"windowed\" }"
    );
    hub.publish(Bytes::from("a\n"));
    let frame = guard("a frame", body.frame()).await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "a\n");
    // One subscriber (the window; the hub's own body reads nothing more),
    // and no task of the client's own (the hub's sweep is one per hub).
    assert_eq!(hub.subscribers(), 1);
    assert!(
        metrics.num_alive_tasks() <= tasks + 1,
        "{} tasks, {tasks} before",
        metrics.num_alive_tasks()
    );
}

#[tokio::test]
async fn a_plain_hub_body_through_a_real_server_is_windowed() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)))
        .service(service_fn(move |_req: Request<Incoming>| {
            let response = ndjson_response(&app);
            async move { Ok::<_, Infallible>(response) }
        }));
    let addr = serve(svc).await;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(open(addr).await.into_body());
    }
    for line in ["a\n", "b\n"] {
        hub.publish(Bytes::from(line));
    }
    for body in &mut bodies {
        read_exactly(body, b"a\nb\n").await;
    }
    assert_eq!(hub.subscribers(), 3);
}

/// The path the layer takes for each shape of a hub's response.
#[tokio::test]
async fn only_a_body_that_is_still_the_hubs_own_is_replaced_by_a_window() {
    async fn kind<B>(response: Response<B>) -> String
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let response = std::sync::Mutex::new(Some(response));
        let svc = ServiceBuilder::new()
            .layer(BackpressureLayer::new(BufferConfig::new(100)))
            .service(service_fn(move |_req: Request<()>| {
                let response = response.lock().unwrap().take().unwrap();
                async move { Ok::<_, Infallible>(response) }
            }));
        let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        format!("{body:?}")
    }
    let windowed = "BackpressureBody { kind: \"windowed\" }";
    let buffered = "BackpressureBody { kind: \"buffered\" }";
    let passthrough = "BackpressureBody { kind: \"passthrough\" }";
    let hub: Hub = Hub::new(HubConfig::new(100));
    assert_eq!(kind(ndjson_response(&hub)).await, windowed);
    let boxed = ndjson_response(&hub).map(|b| b.map_err(BoxError::from).boxed_unsync());
    assert_eq!(kind(boxed).await, windowed);
    // As axum's handlers and tonic's routes hand it on.
    let axum = ndjson_response(&hub).map(axum::body::Body::new);
    assert_eq!(kind(axum).await, windowed);
    let tonic = ndjson_response(&hub).map(tonic::body::Body::new);
    assert_eq!(kind(tonic).await, windowed);
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ended = ndjson_response(&hub).map(|b| {
        StreamBody::new(
            b.into_data_stream()
                .map(|d| d.map(Frame::data))
                .take_until(stopped),
        )
    });
    assert_eq!(kind(ended).await, windowed);
    let mapped = ndjson_response(&hub)
        .map(|b| b.map_frame(|f| f.map_data(|d| Bytes::from(d.to_ascii_uppercase()))));
    assert_eq!(kind(mapped).await, buffered);
    assert_eq!(kind(reversed(ndjson_response(&hub))).await, passthrough);
    // Not a streaming type the predicate selects: passthrough, no window.
    let plain = hub
        .response()
        .content_type(HeaderValue::from_static("application/octet-stream"))
        .build();
    assert_eq!(kind(plain).await, passthrough);
}

/// A handler that puts a frame of its own before the hub's (an SSE
/// `retry:` hint): it comes first, then every event, in order.
#[tokio::test]
async fn a_frame_the_app_puts_before_the_hubs_comes_first() {
    let hub: Hub = Hub::new(HubConfig::new(100));
    let app = hub.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)))
        .service(service_fn(move |_req: Request<Incoming>| {
            let response = app.response().build().map(|body| {
                let retry = futures::stream::once(async { Ok(Bytes::from("retry: 1000\n\n")) });
                StreamBody::new(
                    retry
                        .chain(body.into_data_stream())
                        .map(|d| d.map(Frame::data)),
                )
            });
            async move { Ok::<_, Infallible>(response) }
        }));
    let addr = serve(svc).await;
    let mut body = open(addr).await.into_body();
    read_exactly(&mut body, b"retry: 1000\n\n").await;
    hub.publish_sse("a");
    hub.publish_sse("b");
    read_exactly(&mut body, b"id: 0\ndata: a\n\nid: 1\ndata: b\n\n").await;
}
