//! Serves an axum `Router` on HTTP/1.1 and HTTP/2 on the same port.
//!
//! hyper-util's `auto::Builder` reads the first bytes of each connection:
//! the HTTP/2 connection preface means HTTP/2 with prior knowledge (`h2c`,
//! `curl --http2-prior-knowledge`), anything else HTTP/1.1 (with upgrades,
//! for WebSocket). Each request carries the peer address as axum's
//! `ConnectInfo<SocketAddr>`.

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

/// Accepts connections until `signal` resolves, then stops accepting and
/// waits for the open connections to end (HTTP/2 ones get a `GOAWAY`;
/// streaming responses must end by themselves).
pub async fn serve_http1_and_http2(
    listener: TcpListener,
    app: Router,
    signal: impl Future<Output = ()>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let svc = tower::ServiceBuilder::new()
            .map_request(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
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
