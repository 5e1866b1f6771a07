//! The tower middleware: [`BackpressureLayer`], [`Backpressure`],
//! [`ResponseFuture`] and [`BackpressureBody`].
//!
//! # How it works
//!
//! hyper polls a response body only as fast as the client reads it, so a
//! wrapper that acts inside `poll_frame` alone never sees the overflow. For
//! every response its [`Predicate`](crate::Predicate) selects, the layer
//! therefore spawns a *pump*: a tokio task that drains the inner body as fast
//! as it yields frames into a [`ClientBuffer`](crate::ClientBuffer). The body
//! hyper polls takes frames from the front of that buffer. The producer never
//! waits for the client, and the buffer's limits bound the memory.
//!
//! - Data frames are dropped oldest-first when the buffer is full.
//! - Trailers, an inner error and the end of the stream are never dropped:
//!   they come after every data frame kept before them.
//! - `Content-Length` is removed and the size hint is never exact.
//! - Dropping the body (client gone) stops the pump within one wake-up, even
//!   if the inner body is pending forever.
//! - A `text/event-stream` response gets `X-Accel-Buffering: no` unless it
//!   has that header, and, when buffered, a comment line after a quiet
//!   interval ([`KeepAlive`](crate::KeepAlive)), so that proxies stream it
//!   and keep it open.
//! - A hub's response ([`Hub::response`](crate::Hub::response)) is served
//!   from a window over the hub's log, with no pump, while its body is
//!   still the hub's own; a body the application changed is served as it
//!   was made.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, header};
//! use http_body_util::{BodyExt, StreamBody};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_backpressure::{BackpressureLayer, BufferConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(BackpressureLayer::new(BufferConfig::new(100)))
//!     .service(service_fn(|_req: Request<()>| async {
//!         let events = futures::stream::iter(
//!             (0..3).map(|i| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(format!("id: {i}\ndata: tick\n\n"))))),
//!         );
//!         Ok::<_, Infallible>(
//!             Response::builder()
//!                 .header(header::CONTENT_TYPE, "text/event-stream")
//!                 .body(StreamBody::new(events))
//!                 .unwrap(),
//!         )
//!     }));
//!
//! let response = svc.oneshot(Request::new(())).await.unwrap();
//! assert!(response.body().is_buffered());
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "id: 0\ndata: tick\n\nid: 1\ndata: tick\n\nid: 2\ndata: tick\n\n");
//! # }
//! ```

mod body;
mod future;
mod layer;
mod pump;
mod service;

pub use self::body::BackpressureBody;
pub use self::future::ResponseFuture;
pub use self::layer::BackpressureLayer;
pub use self::service::Backpressure;
