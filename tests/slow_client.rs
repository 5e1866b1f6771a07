//! A real hyper server on 127.0.0.1:0, real TCP clients: the slow client
//! loses the oldest frames, the fast one loses nothing, and a client that
//! goes away stops the pump.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Frame;
use http_body_util::StreamBody;
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tower::{ServiceBuilder, service_fn};
use tower_backpressure::{BackpressureLayer, BufferConfig, CloseReason, EventKind};

type BoxStream = futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>;

/// A server whose one response streams `body`, as `text/event-stream`.
async fn one_stream_server(
    body: BoxStream,
    config: BufferConfig,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (observer, events) = recorder();
    let body = Arc::new(Mutex::new(Some(body)));
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(config).observer(observer))
        .service(service_fn(move |_req: Request<Incoming>| {
            let body = body.lock().unwrap().take().expect("one request only");
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(header::CONTENT_TYPE, "text/event-stream")
                        .header(header::CONTENT_LENGTH, "999999")
                        .header(header::TRAILER, "x-last-seq")
                        .body(StreamBody::new(body))
                        .unwrap(),
                )
            }
        }));
    (serve(svc).await, events)
}

#[tokio::test]
async fn stalled_client_gets_the_newest_frames_and_the_counts_add_up() {
    const N: u64 = 20_000;
    const SIZE: usize = 1000;
    const CAPACITY: usize = 64;
    const MAX_BYTES: usize = 32 * 1024;

    // The producer: a small bounded channel, so it would block at once if
    // nothing drained it while the client is stalled.
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let (inner_done_tx, inner_done) = oneshot::channel();
    let (inner_dropped_tx, inner_dropped) = oneshot::channel();
    let guard_on_drop = DropSignal(Some(inner_dropped_tx));
    let mut inner_done_tx = Some(inner_done_tx);
    let body = ReceiverStream::new(rx)
        .map(|b| Ok(Frame::data(b)))
        .chain(futures::stream::once(async move {
            let _ = inner_done_tx.take().unwrap().send(());
            let mut trailers = HeaderMap::new();
            trailers.insert("x-last-seq", HeaderValue::from(N - 1));
            Ok(Frame::trailers(trailers))
        }))
        .map(move |f| {
            let _keep = &guard_on_drop;
            f
        })
        .boxed();
    let config = BufferConfig::new(CAPACITY)
        .with_max_bytes(MAX_BYTES)
        .with_threshold(0.5);
    let (addr, mut events) = one_stream_server(body, config).await;

    let mut client = connect(addr, Some(4096)).await;
    let response = get(&mut client, "/events").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get(header::CONTENT_LENGTH).is_none());

    // The client reads nothing while the producer sends everything at full
    // speed: it finishes only because the pump drains it.
    let producer = tokio::spawn(async move {
        for seq in 0..N {
            tx.send(sse_event(seq, SIZE)).await.unwrap();
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
    guard("the pump to drop the inner body", inner_dropped)
        .await
        .unwrap();

    // Now the client reads everything.
    let read = read_all(response.into_body()).await;
    let ids = sse_ids(&read.data);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids must be strictly increasing"
    );
    assert_eq!(*ids.last().unwrap(), N - 1, "the newest frame arrives");
    assert!((ids.len() as u64) < N, "a stalled client must lose frames");
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
    assert_eq!(s.pushed, N, "the pump took every frame the producer made");
    assert_eq!(
        s.sent,
        ids.len() as u64,
        "delivered as the observer reports"
    );
    assert_eq!(s.sent + s.dropped, N, "dropped + delivered == produced");
    assert_eq!(s.buffered, 0);
    assert!(s.high_water <= CAPACITY, "{} frames at once", s.high_water);
    assert!(
        s.high_water_bytes <= MAX_BYTES,
        "{} bytes at once",
        s.high_water_bytes
    );

    // Event order: Opened first, Closed once and last, drops reported in
    // batches that add up, pressure episodes opened and closed in turn.
    assert_eq!(all[0].kind, EventKind::Opened);
    assert_eq!(
        all.iter()
            .filter(|e| matches!(e.kind, EventKind::Closed { .. }))
            .count(),
        1
    );
    let reported: u64 = all
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Dropped { count, .. } => Some(count),
            _ => None,
        })
        .sum();
    assert_eq!(reported, s.dropped);
    let batches = all
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Dropped { .. }))
        .count() as u64;
    assert!(
        batches < s.dropped,
        "drops are batched, not one event per frame"
    );
    let episodes: Vec<_> = all
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Pressure | EventKind::Recovered))
        .map(|e| e.kind)
        .collect();
    assert!(!episodes.is_empty());
    for (i, k) in episodes.iter().enumerate() {
        let expect = if i % 2 == 0 {
            EventKind::Pressure
        } else {
            EventKind::Recovered
        };
        assert_eq!(*k, expect, "episodes alternate: {episodes:?}");
    }
    assert_eq!(
        episodes.last(),
        Some(&EventKind::Recovered),
        "the client caught up"
    );
    assert!(
        all.iter()
            .all(|e| e.peer == Some(client.local) && e.path == "/events")
    );
}

#[tokio::test]
async fn fast_client_receives_every_frame_in_order_unchanged() {
    const N: u64 = 5_000;
    let frames: Vec<Bytes> = (0..N).map(|seq| sse_event(seq, 200)).collect();
    let expected: Vec<u8> = frames.iter().flat_map(|b| b.iter().copied()).collect();
    let body = futures::stream::iter(frames.into_iter().map(|b| Ok(Frame::data(b)))).boxed();
    // Room for the whole stream: nothing can be lost, so everything must
    // arrive exactly.
    let (addr, mut events) = one_stream_server(body, BufferConfig::new(N as usize)).await;

    let mut client = connect(addr, None).await;
    let response = get(&mut client, "/events").await;
    let read = read_all(response.into_body()).await;
    assert_eq!(read.data.len(), expected.len());
    assert!(read.data == expected, "bytes differ");

    let closed = closed_as(&mut events, CloseReason::Completed).await;
    assert_eq!((closed.stats.sent, closed.stats.dropped), (N, 0));
}

#[tokio::test]
async fn client_disconnect_stops_a_pump_whose_inner_body_is_pending_forever() {
    let (dropped_tx, inner_dropped) = oneshot::channel();
    let signal = DropSignal(Some(dropped_tx));
    let body = futures::stream::iter([Ok(Frame::data(sse_event(0, 50)))])
        .chain(futures::stream::pending())
        .map(move |f| {
            let _keep = &signal;
            f
        })
        .boxed();
    let (addr, mut events) = one_stream_server(body, BufferConfig::default()).await;

    let mut client = connect(addr, None).await;
    let response = get(&mut client, "/events").await;
    let mut body = response.into_body();
    let first = guard("the first frame", http_body_util::BodyExt::frame(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), sse_event(0, 50));

    // The client goes away.
    drop(body);
    client.conn.abort();
    drop(client);

    closed_as(&mut events, CloseReason::ClientGone).await;
    guard("the pump to end and drop the inner body", inner_dropped)
        .await
        .unwrap();
    // Nothing fires after Closed.
    assert!(events.try_recv().is_err());
}
