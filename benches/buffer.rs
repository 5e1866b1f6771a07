//! `ClientBuffer` push + pop against the queues a user would pick instead.
//!
//! Every benchmark moves one 256-byte `Bytes` frame in and one out per
//! iteration, so the reported time is nanoseconds per frame:
//!
//! - `not_full`: the queue is empty before each iteration: push one frame,
//!   pop it.
//! - `full`: the queue is at its limit (1024 frames) before each iteration:
//!   push one frame, and the oldest one comes out. For `ClientBuffer` that is
//!   its drop-oldest eviction; for `VecDeque` a `pop_front` before the
//!   `push_back`; for `broadcast` a `send` that overwrites the oldest slot
//!   (the receiver lags); for `mpsc` a `try_recv` before the `try_send`
//!   (an mpsc has no drop-oldest of its own).
//!
//! Frames are moved, not cloned, wherever the queue allows it, so no
//! reference counts change: the numbers are the queues' own cost.
//! `broadcast` is the exception: `recv` clones the value out of the shared
//! slot by design, and a new frame must be cloned for each `send`.
//!
//! `dropped_within` measures something else: the cost of the
//! `Eviction::after_dropped_within` rule on a stalled `BufferedSink` (see
//! its function).
//!
//! ```text
//! cargo bench --bench buffer
//! cargo bench --bench buffer -- dropped_within
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures::{Sink, SinkExt};
use tokio::sync::{broadcast, mpsc};
use tower_backpressure::{BufferConfig, BufferedSink, ClientBuffer, Eviction, FrameClass};

const CAPACITY: usize = 1024;
const FRAME: usize = 256;

fn frame() -> Bytes {
    Bytes::from(vec![b'x'; FRAME])
}

fn not_full(c: &mut Criterion) {
    let mut group = c.benchmark_group("push_pop/not_full");
    group.throughput(Throughput::Elements(1));

    group.bench_function("ClientBuffer", |b| {
        let mut ring = ClientBuffer::new(BufferConfig::new(CAPACITY));
        let mut f = Some(frame());
        b.iter(|| {
            ring.push(f.take().unwrap());
            f = black_box(ring.pop());
        });
        assert_eq!(ring.stats().dropped, 0);
    });

    group.bench_function("ClientBuffer+max_bytes", |b| {
        let mut ring = ClientBuffer::new(BufferConfig::new(CAPACITY).with_max_bytes(128 * 1024));
        let mut f = Some(frame());
        b.iter(|| {
            ring.push(f.take().unwrap());
            f = black_box(ring.pop());
        });
        assert_eq!(ring.stats().dropped, 0);
    });

    group.bench_function("VecDeque", |b| {
        let mut ring = VecDeque::with_capacity(CAPACITY);
        let mut f = Some(frame());
        b.iter(|| {
            ring.push_back(f.take().unwrap());
            f = black_box(ring.pop_front());
        });
    });

    group.bench_function("tokio_broadcast", |b| {
        let (tx, mut rx) = broadcast::channel(CAPACITY);
        let f = frame();
        b.iter(|| {
            tx.send(f.clone()).unwrap();
            black_box(rx.try_recv().unwrap());
        });
    });

    group.bench_function("tokio_mpsc", |b| {
        let (tx, mut rx) = mpsc::channel(CAPACITY);
        let mut f = Some(frame());
        b.iter(|| {
            tx.try_send(f.take().unwrap()).unwrap();
            f = black_box(rx.try_recv().ok());
        });
    });
    group.finish();
}

fn full(c: &mut Criterion) {
    let mut group = c.benchmark_group("push_pop/full");
    group.throughput(Throughput::Elements(1));

    group.bench_function("ClientBuffer", |b| {
        let mut ring = ClientBuffer::new(BufferConfig::new(CAPACITY));
        for _ in 0..CAPACITY {
            ring.push(frame());
        }
        let mut f = Some(frame());
        b.iter(|| {
            // The evicted (oldest) frame comes back out through `on_drop`.
            ring.push_with(f.take().unwrap(), FrameClass::Droppable, |old| {
                f = Some(old)
            });
            black_box(&f);
        });
        assert_eq!(ring.len(), CAPACITY);
    });

    group.bench_function("ClientBuffer+max_bytes", |b| {
        // The byte limit (512 frames of 256 bytes) is reached first.
        let mut ring = ClientBuffer::new(BufferConfig::new(CAPACITY).with_max_bytes(128 * 1024));
        for _ in 0..CAPACITY {
            ring.push(frame());
        }
        let mut f = Some(frame());
        b.iter(|| {
            ring.push_with(f.take().unwrap(), FrameClass::Droppable, |old| {
                f = Some(old)
            });
            black_box(&f);
        });
        assert_eq!(ring.len(), 512);
    });

    group.bench_function("VecDeque", |b| {
        let mut ring: VecDeque<Bytes> = (0..CAPACITY).map(|_| frame()).collect();
        let mut f = Some(frame());
        b.iter(|| {
            let old = ring.pop_front();
            ring.push_back(f.take().unwrap());
            f = black_box(old);
        });
    });

    group.bench_function("tokio_broadcast", |b| {
        let (tx, _rx) = broadcast::channel(CAPACITY);
        let f = frame();
        for _ in 0..CAPACITY {
            tx.send(f.clone()).unwrap();
        }
        b.iter(|| {
            // Overwrites (drops) the oldest slot.
            tx.send(f.clone()).unwrap();
        });
    });

    group.bench_function("tokio_mpsc", |b| {
        let (tx, mut rx) = mpsc::channel(CAPACITY);
        for _ in 0..CAPACITY {
            tx.try_send(frame()).unwrap();
        }
        let mut f = Some(frame());
        b.iter(|| {
            let old = rx.try_recv().ok();
            tx.try_send(f.take().unwrap()).unwrap();
            f = black_box(old);
        });
    });
    group.finish();
}

/// A real sink whose client never takes anything: the drain task never takes
/// a message out of the buffer.
struct Stalled;

impl<T> Sink<T> for Stalled {
    type Error = Infallible;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Pending
    }

    fn start_send(self: Pin<&mut Self>, _: T) -> Result<(), Infallible> {
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
}

/// `Eviction::after_dropped_within` at scale: a `BufferedSink` of capacity 1
/// in front of a client that takes nothing, so every push after the first
/// drops one frame, each at its own instant (real time). `on`: the rule with
/// an hour's window and a count never reached, so every drop stays in the
/// window; `off`: no rule. Each iteration is `n` pushes on a fresh sink;
/// `time / n` is the cost per push, which should not grow with `n`.
fn dropped_within(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("dropped_within");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    for n in [10_000u64, 40_000] {
        group.throughput(Throughput::Elements(n));
        let rules = [
            ("off", Eviction::none()),
            (
                "on",
                Eviction::none().after_dropped_within(u64::MAX, Duration::from_secs(3600)),
            ),
        ];
        for (name, eviction) in rules {
            group.bench_function(format!("{name}/{n}"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut sink =
                            BufferedSink::builder(BufferConfig::new(1).with_eviction(eviction))
                                .weigh(|_: &u64| 8)
                                .spawn(Stalled);
                        for i in 0..n {
                            sink.send(black_box(i)).await.unwrap();
                        }
                        assert_eq!(sink.stats().dropped, n - 1);
                        sink.abandon().await;
                    })
                });
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = not_full, full, dropped_within
}
criterion_main!(benches);
