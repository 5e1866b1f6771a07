//! What `Hub::publish` costs with subscribers that do not read.
//!
//! Every benchmark publishes one 256-byte `Bytes` frame (a reference count,
//! the hub's default retention of 10,000 frames full, so each publish also
//! lets the oldest frame go), so the reported time is per publish:
//!
//! - `no_subscribers`: nobody subscribed.
//! - `10000_stalled`: 10,000 subscriptions that never poll (a stalled client
//!   before or after it read something: the hub cannot tell them apart, and
//!   never touches either).
//! - `10000_parked_once`: 10,000 subscriptions that polled once, found
//!   nothing and left a waker, then stalled: the first publish wakes each
//!   of them once (not measured apart), every later one costs as with
//!   nobody.
//! - `10000_parked_each_time`: the 10,000 subscriptions read everything and
//!   park again before every publish (not measured), so every publish wakes
//!   10,000 wakers (each an `Arc` whose wake is an atomic add): the cost of
//!   waking, which only subscribers that keep up pay for.
//!
//! The target: `10000_stalled` within 1.1× of `no_subscribers`.
//!
//! ```text
//! cargo bench --bench hub
//! ```

use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures::Stream;
use tower_backpressure::Hub;
use tower_backpressure::hub::Subscription;

const SUBSCRIBERS: usize = 10_000;
const FRAME: usize = 256;

struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn frame() -> Bytes {
    Bytes::from(vec![b'x'; FRAME])
}

/// A hub whose retention is full.
fn full_hub() -> Hub {
    let hub: Hub = Hub::default();
    let f = frame();
    for _ in 0..hub.config().retain_frames() {
        hub.publish(f.clone());
    }
    hub
}

/// Reads everything `sub` can read, until it parks.
fn read_until_parked(sub: &mut Subscription, cx: &mut Context<'_>) {
    while let Poll::Ready(item) = Pin::new(&mut *sub).poll_next(cx) {
        black_box(item);
    }
}

fn publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_publish");
    group.throughput(Throughput::Elements(1));
    let f = frame();

    group.bench_function("no_subscribers", |b| {
        let hub = full_hub();
        b.iter(|| black_box(hub.publish(f.clone())));
    });

    group.bench_function("10000_stalled", |b| {
        let hub = full_hub();
        let subs: Vec<_> = (0..SUBSCRIBERS).map(|_| hub.subscribe()).collect();
        b.iter(|| black_box(hub.publish(f.clone())));
        drop(subs);
    });

    group.bench_function("10000_parked_once", |b| {
        let hub = full_hub();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut subs: Vec<_> = (0..SUBSCRIBERS).map(|_| hub.subscribe()).collect();
        for sub in &mut subs {
            read_until_parked(sub, &mut cx);
        }
        b.iter(|| black_box(hub.publish(f.clone())));
        assert_eq!(count.0.load(Ordering::Relaxed), SUBSCRIBERS, "each once");
    });

    group.bench_function("10000_parked_each_time", |b| {
        let hub = full_hub();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut subs: Vec<_> = (0..SUBSCRIBERS).map(|_| hub.subscribe()).collect();
        b.iter_batched(
            || {
                let mut cx = Context::from_waker(&waker);
                for sub in &mut subs {
                    read_until_parked(sub, &mut cx);
                }
            },
            |()| black_box(hub.publish(f.clone())),
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
