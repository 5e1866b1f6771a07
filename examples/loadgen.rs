//! Load generator: an SSE fan-out served five ways, side by side.
//!
//! ```text
//! cargo run --release --example loadgen -- --fast 4 --slow 16 --seconds 10
//! cargo run --release --example loadgen -- --fast 4 --slow 16 --seconds 10 --runs 3 --json
//! cargo run --release --example loadgen -- --variant layer --variant broadcast
//! cargo run --release --example loadgen -- --fast 10 --slow 0,100,1000,10000 --rate 5000 \
//!     --variant hub --variant broadcast --variant layer --skip layer@10000 --json
//! ```
//!
//! One shared producer emits `--rate` events per second. Every event is one
//! SSE frame, `id: <seq>\ndata: <seq> <unix-nanos> xxx…\n\n` with a `data:`
//! payload of `--size` bytes, formatted once by the producer. `--fast F`
//! clients read as fast as they can; `--slow S` clients connect, read the
//! response headers and then stop reading (stalled, with a 4 KiB receive
//! buffer). After `--warmup` seconds the run is measured for `--seconds`.
//!
//! Each server variant runs in its own process (this binary, re-executed
//! with a hidden `--serve VARIANT`), so its memory and CPU time can be read
//! from `/proc`:
//!
//! | variant | per-client stream | what a slow client does to it |
//! |---|---|---|
//! | `broadcast` | `tokio::sync::broadcast` + `BroadcastStream`, no layer | its receiver lags: oldest events dropped, silently |
//! | `mpsc-bounded` | one bounded `mpsc` per client, no layer | the producer waits for it |
//! | `mpsc-unbounded` | one unbounded `mpsc` per client, no layer | its queue grows without bound |
//! | `layer` | the `broadcast` stream behind `BackpressureLayer` | its ring drops its oldest events |
//! | `layer-no-slow` | `layer` with S = 0 | (the baseline) |
//! | `broadcast-no-slow` | `broadcast` with S = 0 | (what a stalled connection costs by itself) |
//! | `drained` | `broadcast`, no layer; a slow client's stream is drained by a task of its own that drops every event, and its response never sends | (the floor of taking every client's events as they come: the per-client stream's own work, no queue) |
//! | `hub` | one shared `Hub` log behind `BackpressureLayer`, each client a window over it | its window skips its oldest events, counted |
//! | `hub-no-slow` | `hub` with S = 0 | (the baseline) |
//!
//! Every variant does the same work per event and client: the per-client
//! stream copies the shared frame into a fresh buffer (standing in for the
//! per-client serialization that axum's `Sse` does), so what a queue or a
//! ring holds for a client is real memory. `--shared-frames` hands every
//! client the producer's frame instead (a reference count), as a server that
//! serializes each event once would. The broadcast channel, the bounded
//! channels and the layer's ring all hold `--capacity` events; the layer's
//! ring also holds at most `--max-bytes`.
//!
//! The `hub` variants publish each event once into one
//! [`Hub`](tower_backpressure::hub::Hub) (`publish_with(|id| sse::frame(id, …))`:
//! encoded once, with the hub's id, the same bytes as the other variants'
//! frames), and every client's handler answers `hub.response().build()`:
//! `BackpressureLayer`, with the same `BufferConfig` as `layer`, serves each
//! client from a window over the shared log (bounded by `--capacity` and
//! `--max-bytes`), with no pump task and no per-client copy. The log retains
//! `--retain` frames.
//!
//! The clients run in this process, each server in a child process of its
//! own, so that each side holds one socket per client: 10,000 stalled
//! clients need 10,000 open files on each side (plus a few). At startup the
//! load generator raises its soft `RLIMIT_NOFILE` to the hard limit if it
//! is too low (with `prlimit`; the servers inherit it), or says to run
//! `ulimit -n` first. Slow clients connect 256 at a time, each within 15 s
//! and all within 15 s + 5 ms per client, with a 4 KiB receive buffer.
//!
//! `--slow` takes several values (`--slow 0,100,1000,10000`): every variant
//! runs at each (a `-no-slow` variant once), and `--skip NAME@SLOW` leaves
//! one out; the JSON's rows carry their `slow` count.
//!
//! All variants are served by hyper's HTTP/1 connection with the same
//! settings: `http1::Builder::max_buf_size(--max-buf-size)` (8 KiB, hyper's
//! minimum, instead of its default of about 400 KiB) and a `--sndbuf` of
//! 16 KiB set on the listening socket (the accepted sockets inherit it; Linux
//! doubles it), so that hyper's and the kernel's buffers hide little of what
//! the per-client queues hold.
//!
//! Measured per variant, over the measured window:
//!
//! - `fast ev/s`: events delivered to all fast clients, per second (sum);
//! - `p50 ms`, `p99 ms`: fast clients' delivery latency, from the producer's
//!   timestamp in the event to the moment the client parsed it;
//! - `producer ev/s`: events the producer emitted per second (did it stall?),
//!   read from the server's `GET /stats`;
//! - `peak RSS`: the server's `VmHWM` from `/proc/PID/status`;
//! - `CPU s/M`: the server's user + system CPU seconds (`/proc/PID/stat`)
//!   per million events delivered to fast clients;
//! - `slow dropped`: events the server dropped for slow clients (the layer's
//!   `Dropped` events; for `broadcast`, events a lagging receiver can no
//!   longer get; 0 for the mpsc variants, which never drop).
//! - `fast dropped`, `fast gaps`: the same for fast clients in the measured
//!   window, and the sequence numbers they never saw there (both should be
//!   0); the JSON's `fast_dropped_total` counts since they connected
//!   (warm-up, and the slow clients' connecting, included);
//! - `load 1m`, `preempted`, `machine busy %`, `steal %`: the machine's load
//!   average after the run, how often the server's threads were preempted in
//!   the window (their involuntary context switches), how busy all CPUs were
//!   (every process: server, load generator and anything else) and how much
//!   time the hypervisor gave to other guests: a busy machine shows here
//!   first, and in the latency tail.
//!
//! With `--runs N` every variant runs N times (interleaved: run 1 of every
//! variant, then run 2, …) and the table shows the median of each column;
//! the fast p99 of `layer` against `layer-no-slow` is also printed run by
//! run (run N of each), with how many runs are within the 1.2× target.
//! `--variant layer --variant layer-no-slow --slow 0,S` also runs `layer`
//! at 0 slow clients, the same configuration as `layer-no-slow`: how far
//! two identical runs differ on the machine at hand.
//!
//! `--pin` splits the CPUs (with `taskset`): the first half for the
//! server, the rest for the load generator, so that the two do not preempt
//! each other. On a machine of 2 CPUs each gets one, and the server's
//! runtime one worker.
//! With `--json` the last line printed is one JSON object
//! `{"variants":[{"name":…,"fast_events_per_sec":…,…}, …]}`.
//!
//! All traffic stays on 127.0.0.1. Every wait is bounded: a server that does
//! not start, or does not answer, is killed and reported as an error, and
//! each server also exits by itself after `--warmup + --seconds + 60` s.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use futures::{Stream, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream, UnboundedReceiverStream};
use tower::{ServiceExt as _, service_fn};
use tower_backpressure::hub::{Hub as SharedLog, HubBody, HubConfig, sse};
use tower_backpressure::{BackpressureEvent, BackpressureLayer, BufferConfig, EventKind};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The receive buffer of a slow client's socket.
const SLOW_RCVBUF: u32 = 4096;
/// How long a server gets to start, and to answer `/stats`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server lives at most past its planned run.
const SERVER_GRACE: u64 = 60;
/// Slow clients connecting at once (the server's listen backlog is 1024).
const CONNECT_BATCH: usize = 256;
/// Files a load generator or server needs besides its clients' sockets.
const SPARE_FILES: u64 = 64;

/// How long `slow` slow clients get to connect, all together: 15 s, plus
/// 5 ms per client.
fn connect_budget(slow: usize) -> Duration {
    STARTUP_TIMEOUT + Duration::from_millis(5 * slow as u64)
}

/// An SSE fan-out served with and without `BackpressureLayer`, side by side.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Fast clients: they read as fast as they can.
    #[arg(long, default_value_t = 4)]
    fast: usize,
    /// Slow clients: they stop reading after the response headers. Several
    /// values (`--slow 0,100,1000,10000`, or the flag repeated) sweep: every
    /// variant runs at each (a `-no-slow` variant once).
    #[arg(long, value_delimiter = ',', default_values_t = [16usize], value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    slow: Vec<usize>,
    /// Leave out one variant at one `--slow` value, as `NAME@SLOW` (e.g.
    /// `layer@10000`); repeat for several.
    #[arg(long = "skip", value_name = "NAME@SLOW", value_parser = parse_skip)]
    skips: Vec<(Variant, usize)>,
    /// Length of the measured window.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Seconds of load before the measured window (buffers fill, rates settle).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=600))]
    warmup: u64,
    /// A variant to run; repeat for several. Default: all, in table order.
    #[arg(long = "variant", value_enum, value_name = "NAME")]
    variants: Vec<Variant>,
    /// Run every variant this many times; the table shows medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=50))]
    runs: u64,
    /// Events per second from the producer.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rate: u64,
    /// Size of each event's `data:` payload in bytes (at least 64).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=1_048_576))]
    size: u64,
    /// Events each client's queue (broadcast channel, bounded mpsc, the
    /// layer's ring) holds.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    capacity: u64,
    /// Frames the `hub` variants' shared log retains. Default: `--capacity`
    /// plus the larger of `--capacity` and 200 ms of events, so that a
    /// stalled client's window (bounded by `--capacity` / `--max-bytes`, as
    /// the layer's ring is) finds the frames it skips still in the log at
    /// the hub's sweep (every 100 ms) and counts them as `Dropped`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    retain: Option<u64>,
    /// Bytes the layer's ring holds per client.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_bytes: u64,
    /// hyper's `http1::Builder::max_buf_size` (at least 8192).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(8192..))]
    max_buf_size: u64,
    /// `SO_SNDBUF` of the server's sockets (Linux doubles it).
    #[arg(long, default_value_t = 16 * 1024)]
    sndbuf: u32,
    /// Hand every client the producer's frame itself (a reference count)
    /// instead of its own copy: what a server that serializes each event
    /// once does.
    #[arg(long)]
    shared_frames: bool,
    /// Give every request a URI of its own (a copy) before the layer sees
    /// it. hyper's request URI shares the allocation of the connection's
    /// read buffer, and the layer keeps a clone of it for as long as the
    /// client is connected (in its `ClientInfo`): that pins the buffer.
    #[arg(long)]
    copy_uri: bool,
    /// Run the server on the first half of the CPUs and the load generator
    /// on the rest (with `taskset`), so that neither takes the other's
    /// time: on two CPUs, one each. Needs at least 2 CPUs and `taskset`
    /// (util-linux).
    #[arg(long)]
    pin: bool,
    /// `--pin`: the server's CPUs and the load generator's, as `taskset`
    /// lists them.
    #[arg(skip)]
    pinned: Option<(String, String)>,
    /// Print a JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Server mode: serve this variant (used by the load generator itself).
    #[arg(long, hide = true, value_name = "NAME")]
    serve: Option<Variant>,
    /// Server mode: exit after this many seconds whatever happens.
    #[arg(long, hide = true, default_value_t = 3600)]
    lifetime: u64,
}

/// `NAME@SLOW`, for `--skip`.
fn parse_skip(s: &str) -> Result<(Variant, usize), String> {
    let (name, slow) = s
        .split_once('@')
        .ok_or_else(|| format!("expected NAME@SLOW, e.g. layer@10000, got {s:?}"))?;
    let variant = Variant::from_str(name, true)?;
    let slow = slow
        .parse()
        .map_err(|e| format!("bad slow count {slow:?}: {e}"))?;
    Ok((variant, slow))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Variant {
    /// `tokio::sync::broadcast` + `BroadcastStream`, no layer.
    Broadcast,
    /// One bounded `tokio::sync::mpsc` per client, no layer.
    MpscBounded,
    /// One unbounded `tokio::sync::mpsc` per client, no layer.
    MpscUnbounded,
    /// The broadcast stream behind `BackpressureLayer`.
    Layer,
    /// `layer` without slow clients.
    LayerNoSlow,
    /// `broadcast` without slow clients: with `broadcast`, what a stalled
    /// connection itself costs (hyper's buffers, the task), without any
    /// per-client queue.
    BroadcastNoSlow,
    /// One shared `Hub` log behind `BackpressureLayer`: each client a window
    /// over it, no pump, no per-client copy.
    Hub,
    /// `hub` without slow clients.
    HubNoSlow,
    /// `broadcast`, no layer, and each slow client's stream drained by a
    /// task that drops every event: what taking a stalled client's events
    /// as they come costs without any queue (the floor under `layer`).
    Drained,
}

impl Variant {
    const ALL: [Variant; 9] = [
        Variant::Broadcast,
        Variant::MpscBounded,
        Variant::MpscUnbounded,
        Variant::Layer,
        Variant::LayerNoSlow,
        Variant::BroadcastNoSlow,
        Variant::Hub,
        Variant::HubNoSlow,
        Variant::Drained,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Broadcast => "broadcast",
            Variant::MpscBounded => "mpsc-bounded",
            Variant::MpscUnbounded => "mpsc-unbounded",
            Variant::Layer => "layer",
            Variant::LayerNoSlow => "layer-no-slow",
            Variant::BroadcastNoSlow => "broadcast-no-slow",
            Variant::Hub => "hub",
            Variant::HubNoSlow => "hub-no-slow",
            Variant::Drained => "drained",
        }
    }

    /// Whether it runs without slow clients.
    fn no_slow(self) -> bool {
        matches!(
            self,
            Variant::LayerNoSlow | Variant::BroadcastNoSlow | Variant::HubNoSlow
        )
    }

    /// Whether it is served from the shared `Hub`.
    fn hub(self) -> bool {
        matches!(self, Variant::Hub | Variant::HubNoSlow)
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.pin && args.serve.is_none() {
        // Before the runtime starts its workers: they inherit the mask, and
        // size themselves to it.
        match pin_self() {
            Ok(split) => args.pinned = Some(split),
            Err(e) => {
                eprintln!("error: --pin: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match args.serve {
        Some(variant) => runtime.block_on(server::run(variant, args)),
        None => runtime.block_on(driver::run(args)),
    }
}

/// `--pin`: moves this process to the second half of the CPUs; returns the
/// server's CPUs (the first half) and this process's, as `taskset` lists.
fn pin_self() -> Result<(String, String), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return Err(format!(
            "needs at least 2 CPUs, this process may use {cpus}"
        ));
    }
    let list = |first: usize, last: usize| {
        if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        }
    };
    let half = cpus / 2;
    let (server, driver) = (list(0, half - 1), list(half, cpus - 1));
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &driver])
        .arg(std::process::id().to_string())
        .output()
        .map_err(|e| format!("cannot run taskset (util-linux): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "taskset failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((server, driver))
}

/// What the server says at `GET /stats`.
#[derive(Debug, Default, Clone, Copy)]
struct ServerStats {
    /// Events the producer has emitted.
    produced: u64,
    /// Events dropped for fast clients.
    fast_dropped: u64,
    /// Events dropped for slow clients.
    slow_dropped: u64,
}

/// Which kind of client a request is, from `?class=slow` / `?class=fast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Fast,
    Slow,
}

impl Class {
    fn of(uri: &http::Uri) -> Class {
        match uri.query() {
            Some(q) if q.contains("class=slow") => Class::Slow,
            _ => Class::Fast,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl ServerStats {
    fn to_json(self) -> Vec<u8> {
        serde_json::json!({
            "produced": self.produced,
            "fast_dropped": self.fast_dropped,
            "slow_dropped": self.slow_dropped,
        })
        .to_string()
        .into_bytes()
    }

    fn from_json(json: &[u8]) -> Result<Self, BoxError> {
        let value: serde_json::Value = serde_json::from_slice(json)?;
        let field = |name: &str| {
            value[name]
                .as_u64()
                .ok_or_else(|| format!("/stats without {name}: {value}"))
        };
        Ok(ServerStats {
            produced: field("produced")?,
            fast_dropped: field("fast_dropped")?,
            slow_dropped: field("slow_dropped")?,
        })
    }
}

impl Args {
    /// `--retain`, or its default.
    fn retain(&self) -> u64 {
        self.retain
            .unwrap_or(self.capacity + self.capacity.max(self.rate / 5))
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

mod server {
    use super::*;

    /// One event: its sequence number and the SSE frame, formatted once.
    #[derive(Debug, Clone)]
    struct Event {
        seq: u64,
        frame: Bytes,
    }

    /// `--shared-frames`: clients share the producer's frame.
    static SHARED_FRAMES: AtomicBool = AtomicBool::new(false);

    /// The frame a client gets: its own copy (the stand-in for per-client
    /// serialization), or with `--shared-frames` the shared one.
    fn client_frame(event: &Event) -> Result<Frame<Bytes>, Infallible> {
        if SHARED_FRAMES.load(Ordering::Relaxed) {
            Ok(Frame::data(event.frame.clone()))
        } else {
            Ok(Frame::data(Bytes::copy_from_slice(&event.frame)))
        }
    }

    type EventStream = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
    type ResBody = Either<StreamBody<EventStream>, Either<Full<Bytes>, HubBody>>;

    enum Sink {
        Bounded(mpsc::Sender<Event>),
        Unbounded(mpsc::UnboundedSender<Event>),
    }

    /// A broadcast receiver's position, to count what it can no longer get.
    struct Position {
        class: Class,
        /// The next sequence number it will yield.
        next: AtomicU64,
        live: AtomicBool,
    }

    struct Hub {
        variant: Variant,
        /// The broadcast channel's real capacity (a power of two).
        broadcast_capacity: u64,
        capacity: usize,
        produced: AtomicU64,
        /// Drops counted as they happen, per class.
        dropped: [AtomicU64; 2],
        events: broadcast::Sender<Event>,
        sinks: mpsc::UnboundedSender<Sink>,
        positions: Mutex<Vec<Arc<Position>>>,
        /// `hub`, `hub-no-slow`: the one log every client reads.
        log: SharedLog,
    }

    impl Hub {
        fn stats(&self) -> ServerStats {
            let produced = self.produced.load(Ordering::Acquire);
            let mut dropped = [
                self.dropped[0].load(Ordering::Relaxed),
                self.dropped[1].load(Ordering::Relaxed),
            ];
            // A receiver that is not polled (hyper stopped polling its
            // body) has not seen its `Lagged` yet: count what the channel
            // has already overwritten for it.
            for p in self.positions.lock().unwrap().iter() {
                if p.live.load(Ordering::Relaxed) {
                    let behind = produced.saturating_sub(p.next.load(Ordering::Relaxed));
                    dropped[p.class.index()] += behind.saturating_sub(self.broadcast_capacity);
                }
            }
            ServerStats {
                produced,
                fast_dropped: dropped[0],
                slow_dropped: dropped[1],
            }
        }

        /// This client's stream of frames.
        fn subscribe(self: &Arc<Self>, class: Class) -> EventStream {
            match self.variant {
                Variant::Broadcast
                | Variant::BroadcastNoSlow
                | Variant::Layer
                | Variant::LayerNoSlow
                | Variant::Drained => {
                    let receiver = self.events.subscribe();
                    let position = Arc::new(Position {
                        class,
                        next: AtomicU64::new(self.produced.load(Ordering::Acquire)),
                        live: AtomicBool::new(true),
                    });
                    self.positions.lock().unwrap().push(position.clone());
                    let guard = Gone(position.clone());
                    let hub = self.clone();
                    Box::pin(BroadcastStream::new(receiver).filter_map(move |message| {
                        let _alive = &guard;
                        futures::future::ready(match message {
                            Ok(event) => {
                                position.next.store(event.seq + 1, Ordering::Relaxed);
                                Some(client_frame(&event))
                            }
                            Err(BroadcastStreamRecvError::Lagged(n)) => {
                                position.next.fetch_add(n, Ordering::Relaxed);
                                hub.dropped[class.index()].fetch_add(n, Ordering::Relaxed);
                                None
                            }
                        })
                    }))
                }
                Variant::MpscBounded => {
                    let (tx, rx) = mpsc::channel(self.capacity);
                    let _ = self.sinks.send(Sink::Bounded(tx));
                    Box::pin(ReceiverStream::new(rx).map(|event| client_frame(&event)))
                }
                Variant::MpscUnbounded => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let _ = self.sinks.send(Sink::Unbounded(tx));
                    Box::pin(UnboundedReceiverStream::new(rx).map(|event| client_frame(&event)))
                }
                Variant::Hub | Variant::HubNoSlow => {
                    unreachable!("hub clients are answered with `Hub::response`")
                }
            }
        }
    }

    /// Marks a broadcast position gone when its stream is dropped.
    struct Gone(Arc<Position>);

    impl Drop for Gone {
        fn drop(&mut self) {
            self.0.live.store(false, Ordering::Relaxed);
        }
    }

    /// The one producer: `rate` events per second.
    async fn produce(
        hub: Arc<Hub>,
        mut new_sinks: mpsc::UnboundedReceiver<Sink>,
        rate: u64,
        size: usize,
    ) {
        let mut sinks: Vec<Sink> = Vec::new();
        let start = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        // Each tick emits what is due since the start: a late tick is made
        // up by the next one (a stalled producer stays behind, though).
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut seq: u64 = 0;
        let mut buf = BytesMut::new();
        let mut data = String::new();
        loop {
            ticker.tick().await;
            while let Ok(sink) = new_sinks.try_recv() {
                sinks.push(sink);
            }
            let due = (start.elapsed().as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
            while seq < due {
                if hub.variant.hub() {
                    // Encoded once, under the id the hub assigns (the same
                    // bytes as `format_event`); every client shares it.
                    let nanos = unix_nanos();
                    let id = hub.log.publish_with(|id| {
                        format_data(&mut data, id, nanos, size);
                        sse::frame(id, None, &data)
                    });
                    debug_assert_eq!(id, seq);
                    seq += 1;
                    hub.produced.store(seq, Ordering::Release);
                    continue;
                }
                let event = Event {
                    seq,
                    frame: format_event(&mut buf, seq, unix_nanos(), size),
                };
                match hub.variant {
                    Variant::Broadcast
                    | Variant::BroadcastNoSlow
                    | Variant::Layer
                    | Variant::LayerNoSlow
                    | Variant::Drained => {
                        // An error only means that no client is connected.
                        let _ = hub.events.send(event);
                    }
                    Variant::Hub | Variant::HubNoSlow => unreachable!("published above"),
                    Variant::MpscBounded | Variant::MpscUnbounded => {
                        let mut i = 0;
                        while i < sinks.len() {
                            let sent = match &sinks[i] {
                                // Waits for the slowest client.
                                Sink::Bounded(tx) => tx.send(event.clone()).await.is_ok(),
                                Sink::Unbounded(tx) => tx.send(event.clone()).is_ok(),
                            };
                            if sent {
                                i += 1;
                            } else {
                                sinks.swap_remove(i);
                            }
                        }
                    }
                }
                seq += 1;
                hub.produced.store(seq, Ordering::Release);
            }
        }
    }

    /// The `data:` of event `seq`, `<seq> <nanos> xxx…`, `size` bytes long.
    fn format_data(data: &mut String, seq: u64, nanos: u64, size: usize) {
        use std::fmt::Write as _;
        data.clear();
        let _ = write!(data, "{seq} {nanos} ");
        let pad = size.saturating_sub(data.len());
        data.extend(std::iter::repeat_n('x', pad));
    }

    /// `id: <seq>\ndata: <seq> <nanos> xxx…\n\n`, the data `size` bytes long.
    fn format_event(buf: &mut BytesMut, seq: u64, nanos: u64, size: usize) -> Bytes {
        use std::fmt::Write as _;
        buf.reserve(size + 32);
        let _ = write!(buf, "id: {seq}\ndata: ");
        let before = buf.len();
        let _ = write!(buf, "{seq} {nanos} ");
        let pad = size.saturating_sub(buf.len() - before);
        buf.extend(std::iter::repeat_n(b'x', pad));
        buf.extend_from_slice(b"\n\n");
        buf.split().freeze()
    }

    pub(super) async fn run(variant: Variant, args: Args) -> ExitCode {
        let lifetime = Duration::from_secs(args.lifetime);
        let (events, _) = broadcast::channel(args.capacity as usize);
        let (sinks, new_sinks) = mpsc::unbounded_channel();
        SHARED_FRAMES.store(args.shared_frames, Ordering::Relaxed);
        let hub = Arc::new(Hub {
            variant,
            broadcast_capacity: args.capacity.next_power_of_two(),
            capacity: args.capacity as usize,
            produced: AtomicU64::new(0),
            dropped: Default::default(),
            events,
            sinks,
            positions: Mutex::new(Vec::new()),
            log: SharedLog::new(HubConfig::default().with_retain_frames(args.retain() as usize)),
        });

        let listener = match bind(args.sndbuf) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("error: cannot listen on 127.0.0.1: {e}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener
            .local_addr()
            .expect("a bound socket has an address");
        tokio::spawn(produce(
            hub.clone(),
            new_sinks,
            args.rate,
            args.size as usize,
        ));
        println!("listening on http://{local}");
        let _ = std::io::stdout().flush();

        let app = {
            let hub = hub.clone();
            service_fn(move |req: Request<Incoming>| {
                let hub = hub.clone();
                async move { Ok::<_, Infallible>(route(&hub, &req)) }
            })
        };
        let max_buf_size = args.max_buf_size as usize;
        let copy_uri = args.copy_uri;
        let serving = async {
            match variant {
                Variant::Broadcast
                | Variant::BroadcastNoSlow
                | Variant::MpscBounded
                | Variant::MpscUnbounded
                | Variant::Drained => accept(listener, app, max_buf_size, copy_uri).await,
                Variant::Layer | Variant::LayerNoSlow | Variant::Hub | Variant::HubNoSlow => {
                    let counts = hub.clone();
                    let layer = BackpressureLayer::new(
                        BufferConfig::new(args.capacity as usize)
                            .with_max_bytes(args.max_bytes as usize),
                    )
                    .observer(move |event: &BackpressureEvent<'_>| {
                        if let EventKind::Dropped { count, .. } = event.kind {
                            let class = Class::of(event.client.uri());
                            counts.dropped[class.index()].fetch_add(count, Ordering::Relaxed);
                        }
                    });
                    accept(listener, layer.into_service(app), max_buf_size, copy_uri).await
                }
            }
        };
        tokio::select! {
            () = serving => ExitCode::FAILURE,
            () = shutdown_signal() => ExitCode::SUCCESS,
            () = tokio::time::sleep(lifetime) => {
                eprintln!("error: server lived past --lifetime; exiting");
                ExitCode::FAILURE
            }
        }
    }

    fn route(hub: &Arc<Hub>, req: &Request<Incoming>) -> Response<ResBody> {
        match req.uri().path() {
            "/events" if hub.variant.hub() => {
                // The layer finds the subscription in the response and
                // serves the client from a window over the shared log.
                hub.log
                    .response()
                    .build()
                    .map(|b| Either::Right(Either::Right(b)))
            }
            "/events" if hub.variant == Variant::Drained && Class::of(req.uri()) == Class::Slow => {
                // Take every event as it comes and drop it, for as long as
                // the response lives; the response itself never sends.
                let mut stream = hub.subscribe(Class::Slow);
                // The task ends with the response (its guard lives in the body).
                let guard = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                    while stream.next().await.is_some() {}
                }));
                let body: EventStream = Box::pin(futures::stream::poll_fn(move |_| {
                    let _alive = &guard;
                    std::task::Poll::Pending
                }));
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(Either::Left(StreamBody::new(body)))
                    .expect("a valid response")
            }
            "/events" => {
                let stream = hub.subscribe(Class::of(req.uri()));
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .header(header::CACHE_CONTROL, "no-cache")
                    .body(Either::Left(StreamBody::new(stream)))
                    .expect("a valid response")
            }
            "/stats" => {
                let json = hub.stats().to_json();
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Either::Right(Either::Left(Full::new(Bytes::from(json)))))
                    .expect("a valid response")
            }
            _ => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Either::Right(Either::Left(Full::new(Bytes::new()))))
                .expect("a valid response"),
        }
    }

    /// Serves every connection with the same hyper settings.
    async fn accept<S, B>(listener: TcpListener, svc: S, max_buf_size: usize, copy_uri: bool)
    where
        S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("warning: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let svc = svc.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    if copy_uri {
                        if let Ok(uri) = http::Uri::try_from(req.uri().to_string()) {
                            *req.uri_mut() = uri;
                        }
                    }
                    svc.clone().oneshot(req)
                });
                // A client that goes away ends its connection with an error:
                // nothing to report.
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(max_buf_size)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    /// A loopback listener whose accepted sockets inherit a small send buffer.
    fn bind(sndbuf: u32) -> std::io::Result<TcpListener> {
        let socket = TcpSocket::new_v4()?;
        socket.set_send_buffer_size(sndbuf)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        socket.listen(1024)
    }

    async fn shutdown_signal() {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
}

mod driver {
    use super::*;

    /// One run of one variant.
    #[derive(Debug, Clone, Copy, Default)]
    pub(super) struct Row {
        fast_events_per_sec: f64,
        fast_p50_ms: f64,
        fast_p99_ms: f64,
        producer_events_per_sec: f64,
        peak_rss_bytes: u64,
        cpu_s_per_million: f64,
        slow_dropped: u64,
        /// Events dropped for fast clients in the measured window (should be 0).
        fast_dropped: u64,
        /// The same since they connected (warm-up, and the slow clients'
        /// connecting, included).
        fast_dropped_total: u64,
        /// Sequence numbers fast clients never saw (should be 0).
        fast_gaps: u64,
        /// Server CPU seconds in the window.
        cpu_s: f64,
        /// The machine's 1-minute load average at the end of the run.
        load_1m: f64,
        /// Times the server's threads were preempted in the window.
        preempted: u64,
        /// How busy the machine's CPUs were in the window, in percent (all
        /// processes: the server, the load generator and anything else).
        machine_busy: f64,
        /// CPU time the hypervisor gave to others in the window, in percent.
        steal: f64,
    }

    impl Row {
        fn to_json(self, name: &str, slow: usize, fast: usize, runs: u64) -> serde_json::Value {
            // JSON has no infinity or NaN: an undefined number is null.
            let num = |x: f64| {
                if x.is_finite() {
                    serde_json::json!(x)
                } else {
                    serde_json::Value::Null
                }
            };
            serde_json::json!({
                "name": name,
                "slow": slow,
                "fast": fast,
                "fast_events_per_sec": num(self.fast_events_per_sec),
                "fast_p50_ms": num(self.fast_p50_ms),
                "fast_p99_ms": num(self.fast_p99_ms),
                "producer_events_per_sec": num(self.producer_events_per_sec),
                "peak_rss_bytes": self.peak_rss_bytes,
                "cpu_s_per_million": num(self.cpu_s_per_million),
                "slow_dropped": self.slow_dropped,
                "fast_dropped": self.fast_dropped,
                "fast_dropped_total": self.fast_dropped_total,
                "fast_gaps": self.fast_gaps,
                "cpu_s": num(self.cpu_s),
                "load_1m": num(self.load_1m),
                "server_preempted": self.preempted,
                "machine_busy_pct": num(self.machine_busy),
                "steal_pct": num(self.steal),
                "runs": runs,
            })
        }
    }

    pub(super) async fn run(args: Args) -> ExitCode {
        let variants = if args.variants.is_empty() {
            Variant::ALL.to_vec()
        } else {
            args.variants.clone()
        };
        // What runs, in order: every variant at every `--slow` value, a
        // `-no-slow` variant once, less the `--skip`s.
        let mut plan: Vec<(usize, Variant)> = Vec::new();
        for &requested in &args.slow {
            for &variant in &variants {
                let slow = if variant.no_slow() { 0 } else { requested };
                if args.skips.contains(&(variant, requested)) || plan.contains(&(slow, variant)) {
                    continue;
                }
                plan.push((slow, variant));
            }
        }
        let most = plan.iter().map(|&(slow, _)| slow).max().unwrap_or(0);
        if let Err(e) = ensure_open_files(args.fast as u64 + most as u64 + SPARE_FILES) {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        let tck = clock_ticks();
        let load_start = load_average();
        print_setup(&args, tck);
        let mut results: Vec<Vec<Row>> = vec![Vec::new(); plan.len()];
        for run in 1..=args.runs {
            for (i, &(slow, variant)) in plan.iter().enumerate() {
                eprint!(
                    "run {run}/{}: {:<17} slow {:<6}",
                    args.runs,
                    variant.name(),
                    slow
                );
                let planned = Duration::from_secs(args.warmup + args.seconds);
                match timeout(
                    planned + STARTUP_TIMEOUT * 3 + connect_budget(slow),
                    run_variant(&args, variant, slow, tck),
                )
                .await
                {
                    Ok(Ok(row)) => {
                        eprintln!(
                            " {:>10.0} fast ev/s, p99 {:>8.2} ms, producer {:>8.0} ev/s, peak RSS {:>7.1} MiB, CPU {:>6.2} s/M, load {:.2}",
                            row.fast_events_per_sec,
                            row.fast_p99_ms,
                            row.producer_events_per_sec,
                            mib(row.peak_rss_bytes),
                            row.cpu_s_per_million,
                            row.load_1m
                        );
                        results[i].push(row);
                    }
                    Ok(Err(e)) => {
                        eprintln!(" error: {e}");
                        return ExitCode::FAILURE;
                    }
                    Err(_) => {
                        eprintln!(" error: the run did not finish in time");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
        let medians: Vec<Row> = results.iter().map(|rows| median_row(rows)).collect();
        print_table(&plan, &medians);
        let mut sweep: Vec<usize> = args.slow.iter().copied().filter(|&s| s > 0).collect();
        sweep.dedup();
        for &slow in &sweep {
            // The variants at this slow count, and the `-no-slow` baselines.
            let (vs, rows): (Vec<Variant>, Vec<Row>) = plan
                .iter()
                .zip(&medians)
                .filter(|((s, v), _)| *s == slow || v.no_slow())
                .map(|(&(_, v), &r)| (v, r))
                .unzip();
            if sweep.len() > 1 {
                println!();
                println!("With {slow} slow clients:");
            }
            // Run by run, for the p99 target.
            let layer = plan.iter().position(|&p| p == (slow, Variant::Layer));
            let base = plan.iter().position(|&(_, v)| v == Variant::LayerNoSlow);
            let by_run = layer
                .zip(base)
                .map(|(l, b)| (results[l].as_slice(), results[b].as_slice()));
            print_targets(&args, slow, &vs, &rows, by_run);
        }
        if args.json {
            let json = serde_json::json!({
                "setup": {
                    "rate": args.rate,
                    "size": args.size,
                    "fast": args.fast,
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "runs": args.runs,
                    "capacity": args.capacity,
                    "max_bytes": args.max_bytes,
                    "hub_retain_frames": args.retain(),
                    "max_buf_size": args.max_buf_size,
                    "sndbuf": args.sndbuf,
                    "slow_rcvbuf": SLOW_RCVBUF,
                    "shared_frames": args.shared_frames,
                    "copy_uri": args.copy_uri,
                    "pin": args.pin,
                    "load_1m_start": if load_start.is_finite() { serde_json::json!(load_start) } else { serde_json::Value::Null },
                    "started_unix": unix_nanos() / 1_000_000_000,
                },
                "variants": plan
                    .iter()
                    .zip(&medians)
                    .map(|(&(slow, v), row)| row.to_json(v.name(), slow, args.fast, args.runs))
                    .collect::<Vec<_>>(),
            });
            println!("{json}");
        }
        ExitCode::SUCCESS
    }

    /// The 1-minute load average.
    fn load_average() -> f64 {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// The soft and hard limits on open files (`/proc/self/limits`).
    fn open_files_limits() -> Option<(u64, u64)> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut values = line["Max open files".len()..].split_whitespace();
        let mut value = || -> Option<u64> {
            match values.next()? {
                "unlimited" => Some(u64::MAX),
                v => v.parse().ok(),
            }
        };
        Some((value()?, value()?))
    }

    /// Makes sure this process (and so the servers it starts) may open
    /// `needed` files: raises the soft limit to the hard one if it is lower
    /// (what `ulimit -n` does, here with util-linux's `prlimit`, as the
    /// example has no `libc`), or says how to.
    fn ensure_open_files(needed: u64) -> Result<(), BoxError> {
        let Some((soft, hard)) = open_files_limits() else {
            return Ok(()); // not Linux: let the connects say so
        };
        if soft >= needed {
            return Ok(());
        }
        if hard >= needed {
            let _ = std::process::Command::new("prlimit")
                .arg(format!("--pid={}", std::process::id()))
                .arg(format!("--nofile={hard}:{hard}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if open_files_limits().is_some_and(|(soft, _)| soft >= needed) {
                return Ok(());
            }
        }
        Err(format!(
            "the clients need {needed} open files ({SPARE_FILES} of them spare), the limit \
             is {soft} (hard {hard}): run `ulimit -n {needed}` (or more) first"
        )
        .into())
    }

    async fn run_variant(
        args: &Args,
        variant: Variant,
        slow: usize,
        tck: u64,
    ) -> Result<Row, BoxError> {
        let mut server = Server::start(args, variant, slow).await?;
        let result = drive(args, &server, slow, tck).await;
        server.stop().await;
        result
    }

    async fn drive(args: &Args, server: &Server, slow: usize, tck: u64) -> Result<Row, BoxError> {
        let addr = server.addr;
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(tokio::sync::Notify::new());

        // Fast clients first: with `mpsc-bounded` the producer may stall as
        // soon as a slow client is in, and then takes no one new.
        let mut fast = Vec::with_capacity(args.fast);
        for _ in 0..args.fast {
            let (client, ready) = FastClient::start(addr, measuring.clone(), stop.clone()).await?;
            timeout(STARTUP_TIMEOUT, ready)
                .await
                .map_err(|_| "a fast client got no response headers")???;
            fast.push(client);
        }
        // Slow clients in batches, each bounded in time, and all together.
        let stalled: Vec<TcpStream> = timeout(
            connect_budget(slow),
            futures::stream::iter(0..slow)
                .map(|_| async move {
                    timeout(STARTUP_TIMEOUT, slow_client(addr))
                        .await
                        .map_err(|_| BoxError::from("a slow client got no response headers"))?
                })
                .buffer_unordered(CONNECT_BATCH)
                .collect::<Vec<Result<TcpStream, BoxError>>>(),
        )
        .await
        .map_err(|_| format!("{slow} slow clients did not connect in time"))?
        .into_iter()
        .collect::<Result<_, _>>()?;

        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        let stats0 = timeout(STARTUP_TIMEOUT, server_stats(addr))
            .await
            .map_err(|_| "no answer from /stats")??;
        let cpu0 = cpu_ticks(server.pid)?;
        let preempted0 = preempted(server.pid)?;
        let machine0 = machine_ticks();
        let t0 = Instant::now();
        measuring.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        measuring.store(false, Ordering::Release);
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu1 = cpu_ticks(server.pid)?;
        let stats1 = timeout(STARTUP_TIMEOUT, server_stats(addr))
            .await
            .map_err(|_| "no answer from /stats")??;
        let peak_rss = peak_rss(server.pid)?;
        let preempted1 = preempted(server.pid)?;
        let machine1 = machine_ticks();
        let (machine_busy, steal) = match (machine0, machine1) {
            (Some((busy0, steal0, total0)), Some((busy1, steal1, total1))) if total1 > total0 => {
                let total = (total1 - total0) as f64;
                (
                    100.0 * busy1.saturating_sub(busy0) as f64 / total,
                    100.0 * steal1.saturating_sub(steal0) as f64 / total,
                )
            }
            _ => (f64::NAN, f64::NAN),
        };
        let load_1m = load_average();

        stop.notify_waiters();
        drop(stalled);
        let mut delivered = 0;
        let mut gaps = 0;
        let mut latencies = Vec::new();
        for client in fast {
            let tally = timeout(STARTUP_TIMEOUT, client.task)
                .await
                .map_err(|_| "a fast client did not stop")???;
            delivered += tally.delivered;
            gaps += tally.gaps;
            latencies.extend(tally.latencies_us);
        }
        let cpu_s = cpu1.saturating_sub(cpu0) as f64 / tck as f64;
        Ok(Row {
            fast_events_per_sec: delivered as f64 / elapsed,
            fast_p50_ms: percentile_ms(&mut latencies, 0.50),
            fast_p99_ms: percentile_ms(&mut latencies, 0.99),
            producer_events_per_sec: stats1.produced.saturating_sub(stats0.produced) as f64
                / elapsed,
            peak_rss_bytes: peak_rss,
            cpu_s_per_million: if delivered == 0 {
                f64::INFINITY
            } else {
                cpu_s * 1e6 / delivered as f64
            },
            slow_dropped: stats1.slow_dropped,
            fast_dropped: stats1.fast_dropped.saturating_sub(stats0.fast_dropped),
            fast_dropped_total: stats1.fast_dropped,
            fast_gaps: gaps,
            cpu_s,
            load_1m,
            preempted: preempted1.saturating_sub(preempted0),
            machine_busy,
            steal,
        })
    }

    /// A server variant in its own process.
    struct Server {
        child: Child,
        pid: u32,
        addr: SocketAddr,
    }

    impl Server {
        async fn start(args: &Args, variant: Variant, slow: usize) -> Result<Server, BoxError> {
            let exe = std::env::current_exe()?;
            let lifetime =
                args.warmup + args.seconds + SERVER_GRACE + connect_budget(slow).as_secs();
            // `--pin`: the server on its CPUs (`taskset` execs it: same PID).
            let mut command = if let Some((cpus, _)) = &args.pinned {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(exe);
                c
            } else {
                Command::new(exe)
            };
            let mut child = command
                .arg("--serve")
                .arg(variant.name())
                .args(["--rate", &args.rate.to_string()])
                .args(["--size", &args.size.to_string()])
                .args(["--capacity", &args.capacity.to_string()])
                .args(["--max-bytes", &args.max_bytes.to_string()])
                .args(["--retain", &args.retain().to_string()])
                .args(["--max-buf-size", &args.max_buf_size.to_string()])
                .args(["--sndbuf", &args.sndbuf.to_string()])
                .args(args.shared_frames.then_some("--shared-frames"))
                .args(args.copy_uri.then_some("--copy-uri"))
                .args(["--lifetime", &lifetime.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let pid = child.id().ok_or("the server exited at once")?;
            let stdout = child.stdout.take().expect("piped");
            let mut line = String::new();
            timeout(STARTUP_TIMEOUT, BufReader::new(stdout).read_line(&mut line))
                .await
                .map_err(|_| "the server did not say where it listens")??;
            let addr = line
                .trim()
                .strip_prefix("listening on http://")
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("unexpected first line from the server: {line:?}"))?;
            Ok(Server { child, pid, addr })
        }

        async fn stop(&mut self) {
            let _ = self.child.start_kill();
            let _ = timeout(Duration::from_secs(5), self.child.wait()).await;
        }
    }

    /// What a fast client saw in the measured window.
    struct Tally {
        delivered: u64,
        gaps: u64,
        latencies_us: Vec<u32>,
    }

    struct FastClient {
        task: tokio::task::JoinHandle<Result<Tally, BoxError>>,
    }

    impl FastClient {
        /// Connects and starts reading; `ready` resolves once the response
        /// headers are in.
        async fn start(
            addr: SocketAddr,
            measuring: Arc<AtomicBool>,
            stop: Arc<tokio::sync::Notify>,
        ) -> Result<
            (
                FastClient,
                tokio::sync::oneshot::Receiver<Result<(), BoxError>>,
            ),
            BoxError,
        > {
            let (ready_tx, ready) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move {
                let stopped = stop.notified();
                let mut stopped = std::pin::pin!(stopped);
                stopped.as_mut().enable();
                let response = match open_events(addr, "fast").await {
                    Ok(response) => {
                        let _ = ready_tx.send(Ok(()));
                        response
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string().into()));
                        return Err(e);
                    }
                };
                let mut body = response.into_body();
                let mut parser = SseParser::default();
                let mut tally = Tally {
                    delivered: 0,
                    gaps: 0,
                    latencies_us: Vec::new(),
                };
                let mut expected: Option<u64> = None;
                loop {
                    let frame = tokio::select! {
                        biased;
                        () = &mut stopped => break,
                        frame = body.frame() => frame,
                    };
                    let Some(frame) = frame else { break };
                    let Ok(data) = frame?.into_data() else {
                        continue;
                    };
                    let on = measuring.load(Ordering::Relaxed);
                    let now = if on { unix_nanos() } else { 0 };
                    parser.feed(&data, |seq, nanos| {
                        if on {
                            tally.delivered += 1;
                            let us = now.saturating_sub(nanos) / 1000;
                            tally.latencies_us.push(us.min(u64::from(u32::MAX)) as u32);
                            if let Some(e) = expected {
                                tally.gaps += seq.saturating_sub(e);
                            }
                        }
                        expected = Some(seq + 1);
                    })?;
                }
                Ok(tally)
            });
            Ok((FastClient { task }, ready))
        }
    }

    /// `GET /events?class=...` over a fresh hyper HTTP/1 connection.
    async fn open_events(addr: SocketAddr, class: &str) -> Result<Response<Incoming>, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = Request::get(format!("/events?class={class}"))
            .header(header::HOST, addr.to_string())
            .body(Empty::new())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(format!("GET /events: {}", response.status()).into());
        }
        Ok(response)
    }

    /// Connects with a small receive buffer, reads the response headers,
    /// and stops reading: the returned socket stays open, unread.
    async fn slow_client(addr: SocketAddr) -> Result<TcpStream, BoxError> {
        let socket = TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(SLOW_RCVBUF)?;
        let mut stream = socket.connect(addr).await?;
        stream
            .write_all(
                format!("GET /events?class=slow HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err("the server closed a slow client's connection".into());
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > 64 * 1024 {
                return Err("response headers too long".into());
            }
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            return Err("a slow client's request failed".into());
        }
        Ok(stream)
    }

    async fn server_stats(addr: SocketAddr) -> Result<ServerStats, BoxError> {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET /stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("a /stats answer without a body")?;
        ServerStats::from_json(&response[split + 4..])
    }

    /// Splits a byte stream into SSE events and reads `data: <seq> <nanos>`.
    #[derive(Default)]
    struct SseParser {
        /// The unfinished end of the last chunk.
        rest: Vec<u8>,
    }

    impl SseParser {
        fn feed(
            &mut self,
            mut data: &[u8],
            mut on_event: impl FnMut(u64, u64),
        ) -> Result<(), BoxError> {
            if !self.rest.is_empty() {
                // Complete the event that started in an earlier chunk. `rest`
                // holds no `\n\n`: the end is in `data`, or across the seam.
                let seam = self.rest.last() == Some(&b'\n') && data.first() == Some(&b'\n');
                let Some(end) = (if seam { Some(1) } else { find_end(data) }) else {
                    self.rest.extend_from_slice(data);
                    return Ok(());
                };
                self.rest.extend_from_slice(&data[..end]);
                let (seq, nanos) = parse_event(&self.rest)?;
                on_event(seq, nanos);
                self.rest.clear();
                data = &data[end..];
            }
            while let Some(end) = find_end(data) {
                let (seq, nanos) = parse_event(&data[..end])?;
                on_event(seq, nanos);
                data = &data[end..];
            }
            self.rest.extend_from_slice(data);
            Ok(())
        }
    }

    /// The index just past the first `\n\n`.
    fn find_end(data: &[u8]) -> Option<usize> {
        data.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
    }

    fn parse_event(event: &[u8]) -> Result<(u64, u64), BoxError> {
        let bad = || format!("unexpected event: {:?}", String::from_utf8_lossy(event));
        let start = event
            .windows(6)
            .position(|w| w == b"data: ")
            .ok_or_else(bad)?
            + 6;
        let mut fields = event[start..].split(|&b| b == b' ');
        let mut number =
            || -> Option<u64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
        match (number(), number()) {
            (Some(seq), Some(nanos)) => Ok((seq, nanos)),
            _ => Err(bad().into()),
        }
    }

    /// Ticks of CPU time (user + system) of a process so far.
    fn cpu_ticks(pid: u32) -> Result<u64, BoxError> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses and may
        // hold spaces: state is field 3, utime 14, stime 15.
        let after = &stat[stat.rfind(')').ok_or("odd /proc/PID/stat")? + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: u64 = fields.get(11).ok_or("odd /proc/PID/stat")?.parse()?;
        let stime: u64 = fields.get(12).ok_or("odd /proc/PID/stat")?.parse()?;
        Ok(utime + stime)
    }

    /// Involuntary context switches of all threads of a process so far: how
    /// often something else took its CPU.
    fn preempted(pid: u32) -> Result<u64, BoxError> {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
                continue; // a thread that just ended
            };
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// The machine's CPU ticks from `/proc/stat`: (busy, steal, total), all
    /// CPUs together.
    fn machine_ticks() -> Option<(u64, u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let t: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest counted in user)
        let [user, nice, system, idle, iowait, irq, softirq, steal, ..] = t[..] else {
            return None;
        };
        let busy = user + nice + system + irq + softirq + steal;
        Some((busy, steal, busy + idle + iowait))
    }

    /// `VmHWM`: the peak resident set size of a process, in bytes.
    fn peak_rss(pid: u32) -> Result<u64, BoxError> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .ok_or("no VmHWM in /proc/PID/status")?;
        let kib: u64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    }

    /// Clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK`;
    /// 100, the value on every common Linux, if that cannot run).
    fn clock_ticks() -> u64 {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    }

    fn percentile_ms(latencies_us: &mut [u32], p: f64) -> f64 {
        if latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((latencies_us.len() as f64 * p).ceil() as usize).clamp(1, latencies_us.len());
        let (_, value, _) = latencies_us.select_nth_unstable(rank - 1);
        f64::from(*value) / 1000.0
    }

    fn median(mut values: Vec<f64>) -> f64 {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        }
    }

    fn median_row(rows: &[Row]) -> Row {
        let m = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
        Row {
            fast_events_per_sec: m(|r| r.fast_events_per_sec),
            fast_p50_ms: m(|r| r.fast_p50_ms),
            fast_p99_ms: m(|r| r.fast_p99_ms),
            producer_events_per_sec: m(|r| r.producer_events_per_sec),
            peak_rss_bytes: m(|r| r.peak_rss_bytes as f64) as u64,
            cpu_s_per_million: m(|r| r.cpu_s_per_million),
            slow_dropped: m(|r| r.slow_dropped as f64) as u64,
            fast_dropped: m(|r| r.fast_dropped as f64) as u64,
            fast_dropped_total: m(|r| r.fast_dropped_total as f64) as u64,
            fast_gaps: m(|r| r.fast_gaps as f64) as u64,
            cpu_s: m(|r| r.cpu_s),
            load_1m: m(|r| r.load_1m),
            preempted: m(|r| r.preempted as f64) as u64,
            machine_busy: m(|r| r.machine_busy),
            steal: m(|r| r.steal),
        }
    }

    fn mib(bytes: u64) -> f64 {
        mib_f(bytes as f64)
    }

    fn mib_f(bytes: f64) -> f64 {
        bytes / (1024.0 * 1024.0)
    }

    fn print_setup(args: &Args, tck: u64) {
        println!(
            "SSE fan-out on 127.0.0.1: {} events/s of {} bytes, {} fast + {:?} slow clients, \
             {} s warm-up + {} s measured, {} run(s) per variant (medians shown)",
            args.rate, args.size, args.fast, args.slow, args.warmup, args.seconds, args.runs
        );
        println!(
            "queues: {} events; layer ring and hub window: {} events / {} bytes; hub log: {} \
             frames; hyper max_buf_size {}; SO_SNDBUF {}; slow clients' SO_RCVBUF {}; frames {}; \
             CLK_TCK {tck}",
            args.capacity,
            args.capacity,
            args.max_bytes,
            args.retain(),
            args.max_buf_size,
            args.sndbuf,
            SLOW_RCVBUF,
            if args.shared_frames {
                "shared"
            } else {
                "copied per client"
            }
        );
        if args.copy_uri {
            println!("request URIs copied before the layer sees them (--copy-uri)");
        }
        if let Some((server, driver)) = &args.pinned {
            println!("server on CPUs {server}, load generator on CPUs {driver} (--pin)");
        }
    }

    fn print_table(plan: &[(usize, Variant)], rows: &[Row]) {
        println!();
        println!(
            "| variant | slow | fast ev/s | p50 ms | p99 ms | producer ev/s | peak RSS MiB | CPU s/M ev | slow dropped | fast dropped | fast gaps | load 1m | preempted | machine busy % | steal % |"
        );
        println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for (&(slow, v), r) in plan.iter().zip(rows) {
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {:.2} | {} | {} | {} | {:.2} | {} | {:.0} | {:.1} |",
                v.name(),
                slow,
                r.fast_events_per_sec,
                r.fast_p50_ms,
                r.fast_p99_ms,
                r.producer_events_per_sec,
                mib(r.peak_rss_bytes),
                r.cpu_s_per_million,
                r.slow_dropped,
                r.fast_dropped,
                r.fast_gaps,
                r.load_1m,
                r.preempted,
                r.machine_busy,
                r.steal
            );
        }
    }

    /// The p99 target run by run (the target asks it of every run, not
    /// only of the medians): run N of `layer` against run N of
    /// `layer-no-slow`, which ran just before or after it.
    fn print_p99_by_run(layer: &[Row], base: &[Row]) {
        if layer.len() < 2 {
            return;
        }
        let ratios: Vec<f64> = layer
            .iter()
            .zip(base)
            .map(|(l, b)| l.fast_p99_ms / b.fast_p99_ms)
            .collect();
        let within = ratios.iter().filter(|&&r| r <= 1.2).count();
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "  run by run:                     {} ({within} of {} within 1.2)",
            shown.join(", "),
            ratios.len()
        );
    }

    /// The performance targets of BENCHMARKS.md, where the variants they
    /// compare were run.
    fn print_targets(
        args: &Args,
        slow: usize,
        variants: &[Variant],
        rows: &[Row],
        by_run: Option<(&[Row], &[Row])>,
    ) {
        let get = |v: Variant| variants.iter().position(|&x| x == v).map(|i| rows[i]);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        if let Some(hub) = get(Variant::Hub) {
            print_hub_targets(
                args,
                slow,
                hub,
                get(Variant::Broadcast),
                get(Variant::BroadcastNoSlow),
            );
        }
        let Some(layer) = get(Variant::Layer) else {
            return;
        };
        println!();
        if let Some(b) = get(Variant::Broadcast) {
            let r = layer.fast_events_per_sec / b.fast_events_per_sec;
            println!(
                "layer / broadcast fast ev/s:      {r:.3} (target >= 0.95: {})",
                verdict(r >= 0.95)
            );
        }
        if let Some(n) = get(Variant::LayerNoSlow) {
            let r = layer.fast_events_per_sec / n.fast_events_per_sec;
            println!(
                "layer / layer-no-slow fast ev/s:  {r:.3} (target >= 0.95: {})",
                verdict(r >= 0.95)
            );
            let p = layer.fast_p99_ms / n.fast_p99_ms;
            println!(
                "layer / layer-no-slow fast p99:   {p:.3} (target <= 1.2: {})",
                verdict(p <= 1.2)
            );
            if let Some((layer, base)) = by_run {
                print_p99_by_run(layer, base);
            }
            let growth = layer.peak_rss_bytes as f64 - n.peak_rss_bytes as f64;
            let bound = slow as f64 * (args.max_bytes as f64 + 64.0 * 1024.0);
            println!(
                "layer peak RSS growth over S=0:   {:.2} MiB for {} slow clients, hyper's share included (S x (max_bytes + 64 KiB) = {:.2} MiB: {})",
                mib_f(growth),
                slow,
                mib_f(bound),
                if growth <= bound { "within" } else { "over" }
            );
            if let (Some(b), Some(bn)) = (get(Variant::Broadcast), get(Variant::BroadcastNoSlow)) {
                // A stalled broadcast client holds nothing of its own: its
                // growth is what hyper and the connection hold.
                let hyper = b.peak_rss_bytes as f64 - bn.peak_rss_bytes as f64;
                let beyond = growth - hyper;
                println!(
                    "  of which hyper and the connection (broadcast minus broadcast-no-slow): {:.2} MiB",
                    mib_f(hyper)
                );
                println!(
                    "layer peak RSS growth beyond hyper: {:.2} MiB (target <= S x (max_bytes + 64 KiB) = {:.2} MiB: {})",
                    mib_f(beyond),
                    mib_f(bound),
                    verdict(beyond <= bound)
                );
            }
        }
        if let (Some(b), Some(bn)) = (get(Variant::Broadcast), get(Variant::BroadcastNoSlow)) {
            let p = b.fast_p99_ms / bn.fast_p99_ms;
            println!("broadcast / broadcast-no-slow fast p99: {p:.3} (for reference)");
        }
    }

    /// The hub's targets (the hub issue): fast clients lose nothing; server CPU
    /// per delivered event at most 0.8 x `broadcast`'s; fast p99 at most 1.2 x
    /// `broadcast-no-slow`'s; peak RSS at most `broadcast`'s + 1 KiB per client.
    fn print_hub_targets(
        args: &Args,
        slow: usize,
        hub: Row,
        broadcast: Option<Row>,
        broadcast_no_slow: Option<Row>,
    ) {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!();
        let lost = hub.fast_dropped + hub.fast_gaps;
        println!(
            "hub fast clients' events lost:     {lost} (dropped {}, gaps {}; target 0: {}); \
             {} dropped since they connected",
            hub.fast_dropped,
            hub.fast_gaps,
            verdict(lost == 0),
            hub.fast_dropped_total
        );
        if let Some(b) = broadcast {
            let r = hub.cpu_s_per_million / b.cpu_s_per_million;
            println!(
                "hub / broadcast CPU per event:     {r:.3} ({:.2} / {:.2} s/M; target <= 0.8: {})",
                hub.cpu_s_per_million,
                b.cpu_s_per_million,
                verdict(r <= 0.8)
            );
            let clients = (slow + args.fast) as u64;
            let bound = b.peak_rss_bytes + clients * 1024;
            println!(
                "hub peak RSS:                      {:.1} MiB (target <= broadcast {:.1} MiB + {clients} x 1 KiB = {:.1} MiB: {})",
                hub.peak_rss_bytes as f64 / 1048576.0,
                b.peak_rss_bytes as f64 / 1048576.0,
                bound as f64 / 1048576.0,
                verdict(hub.peak_rss_bytes <= bound)
            );
        }
        if let Some(n) = broadcast_no_slow {
            let p = hub.fast_p99_ms / n.fast_p99_ms;
            println!(
                "hub / broadcast-no-slow fast p99:  {p:.3} ({:.2} / {:.2} ms; target <= 1.2: {})",
                hub.fast_p99_ms,
                n.fast_p99_ms,
                verdict(p <= 1.2)
            );
        }
    }
}
