//! Tower middleware that makes slow clients harmless to streaming servers.
//!
//! A streaming response (Server-Sent Events, NDJSON, gRPC server streaming,
//! over HTTP/1.1 or HTTP/2) is fed by a producer that must not wait for its slowest client.
//! [`BackpressureLayer`] puts each selected response through a per-client
//! [`ClientBuffer`]: a ring that drops the oldest frames when the client
//! cannot keep up, so memory stays bounded and the producer never blocks.
//! Backpressure is reported through a pluggable [`BackpressureObserver`].
//!
//! # Example: axum
//!
//! ```no_run
//! use std::{convert::Infallible, time::Duration};
//!
//! use axum::{Router, response::sse::{Event, Sse}, routing::get};
//! use futures::stream::{self, Stream};
//! use tower_backpressure::{BackpressureLayer, BufferConfig, TracingObserver};
//!
//! async fn events() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
//!     let ticks = stream::unfold(0u64, |n| async move {
//!         tokio::time::sleep(Duration::from_millis(1)).await;
//!         Some((Ok(Event::default().id(n.to_string()).data("tick")), n + 1))
//!     });
//!     Sse::new(ticks)
//! }
//!
//! # #[tokio::main]
//! # async fn main() {
//! let app = Router::new().route("/events", get(events)).layer(
//!     BackpressureLayer::new(BufferConfig::default().with_max_bytes(1 << 20))
//!         .observer(TracingObserver::new()),
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```
//!
//! # Fan-out: one stream to many clients
//!
//! When every client gets the same stream, publish into a [`Hub`] and answer
//! each client with [`Hub::response`](hub::Hub::response): one log of
//! frames shared by every client, each client a cursor into it. The layer
//! serves each client from a window over the log, bounded by its config,
//! with the same events, gap markers, rules and handles, but no pump task and
//! no copy per client: a stalled client costs nothing per event. See the
//! [`hub`] module.
//!
//! # WebSocket and other sinks
//!
//! A WebSocket is not a response body. [`BufferedSink`] puts the same buffer,
//! policies and observer in front of any `futures::Sink` (axum's
//! `WebSocket`, tokio-tungstenite's `WebSocketStream`): sending never waits
//! for the client, and a drain task feeds the socket at the client's pace.
//! See the [`sink`] module.
//!
//! # What is and is not dropped
//!
//! Only data frames of selected responses (by default `text/event-stream`,
//! `application/x-ndjson`, `application/jsonl`, `application/grpc*`, never one
//! with `Content-Encoding` or an exact size) can be dropped, oldest first.
//! Trailers, errors and the end of the stream always arrive, after the data
//! kept before them. Put the layer *inside* any compression layer.
//!
//! # Features
//!
//! - `tracing` (default): [`TracingObserver`].
//! - `axum`: read the peer address from axum's `ConnectInfo<SocketAddr>` and
//!   the route from `MatchedPath`.
//! - `metrics`: `MetricsObserver`, through the `metrics` facade.
//! - `serde`: `Serialize` for stats and registry snapshots.
//! - `nats`: [`bus::nats`](crate::bus), feeding a [`Hub`] from a NATS subject
//!   or a JetStream stream with `async-nats`.
//! - `redis`: [`bus::redis`](crate::bus), feeding a [`Hub`] from a Redis
//!   stream with the `redis` crate.
//!
//! # Scale out
//!
//! Several servers, one stream: each feeds its own [`Hub`] from a bus with
//! [`bus::feed`], under the publisher's ids, so a client resumes with its
//! `Last-Event-ID` on any of them. See the [`bus`] module.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod budget;
mod buffer;
pub mod bus;
pub(crate) mod client;
mod config;
pub mod conn;
mod error;
mod handle;
pub mod hub;
mod info;
mod keep_alive;
#[cfg(feature = "metrics")]
mod metrics;
pub mod middleware;
pub mod observer;
pub mod policy;
pub mod predicate;
pub mod registry;
pub mod shutdown;
pub mod sink;
mod sync;
#[cfg(all(test, feature = "tracing"))]
mod test_logs;

pub use crate::budget::{BudgetStats, MemoryBudget};
pub use crate::buffer::{BufferStats, ByWeigh, ClientBuffer, Dropped, Weigh, Weigher};
pub use crate::config::{BufferConfig, ConfigError, Eviction, Flush, Overflow};
pub use crate::error::{Evicted, PumpStopped};
pub use crate::handle::{ClientHandle, Health};
pub use crate::hub::{Hub, HubConfig};
pub use crate::info::{ClientId, ClientInfo, PeerAddr};
pub use crate::keep_alive::KeepAlive;
#[cfg(feature = "metrics")]
pub use crate::metrics::MetricsObserver;
pub use crate::middleware::{Backpressure, BackpressureBody, BackpressureLayer, ResponseFuture};
#[cfg(feature = "tracing")]
pub use crate::observer::TracingObserver;
pub use crate::observer::{
    BackpressureEvent, BackpressureObserver, CloseReason, EventKind, EvictReason,
};
pub use crate::policy::{
    Classify, FrameClass, Gap, GapAction, GapMarker, GrpcDataLoss, NdjsonGapMarker, SseGapMarker,
};
pub use crate::predicate::{DefaultPredicate, Predicate};
pub use crate::registry::{ClientRegistry, HealthService};
pub use crate::sink::{BufferedSink, HubSink, SinkClosed};

/// The error type of a buffered body: the inner body's error, boxed, or
/// [`PumpStopped`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The README's snippets, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The guides in `docs/`: their Rust blocks compiled and run as doctests
/// (`cargo test --all-features --doc`), as the README's are.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/choosing-a-path.md")]
    struct ChoosingAPath;

    #[doc = include_str!("../docs/integrations.md")]
    struct Integrations;

    #[doc = include_str!("../docs/production.md")]
    struct Production;

    #[doc = include_str!("../docs/guarantees.md")]
    struct Guarantees;

    #[doc = include_str!("../docs/configuration.md")]
    struct Configuration;

    #[doc = include_str!("../docs/architecture.md")]
    struct Architecture;

    #[doc = include_str!("../docs/examples.md")]
    struct Examples;

    #[doc = include_str!("../docs/scale-out.md")]
    struct ScaleOut;
}
