//! A gRPC server-streaming service whose every call goes through
//! [`BackpressureLayer`], with no `protoc`: the messages are hand-written
//! `prost` structs and the service is wired with tonic's `server::Grpc`.
//!
//! ```proto
//! syntax = "proto3";
//! package tower_backpressure.demo;
//!
//! service Ticker {
//!   rpc Subscribe(SubscribeRequest) returns (stream Tick);
//! }
//! message SubscribeRequest { uint64 count = 1; }
//! message Tick { uint64 seq = 1; bytes payload = 2; }
//! ```
//!
//! One producer emits `--rate` ticks per second, each with one strictly
//! increasing `seq` shared by all calls and a `payload` of `--size` bytes.
//! A call to `/tower_backpressure.demo.Ticker/Subscribe` receives the ticks
//! produced after it started until `count` ticks have been produced (0:
//! forever), then ends with status `OK`. A client that reads too slowly does
//! not slow the producer or the other calls: its buffer of `--capacity`
//! frames (each one or more whole messages) drops its oldest frames, so it
//! sees a jump in `seq`; with `--data-loss` its call ends at the first gap
//! with status `DATA_LOSS` instead.
//!
//! ```text
//! cargo run --release --example grpc_server -- --rate 5000
//! grpcurl -plaintext -d '{"count":5}' -import-path . -proto ticker.proto \
//!     127.0.0.1:3000 tower_backpressure.demo.Ticker/Subscribe
//! ```
//!
//! `--hub` serves every call from one shared log instead (a
//! `tower_backpressure::hub::Hub` retaining `--retain FRAMES`, default
//! 10000): each tick is encoded once, as a gRPC message, and published; each
//! call gets a window over the log through the layer (no pump, no copy per
//! call), bounded by the same flags. A call then delivers `count` ticks (0:
//! forever) before `OK`; one that falls behind its window skips the oldest
//! (a jump in `seq`, or `DATA_LOSS` with `--data-loss`). On SIGINT/SIGTERM
//! the open calls end with the server (no `UNAVAILABLE` status: the log has
//! no end).
//!
//! With `--data-loss`, what a stalled call still receives after its first
//! drop, before `DATA_LOSS`, is what the server had already handed to h2
//! and the kernel: the listener sets a 64 KiB socket send buffer
//! ([`SEND_BUFFER`]) so that this is about 0.5 MB, not megabytes.
//!
//! Contract: `--addr HOST:PORT` (default `127.0.0.1:3000`, port 0 picks a free
//! port); once connections are accepted, exactly one line
//! `listening on http://HOST:PORT` is printed on stdout; SIGINT and SIGTERM
//! end the open calls (status `UNAVAILABLE`) and exit with status 0. Logs go
//! to stderr.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::io::{IsTerminal as _, Write as _};
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::Stream;
use futures::future::BoxFuture;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::transport::server::TcpConnectInfo;
use tonic::{Status, body::Body};
use tower_backpressure::hub::{Hub, HubConfig};
use tower_backpressure::{
    BackpressureLayer, BufferConfig, Flush, GrpcDataLoss, PeerAddr, TracingObserver,
};

/// How long open calls get to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The full path of the one method.
pub const SUBSCRIBE_PATH: &str = "/tower_backpressure.demo.Ticker/Subscribe";

/// The largest `--rate`. Every millisecond the producer sends what is due
/// without yielding: at a rate far beyond what it can send, that loop never
/// ends, and SIGTERM no longer stops the server.
const MAX_RATE: u64 = 10_000_000;

/// The largest `--size` (1 MiB).
const MAX_SIZE: u64 = 1 << 20;

/// gRPC server streaming at a fixed rate, each call behind a drop-oldest buffer.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:3000")]
    addr: String,
    /// Ticks per second, shared by all calls.
    #[arg(long, value_name = "TICKS_PER_SEC", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RATE))]
    rate: u64,
    /// Size of each tick's `payload`.
    #[arg(long, value_name = "BYTES", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=MAX_SIZE))]
    size: usize,
    /// Frames buffered per call before the oldest are dropped.
    #[arg(long, value_name = "FRAMES", default_value_t = 1000)]
    capacity: usize,
    /// Bytes buffered per call before the oldest are dropped (default: no limit).
    #[arg(long, value_name = "BYTES")]
    max_bytes: Option<usize>,
    /// Fraction of the limits at which a call counts as under pressure, in (0, 1].
    #[arg(long, value_name = "F", default_value_t = 0.8)]
    threshold: f64,
    /// End a slow client's call with `DATA_LOSS` at its first gap.
    #[arg(long)]
    data_loss: bool,
    /// Serve every call from one shared log (a hub) instead of a buffer of
    /// its own.
    #[arg(long)]
    hub: bool,
    /// With `--hub`: how many ticks the shared log retains.
    #[arg(long, value_name = "FRAMES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    retain: u64,
}

/// `message SubscribeRequest { uint64 count = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct SubscribeRequest {
    /// Ticks to produce before the call ends; 0: forever.
    #[prost(uint64, tag = "1")]
    pub count: u64,
}

/// `message Tick { uint64 seq = 1; bytes payload = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tick {
    /// One sequence shared by all calls, strictly increasing.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// `--size` bytes.
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: Bytes,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Refuse a bad configuration now, not when the first call comes.
    let mut config = BufferConfig::new(args.capacity).with_threshold(args.threshold);
    if let Some(max_bytes) = args.max_bytes {
        config = config.with_max_bytes(max_bytes);
    }
    if args.hub {
        // Each tick is a DATA frame of its own in the log: join those that
        // wait into frames of up to 16 KiB, as tonic's encoder does, since
        // h2 clients refuse floods of tiny DATA frames (ENHANCE_YOUR_CALM).
        config = config.with_flush(Flush::coalesce(256, 16 * 1024));
        if let Err(e) = config.validate_for_hub() {
            eprintln!("error: --hub: {e}");
            return ExitCode::from(2);
        }
    }
    let layer = match BackpressureLayer::try_new(config) {
        Ok(layer) => layer.observer(TracingObserver::new()),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };

    let listener = match listen(&args.addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    let local = listener
        .local_addr()
        .expect("a bound socket has an address");

    let (stop, shutdown) = watch::channel(false);
    let log = args
        .hub
        .then(|| Hub::new(HubConfig::default().with_retain_frames(args.retain as usize)));
    let producer = Producer::spawn(args.rate, args.size, log);
    let ticker = Ticker::new(producer, shutdown.clone());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut stopped = shutdown;
    let signal = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    // `--data-loss`: `DATA_LOSS` at the first gap; `None` marks no gap.
    let layer = layer.gap_marker(args.data_loss.then(GrpcDataLoss::new));
    let server = server_builder()
        .layer(
            tower::ServiceBuilder::new()
                .map_request(peer_addr)
                .layer(layer)
                .into_inner(),
        )
        .add_service(ticker)
        .serve_with_incoming_shutdown(incoming, signal);
    let mut server = std::pin::pin!(server);

    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();
    tracing::info!(
        rate = args.rate,
        size = args.size,
        capacity = args.capacity,
        max_bytes = args.max_bytes,
        threshold = args.threshold,
        data_loss = args.data_loss,
        "serving {SUBSCRIBE_PATH}"
    );

    tokio::select! {
        result = &mut server => {
            // Only an error ends the server before a signal.
            if let Err(e) = result {
                eprintln!("error: server failed: {e}");
            }
            return ExitCode::FAILURE;
        }
        () = shutdown_signal() => {}
    }

    tracing::info!("shutting down: ending open calls");
    stop.send_replace(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(())) => tracing::info!("stopped"),
        Ok(Err(e)) => tracing::warn!("server error while stopping: {e}"),
        Err(_) => tracing::warn!(
            "some clients did not take their last ticks within {SHUTDOWN_GRACE:?}; closing them"
        ),
    }
    ExitCode::SUCCESS
}

/// The server's transport settings: tonic's defaults.
///
/// None of tonic's HTTP/2 knobs bounds what a slow call receives after its
/// first drop: `initial_stream_window_size`, `initial_connection_window_size`
/// and `max_frame_size` are what the server *receives* (the client's
/// windows decide what it may be sent), and h2's per-stream send buffer
/// (hyper's `max_send_buf_size`, 400 KiB) is not exposed by tonic's
/// builder. The socket's send buffer is: see [`listen`].
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        // HTTP/2 PINGs keep a quiet call's connection through proxies and
        // find a peer that vanished (the gRPC counterpart of SSE comments).
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// The send buffer of every accepted connection. `DATA_LOSS` reaches a
/// stalled call only after what is already in h2's send buffer (400 KiB per
/// stream) and in the kernel's: left to itself the kernel grows a
/// connection's send buffer to megabytes (measured: 3.2 MB reached a stalled
/// client after its first drop, before `DATA_LOSS`; 0.55 MB with this). It
/// also caps one connection's throughput at about this much per round
/// trip (64 KiB: 6 MB/s at 10 ms), ample for a ticker; raise it for bulk
/// streams over long distances.
pub const SEND_BUFFER: u32 = 64 * 1024;

/// Listens on `addr` (`HOST:PORT`); every connection accepted inherits the
/// listener's [`SEND_BUFFER`].
pub async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut failed = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.set_send_buffer_size(SEND_BUFFER)?;
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(listener) => return Ok(listener),
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// The one producer, shared by every call.
#[derive(Clone)]
pub struct Producer {
    ticks: broadcast::Sender<Tick>,
    /// `--hub`: the shared log of encoded ticks.
    log: Option<Hub>,
}

impl Producer {
    /// Starts producing `rate` ticks per second with `size`-byte payloads.
    pub fn spawn(rate: u64, size: usize, log: Option<Hub>) -> Self {
        // The layer does the real buffering, per call. This channel only has
        // to outlast a short scheduling hiccup: each call's pump drains its
        // receiver as fast as ticks come, however slowly the client reads.
        let (ticks, _) = broadcast::channel(4096);
        let payload = Bytes::from(vec![b'x'; size]);
        tokio::spawn(produce(ticks.clone(), log.clone(), rate, payload));
        Self { ticks, log }
    }

    /// The ticks produced from now on: up to `count` of them (0: forever);
    /// `UNAVAILABLE` once `shutdown` turns true.
    fn subscribe(
        &self,
        count: u64,
        shutdown: watch::Receiver<bool>,
    ) -> impl Stream<Item = Result<Tick, Status>> + Send + 'static {
        struct Call {
            ticks: broadcast::Receiver<Tick>,
            shutdown: watch::Receiver<bool>,
            /// The seq of the call's last tick, fixed by its first.
            last: Option<u64>,
        }
        let call = Call {
            ticks: self.ticks.subscribe(),
            shutdown,
            last: None,
        };
        futures::stream::unfold(Some(call), move |call| async move {
            let mut call = call?;
            loop {
                let received = tokio::select! {
                    received = call.ticks.recv() => received,
                    Ok(_) = call.shutdown.wait_for(|stop| *stop) => {
                        return Some((Err(Status::unavailable("server shutting down")), None));
                    }
                };
                let tick = match received {
                    Ok(tick) => tick,
                    // Only if this call's pump was starved of CPU for 4096
                    // ticks: the client sees a gap, as for a drop.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                // The first tick produced after the call started.
                let last = *call.last.get_or_insert(match count {
                    0 => u64::MAX,
                    n => tick.seq + (n - 1),
                });
                if tick.seq > last {
                    return None;
                }
                let next = (tick.seq < last).then_some(call);
                return Some((Ok(tick), next));
            }
        })
    }
}

/// `rate` ticks per second, seq 0, 1, 2, ...
async fn produce(ticks: broadcast::Sender<Tick>, log: Option<Hub>, rate: u64, payload: Bytes) {
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
            let tick = Tick {
                seq,
                payload: payload.clone(),
            };
            match &log {
                // Encoded once, as a gRPC message, for every call.
                Some(log) => {
                    let _ = log.publish_with_id(seq, grpc_message(&tick));
                }
                // An error only means that no call is open right now.
                None => {
                    let _ = ticks.send(tick);
                }
            }
            seq += 1;
        }
    }
}

/// The `tower_backpressure.demo.Ticker` service, written out as tonic's code
/// generator would.
#[derive(Clone)]
pub struct Ticker {
    producer: Producer,
    shutdown: watch::Receiver<bool>,
}

impl Ticker {
    /// Serves `producer`'s ticks; every call ends when `shutdown` turns true.
    pub fn new(producer: Producer, shutdown: watch::Receiver<bool>) -> Self {
        Self { producer, shutdown }
    }
}

impl NamedService for Ticker {
    const NAME: &'static str = "tower_backpressure.demo.Ticker";
}

impl tower::Service<http::Request<Body>> for Ticker {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != SUBSCRIBE_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        if let Some(log) = self.producer.log.clone() {
            return Box::pin(subscribe_from_hub(log, req));
        }
        let method = Subscribe(self.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Tick, SubscribeRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .server_streaming(method, req)
                .await)
        })
    }
}

/// `Subscribe` with `--hub`: the request's one message, then a window over
/// the shared log of encoded ticks (the layer finds it in the response).
async fn subscribe_from_hub(
    log: Hub,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Infallible> {
    use http_body_util::BodyExt;
    let Ok(request) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(Status::invalid_argument("unreadable request").into_http());
    };
    // One message: a compression flag, a length, the protobuf.
    let Some(count) = request
        .get(5..)
        .and_then(|message| <SubscribeRequest as prost::Message>::decode(message).ok())
        .map(|r| r.count)
    else {
        return Ok(Status::invalid_argument("expected one SubscribeRequest").into_http());
    };
    let mut ok = http::HeaderMap::new();
    ok.insert("grpc-status", http::HeaderValue::from_static("0"));
    let response = log
        .response()
        .content_type(http::HeaderValue::from_static("application/grpc"))
        .limit((count > 0).then_some(count))
        .trailers(ok)
        .build();
    Ok(response.map(Body::new))
}

/// A tick as one gRPC message: no compression, its length, the protobuf.
fn grpc_message(tick: &Tick) -> Bytes {
    let len = prost::Message::encoded_len(tick);
    let mut buf = bytes::BytesMut::with_capacity(5 + len);
    bytes::BufMut::put_u8(&mut buf, 0);
    bytes::BufMut::put_u32(&mut buf, len as u32);
    prost::Message::encode(tick, &mut buf).expect("room for the message");
    buf.freeze()
}

/// `rpc Subscribe(SubscribeRequest) returns (stream Tick)`.
struct Subscribe(Ticker);

type TickStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

impl ServerStreamingService<SubscribeRequest> for Subscribe {
    type Response = Tick;
    type ResponseStream = TickStream;
    type Future = Ready<Result<tonic::Response<TickStream>, Status>>;

    fn call(&mut self, request: tonic::Request<SubscribeRequest>) -> Self::Future {
        let count = request.get_ref().count;
        let ticks = (self.0.producer).subscribe(count, self.0.shutdown.clone());
        ready(Ok(tonic::Response::new(Box::pin(ticks))))
    }
}

/// The layer reads the client's address from a [`PeerAddr`] extension;
/// tonic records it as [`TcpConnectInfo`].
fn peer_addr(mut request: http::Request<Body>) -> http::Request<Body> {
    if let Some(addr) = request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
    {
        request.extensions_mut().insert(PeerAddr(addr));
    }
    request
}

#[path = "common/signal.rs"]
mod signal;
use signal::shutdown_signal;
