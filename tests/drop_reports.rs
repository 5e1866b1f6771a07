//! `Dropped` reports under a stall: at most one per client per interval,
//! exact in sum, and nothing pending is lost at `Recovered` or `Closed`.
//!
//! Time is tokio's paused clock: the producers below yield one frame per
//! wake-up of a 1 ms timer, so that virtual seconds pass while they run.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BufferConfig, CloseReason, EventKind,
};

const SECOND: Duration = Duration::from_secs(1);

/// An observer that records each event with the (virtual) time it came.
fn timed_recorder() -> (
    impl Fn(&BackpressureEvent<'_>) + Send + Sync + 'static,
    mpsc::UnboundedReceiver<(Instant, Seen)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let observer = move |e: &BackpressureEvent<'_>| {
        let _ = tx.send((
            Instant::now(),
            Seen {
                id: e.client.id(),
                peer: e.client.peer_addr(),
                path: e.client.path().to_owned(),
                kind: e.kind,
                stats: e.stats,
            },
        ));
    };
    (observer, rx)
}

/// Every event up to and including `Closed`.
async fn until_closed(rx: &mut mpsc::UnboundedReceiver<(Instant, Seen)>) -> Vec<(Instant, Seen)> {
    guard("Closed", async {
        let mut all = Vec::new();
        loop {
            let seen = rx.recv().await.expect("observer channel closed");
            let closed = matches!(seen.1.kind, EventKind::Closed { .. });
            all.push(seen);
            if closed {
                return all;
            }
        }
    })
    .await
}

/// The `Dropped` reports: when, and how many frames each.
fn reports(all: &[(Instant, Seen)]) -> Vec<(Instant, u64)> {
    all.iter()
        .filter_map(|(at, s)| match s.kind {
            EventKind::Dropped { count, .. } => Some((*at, count)),
            _ => None,
        })
        .collect()
}

/// One NDJSON line of about 1 KiB.
fn line(seq: u64) -> Bytes {
    let pad = "x".repeat(1000);
    Bytes::from(format!("{{\"seq\":{seq},\"pad\":\"{pad}\"}}\n"))
}

/// An endless NDJSON producer that yields one line per wake-up of a 1 ms
/// timer (as a producer fed by a slow source does), and says when it has
/// yielded `signal_at` lines.
fn trickle(signal_at: u64, yielded: oneshot::Sender<()>) -> BoxStream {
    let mut yielded = Some(yielded);
    futures::stream::unfold(0u64, |seq| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Some((seq, seq + 1))
    })
    .map(move |seq| {
        if seq + 1 == signal_at {
            if let Some(tx) = yielded.take() {
                let _ = tx.send(());
            }
        }
        Ok::<_, Infallible>(http_body::Frame::data(line(seq)))
    })
    .boxed()
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_gets_one_dropped_report_per_second_and_an_exact_sum() {
    let (observer, mut events) = timed_recorder();
    let (yielded, has_yielded) = oneshot::channel();
    let body = Arc::new(Mutex::new(Some(trickle(4000, yielded))));
    let layer = BackpressureLayer::new(BufferConfig::new(16)).observer(observer);
    let addr = serve(ServiceBuilder::new().layer(layer).service(service_fn(
        move |_: Request<hyper::body::Incoming>| {
            let body = body.lock().unwrap().take().expect("one request");
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/x-ndjson")
                        .body(StreamBody::new(body))
                        .unwrap(),
                )
            }
        },
    )))
    .await;

    // A real client that reads the headers and then nothing.
    let mut client = connect(addr, Some(4096)).await;
    let response = common::get(&mut client, "/stream.ndjson").await;
    let start = Instant::now();
    guard("4000 lines produced", has_yielded).await.unwrap();
    // It goes away with drops still waiting to be reported.
    drop(response);
    drop(client.sender);
    client.conn.abort();

    let all = until_closed(&mut events).await;
    let (closed_at, closed) = all.last().unwrap();
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::ClientGone
        }
    );
    let reports = reports(&all);
    let reported: u64 = reports.iter().map(|(_, n)| n).sum();
    assert!(
        closed.stats.dropped > 1000,
        "the client stalled: {:?}",
        closed.stats
    );
    // Exact in sum: every drop was reported, the last ones with `Closed`.
    assert_eq!(reported, closed.stats.dropped, "{:?}", closed.stats);
    // Readable: a few seconds of a stall give a few reports, not one per
    // frame dropped.
    let span = closed_at.duration_since(start).as_secs();
    assert!(
        reports.len() as u64 <= span + 2,
        "{} Dropped reports for {} frames dropped in {span} s",
        reports.len(),
        closed.stats.dropped
    );
    // At most one per second; only the last, the sum flushed right before
    // `Closed`, may come sooner.
    for pair in reports[..reports.len() - 1].windows(2) {
        assert!(pair[1].0.duration_since(pair[0].0) >= SECOND, "{reports:?}");
    }
    // The first drop of the stall was reported at once (in the wake-up
    // that dropped it): its report counts the frames of that wake-up only.
    assert_eq!(reports[0].1, 1, "{reports:?}");
}

/// A layer over a body fed one frame at a time by the test.
async fn fed_body(
    config: BufferConfig,
) -> (
    Producer,
    impl http_body::Body<Data = Bytes, Error: std::fmt::Debug> + Unpin,
    mpsc::UnboundedReceiver<(Instant, Seen)>,
) {
    let (observer, events) = timed_recorder();
    // Room for one frame in the channel: each send waits for the pump to
    // take the one before, so the pump takes one frame per wake-up.
    let (producer, body) = channel_body(1, None);
    let svc = ServiceBuilder::new()
        .layer(BackpressureLayer::new(config).observer(observer))
        .service(one_response(body, "application/x-ndjson"));
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    (producer, body, events)
}

fn kinds(all: &[(Instant, Seen)]) -> Vec<EventKind> {
    all.iter().map(|(_, s)| s.kind).collect()
}

#[tokio::test(start_paused = true)]
async fn drops_pending_at_recovered_are_reported_before_it() {
    let (producer, mut body, mut events) = fed_body(BufferConfig::new(4)).await;
    // 40 frames, one per wake-up, to a client that reads nothing yet: 35
    // dropped within the first interval.
    for seq in 0..40 {
        producer.tx.send(line(seq)).await.unwrap();
    }
    drop(producer.tx);
    let mut seqs = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        // One line per event, several per frame when they waited together.
        for text in std::str::from_utf8(&data).unwrap().lines() {
            let seq: u64 = text[7..text.find(',').unwrap()].parse().unwrap();
            seqs.push(seq);
        }
    }
    // The newest five (four in the buffer, one in the producer's channel).
    assert_eq!(seqs, [35, 36, 37, 38, 39], "the newest, in order");
    let all = until_closed(&mut events).await;
    let kinds = kinds(&all);
    let counts: Vec<u64> = reports(&all).iter().map(|(_, n)| *n).collect();
    // The first drop at once, the other 34 (all within the first interval)
    // in one report, flushed before `Recovered`.
    assert_eq!(counts, [1, 34], "{kinds:?}");
    let last_report = kinds
        .iter()
        .rposition(|k| matches!(k, EventKind::Dropped { .. }))
        .unwrap();
    let recovered = kinds
        .iter()
        .position(|k| *k == EventKind::Recovered)
        .expect("recovered");
    assert!(last_report < recovered, "{kinds:?}");
    assert_eq!(
        kinds.last(),
        Some(&EventKind::Closed {
            reason: CloseReason::Completed
        })
    );
    assert_eq!(all.last().unwrap().1.stats.dropped, 35);
}

#[tokio::test(start_paused = true)]
async fn drops_pending_when_the_producer_goes_quiet_are_reported_one_interval_later() {
    let (producer, _body, mut events) = fed_body(BufferConfig::new(4)).await;
    let start = Instant::now();
    for seq in 0..10 {
        producer.tx.send(line(seq)).await.unwrap();
    }
    // The producer goes quiet (it stays open); the client still reads
    // nothing. The five drops after the first are reported when their
    // interval is over.
    let mut all = Vec::new();
    let first = wait_for_timed(&mut events, &mut all, |k| {
        matches!(k, EventKind::Dropped { .. })
    })
    .await;
    let second = wait_for_timed(&mut events, &mut all, |k| {
        matches!(k, EventKind::Dropped { .. })
    })
    .await;
    assert_eq!(first.0, start);
    assert!(matches!(first.1, EventKind::Dropped { count: 1, .. }));
    assert_eq!(second.0, start + SECOND);
    assert!(matches!(second.1, EventKind::Dropped { count: 5, .. }));
    drop(producer);
}

async fn wait_for_timed(
    rx: &mut mpsc::UnboundedReceiver<(Instant, Seen)>,
    all: &mut Vec<(Instant, Seen)>,
    pred: impl Fn(&EventKind) -> bool,
) -> (Instant, EventKind) {
    guard("an event", async {
        loop {
            let seen = rx.recv().await.expect("observer channel closed");
            all.push(seen.clone());
            if pred(&seen.1.kind) {
                return (seen.0, seen.1.kind);
            }
        }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn an_interval_of_zero_reports_every_wake_up_s_drops() {
    let config = BufferConfig::new(4).with_drop_report_interval(Duration::ZERO);
    let (producer, mut body, mut events) = fed_body(config).await;
    for seq in 0..10 {
        producer.tx.send(line(seq)).await.unwrap();
    }
    drop(producer.tx);
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    let all = until_closed(&mut events).await;
    let counts: Vec<u64> = reports(&all).iter().map(|(_, n)| *n).collect();
    // One frame per wake-up, each report as it happens.
    assert_eq!(counts, [1; 5], "{:?}", kinds(&all));
}
