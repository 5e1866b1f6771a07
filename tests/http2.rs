//! The layer over HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on one
//! port, served by the `sse_server` example's accept loop: a stalled HTTP/2
//! client loses the oldest NDJSON lines, each gap announced, exactly as an
//! HTTP/1.1 client does, and gets the newest line and the trailers.

mod common;
#[path = "../examples/common/serve.rs"]
#[allow(dead_code, unreachable_pub)]
mod serve;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, Version, header};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tower_backpressure::{
    BackpressureLayer, BufferConfig, CloseReason, EventKind, NdjsonGapMarker,
};

type BoxStream = futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>;

/// One NDJSON line of `size` bytes carrying `seq`.
fn line(seq: u64, size: usize) -> Bytes {
    let head = format!("{{\"seq\":{seq},\"payload\":\"");
    let pad = size - head.len() - 3;
    let mut s = head;
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}\n");
    Bytes::from(s)
}

/// What a client read: each line's seq, and the frames the `lagged` lines
/// right before it announced.
fn parse(data: &[u8]) -> (Vec<u64>, Vec<u64>) {
    let (mut seqs, mut announced, mut pending) = (Vec::new(), Vec::new(), 0);
    for text in std::str::from_utf8(data).unwrap().lines() {
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        if json["type"] == "lagged" {
            pending += json["dropped"].as_u64().unwrap();
        } else {
            seqs.push(json["seq"].as_u64().unwrap());
            announced.push(std::mem::take(&mut pending));
        }
    }
    (seqs, announced)
}

/// Serves `GET /stream.ndjson` (one response, whose body is `body`) behind
/// the layer, with the example's HTTP/1.1 + HTTP/2 accept loop.
async fn server(
    body: BoxStream,
    config: BufferConfig,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (observer, events) = recorder();
    let body = Arc::new(Mutex::new(Some(body)));
    let app = Router::new()
        .route(
            "/stream.ndjson",
            get(move || {
                let body = body.lock().unwrap().take().expect("one request only");
                async move {
                    Response::builder()
                        .header(header::CONTENT_TYPE, "application/x-ndjson")
                        .header(header::TRAILER, "x-last-seq")
                        .body(Body::new(StreamBody::new(body)))
                        .unwrap()
                }
            }),
        )
        .layer(
            BackpressureLayer::new(config)
                .observer(observer)
                .gap_marker(NdjsonGapMarker::new()),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve::serve_http1_and_http2(
        listener,
        app,
        std::future::pending(),
    ));
    (addr, events)
}

/// Sends `GET /stream.ndjson` as HTTP/2 with prior knowledge; small
/// flow-control windows make a client that stops reading stall the server
/// at once.
async fn get_h2(addr: SocketAddr) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}/stream.ndjson"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    guard("response headers", sender.send_request(req))
        .await
        .unwrap()
}

/// Sends `GET /stream.ndjson` as HTTP/1.1 from a socket with a small
/// receive buffer.
async fn get_h1(addr: SocketAddr) -> Response<Incoming> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/stream.ndjson")
        .header(header::HOST, "localhost")
        .header(header::TE, "trailers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    guard("response headers", sender.send_request(req))
        .await
        .unwrap()
}

/// A client that reads nothing while the producer sends `N` lines at full
/// speed, then reads everything.
async fn stalled_client(version: Version) {
    const N: u64 = 20_000;
    const SIZE: usize = 1000;
    const CAPACITY: usize = 64;

    // The producer: a small bounded channel, so it would block at once if
    // nothing drained it while the client is stalled.
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let (inner_done_tx, inner_done) = oneshot::channel();
    let mut inner_done_tx = Some(inner_done_tx);
    let body = ReceiverStream::new(rx)
        .map(|b| Ok(Frame::data(b)))
        .chain(futures::stream::once(async move {
            let _ = inner_done_tx.take().unwrap().send(());
            let mut trailers = HeaderMap::new();
            trailers.insert("x-last-seq", HeaderValue::from(N - 1));
            Ok(Frame::trailers(trailers))
        }))
        .boxed();
    let (addr, mut events) = server(body, BufferConfig::new(CAPACITY)).await;

    let response = match version {
        Version::HTTP_2 => get_h2(addr).await,
        _ => get_h1(addr).await,
    };
    assert_eq!(response.version(), version);
    assert_eq!(response.status(), 200);
    assert!(response.headers().get(header::CONTENT_LENGTH).is_none());

    let producer = tokio::spawn(async move {
        for seq in 0..N {
            tx.send(line(seq, SIZE)).await.unwrap();
        }
    });
    guard(
        "the producer to finish while the client is stalled",
        producer,
    )
    .await
    .unwrap();
    guard("the pump to reach the end of the inner body", inner_done)
        .await
        .unwrap();

    let read = read_all(response.into_body()).await;
    let (seqs, announced) = parse(&read.data);
    assert_eq!(*seqs.last().unwrap(), N - 1, "the newest line arrives");
    assert!((seqs.len() as u64) < N, "a stalled client must lose lines");
    let mut expected_gap = seqs[0];
    for (i, seq) in seqs.iter().enumerate() {
        if i > 0 {
            assert!(seqs[i - 1] < *seq, "seq must be strictly increasing");
            expected_gap = seq - seqs[i - 1] - 1;
        }
        assert_eq!(announced[i], expected_gap, "the gap before seq {seq}");
    }
    assert_eq!(
        read.trailers.as_ref().and_then(|t| t.get("x-last-seq")),
        Some(&HeaderValue::from(N - 1)),
        "trailers arrive"
    );

    let mut all = Vec::new();
    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    let s = closed.stats;
    assert_eq!(s.pushed, N);
    assert_eq!(s.sent, seqs.len() as u64);
    assert_eq!(s.sent + s.dropped, N, "dropped + delivered == produced");
    assert!(s.high_water <= CAPACITY);
}

#[tokio::test]
async fn a_stalled_http2_client_gets_the_newest_lines_with_every_gap_announced() {
    stalled_client(Version::HTTP_2).await;
}

#[tokio::test]
async fn a_stalled_http1_client_on_the_same_server_gets_the_same() {
    stalled_client(Version::HTTP_11).await;
}

#[tokio::test]
async fn http1_and_http2_clients_share_the_port() {
    const N: u64 = 100;
    let lines =
        move || futures::stream::iter((0..N).map(|seq| Ok(Frame::data(line(seq, 100))))).boxed();
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let (addr, mut events) = server(lines(), BufferConfig::new(1000)).await;
        let response = match version {
            Version::HTTP_2 => get_h2(addr).await,
            _ => get_h1(addr).await,
        };
        assert_eq!(response.version(), version);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/x-ndjson"
        );
        let data = guard("the body", response.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        let (seqs, announced) = parse(&data);
        assert_eq!(seqs, (0..N).collect::<Vec<_>>(), "{version:?}");
        assert!(announced.iter().all(|n| *n == 0));
        let mut all = Vec::new();
        let opened = wait_for(&mut events, &mut all, |s| s.kind == EventKind::Opened).await;
        assert_eq!(opened.path, "/stream.ndjson");
    }
}
