//! The `grpc_server` example's service behind `Server::builder().layer(..)`,
//! served on 127.0.0.1:0 and driven by a tonic client over HTTP/2: a client
//! that stops reading and resumes gets whole, increasing ticks and status
//! `OK`; a fast one gets every tick; with `GrpcDataLoss` a slow one ends with
//! `DATA_LOSS`.

mod common;
#[path = "../examples/grpc_server.rs"]
#[allow(dead_code, unreachable_pub)]
mod grpc_server;

use std::net::SocketAddr;

use common::*;
use grpc_server::{Producer, SUBSCRIBE_PATH, SubscribeRequest, Tick, Ticker};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Endpoint;
use tower_backpressure::{
    BackpressureLayer, BufferConfig, CloseReason, EventKind, EvictReason, GrpcDataLoss,
};

/// Bytes of each tick's payload.
const SIZE: usize = 64;
/// Ticks per second: fast enough that a stalled call overflows its buffer
/// within a fraction of a second, slow enough that a call's pump would have
/// to be starved for 200 ms to lag behind the producer's 4096-tick channel.
const RATE: u64 = 20_000;
/// The client's HTTP/2 windows when it stalls: once they are full the server
/// cannot send, hyper stops polling the body, and the layer's buffer fills.
const SMALL_WINDOW: u32 = 64 * 1024;

/// Serves the example's `Ticker` behind `layer` on 127.0.0.1:0. The returned
/// sender keeps calls from ending with `UNAVAILABLE` (that is shutdown).
macro_rules! serve {
    ($layer:expr) => {
        serve!($layer, None)
    };
    ($layer:expr, $log:expr) => {{
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let ticker = Ticker::new(Producer::spawn(RATE, SIZE, $log), shutdown);
        let server = tonic::transport::Server::builder()
            .layer($layer)
            .add_service(ticker)
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        (addr, stop)
    }};
}

/// A hand-written tonic client call: `Subscribe { count }`.
async fn subscribe(addr: SocketAddr, count: u64, window: Option<u32>) -> tonic::Streaming<Tick> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window);
    let channel = guard("the connection", endpoint.connect()).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    guard("the channel", grpc.ready()).await.unwrap();
    let codec = tonic_prost::ProstCodec::<SubscribeRequest, Tick>::default();
    let call = grpc.server_streaming(
        tonic::Request::new(SubscribeRequest { count }),
        PathAndQuery::from_static(SUBSCRIBE_PATH),
        codec,
    );
    guard("the response headers", call)
        .await
        .unwrap()
        .into_inner()
}

/// Reads ticks until the call ends; every one must decode and be whole.
async fn read_to_end(stream: &mut tonic::Streaming<Tick>) -> (Vec<u64>, Result<(), tonic::Status>) {
    let mut seqs = Vec::new();
    loop {
        match guard("the next tick", stream.message()).await {
            Ok(Some(tick)) => {
                assert_eq!(tick.payload.len(), SIZE, "a whole payload");
                assert!(tick.payload.iter().all(|b| *b == b'x'));
                seqs.push(tick.seq);
            }
            Ok(None) => return (seqs, Ok(())),
            Err(status) => return (seqs, Err(status)),
        }
    }
}

fn assert_increasing(seqs: &[u64]) {
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq must be strictly increasing"
    );
}

#[tokio::test]
async fn a_stalled_call_that_resumes_gets_whole_increasing_ticks_and_ok() {
    const COUNT: u64 = 20_000;
    let (observer, mut events) = recorder();
    let config = BufferConfig::new(16).with_max_bytes(16 * 1024);
    let (addr, _stop) = serve!(BackpressureLayer::new(config).observer(observer));

    let mut stream = subscribe(addr, COUNT, Some(SMALL_WINDOW)).await;
    // Read nothing until the server had to drop frames for this call.
    let mut all = Vec::new();
    let opened = wait_for(&mut events, &mut all, |s| s.kind == EventKind::Opened).await;
    assert_eq!(opened.path, SUBSCRIBE_PATH);
    wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Dropped { .. })
    })
    .await;

    let (seqs, end) = read_to_end(&mut stream).await;
    end.expect("the call ends with status OK");
    let trailers = stream.trailers().await.unwrap();
    assert!(trailers.is_some(), "the trailers arrive");
    assert_increasing(&seqs);
    assert!(
        (seqs.len() as u64) < COUNT,
        "a stalled call loses ticks: got {} of {COUNT}",
        seqs.len()
    );
    let span = seqs.last().unwrap() - seqs.first().unwrap();
    assert!(span < COUNT, "no tick from outside the call's range");

    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    assert!(closed.stats.dropped > 0);
    assert_eq!(
        closed.stats.sent + closed.stats.dropped,
        closed.stats.pushed
    );
}

#[tokio::test]
async fn a_fast_call_gets_every_tick() {
    const COUNT: u64 = 2_000;
    let (observer, mut events) = recorder();
    // More frames than the call can produce (each holds at least one tick):
    // nothing can be dropped, whatever the timing.
    let config = BufferConfig::new(4 * COUNT as usize);
    let (addr, _stop) = serve!(BackpressureLayer::new(config).observer(observer));

    let mut stream = subscribe(addr, COUNT, None).await;
    let (seqs, end) = read_to_end(&mut stream).await;
    end.expect("the call ends with status OK");
    let first = seqs[0];
    assert_eq!(seqs, (first..first + COUNT).collect::<Vec<_>>());

    let mut all = Vec::new();
    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    assert_eq!(closed.stats.dropped, 0);
}

#[tokio::test]
async fn with_grpc_data_loss_a_stalled_call_ends_with_data_loss() {
    const COUNT: u64 = 20_000;
    let (observer, mut events) = recorder();
    let config = BufferConfig::new(16).with_max_bytes(16 * 1024);
    let layer = BackpressureLayer::new(config)
        .observer(observer)
        .gap_marker(GrpcDataLoss::new());
    let (addr, _stop) = serve!(layer);

    let mut stream = subscribe(addr, COUNT, Some(SMALL_WINDOW)).await;
    let mut all = Vec::new();
    wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Dropped { .. })
    })
    .await;

    let (seqs, end) = read_to_end(&mut stream).await;
    let status = end.expect_err("the call ends at the gap");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(status.message().contains("client too slow"), "{status:?}");
    assert!(!seqs.is_empty(), "what was kept before the gap arrives");
    assert_increasing(&seqs);
    let span = seqs.last().unwrap() - seqs.first().unwrap();
    assert_eq!(
        span + 1,
        seqs.len() as u64,
        "no gap inside what was delivered"
    );

    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Evicted(EvictReason::DataLoss)
        }
    );
}

/// `--hub`: one shared log, each call a window over it.
fn log() -> Option<tower_backpressure::hub::Hub> {
    Some(tower_backpressure::hub::Hub::new(
        tower_backpressure::hub::HubConfig::default().with_retain_frames(100_000),
    ))
}

#[tokio::test]
async fn a_fast_hub_call_gets_every_tick_then_ok() {
    const COUNT: u64 = 2_000;
    let (observer, mut events) = recorder();
    let config = BufferConfig::new(4 * COUNT as usize);
    let (addr, _stop) = serve!(BackpressureLayer::new(config).observer(observer), log());

    let mut stream = subscribe(addr, COUNT, None).await;
    let (seqs, end) = read_to_end(&mut stream).await;
    end.expect("the call ends with status OK");
    let first = seqs[0];
    assert_eq!(seqs, (first..first + COUNT).collect::<Vec<_>>());
    let mut all = Vec::new();
    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    assert_eq!((closed.stats.sent, closed.stats.dropped), (COUNT, 0));
}

#[tokio::test]
async fn a_stalled_hub_call_that_resumes_gets_whole_increasing_ticks_and_ok() {
    const COUNT: u64 = 20_000;
    let (observer, mut events) = recorder();
    // Ticks joined into DATA frames of up to 16 KiB: a window replays what
    // waits as fast as the client reads, and h2 clients refuse floods of
    // tiny DATA frames (`ENHANCE_YOUR_CALM`), as the example does with --hub.
    let config = BufferConfig::new(16)
        .with_max_bytes(16 * 1024)
        .with_flush(tower_backpressure::Flush::coalesce(256, 16 * 1024));
    let (addr, _stop) = serve!(BackpressureLayer::new(config).observer(observer), log());

    let mut stream = subscribe(addr, COUNT, Some(SMALL_WINDOW)).await;
    // Read nothing until the hub's sweep reports drops for this call.
    let mut all = Vec::new();
    wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Dropped { .. })
    })
    .await;
    let (seqs, end) = read_to_end(&mut stream).await;
    end.expect("the call ends with status OK");
    assert_increasing(&seqs);
    // A window's call delivers `count` ticks, some after a jump.
    assert_eq!(seqs.len() as u64, COUNT);
    assert!(
        seqs.last().unwrap() - seqs.first().unwrap() >= COUNT,
        "a jump"
    );
    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    assert!(closed.stats.dropped > 0);
    assert_eq!(
        closed.stats.sent + closed.stats.dropped + closed.stats.buffered as u64,
        closed.stats.pushed
    );
}

/// The layer's `Shutdown` ends an endless call (per client, and from a hub)
/// with `UNAVAILABLE` after the ticks it had, so that its client retries
/// elsewhere; the example's own shutdown signal is never sent here.
#[tokio::test]
async fn a_shutdown_ends_an_endless_call_with_unavailable() {
    for hub in [None, log()] {
        let shutdown = tower_backpressure::shutdown::Shutdown::new();
        let (observer, mut events) = recorder();
        let layer = BackpressureLayer::new(BufferConfig::new(4096))
            .observer(observer)
            .shutdown(shutdown.clone());
        let (addr, _stop) = serve!(layer, hub.clone());
        let mut stream = subscribe(addr, 0, None).await;
        // A few ticks, then the signal.
        for _ in 0..10 {
            guard("a tick", stream.message()).await.unwrap().unwrap();
        }
        shutdown.trigger();
        let (seqs, end) = read_to_end(&mut stream).await;
        assert_increasing(&seqs);
        let status = end.expect_err("the call ends with a status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "server shutting down");
        let mut all = Vec::new();
        let closed = wait_for(&mut events, &mut all, |s| {
            matches!(s.kind, EventKind::Closed { .. })
        })
        .await;
        assert_eq!(
            closed.kind,
            EventKind::Closed {
                reason: CloseReason::Shutdown
            },
            "hub: {}",
            hub.is_some()
        );
    }
}
