//! The client registry and its health service, a registry written by a user
//! with the public API, the metrics observer, the handle a handler sees, and
//! the flush strategies.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BackpressureObserver, BufferConfig, ClientHandle,
    ClientId, ClientRegistry, CloseReason, EventKind, Flush, Health, SseGapMarker,
};

const N: u64 = 20_000;

#[tokio::test]
async fn registry_lists_open_clients_with_true_numbers_and_forgets_them_when_they_go() {
    let registry = ClientRegistry::new();
    let (observer, mut events) = recorder();
    let layer = BackpressureLayer::new(BufferConfig::new(64).with_threshold(0.5))
        .observer((registry.clone(), observer));
    let (producer, body) = channel_body(8, None);
    let addr = serve(
        ServiceBuilder::new()
            .layer(layer)
            .service(one_response(body, "text/event-stream")),
    )
    .await;
    assert!(registry.is_empty());
    let mut client = connect(addr, Some(4096)).await;
    let response = common::get(&mut client, "/events").await;
    assert_eq!(
        registry.len(),
        1,
        "the entry appears when the response opens"
    );

    guard("the producer", produce(producer.tx, N, 1000)).await;
    guard("the end of the inner body", producer.inner_done)
        .await
        .unwrap();
    let snap = registry.snapshot();
    assert_eq!(snap.clients.len(), 1);
    let c = &snap.clients[0];
    assert_eq!(c.peer, Some(client.local));
    assert_eq!((c.method.as_str(), c.path.as_str()), ("GET", "/events"));
    assert_eq!(c.capacity, 64);
    assert!(
        !c.healthy,
        "a stalled client with a full buffer is unhealthy"
    );
    assert!(c.buffered > 0 && c.buffered <= 64);
    assert_eq!(
        c.sent + c.dropped + c.buffered as u64,
        N,
        "the numbers add up"
    );
    assert!(c.dropped > 0);
    assert_eq!(snap.totals.clients, 1);
    assert_eq!(snap.totals.unhealthy, 1);
    assert_eq!(snap.totals.dropped, c.dropped);

    // The client disconnects: its entry leaves.
    drop(response);
    client.conn.abort();
    drop(client);
    closed_as(&mut events, CloseReason::ClientGone).await;
    assert!(registry.is_empty(), "a gone client leaves the table");
    assert_eq!(registry.snapshot().totals.clients, 0);
}

/// A registry written by a user, through the public API only: a handle per
/// client from `BackpressureEvent::handle` on `Opened`, dropped on `Closed`.
#[derive(Clone, Default)]
struct LiveClients(Arc<Mutex<HashMap<ClientId, ClientHandle>>>);

impl LiveClients {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn by_peer(&self, peer: SocketAddr) -> Option<ClientHandle> {
        let clients = self.0.lock().unwrap();
        clients
            .values()
            .find(|c| c.info().peer_addr() == Some(peer))
            .cloned()
    }
}

impl BackpressureObserver for LiveClients {
    fn on_event(&self, event: &BackpressureEvent<'_>) {
        match event.kind {
            EventKind::Opened => {
                let handle = event.handle();
                assert_eq!(handle.info().id(), event.client.id());
                self.0.lock().unwrap().insert(event.client.id(), handle);
            }
            EventKind::Closed { .. } => {
                self.0.lock().unwrap().remove(&event.client.id());
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_user_written_observer_keeps_its_own_table_of_live_clients() {
    const FEW: u64 = 5;
    let live = LiveClients::default();
    let (recorder, mut events) = recorder();
    // `live` hears each event before `recorder` passes it on to the test.
    let layer = BackpressureLayer::new(BufferConfig::new(64).with_threshold(0.5))
        .observer((live.clone(), recorder));
    // `/a` and `/b` stream from channels the test feeds; the handler notes
    // the id of the `ClientHandle` it finds in its request.
    let (a_producer, a_body) = channel_body(8, None);
    let (b_producer, b_body) = channel_body(8, None);
    let bodies = Arc::new(Mutex::new(HashMap::from([("/a", a_body), ("/b", b_body)])));
    let seen_by_handler = Arc::new(Mutex::new(HashMap::new()));
    let handler = {
        let seen_by_handler = seen_by_handler.clone();
        tower::service_fn(move |req: Request<hyper::body::Incoming>| {
            let path = req.uri().path().to_owned();
            let id = req.extensions().get::<ClientHandle>().unwrap().info().id();
            seen_by_handler.lock().unwrap().insert(path.clone(), id);
            let body = bodies.lock().unwrap().remove(path.as_str()).unwrap();
            std::future::ready(Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/event-stream")
                    .body(http_body_util::StreamBody::new(body))
                    .unwrap(),
            ))
        })
    };
    let addr = serve(ServiceBuilder::new().layer(layer).service(handler)).await;

    let mut a = connect(addr, None).await;
    let mut b = connect(addr, Some(4096)).await;
    let a_response = common::get(&mut a, "/a").await;
    let b_response = common::get(&mut b, "/b").await;
    assert_eq!(live.len(), 2, "listed from the moment the responses open");
    let a_handle = live.by_peer(a.local).expect("client a is listed");
    let b_handle = live.by_peer(b.local).expect("client b is listed");
    assert_eq!(
        (a_handle.info().path(), b_handle.info().path()),
        ("/a", "/b")
    );
    let seen_by_handler = seen_by_handler.lock().unwrap().clone();
    assert_eq!(seen_by_handler["/a"], a_handle.info().id());
    assert_eq!(seen_by_handler["/b"], b_handle.info().id());
    assert!(a_handle.is_buffered() && b_handle.is_buffered());

    // Client a reads a few events; the handle in our table counts them.
    for seq in 0..FEW {
        a_producer.tx.send(sse_event(seq, 100)).await.unwrap();
    }
    let mut a_body = a_response.into_body();
    let mut read = Vec::new();
    while read.len() < FEW as usize * 100 {
        let frame = guard("client a's events", a_body.frame()).await;
        read.extend_from_slice(&frame.unwrap().unwrap().into_data().unwrap());
    }
    assert_eq!(sse_ids(&read), (0..FEW).collect::<Vec<_>>());
    let st = a_handle.stats().expect("a buffered response has stats");
    assert_eq!((st.pushed, st.sent, st.dropped), (FEW, FEW, 0));
    assert_eq!(a_handle.health(), Health::Healthy);

    // Client b reads nothing while N events come: its handle shows the drops.
    guard("the producer", produce(b_producer.tx, N, 1000)).await;
    guard("the end of b's inner body", b_producer.inner_done)
        .await
        .unwrap();
    let st = b_handle.stats().expect("a buffered response has stats");
    assert_eq!(st.pushed, N);
    assert!(st.dropped > 0, "a stalled client loses frames");
    assert_eq!(st.sent + st.dropped + st.buffered as u64, N, "{st:?}");

    // Client b disconnects: it leaves our table, and the handle we took out
    // of it tells why, with the final numbers.
    drop(b_response);
    b.conn.abort();
    drop(b);
    let closed = closed_as(&mut events, CloseReason::ClientGone).await;
    assert_eq!(closed.id, b_handle.info().id());
    assert_eq!(live.len(), 1);
    assert!(live.by_peer(a.local).is_some());
    assert_eq!(b_handle.health(), Health::Closed(CloseReason::ClientGone));
    assert_eq!(b_handle.stats().unwrap().pushed, N);
    assert_eq!(a_handle.health(), Health::Healthy, "a is still streaming");

    // Client a's stream ends: the table is empty.
    drop(a_producer.tx);
    while let Some(frame) = guard("the end of a's stream", a_body.frame()).await {
        frame.unwrap();
    }
    let closed = closed_as(&mut events, CloseReason::Completed).await;
    assert_eq!(closed.id, a_handle.info().id());
    assert_eq!(live.len(), 0, "the table never outgrows the open streams");
    assert_eq!(a_handle.health(), Health::Closed(CloseReason::Completed));
}

#[tokio::test]
async fn health_service_answers_get_with_json_and_other_methods_with_405() {
    let registry = ClientRegistry::new();
    let app = axum::Router::new()
        .route(
            "/events",
            axum::routing::get(|| async {
                let s = futures::stream::pending::<
                    Result<axum::response::sse::Event, std::convert::Infallible>,
                >();
                axum::response::sse::Sse::new(s)
            }),
        )
        .layer(BackpressureLayer::new(BufferConfig::default()).observer(registry.clone()))
        .route_service("/health/clients", registry.service());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });

    let mut streaming = connect(addr, None).await;
    let _events = common::get(&mut streaming, "/events").await;

    let mut client = connect(addr, None).await;
    let res = common::get(&mut client, "/health/clients").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let body = read_all(res.into_body()).await;
    let json: serde_json::Value = serde_json::from_slice(&body.data).unwrap();
    let clients = json["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1, "{json}");
    let c = &clients[0];
    for field in [
        "id",
        "healthy",
        "buffered",
        "buffered_bytes",
        "capacity",
        "dropped",
        "sent",
        "high_water",
        "idle_ms",
        "age_ms",
        "path",
        "method",
    ] {
        assert!(!c[field].is_null(), "missing {field}: {json}");
    }
    assert_eq!(c["path"], "/events");
    assert_eq!(c["capacity"], 1000);
    assert_eq!(c["healthy"], true);
    if cfg!(feature = "axum") {
        assert_eq!(c["peer"], streaming.local.to_string());
        assert_eq!(c["route"], "/events");
    }
    assert_eq!(json["totals"]["clients"], 1);

    let post = Request::post("/health/clients")
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = client.sender.send_request(post).await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET, HEAD");
}

#[cfg(feature = "serde")]
#[test]
fn snapshot_json_matches_serde() {
    let registry = ClientRegistry::new().with_budget(tower_backpressure::MemoryBudget::new(10));
    let snap = registry.snapshot();
    let ours: serde_json::Value = serde_json::from_str(&snap.to_json()).unwrap();
    assert_eq!(ours, serde_json::to_value(&snap).unwrap());
}

#[cfg(feature = "metrics")]
#[test]
fn metrics_observer_records_drops_pressure_and_closes() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tower_backpressure::MetricsObserver;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // A current-thread runtime: the pump runs on this thread, under the
    // thread-local recorder.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        MetricsObserver::describe();
        rt.block_on(async {
            let (observer, mut events) = recorder_events();
            let layer = BackpressureLayer::new(BufferConfig::new(10).with_threshold(0.5))
                .observer((MetricsObserver::new(), observer));
            let (producer, body) = channel_body(128, None);
            let svc = ServiceBuilder::new()
                .layer(layer)
                .service(one_response(body, "text/event-stream"));
            let res = svc.oneshot(Request::new(())).await.unwrap();
            for seq in 0..100 {
                producer.tx.send(sse_event(seq, 40)).await.unwrap();
            }
            drop(producer.tx);
            guard("the pump", producer.inner_done).await.unwrap();
            let mut all = Vec::new();
            let _ = &mut all;
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(sse_ids(&body).len(), 10);
            wait_for(&mut events, &mut all, |s| {
                matches!(s.kind, EventKind::Closed { .. })
            })
            .await;
        })
    });
    let snapshot = snapshotter.snapshot().into_vec();
    // Prometheus conventions: counters, and only they, end in `_total`;
    // every series is described (its `# HELP` line).
    for (key, _, description, value) in &snapshot {
        let name = key.key().name();
        let counter = matches!(value, DebugValue::Counter(_));
        assert_eq!(counter, name.ends_with("_total"), "{name}: {value:?}");
        assert!(description.is_some(), "{name} has no description");
    }
    let values: std::collections::HashMap<String, (Vec<(String, String)>, DebugValue)> = snapshot
        .into_iter()
        .map(|(key, _, _, value)| {
            let k = key.key();
            let labels = k
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (k.name().to_owned(), (labels, value))
        })
        .collect();
    let get = |name: &str| {
        values
            .get(name)
            .unwrap_or_else(|| panic!("no {name}: {values:?}"))
    };
    assert_eq!(
        get("backpressure_streams_opened_total").1,
        DebugValue::Counter(1)
    );
    assert_eq!(
        get("backpressure_frames_dropped_total").1,
        DebugValue::Counter(90)
    );
    let (labels, closed) = get("backpressure_streams_closed_total");
    assert_eq!(*closed, DebugValue::Counter(1));
    assert!(labels.contains(&("reason".into(), "completed".into())));
    assert!(labels.contains(&("route".into(), "/".into())));
    let gauge = |name: &str| match get(name).1 {
        DebugValue::Gauge(g) => g.into_inner(),
        ref v => panic!("{name}: {v:?}"),
    };
    assert_eq!(
        gauge("backpressure_clients_under_pressure"),
        0.0,
        "back to 0 after close"
    );
    assert_eq!(gauge("backpressure_buffered_frames"), 0.0);
    assert_eq!(gauge("backpressure_buffered_bytes"), 0.0);
}

#[cfg(feature = "metrics")]
fn recorder_events() -> (
    impl Fn(&tower_backpressure::BackpressureEvent<'_>) + Send + Sync + 'static,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    recorder()
}

#[tokio::test]
async fn the_handler_sees_its_client_come_under_pressure_and_recover() {
    let (handle_tx, handle_rx) = tokio::sync::oneshot::channel::<ClientHandle>();
    let handle_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(handle_tx)));
    let (producer, body) = channel_body(256, None);
    let inner = one_response(body, "text/event-stream");
    let svc = ServiceBuilder::new()
        // One frame per read: four reads take four frames.
        .layer(BackpressureLayer::new(
            BufferConfig::new(10)
                .with_threshold(0.5)
                .with_flush(Flush::Immediate),
        ))
        .map_request(move |req: Request<()>| {
            let handle = req.extensions().get::<ClientHandle>().cloned().unwrap();
            let _ = handle_tx.lock().unwrap().take().unwrap().send(handle);
            req
        })
        .service(inner);
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let mut handle = handle_rx.await.unwrap();
    assert!(handle.is_buffered());
    assert_eq!(handle.health(), Health::Healthy);

    // The client stalls: the handler hears it.
    for seq in 0..8 {
        producer.tx.send(sse_event(seq, 40)).await.unwrap();
    }
    assert_eq!(guard("pressure", handle.changed()).await, Health::Pressure);
    assert_eq!(handle.stats().unwrap().buffered, 8);

    // It reads again: healthy.
    for _ in 0..4 {
        body.frame().await.unwrap().unwrap();
    }
    assert_eq!(guard("recovery", handle.changed()).await, Health::Healthy);

    drop(body);
    assert_eq!(
        guard("close", handle.changed()).await,
        Health::Closed(CloseReason::ClientGone)
    );
    assert_eq!(handle.stats().unwrap().sent, 4, "final stats stay readable");
    assert_eq!(handle.idle(), None);
}

#[tokio::test]
async fn a_response_that_is_not_buffered_has_a_quiet_handle() {
    let (handle_tx, handle_rx) = tokio::sync::oneshot::channel::<ClientHandle>();
    let handle_tx = std::sync::Mutex::new(Some(handle_tx));
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::default()))
        .service(tower::service_fn(move |req: Request<()>| {
            let handle = req.extensions().get::<ClientHandle>().cloned().unwrap();
            let _ = handle_tx.lock().unwrap().take().map(|tx| tx.send(handle));
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                Full::new(Bytes::from_static(b"{}")),
            )))
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert!(!res.body().is_buffered());
    let handle = handle_rx.await.unwrap();
    assert!(!handle.is_buffered());
    assert_eq!(handle.stats(), None);
    assert_eq!(handle.health(), Health::Healthy);
}

/// Pushes `frames` ready frames, then reads the whole body frame by frame.
async fn read_frames_with(config: BufferConfig, frames: u64, marker: bool) -> Vec<Bytes> {
    let (producer, body) = channel_body(1024, None);
    for seq in 0..frames {
        producer.tx.send(sse_event(seq, 40)).await.unwrap();
    }
    drop(producer.tx);
    let layer = BackpressureLayer::new(config);
    let mut out = Vec::new();
    if marker {
        let svc = ServiceBuilder::new()
            .layer(layer.gap_marker(SseGapMarker::new()))
            .service(one_response(body, "text/event-stream"));
        let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        guard("the pump", producer.inner_done).await.unwrap();
        while let Some(f) = body.frame().await {
            out.push(f.unwrap().into_data().unwrap());
        }
    } else {
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(one_response(body, "text/event-stream"));
        let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        guard("the pump", producer.inner_done).await.unwrap();
        while let Some(f) = body.frame().await {
            out.push(f.unwrap().into_data().unwrap());
        }
    }
    out
}

#[tokio::test]
async fn coalesce_joins_waiting_frames_in_order_up_to_its_limits() {
    let frames = read_frames_with(
        BufferConfig::new(1000).with_flush(Flush::coalesce(10, 1 << 20)),
        100,
        false,
    )
    .await;
    assert_eq!(frames.len(), 10, "100 waiting frames, 10 per write");
    let all: Vec<u8> = frames.iter().flat_map(|b| b.to_vec()).collect();
    assert_eq!(sse_ids(&all), (0..100).collect::<Vec<_>>());

    // The byte limit: 40-byte events, at most 100 bytes: 2 per write.
    let frames = read_frames_with(
        BufferConfig::new(1000).with_flush(Flush::coalesce(10, 100)),
        10,
        false,
    )
    .await;
    assert_eq!(
        frames.iter().map(|f| f.len()).collect::<Vec<_>>(),
        vec![80; 5]
    );

    // Never across a gap: the marker stands between.
    let frames = read_frames_with(
        BufferConfig::new(5).with_flush(Flush::coalesce(10, 1 << 20)),
        20,
        true,
    )
    .await;
    assert_eq!(frames.len(), 2);
    assert_eq!(parse_sse(&frames[0]), vec![Sse::Lagged(15)]);
    assert_eq!(
        parse_sse(&frames[1]),
        (15..20).map(Sse::Id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn the_default_flush_joins_what_waits_and_immediate_is_one_setting_away() {
    // The default: what waits goes out joined, 100 events per frame, in
    // order, every byte.
    let frames = read_frames_with(BufferConfig::default(), 250, false).await;
    assert_eq!(
        frames.iter().map(|f| sse_ids(f).len()).collect::<Vec<_>>(),
        [100, 100, 50],
        "250 waiting events, up to 100 per frame"
    );
    let all: Vec<u8> = frames.iter().flat_map(|b| b.to_vec()).collect();
    assert_eq!(sse_ids(&all), (0..250).collect::<Vec<_>>());
    assert_eq!(all.len(), 250 * 40);

    // Never across a gap, with the default too: the marker stands at it.
    let frames = read_frames_with(BufferConfig::new(5), 20, true).await;
    assert_eq!(frames.len(), 2);
    assert_eq!(parse_sse(&frames[0]), vec![Sse::Lagged(15)]);
    assert_eq!(
        parse_sse(&frames[1]),
        (15..20).map(Sse::Id).collect::<Vec<_>>()
    );

    // One setting away: one frame per event.
    let frames = read_frames_with(
        BufferConfig::default().with_flush(Flush::Immediate),
        250,
        false,
    )
    .await;
    assert_eq!(frames.len(), 250);
    for (seq, frame) in frames.iter().enumerate() {
        assert_eq!(sse_ids(frame), [seq as u64]);
    }
}

#[tokio::test]
async fn the_default_flush_hands_out_other_data_types_frame_by_frame() {
    use std::collections::VecDeque;

    use futures::StreamExt;
    use http_body::Frame;

    // Data that is not `Bytes` cannot be joined: each frame goes out as it
    // came, as with `Flush::Immediate`.
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    let frames = futures::stream::iter(
        (0..10u8)
            .map(|i| Ok::<_, std::convert::Infallible>(Frame::data(VecDeque::from(vec![i; 3])))),
    )
    .chain(
        futures::stream::once(async move {
            let _ = done_tx.send(());
            None
        })
        .filter_map(std::future::ready),
    )
    .boxed();
    let body = http_body_util::StreamBody::new(frames);
    let body = std::sync::Mutex::new(Some(body));
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::default()))
        .service(tower::service_fn(move |_req: Request<()>| {
            let body = body.lock().unwrap().take().expect("one request only");
            std::future::ready(Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .unwrap(),
            ))
        }));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    assert!(body.is_buffered());
    // Every frame waits before the first is read.
    guard("the inner body's end", done).await.unwrap();
    let mut out = Vec::new();
    while let Some(f) = body.frame().await {
        out.push(Vec::from(f.unwrap().into_data().unwrap()));
    }
    assert_eq!(out, (0..10u8).map(|i| vec![i; 3]).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn interval_releases_at_most_once_per_period_and_never_delays_the_end() {
    let period = Duration::from_millis(100);
    let (producer, body) = channel_body(1024, None);
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(
            BufferConfig::new(1000).with_flush(Flush::interval(period)),
        ))
        .service(one_response(body, "text/event-stream"));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let start = tokio::time::Instant::now();

    for seq in 0..5 {
        producer.tx.send(sse_event(seq, 40)).await.unwrap();
    }
    // The first release is immediate, and joins what waits.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(sse_ids(&first), vec![0, 1, 2, 3, 4]);
    assert_eq!(start.elapsed(), Duration::ZERO);

    for seq in 5..8 {
        producer.tx.send(sse_event(seq, 40)).await.unwrap();
    }
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(sse_ids(&second), vec![5, 6, 7]);
    assert_eq!(start.elapsed(), period, "the next release waits one period");

    drop(producer.tx);
    assert!(body.frame().await.is_none());
    assert_eq!(start.elapsed(), period, "the end is not held back");
}
