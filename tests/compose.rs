//! The layer composes with axum (served for real, with `ConnectInfo`) and
//! with tonic's `Server::builder().layer(..)`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::response::sse::{Event, Sse};
use axum::routing;
use common::*;
use futures::StreamExt;
use http::header;
use http_body_util::BodyExt;
use tower_backpressure::{BackpressureLayer, BufferConfig, EventKind};

#[tokio::test]
async fn axum_router_layer_wraps_sse_and_knows_the_peer() {
    let (observer, mut events) = recorder();
    let app = Router::new()
        .route(
            "/events",
            routing::get(|| async {
                let s = futures::stream::iter(0..3u64)
                    .map(|i| Ok::<_, Infallible>(Event::default().id(i.to_string()).data("tick")))
                    .chain(futures::stream::pending());
                Sse::new(s)
            }),
        )
        .route("/plain", routing::get(|| async { "hello" }))
        .layer(BackpressureLayer::new(BufferConfig::default()).observer(observer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });

    let mut client = connect(addr, None).await;
    let plain = common::get(&mut client, "/plain").await;
    let plain = read_all(plain.into_body()).await;
    assert_eq!(plain.data, b"hello");

    let res = common::get(&mut client, "/events").await;
    assert_eq!(
        res.headers().get(header::CONTENT_TYPE).unwrap(),
        "text/event-stream"
    );
    assert!(res.headers().get(header::CONTENT_LENGTH).is_none());
    let mut body = res.into_body();
    let mut text = Vec::new();
    while sse_ids(&text).len() < 3 || !text.ends_with(b"\n\n") {
        let frame = guard("an SSE event", body.frame()).await.unwrap().unwrap();
        text.extend_from_slice(&frame.into_data().unwrap());
    }
    assert_eq!(sse_ids(&text), vec![0, 1, 2]);

    let mut all = Vec::new();
    let opened = wait_for(&mut events, &mut all, |s| s.kind == EventKind::Opened).await;
    assert_eq!(opened.path, "/events", "only the SSE route is wrapped");
    // The `axum` feature reads `ConnectInfo`; without it the peer is unknown.
    if cfg!(feature = "axum") {
        assert_eq!(opened.peer, Some(client.local));
    }
    drop(body);
    let closed = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(closed.id, opened.id);
}

/// A hand-written tonic service (no protoc): enough to show the layer fits
/// `Server::builder().layer(..)`.
#[derive(Clone)]
struct Svc;

impl tonic::server::NamedService for Svc {
    const NAME: &'static str = "tower_backpressure.test.Svc";
}

impl tower::Service<http::Request<tonic::body::Body>> for Svc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unimplemented("test").into_http()))
    }
}

#[tokio::test]
async fn tonic_server_builder_accepts_the_layer() {
    let router = tonic::transport::Server::builder()
        .layer(BackpressureLayer::new(BufferConfig::default()))
        .add_service(Svc);
    // Serve on loopback and stop at once: building and starting is the point.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = router.serve_with_incoming_shutdown(incoming, async {});
    guard("the tonic server to stop", server).await.unwrap();
}
