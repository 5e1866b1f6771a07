//! Observers that read back into the crate (the registry's snapshot, the
//! client's handle, the budget) on every event, with many clients of a real
//! server on a multi-threaded runtime: fast clients, stalled clients that
//! read nothing, clients that leave midway, all under one memory budget so
//! that one client's push sheds another's frames.
//!
//! What a user would notice: nothing deadlocks, every client's events come
//! in order, and everything closes: the registry ends empty and the budget
//! holds nothing.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http::{Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, service_fn};
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BufferConfig, ClientHandle, ClientId, ClientRegistry,
    EventKind, Health, MemoryBudget, PeerAddr,
};

/// The whole scenario must end well within this (a guard only).
const WATCHDOG: Duration = Duration::from_secs(30);

const FAST: usize = 20;
const STALLED: usize = 20;
const LEAVING: usize = 10;
/// Frames per response, and their size.
const FRAMES: u64 = 1500;
const SIZE: usize = 200;

/// Kills the process if `f` has not finished by `WATCHDOG`: a deadlock on
/// the runtime's workers would also stop the runtime's own timers.
fn watchdog(what: &'static str) -> std::sync::mpsc::Sender<()> {
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            finished.recv_timeout(WATCHDOG + Duration::from_secs(5))
        {
            eprintln!("deadlock: {what} did not finish in {WATCHDOG:?}");
            std::process::exit(101);
        }
    });
    done
}

/// Serves `svc` over HTTP/1.1 with small write buffers, so that a client
/// that reads nothing stalls its stream soon.
async fn serve_small<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Accepted sockets inherit a small send buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener: TcpListener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let svc = tower::ServiceBuilder::new()
                .map_request(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    req
                })
                .service(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(8 * 1024)
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(svc),
                    )
                    .await;
            });
        }
    });
    addr
}

type Body = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// Says when it is dropped: the pump that held it has no push in flight.
struct Gone(tokio::sync::mpsc::UnboundedSender<()>);

impl Drop for Gone {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// `FRAMES` events, yielding to the runtime every few.
fn stream(gone: Gone) -> Body {
    let frames = futures::stream::iter(0..FRAMES).then(move |seq| {
        let _keep = &gone;
        async move {
            if seq % 16 == 0 {
                tokio::task::yield_now().await;
            }
            Ok(Frame::data(sse_event(seq, SIZE)))
        }
    });
    StreamBody::new(frames.boxed())
}

/// What the reentrant observer saw, per client, in delivery order.
#[derive(Default)]
struct Seen {
    events: Mutex<HashMap<ClientId, Vec<(EventKind, tower_backpressure::BufferStats)>>>,
    handles: Mutex<HashMap<ClientId, ClientHandle>>,
    problems: Mutex<Vec<String>>,
    reads: AtomicU64,
    /// One message per `Closed` delivered.
    closed: Mutex<Option<tokio::sync::mpsc::UnboundedSender<ClientId>>>,
}

#[derive(Clone)]
struct Recorder {
    seen: Arc<Seen>,
    registry: ClientRegistry,
    budget: MemoryBudget,
    /// The observer hears every event twice: before the registry (this
    /// one records the events) and after it (this one says when `Closed`
    /// went through).
    records: bool,
}

impl tower_backpressure::BackpressureObserver for Recorder {
    fn on_event(&self, e: &BackpressureEvent<'_>) {
        // Read back into the crate, on every event, from whatever thread
        // delivers it.
        let snapshot = self.registry.snapshot();
        let budget = self.budget.stats();
        let handle = self
            .seen
            .handles
            .lock()
            .unwrap()
            .get(&e.client.id())
            .cloned();
        let mut reads = snapshot.clients.len() as u64 + budget.clients as u64;
        match handle {
            Some(handle) => {
                let stats = handle.stats();
                let health = handle.health();
                let _ = handle.idle();
                reads += 1;
                if stats.is_none() {
                    self.problem(format!("{:?}: the handle has no stats", e.kind));
                }
                if let EventKind::Closed { reason } = e.kind {
                    if health != Health::Closed(reason) {
                        self.problem(format!("Closed({reason:?}) while health is {health:?}"));
                    }
                }
            }
            None => self.problem(format!("{:?} for a client the service never saw", e.kind)),
        }
        if let Some(r) = self.registry.get(e.client.id()) {
            let _ = r.stats();
        }
        self.seen.reads.fetch_add(reads, Ordering::Relaxed);
        if self.records {
            self.seen
                .events
                .lock()
                .unwrap()
                .entry(e.client.id())
                .or_default()
                .push((e.kind, e.stats));
        } else if let EventKind::Closed { .. } = e.kind {
            // After the registry heard it.
            if let Some(tx) = &*self.seen.closed.lock().unwrap() {
                let _ = tx.send(e.client.id());
            }
        }
    }
}

impl Recorder {
    fn problem(&self, p: String) {
        self.seen.problems.lock().unwrap().push(p);
    }
}

/// One client's events: `Opened` first, `Pressure`/`Recovered` alternating,
/// `Closed` once and last, counters never going back.
fn check_client(
    id: ClientId,
    events: &[(EventKind, tower_backpressure::BufferStats)],
) -> Result<(), String> {
    let kinds: Vec<EventKind> = events.iter().map(|(k, _)| *k).collect();
    if kinds.first() != Some(&EventKind::Opened) {
        return Err(format!("client {id}: first event not Opened: {kinds:?}"));
    }
    let closes = kinds
        .iter()
        .filter(|k| matches!(k, EventKind::Closed { .. }))
        .count();
    if closes != 1 || !matches!(kinds.last(), Some(EventKind::Closed { .. })) {
        return Err(format!("client {id}: Closed not once and last: {kinds:?}"));
    }
    let mut pressure = false;
    for k in &kinds {
        match k {
            EventKind::Pressure if pressure => {
                return Err(format!("client {id}: Pressure twice: {kinds:?}"));
            }
            EventKind::Recovered if !pressure => {
                return Err(format!(
                    "client {id}: Recovered without Pressure: {kinds:?}"
                ));
            }
            EventKind::Pressure | EventKind::Recovered => pressure = !pressure,
            _ => {}
        }
    }
    for w in events.windows(2) {
        let (a, b) = (&w[0].1, &w[1].1);
        if b.pushed < a.pushed || b.sent < a.sent || b.dropped < a.dropped {
            return Err(format!(
                "client {id}: events out of order: {:?} {a:?} then {:?} {b:?}",
                w[0].0, w[1].0
            ));
        }
    }
    let (count, _) = events.iter().fold((0, 0), |(c, b), (k, _)| match k {
        EventKind::Dropped { count, bytes } => (c + count, b + bytes),
        _ => (c, b),
    });
    let last = events.last().unwrap().1;
    if count != last.dropped {
        return Err(format!(
            "client {id}: Dropped events add up to {count}, Closed says {}",
            last.dropped
        ));
    }
    Ok(())
}

async fn open(addr: SocketAddr, recv_buffer: Option<u32>) -> (common::Client, Response<Incoming>) {
    let mut client = connect(addr, recv_buffer).await;
    let response = get(&mut client, "/events").await;
    assert_eq!(response.status(), 200);
    (client, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn observers_that_read_the_registry_handles_and_budget_never_deadlock() {
    let done = watchdog("the reentrancy scenario");
    let registry = ClientRegistry::new();
    let budget = MemoryBudget::new(256 * 1024);
    let seen = Arc::new(Seen::default());
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    *seen.closed.lock().unwrap() = Some(closed_tx);
    let recorder = |records| Recorder {
        seen: seen.clone(),
        registry: registry.clone(),
        budget: budget.clone(),
        records,
    };
    let observer = (recorder(true), (registry.clone(), recorder(false)));
    let layer = BackpressureLayer::new(
        BufferConfig::new(64)
            .with_max_bytes(32 * 1024)
            .with_threshold(0.5),
    )
    .observer(observer)
    .memory_budget(budget.clone());
    let handles = seen.clone();
    let (gone_tx, mut gone) = tokio::sync::mpsc::unbounded_channel();
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |req: Request<Incoming>| {
                let handle = req.extensions().get::<ClientHandle>().cloned().unwrap();
                handles
                    .handles
                    .lock()
                    .unwrap()
                    .insert(handle.info().id(), handle);
                std::future::ready(Ok::<_, Infallible>(
                    Response::builder()
                        .header(header::CONTENT_TYPE, "text/event-stream")
                        .body(stream(Gone(gone_tx.clone())))
                        .unwrap(),
                ))
            }));

    let scenario = async {
        let addr = serve_small(svc).await;
        let mut tasks = tokio::task::JoinSet::new();
        // Stalled clients connect first and read nothing.
        let mut stalled = Vec::new();
        for _ in 0..STALLED {
            stalled.push(open(addr, Some(4096)).await);
        }
        for i in 0..FAST + LEAVING {
            tasks.spawn(async move {
                let (client, response) = open(addr, None).await;
                if i < FAST {
                    // Reads everything: the newest frame arrives last.
                    let read = read_all(response.into_body()).await;
                    let ids = sse_ids(&read.data);
                    assert_eq!(ids.last(), Some(&(FRAMES - 1)), "fast client {i}");
                    assert!(
                        ids.windows(2).all(|w| w[0] < w[1]),
                        "fast client {i}: order"
                    );
                } else {
                    // Reads a few frames, then leaves.
                    let mut body = response.into_body();
                    for _ in 0..5 {
                        if guard("a frame", body.frame()).await.is_none() {
                            break;
                        }
                    }
                    drop(body);
                    client.conn.abort();
                }
                drop(client);
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        // The stalled clients leave.
        for (client, response) in stalled {
            drop(response);
            client.conn.abort();
            drop(client);
        }
        // Every stream closes.
        let all: Vec<ClientHandle> = seen.handles.lock().unwrap().values().cloned().collect();
        assert_eq!(all.len(), FAST + STALLED + LEAVING);
        for mut handle in all {
            while !matches!(handle.health(), Health::Closed(_)) {
                handle.changed().await;
            }
        }
        // ... and its `Closed` reaches the observers (delivered after the
        // health changed, from whichever thread closed it).
        for _ in 0..FAST + STALLED + LEAVING {
            closed.recv().await.unwrap();
        }
        // ... and its pump has stopped (no push in flight).
        for _ in 0..FAST + STALLED + LEAVING {
            gone.recv().await.unwrap();
        }
    };
    tokio::time::timeout(WATCHDOG, scenario)
        .await
        .expect("deadlock: the clients did not all close in time");
    let _ = done.send(());

    let problems = seen.problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "{problems:?}");
    let events = seen.events.lock().unwrap();
    assert_eq!(events.len(), FAST + STALLED + LEAVING);
    for (id, events) in events.iter() {
        check_client(*id, events).unwrap();
    }
    assert!(
        events.values().any(|e| e
            .iter()
            .any(|(k, _)| matches!(k, EventKind::Dropped { .. }))),
        "some client dropped frames"
    );
    assert!(seen.reads.load(Ordering::Relaxed) > 0);
    assert!(registry.is_empty(), "{} clients left", registry.len());
    assert_eq!(budget.used(), 0, "{:?}", budget.stats());
}
