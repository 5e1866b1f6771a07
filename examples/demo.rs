//! A slow client next to a fast one, both behind `BackpressureLayer`.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --seconds 5 --rate 5000 --capacity 100
//! ```
//!
//! The demo starts a Server-Sent Events server on a free loopback port. One
//! producer task emits `--rate` events per second, each with `id: <seq>`, to
//! every client. The router carries a [`BackpressureLayer`], so each client
//! gets its own drop-oldest buffer of `--capacity` frames, filled by a pump
//! task as fast as the producer goes, and emptied as fast as the client
//! reads.
//!
//! Two clients connect over real TCP:
//!
//! - **fast** reads continuously: it gets every event, in order;
//! - **slow** reads 1 KiB every 50 ms and stalls completely for a while in
//!   the middle of the run: its buffer fills, the layer drops its *oldest*
//!   events, and it keeps receiving the newest ones. Neither the producer nor
//!   the fast client waits for it.
//!
//! An observer (a closure) records what the layer reports for each client.
//! Once a second the demo prints both clients' numbers side by side. After
//! `--seconds` the producer stops, which ends both streams; each client reads
//! what is left, and the demo checks the books: the fast client got all
//! events, and for the slow client `received + dropped == produced`, with
//! its ids strictly increasing and the newest event delivered. It exits
//! with status 1 if any of that does not hold.
//!
//! Only loopback is used. The server's sockets get a small send buffer (see
//! `bind_loopback`) so that the stall shows within a second rather than after
//! the kernel has queued megabytes.
//!
//! # `--hub`: why the hub exists
//!
//! ```text
//! cargo run --release --example demo -- --hub
//! cargo run --release --example demo -- --hub --stalled 1000 --seconds 3
//! ```
//!
//! Two acts of `--seconds` each (default 5), with the same clients: one fast
//! client next to `--stalled` clients (default 300), each a real TCP
//! connection with a small receive window that sends its `GET /events` and
//! never reads again, as a phone in a tunnel does.
//!
//! - **act 1, the hub**: the producer encodes each event once into a
//!   [`Hub`]'s log; each client is a window over that log behind the layer.
//!   A stalled client costs nothing per event: it is never woken, locked or
//!   copied to.
//! - **act 2, the per-client path**: the server of the demo without `--hub`.
//!   Each client has a pump task that receives every event from a broadcast
//!   channel, encodes it and pushes it into its own ring, where the oldest
//!   is dropped: 300 stalled clients cost 300 copies of every event.
//!
//! Each act measures, from the moment every client is connected until the
//! producer stops, the process's CPU time (`/proc/self/stat`: the server and
//! the fast client; the stalled clients do nothing) and how much its
//! resident memory grew (`VmRSS` in `/proc/self/status`), and the demo
//! prints both acts side by side. The hub runs first: memory an act frees
//! stays in the process, and the per-client act can only reuse what the
//! hub's left, which makes its growth look smaller, not larger. On systems
//! without `/proc` the figures read `n/a`.
//!
//! The books must balance in both acts: every stalled client's buffer or
//! window accounts for every event (sent, dropped or waiting), and the fast
//! client's missed ids are exactly the events lost for it. Through the hub
//! the fast client must get every event in order; through the per-client
//! path, what it lost to CPU starvation is reported (that loss is the point).
//! It exits with status 1 if any check fails.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use clap::Parser;
use futures::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tower_backpressure::hub::{HubBody, sse};
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BackpressureObserver, BufferConfig, BufferStats,
    ClientRegistry, CloseReason, ConfigError, DefaultPredicate, EventKind, Hub, HubConfig,
    PeerAddr,
};

/// The `data:` of every event.
const PAYLOAD: &str = "the quick brown fox jumps over the lazy dog";
/// The slow client reads this many bytes, then naps.
const SLOW_READ: usize = 1024;
const SLOW_NAP: Duration = Duration::from_millis(50);
/// How long the clients get to read what is left once the producer stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client that has seen the newest event waits for the end.
const END_GRACE: Duration = Duration::from_secs(1);

type BoxError = Box<dyn Error + Send + Sync>;
type SendRequest = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A fast and a slow SSE client behind tower-backpressure: watch the slow one
/// lose only its oldest events while the fast one gets them all.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// How long the producer runs (in each act, with `--hub`) [default: 10;
    /// with `--hub`: 5].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: Option<u64>,
    /// Events per second.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
    /// Frames buffered per client before the oldest are dropped.
    #[arg(long, value_name = "FRAMES", default_value_t = 256)]
    capacity: usize,
    /// Two acts instead: a fast client next to `--stalled` clients that
    /// never read, through a hub and then through the per-client path,
    /// with the CPU and memory each costs.
    #[arg(long)]
    hub: bool,
    /// How many stalled clients `--hub` connects.
    #[arg(long, value_name = "N", default_value_t = 300, requires = "hub",
          value_parser = clap::value_parser!(u64).range(1..=MAX_STALLED))]
    stalled: u64,
}

/// The most `--stalled` clients: each takes two sockets of this process.
const MAX_STALLED: u64 = 2000;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.hub {
        hub_acts(args).await
    } else {
        run(args).await
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let seconds = args.seconds.unwrap_or(10);
    // --- The server ------------------------------------------------------
    let (events, _) = broadcast::channel(4096);
    let lagged = Lagged::default();
    let observed = Observed::default();
    let app = app(
        BufferConfig::new(args.capacity),
        events.downgrade(),
        lagged.clone(),
        observed.clone(),
        ClientRegistry::new(),
    )?;
    let listener = bind_loopback()?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, app));
    println!(
        "SSE server on http://{addr}/events: {} events/s for {seconds}s, buffer of {} frames per client",
        args.rate, args.capacity
    );

    // --- The clients -----------------------------------------------------
    // Both are connected (and subscribed) before the first event, so each
    // can expect every id from 0 on.
    let fast = Client::connect(addr, None).await?;
    // A small receive window, so the kernel holds little for the slow client.
    let slow = Client::connect(addr, Some(4096)).await?;
    println!("fast client {}, slow client {}\n", fast.local, slow.local);

    // --- Run -------------------------------------------------------------
    let start = Instant::now();
    let run_for = Duration::from_secs(seconds);
    let produced = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(produce(
        move |seq| {
            // An error only means that no client is connected.
            let _ = events.send(seq);
        },
        args.rate,
        run_for,
        produced.clone(),
    ));
    let stall = (start + run_for * 2 / 5)..(start + run_for * 7 / 10);
    let hurry = Arc::new(AtomicBool::new(false));
    let fast = fast.read(Pace::Fast, None);
    let slow = slow.read(
        Pace::Slow {
            stall: stall.clone(),
            hurry: hurry.clone(),
            since_nap: 0,
        },
        None,
    );

    let mut ticker =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    for second in 1..=seconds {
        ticker.tick().await;
        let now = Instant::now();
        let (fast_line, slow_line) = {
            let observed = observed.lock().unwrap();
            (
                fast.live(&observed, args.capacity),
                slow.live(&observed, args.capacity),
            )
        };
        // Read after the clients' counts, so that it is never below them.
        let produced = produced.load(Ordering::Relaxed);
        let stalled = if stall.contains(&now) {
            "  (stalled)"
        } else {
            ""
        };
        println!(
            "[{second:>2}s] produced {produced:>7} | fast: {fast_line} | slow: {slow_line}{stalled}"
        );
    }

    // --- Stop and drain --------------------------------------------------
    // The producer returns after `--seconds`, dropping the only strong
    // sender: every client's stream ends after the events already sent.
    let produced = producer.await?;
    // Let the slow client read the rest at full speed so that the demo ends.
    hurry.store(true, Ordering::Relaxed);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let fast = fast.task.await;
        let slow = slow.task.await;
        (fast, slow)
    })
    .await;
    let read_errors = match drained {
        Ok((fast_result, slow_result)) => [("fast", fast_result), ("slow", slow_result)]
            .into_iter()
            .filter_map(|(name, result)| match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{name} client: {e}")),
                Err(e) => Some(format!("{name} client task: {e}")),
            })
            .collect::<Vec<_>>(),
        Err(_) => vec![format!(
            "the clients did not finish within {DRAIN_TIMEOUT:?}"
        )],
    };
    // `Closed` has fired by the time a client sees the end of its stream;
    // allow a moment in case a connection closes the other way round.
    for _ in 0..100 {
        let all_closed = {
            let observed = observed.lock().unwrap();
            [fast.local, slow.local]
                .iter()
                .all(|peer| observed.get(peer).is_some_and(|o| o.closed.is_some()))
        };
        if all_closed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // --- The books -------------------------------------------------------
    let fast_seen = *fast.tally.lock().unwrap();
    let slow_seen = *slow.tally.lock().unwrap();
    let (fast_layer, slow_layer) = {
        let observed = observed.lock().unwrap();
        (
            observed.get(&fast.local).copied().unwrap_or_default(),
            observed.get(&slow.local).copied().unwrap_or_default(),
        )
    };
    let lagged: u64 = lagged.lock().unwrap().values().sum();
    let fast = (&fast_seen, &fast_layer);
    let slow = (&slow_seen, &slow_layer);
    summary(produced, [("fast", fast), ("slow", slow)]);

    let checks = check(produced, fast, slow, lagged, &read_errors);
    println!("\nchecks:");
    for (ok, text) in &checks {
        println!("  [{}] {text}", if *ok { " ok " } else { "FAIL" });
    }
    let failed = checks.iter().filter(|(ok, _)| !ok).count();
    let dropped = slow_layer.stats.dropped;
    if failed == 0 && dropped > 0 {
        println!(
            "\nPASS: the fast client got all {produced} events; the slow client got the newest {} \
             and lost {dropped} older ones, each counted by the layer",
            slow_seen.received
        );
    } else if failed == 0 {
        println!(
            "\nPASS, but the slow client kept up: nothing to drop at {} events/s with {} frames \
             of buffer (try a higher --rate or a smaller --capacity)",
            args.rate, args.capacity
        );
    } else {
        println!("\nFAIL: {failed} of {} checks failed", checks.len());
    }
    Ok(failed == 0)
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

/// What the observer last heard about one client, by peer address.
#[derive(Debug, Default, Clone, Copy)]
struct LayerView {
    /// The buffer's counters as of the latest event.
    stats: BufferStats,
    /// `Pressure` events: times the client crossed the threshold.
    pressure_episodes: u64,
    /// Set by `Closed`, the last event of a client.
    closed: Option<CloseReason>,
}

type Observed = Arc<Mutex<HashMap<SocketAddr, LayerView>>>;

/// Events lost before the layer (a pump that lagged on the broadcast
/// channel), by client.
type Lagged = Arc<Mutex<HashMap<SocketAddr, u64>>>;

#[derive(Clone)]
struct AppState {
    /// Weak, so that the producer holds the only strong sender and the
    /// streams end when it finishes.
    events: broadcast::WeakSender<u64>,
    lagged: Lagged,
}

/// The layer, with an observer that records every client's latest stats in
/// `observed` and lists it in `registry`.
fn layer(
    config: BufferConfig,
    observed: Observed,
    registry: ClientRegistry,
) -> Result<BackpressureLayer<DefaultPredicate, impl BackpressureObserver>, ConfigError> {
    let record = move |event: &BackpressureEvent<'_>| {
        // Runs on the hot path with the client's buffer locked: be quick.
        let Some(peer) = event.client.peer_addr() else {
            return;
        };
        let mut observed = observed.lock().unwrap();
        let view = observed.entry(peer).or_default();
        view.stats = event.stats;
        match event.kind {
            EventKind::Pressure => view.pressure_episodes += 1,
            EventKind::Closed { reason } => view.closed = Some(reason),
            _ => {}
        }
    };
    Ok(BackpressureLayer::try_new(config)?.observer((record, registry)))
}

/// `GET /events` behind the backpressure layer: each client's own stream
/// from the broadcast channel, pumped into its own ring.
fn app(
    config: BufferConfig,
    events: broadcast::WeakSender<u64>,
    lagged: Lagged,
    observed: Observed,
    registry: ClientRegistry,
) -> Result<Router, ConfigError> {
    Ok(Router::new()
        .route("/events", get(sse_events))
        .with_state(AppState { events, lagged })
        .layer(layer(config, observed, registry)?))
}

async fn sse_events(
    State(app): State<AppState>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, StatusCode> {
    let events = app
        .events
        .upgrade()
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    let lagged = app.lagged;
    let stream = BroadcastStream::new(events.subscribe()).filter_map(move |message| {
        futures::future::ready(match message {
            Ok(seq) => Some(Ok(Event::default().id(seq.to_string()).data(PAYLOAD))),
            // The pump drains this receiver as fast as events come, so it
            // lags only if starved of CPU; count it, the checks report it.
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                *lagged.lock().unwrap().entry(peer).or_default() += n;
                None
            }
        })
    });
    Ok(Sse::new(stream))
}

/// `GET /events` from a hub (`--hub`): every client a window over the one
/// log, behind the same layer; each response ends after `limit` events.
fn hub_app(
    config: BufferConfig,
    hub: Hub,
    limit: u64,
    observed: Observed,
    registry: ClientRegistry,
) -> Result<Router, ConfigError> {
    let events = get(move || {
        let response: http::Response<HubBody> = hub.response().limit(Some(limit)).build();
        std::future::ready(response)
    });
    Ok(Router::new()
        .route("/events", events)
        .layer(layer(config, observed, registry)?))
}

/// Serves `app` on `listener`, HTTP/1.1 or HTTP/2 as `axum::serve` does, and
/// gives each request its connection's peer address as a [`PeerAddr`]
/// extension: the layer names each client by it, which is how the observer
/// tells the fast client from the slow one. (With the crate's `axum`
/// feature, the layer also reads axum's `ConnectInfo`, so `axum::serve` with
/// `into_make_service_with_connect_info` would do.)
async fn serve(listener: TcpListener, app: Router) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("error: server failed: {e}");
                return;
            }
        };
        let svc = tower::ServiceBuilder::new()
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer));
                request
            })
            .service(app.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
            .into_owned();
        tokio::spawn(connection);
    }
}

/// A listener on a free loopback port whose connections have a small send
/// buffer.
///
/// Accepted sockets inherit it. Without it Linux grows a loopback
/// connection's send buffer to megabytes, and the kernel would hold many
/// seconds of this demo's events for the stalled client before the layer
/// had anything to drop. Real servers need not do this: the layer bounds
/// what sits *above* the socket.
fn bind_loopback() -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_send_buffer_size(16 * 1024)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    // Room for `--hub`'s clients, which connect at once.
    socket.listen(1024)
}

/// Emits `rate` events per second for `run_for`, ids 0, 1, 2, ..., each
/// handed to `emit`, and returns how many. `emit` is dropped at the end
/// (dropping a broadcast sender ends every stream).
async fn produce(
    mut emit: impl FnMut(u64),
    rate: u64,
    run_for: Duration,
    produced: Arc<AtomicU64>,
) -> u64 {
    let total = rate * run_for.as_secs();
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    // Each tick emits what is due since the start: a late tick is made up by
    // the next one, and high rates need no tick per event.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut seq = 0;
    while seq < total {
        ticker.tick().await;
        let due = (start.elapsed().as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
        while seq < due.min(total) {
            // Counted before it is sent: no client is ever ahead of the count.
            produced.store(seq + 1, Ordering::Relaxed);
            emit(seq);
            seq += 1;
        }
    }
    seq
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/// What a client has seen of the id sequence.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    received: u64,
    last_id: Option<u64>,
    /// Runs of missing ids, and how many ids they hold.
    gaps: u64,
    missed: u64,
    /// Ids not above the previous one (must stay 0).
    out_of_order: u64,
}

impl Tally {
    fn record(&mut self, id: u64) {
        self.received += 1;
        let expected = match self.last_id {
            Some(last) if id <= last => {
                self.out_of_order += 1;
                return;
            }
            Some(last) => last + 1,
            None => 0,
        };
        if id > expected {
            self.gaps += 1;
            self.missed += id - expected;
        }
        self.last_id = Some(id);
    }
}

/// How a client reads.
enum Pace {
    /// As fast as the data comes.
    Fast,
    /// `SLOW_READ` bytes every `SLOW_NAP`, nothing at all during `stall`,
    /// full speed once `hurry` is set.
    Slow {
        stall: std::ops::Range<Instant>,
        hurry: Arc<AtomicBool>,
        since_nap: usize,
    },
}

impl Pace {
    async fn after_read(&mut self, bytes: usize) {
        let Pace::Slow {
            stall,
            hurry,
            since_nap,
        } = self
        else {
            return;
        };
        if hurry.load(Ordering::Relaxed) {
            return;
        }
        if stall.contains(&Instant::now()) {
            tokio::time::sleep_until(stall.end).await;
        }
        *since_nap += bytes;
        if *since_nap >= SLOW_READ {
            *since_nap = 0;
            tokio::time::sleep(SLOW_NAP).await;
        }
    }
}

/// One HTTP/1.1 connection with a `GET /events` response open on it.
struct Client {
    /// The client's own address: the peer address the layer reports.
    local: SocketAddr,
    body: Incoming,
    /// Kept so that the connection stays open until the body is read.
    sender: SendRequest,
}

impl Client {
    async fn connect(server: SocketAddr, recv_buffer: Option<u32>) -> Result<Self, BoxError> {
        let socket = TcpSocket::new_v4()?;
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        let stream = socket.connect(server).await?;
        let local = stream.local_addr()?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Drives the connection; its errors show up in the body.
        tokio::spawn(connection);
        let request = hyper::Request::get("/events")
            .header(hyper::header::HOST, server.to_string())
            .body(Empty::new())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(format!("GET /events: {}", response.status()).into());
        }
        Ok(Self {
            local,
            body: response.into_body(),
            sender,
        })
    }

    /// Reads the stream in a task, at `pace`, counting the ids.
    /// Reads the stream in a task, at `pace`, counting the ids; with
    /// `until`, a client that has seen that id waits at most
    /// [`END_GRACE`] for the end of the stream, then leaves.
    fn read(self, pace: Pace, until: Option<u64>) -> Reader {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let task = tokio::spawn(read_events(
            self.body,
            pace,
            until,
            tally.clone(),
            self.sender,
        ));
        Reader {
            local: self.local,
            tally,
            task,
        }
    }
}

/// A client reading in the background.
struct Reader {
    local: SocketAddr,
    tally: Arc<Mutex<Tally>>,
    task: JoinHandle<Result<(), hyper::Error>>,
}

impl Reader {
    /// `delivered 6000  buffered   0/256  dropped     0`
    fn live(&self, observed: &HashMap<SocketAddr, LayerView>, capacity: usize) -> String {
        let received = self.tally.lock().unwrap().received;
        let stats = observed
            .get(&self.local)
            .map(|v| v.stats)
            .unwrap_or_default();
        format!(
            "delivered {received:>6}  buffered {:>w$}/{capacity}  dropped {:>6}",
            stats.buffered,
            stats.dropped,
            w = capacity.to_string().len()
        )
    }
}

/// Reads SSE lines until the stream ends, recording every `id:`.
async fn read_events(
    mut body: Incoming,
    mut pace: Pace,
    until: Option<u64>,
    tally: Arc<Mutex<Tally>>,
    _connection: SendRequest,
) -> Result<(), hyper::Error> {
    let mut pending = Vec::new();
    loop {
        let seen_all = until.is_some() && tally.lock().unwrap().last_id >= until;
        let frame = if seen_all {
            match tokio::time::timeout(END_GRACE, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => break,
            }
        } else {
            body.frame().await
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        let mut used = 0;
        {
            let mut tally = tally.lock().unwrap();
            while let Some(end) = pending[used..].iter().position(|&b| b == b'\n') {
                let line = &pending[used..used + end];
                if let Some(id) = line.strip_prefix(b"id: ") {
                    if let Some(id) = std::str::from_utf8(id).ok().and_then(|s| s.parse().ok()) {
                        tally.record(id);
                    }
                }
                used += end + 1;
            }
        }
        pending.drain(..used);
        pace.after_read(data.len()).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn summary(produced: u64, rows: [(&str, (&Tally, &LayerView)); 2]) {
    println!(
        "\nproducer stopped after {produced} events (ids 0..={})\n",
        show(produced.checked_sub(1))
    );
    println!("        client side: ids read                    | layer: the observer's last event");
    println!(
        "        {:>8} {:>7} {:>5} {:>8} {:>7} | {:>7} {:>7} {:>7} {:>10} {:>8}  closed",
        "received",
        "missed",
        "gaps",
        "disorder",
        "last id",
        "pushed",
        "sent",
        "dropped",
        "high water",
        "pressure"
    );
    for (name, (seen, layer)) in rows {
        let st = &layer.stats;
        println!(
            "  {name:<5} {:>8} {:>7} {:>5} {:>8} {:>7} | {:>7} {:>7} {:>7} {:>10} {:>7}x  {}",
            seen.received,
            seen.missed,
            seen.gaps,
            seen.out_of_order,
            show(seen.last_id),
            st.pushed,
            st.sent,
            st.dropped,
            format!("{}/{}", st.high_water, st.capacity),
            layer.pressure_episodes,
            layer
                .closed
                .map_or_else(|| "no".to_owned(), |r| r.to_string()),
        );
    }
}

/// The verdict: each check passed or not, and what it says.
fn check(
    produced: u64,
    (fast, fast_layer): (&Tally, &LayerView),
    (slow, slow_layer): (&Tally, &LayerView),
    lagged: u64,
    read_errors: &[String],
) -> Vec<(bool, String)> {
    let (fl, sl) = (&fast_layer.stats, &slow_layer.stats);
    let newest = produced.checked_sub(1);
    let mut checks = vec![
        (
            fast.received == produced && fast.missed == 0 && fast.out_of_order == 0,
            format!(
                "fast client received every event, in order: {} of {produced}, {} gaps",
                fast.received, fast.gaps
            ),
        ),
        (
            fl.dropped == 0 && fl.sent == produced,
            format!(
                "the layer dropped nothing for the fast client ({} dropped)",
                fl.dropped
            ),
        ),
        (
            slow.out_of_order == 0,
            format!(
                "slow client's ids strictly increase ({} out of order)",
                slow.out_of_order
            ),
        ),
        (
            slow.received + sl.dropped == produced,
            format!(
                "slow client: received {} + dropped {} == produced {produced}",
                slow.received, sl.dropped
            ),
        ),
        (
            slow.missed == sl.dropped,
            format!(
                "slow client: the ids it missed ({} in {} gaps) are the events the layer dropped ({})",
                slow.missed, slow.gaps, sl.dropped
            ),
        ),
        (
            slow.last_id == newest,
            format!(
                "slow client got the newest event: last id {} (newest {})",
                show(slow.last_id),
                show(newest)
            ),
        ),
    ];
    for (name, layer) in [("fast", fast_layer), ("slow", slow_layer)] {
        let st = &layer.stats;
        checks.push((
            layer.closed.is_some() && st.pushed == produced && st.sent + st.dropped == st.pushed,
            format!(
                "{name} stream closed ({}): pushed {} == produced, sent {} + dropped {} == pushed",
                layer
                    .closed
                    .map_or_else(|| "not closed".to_owned(), |r| r.to_string()),
                st.pushed,
                st.sent,
                st.dropped
            ),
        ));
    }
    checks.push((
        lagged == 0,
        format!("no event was lost before the layer (broadcast lag: {lagged})"),
    ));
    checks.push(if read_errors.is_empty() {
        (true, "both clients read their stream to the end".to_owned())
    } else {
        (false, read_errors.join("; "))
    });
    checks
}

fn show(id: Option<u64>) -> String {
    id.map_or_else(|| "-".to_owned(), |id| id.to_string())
}

// ---------------------------------------------------------------------------
// `--hub`: a fast client next to many stalled ones, hub and per-client path
// ---------------------------------------------------------------------------

/// How long the stalled clients get to be listed, and their accounts to
/// settle, before and after an act.
const SETTLE: Duration = Duration::from_secs(10);

/// Which server an act runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// A hub's log, a window per client.
    Hub,
    /// A broadcast channel, a pump and a ring per client.
    PerClient,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Hub => "hub",
            Path::PerClient => "per-client path",
        }
    }
}

/// What one act measured.
struct Act {
    path: Path,
    produced: u64,
    seconds: u64,
    /// The process's CPU time while the producer ran.
    cpu: Option<Duration>,
    /// How much the resident set grew while the producer ran (the clients
    /// were connected before, and still are).
    rss_growth: Option<i64>,
    fast: Tally,
    fast_layer: LayerView,
    /// Events the fast client's pump lost on the broadcast channel.
    fast_lag: u64,
    /// Every stalled client's counters at the end, and what its pump lost on
    /// the broadcast channel.
    stalled: Vec<(Option<BufferStats>, u64)>,
    /// The hub's log: (frames published, frames retained, retention).
    hub: Option<(u64, usize, usize)>,
    /// The registry emptied once the stalled clients went away.
    all_closed: bool,
    read_errors: Vec<String>,
}

async fn hub_acts(args: Args) -> Result<bool, BoxError> {
    let seconds = args.seconds.unwrap_or(5);
    println!(
        "A fast client next to {} stalled ones (each a TCP connection with a 4 KiB receive \
         window that sent its GET and never reads), {} events/s for {seconds}s per act, \
         {} frames per client.",
        args.stalled, args.rate, args.capacity
    );
    let mut acts = Vec::new();
    for (n, path) in [Path::Hub, Path::PerClient].into_iter().enumerate() {
        println!("\nact {} of 2: the {}", n + 1, path.name());
        acts.push(act(path, &args, seconds).await?);
    }
    let [hub, per_client] = <[Act; 2]>::try_from(acts).map_err(|_| "two acts")?;
    compare(&per_client, &hub, args.stalled);

    let mut checks = act_checks(&hub);
    checks.extend(act_checks(&per_client));
    println!("\nchecks:");
    for (ok, text) in &checks {
        println!("  [{}] {text}", if *ok { " ok " } else { "FAIL" });
    }
    let failed = checks.iter().filter(|(ok, _)| !ok).count();
    if failed == 0 {
        println!(
            "\nPASS: through the hub, {} stalled clients cost {} of CPU against {} through \
             the per-client path, and the fast client got every event",
            args.stalled,
            show_cpu(hub.cpu),
            show_cpu(per_client.cpu)
        );
    } else {
        println!("\nFAIL: {failed} of {} checks failed", checks.len());
    }
    Ok(failed == 0)
}

/// One act: the server of `path`, `args.stalled` clients that never read
/// and a fast one; the producer runs for `seconds`.
async fn act(path: Path, args: &Args, seconds: u64) -> Result<Act, BoxError> {
    let config = BufferConfig::new(args.capacity);
    let total = args.rate * seconds;
    let observed = Observed::default();
    let registry = ClientRegistry::new();
    let lagged = Lagged::default();
    // The server, and what the producer does with each event.
    let mut hub = None;
    let (app, emit): (Router, Box<dyn FnMut(u64) + Send>) = match path {
        Path::Hub => {
            let log: Hub = Hub::new(HubConfig::default());
            hub = Some(log.clone());
            let app = hub_app(
                config,
                log.clone(),
                total,
                observed.clone(),
                registry.clone(),
            )?;
            let emit = move |seq| {
                // Encoded once, with its id, for every client.
                let id = log.publish_with(|id| sse::frame(id, None, PAYLOAD));
                debug_assert_eq!(id, seq);
            };
            (app, Box::new(emit))
        }
        Path::PerClient => {
            let (events, _) = broadcast::channel(4096);
            let app = app(
                config,
                events.downgrade(),
                lagged.clone(),
                observed.clone(),
                registry.clone(),
            )?;
            let emit = move |seq| {
                let _ = events.send(seq);
            };
            (app, Box::new(emit))
        }
    };
    let listener = bind_loopback()?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(serve(listener, app));

    // --- The clients -----------------------------------------------------
    let stalled: Vec<(TcpStream, SocketAddr)> = futures::stream::iter(0..args.stalled)
        .map(|_| stall(addr))
        .buffer_unordered(32)
        .try_collect()
        .await?;
    let fast = Client::connect(addr, None).await?;
    // Every client is subscribed before the first event.
    let want = stalled.len() + 1;
    let listed = tokio::time::timeout(SETTLE, async {
        while registry.len() < want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if listed.is_err() {
        return Err(format!("{} of {want} clients were served", registry.len()).into());
    }

    // --- Run -------------------------------------------------------------
    // Measured from here: what the events cost, not the connections.
    let before = Usage::now();
    let start = Instant::now();
    let run_for = Duration::from_secs(seconds);
    let produced = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(produce(emit, args.rate, run_for, produced.clone()));
    // The hub's responses end after `total` events: one that lost any
    // never gets there, and leaves once it has seen the newest.
    let fast = fast.read(Pace::Fast, total.checked_sub(1));
    let stalled_peers: Vec<SocketAddr> = stalled.iter().map(|(_, peer)| *peer).collect();
    let mut ticker =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = Usage::now();
    for second in 1..=seconds {
        ticker.tick().await;
        let now = Usage::now();
        let delivered = fast.tally.lock().unwrap().received;
        let dropped: u64 = registry
            .handles()
            .iter()
            .filter(|h| h.info().peer_addr() != Some(fast.local))
            .filter_map(|h| h.stats())
            .map(|s| s.dropped)
            .sum();
        let produced = produced.load(Ordering::Relaxed);
        println!(
            "[{second:>2}s] produced {produced:>7} | fast: delivered {delivered:>7} | stalled: \
             dropped {dropped:>9} | CPU {:>4} of a core, RSS {:>9}",
            show_share(now.cpu_since(&last), Duration::from_secs(1)),
            show_bytes(now.rss),
        );
        last = now;
    }
    let produced = producer.await?;
    let end = Usage::now();

    // --- Drain and settle --------------------------------------------------
    let mut read_errors = Vec::new();
    let mut task = fast.task;
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => read_errors.push(format!("fast client: {e}")),
        Ok(Err(e)) => read_errors.push(format!("fast client task: {e}")),
        Err(_) => {
            task.abort();
            read_errors.push(format!(
                "the fast client did not finish within {DRAIN_TIMEOUT:?}"
            ));
        }
    }
    // The windows are brought up to date by the hub's sweep (every 100
    // ms), the rings by their pumps: wait until every stalled client
    // accounts for every event, or the time is up (the checks tell).
    let accounts = || -> Vec<(Option<BufferStats>, u64)> {
        let handles = registry.handles();
        let lagged = lagged.lock().unwrap();
        stalled_peers
            .iter()
            .map(|peer| {
                let stats = handles
                    .iter()
                    .find(|h| h.info().peer_addr() == Some(*peer))
                    .and_then(|h| h.stats());
                (stats, lagged.get(peer).copied().unwrap_or(0))
            })
            .collect()
    };
    let settled = |accounts: &[(Option<BufferStats>, u64)]| {
        accounts
            .iter()
            .all(|(stats, lag)| stats.is_some_and(|s| s.pushed + lag == produced))
    };
    let deadline = Instant::now() + SETTLE;
    let mut stalled_accounts = accounts();
    while !settled(&stalled_accounts) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stalled_accounts = accounts();
    }
    let fast_layer = observed
        .lock()
        .unwrap()
        .get(&fast.local)
        .copied()
        .unwrap_or_default();
    let fast_lag = lagged
        .lock()
        .unwrap()
        .get(&fast.local)
        .copied()
        .unwrap_or(0);

    // --- The stalled clients leave ------------------------------------------
    drop(stalled);
    let all_closed = tokio::time::timeout(SETTLE, async {
        while registry.handles().iter().any(|h| {
            h.info()
                .peer_addr()
                .is_some_and(|p| stalled_peers.contains(&p))
        }) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok();
    server.abort();

    let act = Act {
        path,
        produced,
        seconds,
        cpu: end.cpu_since(&before),
        rss_growth: end.rss_growth_since(&before),
        fast: *fast.tally.lock().unwrap(),
        fast_layer,
        fast_lag,
        stalled: stalled_accounts,
        hub: hub.map(|hub| {
            (
                hub.published(),
                hub.retained(),
                hub.config().retain_frames(),
            )
        }),
        all_closed,
        read_errors,
    };
    println!(
        "the {}: {} of CPU over {seconds}s, resident memory {}",
        path.name(),
        show_cpu(act.cpu),
        show_growth(act.rss_growth),
    );
    Ok(act)
}

/// A client that sends `GET /events` on a connection with a small receive
/// window, then never reads. Returns the connection and its address (the
/// peer address the layer reports).
async fn stall(server: SocketAddr) -> Result<(TcpStream, SocketAddr), BoxError> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(server).await?;
    let local = stream.local_addr()?;
    stream
        .write_all(format!("GET /events HTTP/1.1\r\nhost: {server}\r\n\r\n").as_bytes())
        .await?;
    Ok((stream, local))
}

/// The two acts side by side.
fn compare(per_client: &Act, hub: &Act, stalled: u64) {
    println!(
        "\n{stalled} stalled clients and a fast one, {} events over {}s per act:\n",
        hub.produced, hub.seconds
    );
    println!("{:<44} {:>22} {:>22}", "", "per-client path", "hub");
    let row = |what: &str, f: &dyn Fn(&Act) -> String| {
        println!("{what:<44} {:>22} {:>22}", f(per_client), f(hub));
    };
    row("CPU of this process while the producer ran", &|a| {
        format!(
            "{} ({})",
            show_cpu(a.cpu),
            show_share(a.cpu, Duration::from_secs(a.seconds))
        )
    });
    row("resident memory grew by, meanwhile", &|a| {
        show_growth(a.rss_growth)
    });
    row("fast client: events received, in order", &|a| {
        format!("{} of {}", a.fast.received, a.produced)
    });
    row("fast client: events lost", &|a| {
        (a.fast_layer.stats.dropped + a.fast_lag).to_string()
    });
    row("frames held for the stalled clients", &|a| match a.hub {
        None => {
            let held: usize = a
                .stalled
                .iter()
                .filter_map(|(s, _)| s.map(|s| s.buffered))
                .sum();
            format!("{held} (a ring each)")
        }
        Some((_, retained, _)) => format!("{retained} (1 shared log)"),
    });
    row("stalled clients: events dropped, in all", &|a| {
        a.stalled
            .iter()
            .filter_map(|(s, _)| s.map(|s| s.dropped))
            .sum::<u64>()
            .to_string()
    });
    if let (Some(p), Some(h)) = (per_client.cpu, hub.cpu) {
        if h > Duration::ZERO {
            println!(
                "\nthe per-client path took {:.1}x the CPU of the hub",
                p.as_secs_f64() / h.as_secs_f64()
            );
        }
    }
}

/// An act's checks: its books balance; through the hub the fast client got
/// every event.
fn act_checks(act: &Act) -> Vec<(bool, String)> {
    let name = act.path.name();
    let produced = act.produced;
    let (fast, fl) = (&act.fast, &act.fast_layer.stats);
    let mut checks = Vec::new();
    if act.path == Path::Hub {
        checks.push((
            fast.received == produced && fast.missed == 0 && fast.out_of_order == 0,
            format!(
                "{name}: the fast client received every event, in order: {} of {produced}",
                fast.received
            ),
        ));
    }
    checks.push((
        fast.out_of_order == 0
            && fast.received + fast.missed == produced
            && fast.missed == fl.dropped + act.fast_lag
            && fast.last_id == produced.checked_sub(1),
        format!(
            "{name}: fast client: received {} + missed {} == produced {produced}, and the ids \
             it missed are the events lost for it (dropped {} + lost before the layer {})",
            fast.received, fast.missed, fl.dropped, act.fast_lag
        ),
    ));
    checks.push((
        act.fast_layer.closed.is_some()
            && fl.sent + fl.dropped == fl.pushed
            && fl.pushed + act.fast_lag == produced,
        format!(
            "{name}: fast stream closed ({}): sent {} + dropped {} == pushed {} == produced - \
             lost before the layer",
            act.fast_layer
                .closed
                .map_or_else(|| "not closed".to_owned(), |r| r.to_string()),
            fl.sent,
            fl.dropped,
            fl.pushed
        ),
    ));
    let balanced = act
        .stalled
        .iter()
        .filter(|(stats, lag)| {
            stats.is_some_and(|s| {
                s.pushed + lag == produced
                    && s.sent + s.dropped + s.replaced + s.buffered as u64 == s.pushed
                    && s.buffered <= s.capacity
            })
        })
        .count();
    checks.push((
        balanced == act.stalled.len(),
        format!(
            "{name}: each stalled client accounts for every event (sent + dropped + waiting + \
             lost before the layer == produced, waiting <= capacity): {balanced} of {}",
            act.stalled.len()
        ),
    ));
    if let Some((published, retained, retain)) = act.hub {
        checks.push((
            published == produced && retained == (produced as usize).min(retain),
            format!(
                "{name}: one log holds each event once: {published} published, the newest \
                 {retained} retained (retention {retain})"
            ),
        ));
    }
    checks.push((
        act.all_closed,
        format!("{name}: every stalled client's stream closed when it went away"),
    ));
    checks.push(if act.read_errors.is_empty() {
        (
            true,
            format!("{name}: the fast client read its stream to the end"),
        )
    } else {
        (false, format!("{name}: {}", act.read_errors.join("; ")))
    });
    checks
}

/// The process's CPU time and resident set, from `/proc/self` (Linux);
/// `None` where it is not available.
#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu: Option<Duration>,
    rss: Option<u64>,
}

impl Usage {
    fn now() -> Self {
        Self {
            cpu: cpu_time(),
            rss: resident_bytes(),
        }
    }

    fn cpu_since(&self, earlier: &Usage) -> Option<Duration> {
        Some(self.cpu?.saturating_sub(earlier.cpu?))
    }

    fn rss_growth_since(&self, earlier: &Usage) -> Option<i64> {
        Some(self.rss? as i64 - earlier.rss? as i64)
    }
}

/// User + system CPU time of this process (all its threads).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses: state is
    // field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// Clock ticks per second of `/proc/self/stat` (`getconf CLK_TCK`; 100 on
/// every Linux this runs on).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// `VmRSS` of this process, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn show_cpu(cpu: Option<Duration>) -> String {
    cpu.map_or_else(|| "n/a".to_owned(), |c| format!("{:.2} s", c.as_secs_f64()))
}

/// `cpu` as a share of one core over `over`.
fn show_share(cpu: Option<Duration>, over: Duration) -> String {
    cpu.map_or_else(
        || "n/a".to_owned(),
        |c| format!("{:.0} %", 100.0 * c.as_secs_f64() / over.as_secs_f64()),
    )
}

fn show_bytes(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".to_owned(),
        |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
    )
}

fn show_growth(bytes: Option<i64>) -> String {
    bytes.map_or_else(
        || "n/a".to_owned(),
        |b| format!("{:+.1} MiB", b as f64 / (1 << 20) as f64),
    )
}
