//! `BufferedSink` against real sinks: order, gaps, flush strategies,
//! policies, closing, the registry and the memory budget.
use std::sync::Mutex;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc as tmpsc;

use std::error::Error as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Sink;
use http::{Method, Uri};
use tokio::time::Instant;
use tower_backpressure::{
    BufferConfig, BufferStats, BufferedSink, ClientInfo, ClientRegistry, CloseReason, EventKind,
    EvictReason, Eviction, Flush, Gap, GapAction, Health, MemoryBudget, Overflow,
};

mod common;
use common::{Seen, recorder};

async fn closed(events: &mut tmpsc::UnboundedReceiver<Seen>) -> (CloseReason, BufferStats) {
    loop {
        let Seen { kind, stats, .. } = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("a Closed event in time")
            .expect("observer alive");
        if let EventKind::Closed { reason } = kind {
            return (reason, stats);
        }
    }
}

fn lagged(gap: Gap) -> GapAction<i64> {
    GapAction::Insert(-(gap.frames as i64))
}

fn eight(_: &i64) -> usize {
    8
}

/// Records what reaches it; `fail` makes every call fail.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<(Vec<i64>, usize, bool)>>);

impl Sink<i64> for Log {
    type Error = std::io::Error;
    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn start_send(self: Pin<&mut Self>, item: i64) -> std::io::Result<()> {
        self.0.lock().unwrap().0.push(item);
        Ok(())
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.lock().unwrap().1 += 1;
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.lock().unwrap().2 = true;
        Poll::Ready(Ok(()))
    }
}

// On a current-thread runtime the drain task runs only when the test
// awaits something that is pending: every send below happens while the
// client (the channel's receiver) has taken nothing.

#[tokio::test]
async fn a_stalled_client_gets_the_newest_messages_after_a_marker() {
    let (tx, rx) = mpsc::channel::<i64>(0);
    let (observer, mut events) = recorder();
    let mut sink = BufferedSink::builder(BufferConfig::new(4))
        .observer(observer)
        .gap_marker(lagged)
        .weigh(eight)
        .spawn(tx);
    for i in 0..100 {
        sink.send(i).await.unwrap();
    }
    assert_eq!(sink.stats().buffered, 4);
    let (result, got) = tokio::join!(sink.close(), rx.collect::<Vec<i64>>());
    result.unwrap();
    assert_eq!(got, [-96, 96, 97, 98, 99]);

    let mut kinds = Vec::new();
    while let Ok(Seen { kind, stats, .. }) = events.try_recv() {
        kinds.push(kind);
        if let EventKind::Closed { .. } = kind {
            assert_eq!((stats.pushed, stats.sent, stats.dropped), (100, 4, 96));
        }
    }
    assert_eq!(
        kinds,
        [
            EventKind::Opened,
            EventKind::Pressure,
            EventKind::Dropped {
                count: 96,
                bytes: 96 * 8
            },
            EventKind::Recovered,
            EventKind::Closed {
                reason: CloseReason::Completed
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_up_gets_every_message_in_order() {
    const N: i64 = 2000;
    let (tx, rx) = mpsc::channel::<i64>(0);
    // Room for everything: nothing can be lost, whatever the timing.
    let mut sink = BufferedSink::builder(BufferConfig::new(N as usize))
        .weigh(eight)
        .spawn(tx);
    let reader = tokio::spawn(rx.collect::<Vec<i64>>());
    for i in 0..N {
        sink.send(i).await.unwrap();
    }
    sink.close().await.unwrap();
    assert_eq!(reader.await.unwrap(), (0..N).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_default_config_flushes_after_each_message() {
    // Messages are never joined, and the default config leaves a sink as it
    // was: one flush per message, even when many wait.
    let log = Log::default();
    let mut sink = BufferedSink::builder(BufferConfig::new(1000))
        .weigh(eight)
        .spawn(log.clone());
    for i in 0..95 {
        sink.send(i).await.unwrap();
    }
    sink.close().await.unwrap();
    let (items, flushes, closed) = log.0.lock().unwrap().clone();
    assert_eq!(items, (0..95).collect::<Vec<_>>());
    assert_eq!(flushes, 95, "one flush per message");
    assert!(closed, "the real sink is closed");

    // Set explicitly, the same flush as the default batches the flushes.
    let log = Log::default();
    let mut sink =
        BufferedSink::builder(BufferConfig::new(1000).with_flush(BufferConfig::default().flush()))
            .weigh(eight)
            .spawn(log.clone());
    for i in 0..95 {
        sink.send(i).await.unwrap();
    }
    sink.close().await.unwrap();
    let (items, flushes, _) = log.0.lock().unwrap().clone();
    assert_eq!(items, (0..95).collect::<Vec<_>>());
    assert_eq!(flushes, 1, "all 95 waited: one batch");
}

#[tokio::test]
async fn coalesce_flushes_once_per_batch() {
    let log = Log::default();
    let mut sink =
        BufferedSink::builder(BufferConfig::new(1000).with_flush(Flush::coalesce(10, 1 << 20)))
            .weigh(eight)
            .spawn(log.clone());
    for i in 0..95 {
        sink.send(i).await.unwrap();
    }
    sink.close().await.unwrap();
    let (items, flushes, closed) = log.0.lock().unwrap().clone();
    assert_eq!(items, (0..95).collect::<Vec<_>>());
    assert_eq!(flushes, 10, "9 full batches, then the rest before closing");
    assert!(closed, "the real sink is closed");
}

#[tokio::test(start_paused = true)]
async fn interval_releases_at_most_once_per_period() {
    let log = Log::default();
    let period = Duration::from_millis(100);
    let mut sink =
        BufferedSink::builder(BufferConfig::new(1000).with_flush(Flush::interval(period)))
            .weigh(eight)
            .spawn(log.clone());
    let start = Instant::now();
    for i in 0..5 {
        sink.send(i).await.unwrap();
    }
    // The first release goes out at once.
    while sink.stats().sent < 5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    for i in 5..10 {
        sink.send(i).await.unwrap();
    }
    // The next one waits for the period.
    sink.close().await.unwrap();
    assert_eq!(start.elapsed(), period);
    let (items, flushes, _) = log.0.lock().unwrap().clone();
    assert_eq!(items, (0..10).collect::<Vec<_>>());
    assert_eq!(flushes, 2, "one flush per release");
}

#[tokio::test]
async fn a_client_that_goes_away_closes_the_sink() {
    let (tx, rx) = mpsc::channel::<i64>(0);
    drop(rx);
    let (observer, mut events) = recorder();
    let mut sink = BufferedSink::builder(BufferConfig::new(8))
        .observer(observer)
        .weigh(eight)
        .spawn(tx);
    sink.send(1).await.unwrap();
    let (reason, _) = closed(&mut events).await;
    assert_eq!(reason, CloseReason::ClientGone);
    assert!(sink.is_closed());
    let err = sink.send(2).await.unwrap_err();
    assert_eq!(err.reason(), CloseReason::ClientGone);
    assert!(err.source().is_some(), "the real sink's error is kept");
    assert_eq!(err.to_string(), "buffered sink closed: client_gone");
    assert_eq!(
        sink.close().await.unwrap_err().reason(),
        CloseReason::ClientGone
    );
    assert!(events.try_recv().is_err(), "nothing after Closed");
}

#[tokio::test]
async fn pause_makes_the_producer_wait_and_loses_nothing() {
    let (tx, rx) = mpsc::channel::<i64>(0);
    let mut sink = BufferedSink::builder(BufferConfig::new(2).with_overflow(Overflow::Pause))
        .weigh(eight)
        .spawn(tx);
    let produce = async {
        for i in 0..50 {
            sink.send(i).await.unwrap();
        }
        sink.close().await.unwrap();
        sink.stats()
    };
    let (stats, got) = tokio::join!(produce, rx.collect::<Vec<i64>>());
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    assert_eq!((stats.dropped, stats.sent), (0, 50));
    assert!(stats.high_water <= 2, "high water {}", stats.high_water);
}

#[tokio::test]
async fn disconnect_evicts_on_overflow_and_drops_the_real_sink() {
    let (tx, rx) = mpsc::channel::<i64>(0);
    let (observer, mut events) = recorder();
    let mut sink = BufferedSink::builder(BufferConfig::new(2).with_overflow(Overflow::Disconnect))
        .observer(observer)
        .weigh(eight)
        .spawn(tx);
    sink.send(0).await.unwrap();
    sink.send(1).await.unwrap();
    let err = sink.send(2).await.unwrap_err();
    let evicted = CloseReason::Evicted(EvictReason::Overflow);
    assert_eq!(err.reason(), evicted);
    assert_eq!(closed(&mut events).await.0, evicted);
    // The drain task ends and drops the real sink: the channel ends.
    let got = tokio::time::timeout(Duration::from_secs(30), rx.collect::<Vec<i64>>())
        .await
        .unwrap();
    assert!(got.is_empty(), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn closing_a_stalled_client_is_bounded_by_the_close_timeout() {
    let (tx, _rx) = mpsc::channel::<i64>(0);
    let (observer, mut events) = recorder();
    let mut sink = BufferedSink::builder(BufferConfig::new(4))
        .observer(observer)
        .weigh(eight)
        .close_timeout(Duration::from_secs(2))
        .spawn(tx);
    for i in 0..10 {
        sink.send(i).await.unwrap();
    }
    let start = Instant::now();
    let err = sink.close().await.unwrap_err();
    assert_eq!(err.reason(), CloseReason::Evicted(EvictReason::Stalled));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let (reason, stats) = closed(&mut events).await;
    assert_eq!(reason, CloseReason::Evicted(EvictReason::Stalled));
    assert_eq!(stats.sent, 1, "the channel took one message");
}

#[tokio::test(start_paused = true)]
async fn the_stall_rule_evicts_a_client_that_takes_nothing() {
    let (tx, _rx) = mpsc::channel::<i64>(0);
    let (observer, mut events) = recorder();
    let mut sink = BufferedSink::builder(
        BufferConfig::new(8).with_eviction(Eviction::none().after_stall(Duration::from_secs(1))),
    )
    .observer(observer)
    .weigh(eight)
    .spawn(tx);
    for i in 0..4 {
        sink.send(i).await.unwrap();
    }
    let (reason, _) = closed(&mut events).await;
    assert_eq!(reason, CloseReason::Evicted(EvictReason::Stalled));
    assert_eq!(
        sink.send(4).await.unwrap_err().reason(),
        CloseReason::Evicted(EvictReason::Stalled)
    );
}

#[tokio::test]
async fn dropping_the_sink_still_delivers_what_is_buffered() {
    let (tx, rx) = mpsc::channel::<i64>(0);
    let mut sink = BufferedSink::builder(BufferConfig::new(100))
        .weigh(eight)
        .spawn(tx);
    for i in 0..20 {
        sink.send(i).await.unwrap();
    }
    drop(sink);
    assert_eq!(rx.collect::<Vec<_>>().await, (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn abandon_drops_the_rest_and_closes_the_real_sink() {
    let (tx, rx) = mpsc::channel::<i64>(0);
    let (observer, mut events) = recorder();
    let mut sink = BufferedSink::builder(BufferConfig::new(100))
        .observer(observer)
        .weigh(eight)
        .spawn(tx);
    for i in 0..10 {
        sink.send(i).await.unwrap();
    }
    let handle = sink.handle();
    sink.abandon().await;
    let (reason, stats) = closed(&mut events).await;
    assert_eq!(reason, CloseReason::ClientGone);
    assert_eq!((stats.pushed, stats.sent), (10, 0));
    assert_eq!(handle.health(), Health::Closed(CloseReason::ClientGone));
    // The real sink was closed, with nothing delivered.
    assert!(rx.collect::<Vec<i64>>().await.is_empty());
}

#[tokio::test]
async fn a_gap_marker_that_ends_closes_with_data_loss() {
    let (tx, rx) = mpsc::channel::<i64>(0);
    let mut sink = BufferedSink::builder(BufferConfig::new(2))
        .gap_marker(|_: Gap| GapAction::<i64>::End(http::HeaderMap::new()))
        .weigh(eight)
        .spawn(tx);
    for i in 0..10 {
        sink.send(i).await.unwrap();
    }
    let (result, got) = tokio::join!(sink.close(), rx.collect::<Vec<i64>>());
    assert_eq!(
        result.unwrap_err().reason(),
        CloseReason::Evicted(EvictReason::DataLoss)
    );
    assert!(got.is_empty(), "nothing after the gap: {got:?}");
}

#[tokio::test]
async fn the_registry_lists_an_open_sink() {
    let registry = ClientRegistry::new();
    let (tx, rx) = mpsc::channel::<i64>(0);
    let info = ClientInfo::new(Method::GET, Uri::from_static("/ws"), None);
    let id = info.id();
    let mut sink = BufferedSink::builder(BufferConfig::new(8))
        .observer(registry.clone())
        .client(info)
        .weigh(eight)
        .spawn(tx);
    assert_eq!(sink.info().id(), id);
    assert!(sink.handle().is_buffered());
    let snapshot = registry.snapshot();
    assert_eq!(snapshot.clients.len(), 1);
    assert_eq!(snapshot.clients[0].path, "/ws");
    sink.send(1).await.unwrap();
    let (result, got) = tokio::join!(sink.close(), rx.collect::<Vec<i64>>());
    result.unwrap();
    assert_eq!(got, [1]);
    assert!(registry.is_empty());
}

#[tokio::test]
async fn a_memory_budget_bounds_many_stalled_sinks() {
    let budget = MemoryBudget::new(100);
    let mut receivers = Vec::new();
    let mut sinks = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = mpsc::channel::<i64>(0);
        receivers.push(rx);
        sinks.push(
            BufferedSink::builder(BufferConfig::new(1000))
                .memory_budget(budget.clone())
                .weigh(|_: &i64| 10)
                .spawn(tx),
        );
    }
    for i in 0..50 {
        for sink in &mut sinks {
            sink.send(i).await.unwrap();
            assert!(budget.used() <= 100, "{} bytes", budget.used());
        }
    }
    assert_eq!(budget.used(), 100);
    assert!(budget.stats().dropped >= 150 - 10);
}

#[test]
fn an_invalid_config_is_refused_at_construction() {
    let err = BufferedSink::try_builder(BufferConfig::new(0)).unwrap_err();
    assert!(err.to_string().contains("capacity"));
}
