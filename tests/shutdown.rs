//! Graceful shutdown with streams open: `Shutdown` given to the layer ends
//! every stream on one signal, so that axum's `with_graceful_shutdown`
//! finishes, however many clients stall; reading clients see a clean end.

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use common::*;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tower_backpressure::conn::{ClosableListener, ConnectionInfo};
use tower_backpressure::hub::{Hub, HubConfig, sse};
use tower_backpressure::shutdown::Shutdown;
use tower_backpressure::{BackpressureLayer, BufferConfig, CloseReason, EventKind};

/// `GET /events`: a response from `hub`.
fn events_from(hub: &Hub) -> Router {
    let hub = hub.clone();
    Router::new().route(
        "/events",
        get(move || {
            let hub = hub.clone();
            async move { hub.response().build() }
        }),
    )
}

/// Serves `app` with axum on 127.0.0.1:0, over connections the layer can
/// close; at `signal` the server stops accepting and waits for its
/// connections (axum's graceful shutdown).
async fn serve(
    app: Router,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        axum::serve(
            ClosableListener::new(listener),
            app.into_make_service_with_connect_info::<ConnectionInfo>(),
        )
        .with_graceful_shutdown(signal)
        .into_future(),
    );
    (addr, server)
}

/// A reading client: an HTTP/1.1 GET whose body is read to its end. Returns
/// the body's bytes, and whether it ended cleanly (no error).
async fn read_to_end(addr: std::net::SocketAddr, path: &'static str) -> (Vec<u8>, bool) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = send
        .send_request(
            Request::get(path)
                .header(header::HOST, "test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    let mut data = Vec::new();
    loop {
        match body.frame().await {
            None => return (data, true),
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data() {
                    data.extend_from_slice(&d);
                }
            }
            Some(Err(_)) => return (data, false),
        }
    }
}

/// 1,000 open SSE streams from one hub, half of them never reading: at the
/// signal the server stops, the readers get the frames they had, the
/// `retry:` hint and a clean end, the stalled ones are cut at the end of the
/// grace period, and every stream closes with `CloseReason::Shutdown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_a_thousand_streams_half_never_reading() {
    const READERS: usize = 500;
    const STALLED: usize = 500;
    let hub: Hub = Hub::new(HubConfig::new(256));
    let shutdown = Shutdown::new()
        .grace(Duration::from_millis(300))
        .sse_retry(Duration::from_secs(2));
    shutdown.close_hub(&hub);
    let (observer, mut events) = recorder();
    let app = events_from(&hub).layer(
        BackpressureLayer::new(BufferConfig::new(4))
            .observer(observer)
            .shutdown(shutdown.clone()),
    );
    let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = serve(
        app,
        shutdown.clone().trigger_after(async {
            let _ = signalled.await;
        }),
    )
    .await;

    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(stalled_get(addr, "/events").await);
    }
    let readers: Vec<_> = (0..READERS)
        .map(|_| tokio::spawn(read_to_end(addr, "/events")))
        .collect();
    // Every stream is open before the first frame.
    let mut seen = Vec::new();
    let mut opened = 0;
    while opened < READERS + STALLED {
        wait_for(&mut events, &mut seen, |s| {
            matches!(s.kind, EventKind::Opened)
        })
        .await;
        opened += 1;
    }
    // A paced producer publishes until every client that does not read has
    // dropped frames (hyper no longer polls its body: its socket is full);
    // the observer's events say when.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let producer = tokio::spawn({
        let hub = hub.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut published = 0u64;
            while published < 20_000 {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
                for _ in 0..16 {
                    hub.publish_with(|id| sse::frame(id, None, &"x".repeat(4000)));
                    published += 1;
                }
            }
            published
        }
    });
    let mut dropping = HashSet::new();
    while dropping.len() < STALLED {
        let s = guard("the stalled clients to drop frames", events.recv())
            .await
            .expect("the observer lives");
        if matches!(s.kind, EventKind::Dropped { .. }) {
            dropping.insert(s.id);
        }
        seen.push(s);
    }
    let _ = stop.send(());
    let published = producer.await.unwrap();

    let signalled_at = Instant::now();
    signal.send(()).unwrap();
    guard("the server's graceful shutdown", server)
        .await
        .unwrap()
        .unwrap();
    let took = signalled_at.elapsed();
    println!(
        "{READERS} readers, {STALLED} stalled, {published} frames: graceful shutdown took {took:?}"
    );

    for reader in readers {
        let (data, clean) = guard("a reader's end", reader).await.unwrap();
        assert!(clean, "a reader's body ends cleanly");
        let text = String::from_utf8(data).unwrap();
        assert!(
            text.ends_with("retry: 2000\n\n"),
            "the last frame is the hint: {:?}",
            &text[text.len().saturating_sub(80)..]
        );
    }
    for mut stream in stalled {
        guard("a stalled client's connection to close", async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    let mut closed = 0;
    while let Ok(s) = events.try_recv() {
        seen.push(s);
    }
    for s in &seen {
        if let EventKind::Closed { reason } = s.kind {
            assert_eq!(reason, CloseReason::Shutdown, "{s:?}");
            closed += 1;
        }
    }
    assert_eq!(closed, READERS + STALLED);
    assert_eq!(shutdown.open_streams(), 0);
}

/// The per-client path: a pump whose producer never ends stops at the
/// signal; the client gets what was buffered, then the end.
#[tokio::test(start_paused = true)]
async fn the_per_client_path_ends_after_what_was_buffered() {
    let shutdown = Shutdown::new();
    let (observer, mut events) = recorder();
    let registry = tower_backpressure::ClientRegistry::new();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = std::sync::Mutex::new(Some(rx));
    let svc = tower::ServiceBuilder::new()
        .layer(
            BackpressureLayer::new(BufferConfig::new(8))
                .observer((observer, registry.clone()))
                .shutdown(shutdown.clone()),
        )
        .service(tower::service_fn(move |_req: Request<()>| {
            let rx = rx.lock().unwrap().take().unwrap();
            let frames =
                futures::StreamExt::boxed(futures::stream::unfold(rx, |mut rx| async move {
                    let b = rx.recv().await?;
                    Some((Ok::<_, Infallible>(http_body::Frame::data(b)), rx))
                }));
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(header::CONTENT_TYPE, "application/x-ndjson")
                        .body(StreamBody::new(frames))
                        .unwrap(),
                )
            }
        }));
    let mut body = tower::ServiceExt::oneshot(svc, Request::new(()))
        .await
        .unwrap()
        .into_body();
    for i in 0..3 {
        tx.send(Bytes::from(format!("{i}\n"))).unwrap();
    }
    let handle = registry.handles().pop().expect("one client");
    // The pump has taken all three (it runs when this task yields).
    for _ in 0..1000 {
        if handle.stats().unwrap().pushed == 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(handle.stats().unwrap().pushed, 3);
    let mut seen = Vec::new();
    shutdown.trigger();
    tx.send(Bytes::from("late\n")).unwrap();
    let mut read = Vec::new();
    while let Some(frame) = guard("the end", body.frame()).await {
        read.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert_eq!(read, b"0\n1\n2\n");
    let closed = wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Shutdown
        }
    );
    guard("the producer to be dropped", tx.closed()).await;
}

/// The hard case: a client whose TCP window is zero is never polled again,
/// so no end of stream can reach it. Its stream and its connection are cut
/// at the end of the grace period (its `Closed` shows frames it never got),
/// and the server's graceful shutdown finishes; a reader still ends cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_window_is_zero_is_cut_at_the_end_of_the_grace() {
    const STALLED: usize = 3;
    let hub: Hub = Hub::new(HubConfig::new(64));
    let shutdown = Shutdown::new().grace(Duration::from_millis(200));
    let (observer, mut events) = recorder();
    let registry = tower_backpressure::ClientRegistry::new();
    let app = events_from(&hub).layer(
        BackpressureLayer::new(BufferConfig::new(4))
            .observer((registry.clone(), observer))
            .shutdown(shutdown.clone()),
    );
    let (addr, server) = serve(app, {
        let shutdown = shutdown.clone();
        async move { shutdown.triggered().await }
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(stalled_get(addr, "/events").await);
    }
    let mut seen = Vec::new();
    for _ in 0..STALLED {
        wait_for(&mut events, &mut seen, |s| {
            matches!(s.kind, EventKind::Opened)
        })
        .await;
    }
    let handles = registry.handles();
    assert_eq!(handles.len(), STALLED);
    // Publish 64 KiB frames until hyper has taken nothing from any of them
    // over the last 64 frames (4 MiB): their sockets are full. The short
    // pause between rounds paces the publisher (hyper gets the CPU to take
    // what it can); the evidence is the 4 MiB it did not take.
    let sent = || -> Vec<u64> { handles.iter().map(|h| h.stats().unwrap().sent).collect() };
    let mut last = sent();
    let mut quiet = 0;
    let mut rounds = 0;
    while quiet < 4 {
        rounds += 1;
        assert!(rounds < 1_000, "never stalled: {last:?}");
        for _ in 0..16 {
            hub.publish_with(|id| sse::frame(id, None, &"y".repeat(64 * 1024)));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = sent();
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    drop(handles);
    let reader = tokio::spawn(read_to_end(addr, "/events"));
    wait_for(&mut events, &mut seen, |s| {
        matches!(s.kind, EventKind::Opened)
    })
    .await;
    hub.publish_with(|id| sse::frame(id, None, "last"));

    shutdown.trigger();
    guard("the server's graceful shutdown", server)
        .await
        .unwrap()
        .unwrap();
    let (data, clean) = guard("the reader's end", reader).await.unwrap();
    assert!(clean, "the reader's body ends cleanly");
    assert!(String::from_utf8(data).unwrap().ends_with("data: last\n\n"));
    let mut cut = 0;
    while let Ok(s) = events.try_recv() {
        seen.push(s);
    }
    for s in &seen {
        if let EventKind::Closed { reason } = s.kind {
            assert_eq!(reason, CloseReason::Shutdown, "{s:?}");
            if s.stats.buffered > 0 {
                cut += 1;
            }
        }
    }
    assert_eq!(
        cut, STALLED,
        "each stalled client was cut with frames it never got"
    );
    for mut stream in stalled {
        guard("a stalled client's connection to close", async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}
