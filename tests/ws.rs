//! The `ws_server` example's router served on 127.0.0.1:0 and driven by
//! tokio-tungstenite clients: a client that stalls and resumes gets
//! increasing ticks with every gap announced; one that disconnects abruptly
//! is closed and leaves no task behind; the health endpoint lists WebSocket
//! clients.

mod common;
#[path = "../examples/ws_server.rs"]
#[allow(dead_code, unreachable_pub)]
mod ws_server;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use futures::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::task::TaskTracker;
use tower_backpressure::{
    BackpressureObserver, BufferConfig, ClientRegistry, CloseReason, EventKind,
};
use ws_server::{Hub, Producer, TickHub, router, tick_hub};

struct Server {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Seen>,
    registry: ClientRegistry,
    producer: Producer,
    clients: TaskTracker,
    /// `true` closes every client, as SIGINT does in `main`.
    stop: watch::Sender<bool>,
}

/// Serves the example's router on 127.0.0.1:0 with `config`, `rate`
/// messages per second of `size`-byte payloads.
async fn start(config: BufferConfig, rate: u64, size: usize) -> Server {
    start_with(config, rate, size, None).await
}

/// As `start`, with `--hub`: every client reads one shared log.
async fn start_hub(config: BufferConfig, rate: u64, size: usize) -> Server {
    let log = tick_hub(10_000);
    start_with(config, rate, size, Some(log)).await
}

async fn start_with(config: BufferConfig, rate: u64, size: usize, log: Option<TickHub>) -> Server {
    let registry = ClientRegistry::new();
    let (recorder, events) = recorder();
    let observer: Arc<dyn BackpressureObserver> = Arc::new((registry.clone(), recorder));
    let (stop, shutdown) = watch::channel(false);
    let producer = Producer::spawn(rate, size, log);
    let hub = Hub::new(config, observer, &producer, shutdown).unwrap();
    let clients = hub.clients().clone();
    let app = router(hub, &registry);
    // A small send buffer on the listening socket (accepted sockets inherit
    // it), so that a client that stops reading stalls the server's writes
    // after kilobytes rather than after megabytes of kernel autotuning.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(16 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .into_future(),
    );
    Server {
        addr,
        events,
        registry,
        producer,
        clients,
        stop,
    }
}

/// A tokio-tungstenite client of `/ws`, with a small receive buffer.
async fn connect(addr: SocketAddr) -> (WebSocketStream<TcpStream>, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let (ws, response) = guard(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    (ws, local)
}

/// One message from the server, as JSON.
async fn next_json(ws: &mut WebSocketStream<TcpStream>) -> serde_json::Value {
    let message = guard("a message", ws.next())
        .await
        .expect("the server keeps the socket open")
        .unwrap();
    let Message::Text(text) = message else {
        panic!("a text message, got {message:?}");
    };
    serde_json::from_str(text.as_str()).unwrap()
}

/// What a client read: the ticks' seqs, and for each tick the frames the
/// `lagged` messages right before it announced.
#[derive(Default)]
struct Read {
    seqs: Vec<u64>,
    announced: Vec<u64>,
}

impl Read {
    fn take(&mut self, json: &serde_json::Value, pending: &mut u64) {
        if json["type"] == "lagged" {
            *pending += json["dropped"].as_u64().unwrap();
            return;
        }
        assert_eq!(json["payload"].as_str().unwrap().len(), 64);
        self.seqs.push(json["seq"].as_u64().unwrap());
        self.announced.push(std::mem::take(pending));
    }
}

#[tokio::test]
async fn a_client_that_stalls_gets_increasing_ticks_with_every_gap_announced() {
    stalls_and_resumes(start(BufferConfig::new(64), 20_000, 64).await).await;
}

#[tokio::test]
async fn a_hub_client_that_stalls_gets_increasing_ticks_with_every_gap_announced() {
    // `--hub`: the same promises from a window over one shared log.
    stalls_and_resumes(start_hub(BufferConfig::new(64), 20_000, 64).await).await;
}

async fn stalls_and_resumes(mut server: Server) {
    let (mut ws, local) = connect(server.addr).await;
    let mut read = Read::default();
    let mut pending = 0;
    let first = next_json(&mut ws).await;
    read.take(&first, &mut pending);

    // Read nothing until the server had to drop messages for this client.
    let mut all = Vec::new();
    let dropped = wait_for(&mut server.events, &mut all, |s| {
        matches!(s.kind, EventKind::Dropped { .. })
    })
    .await;
    assert_eq!((dropped.path.as_str(), dropped.peer), ("/ws", Some(local)));

    // Resume: read until a gap was announced and 200 ticks came after it.
    let mut after_gap = 0;
    while after_gap < 200 {
        let json = next_json(&mut ws).await;
        read.take(&json, &mut pending);
        if read.announced.iter().any(|n| *n > 0) && json["type"] != "lagged" {
            after_gap += 1;
        }
    }
    for (i, pair) in read.seqs.windows(2).enumerate() {
        assert!(pair[0] < pair[1], "seq must be strictly increasing");
        assert_eq!(
            pair[1] - pair[0] - 1,
            read.announced[i + 1],
            "the lagged messages before seq {} announce exactly the gap",
            pair[1]
        );
    }
    let lost: u64 = read.announced.iter().sum();
    assert!(lost > 0);

    // A polite goodbye: the server drops what it still buffers for us.
    ws.close(None).await.unwrap();
    let closed = wait_for(&mut server.events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::ClientGone
        }
    );
    let s = closed.stats;
    assert!(s.dropped >= lost, "{} dropped, {lost} announced", s.dropped);
    assert!(s.high_water <= 64, "{} messages at once", s.high_water);
    no_task_left(&server).await;
}

#[tokio::test]
async fn a_client_that_disconnects_abruptly_leaves_no_task_behind() {
    let mut server = start(BufferConfig::new(64), 5_000, 64).await;
    let (mut ws, local) = connect(server.addr).await;
    next_json(&mut ws).await;
    assert_eq!(server.registry.len(), 1);
    // Gone without a Close frame.
    drop(ws);

    let mut all = Vec::new();
    let closed = wait_for(&mut server.events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::ClientGone
        }
    );
    assert_eq!(closed.peer, Some(local));
    assert_eq!(all[0].kind, EventKind::Opened);
    no_task_left(&server).await;
    assert!(server.events.try_recv().is_err(), "nothing after Closed");
}

#[tokio::test]
async fn a_client_that_keeps_up_gets_every_tick_in_order() {
    // At 2000 messages per second a buffer of 100 000 cannot overflow in
    // the test's time: nothing may be lost.
    let server = start(BufferConfig::new(100_000), 2_000, 64).await;
    let (mut ws, _) = connect(server.addr).await;
    let mut read = Read::default();
    let mut pending = 0;
    while read.seqs.len() < 500 {
        let json = next_json(&mut ws).await;
        read.take(&json, &mut pending);
    }
    let first = read.seqs[0];
    assert_eq!(read.seqs, (first..first + 500).collect::<Vec<_>>());
    assert!(read.announced.iter().all(|n| *n == 0));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn the_health_endpoint_lists_websocket_clients() {
    let server = start(BufferConfig::new(64), 1_000, 64).await;
    let (mut ws, local) = connect(server.addr).await;
    next_json(&mut ws).await;

    let mut http = common::connect(server.addr, None).await;
    let response = common::get(&mut http, "/health/clients").await;
    assert_eq!(response.status(), 200);
    let body = read_all(response.into_body()).await;
    let json: serde_json::Value = serde_json::from_slice(&body.data).unwrap();
    let clients = json["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 1, "{json}");
    assert_eq!(clients[0]["path"], "/ws");
    assert_eq!(clients[0]["route"], "/ws");
    assert_eq!(clients[0]["peer"], local.to_string());
    assert_eq!(clients[0]["capacity"], 64);
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn shutdown_delivers_what_is_buffered_then_says_going_away() {
    let mut server = start(BufferConfig::new(64), 5_000, 64).await;
    let (mut ws, _) = connect(server.addr).await;
    let mut read = Read::default();
    let mut pending = 0;
    read.take(&next_json(&mut ws).await, &mut pending);

    server.stop.send_replace(true);
    let frame = loop {
        let message = guard("a message", ws.next()).await.unwrap().unwrap();
        match message {
            Message::Text(text) => {
                read.take(&serde_json::from_str(text.as_str()).unwrap(), &mut pending)
            }
            Message::Close(frame) => break frame.expect("a close code"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason.as_str(), "server shutting down");
    assert!(read.seqs.windows(2).all(|w| w[0] < w[1]));

    let mut all = Vec::new();
    let closed = wait_for(&mut server.events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Completed
        }
    );
    assert_eq!(
        closed.stats.sent,
        read.seqs.len() as u64 + 1,
        "every tick kept, and the Close frame"
    );
    no_task_left(&server).await;
}

/// Every client's task (and so its buffer's drain task, which it awaits)
/// has ended, nothing is registered, and nobody listens to the producer.
async fn no_task_left(server: &Server) {
    server.clients.close();
    guard("the clients' tasks to end", server.clients.wait()).await;
    assert!(server.registry.is_empty());
    assert_eq!(server.producer.subscribers(), 0);
}
