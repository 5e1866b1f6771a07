//! Two soaks: one real server each, thousands of real connections in waves,
//! every kind of client at once, and what a user would notice checked after
//! every wave. [`soak`] soaks the per-client path (a ring and a pump per
//! client, under a shared budget); [`hub_soak`] soaks a hub's window path
//! (one shared log, a window per client), with resumes, backfills,
//! conflated frames, a panicking observer in the hub's sweep, and a
//! shutdown under load: see [The hub soak](#the-hub-soak).
//!
//! They run at once. `soak` takes about 50 s in a debug build by default
//! (45 s of waves, then the end), `hub_soak` about 20 s (14 s of waves);
//! `SOAK_SECS=600 cargo test --release --test soak -- --nocapture` runs both
//! longer. With `--nocapture` every wave prints one line: for `soak`,
//! connections, streams, frames sent and frames/s, drops, evictions,
//! pressure episodes, fast readers that lost frames, the budget's highest
//! sample, RSS; for `hub_soak`, streams, frames sent, dropped and replaced,
//! evictions, frames backfilled and lost beyond the retention.
//!
//! # The server
//!
//! hyper-util's `auto::Builder` serves HTTP/1.1 and HTTP/2 (h2c) on one
//! loopback port (`max_send_buf_size` 64 KiB, `max_concurrent_streams` 100);
//! every accepted stream is wrapped in [`Closable`] and its `Connection` goes
//! into the requests, so that evicting an HTTP/1 client closes its
//! connection. An `AtomicUsize` counts the live connection tasks. Two routes
//! share ONE [`MemoryBudget`] and ONE observer, a [`ClientRegistry`] paired
//! with a ledger that checks each client's events:
//!
//! - `/sse`: drop-oldest with [`SseGapMarker`], and a drop-window rule
//!   (`after_dropped_within`) whose threshold the producer's rate makes
//!   unreachable;
//! - `/pause`: `Overflow::Pause` (the handler's stream waits for its client)
//!   and a stall rule (`after_stall`): zero-window clients are evicted and
//!   their connections closed.
//!
//! Both forward one shared producer: a ticker that publishes the newest
//! event id at [`RATE`] events/s through a `watch`. Each handler turns the
//! ids it has not sent yet into 256-byte SSE events, from the id current when
//! its request arrived (sent as `x-first-id`); a handler that waits never
//! loses an id at the source, so every gap a client sees is the layer's.
//!
//! # The clients
//!
//! Each wave starts, on both routes: fast HTTP/1.1 readers (two requests per
//! keep-alive connection); HTTP/2 connections carrying six streams each
//! (four fast, one slow, one the client resets); slow readers;
//! stall-then-resume readers; abrupt resets (a raw socket that reads a
//! little, then closes with `SO_LINGER` 0); `HEAD` requests; and, on
//! `/pause`, zero-window clients (a raw socket with a small receive buffer
//! that sends its GET and never reads). Background streams stay open across
//! every wave: two fast HTTP/2 streams, a slow HTTP/1 reader and two clients
//! that never read on `/sse` (they keep the budget full of droppable frames,
//! so every frame of every wave is admitted by shedding), and a fast HTTP/1
//! reader on `/pause`.
//!
//! # What is checked
//!
//! - The budget: `used <= limit` at every observer event and every
//!   millisecond in between, `peak <= limit`, `used == 0` once every client
//!   has gone, and every frame the budget dropped is one a client's counters
//!   and gap markers account for. No critical frames are used, and every
//!   `/sse` ring is larger than the whole budget, so no client ever reaches
//!   its own limit: see [`budget_overshoots_when_a_full_client_sheds_its_own_frame`]
//!   for what happens when one does.
//! - Who loses frames, as counters: "no client refused while droppable bytes
//!   exist elsewhere" is checked as "the budget only takes frames from clients
//!   that had fallen behind": every client that lost frames had crossed its
//!   pressure threshold (64 frames waiting) before. A counting argument over
//!   the plan (`behind_enough_to_shed`) shows the client the budget sheds
//!   always holds more than that, whatever the timing; a refused frame (which
//!   needs no client to be behind) would show up as a loss without
//!   `Pressure`. `/pause` clients lose nothing at all. Whether a fast reader
//!   loses frames depends on whether the machine lets it keep up, so it is
//!   printed, not asserted (0 on an idle machine: a fast reader's frames wait
//!   in hyper's and the kernel's buffers, not in its ring).
//! - What each client saw: strictly increasing ids, every gap announced by
//!   one marker with its exact count before the next id (or the end); a
//!   client that read to the end got every id of its request, delivered or
//!   announced lost, exactly as the server counted them sent and dropped;
//!   `HEAD` gets no body; a client that leaves closes as `ClientGone`.
//! - The server's books: for every client, `pushed == sent + dropped +
//!   discarded` and the `Dropped` events add up to `dropped`; per client
//!   `Opened` first, `Pressure`/`Recovered` alternating, exactly one
//!   `Closed`, last; the drop-window rule never fires (the slow background
//!   reader drops some 2,000 frames/s for the whole run: a window that never
//!   expired would evict it).
//! - The registry equals the open streams: once a wave has settled (every
//!   zero-window client evicted and its connection task ended while the client
//!   still had not read a byte), the registry lists exactly the background
//!   streams, the live connection tasks are exactly the background
//!   connections, the budget has exactly the background members, and tokio's
//!   alive-task count is what it was before the first wave. After the
//!   background streams end: all zero, the alive tasks back to the baseline,
//!   and then to zero once the server stops.
//! - Zero-window clients are closed by the server: after the wave settled,
//!   their sockets read to EOF (or a reset) without any help.
//! - RSS (Linux): at the end at most [`RSS_MARGIN`] over its value after the
//!   first wave. The margin is generous on purpose: the allocator keeps
//!   freed memory in per-thread arenas and returns it lazily, so RSS moves by
//!   megabytes between waves without any leak. It is there for bulky leaks
//!   (a ring, a body or a connection with its buffers per client: tens of
//!   kilobytes times thousands of clients); a small leak of per-client state
//!   keeps a budget member, a registry entry or a task alive, which the exact
//!   counts above catch at the first wave.
//!
//! Every assertion is about counts and contents; waits are bounded guards
//! only. Timing decides one thing besides the printed numbers: a slow or
//! stall-then-resume `/pause` client may pause past the stall rule on a
//! starved machine and be evicted, which is checked as such and counted
//! ("pausing" evictions). The stall rule is 3 s; a fast reader (or the
//! fast background reader on `/pause`) would have to go unscheduled that
//! long to be evicted.
//!
//! # The hub soak
//!
//! One axum server (`axum::serve` over a [`ClosableListener`], with
//! [`ConnectionInfo`], so that the layer can close a connection) on a
//! loopback port, over ONE [`Hub`] fed by a producer task at [`HUB_RATE`]
//! events/s of [`HUB_EVENT`] bytes, with the producer's ids
//! (`publish_with_id`). The producer also keeps a history of everything it
//! published (standing in for a bus), [`AHEAD`] frames ahead of the hub, as
//! a bus is of a server it feeds. Three routes, each a
//! [`BackpressureLayer`] with [`SseGapMarker`], a classify hook that marks
//! every 5th frame `FrameClass::Replace(id % 3)` (conflated "latest price"
//! frames) and the rest droppable, one observer (a [`ClientRegistry`], the
//! ledger, and [`Panicky`]) and one [`Shutdown`] (which also closes the hub):
//!
//! - `/events`: a window of [`HUB_CAP`] frames (2 s of the producer), no
//!   timed rule: fast readers, resumers and backfills;
//! - `/slow`: a window of [`HUB_SLOW_CAP`] frames: slow readers skip, and
//!   their `Replace` frames are conflated;
//! - `/stall`: an `after_stall` rule: only clients that never read.
//!
//! Each handler answers [`Hub::response`] from the client's `Last-Event-ID`
//! (else from the newest frame, sent as `x-first-id`), with `?n=` frames at
//! most, and with `?backfill=1` a [`HubResponse::backfill`](tower_backpressure::hub::HubResponse::backfill)
//! of the history after the `Last-Event-ID`.
//!
//! A wave first opens a client whose observer panics in the hub's sweep
//! ([`Panicky`]: at its first `Pressure` or `Dropped` heard outside its
//! connection's task) and clients that never read, all on `/stall`; once the
//! panic has happened, nothing attaches to the hub until every one of them
//! is evicted as stalled (a sweep that died with the panic would only be
//! restarted by the next client). Then, at once: fast readers (two requests
//! of [`HUB_FAST_N`] frames per connection), slow readers on `/slow`,
//! resumers that read a little, leave, and resume with their
//! `Last-Event-ID` at once (within the retention) or once the hub has let go
//! of their next id (beyond it), backfill clients that resume from before
//! the hub's oldest frame and read past the backfill's end, and more
//! clients that never read. Background streams stay open across every wave:
//! two fast readers on `/events`, a slow reader and two clients that never
//! read on `/slow`. At the end, more fast, slow and never-reading clients
//! join them and, while the producer publishes, the shutdown is triggered.
//!
//! What is checked:
//!
//! - What each client saw ([`Check::hub`]): whole SSE events with strictly
//!   increasing ids (never a duplicate, never backwards), every gap
//!   announced by one marker before the next id, counting every droppable
//!   id missing and at most the `Replace` ids missing (the difference:
//!   frames superseded by a newer one of their key, never more than the
//!   server counted `replaced`). Fast readers, resumers within the
//!   retention and backfills: every id of their request, none missing; a
//!   resumer beyond the retention: exactly one gap, then every id; a
//!   backfill: each id once, in order, across the backfill's end.
//! - The server's books: per client `Opened` first, `Pressure`/`Recovered`
//!   alternating, `Dropped` events adding up to `dropped`, exactly one
//!   `Closed`, last, with the reason the client's kind calls for (`Completed`
//!   for a limited request, `ClientGone` for a client that left,
//!   `Evicted(Stalled)` for one that never read on `/stall`); every
//!   backlog within its window (kept `Replace` frames included) unless
//!   the client resumed and replays.
//! - One panic per wave, survived: the clients opened before it are evicted
//!   with nothing attaching after it, and their connections closed (their
//!   sockets read to EOF).
//! - After every wave: the registry and `Hub::subscribers` list exactly the
//!   background streams, and tokio's alive-task count is what it was with
//!   them alone.
//! - The shutdown under load: axum's graceful shutdown finishes (a guard,
//!   not a timed assertion; it prints how long it took); fast readers see a
//!   clean end after whole events and the `retry:` hint, having lost
//!   nothing; every client open at the signal closes `Shutdown`; then the
//!   registry is empty, the hub has no subscriber, the ledger no open
//!   client, and once the producer stops the alive tasks are back to the
//!   count before the server started.
//! - Over the run: frames were replaced, and clients saw them superseded.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use bytes::{Bytes, BytesMut};
use common::guard;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tower_backpressure::conn::{Closable, ClosableListener, ConnectionInfo};
use tower_backpressure::hub::{Hub, HubBody, HubConfig, sse};
use tower_backpressure::shutdown::Shutdown;
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BackpressureObserver, BufferConfig, BufferStats,
    ClientId, ClientRegistry, CloseReason, EventKind, EvictReason, Eviction, FrameClass,
    MemoryBudget, Overflow, PeerAddr, SseGapMarker,
};

/// Events per second from the shared producer.
const RATE: u64 = 3_000;
/// How often the producer publishes (a batch of `RATE × TICK` ids).
const TICK: Duration = Duration::from_millis(5);
/// Bytes per SSE event.
const EVENT: usize = 256;
/// The budget shared by both routes.
const BUDGET: usize = 8 << 20;
/// `/sse` ring: 4 MiB of events, more than the whole budget, so that the
/// budget is the limit that binds and no client reaches its own.
const SSE_CAPACITY: usize = 16 * 1024;
/// `/sse` pressure from 64 frames (16 KiB) waiting: small enough that any
/// client the budget sheds has crossed it (see `behind_enough_to_shed`).
const SSE_PRESSURE: usize = 64;
/// `/pause` ring: 8 KiB per client, so that paused clients (which the
/// budget cannot shed) hold a small part of it.
const PAUSE_CAPACITY: usize = 32;
/// `/pause` evicts a client that took nothing for this long while frames
/// wait.
const STALL: Duration = Duration::from_secs(3);
/// `/sse`'s drop-window rule: more than `RATE × 10 s` drops within 5 s. The
/// producer publishes at most `RATE × 5 s` ids in 5 s (plus what a late
/// pump catches up on), so the rule must never fire; if its window never
/// expired, the background slow reader (which drops about 2,000 frames/s
/// for the whole run) would be evicted after some 15 s.
const WINDOW: Duration = Duration::from_secs(5);
const WINDOW_MAX_DROPS: u64 = RATE * 10;
/// See the module docs.
const RSS_MARGIN: u64 = 64 << 20;
/// Seconds of waves by default (`SOAK_SECS` overrides).
const DEFAULT_SECS: u64 = 45;
/// How long a wave may take to settle before the test fails (a guard).
const SETTLE: Duration = Duration::from_secs(30);

// ----- the producer and the server -----

/// An SSE event of exactly [`EVENT`] bytes: `id: <10 digits>\ndata: x…\n\n`.
fn event(id: u64) -> Bytes {
    sized_event(id, EVENT)
}

/// An SSE event of exactly `size` bytes (at most 1 KiB), as [`event`].
fn sized_event(id: u64, size: usize) -> Bytes {
    static PAD: [u8; 1024] = [b'x'; 1024];
    let mut b = BytesMut::with_capacity(size);
    b.extend_from_slice(format!("id: {id:010}\ndata: ").as_bytes());
    let pad = size - b.len() - 2;
    b.extend_from_slice(&PAD[..pad]);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

/// The events `first..end` (endless without `end`), each as soon as the
/// producer has published its id.
fn ticks(
    latest: watch::Receiver<u64>,
    first: u64,
    end: Option<u64>,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures::stream::unfold((latest, first), move |(mut rx, next)| async move {
        if end.is_some_and(|end| next >= end) {
            return None;
        }
        while *rx.borrow_and_update() < next {
            // The producer stopped: the end of the soak.
            rx.changed().await.ok()?;
        }
        Some((Ok(event(next)), (rx, next + 1)))
    })
}

fn query(uri: &Uri, key: &str) -> Option<u64> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// `GET /sse` and `GET /pause`: `?n=` events (endless without), `?c=` the
/// client's tag (read by the ledger).
async fn events(State(latest): State<watch::Receiver<u64>>, uri: Uri) -> Response<Body> {
    let first = *latest.borrow() + 1;
    let end = query(&uri, "n").map(|n| first + n);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header("x-first-id", first)
        .body(Body::from_stream(ticks(latest, first, end)))
        .unwrap()
}

/// What one client's stream ended as, from the server's side.
#[derive(Debug, Clone, Copy)]
struct Closed {
    pause: bool,
    reason: CloseReason,
    stats: BufferStats,
    /// The sum of its `Dropped` events.
    reported: u64,
    episodes: u64,
}

struct Live {
    tag: u64,
    pause: bool,
    pressure: bool,
    reported: u64,
    episodes: u64,
}

#[derive(Default)]
struct Ledger {
    open: HashMap<ClientId, Live>,
    closed: HashMap<u64, Closed>,
    gone: HashSet<ClientId>,
    violations: Vec<String>,
    violation_count: usize,
}

impl Ledger {
    fn violation(&mut self, what: String) {
        self.violation_count += 1;
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }
}

/// The counting observer: checks every client's event order and the budget
/// at every event, and keeps what each client ended as, by tag.
#[derive(Clone)]
struct Books {
    ledger: Arc<Mutex<Ledger>>,
    /// Checked at every event, if the server has one.
    budget: Option<MemoryBudget>,
}

impl Books {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }
}

impl BackpressureObserver for Books {
    fn on_event(&self, e: &BackpressureEvent<'_>) {
        let used = self.budget.as_ref().map(|b| (b.used(), b.limit()));
        let mut l = self.ledger();
        if let Some((used, limit)) = used.filter(|(used, limit)| used > limit) {
            l.violation(format!("budget at {used} bytes, over {limit}, at {e:?}"));
        }
        let id = e.client.id();
        if l.gone.contains(&id) {
            l.violation(format!("{:?} after Closed (client {id})", e.kind));
            return;
        }
        if e.kind == EventKind::Opened {
            let live = Live {
                tag: query(e.client.uri(), "c").unwrap_or(0),
                pause: e.client.path() == "/pause",
                pressure: false,
                reported: 0,
                episodes: 0,
            };
            if l.open.insert(id, live).is_some() {
                l.violation(format!("a second Opened (client {id})"));
            }
            return;
        }
        let Some(live) = l.open.get_mut(&id) else {
            l.violation(format!("{:?} before Opened (client {id})", e.kind));
            return;
        };
        let problem = match e.kind {
            EventKind::Pressure if live.pressure => Some("Pressure twice"),
            EventKind::Pressure => {
                live.pressure = true;
                live.episodes += 1;
                None
            }
            EventKind::Recovered if !live.pressure => Some("Recovered without Pressure"),
            EventKind::Recovered => {
                live.pressure = false;
                None
            }
            EventKind::Dropped { count: 0, .. } => Some("Dropped of 0 frames"),
            EventKind::Dropped { count, .. } => {
                live.reported += count;
                None
            }
            EventKind::Closed { reason } => {
                let live = l.open.remove(&id).expect("open");
                l.gone.insert(id);
                let closed = Closed {
                    pause: live.pause,
                    reason,
                    stats: e.stats,
                    reported: live.reported,
                    episodes: live.episodes,
                };
                if l.closed.insert(live.tag, closed).is_some() {
                    l.violation(format!("two clients tagged {}", live.tag));
                }
                None
            }
            _ => Some("an unknown event"),
        };
        if let Some(problem) = problem {
            l.violation(format!("{problem} (client {id})"));
        }
    }
}

struct Server {
    addr: SocketAddr,
    budget: MemoryBudget,
    registry: ClientRegistry,
    books: Books,
    /// Live connection tasks.
    connections: Arc<AtomicUsize>,
    /// The most bytes the sampler saw in the budget since the last reset.
    sampled_max: Arc<AtomicUsize>,
    /// Samples over the limit.
    sampled_over: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Decrements the live-connection count when a connection task ends.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn server() -> Server {
    let budget = MemoryBudget::new(BUDGET);
    let registry = ClientRegistry::new().with_budget(budget.clone());
    let books = Books {
        ledger: Arc::default(),
        budget: Some(budget.clone()),
    };
    let observer = (registry.clone(), books.clone());
    let sse = BackpressureLayer::new(
        BufferConfig::new(SSE_CAPACITY)
            .with_threshold(SSE_PRESSURE as f64 / SSE_CAPACITY as f64)
            .with_eviction(Eviction::none().after_dropped_within(WINDOW_MAX_DROPS, WINDOW)),
    )
    .observer(observer.clone())
    .gap_marker(SseGapMarker::new())
    .memory_budget(budget.clone());
    let pause = BackpressureLayer::new(
        BufferConfig::new(PAUSE_CAPACITY)
            .with_overflow(Overflow::Pause)
            .with_eviction(Eviction::none().after_stall(STALL)),
    )
    .observer(observer)
    .gap_marker(SseGapMarker::new())
    .memory_budget(budget.clone());

    let (stop, _) = watch::channel(false);
    let (publish, latest) = watch::channel(0u64);
    let app = Router::new()
        .route("/sse", get(events).layer(sse))
        .route("/pause", get(events).layer(pause))
        .with_state(latest);

    // The producer: the newest id, `RATE` per second since it started.
    let mut stopped = stop.subscribe();
    let producer = tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let due = (start.elapsed().as_micros() as u64) * RATE / 1_000_000;
                    publish.send_if_modified(|id| {
                        let newer = due > *id;
                        *id = (*id).max(due);
                        newer
                    });
                }
                _ = stopped.changed() => return,
            }
        }
    });

    // Budget samples between events.
    let sampled_max = Arc::new(AtomicUsize::new(0));
    let sampled_over = Arc::new(AtomicUsize::new(0));
    let mut stopped = stop.subscribe();
    let sampler = tokio::spawn({
        let (budget, max, over) = (budget.clone(), sampled_max.clone(), sampled_over.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let used = budget.used();
                        max.fetch_max(used, Ordering::AcqRel);
                        if used > budget.limit() {
                            over.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    _ = stopped.changed() => return,
                }
            }
        }
    });

    // Accepted sockets inherit a small send buffer: a client that stops
    // reading reaches the layer after ~200 KiB rather than megabytes.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let mut stopped = stop.subscribe();
    let accept = tokio::spawn({
        let connections = connections.clone();
        async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().max_buf_size(64 * 1024);
            builder
                .http2()
                .max_send_buf_size(64 * 1024)
                .max_concurrent_streams(100);
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => accepted.expect("accept"),
                    _ = stopped.changed() => return,
                };
                let stream = Closable::new(stream);
                let connection = stream.connection();
                let svc = tower::ServiceBuilder::new()
                    .map_request(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(PeerAddr(peer));
                        req.extensions_mut().insert(connection.clone());
                        req
                    })
                    .service(app.clone());
                let conn = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .into_owned();
                connections.fetch_add(1, Ordering::AcqRel);
                let counted = Counted(connections.clone());
                tokio::spawn(async move {
                    let _counted = counted;
                    let _ = conn.await;
                });
            }
        }
    });

    Server {
        addr,
        budget,
        registry,
        books,
        connections,
        sampled_max,
        sampled_over,
        stop,
        tasks: vec![producer, sampler, accept],
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Resident set size in bytes (Linux), from `/proc/self/status`'s `VmRSS`
/// (in kB, whatever the page size).
fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Server {
    /// Waits (bounded: a guard) until exactly `streams` buffered streams and
    /// `connections` connection tasks are left, the budget has exactly
    /// `streams` members, and `tasks` tokio tasks are alive.
    async fn settle(&self, what: &str, streams: usize, connections: usize, tasks: usize) {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let now = (
                self.registry.len(),
                self.connections.load(Ordering::Acquire),
                self.budget.stats().clients,
                alive_tasks(),
            );
            if now == (streams, connections, streams, tasks) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} did not settle: (registry, connection tasks, budget members, alive tasks) \
                 = {now:?}, expected {:?}; open: {}",
                (streams, connections, streams, tasks),
                self.registry.snapshot().to_json(),
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ----- the clients -----

static TAGS: AtomicU64 = AtomicU64::new(1);

fn tag() -> u64 {
    TAGS.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Sse,
    Pause,
    /// The hub soak's `/events`.
    Hub,
    /// The hub soak's `/slow`.
    HubSlow,
    /// The hub soak's `/stall`.
    HubStall,
}

impl Route {
    fn path(self, tag: u64, n: Option<u64>) -> String {
        let route = match self {
            Route::Sse => "/sse",
            Route::Pause => "/pause",
            Route::Hub => "/events",
            Route::HubSlow => "/slow",
            Route::HubStall => "/stall",
        };
        match n {
            Some(n) => format!("{route}?c={tag}&n={n}"),
            None => format!("{route}?c={tag}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Fast,
    Slow,
    StallResume,
    ZeroWindow,
    Reset,
    Head,
    /// Open across every wave, reading as fast as it comes.
    BackgroundFast,
    /// Open across every wave, reading slowly.
    BackgroundSlow,
    /// Open across every wave, never reading: holds its share of the budget.
    BackgroundStuck,
    /// Hub soak: the first request of a resumer, which reads a little and
    /// leaves.
    Leave,
    /// Hub soak: a resumer's second request, within the hub's retention.
    Resume,
    /// Hub soak: a resumer's second request, beyond the hub's retention.
    ResumeBeyond,
    /// Hub soak: a resume served with a backfill from the history.
    Backfill,
    /// Hub soak: a client that never reads, whose observer panics in the
    /// sweep.
    Panic,
}

/// How a client reads its body.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// As fast as it comes.
    Fast,
    /// `chunk` bytes, then a pause, again and again.
    Slow { chunk: usize, pause: Duration },
    /// `before` bytes, one stall, then as fast as it comes.
    StallResume { before: usize, stall: Duration },
    /// `after` bytes, then the client drops the body (an HTTP/2 reset).
    DropAfter { after: usize },
}

/// Checks, as they arrive, the ids and gap markers of one stream whose
/// handler sent `first..end`: ids strictly increase, and every gap is
/// announced by exactly one marker with the exact count before the next id.
///
/// On the hub soak's routes ([`Check::hub`]) a missing frame of the
/// classify hook's `Replace` class ([`is_replace`]) may also have been
/// superseded by a newer one of its key, which is not a loss: a gap's
/// marker counts at least every droppable id missing and at most every id
/// missing, and the difference is counted `superseded`. The stream may end
/// with the shutdown's `retry:` hint, after which nothing may come.
#[derive(Debug, Default)]
struct Check {
    next: u64,
    end: Option<u64>,
    /// Bytes per event.
    size: usize,
    /// Missing `Replace` frames may have been superseded (the hub soak).
    conflated: bool,
    announced: Option<u64>,
    delivered: u64,
    lost: u64,
    /// Missing ids no marker announced: superseded `Replace` frames.
    superseded: u64,
    markers: u64,
    /// The `retry:` hint's milliseconds, once it came.
    retry: Option<u64>,
    problems: Vec<String>,
    buf: Vec<u8>,
}

impl Check {
    fn new(first: u64, end: Option<u64>) -> Self {
        Self {
            next: first,
            end,
            size: EVENT,
            ..Self::default()
        }
    }

    /// A stream of the hub soak, from id `first` on.
    fn hub(first: u64) -> Self {
        Self {
            next: first,
            size: HUB_EVENT,
            conflated: true,
            ..Self::default()
        }
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < 5 {
            self.problems.push(what);
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            let size = self.size;
            if rest.starts_with(b"id: ") {
                if rest.len() < size {
                    break;
                }
                let id = std::str::from_utf8(&rest[4..14])
                    .ok()
                    .and_then(|s| s.parse().ok());
                match (id, rest[size - 2..size] == *b"\n\n") {
                    (Some(id), true) => self.id(id),
                    _ => {
                        let what = format!("not an event: {:?}", String::from_utf8_lossy(rest));
                        self.problem(what);
                        self.buf.clear();
                        return;
                    }
                }
                at += size;
            } else if let Some(end) = rest.windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8_lossy(&rest[..end]).into_owned();
                let retry = text.strip_prefix("retry: ").and_then(|n| n.parse().ok());
                match text
                    .strip_prefix("event: lagged\ndata: {\"dropped\":")
                    .and_then(|n| n.strip_suffix('}'))
                    .and_then(|n| n.parse().ok())
                {
                    _ if self.retry.is_some() => {
                        self.problem(format!("{text:?} after the retry hint"));
                    }
                    Some(n) => self.lagged(n),
                    None if retry.is_some() => self.retry = retry,
                    None => self.problem(format!("not an event: {text:?}")),
                }
                at += end + 2;
            } else {
                break;
            }
        }
        self.buf.drain(..at);
    }

    fn id(&mut self, id: u64) {
        if self.retry.is_some() {
            self.problem(format!("id {id} after the retry hint"));
        }
        if id < self.next || self.end.is_some_and(|end| id >= end) {
            self.problem(format!(
                "id {id} out of order (expected from {})",
                self.next
            ));
            return;
        }
        let gap = id - self.next;
        let announced = self.announced.take().unwrap_or(0);
        if self.conflated {
            // Droppable ids must be announced; `Replace` ids may have been
            // superseded instead.
            let droppable = gap - replace_ids(self.next, id);
            if announced < droppable || announced > gap {
                self.problem(format!(
                    "{gap} ids missing before id {id} ({droppable} droppable), \
                     {announced} announced"
                ));
            } else {
                self.superseded += gap - announced;
            }
        } else if announced != gap {
            self.problem(format!(
                "{gap} frames lost before id {id}, {announced} announced"
            ));
        }
        self.next = id + 1;
        self.delivered += 1;
    }

    fn lagged(&mut self, n: u64) {
        if self.announced.is_some() {
            self.problem("two gap markers in a row".into());
        }
        if n == 0 {
            self.problem("a gap marker of 0 frames".into());
        }
        self.announced = Some(n);
        self.lost += n;
        self.markers += 1;
    }

    /// The stream ended cleanly: a gap at its end was announced before it.
    fn finish(&mut self) {
        if !self.buf.is_empty() {
            self.problem(format!(
                "{} bytes of a partial event at the end",
                self.buf.len()
            ));
        }
        if let Some(end) = self.end {
            let announced = self.announced.take().unwrap_or(0);
            if announced != end - self.next {
                self.problem(format!(
                    "{} frames lost at the end, {announced} announced",
                    end - self.next
                ));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The body ended.
    Clean,
    /// The body failed (the connection or stream was cut).
    Error,
    /// The client stopped reading and dropped it.
    Dropped,
}

#[derive(Debug)]
struct Outcome {
    tag: u64,
    kind: Kind,
    h2: bool,
    route: Route,
    n: Option<u64>,
    status: StatusCode,
    check: Check,
    ended: Ended,
    bytes: usize,
}

impl Outcome {
    fn new(tag: u64, kind: Kind, route: Route, n: Option<u64>) -> Self {
        Self {
            tag,
            kind,
            h2: false,
            route,
            n,
            status: StatusCode::OK,
            check: Check::default(),
            ended: Ended::Clean,
            bytes: 0,
        }
    }
}

/// Reads a response's body at `pace` (until `stop` changes, if given).
async fn read(
    response: Response<Incoming>,
    mut out: Outcome,
    pace: Pace,
    mut stop: Option<watch::Receiver<bool>>,
) -> Outcome {
    out.status = response.status();
    out.h2 = response.version() == http::Version::HTTP_2;
    let first = response
        .headers()
        .get("x-first-id")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    out.check = match out.route {
        // A hub response's limit counts frames delivered, not ids.
        Route::Hub | Route::HubSlow | Route::HubStall => Check::hub(first),
        Route::Sse | Route::Pause => Check::new(first, out.n.map(|n| first + n)),
    };
    let mut body = response.into_body();
    let (mut since_pause, mut stalled) = (0, false);
    out.ended = loop {
        let frame = match &mut stop {
            Some(stop) => tokio::select! {
                frame = body.frame() => frame,
                _ = stop.changed() => break Ended::Dropped,
            },
            None => body.frame().await,
        };
        let data = match frame {
            None => break Ended::Clean,
            Some(Err(_)) => break Ended::Error,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        out.check.feed(&data);
        out.bytes += data.len();
        match pace {
            Pace::Fast => {}
            Pace::Slow { chunk, pause } => {
                since_pause += data.len();
                if since_pause >= chunk {
                    since_pause = 0;
                    tokio::time::sleep(pause).await;
                }
            }
            Pace::StallResume { before, stall } => {
                if !stalled && out.bytes >= before {
                    stalled = true;
                    tokio::time::sleep(stall).await;
                }
            }
            Pace::DropAfter { after } => {
                if out.bytes >= after {
                    break Ended::Dropped;
                }
            }
        }
    };
    if out.ended == Ended::Clean {
        out.check.finish();
    }
    out
}

type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn h1(addr: SocketAddr, recv_buffer: Option<u32>) -> (H1Sender, JoinHandle<()>) {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, conn)
}

fn request(method: Method, uri: String) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "soak")
        .body(Empty::new())
        .unwrap()
}

/// What an HTTP/1.1 client does: `requests` requests of `n` events (endless
/// without) one after another on one keep-alive connection, each read at
/// `pace`, from a socket with `recv_buffer` bytes of receive buffer.
#[derive(Debug, Clone, Copy)]
struct H1 {
    route: Route,
    kind: Kind,
    n: Option<u64>,
    pace: Pace,
    recv_buffer: Option<u32>,
    requests: usize,
}

impl H1 {
    fn new(route: Route, kind: Kind, n: Option<u64>, pace: Pace) -> Self {
        Self {
            route,
            kind,
            n,
            pace,
            recv_buffer: None,
            requests: 1,
        }
    }

    fn recv_buffer(mut self, bytes: u32) -> Self {
        self.recv_buffer = Some(bytes);
        self
    }

    fn requests(mut self, n: usize) -> Self {
        self.requests = n;
        self
    }
}

/// Runs an [`H1`] client (until `stop` changes, if given).
async fn h1_client(
    addr: SocketAddr,
    client: H1,
    stop: Option<watch::Receiver<bool>>,
) -> Vec<Outcome> {
    let H1 {
        route,
        kind,
        n,
        pace,
        recv_buffer,
        requests,
    } = client;
    let (mut sender, conn) = h1(addr, recv_buffer).await;
    let mut outcomes = Vec::new();
    for _ in 0..requests {
        let tag = tag();
        if sender.ready().await.is_err() {
            break;
        }
        let response = sender
            .send_request(request(Method::GET, route.path(tag, n)))
            .await
            .unwrap();
        let out = read(
            response,
            Outcome::new(tag, kind, route, n),
            pace,
            stop.clone(),
        )
        .await;
        let clean = out.ended == Ended::Clean;
        outcomes.push(out);
        if !clean {
            break;
        }
    }
    drop(sender);
    let _ = conn.await;
    outcomes
}

/// `HEAD` over HTTP/1.1: headers, no body.
async fn head(addr: SocketAddr, route: Route) -> Vec<Outcome> {
    let (mut sender, conn) = h1(addr, None).await;
    let tag = tag();
    let mut out = Outcome::new(tag, Kind::Head, route, None);
    let response = sender
        .send_request(request(Method::HEAD, route.path(tag, None)))
        .await
        .unwrap();
    out.status = response.status();
    out.bytes = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len();
    drop(sender);
    let _ = conn.await;
    vec![out]
}

/// One HTTP/2 connection carrying one stream per entry of `streams`, all at
/// once.
async fn h2_client(
    addr: SocketAddr,
    route: Route,
    streams: Vec<(Kind, Option<u64>, Pace)>,
    stop: Option<watch::Receiver<bool>>,
) -> Vec<Outcome> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut set = JoinSet::new();
    for (kind, n, pace) in streams {
        let mut sender = sender.clone();
        let stop = stop.clone();
        set.spawn(async move {
            let tag = tag();
            sender.ready().await.unwrap();
            let uri = format!("http://{addr}{}", route.path(tag, n));
            let response = sender
                .send_request(request(Method::GET, uri))
                .await
                .unwrap();
            read(response, Outcome::new(tag, kind, route, n), pace, stop).await
        });
    }
    drop(sender);
    let outcomes = set.join_all().await;
    let _ = conn.await;
    outcomes
}

/// Sends a GET over a raw socket with a small receive buffer.
async fn raw_get(addr: SocketAddr, route: Route, tag: u64) -> TcpStream {
    raw_get_path(addr, &route.path(tag, None)).await
}

/// Sends a GET of `path` over a raw socket with a small receive buffer.
async fn raw_get_path(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: soak\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream
}

/// Reads `after` bytes, then resets the connection (`SO_LINGER` 0).
async fn reset(addr: SocketAddr, route: Route, after: usize) -> Vec<Outcome> {
    let tag = tag();
    let mut stream = raw_get(addr, route, tag).await;
    let mut out = Outcome::new(tag, Kind::Reset, route, None);
    let mut buf = vec![0; 16 * 1024];
    while out.bytes < after {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.bytes += n,
        }
    }
    stream.set_zero_linger().unwrap();
    drop(stream);
    out.ended = Ended::Dropped;
    vec![out]
}

/// Reads what the server left, then expects the end of the connection (EOF
/// or a reset).
async fn read_to_end(mut stream: TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return head,
            Ok(n) if head.len() < 64 => head.extend_from_slice(&buf[..n.min(64)]),
            Ok(_) => {}
        }
    }
}

// ----- a wave -----

/// How many clients of each kind a wave starts, all at once.
struct Plan {
    /// HTTP/1.1 connections of two fast requests each, per route.
    fast_h1: [usize; 2],
    /// HTTP/2 connections per route; each carries the streams below.
    h2: [usize; 2],
    slow: [usize; 2],
    stall_resume: [usize; 2],
    zero_window: usize,
    reset: [usize; 2],
    head: [usize; 2],
}

const PLAN: Plan = Plan {
    fast_h1: [40, 16],
    h2: [6, 3],
    slow: [12, 8],
    stall_resume: [8, 8],
    zero_window: 16,
    reset: [25, 25],
    head: [40, 40],
};

/// Events per fast request (0.2 s of the producer).
const FAST_N: u64 = RATE / 5;
/// Events per slow or stall-then-resume request.
const SLOW_N: u64 = RATE / 2;
/// About half the producer's rate.
const SLOW: Pace = Pace::Slow {
    chunk: 8192,
    pause: Duration::from_millis(20),
};
/// On `/sse`: a stall long enough for the client's backlog to outgrow the
/// background clients' shares of the budget (so that it loses frames, each
/// gap announced), for a request three times as long as a slow one's.
const STALL_RESUME_SSE: (Pace, u64) = (
    Pace::StallResume {
        before: 8192,
        stall: Duration::from_millis(1500),
    },
    RATE * 3 / 2,
);
/// On `/pause`: a stall well within the stall rule's [`STALL`].
const STALL_RESUME_PAUSE: (Pace, u64) = (
    Pace::StallResume {
        before: 8192,
        stall: Duration::from_millis(400),
    },
    SLOW_N,
);

/// Streams per HTTP/2 connection of a wave: four fast, a slow one, and one
/// the client resets.
const H2_STREAMS: usize = 6;

fn h2_streams() -> Vec<(Kind, Option<u64>, Pace)> {
    let mut streams = vec![(Kind::Fast, Some(FAST_N), Pace::Fast); 4];
    streams.push((Kind::Slow, Some(SLOW_N), SLOW));
    streams.push((Kind::Reset, None, Pace::DropAfter { after: 8192 }));
    assert_eq!(streams.len(), H2_STREAMS);
    streams
}

/// What a wave did, for its summary line.
#[derive(Debug, Default)]
struct Totals {
    connections: usize,
    streams: usize,
    pushed: u64,
    sent: u64,
    dropped: u64,
    evicted: usize,
    evicted_slow: usize,
    pressure: u64,
    /// Fast readers that read to the end, and of them those that lost
    /// frames (printed, not asserted: see the module docs).
    fast: usize,
    fast_lost: usize,
}

impl Totals {
    fn add(&mut self, t: &Totals) {
        self.connections += t.connections;
        self.streams += t.streams;
        self.pushed += t.pushed;
        self.sent += t.sent;
        self.dropped += t.dropped;
        self.evicted += t.evicted;
        self.evicted_slow += t.evicted_slow;
        self.pressure += t.pressure;
        self.fast += t.fast;
        self.fast_lost += t.fast_lost;
    }
}

/// The counting argument behind "the budget only takes frames from clients
/// that had fallen behind", checked against the plan; returns the least
/// number of bytes the client the budget sheds can hold.
///
/// The budget sheds from the client holding the most droppable bytes. When
/// it sheds, the bytes held add up to about the budget (less a frame in
/// flight per worker thread); of them, `/pause` clients hold at most their
/// rings (their frames are never dropped), and the rest is spread over at
/// most every `/sse` stream open at once, so the largest holds at least
/// their average. If that is over the pressure threshold (with room for the
/// budget's lock-free view of each client being a frame behind), every
/// client the budget sheds is over its threshold at that moment, so it has
/// had a `Pressure` event: a client that never fell that far behind never
/// loses a frame, and a refusal of a frame (which needs no client to be
/// behind) shows up as a drop without one.
fn behind_enough_to_shed() -> usize {
    const WORKERS: usize = 2;
    let sse_streams = 5 // background: two fast, one slow, two stuck
        + PLAN.fast_h1[0]
        + PLAN.h2[0] * H2_STREAMS
        + PLAN.slow[0]
        + PLAN.stall_resume[0]
        + PLAN.reset[0]
        + PLAN.head[0];
    let pause_streams = 1 // background: one fast
        + PLAN.fast_h1[1]
        + PLAN.h2[1] * H2_STREAMS
        + PLAN.slow[1]
        + PLAN.stall_resume[1]
        + PLAN.zero_window
        + PLAN.reset[1]
        + PLAN.head[1];
    let pause_bytes = pause_streams * (PAUSE_CAPACITY + 1) * EVENT;
    let least = (BUDGET - pause_bytes - WORKERS * EVENT) / sse_streams;
    assert!(
        least >= 2 * SSE_PRESSURE * EVENT,
        "the plan breaks the counting argument: the client the budget sheds may hold only \
         {least} bytes, less than twice the pressure threshold"
    );
    least
}

/// Checks each outcome against what the server's ledger says of it.
fn verify(server: &Server, outcomes: &[Outcome], totals: &mut Totals) -> Vec<String> {
    let mut failures = Vec::new();
    let mut ledger = server.books.ledger();
    for out in outcomes {
        let mut fail = |what: String| {
            if failures.len() < 20 {
                let version = if out.h2 { "HTTP/2" } else { "HTTP/1.1" };
                failures.push(format!(
                    "client {} ({:?} on {:?} over {version}): {what}",
                    out.tag, out.kind, out.route
                ));
            }
        };
        let Some(closed) = ledger.closed.remove(&out.tag) else {
            fail("no Closed event".into());
            continue;
        };
        let (s, c) = (closed.stats, &out.check);
        totals.streams += 1;
        totals.pushed += s.pushed;
        totals.sent += s.sent;
        totals.dropped += s.dropped;
        totals.pressure += closed.episodes;

        // The server's books, whatever the client did.
        if closed.pause != (out.route == Route::Pause) {
            fail("the ledger has it on the other route".into());
        }
        if s.pushed != s.sent + s.dropped + s.buffered as u64 {
            fail(format!("pushed != sent + dropped + discarded: {s:?}"));
        }
        if closed.reported != s.dropped {
            fail(format!(
                "Dropped events add up to {}, stats say {}",
                closed.reported, s.dropped
            ));
        }
        match out.route {
            Route::Pause if s.dropped > 0 => {
                fail(format!("a Pause client lost {} frames", s.dropped));
            }
            // The `/sse` ring is larger than the budget: only the budget
            // drops, and only from a client that had fallen behind (see
            // `behind_enough_to_shed`).
            Route::Sse if s.dropped > 0 && closed.episodes == 0 => fail(format!(
                "lost {} frames without ever crossing its pressure threshold",
                s.dropped
            )),
            _ => {}
        }
        match closed.reason {
            CloseReason::Evicted(EvictReason::DroppedWindow) => {
                fail("evicted by the drop-window rule, which cannot be exceeded".into());
            }
            CloseReason::Evicted(_) => totals.evicted += 1,
            _ => {}
        }
        if out.status != StatusCode::OK {
            fail(format!("status {}", out.status));
        }
        for problem in &c.problems {
            fail(problem.clone());
        }

        // What the client saw.
        let completed = out.ended == Ended::Clean && closed.reason == CloseReason::Completed;
        match out.kind {
            Kind::Fast | Kind::Slow | Kind::StallResume if completed => {
                // Read to the end: every id of the request, delivered or
                // announced lost, exactly as the server sent and dropped.
                let n = out.n.expect("a request of n events");
                if c.delivered + c.lost != n || c.delivered != s.sent || c.lost != s.dropped {
                    fail(format!(
                        "read {} ids and {} announced lost of {n}; the server sent {} and dropped {}",
                        c.delivered, c.lost, s.sent, s.dropped
                    ));
                }
                if out.kind == Kind::Fast {
                    totals.fast += 1;
                    totals.fast_lost += usize::from(c.lost > 0);
                }
            }
            // A client that pauses on `/pause` may pause past the stall
            // rule on a starved machine: cut after what it had read.
            Kind::Slow | Kind::StallResume
                if out.route == Route::Pause
                    && out.ended == Ended::Error
                    && closed.reason == CloseReason::Evicted(EvictReason::Stalled) =>
            {
                totals.evicted_slow += 1;
                if c.delivered > s.sent {
                    fail(format!("read {} ids of the {} sent", c.delivered, s.sent));
                }
            }
            Kind::Fast | Kind::Slow | Kind::StallResume => {
                fail(format!("ended {:?}, closed {}", out.ended, closed.reason));
            }
            Kind::ZeroWindow => {
                if closed.reason != CloseReason::Evicted(EvictReason::Stalled) {
                    fail(format!("a zero-window client closed {}", closed.reason));
                }
            }
            Kind::Reset | Kind::BackgroundFast | Kind::BackgroundSlow | Kind::BackgroundStuck => {
                if closed.reason != CloseReason::ClientGone {
                    fail(format!("closed {} after the client left", closed.reason));
                }
                if out.kind == Kind::BackgroundFast {
                    totals.fast += 1;
                    totals.fast_lost += usize::from(c.lost > 0);
                    if c.delivered == 0 {
                        fail("a background reader read nothing".into());
                    }
                }
            }
            Kind::Leave | Kind::Resume | Kind::ResumeBeyond | Kind::Backfill | Kind::Panic => {
                fail("a client of the hub soak".into());
            }
            Kind::Head => {
                if out.bytes != 0 {
                    fail(format!("HEAD got {} body bytes", out.bytes));
                }
                if closed.reason != CloseReason::ClientGone || s.sent != 0 {
                    fail(format!(
                        "HEAD closed {} after {} frames",
                        closed.reason, s.sent
                    ));
                }
            }
        }
    }
    failures
}

/// Runs one wave, settles, checks it; returns its totals.
async fn wave(server: &Server, background: (usize, usize, usize)) -> Totals {
    let addr = server.addr;
    let mut set: JoinSet<Vec<Outcome>> = JoinSet::new();
    let mut totals = Totals::default();
    for (i, route) in [Route::Sse, Route::Pause].into_iter().enumerate() {
        for _ in 0..PLAN.fast_h1[i] {
            let client = H1::new(route, Kind::Fast, Some(FAST_N), Pace::Fast).requests(2);
            set.spawn(h1_client(addr, client, None));
        }
        for _ in 0..PLAN.h2[i] {
            set.spawn(h2_client(addr, route, h2_streams(), None));
        }
        for _ in 0..PLAN.slow[i] {
            let client = H1::new(route, Kind::Slow, Some(SLOW_N), SLOW).recv_buffer(16 * 1024);
            set.spawn(h1_client(addr, client, None));
        }
        for _ in 0..PLAN.stall_resume[i] {
            let (pace, n) = match route {
                Route::Sse => STALL_RESUME_SSE,
                Route::Pause => STALL_RESUME_PAUSE,
                Route::Hub | Route::HubSlow | Route::HubStall => {
                    unreachable!("the hub soak's routes")
                }
            };
            let client = H1::new(route, Kind::StallResume, Some(n), pace).recv_buffer(16 * 1024);
            set.spawn(h1_client(addr, client, None));
        }
        for _ in 0..PLAN.reset[i] {
            set.spawn(reset(addr, route, 8192));
        }
        for _ in 0..PLAN.head[i] {
            set.spawn(head(addr, route));
        }
        totals.connections += PLAN.fast_h1[i]
            + PLAN.h2[i]
            + PLAN.slow[i]
            + PLAN.stall_resume[i]
            + PLAN.reset[i]
            + PLAN.head[i];
    }
    // Zero-window clients on `/pause`: sockets held, never read until the
    // wave has settled.
    let mut zero_window = Vec::new();
    for _ in 0..PLAN.zero_window {
        let tag = tag();
        zero_window.push((tag, raw_get(addr, Route::Pause, tag).await));
    }
    totals.connections += PLAN.zero_window;

    let mut outcomes = Vec::new();
    while let Some(done) = guard("the wave's clients", set.join_next()).await {
        outcomes.extend(done.expect("a client task panicked"));
    }
    // Settled: the zero-window clients were evicted and their connections
    // ended on the server, though they never read.
    let (streams, connections, tasks) = background;
    server.settle("the wave", streams, connections, tasks).await;
    for (tag, stream) in zero_window {
        let head = guard("a zero-window connection to end", read_to_end(stream)).await;
        let mut out = Outcome::new(tag, Kind::ZeroWindow, Route::Pause, None);
        out.status = head
            .strip_prefix(b"HTTP/1.1 ")
            .and_then(|rest| StatusCode::from_bytes(rest.get(..3)?).ok())
            .unwrap_or(StatusCode::BAD_GATEWAY);
        outcomes.push(out);
    }
    let failures = verify(server, &outcomes, &mut totals);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    totals
}

// ----- the soak -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECS);
    let least = behind_enough_to_shed();
    let start = Instant::now();
    let server = server().await;
    let addr = server.addr;
    let baseline = alive_tasks();

    // Background streams, open across every wave.
    let (stop_background, stop) = watch::channel(false);
    let mut background: JoinSet<Vec<Outcome>> = JoinSet::new();
    let fast = Kind::BackgroundFast;
    background.spawn(h2_client(
        addr,
        Route::Sse,
        vec![(fast, None, Pace::Fast); 2],
        Some(stop.clone()),
    ));
    let client = H1::new(Route::Pause, fast, None, Pace::Fast);
    background.spawn(h1_client(addr, client, Some(stop.clone())));
    let slow = Pace::Slow {
        chunk: 4096,
        pause: Duration::from_millis(50),
    };
    let client = H1::new(Route::Sse, Kind::BackgroundSlow, None, slow).recv_buffer(16 * 1024);
    background.spawn(h1_client(addr, client, Some(stop)));
    // Two clients that never read, on `/sse` (which has no timed rule): they
    // keep the budget full of droppable frames from before the first wave to
    // the end, so every frame of every wave is admitted by shedding theirs.
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let tag = tag();
        stuck.push((tag, raw_get(addr, Route::Sse, tag).await));
    }
    const STREAMS: usize = 6;
    const CONNECTIONS: usize = 5;
    guard(
        "the background streams to open and fill the budget",
        async {
            loop {
                let snapshot = server.registry.snapshot();
                if snapshot.clients.len() == STREAMS
                    && snapshot.clients.iter().all(|c| c.sent > 0)
                    && server.budget.used() + EVENT > BUDGET
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    // Every background stream has delivered: its tasks (hyper's HTTP/2
    // stream tasks among them) run. This is the count every wave must come
    // back to.
    let with_background = alive_tasks();

    println!(
        "soak: {secs} s of waves on {addr}, {RATE} events/s of {EVENT} B, budget {} KiB; \
         a client the budget sheds holds at least {least} B",
        BUDGET / 1024
    );
    let mut first_rss = None;
    let mut waves = 0;
    let mut all = Totals::default();
    while waves == 0 || start.elapsed() < Duration::from_secs(secs) {
        waves += 1;
        server.sampled_max.store(0, Ordering::Release);
        let budget_dropped = server.budget.stats().dropped;
        let began = Instant::now();
        let t = wave(&server, (STREAMS, CONNECTIONS, with_background)).await;
        let took = began.elapsed().as_secs_f64();
        let rss_now = rss();
        if waves == 1 {
            first_rss = rss_now;
        }
        println!(
            "wave {waves:>3}: {:>3} connections, {:>3} streams, {:>6} frames sent ({:>5.0}/s), \
             {:>5} dropped (the budget shed {:>5} in all), {:>2} evicted ({} pausing), \
             {:>4} pressure episodes, {}/{} fast readers lost frames, \
             budget max {} KiB, RSS {:.1} MiB, {took:.1} s",
            t.connections,
            t.streams,
            t.sent,
            t.sent as f64 / took,
            t.dropped,
            server.budget.stats().dropped - budget_dropped,
            t.evicted,
            t.evicted_slow,
            t.pressure,
            t.fast_lost,
            t.fast,
            server.sampled_max.load(Ordering::Acquire) / 1024,
            mib(rss_now.unwrap_or(0)),
        );
        all.add(&t);
        assert!(waves < 10_000, "bounded");
    }

    // The background streams end; everything goes back to the baseline.
    stop_background.send(true).unwrap();
    let mut outcomes = Vec::new();
    while let Some(done) = guard("the background streams", background.join_next()).await {
        outcomes.extend(done.expect("a background task panicked"));
    }
    for (tag, stream) in stuck {
        drop(stream);
        outcomes.push(Outcome::new(tag, Kind::BackgroundStuck, Route::Sse, None));
    }
    server.settle("the end", 0, 0, baseline).await;
    let mut t = Totals::default();
    let failures = verify(&server, &outcomes, &mut t);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    all.add(&t);
    for out in &outcomes {
        let c = &out.check;
        println!(
            "background {:?} {:?}: {} ids, {} lost in {} gaps",
            out.route, out.kind, c.delivered, c.lost, c.markers
        );
    }
    assert_eq!(outcomes.len(), STREAMS);

    // Quiet: nothing held, nothing left.
    let stats = server.budget.stats();
    let rss_end = rss();
    println!(
        "soak: {waves} waves, {} connections, {} streams, {} frames sent, {} dropped, \
         {} evicted ({} pausing), {}/{} fast readers lost frames, budget peak {} of {} KiB, \
         RSS {:.1} MiB after wave 1, {:.1} MiB at the end, {:.0} s",
        all.connections,
        all.streams,
        all.sent,
        all.dropped,
        all.evicted,
        all.evicted_slow,
        all.fast_lost,
        all.fast,
        stats.peak / 1024,
        stats.limit / 1024,
        mib(first_rss.unwrap_or(0)),
        mib(rss_end.unwrap_or(0)),
        start.elapsed().as_secs_f64(),
    );
    assert_eq!(
        stats.used, 0,
        "every byte is returned once the clients are gone"
    );
    assert!(stats.peak <= stats.limit, "peak {stats:?}");
    assert!(stats.dropped > 0, "the budget had to shed");
    assert_eq!(
        stats.dropped, all.dropped,
        "every frame dropped was dropped by the budget, from a client that saw the gap"
    );
    assert_eq!(
        server.sampled_over.load(Ordering::Acquire),
        0,
        "samples over the budget"
    );
    assert!(server.registry.is_empty());
    {
        let ledger = server.books.ledger();
        assert!(
            ledger.violation_count == 0,
            "{} violations: {:#?}",
            ledger.violation_count,
            ledger.violations
        );
        assert!(ledger.open.is_empty(), "clients never closed");
        assert!(
            ledger.closed.is_empty(),
            "closed clients no client saw: {:?}",
            ledger.closed.keys()
        );
    }
    if let (Some(first), Some(end)) = (first_rss, rss_end) {
        assert!(
            end <= first + RSS_MARGIN,
            "RSS grew from {:.1} MiB after the first wave to {:.1} MiB",
            mib(first),
            mib(end)
        );
    }

    // The server stops: the runtime is empty.
    server.stop.send(true).unwrap();
    for task in server.tasks {
        guard("a server task to stop", task).await.unwrap();
    }
    guard("every task to end", async {
        while alive_tasks() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Bug (found reading `Client::reserve` for this soak): a client at its own
/// frame limit reserves only what a frame adds after its ring drops its
/// oldest (`Storage::growth`, computed before the budget sheds); when the
/// budget then sheds that same client's oldest frame to make the room, the
/// ring is no longer full, keeps the new frame without dropping, and
/// `settle` forces the difference past the limit.
///
/// Regression. Here: a budget of 500 bytes, a ring of 4 frames holding four frames of
/// 100 bytes (400), then a frame of 300 bytes. Its growth is 200 (300 less
/// the oldest 100); 400 + 200 is over 500, so the budget sheds 100 from the
/// largest client, this one (300 held, 500 reserved); the ring, now 3
/// frames, takes the new frame without dropping (600 held), and `used` and
/// `peak` stay at 600. With frames of one size the same happens when the
/// client's connection takes a frame between `growth` and `push` (a race:
/// the ring is no longer full when the frame arrives); the soak keeps
/// every `/sse` ring larger than the whole budget so that no client is ever
/// at its own limit.
#[tokio::test]
async fn budget_overshoots_when_a_full_client_sheds_its_own_frame() {
    use tower::ServiceExt;

    let budget = MemoryBudget::new(500);
    let (producer, body) = common::channel_body(8, None);
    let svc = tower::ServiceBuilder::new()
        .layer(BackpressureLayer::new(BufferConfig::new(4)).memory_budget(budget.clone()))
        .service(common::one_response(body, "text/event-stream"));
    // Nobody reads the body: every frame stays in the ring.
    let response = svc.oneshot(Request::new(())).await.unwrap();
    for frame in [
        &[b'a'; 100][..],
        &[b'b'; 100],
        &[b'c'; 100],
        &[b'd'; 100],
        &[b'e'; 300],
    ] {
        producer
            .tx
            .send(Bytes::copy_from_slice(frame))
            .await
            .unwrap();
    }
    drop(producer.tx);
    guard("the pump to take every frame", producer.inner_done)
        .await
        .unwrap();
    let stats = budget.stats();
    // 500 bytes hold c, d and e: a and b go (the ring alone would have
    // dropped a only, and held 600).
    assert_eq!(stats.dropped, 2, "the two oldest frames were dropped");
    assert!(
        stats.used <= stats.limit && stats.peak <= stats.limit,
        "over the budget: {stats:?}"
    );
    drop(response);
}

// ----- the hub soak -----

/// Events per second from the hub soak's producer.
const HUB_RATE: u64 = 1_000;
/// Bytes per event of the hub soak: hyper's write buffer (about 400 KiB)
/// holds some 800 of them, so that a client that stops reading reaches its
/// window within a second.
const HUB_EVENT: usize = 512;
/// Frames the hub retains: 3 s of the producer.
const HUB_RETAIN: usize = 3_000;
/// `/events`' window: 2 s of the producer, so that a fast reader would have
/// to go unscheduled that long (past hyper's buffer) to lose a frame.
const HUB_CAP: usize = 2_000;
/// `/slow`'s window: small, so that its slow readers skip and conflate.
const HUB_SLOW_CAP: usize = 64;
/// `/stall`'s window: its clients never read; pressure at half of it.
const HUB_STALL_CAP: usize = 500;
/// `/stall` evicts a client that took nothing for this long while frames
/// wait: long enough for its window to overflow first (so that the sweep
/// has reported `Pressure` and `Dropped` before it evicts), and only
/// clients that never read go there.
const HUB_STALL: Duration = Duration::from_millis(1500);
/// Frames the test keeps as the bus's history, for backfills: 40 s.
const HISTORY: usize = 40_000;
/// How far the history runs ahead of the hub, in frames.
const AHEAD: u64 = 5;
/// Every 5th id is a `Replace` frame ("the latest price")...
const REPLACE_EVERY: u64 = 5;
/// ... keyed by its id modulo 3.
const REPLACE_KEYS: u64 = 3;
/// Seconds of waves by default (`SOAK_SECS` overrides).
const HUB_DEFAULT_SECS: u64 = 14;
/// Frames per fast request.
const HUB_FAST_N: u64 = 500;
/// Frames per slow request: some 4 s at [`HUB_SLOW`], enough to fill
/// hyper's buffer and the window and conflate for the second half.
const HUB_SLOW_N: u64 = 1_200;
/// About a third of the producer's rate.
const HUB_SLOW: Pace = Pace::Slow {
    chunk: 8192,
    pause: Duration::from_millis(50),
};
/// A resumer reads this much, leaves, and resumes for [`RESUME_N`] frames.
const LEAVE_AFTER: usize = 100 * HUB_EVENT;
const RESUME_N: u64 = 300;
/// A backfill client resumes this far before the hub's oldest frame, and
/// reads up to [`BACKFILL_PAST`] frames past the hub's newest frame (so,
/// past the end of its backfill).
const BACKFILL_DEPTH: u64 = 500;
const BACKFILL_PAST: u64 = 200;
/// The shutdown's grace period (long enough for a reader on a starved
/// machine to take what waits for it) and SSE `retry:` hint.
const GRACE: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_secs(2);

/// How many clients of each kind a wave of the hub soak starts.
struct HubPlan {
    /// HTTP/1.1 connections of two fast requests each, on `/events`.
    fast: usize,
    /// Slow readers on `/slow`.
    slow: usize,
    /// Resumers within and beyond the hub's retention.
    resume: usize,
    resume_beyond: usize,
    backfill: usize,
    /// Clients that never read on `/stall`, opened with the panicking one
    /// before the rest of the wave...
    stalled: usize,
    /// ... and with the rest.
    stalled_after: usize,
}

const HUB_PLAN: HubPlan = HubPlan {
    fast: 12,
    slow: 6,
    resume: 6,
    resume_beyond: 3,
    backfill: 6,
    stalled: 8,
    stalled_after: 8,
};

fn is_replace(id: u64) -> bool {
    id % REPLACE_EVERY == 0
}

/// How many ids in `from..to` are `Replace` frames.
fn replace_ids(from: u64, to: u64) -> u64 {
    to.div_ceil(REPLACE_EVERY) - from.div_ceil(REPLACE_EVERY)
}

/// The layer's classify hook: every 5th frame is the latest of its key.
fn classify_frame(frame: &Bytes) -> FrameClass {
    let id: Option<u64> = frame
        .get(4..14)
        .and_then(|d| std::str::from_utf8(d).ok()?.parse().ok());
    match id {
        Some(id) if is_replace(id) => FrameClass::Replace(id % REPLACE_KEYS),
        _ => FrameClass::Droppable,
    }
}

/// The hub, and the history of everything published (standing in for a
/// bus), oldest first.
#[derive(Clone)]
struct HubState {
    hub: Hub,
    history: Arc<Mutex<VecDeque<(u64, Bytes)>>>,
}

/// `GET /events` and `GET /slow`: the hub from the client's
/// `Last-Event-ID`, or from after the newest frame (the first id is sent as
/// `x-first-id`); `?n=` frames (endless without); `?backfill=1` starts with
/// the history after the `Last-Event-ID`.
async fn hub_events(
    State(state): State<HubState>,
    uri: Uri,
    headers: http::HeaderMap,
) -> Response<HubBody> {
    let after = sse::last_event_id_from(&headers).or_else(|| state.hub.newest_id());
    let mut response = state
        .hub
        .response()
        .resume_after(after)
        .limit(query(&uri, "n"))
        .keep_alive(None);
    if query(&uri, "backfill").is_some() {
        let from = after.map_or(0, |id| id + 1);
        let frames: Vec<_> = {
            let history = state.history.lock().unwrap();
            history
                .iter()
                .filter(|(id, _)| *id >= from)
                .cloned()
                .collect()
        };
        response = response.backfill(frames);
    }
    let mut response = response.build();
    let first = after.map_or(0, |id| id + 1);
    response.headers_mut().insert("x-first-id", first.into());
    response
}

/// An observer that panics once per client tagged `?panic=1`, at its first
/// `Pressure` or `Dropped` event heard outside its connection's task: in the
/// hub's sweep, which must survive it (and go on evicting stalled clients).
/// Events heard in the connection's task (`Opened` is) never panic, so that
/// the panic never depends on the machine's timing.
#[derive(Clone, Default)]
struct Panicky {
    /// Each tagged client's connection task.
    tasks: Arc<Mutex<HashMap<ClientId, Option<tokio::task::Id>>>>,
    panics: Arc<AtomicUsize>,
}

impl BackpressureObserver for Panicky {
    fn on_event(&self, e: &BackpressureEvent<'_>) {
        if query(e.client.uri(), "panic").is_none() {
            return;
        }
        let id = e.client.id();
        let panic = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            match e.kind {
                EventKind::Opened => {
                    tasks.insert(id, tokio::task::try_id());
                    false
                }
                EventKind::Pressure | EventKind::Dropped { .. } => {
                    tasks
                        .get(&id)
                        .is_some_and(|task| *task != tokio::task::try_id())
                        && tasks.remove(&id).is_some()
                }
                _ => false,
            }
        };
        if panic {
            self.panics.fetch_add(1, Ordering::AcqRel);
            panic!("soak: an observer panics in the hub's sweep (client {id}), on purpose");
        }
    }
}

struct HubServer {
    addr: SocketAddr,
    hub: Hub,
    registry: ClientRegistry,
    books: Books,
    /// Panics of [`Panicky`].
    panics: Arc<AtomicUsize>,
    /// Starts axum's graceful shutdown, which triggers the `Shutdown`.
    signal: Option<tokio::sync::oneshot::Sender<()>>,
    serve: Option<JoinHandle<std::io::Result<()>>>,
    stop: watch::Sender<bool>,
    producer: Option<JoinHandle<()>>,
}

async fn hub_server() -> HubServer {
    let hub: Hub = Hub::new(HubConfig::new(HUB_RETAIN));
    let history = Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY + 1)));
    let registry = ClientRegistry::new();
    let books = Books {
        ledger: Arc::default(),
        budget: None,
    };
    let panicky = Panicky::default();
    let panics = panicky.panics.clone();
    let shutdown = Shutdown::new().grace(GRACE).sse_retry(RETRY);
    shutdown.close_hub(&hub);
    let observer = ((registry.clone(), books.clone()), panicky);
    let layer = |config: BufferConfig| {
        BackpressureLayer::new(config.with_threshold(0.5))
            .observer(observer.clone())
            .gap_marker(SseGapMarker::new())
            .classify(classify_frame)
            .keep_alive(None)
            .shutdown(shutdown.clone())
    };
    let app = Router::new()
        .route(
            "/events",
            get(hub_events).layer(layer(BufferConfig::new(HUB_CAP))),
        )
        .route(
            "/stall",
            get(hub_events).layer(layer(
                BufferConfig::new(HUB_STALL_CAP)
                    .with_eviction(Eviction::none().after_stall(HUB_STALL)),
            )),
        )
        .route(
            "/slow",
            get(hub_events).layer(layer(BufferConfig::new(HUB_SLOW_CAP))),
        )
        .with_state(HubState {
            hub: hub.clone(),
            history: history.clone(),
        });

    // The producer: ids from 1, `HUB_RATE` per second since it started.
    // The history (the bus) is [`AHEAD`] frames ahead of the hub, so that
    // every backfill reaches past the hub's newest frame.
    let (stop, mut stopped) = watch::channel(false);
    let producer = tokio::spawn({
        let hub = hub.clone();
        async move {
            let start = Instant::now();
            let (mut next, mut published) = (1, 1);
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let due = 1 + (start.elapsed().as_micros() as u64) * HUB_RATE / 1_000_000;
                        let mut history = history.lock().unwrap();
                        while next <= due + AHEAD {
                            history.push_back((next, sized_event(next, HUB_EVENT)));
                            if history.len() > HISTORY {
                                history.pop_front();
                            }
                            next += 1;
                        }
                        let from = history.front().expect("kept").0;
                        while published <= due {
                            let frame = history[(published - from) as usize].1.clone();
                            hub.publish_with_id(published, frame).expect("increasing ids");
                            published += 1;
                        }
                    }
                    _ = stopped.changed() => return,
                }
            }
        }
    });

    // As in the first soak: a small send buffer on accepted sockets.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(
        axum::serve(
            ClosableListener::new(listener),
            app.into_make_service_with_connect_info::<ConnectionInfo>(),
        )
        .with_graceful_shutdown(shutdown.trigger_after(async {
            let _ = signalled.await;
        }))
        .into_future(),
    );
    HubServer {
        addr,
        hub,
        registry,
        books,
        panics,
        signal: Some(signal),
        serve: Some(serve),
        stop,
        producer: Some(producer),
    }
}

impl HubServer {
    /// Waits (bounded: a guard) until exactly `streams` streams are in the
    /// registry and subscribed to the hub, and `tasks` tokio tasks are alive.
    async fn settle(&self, what: &str, streams: usize, tasks: usize) {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let now = (self.registry.len(), self.hub.subscribers(), alive_tasks());
            if now == (streams, streams, tasks) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} did not settle: (registry, hub subscribers, alive tasks) = {now:?}, \
                 expected {:?}; open: {}",
                (streams, streams, tasks),
                self.registry.snapshot().to_json(),
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One GET over a new HTTP/1.1 connection, with a `Last-Event-ID`, read at
/// `pace`.
async fn hub_get(
    addr: SocketAddr,
    path: String,
    last_event_id: Option<u64>,
    out: Outcome,
    pace: Pace,
) -> Outcome {
    let (mut sender, conn) = h1(addr, None).await;
    let mut req = request(Method::GET, path);
    if let Some(id) = last_event_id {
        req.headers_mut().insert("last-event-id", id.into());
    }
    let response = sender.send_request(req).await.unwrap();
    let out = read(response, out, pace, None).await;
    drop(sender);
    let _ = conn.await;
    out
}

/// Reads a little, leaves, and resumes with its `Last-Event-ID`: at once
/// (within the hub's retention), or once the hub no longer retains the
/// next id (`beyond`).
async fn resumer(addr: SocketAddr, hub: Hub, beyond: bool) -> Vec<Outcome> {
    let leave_tag = tag();
    let leave = hub_get(
        addr,
        Route::Hub.path(leave_tag, None),
        None,
        Outcome::new(leave_tag, Kind::Leave, Route::Hub, None),
        Pace::DropAfter { after: LEAVE_AFTER },
    )
    .await;
    if leave.check.delivered == 0 {
        return vec![leave];
    }
    let last = leave.check.next - 1;
    if beyond {
        guard("the hub to let go of a resumer's next id", async {
            while hub.oldest_id().is_none_or(|oldest| oldest <= last + 1) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    let tag = tag();
    let kind = if beyond {
        Kind::ResumeBeyond
    } else {
        Kind::Resume
    };
    let out = Outcome::new(tag, kind, Route::Hub, Some(RESUME_N));
    let resumed = hub_get(
        addr,
        Route::Hub.path(tag, Some(RESUME_N)),
        Some(last),
        out,
        Pace::Fast,
    )
    .await;
    vec![leave, resumed]
}

/// Resumes from before the hub's oldest frame, with a backfill from the
/// history.
async fn backfiller(addr: SocketAddr, hub: Hub) -> Vec<Outcome> {
    // The hub must have let go of some frames (the first wave waits).
    let oldest = guard("the hub to let go of its first frames", async {
        loop {
            match hub.oldest_id() {
                Some(oldest) if oldest > BACKFILL_DEPTH => return oldest,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    let last = oldest - BACKFILL_DEPTH;
    // Past the end of the backfill (which reaches past the hub's newest).
    let n = hub.newest_id().expect("published") - last + BACKFILL_PAST;
    let tag = tag();
    let out = Outcome::new(tag, Kind::Backfill, Route::Hub, Some(n));
    let path = format!("{}&backfill=1", Route::Hub.path(tag, Some(n)));
    vec![hub_get(addr, path, Some(last), out, Pace::Fast).await]
}

/// What a wave of the hub soak did, for its summary line.
#[derive(Debug, Default)]
struct HubTotals {
    streams: usize,
    sent: u64,
    dropped: u64,
    replaced: u64,
    /// Superseded frames the clients saw missing, unannounced.
    superseded: u64,
    evicted: usize,
    backfilled: u64,
    resumed_lost: u64,
}

impl HubTotals {
    fn add(&mut self, t: &HubTotals) {
        self.streams += t.streams;
        self.sent += t.sent;
        self.dropped += t.dropped;
        self.replaced += t.replaced;
        self.superseded += t.superseded;
        self.evicted += t.evicted;
        self.backfilled += t.backfilled;
        self.resumed_lost += t.resumed_lost;
    }
}

/// Checks each outcome of the hub soak against what the server's ledger
/// says of it; `shutdown`: the streams open at the shutdown.
fn verify_hub(
    server: &HubServer,
    outcomes: &[Outcome],
    totals: &mut HubTotals,
    shutdown: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut ledger = server.books.ledger();
    let retry = Some(RETRY.as_millis() as u64);
    for out in outcomes {
        let mut fail = |what: String| {
            if failures.len() < 20 {
                failures.push(format!(
                    "client {} ({:?} on {:?}): {what}",
                    out.tag, out.kind, out.route
                ));
            }
        };
        let Some(closed) = ledger.closed.remove(&out.tag) else {
            fail("no Closed event".into());
            continue;
        };
        let (s, c, reason) = (closed.stats, &out.check, closed.reason);
        totals.streams += 1;
        totals.sent += s.sent;
        totals.dropped += s.dropped;
        totals.replaced += s.replaced;
        totals.superseded += c.superseded;
        if matches!(reason, CloseReason::Evicted(_)) {
            totals.evicted += 1;
        }
        if closed.reported != s.dropped {
            fail(format!(
                "Dropped events add up to {}, stats say {}",
                closed.reported, s.dropped
            ));
        }
        if out.status != StatusCode::OK {
            fail(format!("status {}", out.status));
        }
        for problem in &c.problems {
            fail(problem.clone());
        }
        // What a client saw is never more than the server sent, dropped or
        // replaced (a limited or cut stream may not see the last of them).
        if c.delivered > s.sent || c.superseded > s.replaced {
            fail(format!(
                "read {} ids, {} superseded; the server sent {}, replaced {}",
                c.delivered, c.superseded, s.sent, s.replaced
            ));
        }
        // A client's backlog (kept `Replace` frames included) stays within
        // its window, unless it resumed and replays what it missed.
        let resumed = matches!(out.kind, Kind::Resume | Kind::ResumeBeyond | Kind::Backfill);
        if !resumed && s.high_water > s.capacity {
            fail(format!(
                "{} frames waited at once, in a window of {}",
                s.high_water, s.capacity
            ));
        }
        let clean = out.ended == Ended::Clean;
        let stalled = CloseReason::Evicted(EvictReason::Stalled);
        match out.kind {
            Kind::Fast | Kind::Resume | Kind::ResumeBeyond | Kind::Backfill | Kind::Slow => {
                let n = out.n.expect("a limited request");
                if !clean || reason != CloseReason::Completed {
                    fail(format!("ended {:?}, closed {reason}", out.ended));
                } else if c.delivered != n || s.sent != n {
                    fail(format!(
                        "read {} of {n} frames, {} sent",
                        c.delivered, s.sent
                    ));
                }
                if c.lost > s.dropped && out.kind != Kind::ResumeBeyond {
                    fail(format!("{} announced lost, {} dropped", c.lost, s.dropped));
                }
                match out.kind {
                    // Fast: nothing lost, nothing skipped.
                    Kind::Fast | Kind::Resume | Kind::Backfill
                        if c.markers != 0 || c.superseded != 0 =>
                    {
                        fail(format!(
                            "{} lost in {} gaps, {} superseded",
                            c.lost, c.markers, c.superseded
                        ));
                    }
                    Kind::ResumeBeyond => {
                        // One gap, exact, then every id.
                        if c.markers != 1 || c.lost == 0 || c.superseded != 0 {
                            fail(format!(
                                "{} lost in {} gaps, {} superseded, beyond the retention",
                                c.lost, c.markers, c.superseded
                            ));
                        }
                        totals.resumed_lost += c.lost;
                    }
                    Kind::Backfill => totals.backfilled += c.delivered,
                    _ => {}
                }
            }
            Kind::Leave => {
                if reason != CloseReason::ClientGone || c.delivered == 0 || c.markers != 0 {
                    fail(format!(
                        "closed {reason} after {} ids, {} gaps",
                        c.delivered, c.markers
                    ));
                }
            }
            Kind::ZeroWindow | Kind::Panic if !shutdown => {
                if reason != stalled {
                    fail(format!("a client that never read closed {reason}"));
                }
            }
            Kind::ZeroWindow | Kind::BackgroundStuck => {
                if reason != CloseReason::Shutdown {
                    fail(format!("a client that never read closed {reason}"));
                }
            }
            Kind::BackgroundFast => {
                // A clean end after whole events and the retry hint, and
                // every frame the server sent, none lost.
                if !clean || reason != CloseReason::Shutdown || c.retry != retry {
                    fail(format!(
                        "ended {:?}, closed {reason}, retry {:?}",
                        out.ended, c.retry
                    ));
                }
                if c.delivered == 0 || c.delivered != s.sent || c.lost != 0 || s.dropped != 0 {
                    fail(format!(
                        "read {} ids, {} lost; the server sent {}, dropped {}",
                        c.delivered, c.lost, s.sent, s.dropped
                    ));
                }
            }
            Kind::BackgroundSlow => {
                if reason != CloseReason::Shutdown {
                    fail(format!("closed {reason}"));
                }
                // Cut at the end of the grace, or a clean end with every
                // count exact.
                if clean
                    && (c.retry != retry
                        || c.delivered != s.sent
                        || c.lost != s.dropped
                        || c.superseded != s.replaced)
                {
                    fail(format!(
                        "retry {:?}, read {} ids, {} lost, {} superseded; the server sent {}, \
                         dropped {}, replaced {}",
                        c.retry, c.delivered, c.lost, c.superseded, s.sent, s.dropped, s.replaced
                    ));
                }
            }
            kind => fail(format!("{kind:?} is not a client of the hub soak")),
        }
    }
    failures
}

/// Reads what a client that never read is left, to the end of its
/// connection; its outcome.
async fn never_read(tag: u64, kind: Kind, route: Route, stream: TcpStream) -> Outcome {
    let head = guard("a stalled connection to end", read_to_end(stream)).await;
    let mut out = Outcome::new(tag, kind, route, None);
    out.status = head
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| StatusCode::from_bytes(rest.get(..3)?).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    out
}

/// Runs one wave of the hub soak, settles, checks it; returns its totals.
async fn hub_wave(server: &HubServer, background: (usize, usize)) -> HubTotals {
    let addr = server.addr;
    let panics = server.panics.load(Ordering::Acquire);
    let mut set: JoinSet<Vec<Outcome>> = JoinSet::new();
    let mut stalled = Vec::new();
    // First the client whose observer panics in the sweep, and clients that
    // never read.
    let panic_tag = tag();
    let path = format!("{}&panic=1", Route::HubStall.path(panic_tag, None));
    stalled.push((panic_tag, Kind::Panic, raw_get_path(addr, &path).await));
    for _ in 0..HUB_PLAN.stalled {
        let tag = tag();
        let stream = raw_get(addr, Route::HubStall, tag).await;
        stalled.push((tag, Kind::ZeroWindow, stream));
    }
    guard("the observer's panic in the sweep", async {
        while server.panics.load(Ordering::Acquire) == panics {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Nothing attaches to the hub until they are all evicted: the sweep
    // that met the panic goes on by itself (a new client would start a new
    // sweep task if it had ended).
    let tags: Vec<u64> = stalled.iter().map(|(tag, ..)| *tag).collect();
    guard(
        "the stalled clients to be evicted after the panic, nothing attaching",
        async {
            while !tags
                .iter()
                .all(|tag| server.books.ledger().closed.contains_key(tag))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    // Then every other kind at once, and more clients that never read.
    for _ in 0..HUB_PLAN.fast {
        let client = H1::new(Route::Hub, Kind::Fast, Some(HUB_FAST_N), Pace::Fast).requests(2);
        set.spawn(h1_client(addr, client, None));
    }
    for _ in 0..HUB_PLAN.slow {
        let client =
            H1::new(Route::HubSlow, Kind::Slow, Some(HUB_SLOW_N), HUB_SLOW).recv_buffer(16 * 1024);
        set.spawn(h1_client(addr, client, None));
    }
    for i in 0..HUB_PLAN.resume + HUB_PLAN.resume_beyond {
        set.spawn(resumer(addr, server.hub.clone(), i >= HUB_PLAN.resume));
    }
    for _ in 0..HUB_PLAN.backfill {
        set.spawn(backfiller(addr, server.hub.clone()));
    }
    for _ in 0..HUB_PLAN.stalled_after {
        let tag = tag();
        let stream = raw_get(addr, Route::HubStall, tag).await;
        stalled.push((tag, Kind::ZeroWindow, stream));
    }

    let mut outcomes = Vec::new();
    while let Some(done) = guard("the wave's clients", set.join_next()).await {
        outcomes.extend(done.expect("a client task panicked"));
    }
    // Settled: the stalled clients were evicted and their connections
    // ended, though they never read.
    let (streams, tasks) = background;
    server.settle("the hub wave", streams, tasks).await;
    for (tag, kind, stream) in stalled {
        outcomes.push(never_read(tag, kind, Route::HubStall, stream).await);
    }
    let mut totals = HubTotals::default();
    let failures = verify_hub(server, &outcomes, &mut totals, false);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        server.panics.load(Ordering::Acquire),
        panics + 1,
        "one panic per wave"
    );
    totals
}

/// The soak of a hub's window path: see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_soak() {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(HUB_DEFAULT_SECS);
    let start = Instant::now();
    let baseline = alive_tasks();
    let mut server = hub_server().await;
    let addr = server.addr;
    guard("the first frame", async {
        while server.hub.oldest_id().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // Background streams, open across every wave until the shutdown: two
    // fast readers on `/events`, a slow reader and two that never read on
    // `/slow` (which has no stall rule).
    let mut background: JoinSet<Vec<Outcome>> = JoinSet::new();
    for _ in 0..2 {
        let client = H1::new(Route::Hub, Kind::BackgroundFast, None, Pace::Fast);
        background.spawn(h1_client(addr, client, None));
    }
    let client =
        H1::new(Route::HubSlow, Kind::BackgroundSlow, None, HUB_SLOW).recv_buffer(16 * 1024);
    background.spawn(h1_client(addr, client, None));
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let tag = tag();
        let stream = raw_get(addr, Route::HubSlow, tag).await;
        stuck.push((tag, Kind::BackgroundStuck, Route::HubSlow, stream));
    }
    const STREAMS: usize = 5;
    let opened = |n: usize| {
        let registry = &server.registry;
        async move {
            loop {
                let snapshot = registry.snapshot();
                if snapshot.clients.len() == n && snapshot.clients.iter().all(|c| c.sent > 0) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    guard("the background streams to open", opened(STREAMS)).await;
    let with_background = alive_tasks();

    println!(
        "hub soak: {secs} s of waves on {addr}, {HUB_RATE} events/s of {HUB_EVENT} B, \
         hub retains {HUB_RETAIN}, windows of {HUB_CAP} (/events) and {HUB_SLOW_CAP} (/slow)"
    );
    let mut waves = 0;
    let mut all = HubTotals::default();
    while waves == 0 || start.elapsed() < Duration::from_secs(secs) {
        waves += 1;
        let began = Instant::now();
        let t = hub_wave(&server, (STREAMS, with_background)).await;
        println!(
            "hub wave {waves:>3}: {:>3} streams, {:>6} frames sent, {:>5} dropped, \
             {:>4} replaced ({} seen superseded), {:>2} evicted, {} backfilled, \
             {} lost beyond the retention, {:.1} s",
            t.streams,
            t.sent,
            t.dropped,
            t.replaced,
            t.superseded,
            t.evicted,
            t.backfilled,
            t.resumed_lost,
            began.elapsed().as_secs_f64(),
        );
        all.add(&t);
        assert!(waves < 10_000, "bounded");
    }

    // A shutdown under load: the producer publishes, fast, slow and stalled
    // clients are connected.
    for _ in 0..4 {
        let client = H1::new(Route::Hub, Kind::BackgroundFast, None, Pace::Fast);
        background.spawn(h1_client(addr, client, None));
    }
    let client =
        H1::new(Route::HubSlow, Kind::BackgroundSlow, None, HUB_SLOW).recv_buffer(16 * 1024);
    background.spawn(h1_client(addr, client, None));
    for _ in 0..4 {
        let tag = tag();
        let stream = raw_get(addr, Route::Hub, tag).await;
        stuck.push((tag, Kind::ZeroWindow, Route::Hub, stream));
    }
    guard("the last streams to open", opened(STREAMS + 9)).await;
    let signalled = Instant::now();
    let _ = server.signal.take().expect("once").send(());
    let serve = server.serve.take().expect("once");
    guard("axum's graceful shutdown to finish", serve)
        .await
        .expect("the server task")
        .expect("the server");
    let stopped_in = signalled.elapsed();
    let mut outcomes = Vec::new();
    while let Some(done) = guard("the background streams", background.join_next()).await {
        outcomes.extend(done.expect("a background task panicked"));
    }
    for (tag, kind, route, stream) in stuck {
        outcomes.push(never_read(tag, kind, route, stream).await);
    }
    let mut t = HubTotals::default();
    let failures = verify_hub(&server, &outcomes, &mut t, true);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    all.add(&t);
    assert_eq!(outcomes.len(), STREAMS + 9);

    println!(
        "hub soak: {waves} waves, {} streams, {} frames sent, {} dropped, {} replaced \
         ({} seen superseded), {} evicted, {} backfilled, {} lost beyond the retention; \
         the server stopped {:.2} s after the signal; {:.0} s",
        all.streams,
        all.sent,
        all.dropped,
        all.replaced,
        all.superseded,
        all.evicted,
        all.backfilled,
        all.resumed_lost,
        stopped_in.as_secs_f64(),
        start.elapsed().as_secs_f64(),
    );
    assert!(all.replaced > 0, "slow readers had frames conflated");
    assert!(all.superseded > 0, "and saw them missing, unannounced");
    assert!(all.resumed_lost > 0 && all.backfilled > 0);
    assert!(
        server.registry.is_empty(),
        "{}",
        server.registry.snapshot().to_json()
    );
    assert_eq!(server.hub.subscribers(), 0);
    {
        let ledger = server.books.ledger();
        assert!(
            ledger.violation_count == 0,
            "{} violations: {:#?}",
            ledger.violation_count,
            ledger.violations
        );
        assert!(ledger.open.is_empty(), "clients never closed");
        assert!(
            ledger.closed.is_empty(),
            "closed clients no client saw: {:?}",
            ledger.closed.keys()
        );
    }

    // The producer stops: the runtime is back to where it started.
    server.stop.send(true).unwrap();
    let producer = server.producer.take().expect("once");
    guard("the producer to stop", producer).await.unwrap();
    guard("every task to end", async {
        while alive_tasks() > baseline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
