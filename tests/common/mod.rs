//! Shared helpers: a real hyper server on 127.0.0.1:0, a real client, and an
//! observer that records every event.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tower_backpressure::{BackpressureEvent, BufferStats, ClientId, EventKind, PeerAddr};

/// A failure guard only: every wait in these tests ends on a signal; this
/// bounds how long a broken build can hang.
pub const GUARD: Duration = Duration::from_secs(60);

pub async fn guard<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// One observed event, owned.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: ClientId,
    pub peer: Option<SocketAddr>,
    pub path: String,
    pub kind: EventKind,
    pub stats: BufferStats,
}

/// An observer that forwards every event to a channel.
pub fn recorder() -> (
    impl Fn(&BackpressureEvent<'_>) + Send + Sync + 'static,
    mpsc::UnboundedReceiver<Seen>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let observer = move |e: &BackpressureEvent<'_>| {
        let _ = tx.send(Seen {
            id: e.client.id(),
            peer: e.client.peer_addr(),
            path: e.client.path().to_owned(),
            kind: e.kind,
            stats: e.stats,
        });
    };
    (observer, rx)
}

/// Waits for the next event matching `pred`, returning it and every event
/// seen on the way.
pub async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    all: &mut Vec<Seen>,
    pred: impl Fn(&Seen) -> bool,
) -> Seen {
    guard("an observer event", async {
        loop {
            let seen = rx.recv().await.expect("observer channel closed");
            all.push(seen.clone());
            if pred(&seen) {
                return seen;
            }
        }
    })
    .await
}

/// Serves `svc` over HTTP/1.1 on 127.0.0.1:0, one task per connection, with
/// the peer address as a [`PeerAddr`] extension.
pub async fn serve<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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

/// Like [`serve`], with every accepted stream wrapped in
/// [`Closable`](tower_backpressure::conn::Closable) and its `Connection` in
/// the requests, as the `conn` module's docs show. Each connection's end is
/// reported on the returned channel, with the peer's address.
pub async fn serve_closable<S, B>(svc: S) -> (SocketAddr, mpsc::UnboundedReceiver<SocketAddr>)
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, ends) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let stream = tower_backpressure::conn::Closable::new(stream);
            let connection = stream.connection();
            let svc = tower::ServiceBuilder::new()
                .map_request(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    req.extensions_mut().insert(connection.clone());
                    req
                })
                .service(svc.clone());
            let ended = ended.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(svc),
                    )
                    .await;
                let _ = ended.send(peer);
            });
        }
    });
    (addr, ends)
}

/// A real HTTP/1.1 client connection; `recv_buffer` shrinks the socket's
/// receive buffer so that a client that stops reading stalls the server soon.
pub struct Client {
    pub local: SocketAddr,
    pub sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
    pub conn: tokio::task::JoinHandle<()>,
}

pub async fn connect(addr: SocketAddr, recv_buffer: Option<u32>) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    Client {
        local,
        sender,
        conn,
    }
}

pub async fn get(client: &mut Client, path: &str) -> Response<Incoming> {
    let req = Request::get(path)
        .header("host", "localhost")
        .header("te", "trailers")
        .body(http_body_util::Empty::new())
        .unwrap();
    guard("response headers", client.sender.send_request(req))
        .await
        .unwrap()
}

/// Everything a client read: the data, concatenated, and the trailers.
pub struct Read {
    pub data: Vec<u8>,
    pub trailers: Option<http::HeaderMap>,
}

pub async fn read_all(body: Incoming) -> Read {
    let collected = guard("the whole body", body.collect()).await.unwrap();
    let trailers = collected.trailers().cloned();
    Read {
        data: collected.to_bytes().to_vec(),
        trailers,
    }
}

/// An SSE event of exactly `size` bytes carrying `seq` as its id.
pub fn sse_event(seq: u64, size: usize) -> Bytes {
    let head = format!("id: {seq}\ndata: ");
    let pad = size - head.len() - 2;
    let mut s = head;
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\n\n");
    Bytes::from(s)
}

/// The ids of a concatenation of SSE events.
pub fn sse_ids(data: &[u8]) -> Vec<u64> {
    std::str::from_utf8(data)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let line = e.lines().next().unwrap();
            line.strip_prefix("id: ")
                .unwrap_or_else(|| panic!("not an event: {e:?}"))
                .parse()
                .unwrap()
        })
        .collect()
}

/// Sends on drop: tells a test that a body (and so its pump) is gone.
pub struct DropSignal(pub Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

pub type BoxStream =
    futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, std::convert::Infallible>>;

/// A body fed through a channel by the test (the producer), with signals
/// for "the pump took the end" and "the inner body was dropped".
pub struct Producer {
    pub tx: mpsc::Sender<Bytes>,
    pub inner_done: tokio::sync::oneshot::Receiver<()>,
    pub inner_dropped: tokio::sync::oneshot::Receiver<()>,
}

/// `capacity` is the channel's: a producer blocks once it is full.
pub fn channel_body(capacity: usize, trailers: Option<http::HeaderMap>) -> (Producer, BoxStream) {
    use futures::StreamExt;
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let (done_tx, inner_done) = tokio::sync::oneshot::channel();
    let (dropped_tx, inner_dropped) = tokio::sync::oneshot::channel();
    let signal = DropSignal(Some(dropped_tx));
    let mut done_tx = Some(done_tx);
    let data =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok(http_body::Frame::data(b)));
    let end = futures::stream::once(async move {
        let _ = done_tx.take().unwrap().send(());
        trailers.map(|t| Ok(http_body::Frame::trailers(t)))
    })
    .filter_map(futures::future::ready);
    let body = data
        .chain(end)
        .map(move |f| {
            let _keep = &signal;
            f
        })
        .boxed();
    (
        Producer {
            tx,
            inner_done,
            inner_dropped,
        },
        body,
    )
}

pub type StreamResponse = Response<http_body_util::StreamBody<BoxStream>>;

/// A service answering its one request with `body` as `content_type`.
pub fn one_response<ReqBody>(
    body: BoxStream,
    content_type: &'static str,
) -> impl tower::Service<
    Request<ReqBody>,
    Response = StreamResponse,
    Error = Infallible,
    Future = std::future::Ready<Result<StreamResponse, Infallible>>,
> + Clone
+ Send
+ 'static {
    let body = std::sync::Arc::new(std::sync::Mutex::new(Some(body)));
    tower::service_fn(move |_req: Request<ReqBody>| {
        let body = body.lock().unwrap().take().expect("one request only");
        std::future::ready(Ok(Response::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::TRAILER, "x-last-seq")
            .body(http_body_util::StreamBody::new(body))
            .unwrap()))
    })
}

/// Sends `n` SSE events of `size` bytes, ids from 0.
pub async fn produce(tx: mpsc::Sender<Bytes>, n: u64, size: usize) {
    for seq in 0..n {
        if tx.send(sse_event(seq, size)).await.is_err() {
            return;
        }
    }
}

/// One item of a parsed SSE stream: an event id or a `lagged` marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sse {
    Id(u64),
    Lagged(u64),
}

pub fn parse_sse(data: &[u8]) -> Vec<Sse> {
    std::str::from_utf8(data)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            if let Some(rest) = e.strip_prefix("event: lagged\ndata: {\"dropped\":") {
                Sse::Lagged(rest.trim_end_matches('}').parse().unwrap())
            } else {
                let line = e.lines().next().unwrap();
                Sse::Id(line.strip_prefix("id: ").unwrap().parse().unwrap())
            }
        })
        .collect()
}

/// Checks a stream of ids from `0..n` with markers: ids strictly increase,
/// every gap has exactly one marker right before the next id (or the end)
/// with the true count, and no marker stands where nothing was lost.
/// Returns (ids delivered, frames reported lost).
pub fn check_gaps(items: &[Sse], n: u64) -> (u64, u64) {
    let mut next = 0u64; // the id expected if nothing was lost
    let mut announced: Option<u64> = None;
    let (mut delivered, mut lost) = (0, 0);
    for item in items {
        match *item {
            Sse::Lagged(k) => {
                assert!(announced.is_none(), "two markers in a row: {items:?}");
                assert!(k > 0);
                announced = Some(k);
                lost += k;
            }
            Sse::Id(id) => {
                assert!(id >= next, "ids must strictly increase");
                assert_eq!(
                    announced.take().unwrap_or(0),
                    id - next,
                    "the marker before id {id} must count the gap exactly"
                );
                next = id + 1;
                delivered += 1;
            }
        }
    }
    assert_eq!(
        announced.take().unwrap_or(0),
        n - next,
        "a gap at the end is announced before the end"
    );
    (delivered, lost)
}

/// Waits for the `Closed` event.
pub async fn closed(events: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    let mut all = Vec::new();
    wait_for(events, &mut all, |s| {
        matches!(s.kind, tower_backpressure::EventKind::Closed { .. })
    })
    .await
}

/// Waits for the `Closed` event and checks its reason.
pub async fn closed_as(
    events: &mut mpsc::UnboundedReceiver<Seen>,
    reason: tower_backpressure::CloseReason,
) -> Seen {
    let seen = closed(events).await;
    assert_eq!(seen.kind, tower_backpressure::EventKind::Closed { reason });
    seen
}

/// Sends a GET over a raw socket with a tiny receive window and never reads:
/// its TCP window goes to zero, so hyper stops polling the body.
pub async fn stalled_get(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    stream
}
