//! What `BackpressureBody` adds per frame: a 1,000,000-frame stream of
//! 256-byte `Bytes` frames drained in-process, unwrapped and through the
//! layer.
//!
//! - `unwrapped`: the `StreamBody` itself, polled with `BodyExt::frame`.
//! - `passthrough`: the same response through `Backpressure`, not selected
//!   (`text/plain`): the body is only forwarded.
//! - `buffered`: the same response as `text/event-stream`, so a pump task
//!   drains the stream into the client's ring buffer and the body polled here
//!   takes frames from it (default `BufferConfig`: 1000 frames, immediate
//!   flush).
//!
//! Everything runs on a current-thread tokio runtime, with the body drained
//! by a spawned task as hyper's connection task would, so pump and consumer
//! take turns on one core: the pump hands over up to 128 frames per turn, no
//! frame is dropped (checked), and the difference to `unwrapped` is the
//! hand-off itself, per frame, without cross-core cache traffic. Each iteration drains all frames; the reported throughput
//! is frames per second and `time / 1e6` is nanoseconds per frame.
//!
//! ```text
//! cargo bench --bench body
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::stream::{self, StreamExt as _};
use http::{Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower::{ServiceExt, service_fn};
use tower_backpressure::{Backpressure, BufferConfig};

const FRAMES: u64 = 1_000_000;
const FRAME: usize = 256;

fn events() -> impl http_body::Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static {
    let frame = Bytes::from(vec![b'x'; FRAME]);
    StreamBody::new(
        stream::repeat(frame)
            .take(FRAMES as usize)
            .map(|data| Ok(Frame::data(data))),
    )
}

fn response(
    content_type: &'static str,
) -> Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static> {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(events())
        .unwrap()
}

async fn drain<B: http_body::Body + Unpin>(mut body: B) -> u64
where
    B::Error: std::fmt::Debug,
{
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        if frame.unwrap().is_data() {
            frames += 1;
        }
    }
    frames
}

/// Runs `drain` as a task of its own: the body's consumer is then scheduled
/// like hyper's connection task, in turn with the pump.
async fn spawned(drain: impl Future<Output = u64> + Send + 'static) -> u64 {
    tokio::spawn(drain).await.unwrap()
}

async fn through_layer(content_type: &'static str, buffered: bool) -> u64 {
    let svc = Backpressure::new(
        service_fn(
            move |_req: Request<()>| async move { Ok::<_, Infallible>(response(content_type)) },
        ),
        BufferConfig::default(),
    );
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    assert_eq!(body.is_buffered(), buffered);
    spawned(drain(body)).await
}

fn body(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("body_drain_1M");
    group.throughput(Throughput::Elements(FRAMES));
    group.sample_size(10);

    group.bench_function("unwrapped", |b| {
        b.iter(|| assert_eq!(rt.block_on(spawned(drain(events()))), FRAMES));
    });
    group.bench_function("passthrough", |b| {
        b.iter(|| assert_eq!(rt.block_on(through_layer("text/plain", false)), FRAMES));
    });
    group.bench_function("buffered", |b| {
        b.iter(|| {
            assert_eq!(
                rt.block_on(through_layer("text/event-stream", true)),
                FRAMES
            )
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = body
}
criterion_main!(benches);
