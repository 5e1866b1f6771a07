//! A WebSocket server whose every client goes through a [`BufferedSink`].
//!
//! One producer task emits ticks at `--rate` per second; every client of
//! `GET /ws` gets the same ticks as text messages
//! `{"seq":N,"payload":"xxx…"}` (one sequence shared by all clients, starting
//! at 0, and a payload of `--size` bytes). A client that reads too slowly
//! does not slow the producer or the other clients: its own buffer of
//! `--capacity` messages drops its oldest ones, and the next message it gets
//! after a gap is `{"type":"lagged","dropped":N}`. `GET /health/clients`
//! lists the connected clients with their buffers, and `TracingObserver`
//! logs backpressure on stderr.
//!
//! ```text
//! cargo run --release --example ws_server -- --rate 5000
//! websocat ws://127.0.0.1:3000/ws
//! curl http://127.0.0.1:3000/health/clients
//! ```
//!
//! Slow-client policies, as in `sse_server`:
//! `--policy drop-oldest|drop-newest|pause|disconnect`, `--gap-marker on|off`
//! (default on), `--evict-after-dropped N`, `--evict-after-stall-ms T`, and
//! `--budget-bytes B` for one memory budget shared by all clients. A client
//! evicted by them that never reads again loses its connection too: the
//! accept loop (`examples/common/serve.rs`, HTTP/1.1 and HTTP/2 with prior
//! knowledge on one port) puts each connection's [`Connection`] into its
//! requests, and the handler hands it to the client's sink.
//!
//! `--hub` serves every client from one shared log instead (a
//! `tower_backpressure::hub::Hub`, retaining `--retain FRAMES`, default
//! 10000): each tick is published once, and each client's drain task reads
//! it from a window over the log (`Builder::spawn_hub`), bounded by the same
//! flags, with no buffer and no copy per client. `--policy pause` and
//! `--policy drop-newest` cannot bound a window and are refused with `--hub`.
//!
//! Contract: `--addr HOST:PORT` (default `127.0.0.1:3000`, port 0 picks a free
//! port); once connections are accepted, exactly one line
//! `listening on http://HOST:PORT` is printed on stdout; SIGINT and SIGTERM
//! close every WebSocket (what is buffered first, then a Close frame, within
//! a bounded time) and exit with status 0. Logs go to stderr.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, Extension, State};
use axum::http::{Method, Uri};
use axum::response::Response;
use axum::routing::get;
use clap::Parser;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::TaskTracker;
use tower_backpressure::conn::Connection;
use tower_backpressure::sink::Builder;
use tower_backpressure::{
    BackpressureObserver, BufferConfig, BufferedSink, ClientInfo, ClientRegistry, Eviction,
    FrameClass, Gap, GapAction, MemoryBudget, TracingObserver,
};

/// How long open WebSockets get to close after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long one client's close may take: delivering what is buffered, then
/// the Close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest `--rate`. Every millisecond the producer sends what is due
/// without yielding: at a rate far beyond what it can send, that loop never
/// ends, and SIGTERM no longer stops the server.
const MAX_RATE: u64 = 10_000_000;

/// The largest `--size` (1 MiB).
const MAX_SIZE: u64 = 1 << 20;

/// WebSocket messages at a fixed rate, each client behind a drop-oldest buffer.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:3000")]
    addr: String,
    /// Messages per second, shared by all clients.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RATE))]
    rate: u64,
    /// Size of each message's `payload`.
    #[arg(long, value_name = "BYTES", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=MAX_SIZE))]
    size: usize,
    /// Messages buffered per client before the oldest are dropped.
    #[arg(long, value_name = "FRAMES", default_value_t = 1000)]
    capacity: usize,
    /// Bytes buffered per client before the oldest are dropped (default: no limit).
    #[arg(long, value_name = "BYTES")]
    max_bytes: Option<usize>,
    /// Fraction of the limits at which a client counts as under pressure, in (0, 1].
    #[arg(long, value_name = "F", default_value_t = 0.8)]
    threshold: f64,
    /// What a full buffer does. `pause` makes the client's task wait for
    /// room; since one producer feeds everyone, the shared channel then skips
    /// ticks for it (announced as `{"type":"lagged",…}` too).
    #[arg(long, value_enum, default_value_t = Policy::DropOldest)]
    policy: Policy,
    /// Send `{"type":"lagged","dropped":N}` before the first message after
    /// each gap.
    // `ArgAction::Set`: see `on_off`.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = on_off,
          action = clap::ArgAction::Set)]
    gap_marker: bool,
    /// Disconnect a client once more than N of its messages were dropped.
    #[arg(long, value_name = "N")]
    evict_after_dropped: Option<u64>,
    /// Disconnect a client that took no message for T milliseconds while
    /// messages waited.
    #[arg(long, value_name = "T")]
    evict_after_stall_ms: Option<u64>,
    /// One budget in bytes for the messages buffered across all clients.
    #[arg(long, value_name = "B")]
    budget_bytes: Option<usize>,
    /// Serve every client from one shared log (a hub) instead of a buffer
    /// of its own.
    #[arg(long)]
    hub: bool,
    /// With `--hub`: how many ticks the shared log retains.
    #[arg(long, value_name = "FRAMES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    retain: u64,
}

/// The buffer configuration the flags describe.
fn buffer_config(args: &Args) -> Result<BufferConfig, String> {
    let mut config = BufferConfig::new(args.capacity)
        .with_threshold(args.threshold)
        .with_overflow(args.policy.overflow());
    if let Some(max_bytes) = args.max_bytes {
        config = config.with_max_bytes(max_bytes);
    }
    let mut eviction = Eviction::none();
    if let Some(n) = args.evict_after_dropped {
        eviction = eviction.after_dropped(n);
    }
    if let Some(ms) = args.evict_after_stall_ms {
        if ms == 0 {
            return Err("--evict-after-stall-ms must be at least 1".into());
        }
        eviction = eviction.after_stall(Duration::from_millis(ms));
    }
    if args.budget_bytes == Some(0) {
        return Err("--budget-bytes must be at least 1".into());
    }
    config = config.with_eviction(eviction);
    if args.hub {
        config
            .validate_for_hub()
            .map_err(|e| format!("--hub: {e}"))?;
    } else {
        config.validate().map_err(|e| e.to_string())?;
    }
    Ok(config)
}

/// What every client's [`BufferedSink`] is built from.
pub type Sinks = Builder<
    Arc<dyn BackpressureObserver>,
    fn(Gap) -> GapAction<Message>,
    fn(&Message) -> FrameClass,
    fn(&Message) -> usize,
>;

/// What the `/ws` handler needs.
#[derive(Clone)]
pub struct Hub {
    ticks: broadcast::Sender<Utf8Bytes>,
    /// `--hub`: the shared log every client reads from.
    log: Option<TickHub>,
    sinks: Sinks,
    /// Turns `true` on SIGINT/SIGTERM: every client is closed.
    shutdown: watch::Receiver<bool>,
    /// Every client's task, for a clean exit.
    clients: TaskTracker,
    /// Whether gaps are announced.
    gap_marker: bool,
}

impl Hub {
    /// Clients buffered as `config` says, heard by `observer`, fed by
    /// `producer`.
    pub fn new(
        config: BufferConfig,
        observer: Arc<dyn BackpressureObserver>,
        producer: &Producer,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, tower_backpressure::ConfigError> {
        let sinks: Sinks = BufferedSink::try_builder(config)?
            .observer(observer)
            .gap_marker(lagged as fn(Gap) -> GapAction<Message>)
            .classify(classify as fn(&Message) -> FrameClass)
            .weigh(weigh as fn(&Message) -> usize)
            .close_timeout(CLOSE_TIMEOUT);
        Ok(Self {
            ticks: producer.ticks.clone(),
            log: producer.log.clone(),
            sinks,
            shutdown,
            clients: TaskTracker::new(),
            gap_marker: true,
        })
    }

    /// Announces no gap (`--gap-marker off`): the client only sees a jump in
    /// `seq`.
    pub fn without_gap_marker(mut self) -> Self {
        self.sinks = self
            .sinks
            .gap_marker(no_marker as fn(Gap) -> GapAction<Message>);
        self.gap_marker = false;
        self
    }

    /// Puts every client under one shared memory budget.
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.sinks = self.sinks.memory_budget(budget);
        self
    }

    /// Every client's task.
    pub fn clients(&self) -> &TaskTracker {
        &self.clients
    }
}

/// `GET /ws` and `GET /health/clients`. Serve it with axum's
/// `ConnectInfo<SocketAddr>` in every request (as
/// `into_make_service_with_connect_info::<SocketAddr>()` or
/// `examples/common/serve.rs` do), and with the [`Connection`] of the
/// request's connection if the server has one.
pub fn router(hub: Hub, registry: &ClientRegistry) -> Router {
    Router::new()
        .route("/ws", get(ws))
        .route_service("/health/clients", registry.service())
        .with_state(hub)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Refuse a bad configuration now, not when the first client connects.
    let config = match buffer_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let budget = args.budget_bytes.map(MemoryBudget::new);
    let registry = match &budget {
        Some(budget) => ClientRegistry::new().with_budget(budget.clone()),
        None => ClientRegistry::new(),
    };
    let observer: Arc<dyn BackpressureObserver> =
        Arc::new((registry.clone(), TracingObserver::new()));
    let (stop, shutdown) = watch::channel(false);
    let log = args.hub.then(|| tick_hub(args.retain as usize));
    let producer = Producer::spawn(args.rate, args.size, log);
    let mut hub = match Hub::new(config, observer, &producer, shutdown.clone()) {
        Ok(hub) => hub,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.gap_marker {
        hub = hub.without_gap_marker();
    }
    if let Some(budget) = budget {
        hub = hub.memory_budget(budget);
    }
    let clients = hub.clients().clone();
    let app = router(hub, &registry);

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
        gap_marker = args.gap_marker,
        "serving GET /ws and GET /health/clients over HTTP/1.1 and HTTP/2"
    );

    let mut stopped = shutdown;
    // Each request carries its connection, which the client's sink closes
    // if it evicts the client.
    let server = serve::serve_http1_and_http2(listener, app, async move {
        let _ = stopped.wait_for(|stop| *stop).await;
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

    tracing::info!("shutting down: closing open WebSockets");
    stop.send_replace(true);
    // Upgraded connections are not the server's any more: wait for the
    // clients' tasks too.
    clients.close();
    let stopped = async {
        tokio::join!(server, clients.wait());
    };
    match tokio::time::timeout(SHUTDOWN_GRACE, stopped).await {
        Ok(()) => tracing::info!("stopped"),
        Err(_) => tracing::warn!("some clients did not close within {SHUTDOWN_GRACE:?}"),
    }
    ExitCode::SUCCESS
}

/// `GET /ws`: upgrades, then streams the shared ticks to this client.
async fn ws(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    connection: Option<Extension<Connection>>,
    uri: Uri,
    upgrade: WebSocketUpgrade,
) -> Response {
    let info = ClientInfo::new(Method::GET, uri, Some(peer)).with_route("/ws");
    let connection = connection.map(|Extension(connection)| connection);
    let clients = hub.clients.clone();
    upgrade.on_upgrade(move |socket| clients.track_future(client(socket, info, connection, hub)))
}

/// One client: ticks go into its buffer, never waiting for it; the buffer's
/// drain task writes them to the socket at the client's pace. Evicting the
/// client closes `connection` (the upgraded connection), so that a client
/// that never reads again does not keep it open.
async fn client(socket: WebSocket, info: ClientInfo, connection: Option<Connection>, hub: Hub) {
    let (tx, mut rx) = socket.split();
    let mut ticks = hub.ticks.subscribe();
    let mut shutdown = hub.shutdown;
    let mut sinks = hub.sinks.client(info);
    if let Some(connection) = connection {
        sinks = sinks.connection(connection);
    }
    if let Some(log) = &hub.log {
        return hub_client(sinks, log, tx, rx, shutdown).await;
    }
    let mut sink = sinks.spawn(tx);
    enum Next {
        Send(Message),
        Left,
        Stop,
    }
    loop {
        let next = tokio::select! {
            tick = ticks.recv() => match tick {
                Ok(text) => Next::Send(Message::Text(text)),
                // Only if this task was starved of CPU for 4096 ticks (or
                // waited under `--policy pause`): say so, as the buffer does
                // for its own drops.
                Err(broadcast::error::RecvError::Lagged(n)) if hub.gap_marker => {
                    Next::Send(lagged_message(n))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => Next::Stop,
            },
            incoming = rx.next() => match incoming {
                // Pings are answered by the socket; anything else is ignored.
                Some(Ok(message)) if !matches!(message, Message::Close(_)) => continue,
                // The client said goodbye or went away.
                _ => Next::Left,
            },
            // (A dropped sender means no shutdown signal: the branch is disabled.)
            Ok(_) = shutdown.wait_for(|stop| *stop) => Next::Stop,
        };
        match next {
            // Never waits for the client; fails once it is gone or evicted.
            Next::Send(message) => {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            // Drop what is buffered: nobody will read it.
            Next::Left => {
                sink.abandon().await;
                return;
            }
            Next::Stop => break,
        }
    }
    // Deliver what is buffered, then a Close frame ("going away"), within
    // CLOSE_TIMEOUT.
    let goodbye = CloseFrame {
        code: close_code::AWAY,
        reason: "server shutting down".into(),
    };
    let _ = sink.feed(Message::Close(Some(goodbye))).await;
    let _ = sink.close().await;
}

/// One client of `--hub`: its drain task reads the shared log through the
/// client's window; this task only waits for the client to leave.
async fn hub_client(
    sinks: Sinks,
    log: &TickHub,
    tx: SplitSink<WebSocket, Message>,
    mut rx: SplitStream<WebSocket>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sink = match sinks.spawn_hub(log, None, GoingAway::new(tx)) {
        Ok(sink) => sink,
        // Refused at startup (`buffer_config`): cannot happen here.
        Err(e) => return tracing::error!("{e}"),
    };
    loop {
        let stop = tokio::select! {
            incoming = rx.next() => match incoming {
                Some(Ok(message)) if !matches!(message, Message::Close(_)) => false,
                // The client left.
                _ => true,
            },
            // Evicted, or its socket failed.
            () = sink.closed() => return,
            // Server shutdown: close the socket.
            Ok(_) = shutdown.wait_for(|stop| *stop) => true,
        };
        if stop {
            break;
        }
    }
    // Ends the drain task, which closes the real sink (a Close frame).
    sink.abandon().await;
}

/// The real sink of a `--hub` client: closing it says "going away" first,
/// as the per-client path's last message does.
struct GoingAway<S> {
    inner: S,
    said: bool,
}

impl<S> GoingAway<S> {
    fn new(inner: S) -> Self {
        Self { inner, said: false }
    }
}

impl<S: futures::Sink<Message> + Unpin> futures::Sink<Message> for GoingAway<S> {
    type Error = S::Error;

    fn poll_ready(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        std::pin::Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: std::pin::Pin<&mut Self>, item: Message) -> Result<(), S::Error> {
        std::pin::Pin::new(&mut self.inner).start_send(item)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        if !self.said {
            std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_ready(cx))?;
            let goodbye = CloseFrame {
                code: close_code::AWAY,
                reason: "server shutting down".into(),
            };
            std::pin::Pin::new(&mut self.inner).start_send(Message::Close(Some(goodbye)))?;
            self.said = true;
        }
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// The gap marker: `{"type":"lagged","dropped":N}` before the next message.
fn lagged(gap: Gap) -> GapAction<Message> {
    GapAction::Insert(lagged_message(gap.frames))
}

/// `--gap-marker off`.
fn no_marker(_: Gap) -> GapAction<Message> {
    GapAction::Skip
}

fn lagged_message(dropped: u64) -> Message {
    Message::Text(format!(r#"{{"type":"lagged","dropped":{dropped}}}"#).into())
}

/// Lagged notices and the Close frame are never dropped; ticks may be.
fn classify(message: &Message) -> FrameClass {
    match message {
        Message::Text(text) if text.as_str().starts_with(r#"{"type":"lagged""#) => {
            FrameClass::Critical
        }
        Message::Close(_) => FrameClass::Critical,
        _ => FrameClass::Droppable,
    }
}

/// A message weighs its payload.
fn weigh(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes.len(),
        Message::Close(_) => 0,
    }
}

/// The one producer: `rate` ticks per second, seq 0, 1, 2, ...
#[derive(Clone)]
pub struct Producer {
    ticks: broadcast::Sender<Utf8Bytes>,
    log: Option<TickHub>,
}

/// The shared log of `--hub`: messages weighed by their payload.
pub type TickHub = tower_backpressure::hub::Hub<Message, fn(&Message) -> usize>;

/// A shared log retaining `frames` ticks.
pub fn tick_hub(frames: usize) -> TickHub {
    let config = tower_backpressure::hub::HubConfig::default().with_retain_frames(frames);
    TickHub::with_weigher(config, weigh as fn(&Message) -> usize)
}

impl Producer {
    /// Starts producing `rate` ticks per second with `size`-byte payloads.
    pub fn spawn(rate: u64, size: usize, log: Option<TickHub>) -> Self {
        // Each client's buffer does the real buffering; this channel only
        // has to outlast a short scheduling hiccup of a client's task.
        let (ticks, _) = broadcast::channel(4096);
        tokio::spawn(produce(ticks.clone(), log.clone(), rate, "x".repeat(size)));
        Self { ticks, log }
    }

    /// Clients subscribed now.
    pub fn subscribers(&self) -> usize {
        self.ticks.receiver_count()
    }
}

async fn produce(
    ticks: broadcast::Sender<Utf8Bytes>,
    log: Option<TickHub>,
    rate: u64,
    payload: String,
) {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    // Every tick emits what is due since the start, so a late tick is made
    // up by the next one and high rates need no tick per message.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut seq: u64 = 0;
    loop {
        ticker.tick().await;
        let due = (start.elapsed().as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
        while seq < due {
            // Rendered once, shared by every client (a reference count).
            let text = format!(r#"{{"seq":{seq},"payload":"{payload}"}}"#);
            match &log {
                // Published once into the shared log, under its seq.
                Some(log) => {
                    let _ = log.publish_with_id(seq, Message::Text(text.into()));
                }
                // An error only means that no client is connected right now.
                None => {
                    let _ = ticks.send(text.into());
                }
            }
            seq += 1;
        }
    }
}

#[path = "common/flags.rs"]
mod flags;
use flags::{Policy, on_off};
#[path = "common/serve.rs"]
mod serve;
#[path = "common/signal.rs"]
mod signal;
use signal::shutdown_signal;
