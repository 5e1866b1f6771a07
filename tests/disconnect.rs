//! An evicted client that never reads again loses its connection: the
//! server closes it even though hyper never polls the body again.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, header};
use http_body_util::StreamBody;
use hyper::body::Incoming;
use tokio::io::AsyncReadExt;
use tower::{ServiceBuilder, service_fn};
use tower_backpressure::{
    BackpressureLayer, BufferConfig, ClientRegistry, CloseReason, EventKind, EvictReason, Eviction,
    Overflow,
};

type BoxStream = futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, Infallible>>;

/// An endless SSE stream of 1 KiB events, as fast as the pump takes them.
fn endless() -> Response<StreamBody<BoxStream>> {
    use futures::StreamExt;
    let events =
        futures::stream::iter(0u64..).map(|seq| Ok(http_body::Frame::data(sse_event(seq, 1024))));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(StreamBody::new(events.boxed()))
        .unwrap()
}

/// Reads what the server left in the socket, then expects the end of the
/// connection (EOF or a reset): it must come without the client's help.
async fn expect_closed(mut stream: tokio::net::TcpStream) {
    guard("the server to close the connection", async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
}

async fn evicted_client_loses_its_connection(config: BufferConfig, rule: EvictReason) {
    let (observer, mut events) = recorder();
    let registry = ClientRegistry::new();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(config).observer((observer, registry.clone())))
        .service(service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(endless())
        }));
    let (addr, mut ends) = serve_closable(svc).await;
    let stream = stalled_get(addr, "/events").await;
    let local = stream.local_addr().unwrap();
    let mut seen = Vec::new();
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Evicted(rule)
        }
    );
    // The server side of the connection ends, and the client sees it end,
    // although the client never read a byte.
    let ended = guard("the connection task to end", ends.recv()).await;
    assert_eq!(ended, Some(local));
    expect_closed(stream).await;
    assert!(registry.is_empty());
}

#[tokio::test]
async fn disconnect_policy_closes_the_connection_of_a_client_that_never_reads() {
    evicted_client_loses_its_connection(
        BufferConfig::new(16).with_overflow(Overflow::Disconnect),
        EvictReason::Overflow,
    )
    .await;
}

#[tokio::test]
async fn a_stall_eviction_closes_the_connection_of_a_client_that_never_reads() {
    evicted_client_loses_its_connection(
        BufferConfig::new(16)
            .with_eviction(Eviction::none().after_stall(Duration::from_millis(200))),
        EvictReason::Stalled,
    )
    .await;
}

#[tokio::test]
async fn a_client_that_keeps_reading_keeps_its_connection_for_the_next_request() {
    // Completed responses leave the connection alone: the Connection is only
    // closed for an eviction.
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(16)))
        .service(service_fn(|_req: Request<Incoming>| async {
            let events = futures::stream::iter(
                (0..3).map(|seq| Ok::<_, Infallible>(http_body::Frame::data(sse_event(seq, 16)))),
            );
            Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(StreamBody::new(events))
                    .unwrap(),
            )
        }));
    let (addr, _ends) = serve_closable(svc).await;
    let mut client = connect(addr, None).await;
    for _ in 0..2 {
        let response = get(&mut client, "/events").await;
        let read = read_all(response.into_body()).await;
        assert_eq!(sse_ids(&read.data), [0, 1, 2]);
    }
}
