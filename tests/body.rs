//! The wrapped body in-process: event order and batching, trailers and
//! errors after kept data, framing, and what is left alone.

mod common;

use std::convert::Infallible;
use std::io;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BufferConfig, CloseReason, EventKind, Flush, PumpStopped,
};

fn frames(range: std::ops::Range<u64>) -> Vec<Result<Frame<Bytes>, io::Error>> {
    range.map(|i| Ok(Frame::data(sse_event(i, 40)))).collect()
}

fn response<B>(content_type: &str, body: B) -> Response<B> {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .unwrap()
}

fn kinds(all: &[Seen]) -> Vec<EventKind> {
    all.iter().map(|s| s.kind).collect()
}

#[tokio::test]
async fn a_ready_burst_is_one_pressure_one_dropped_batch_then_one_recovery() {
    let (observer, mut events) = recorder();
    // One frame per read, so that the client recovers frame by frame (the
    // default would take the 10 kept frames in one read).
    let layer = BackpressureLayer::new(
        BufferConfig::new(10)
            .with_threshold(0.5)
            .with_flush(Flush::Immediate),
    )
    .observer(observer);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(response(
                "text/event-stream",
                StreamBody::new(futures::stream::iter(frames(0..100))),
            ))
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert!(res.body().is_buffered());

    // All 100 frames are ready at once: the pump takes them in one wake-up.
    let mut all = Vec::new();
    let dropped = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Dropped { .. })
    })
    .await;
    assert_eq!(
        dropped.kind,
        EventKind::Dropped {
            count: 90,
            bytes: 90 * 40
        }
    );
    assert_eq!(
        kinds(&all),
        vec![EventKind::Opened, EventKind::Pressure, dropped.kind]
    );
    // Pressure fired when the buffer reached half its capacity.
    assert_eq!(all[1].stats.buffered, 5);

    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sse_ids(&body), (90..100).collect::<Vec<_>>());
    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        kinds(&all[3..]),
        vec![
            EventKind::Recovered,
            EventKind::Closed {
                reason: CloseReason::Completed
            }
        ]
    );
    assert_eq!(
        all[3].stats.buffered, 4,
        "recovered just under the threshold"
    );
    let s = closed.stats;
    assert_eq!((s.pushed, s.sent, s.dropped, s.buffered), (100, 10, 90, 0));
}

#[tokio::test]
async fn trailers_survive_drops_and_come_after_the_kept_data() {
    let (observer, mut events) = recorder();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let sent_trailers = trailers.clone();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(5)).observer(observer))
        .service(service_fn(move |_: Request<()>| {
            let mut items = frames(0..50);
            items.push(Ok(Frame::trailers(sent_trailers.clone())));
            async move {
                Ok::<_, Infallible>(response(
                    "application/grpc",
                    StreamBody::new(futures::stream::iter(items)),
                ))
            }
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    let mut all = Vec::new();
    // Wait until the pump has taken everything before reading.
    wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Dropped { .. })
    })
    .await;

    let mut body = res.into_body();
    let mut ids = Vec::new();
    let mut got_trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        assert!(got_trailers.is_none(), "nothing after trailers");
        match frame.into_data() {
            Ok(data) => ids.extend(sse_ids(&data)),
            Err(frame) => got_trailers = frame.into_trailers().ok(),
        }
    }
    assert_eq!(ids, vec![45, 46, 47, 48, 49]);
    assert_eq!(got_trailers, Some(trailers));
    assert!(body.is_end_stream());
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
}

#[tokio::test]
async fn an_inner_error_arrives_after_the_data_kept_before_it() {
    let (observer, mut events) = recorder();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(100)).observer(observer))
        .service(service_fn(|_: Request<()>| async {
            let mut items = frames(0..3);
            items.push(Err(io::Error::other("producer failed")));
            Ok::<_, Infallible>(response(
                "application/x-ndjson",
                StreamBody::new(futures::stream::iter(items)),
            ))
        }));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    // The kept data (joined or not), then the error.
    let mut ids = Vec::new();
    let err = loop {
        match body.frame().await.unwrap() {
            Ok(frame) => ids.extend(sse_ids(&frame.into_data().unwrap())),
            Err(e) => break e,
        }
    };
    assert_eq!(ids, vec![0, 1, 2]);
    let io = err
        .downcast_ref::<io::Error>()
        .expect("the inner error, boxed");
    assert_eq!(io.to_string(), "producer failed");
    assert!(body.frame().await.is_none());

    let closed = closed_as(&mut events, CloseReason::InnerError).await;
    assert_eq!(closed.stats.sent, 3);
}

#[tokio::test]
async fn wrapped_responses_lose_content_length_and_report_no_exact_size() {
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::default()))
        .service(service_fn(|_: Request<()>| async {
            let mut res = response(
                "text/event-stream",
                StreamBody::new(futures::stream::iter(frames(0..2))),
            );
            res.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(80));
            Ok::<_, Infallible>(res)
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert!(res.body().is_buffered());
    assert!(res.headers().get(header::CONTENT_LENGTH).is_none());
    assert_eq!(res.body().size_hint().exact(), None);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sse_ids(&body), vec![0, 1]);
}

#[tokio::test]
async fn other_responses_pass_through_untouched_with_no_events() {
    let (observer, mut events) = recorder();
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::default()).observer(observer))
        .service(service_fn(|req: Request<()>| async move {
            let res = match req.uri().path() {
                // Exact size: never buffered, whatever its type.
                "/exact" => response("text/event-stream", Full::new(Bytes::from("data: x\n\n")))
                    .map(|b| b.map_err(|never| match never {}).boxed()),
                // Compressed: never buffered.
                "/gzip" => {
                    let mut r = response(
                        "text/event-stream",
                        BodyExt::boxed(StreamBody::new(futures::stream::iter(vec![Ok::<
                            _,
                            Infallible,
                        >(
                            Frame::data(Bytes::from_static(b"\x1f\x8b")),
                        )]))),
                    );
                    r.headers_mut()
                        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    r
                }
                // Not a streaming type.
                _ => response("application/json", Full::new(Bytes::from("{}")))
                    .map(|b| b.map_err(|never| match never {}).boxed()),
            };
            Ok::<_, Infallible>(res)
        }));
    for path in ["/exact", "/gzip", "/json"] {
        let res = svc
            .clone()
            .oneshot(Request::get(path).body(()).unwrap())
            .await
            .unwrap();
        assert!(!res.body().is_buffered(), "{path}");
        let hint = res.body().size_hint().exact();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        if path != "/gzip" {
            assert_eq!(hint, Some(body.len() as u64), "{path}: size hint forwarded");
        }
    }
    assert!(
        events.try_recv().is_err(),
        "no events for untouched responses"
    );
}

#[test]
fn without_a_tokio_runtime_responses_pass_through() {
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::default()))
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(response(
                "text/event-stream",
                StreamBody::new(futures::stream::iter(frames(0..3))),
            ))
        }));
    let res = futures::executor::block_on(svc.oneshot(Request::new(()))).unwrap();
    assert!(!res.body().is_buffered());
    let body = futures::executor::block_on(res.into_body().collect())
        .unwrap()
        .to_bytes();
    assert_eq!(sse_ids(&body), vec![0, 1, 2]);
}

#[tokio::test]
async fn a_panicking_observer_ends_the_body_with_pump_stopped_after_kept_data() {
    let observer = |e: &BackpressureEvent<'_>| {
        if let EventKind::Dropped { .. } = e.kind {
            panic!("observer bug");
        }
    };
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(5)).observer(observer))
        .service(service_fn(|_: Request<()>| async {
            // 10 ready frames, then pending forever: only the panic ends it.
            let s = futures::stream::iter(frames(0..10)).chain(futures::stream::pending());
            Ok::<_, Infallible>(response("text/event-stream", StreamBody::new(s)))
        }));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let mut ids = Vec::new();
    let err = loop {
        match guard("the body to end", body.frame()).await.unwrap() {
            Ok(frame) => ids.extend(sse_ids(&frame.into_data().unwrap())),
            Err(e) => break e,
        }
    };
    assert_eq!(ids, vec![5, 6, 7, 8, 9], "kept data first");
    assert!(err.downcast_ref::<PumpStopped>().is_some(), "{err}");
}

#[tokio::test]
async fn dropping_the_body_early_fires_closed_client_gone_exactly_once() {
    let (observer, mut events) = recorder();
    // One frame per read: the client takes exactly one before it goes.
    let config = BufferConfig::new(10).with_flush(Flush::Immediate);
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(config).observer(observer))
        .service(service_fn(|_: Request<()>| async {
            let s = futures::stream::iter(frames(0..3)).chain(futures::stream::pending());
            Ok::<_, Infallible>(response("text/event-stream", StreamBody::new(s)))
        }));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let closed = closed_as(&mut events, CloseReason::ClientGone).await;
    assert_eq!(closed.stats.sent, 1);
    assert!(events.try_recv().is_err());
}

/// A pump whose client is behind lets the clients that keep up go first:
/// when one producer tick reaches a stalled client and a fast one (the
/// stalled one first), the fast client has its frame before the stalled
/// client's pump takes its own. (On one thread, so that the order is the
/// runtime's, not a race.)
#[tokio::test(flavor = "current_thread")]
async fn a_behind_pump_lets_the_fast_clients_go_first() {
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    type Inner = StreamBody<
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send>>,
    >;
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    // The stalled client's inner body logs each frame its pump takes.
    let (s_tx, s_rx) = mpsc::channel::<u64>(8);
    let (a_tx, a_rx) = mpsc::channel::<u64>(8);
    let (took_tx, mut took) = mpsc::unbounded_channel::<()>();
    let stalled: Inner = StreamBody::new(Box::pin({
        let log = log.clone();
        ReceiverStream::new(s_rx).map(move |i| {
            log.lock().unwrap().push(format!("S:{i}"));
            let _ = took_tx.send(());
            Ok(Frame::data(sse_event(i, 40)))
        })
    }));
    let fast: Inner = StreamBody::new(Box::pin(
        ReceiverStream::new(a_rx).map(|i| Ok(Frame::data(sse_event(i, 40)))),
    ));
    let bodies = Arc::new(Mutex::new(vec![fast, stalled]));
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(16)))
        .service(service_fn(move |_: Request<()>| {
            let body = bodies.lock().unwrap().pop().expect("two requests");
            async move { Ok::<_, Infallible>(response("text/event-stream", body)) }
        }));
    // Never read.
    let _stalled = svc.clone().oneshot(Request::new(())).await.unwrap();
    let mut fast = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let (got_tx, mut got) = mpsc::unbounded_channel::<u64>();
    let reader = tokio::spawn({
        let log = log.clone();
        async move {
            while let Some(Ok(frame)) = fast.frame().await {
                for id in sse_ids(frame.data_ref().unwrap()) {
                    log.lock().unwrap().push(format!("A:{id}"));
                    let _ = got_tx.send(id);
                }
            }
        }
    });

    // Tick 0: after it, the stalled client is behind (its frame waits).
    s_tx.send(0).await.unwrap();
    a_tx.send(0).await.unwrap();
    assert_eq!(guard("A:0", got.recv()).await, Some(0));
    guard("S:0", took.recv()).await.unwrap();
    log.lock().unwrap().clear();

    // Tick 1 reaches the stalled client first.
    s_tx.try_send(1).unwrap();
    a_tx.try_send(1).unwrap();
    assert_eq!(guard("A:1", got.recv()).await, Some(1));
    guard("S:1", took.recv()).await.unwrap();
    assert_eq!(*log.lock().unwrap(), ["A:1", "S:1"]);
    reader.abort();
}
