//! tower-http's `CompressionLayer` next to `BackpressureLayer`, both
//! orders, with a real SSE stream, a real hyper server and a client that
//! decompresses.
//!
//! - Layer inside compression (right): frames are dropped before they are
//!   compressed; the client gets valid gzip of whole events, with the gap
//!   marked.
//! - Compression inside the layer: the layer sees `Content-Encoding` and
//!   passes the response through (compressed bytes cannot lose a frame):
//!   nothing is dropped, and the gzip is still valid, but the client has
//!   no bound of its own.

mod common;

use std::io::Read as _;

use bytes::Bytes;
use common::*;
use http::{Request, header};
use http_body_util::BodyExt;
use tower::ServiceBuilder;
use tower_backpressure::{BackpressureLayer, BufferConfig, SseGapMarker};
use tower_http::compression::CompressionLayer;

/// Compress every response, SSE included (tower-http's default predicate
/// leaves `text/event-stream` alone).
fn compression() -> CompressionLayer<impl tower_http::compression::Predicate> {
    CompressionLayer::new().gzip(true).compress_when(
        |_: http::StatusCode, _: http::Version, _: &http::HeaderMap, _: &http::Extensions| true,
    )
}

fn backpressure() -> BackpressureLayer<tower_backpressure::DefaultPredicate, (), SseGapMarker> {
    BackpressureLayer::new(BufferConfig::new(4)).gap_marker(SseGapMarker::new())
}

/// A producer that has sent `n` events before the client connects, then
/// ends; the stack under test serves them over a real connection. Returns
/// the response's `Content-Encoding` and its body, decompressed.
async fn serve_and_read<S, B>(svc: S) -> (String, String)
where
    S: tower::Service<
            Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = serve(svc).await;
    let mut client = connect(addr, None).await;
    let req = Request::get("/events")
        .header("host", "localhost")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = guard("response headers", client.sender.send_request(req))
        .await
        .unwrap();
    let encoding = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(response.headers().get(header::CONTENT_LENGTH).is_none());
    let gz = guard("the whole body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .expect("valid gzip");
    (encoding, text)
}

fn events(range: std::ops::Range<u64>) -> String {
    range
        .map(|id| format!("id: {id}\ndata: tick\n\n"))
        .collect()
}

#[tokio::test]
async fn inside_compression_frames_are_dropped_before_they_are_compressed() {
    let (producer, body) = channel_body(100, None);
    for id in 0..100 {
        producer
            .tx
            .send(Bytes::from(format!("id: {id}\ndata: tick\n\n")))
            .await
            .unwrap();
    }
    drop(producer.tx);
    let svc = ServiceBuilder::new()
        .layer(compression())
        .layer(backpressure())
        .service(one_response(body, "text/event-stream"));
    let (encoding, text) = serve_and_read(svc).await;
    assert_eq!(encoding, "gzip");
    // The pump took all 100 at once into a ring of 4: the newest 4, after
    // a marker for the 96 before them, each event whole.
    let want = format!(
        "event: lagged\ndata: {{\"dropped\":96}}\n\n{}",
        events(96..100)
    );
    assert_eq!(text, want);
}

#[tokio::test]
async fn compression_inside_the_layer_is_passed_through_whole() {
    let (producer, body) = channel_body(100, None);
    for id in 0..100 {
        producer
            .tx
            .send(Bytes::from(format!("id: {id}\ndata: tick\n\n")))
            .await
            .unwrap();
    }
    drop(producer.tx);
    let svc = ServiceBuilder::new()
        .layer(backpressure())
        .layer(compression())
        .service(one_response(body, "text/event-stream"));
    let (encoding, text) = serve_and_read(svc).await;
    assert_eq!(encoding, "gzip");
    // Not buffered: nothing dropped, nothing added.
    assert_eq!(text, events(0..100));
}

/// Inside compression, events still stream: each one the client can
/// decompress as it comes, before the stream ends.
#[tokio::test]
async fn inside_compression_each_event_reaches_the_client_as_it_comes() {
    let (producer, body) = channel_body(100, None);
    let svc = ServiceBuilder::new()
        .layer(compression())
        .layer(backpressure())
        .service(one_response(body, "text/event-stream"));
    let addr = serve(svc).await;
    let mut client = connect(addr, None).await;
    let req = Request::get("/events")
        .header("host", "localhost")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = guard("response headers", client.sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
    let mut body = response.into_body();
    let mut gz = Vec::new();
    for id in 0..3 {
        producer
            .tx
            .send(Bytes::from(format!("id: {id}\ndata: tick\n\n")))
            .await
            .unwrap();
        let want = events(0..id + 1);
        loop {
            let frame = guard("a frame", body.frame()).await.unwrap().unwrap();
            gz.extend_from_slice(&frame.into_data().unwrap());
            // A stream cut short decodes as far as it goes.
            let mut text = String::new();
            let _ = flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text);
            if text == want {
                break;
            }
            assert!(want.starts_with(&text), "{text:?}");
        }
    }
}

/// Compression inside the layer is let through, but not in silence: one
/// `DEBUG` line per selected response says why and what to change. A
/// response the predicate does not select (here `text/html`) logs nothing.
#[cfg(feature = "tracing")]
#[tokio::test]
async fn compression_inside_the_layer_says_so_once_at_debug() {
    use std::sync::{Arc, Mutex};
    use tower::ServiceExt as _;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test's runtime polls on this thread: the default subscriber sees it.
    let _default = tracing::subscriber::set_default(subscriber);

    for content_type in ["text/event-stream", "text/html"] {
        let (producer, body) = channel_body(1, None);
        drop(producer.tx);
        let svc = ServiceBuilder::new()
            .layer(backpressure())
            .layer(compression())
            .service(one_response(body, content_type));
        let req = Request::get("/events")
            .header(header::ACCEPT_ENCODING, "gzip")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
        response.into_body().collect().await.unwrap();
    }
    let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("tower_backpressure"))
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].contains("DEBUG"), "{out}");
    assert!(
        lines[0].contains("response not buffered: it already has a Content-Encoding"),
        "{out}"
    );
    assert!(
        lines[0].contains("put BackpressureLayer inside the compression layer"),
        "{out}"
    );
}
