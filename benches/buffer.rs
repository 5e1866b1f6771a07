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
//! ```text
//! cargo bench --bench buffer
//! ```

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::sync::{broadcast, mpsc};
use tower_backpressure::{BufferConfig, ClientBuffer, FrameClass};

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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = not_full, full
}
criterion_main!(benches);
