//! A Server-Sent Events server whose every client goes through
//! [`BackpressureLayer`].
//!
//! One producer task emits events at `--rate` events per second; every
//! connected client gets the same events, each with `id: <seq>` (one
//! sequence shared by all clients, starting at 0) and a `data:` payload of
//! `--size` bytes. A client that reads too slowly does not slow the producer
//! or the other clients: its own buffer of `--capacity` frames drops its
//! oldest events, and `TracingObserver` logs the episode on stderr.
//!
//! ```text
//! cargo run --release --example sse_server --features axum,metrics -- --rate 5000
//! curl -N http://127.0.0.1:3000/events
//! ```
//!
//! It needs the crate's `axum` feature, with which the layer reads each
//! client's address from axum's `ConnectInfo` (set by the accept loop in
//! `examples/common/serve.rs`): the logs and `/health/clients` name clients
//! by it; and its `metrics` feature, for `GET /metrics`.
//!
//! To see a slow client lose events, throttle curl:
//! `curl -N --limit-rate 20k http://127.0.0.1:3000/events`; the stream marks
//! each gap with `event: lagged` (`--gap-marker off` to leave it out), and
//! `curl http://127.0.0.1:3000/health/clients` shows every client's buffer.
//!
//! Slow-client policies: `--policy drop-oldest|drop-newest|pause|disconnect`,
//! `--evict-after-dropped N`, `--evict-after-stall-ms T`, and
//! `--budget-bytes B` for one memory budget shared by all clients.
//! `--flush coalesce` (the default, as the library's, for each client's own
//! buffer) hands hyper the events that already wait for a client as one
//! frame; `--flush immediate` hands them out one frame each. With `--hub`
//! the default hands out the hub's shared frames one at a time, as the
//! library does for a hub window (a join copies them for each client);
//! `--flush coalesce` joins them too.
//!
//! `GET /stream.ndjson` serves the same events as NDJSON
//! (`application/x-ndjson`), one line `{"seq":N,"payload":"…"}` per event,
//! through the same layer. Both routes speak HTTP/1.1 and HTTP/2 (cleartext,
//! prior knowledge) on the same port:
//! `curl -N --http2-prior-knowledge http://127.0.0.1:3000/stream.ndjson`.
//!
//! `--passthrough` serves the same stream without the layer, so the two can
//! be compared with any client (see `BENCHMARKS.md`): a slow client then
//! lags on the shared broadcast channel and silently misses events.
//!
//! `--hub` serves both routes from [`Hub`]s instead: the producer encodes
//! each event once per format (an SSE frame with `id: <seq>`, an NDJSON
//! line) and publishes it under its sequence number into one shared log per
//! format, which retains the newest `--retain` events. Each client is a
//! window over that log behind the same layer (its `--capacity` and
//! `--max-bytes` bound how far it may fall behind): no task, no copy and no
//! work per event for a client that does not read. `/events` honours
//! `Last-Event-ID`: a client that reconnects gets every event after that id
//! the hub still retains, after a gap marker for any it no longer does.
//! `--policy pause` and `--policy drop-newest` cannot bound a window over a
//! shared log and are refused. With `--hub`, `--budget-bytes B` bounds the
//! hubs' logs (B/2 bytes each), which hold every event buffered for any
//! client (the clients hold none of their own); `--passthrough` serves the
//! hubs' subscriptions without the layer (no per-client bound: a client can
//! fall behind by the whole retention, and its gaps go unmarked).
//!
//! `--keep-alive-ms MS` (default 15000, `0`: off) sends a comment line
//! (`:`) on an `/events` stream that has been quiet for MS milliseconds,
//! in every mode, so that proxies and load balancers that cut idle
//! connections keep it (the layer's `KeepAlive`; with `--passthrough`,
//! axum's `Sse::keep_alive` or the hub response's own). Every `/events`
//! response says `Cache-Control: no-cache` and `X-Accel-Buffering: no`
//! (nginx then streams it instead of buffering it).
//!
//! `--close-after N` ends every `/events` response after N events, so that
//! clients reconnect (an `EventSource` does, sending `Last-Event-ID`): try
//! it with `--hub` to see resumption without loss.
//!
//! Routes:
//! - `GET /events`: SSE, `id: <seq>` (with `--hub`, `Last-Event-ID` resumes).
//! - `GET /stream.ndjson`: the same events as NDJSON.
//! - `GET /health/clients`: every open client's buffer, as JSON
//!   ([`ClientRegistry`]).
//! - `GET /health/hub`: each hub's numbers as JSON: frames published, let
//!   go of by the retention, retained (and bytes) against the retention's
//!   limits, oldest and newest ids, subscribers (`{"hubs":[]}` without
//!   `--hub`); see `examples/common/dashboard.rs`.
//! - `GET /metrics`: Prometheus text exposition (`metrics-exporter-prometheus`):
//!   the layer's `backpressure_*` series ([`MetricsObserver`]),
//!   `backpressure_clients_open`, and with `--hub` each hub's
//!   `backpressure_hub_*` series, labelled by `route`; see
//!   `examples/common/metrics.rs`.
//! - `GET /dashboard`: one self-contained page that shows every client live
//!   (buffer fill against its limits, drops, health, idle time) and, with
//!   `--hub`, the hubs' retention, refreshed every second from the two
//!   `/health` routes.
//!
//! # Scale out over NATS
//!
//! `--hub --nats URL [--subject S] [--jetstream]` runs no producer: both
//! hubs are fed from the NATS subject `S` (default `ticks`), where
//! `nats_publisher` (or any publisher that puts the event's id in an
//! `Event-Id` header and its data in the payload) publishes. Every server
//! fed from the subject holds the same events under the publisher's ids,
//! so a client can resume with `Last-Event-ID` on any of them. Events
//! published while a server is cut off from NATS never reach it: its
//! clients see them as one gap marker with the exact count. The server
//! connects before it listens (and exits non-zero if it cannot), then
//! keeps serving its clients through NATS outages (async-nats
//! reconnects by itself; the outages are logged).
//!
//! With `--jetstream` the subject's JetStream stream (see
//! `nats_publisher --jetstream`; made here with its default retention if
//! there is none yet) warms the hubs at start (the events it
//! retains, then the live ones, through one ordered consumer), and a
//! client whose `Last-Event-ID` is older than the SSE hub's oldest event
//! gets the events it missed from the stream first, so that it can resume
//! on a server that started after it left. `--nats` needs `--hub`, and
//! the binary built with the crate's `nats` feature
//! (`cargo run --example sse_server --features axum,metrics,nats -- --hub --nats nats://127.0.0.1:4222`).
//!
//! # Scale out over Redis
//!
//! `--hub --redis URL [--stream KEY]` feeds both hubs from the Redis
//! stream `KEY` (default `ticks`), where `redis_publisher` (or any
//! publisher that adds each event as the entry `<id>-1` with a `data`
//! field, see `tower_backpressure::bus::redis`) adds them. The hubs start
//! warm (every event the stream retains, then the live ones, through one
//! `XREAD` cursor), a server cut off from Redis reconnects and reads on
//! after the last event it took (what the stream no longer retains is one
//! exact gap marker), and a client whose `Last-Event-ID` is older than the
//! SSE hub's oldest event gets what it missed from the stream first (one
//! `XRANGE`). The server connects before it listens (and exits non-zero if
//! it cannot). `--redis` needs `--hub`, cannot be used with `--nats`, and
//! needs the binary built with the crate's `redis` feature
//! (`cargo run --example sse_server --features axum,metrics,redis -- --hub --redis redis://127.0.0.1:6379`).
//! `/metrics` has the same `backpressure_bus_*` series for either bus,
//! labelled `bus="nats"` or `bus="redis"`.
//!
//! Contract: `--addr HOST:PORT` (default `127.0.0.1:3000`, port 0 picks a free
//! port); once connections are accepted, exactly one line
//! `listening on http://HOST:PORT` is printed on stdout; SIGINT and SIGTERM
//! end the open streams and exit with status 0. Logs go to stderr.

use std::convert::Infallible;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tower_backpressure::hub::{HubBody, sse};
use tower_backpressure::shutdown::Shutdown;
use tower_backpressure::{
    BackpressureLayer, BufferConfig, ClientRegistry, Eviction, Flush, Hub, HubConfig, KeepAlive,
    MemoryBudget, MetricsObserver, NdjsonGapMarker, SseGapMarker, TracingObserver,
};

#[path = "../common/flags.rs"]
mod flags;
use flags::{Policy, on_off};
#[path = "../common/dashboard.rs"]
mod dashboard;
#[path = "../common/metrics.rs"]
mod metrics;
#[path = "../common/serve.rs"]
mod serve;

/// How long open streams get to finish after SIGINT/SIGTERM: the layer's
/// [`Shutdown`] ends every stream at the signal, and cuts one (with its
/// connection) that has not ended by then: a stalled client may never take
/// the events still buffered for it. Long enough for a reader on a starved
/// machine to take its last events.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long the server waits for its connections after the grace: only
/// `--passthrough` streams (no layer) can still be open by then.
const SHUTDOWN_BACKSTOP: Duration = Duration::from_secs(2);

/// The largest `--rate`. Every millisecond the producer sends what is due
/// without yielding: at a rate far beyond what it can send, that loop never
/// ends, and SIGTERM no longer stops the server.
const MAX_RATE: u64 = 10_000_000;

/// The largest `--size` (1 MiB).
const MAX_SIZE: u64 = 1 << 20;

/// `--retain` when not given.
const DEFAULT_RETAIN: usize = 10_000;

/// Server-Sent Events at a fixed rate, each client behind a drop-oldest buffer.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:3000")]
    addr: String,
    /// Events per second, shared by all clients.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RATE))]
    rate: u64,
    /// Size of each event's `data:` payload.
    // At least 1: axum writes no `data:` line for empty data, and browsers
    // ignore an event without one.
    #[arg(long, value_name = "BYTES", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_SIZE))]
    size: usize,
    /// Frames buffered per client before the oldest are dropped (with
    /// `--hub`: how far a client may fall behind in the shared log).
    #[arg(long, value_name = "FRAMES", default_value_t = 1000)]
    capacity: usize,
    /// Bytes buffered per client before the oldest are dropped (default: no limit).
    #[arg(long, value_name = "BYTES")]
    max_bytes: Option<usize>,
    /// Fraction of the limits at which a client counts as under pressure, in (0, 1].
    #[arg(long, value_name = "F", default_value_t = 0.8)]
    threshold: f64,
    /// Serve the same stream without `BackpressureLayer`, for comparison.
    #[arg(long)]
    passthrough: bool,
    /// What a full buffer does. `pause` stops taking events for that client;
    /// since one producer feeds everyone, the shared channel then skips
    /// events for it (a gap in the ids that the layer does not count).
    /// With `--hub` only `drop-oldest` and `disconnect` apply.
    #[arg(long, value_enum, default_value_t = Policy::DropOldest)]
    policy: Policy,
    /// How the events that wait for a client go out: `coalesce`, the
    /// events already waiting joined into one frame, up to 100 events or
    /// 64 KiB; `immediate`, one event per body frame. The bytes are the
    /// same, in fewer frames and writes, and nothing waits for events that
    /// have not come. Default: the library's, `coalesce` for each client's
    /// own buffer; with `--hub`, the hub's shared frames one at a time (a
    /// join would copy them for each client), unless `--flush` is given.
    #[arg(long, value_enum)]
    flush: Option<FlushMode>,
    /// Mark each gap in a client's stream: `event: lagged` with
    /// `data: {"dropped":N}` on /events, `{"type":"lagged","dropped":N}` on
    /// /stream.ndjson.
    // `ArgAction::Set`: see `on_off`.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = on_off,
          action = clap::ArgAction::Set)]
    gap_marker: bool,
    /// Disconnect a client once more than N of its events were dropped.
    #[arg(long, value_name = "N")]
    evict_after_dropped: Option<u64>,
    /// Disconnect a client that took no event for T milliseconds while events waited.
    #[arg(long, value_name = "T")]
    evict_after_stall_ms: Option<u64>,
    /// One budget in bytes for the events buffered across all clients (with
    /// `--hub`: for the hubs' logs, B/2 each, which hold every event
    /// buffered for any client).
    #[arg(long, value_name = "B")]
    budget_bytes: Option<usize>,
    /// Serve both routes from hubs: each event encoded once per format into
    /// a log shared by all clients, each client a window over it; `/events`
    /// resumes after `Last-Event-ID`.
    #[arg(long)]
    hub: bool,
    /// Events each hub retains for clients that fall behind or reconnect
    /// [default: 10000].
    #[arg(long, value_name = "FRAMES", requires = "hub")]
    retain: Option<usize>,
    /// End every `/events` response after N events, so that clients
    /// reconnect (with `Last-Event-ID`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    close_after: Option<u64>,
    /// Feed the hubs from this NATS server instead of a producer of their
    /// own (needs `--hub`, and the `nats` feature).
    #[arg(long, value_name = "URL", requires = "hub")]
    nats: Option<String>,
    /// Feed the hubs from a stream of this Redis server instead of a
    /// producer of their own, and serve resumes older than the hub from it
    /// (needs `--hub`, and the `redis` feature; not with `--nats`).
    #[arg(long, value_name = "URL", requires = "hub", conflicts_with = "nats")]
    redis: Option<String>,
    /// With `--redis`: the key of the stream the events come from.
    #[arg(long, value_name = "KEY", default_value = "ticks", requires = "redis")]
    stream: String,
    /// With `--nats`: the subject the events come from.
    #[arg(long, value_name = "S", default_value = "ticks", requires = "nats")]
    subject: String,
    /// With `--nats`: warm the hubs from the subject's JetStream stream,
    /// and serve resumes older than the hub from it.
    #[arg(long, requires = "nats")]
    jetstream: bool,
    /// Send a comment line on an SSE stream quiet for this long, so that
    /// proxies keep the connection; 0 turns it off.
    #[arg(long, value_name = "MS", default_value_t = 15_000)]
    keep_alive_ms: u64,
}

impl Args {
    /// `--keep-alive-ms`: `None` for 0.
    fn keep_alive(&self) -> Option<Duration> {
        (self.keep_alive_ms > 0).then(|| Duration::from_millis(self.keep_alive_ms))
    }
}

/// `--flush`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FlushMode {
    Immediate,
    Coalesce,
}

impl FlushMode {
    fn flush(self) -> Flush {
        match self {
            FlushMode::Immediate => Flush::Immediate,
            FlushMode::Coalesce => Flush::default(),
        }
    }
}

/// The buffer configuration the flags describe.
fn buffer_config(args: &Args) -> Result<BufferConfig, String> {
    let mut config = BufferConfig::new(args.capacity)
        .with_threshold(args.threshold)
        .with_overflow(args.policy.overflow());
    if let Some(flush) = args.flush {
        config = config.with_flush(flush.flush());
    }
    if let Some(max_bytes) = args.max_bytes {
        config = config.with_max_bytes(max_bytes);
    }
    let mut eviction = Eviction::none();
    if let Some(n) = args.evict_after_dropped {
        eviction = eviction.after_dropped(n);
    }
    if let Some(ms) = args.evict_after_stall_ms {
        eviction = eviction.after_stall(Duration::from_millis(ms));
    }
    if args.evict_after_stall_ms == Some(0) {
        return Err("--evict-after-stall-ms must be at least 1".into());
    }
    if args.budget_bytes == Some(0) {
        return Err("--budget-bytes must be at least 1".into());
    }
    config = config.with_eviction(eviction);
    config.validate().map_err(|e| e.to_string())?;
    if args.hub {
        // A window over a shared log can skip its oldest frames or cut its
        // client off, not pause the log or drop the newest.
        config.validate_for_hub().map_err(|e| {
            let policy = clap::ValueEnum::to_possible_value(&args.policy)
                .map_or_else(String::new, |v| v.get_name().to_owned());
            format!("--policy {policy} cannot be used with --hub: {e}")
        })?;
    }
    Ok(config)
}

/// The hubs' retention the flags describe.
fn hub_config(args: &Args) -> Result<HubConfig, String> {
    let mut config = HubConfig::new(args.retain.unwrap_or(DEFAULT_RETAIN));
    if let Some(budget) = args.budget_bytes {
        // Two hubs share the budget.
        config = config.with_retain_bytes((budget / 2).max(1));
    }
    config.validate().map_err(|e| format!("--retain: {e}"))?;
    Ok(config)
}

/// The state of the routes fed by the broadcast channel.
#[derive(Clone)]
struct AppState {
    events: broadcast::Sender<u64>,
    payload: Arc<str>,
    /// Turns `true` on SIGINT/SIGTERM: every stream ends.
    shutdown: Shutdown,
    close_after: Option<u64>,
    /// `--passthrough`: the SSE stream's own keep-alive, and `Some`.
    passthrough: Option<Option<Duration>>,
}

/// The state of the routes fed by hubs (`--hub`).
#[derive(Clone)]
struct HubState {
    /// SSE frames, `id: <seq>` in each.
    sse: Hub,
    /// NDJSON lines, `{"seq":N,…}`.
    ndjson: Hub,
    close_after: Option<u64>,
    /// `--keep-alive-ms`, for a response served without the layer.
    keep_alive: Option<KeepAlive>,
    /// `--jetstream`, `--redis`: where resumes older than the SSE hub are
    /// served from.
    #[cfg_attr(not(any(feature = "nats", feature = "redis")), allow(dead_code))]
    history: Option<History>,
}

#[cfg(not(any(feature = "nats", feature = "redis")))]
type History = std::convert::Infallible;
#[cfg(not(any(feature = "nats", feature = "redis")))]
type Feeding = std::convert::Infallible;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Refuse a bad configuration now, not when the first client connects.
    let configs = buffer_config(&args).and_then(|config| {
        let hub = if args.hub {
            Some(hub_config(&args)?)
        } else {
            None
        };
        Ok((config, hub))
    });
    let (config, hub_config) = match configs {
        Ok(configs) => configs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // `GET /metrics`: the layer's series as they happen, the sources' at
    // each scrape.
    let metrics = match metrics::Metrics::install() {
        Ok(metrics) => metrics,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(not(feature = "nats"))]
    if args.nats.is_some() {
        eprintln!(
            "error: --nats needs sse_server built with the crate's `nats` feature \
             (cargo run --example sse_server --features axum,metrics,nats)"
        );
        return ExitCode::from(2);
    }
    #[cfg(not(feature = "redis"))]
    if args.redis.is_some() {
        eprintln!(
            "error: --redis needs sse_server built with the crate's `redis` feature \
             (cargo run --example sse_server --features axum,metrics,redis)"
        );
        return ExitCode::from(2);
    }
    let budget = args.budget_bytes.map(MemoryBudget::new);
    let registry = match &budget {
        Some(budget) => ClientRegistry::new().with_budget(budget.clone()),
        None => ClientRegistry::new(),
    };
    let keep_alive = args
        .keep_alive()
        .map(|interval| KeepAlive::new().interval(interval));
    let mut layer = BackpressureLayer::new(config)
        .keep_alive(keep_alive.clone())
        .observer((
            registry.clone(),
            (TracingObserver::new(), MetricsObserver::new()),
        ));
    if let Some(budget) = budget {
        layer = layer.memory_budget(budget);
    }
    // SIGINT/SIGTERM: every stream the layer serves ends, cleanly, and one
    // that does not within the grace is cut with its connection.
    let shutdown = Shutdown::new().grace(SHUTDOWN_GRACE);
    let layer = layer.shutdown(shutdown.clone());
    // Each format marks its gaps its own way: one layer per route, sharing
    // the observer and the budget.
    let on = args.gap_marker;
    // `None` (`--gap-marker off`) marks no gap.
    let sse_layer = layer.clone().gap_marker(on.then(SseGapMarker::new));
    let ndjson_layer = layer.gap_marker(on.then(NdjsonGapMarker::new));

    let payload: Arc<str> = "x".repeat(args.size).into();
    // The hubs, by route, for `/metrics`, `/health/hub` and `/dashboard`.
    let mut hubs: Vec<(&'static str, Hub)> = Vec::new();
    // The bus feed's name and counters, for `/metrics` (`--nats`, `--redis`).
    #[allow(unused_mut)]
    let mut bus_stats: Option<(&'static str, tower_backpressure::bus::FeedStats)> = None;
    let (events, ndjson) = if let Some(hub_config) = hub_config {
        let state = HubState {
            sse: Hub::new(hub_config),
            ndjson: Hub::new(hub_config),
            close_after: args.close_after,
            keep_alive,
            history: None,
        };
        hubs.extend([
            ("/events", state.sse.clone()),
            ("/stream.ndjson", state.ndjson.clone()),
        ]);
        // The hubs close at the signal: their subscriptions end too where
        // no layer serves them (`--passthrough`).
        shutdown.close_hub(&state.sse);
        shutdown.close_hub(&state.ndjson);
        let started: Result<Option<Feeding>, String> = match (&args.nats, &args.redis) {
            (None, None) => {
                tokio::spawn(produce(args.rate, publish_into(&state, payload)));
                Ok(None)
            }
            #[cfg(feature = "nats")]
            (Some(url), _) => bus::nats::start(&state, url, &args.subject, args.jetstream)
                .await
                .map(Some),
            #[cfg(feature = "redis")]
            (_, Some(url)) => bus::redis::start(&state, url, &args.stream).await.map(Some),
            #[allow(unreachable_patterns)]
            _ => unreachable!("refused above"),
        };
        let history = match started {
            Ok(None) => None,
            #[cfg(any(feature = "nats", feature = "redis"))]
            Ok(Some(feeding)) => {
                bus_stats = Some((feeding.bus, feeding.stats));
                feeding.history
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let state = HubState { history, ..state };
        let (events, ndjson) = (get(hub_sse_events), get(hub_ndjson_events));
        let (events, ndjson) = if args.passthrough {
            (events, ndjson)
        } else {
            (events.layer(sse_layer), ndjson.layer(ndjson_layer))
        };
        (events.with_state(state.clone()), ndjson.with_state(state))
    } else {
        // The layer does the real buffering, per client. This channel only
        // has to outlast a short scheduling hiccup: each client's pump drains
        // its receiver as fast as events come, however slowly the client
        // reads.
        let (events, _) = broadcast::channel(4096);
        let sender = events.clone();
        tokio::spawn(produce(args.rate, move |seq| {
            // An error only means that no client is connected right now.
            let _ = sender.send(seq);
        }));
        let state = AppState {
            events,
            payload,
            shutdown: shutdown.clone(),
            close_after: args.close_after,
            passthrough: args.passthrough.then(|| args.keep_alive()),
        };
        let (events, ndjson) = (get(sse_events), get(ndjson_events));
        // `--passthrough`: the same streams without the layer, for comparison.
        let (events, ndjson) = if args.passthrough {
            (events, ndjson)
        } else {
            (events.layer(sse_layer), ndjson.layer(ndjson_layer))
        };
        (events.with_state(state.clone()), ndjson.with_state(state))
    };
    let mut metrics = hubs
        .iter()
        .fold(metrics, |m, (route, hub)| {
            m.on_scrape(metrics::hub_series(route, hub.clone()))
        })
        .on_scrape(metrics::registry_series(registry.clone()));
    if let Some((bus, stats)) = bus_stats {
        metrics = metrics.on_scrape(metrics::bus_series(bus, stats));
    }
    let app = Router::new()
        .route("/events", events)
        .route("/stream.ndjson", ndjson)
        .route_service("/health/clients", registry.service())
        .route("/health/hub", dashboard::hub_health(hubs))
        .route("/metrics", metrics.route())
        .route("/dashboard", dashboard::page());

    let listener = match TcpListener::bind(&args.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    let local = listener
        .local_addr()
        .expect("a bound socket has an address");
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();
    tracing::info!(
        rate = args.rate,
        size = args.size,
        capacity = args.capacity,
        max_bytes = args.max_bytes,
        threshold = args.threshold,
        policy = ?args.policy,
        passthrough = args.passthrough,
        hub = args.hub,
        retain = args.hub.then(|| args.retain.unwrap_or(DEFAULT_RETAIN)),
        close_after = args.close_after,
        "serving GET /events, GET /stream.ndjson, GET /health/clients, GET /health/hub, GET /metrics and GET /dashboard over HTTP/1.1 and HTTP/2"
    );

    // HTTP/1.1 and HTTP/2 (prior knowledge) on the same port; the server
    // stops accepting at the signal, and waits for its connections.
    let server = serve::serve_http1_and_http2(listener, app, {
        let shutdown = shutdown.clone();
        async move { shutdown.triggered().await }
    });
    let mut server = std::pin::pin!(server);

    tokio::select! {
        () = &mut server => {
            // The server stops only after a signal.
            eprintln!("error: server stopped unexpectedly");
            return ExitCode::FAILURE;
        }
        () = shutdown_signal() => {}
    }

    tracing::info!("shutting down: ending open streams");
    shutdown.trigger();
    match tokio::time::timeout(SHUTDOWN_GRACE + SHUTDOWN_BACKSTOP, server).await {
        Ok(()) => tracing::info!("stopped"),
        Err(_) => tracing::warn!(
            "some --passthrough clients did not take their last events within {:?}; closing them",
            SHUTDOWN_GRACE + SHUTDOWN_BACKSTOP
        ),
    }
    ExitCode::SUCCESS
}

/// `GET /events`: this client's view of the shared event sequence.
async fn sse_events(State(app): State<AppState>) -> Response {
    let payload = app.payload;
    let shutdown = app.shutdown;
    let stream = BroadcastStream::new(app.events.subscribe())
        .filter_map(move |message| {
            futures::future::ready(match message {
                Ok(seq) => Some(Ok::<_, Infallible>(
                    Event::default().id(seq.to_string()).data(&*payload),
                )),
                // Only if this client's pump task was starved of CPU for
                // 4096 events: the client sees a gap in the ids, as for a drop.
                Err(BroadcastStreamRecvError::Lagged(_)) => None,
            })
        })
        // `--close-after N`: the response ends after N events.
        .take(app.close_after.map_or(usize::MAX, saturating_usize))
        // The layer ends the stream at the signal; with `--passthrough`
        // (no layer) the stream ends itself, or graceful shutdown would wait
        // for ever.
        .take_until(async move { shutdown.triggered().await });
    let sse = Sse::new(stream);
    match app.passthrough {
        // The layer adds `X-Accel-Buffering: no` and the keep-alive.
        None => sse.into_response(),
        Some(keep_alive) => {
            let no_buffering = [("x-accel-buffering", "no")];
            match keep_alive {
                Some(interval) => {
                    let keep_alive = axum::response::sse::KeepAlive::new().interval(interval);
                    (no_buffering, sse.keep_alive(keep_alive)).into_response()
                }
                None => (no_buffering, sse).into_response(),
            }
        }
    }
}

/// `GET /stream.ndjson`: the same events as NDJSON, one line
/// `{"seq":N,"payload":"…"}` per event (one frame each, so the layer can drop
/// whole lines).
async fn ndjson_events(State(app): State<AppState>) -> Response {
    let payload = app.payload;
    let shutdown = app.shutdown;
    let lines = BroadcastStream::new(app.events.subscribe())
        .filter_map(move |message| {
            futures::future::ready(match message {
                Ok(seq) => Some(Ok::<_, Infallible>(ndjson_line(seq, &payload))),
                Err(BroadcastStreamRecvError::Lagged(_)) => None,
            })
        })
        .take_until(async move { shutdown.triggered().await });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// `GET /events` with `--hub`: a window over the SSE hub's log, from after
/// the request's `Last-Event-ID` if it has one. The layer finds the
/// subscription in the response and serves it (no task, no copy).
async fn hub_sse_events(State(app): State<HubState>, request: Request) -> Response<HubBody> {
    // Read from the request itself: a `HeaderMap` extractor would copy
    // every header, for every client.
    let last = sse::last_event_id(&request);
    drop(request);
    let response = app
        .sse
        .response()
        .resume_after(last)
        .limit(app.close_after)
        .keep_alive(app.keep_alive);
    #[cfg(any(feature = "nats", feature = "redis"))]
    let response = match (&app.history, last) {
        // `--jetstream`, `--redis`: what the hub no longer holds, from the
        // stream.
        (Some(history), Some(last)) => response.backfill(history.missed(&app.sse, last).await),
        _ => response,
    };
    response.build()
}

/// `GET /stream.ndjson` with `--hub`: a window over the NDJSON hub's log.
async fn hub_ndjson_events(State(app): State<HubState>) -> Response<HubBody> {
    app.ndjson
        .response()
        .content_type(HeaderValue::from_static("application/x-ndjson"))
        .build()
}

/// One NDJSON line: `{"seq":N,"payload":"…"}`.
fn ndjson_line(seq: u64, payload: &str) -> Bytes {
    use std::fmt::Write as _;
    // Sized once: `format!` would grow the string as it writes.
    let mut line = String::with_capacity(payload.len() + 40);
    let _ = writeln!(line, "{{\"seq\":{seq},\"payload\":\"{payload}\"}}");
    Bytes::from(line)
}

/// `--hub`: each event encoded once per format, under the producer's
/// sequence number, into the two hubs (every client of a route is handed
/// the same `Bytes`).
fn publish_into(hubs: &HubState, payload: Arc<str>) -> impl FnMut(u64) + Send + 'static {
    let (sse_hub, ndjson_hub) = (hubs.sse.clone(), hubs.ndjson.clone());
    move |seq| {
        sse_hub
            .publish_with_id(seq, sse::frame(seq, None, &payload))
            .expect("the producer's ids increase");
        ndjson_hub
            .publish_with_id(seq, ndjson_line(seq, &payload))
            .expect("the producer's ids increase");
    }
}

/// `--nats`, `--redis`: the hubs fed from a bus instead of the producer.
#[cfg(any(feature = "nats", feature = "redis"))]
mod bus;
#[cfg(any(feature = "nats", feature = "redis"))]
use bus::{Feeding, History};

/// The one producer: `rate` events per second, ids 0, 1, 2, ..., each
/// handed to `emit`.
async fn produce(rate: u64, mut emit: impl FnMut(u64)) {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    // Every tick emits what is due since the start, so a late tick is made
    // up by the next one and high rates need no tick per event.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut seq: u64 = 0;
    loop {
        ticker.tick().await;
        let due = (start.elapsed().as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
        while seq < due {
            emit(seq);
            seq += 1;
        }
    }
}

fn saturating_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[path = "../common/signal.rs"]
mod signal;
use signal::shutdown_signal;
