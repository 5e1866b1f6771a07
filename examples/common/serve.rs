//! Serves an axum `Router` on HTTP/1.1 and HTTP/2 on the same port.
//!
//! hyper-util's `auto::Builder` reads the first bytes of each connection:
//! the HTTP/2 connection preface means HTTP/2 with prior knowledge (`h2c`,
//! `curl --http2-prior-knowledge`), anything else HTTP/1.1 (with upgrades,
//! for WebSocket). Each request carries the peer address as axum's
//! `ConnectInfo<SocketAddr>`, and the [`Connection`] that closes its
//! connection: each accepted stream is wrapped in [`Closable`], so that the
//! layer (or a `BufferedSink` given the connection) can close the connection
//! of an evicted HTTP/1 client that never reads again.
//!
//! What hyper holds for a client that stops reading, before the layer's
//! buffer, is bounded here (see the README, "What is and is not dropped"
//! and "What hyper holds over HTTP/2"): [`HTTP1_MAX_BUF_SIZE`] per HTTP/1
//! connection; [`HTTP2_MAX_SEND_BUF_SIZE`] per HTTP/2 stream, times at most
//! [`HTTP2_MAX_CONCURRENT_STREAMS`] streams per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_backpressure::conn::{Closable, Connection};

/// hyper's HTTP/1 read and write buffer limit per connection (its default is
/// about 400 KiB: `8192 + 4096 * 100`). A client that stops reading holds up
/// to this much in hyper before its response's backlog reaches the layer;
/// 64 KiB still takes several SSE events per write.
pub const HTTP1_MAX_BUF_SIZE: usize = 64 * 1024;

/// What hyper's HTTP/2 stream may queue in h2 for a client that does not
/// read (hyper's default: 400 KiB per stream). hyper keeps polling a
/// stream's body while its send buffer has room and the client's
/// flow-control window allows, so with a client that grants a large window
/// and then stops reading, this is what every stream holds outside the
/// layer. 64 KiB is a full default window (65,535 bytes) for a client that
/// reads.
pub const HTTP2_MAX_SEND_BUF_SIZE: usize = 64 * 1024;

/// Streams one HTTP/2 connection may have open at once (hyper's default:
/// 200). Each holds up to [`HTTP2_MAX_SEND_BUF_SIZE`] in h2 and, behind the
/// layer, its own buffer; 100 is the minimum RFC 9113 recommends and what
/// browsers assume.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Accepts connections until `signal` resolves, then stops accepting and
/// waits for the open connections to end (HTTP/2 ones get a `GOAWAY`;
/// streaming responses must end by themselves).
pub async fn serve_http1_and_http2(
    listener: TcpListener,
    app: Router,
    signal: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(HTTP1_MAX_BUF_SIZE);
    builder
        .http2()
        .max_send_buf_size(HTTP2_MAX_SEND_BUF_SIZE)
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS);
    let graceful = GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // A connection that failed before it was accepted is no
                    // reason to stop; running out of file descriptors is worth
                    // a pause (as `axum::serve` does).
                    if !is_connection_error(&e) {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
            () = &mut signal => break,
        };
        // Closing `connection` fails every read and write of the stream, so
        // hyper drops it at once, however full its buffers are.
        let stream = Closable::new(stream);
        let connection: Connection = stream.connection();
        let svc = tower::ServiceBuilder::new()
            .map_request(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req.extensions_mut().insert(connection.clone());
                req
            })
            .service(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended with an error: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
