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

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use clap::Parser;
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BufferConfig, BufferStats, CloseReason, ConfigError,
    EventKind, PeerAddr,
};

/// The `data:` of every event.
const PAYLOAD: &str = "the quick brown fox jumps over the lazy dog";
/// The slow client reads this many bytes, then naps.
const SLOW_READ: usize = 1024;
const SLOW_NAP: Duration = Duration::from_millis(50);
/// How long the clients get to read what is left once the producer stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

type BoxError = Box<dyn Error + Send + Sync>;
type SendRequest = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A fast and a slow SSE client behind tower-backpressure: watch the slow one
/// lose only its oldest events while the fast one gets them all.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// How long the producer runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Events per second.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
    /// Frames buffered per client before the oldest are dropped.
    #[arg(long, value_name = "FRAMES", default_value_t = 256)]
    capacity: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    // --- The server ------------------------------------------------------
    let (events, _) = broadcast::channel(4096);
    let lagged = Arc::new(AtomicU64::new(0));
    let observed = Observed::default();
    let app = app(
        BufferConfig::new(args.capacity),
        events.downgrade(),
        lagged.clone(),
        observed.clone(),
    )?;
    let listener = bind_loopback()?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, app));
    println!(
        "SSE server on http://{addr}/events: {} events/s for {}s, buffer of {} frames per client",
        args.rate, args.seconds, args.capacity
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
    let run_for = Duration::from_secs(args.seconds);
    let produced = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(produce(events, args.rate, run_for, produced.clone()));
    let stall = (start + run_for * 2 / 5)..(start + run_for * 7 / 10);
    let hurry = Arc::new(AtomicBool::new(false));
    let fast = fast.read(Pace::Fast);
    let slow = slow.read(Pace::Slow {
        stall: stall.clone(),
        hurry: hurry.clone(),
        since_nap: 0,
    });

    let mut ticker =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    for second in 1..=args.seconds {
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
    let lagged = lagged.load(Ordering::Relaxed);
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

#[derive(Clone)]
struct AppState {
    /// Weak, so that the producer holds the only strong sender and the
    /// streams end when it finishes.
    events: broadcast::WeakSender<u64>,
    lagged: Arc<AtomicU64>,
}

/// `GET /events` behind the backpressure layer, with an observer that
/// records every client's latest stats in `observed`.
fn app(
    config: BufferConfig,
    events: broadcast::WeakSender<u64>,
    lagged: Arc<AtomicU64>,
    observed: Observed,
) -> Result<Router, ConfigError> {
    let layer =
        BackpressureLayer::try_new(config)?.observer(move |event: &BackpressureEvent<'_>| {
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
        });
    Ok(Router::new()
        .route("/events", get(sse_events))
        .with_state(AppState { events, lagged })
        .layer(layer))
}

async fn sse_events(
    State(app): State<AppState>,
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
                lagged.fetch_add(n, Ordering::Relaxed);
                None
            }
        })
    });
    Ok(Sse::new(stream))
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
    socket.listen(64)
}

/// Emits `rate` events per second for `run_for`, ids 0, 1, 2, ..., and
/// returns how many. Dropping `events` at the end ends every stream.
async fn produce(
    events: broadcast::Sender<u64>,
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
            // An error only means that no client is connected.
            let _ = events.send(seq);
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
    fn read(self, pace: Pace) -> Reader {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let task = tokio::spawn(read_events(self.body, pace, tally.clone(), self.sender));
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
    tally: Arc<Mutex<Tally>>,
    _connection: SendRequest,
) -> Result<(), hyper::Error> {
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
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
