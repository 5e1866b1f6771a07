//! Reliability: tasks that must end, timed rules that must fire, observers
//! that must not deadlock or leave a client half-closed, a memory budget that
//! must shed where it can, durations that must not overflow, and a body that
//! must not claim its end while an error is pending.
//!
//! Each test reproduces one known bug (named in its doc comment) through the
//! public API only, and says what a user would notice.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::{Sink, SinkExt, StreamExt};
use http::{Request, Response, header};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_backpressure::{
    BackpressureEvent, BackpressureLayer, BufferConfig, BufferedSink, ClientHandle, ClientRegistry,
    CloseReason, EventKind, EvictReason, Evicted, Eviction, Flush, FrameClass, GrpcDataLoss,
    Health, MemoryBudget, Overflow, PumpStopped,
};

/// Where a service leaves the [`ClientHandle`] it found in its request.
type HandleSlot = Arc<Mutex<Option<ClientHandle>>>;

/// A service answering its one request with `body` as `content_type`, that
/// hands out the request's [`ClientHandle`] (as a handler would see it).
fn answering(
    body: BoxStream,
    content_type: &'static str,
) -> (
    impl tower::Service<
        Request<()>,
        Response = StreamResponse,
        Error = Infallible,
        Future = std::future::Ready<Result<StreamResponse, Infallible>>,
    > + Clone,
    HandleSlot,
) {
    let slot = HandleSlot::default();
    let handles = slot.clone();
    let body = Arc::new(Mutex::new(Some(body)));
    let svc = service_fn(move |req: Request<()>| {
        let handle = req.extensions().get::<ClientHandle>().cloned();
        *handles.lock().unwrap() = handle;
        let body = body.lock().unwrap().take().expect("one request only");
        std::future::ready(Ok(Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .body(http_body_util::StreamBody::new(body))
            .unwrap()))
    });
    (svc, slot)
}

fn take_handle(slot: &HandleSlot) -> ClientHandle {
    slot.lock()
        .unwrap()
        .clone()
        .expect("the layer puts a ClientHandle in the request's extensions")
}

/// Waits (bounded) until `handle` reports `Health::Closed` and returns why.
async fn health_closed(handle: &mut ClientHandle) -> CloseReason {
    guard("the handle's health to become Closed", async {
        loop {
            if let Health::Closed(reason) = handle.health() {
                return reason;
            }
            handle.changed().await;
        }
    })
    .await
}

/// The reason of a body error that is [`Evicted`], if it is one.
fn evicted_reason(err: &tower_backpressure::BoxError) -> Option<EvictReason> {
    err.downcast_ref::<Evicted>().map(Evicted::reason)
}

/// A real sink whose client never takes anything: the drain task of a
/// [`BufferedSink`] in front of it never takes a message out of the buffer.
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

// ---------------------------------------------------------------------------
// Bug 1: a paused pump is never woken again.

/// Bug 1: under `Overflow::Pause`, a gap (a replace-class frame dropped for
/// the byte limit) that the gap marker answered with `GapAction::End`
/// (`GrpcDataLoss`) closed the stream while the pump was paused, and the
/// pump's waker was lost: the pump task and the inner body lived forever.
///
/// Since then `Pause` drops nothing, replace-class frames included (see
/// `pause_never_drops_a_replaceable_frame` in tests/properties.rs), so that
/// gap cannot happen. What remains of the bug is its class: a stream that
/// closes while its pump is paused must wake the pump, which ends and drops
/// the inner body, although the producer is still there. Here the client
/// takes one frame and then goes.
#[tokio::test(start_paused = true)]
async fn a_paused_pump_stops_and_drops_the_inner_body_when_the_stream_closes() {
    let (observer, mut events) = recorder();
    // One frame per read: the client takes the first frame only, and the
    // pump stays paused.
    let config = BufferConfig::new(1000)
        .with_max_bytes(100)
        .with_overflow(Overflow::Pause)
        .with_flush(Flush::Immediate);
    let layer = BackpressureLayer::new(config)
        .observer(observer)
        .gap_marker(GrpcDataLoss::new())
        .classify(|b: &Bytes| FrameClass::Replace(u64::from(b[0])));
    let (producer, inner) = channel_body(16, None);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(one_response(inner, "application/grpc"));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();

    // 10 bytes, then 95 that do not fit beside them: the pump pauses (it
    // drops nothing under `Pause`), with two more frames still waiting in the
    // producer's channel.
    for (key, len) in [(0u8, 10), (1, 95), (2, 5), (3, 5)] {
        producer.tx.try_send(Bytes::from(vec![key; len])).unwrap();
    }
    let first = guard("the first frame", body.frame())
        .await
        .expect("a frame")
        .expect("not an error");
    assert_eq!(first.into_data().expect("data, not a gap"), vec![0u8; 10]);
    drop(body);
    closed_as(&mut events, CloseReason::ClientGone).await;

    // The producer still holds its end: only the pump ending drops the inner
    // body. A leaked pump keeps it (and its task) forever.
    let Producer {
        tx, inner_dropped, ..
    } = producer;
    guard(
        "the pump task to end and drop the inner body",
        inner_dropped,
    )
    .await
    .unwrap();
    drop(tx);
}

// ---------------------------------------------------------------------------
// Bug 2: timed eviction stops once the inner body ends.

/// A finite stream ends while its client, which never reads, still has
/// frames buffered; `rule` must still evict it, and its budget bytes must
/// come back.
async fn a_finished_stream_is_still_evicted(config: BufferConfig, want: EvictReason) {
    let budget = MemoryBudget::new(1 << 20);
    let (observer, mut events) = recorder();
    let layer = BackpressureLayer::new(config)
        .observer(observer)
        .memory_budget(budget.clone());
    let (producer, inner) = channel_body(16, None);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(one_response(inner, "text/event-stream"));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let start = Instant::now();
    for seq in 0..3 {
        producer.tx.try_send(sse_event(seq, 40)).unwrap();
    }
    drop(producer.tx);
    guard("the inner body to end", producer.inner_done)
        .await
        .unwrap();
    assert_eq!(budget.used(), 120, "the stalled client holds its 3 frames");

    // Paused time: the guard's wait lets the clock run to the rule's
    // deadline, if anything waits for it.
    let closed = closed(&mut events).await;
    assert_eq!(
        closed.kind,
        EventKind::Closed {
            reason: CloseReason::Evicted(want)
        }
    );
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "not before the deadline"
    );
    assert_eq!(budget.used(), 0, "the evicted client's bytes come back");
    let err = guard("the evicted body's error", body.frame())
        .await
        .expect("an error, not the end")
        .expect_err("an error, not data");
    assert_eq!(evicted_reason(&err), Some(want), "{err}");
}

/// Bug 2: `Eviction::after_stall` must fire for a client that never reads a
/// stream that has already ended (nobody re-arms the deadline once the pump
/// returns).
#[tokio::test(start_paused = true)]
async fn after_stall_evicts_a_client_whose_stream_already_ended() {
    a_finished_stream_is_still_evicted(
        BufferConfig::new(100).with_eviction(Eviction::none().after_stall(Duration::from_secs(1))),
        EvictReason::Stalled,
    )
    .await;
}

/// Bug 2: `Eviction::after_pressure_for` must fire for a client under
/// pressure whose stream has already ended.
#[tokio::test(start_paused = true)]
async fn after_pressure_for_evicts_a_client_whose_stream_already_ended() {
    a_finished_stream_is_still_evicted(
        BufferConfig::new(4)
            .with_threshold(0.5)
            .with_eviction(Eviction::none().after_pressure_for(Duration::from_secs(1))),
        EvictReason::Pressure,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Bug 3: observer callbacks run with the client's lock held.

/// Bug 3: an observer that reads the registry's snapshot and the client's
/// own `ClientHandle::stats()` on every event must not deadlock (events but
/// `Opened` fire with the client's mutex held, and `Closed` fires before the
/// handle has its final stats). The scenario runs on a multi-thread runtime
/// in a thread of its own; a watchdog fails the test if it does not finish.
#[test]
fn an_observer_that_reads_the_registry_and_the_handle_does_not_deadlock() {
    let (done_tx, done_rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let registry = ClientRegistry::new();
            let (recorder, mut events) = recorder();
            let slot = HandleSlot::default();
            let reader = {
                let registry = registry.clone();
                let slot = slot.clone();
                move |e: &BackpressureEvent<'_>| {
                    let snapshot = registry.snapshot();
                    assert!(snapshot.clients.len() <= 1);
                    let handle = slot.lock().unwrap().clone();
                    if let Some(handle) = handle {
                        let _ = handle.stats();
                    }
                    let _ = e;
                }
            };
            // The reader before the registry: on `Closed` the client is
            // still listed when the reader asks.
            let layer = BackpressureLayer::new(BufferConfig::new(4).with_threshold(0.5))
                .observer(((reader, registry.clone()), recorder));
            let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..20)
                .map(|i| Ok(http_body::Frame::data(sse_event(i, 40))))
                .collect();
            let (svc, handles) =
                answering(futures::stream::iter(frames).boxed(), "text/event-stream");
            let svc = ServiceBuilder::new().layer(layer).service(svc);
            let response = svc.oneshot(Request::new(())).await.unwrap();
            *slot.lock().unwrap() = Some(take_handle(&handles));
            let body = response.into_body();
            // Let the pump take all 20 frames (pressure, drops) first.
            let mut all = Vec::new();
            wait_for(&mut events, &mut all, |s| {
                matches!(s.kind, EventKind::Dropped { .. })
            })
            .await;
            let data = guard("the body", body.collect()).await.unwrap().to_bytes();
            let ids = sse_ids(&data);
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
            assert_eq!(ids.last(), Some(&19), "the newest frame arrives");
            closed_as(&mut events, CloseReason::Completed).await;
            assert!(registry.is_empty());
        });
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => {}
        Err(std_mpsc::RecvTimeoutError::Timeout) => panic!(
            "deadlock: an observer calling ClientRegistry::snapshot() / \
             ClientHandle::stats() never returned"
        ),
        Err(std_mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the scenario failed (see its panic above)")
        }
    }
}

// ---------------------------------------------------------------------------
// Bug 4: the memory budget refuses frames it could make room for.

/// A message of a [`BufferedSink`]: its size, and whether it is critical.
#[derive(Debug, Clone, Copy)]
struct Msg {
    len: usize,
    critical: bool,
}

fn droppable(len: usize) -> Msg {
    Msg {
        len,
        critical: false,
    }
}

fn msg_len(m: &Msg) -> usize {
    m.len
}

fn msg_class(m: &Msg) -> FrameClass {
    if m.critical {
        FrameClass::Critical
    } else {
        FrameClass::Droppable
    }
}

fn stalled_sink(config: BufferConfig, budget: &MemoryBudget) -> BufferedSink<Msg> {
    BufferedSink::builder(config)
        .memory_budget(budget.clone())
        .classify(msg_class)
        .weigh(msg_len)
        .spawn(Stalled)
}

/// Budget of 100 bytes: `x` (built by the caller) holds 60 bytes it cannot
/// shed, `y` holds 30 droppable bytes; `z`, which has nothing waiting (it
/// keeps up), sends 20 bytes. The budget must shed `y`'s oldest frame for
/// them instead of refusing `z`'s frame.
async fn the_budget_sheds_wherever_it_can(budget: MemoryBudget, x: &mut BufferedSink<Msg>) {
    let mut y = stalled_sink(BufferConfig::new(100), &budget);
    let mut z = stalled_sink(BufferConfig::new(100), &budget);
    for _ in 0..3 {
        y.send(droppable(10)).await.unwrap();
    }
    assert_eq!(budget.used(), 90);

    z.send(droppable(20)).await.unwrap();
    let zs = z.stats();
    assert_eq!(
        (zs.buffered, zs.dropped),
        (1, 0),
        "the frame of a client that keeps up is admitted while another \
         client holds droppable bytes (budget: {:?})",
        budget.stats()
    );
    let ys = y.stats();
    assert!(ys.dropped >= 1, "y's oldest frames made room: {ys:?}");
    assert_eq!(ys.buffered as u64 + ys.dropped, 3);
    assert_eq!(x.stats().dropped, 0, "nothing of x could be dropped");
    assert!(budget.used() <= 100, "{:?}", budget.stats());
    assert_eq!(budget.stats().dropped, ys.dropped);
}

/// Bug 4: only the largest member was asked to shed; when its frames are
/// all critical, the incoming frame of another client was refused although
/// a third client held droppable bytes.
#[tokio::test(start_paused = true)]
async fn the_budget_sheds_a_smaller_client_when_the_largest_holds_only_critical_frames() {
    let budget = MemoryBudget::new(100);
    let mut x = stalled_sink(BufferConfig::new(100), &budget);
    for _ in 0..2 {
        x.send(Msg {
            len: 30,
            critical: true,
        })
        .await
        .unwrap();
    }
    assert_eq!(budget.used(), 60);
    the_budget_sheds_wherever_it_can(budget, &mut x).await;
    assert_eq!(x.stats().buffered, 2, "critical frames are kept");
}

/// Bug 4: the same when the largest member is an `Overflow::Pause` client,
/// whose frames are never dropped.
#[tokio::test(start_paused = true)]
async fn the_budget_sheds_a_smaller_client_when_the_largest_is_a_pause_client() {
    let budget = MemoryBudget::new(100);
    let mut x = stalled_sink(
        BufferConfig::new(100).with_overflow(Overflow::Pause),
        &budget,
    );
    for _ in 0..2 {
        x.send(droppable(30)).await.unwrap();
    }
    assert_eq!(budget.used(), 60);
    the_budget_sheds_wherever_it_can(budget, &mut x).await;
    assert_eq!(x.stats().buffered, 2, "a Pause client loses nothing");
}

/// Bug 4: under `Overflow::Disconnect`, a frame the budget refuses (nothing
/// anywhere can be shed) must evict the client (`Evicted(Overflow)`), not
/// silently lose the frame while the client stays connected.
#[tokio::test(start_paused = true)]
async fn a_budget_refusal_disconnects_a_disconnect_client() {
    let budget = MemoryBudget::new(100);
    // The whole budget is held by frames that cannot be dropped.
    let mut x = stalled_sink(BufferConfig::new(100), &budget);
    x.send(Msg {
        len: 100,
        critical: true,
    })
    .await
    .unwrap();
    assert_eq!(budget.used(), 100);

    let (observer, mut events) = recorder();
    let mut d = BufferedSink::builder(BufferConfig::new(10).with_overflow(Overflow::Disconnect))
        .observer(observer)
        .memory_budget(budget.clone())
        .classify(msg_class)
        .weigh(msg_len)
        .spawn(Stalled);
    let mut handle = d.handle();
    let sent = d.send(droppable(10)).await;
    let stats = d.stats();
    let evicted = CloseReason::Evicted(EvictReason::Overflow);
    if let Err(e) = &sent {
        assert_eq!(e.reason(), evicted);
    }
    assert!(
        d.is_closed(),
        "the budget refused the frame of a Disconnect client: it must be \
         cut off, not lose the frame silently (send: {sent:?}, stats: {stats:?})"
    );
    assert_eq!(health_closed(&mut handle).await, evicted);
    let mut all = Vec::new();
    let c = wait_for(&mut events, &mut all, |s| {
        matches!(s.kind, EventKind::Closed { .. })
    })
    .await;
    assert_eq!(c.kind, EventKind::Closed { reason: evicted });
    assert_eq!(budget.used(), 100, "x's bytes only");
}

// ---------------------------------------------------------------------------
// Bug 5: `Duration::MAX` passes validation and panics later.

/// Builds a layer from `config`; `None` if it is refused at construction
/// (which is a correct answer to a duration that cannot work).
fn layer_or_refused(config: BufferConfig) -> Option<BackpressureLayer> {
    match BackpressureLayer::try_new(config) {
        Ok(layer) => Some(layer),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

/// Streams 3 frames to a client that reads them, then ends: the client
/// must get the 3 frames and a clean end, whatever the config's durations.
async fn three_frames_then_the_end(layer: BackpressureLayer) {
    let (producer, inner) = channel_body(16, None);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(one_response(inner, "text/event-stream"));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    for seq in 0..3 {
        producer.tx.try_send(sse_event(seq, 40)).unwrap();
    }
    // The pump buffers the 3 frames and waits for more (and for its timed
    // rules) before the client reads them.
    let mut ids = Vec::new();
    while ids.len() < 3 {
        match guard("a frame", body.frame()).await {
            Some(Ok(frame)) => ids.extend(sse_ids(&frame.into_data().unwrap())),
            Some(Err(e)) => panic!(
                "the body failed after {ids:?}: {e} (pump stopped: {})",
                e.downcast_ref::<PumpStopped>().is_some()
            ),
            None => panic!("the body ended early after {ids:?}"),
        }
    }
    assert_eq!(ids, vec![0, 1, 2]);
    drop(producer.tx);
    match guard("the end", body.frame()).await {
        None => {}
        Some(Ok(frame)) => panic!("nothing more was sent: {frame:?}"),
        Some(Err(e)) => panic!(
            "a clean end, not an error: {e} (pump stopped: {})",
            e.downcast_ref::<PumpStopped>().is_some()
        ),
    }
}

/// Bug 5: `Eviction::after_stall(Duration::MAX)` is refused or means
/// "never"; it must not panic the pump (`Instant + Duration` overflow),
/// which ends the response with `PumpStopped`.
#[tokio::test(start_paused = true)]
async fn after_stall_duration_max_is_refused_or_never_fires() {
    let config = BufferConfig::new(100).with_eviction(Eviction::none().after_stall(Duration::MAX));
    if let Some(layer) = layer_or_refused(config) {
        three_frames_then_the_end(layer).await;
    }
}

/// Bug 5: the same for `Eviction::after_pressure_for(Duration::MAX)`.
#[tokio::test(start_paused = true)]
async fn after_pressure_for_duration_max_is_refused_or_never_fires() {
    let config = BufferConfig::new(4)
        .with_threshold(0.5)
        .with_eviction(Eviction::none().after_pressure_for(Duration::MAX));
    if let Some(layer) = layer_or_refused(config) {
        three_frames_then_the_end(layer).await;
    }
}

/// Bug 5: `Flush::interval(Duration::MAX)` is refused or works (the first
/// release goes out at once); it must not panic the body while it is
/// polled (hyper's connection task would unwind).
#[tokio::test(start_paused = true)]
async fn flush_interval_duration_max_is_refused_or_releases_without_panic() {
    let config = BufferConfig::new(100).with_flush(Flush::interval(Duration::MAX));
    let Some(layer) = layer_or_refused(config) else {
        return;
    };
    let (producer, inner) = channel_body(16, None);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(one_response(inner, "text/event-stream"));
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    for seq in 0..3 {
        producer.tx.try_send(sse_event(seq, 40)).unwrap();
    }
    drop(producer.tx);
    // Everything, the end included, waits in the buffer before the first
    // release.
    guard("the inner body to end", producer.inner_done)
        .await
        .unwrap();
    // Read as hyper's connection task would: in a task of its own.
    let read = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
    match guard("the body", read).await {
        Ok(Ok(data)) => assert_eq!(sse_ids(&data), vec![0, 1, 2]),
        Ok(Err(e)) => panic!("the body failed: {e}"),
        Err(join) => panic!("polling the body panicked: {join}"),
    }
}

/// Bug 5: `close_timeout(Duration::MAX)` on a `BufferedSink` means "wait as
/// long as it takes"; closing must deliver every buffered message, not
/// panic the drain task and lose them.
#[tokio::test(start_paused = true)]
async fn sink_close_timeout_duration_max_delivers_everything() {
    let (tx, rx) = futures::channel::mpsc::channel::<u64>(0);
    let mut sink = BufferedSink::builder(BufferConfig::new(100))
        .weigh(|_: &u64| 8)
        .close_timeout(Duration::MAX)
        .spawn(tx);
    for i in 0..5 {
        sink.send(i).await.unwrap();
    }
    let (closed, received) = guard("closing", async {
        tokio::join!(sink.close(), rx.collect::<Vec<u64>>())
    })
    .await;
    assert_eq!(received, vec![0, 1, 2, 3, 4], "every buffered message");
    closed.expect("closing delivered everything");
}

// ---------------------------------------------------------------------------
// Bug 6: an observer that panics inside close leaves things half-closed.

/// Panics on `Closed`.
fn panics_on_closed(e: &BackpressureEvent<'_>) {
    if let EventKind::Closed { .. } = e.kind {
        panic!("observer bug on Closed");
    }
}

/// A layer whose observer is `(panics_on_closed, registry)`, a response
/// pending forever, its body, and the request's handle.
async fn a_client_of_a_panicking_observer(
    registry: &ClientRegistry,
) -> (
    impl Body<Data = Bytes, Error = tower_backpressure::BoxError> + Send + 'static,
    ClientHandle,
    Producer,
) {
    let layer =
        BackpressureLayer::new(BufferConfig::new(8)).observer((panics_on_closed, registry.clone()));
    let (producer, inner) = channel_body(16, None);
    let (svc, handles) = answering(inner, "text/event-stream");
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    assert_eq!(registry.len(), 1, "listed once Opened");
    (body, take_handle(&handles), producer)
}

/// Bug 6: an observer that panics on `Closed` (the client went away: the
/// body is dropped) must not leave the client half-closed: its health
/// becomes `Health::Closed` (a `changed()` waiter wakes), the later observer
/// of the pair (the registry) still hears `Closed`, so the registry entry
/// goes, and the pump ends.
#[tokio::test(start_paused = true)]
async fn an_observer_panicking_on_closed_still_closes_the_client_everywhere() {
    let registry = ClientRegistry::new();
    let (body, mut handle, producer) = a_client_of_a_panicking_observer(&registry).await;
    // Dropped as hyper drops a body when the client disconnects, in a task
    // of its own (the observer's panic, if it escapes, ends that task).
    let _ = tokio::spawn(async move { drop(body) }).await;

    assert_eq!(
        health_closed(&mut handle).await,
        CloseReason::ClientGone,
        "the handle reports the close"
    );
    assert!(
        registry.is_empty(),
        "the registry (the pair's second observer) heard Closed: {:?}",
        registry.snapshot()
    );
    guard("the pump to drop the inner body", producer.inner_dropped)
        .await
        .unwrap();
}

/// The child-process side of
/// [`a_panic_in_closed_while_unwinding_does_not_abort`].
const CHILD_ENV: &str = "TOWER_BACKPRESSURE_RELIABILITY_CHILD";

/// Bug 6: a handler that panics while it holds a buffered body drops the
/// body during unwinding; an observer that panics on that `Closed` must not
/// turn this into a panic while panicking, which aborts the whole process
/// (every connection of the server). Run in a child process (this test
/// binary, this test only) so that an abort is a failure, not a dead test
/// run.
#[test]
fn a_panic_in_closed_while_unwinding_does_not_abort() {
    const NAME: &str = "a_panic_in_closed_while_unwinding_does_not_abort";
    if std::env::var_os(CHILD_ENV).is_some() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let registry = ClientRegistry::new();
            let (body, mut handle, _producer) = a_client_of_a_panicking_observer(&registry).await;
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _body = body;
                panic!("handler bug while holding the body");
            }));
            assert!(unwound.is_err(), "the handler's panic is caught");
            assert_eq!(health_closed(&mut handle).await, CloseReason::ClientGone);
            assert!(registry.is_empty());
        });
        return;
    }

    let exe = std::env::current_exe().unwrap();
    let child = std::process::Command::new(exe)
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // Ends only the child this test started, by its id.
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("the child test run hung");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the child process failed or aborted ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

// ---------------------------------------------------------------------------
// Bug 7: `Eviction::after_dropped_within` is quadratic.

/// Bug 7 (behaviour at scale; the cost is measured by the `dropped_within`
/// benchmark in `benches/buffer.rs`, never by a timed test): with 50,000
/// drops, each at a distinct instant within a long window, the rule does not
/// fire while the count is not exceeded, and fires at exactly the drop that
/// exceeds it.
#[tokio::test(start_paused = true)]
async fn after_dropped_within_fires_exactly_when_the_count_is_exceeded_at_scale() {
    const MAX: u64 = 50_000;
    let config = BufferConfig::new(1)
        .with_eviction(Eviction::none().after_dropped_within(MAX, Duration::from_secs(3600)));
    let mut sink = BufferedSink::builder(config)
        .weigh(|_: &u64| 8)
        .spawn(Stalled);
    // The first message fills the ring; each later one drops one.
    for i in 0..=MAX {
        tokio::time::advance(Duration::from_micros(1)).await;
        if let Err(e) = sink.send(i).await {
            panic!("evicted after {i} drops, allowed {MAX}: {e}");
        }
    }
    assert_eq!(sink.stats().dropped, MAX);
    tokio::time::advance(Duration::from_micros(1)).await;
    let err = sink.send(MAX + 1).await.unwrap_err();
    assert_eq!(
        err.reason(),
        CloseReason::Evicted(EvictReason::DroppedWindow),
        "drop number {} exceeds the rule",
        MAX + 1
    );
}

// ---------------------------------------------------------------------------
// Bug 8: `is_end_stream()` is true while an eviction error is pending.

/// Bug 8: a client whose stream has ended (it has not read its last frames)
/// is evicted when the shared budget sheds its frames for another client's
/// push (`Eviction::after_dropped(0)`). Its body must not say
/// `is_end_stream()` while the next frame is the `Evicted` error: hyper
/// would end the response cleanly and the client would never learn it lost
/// frames.
#[tokio::test(start_paused = true)]
async fn is_end_stream_is_false_while_an_eviction_error_is_pending() {
    let budget = MemoryBudget::new(100);
    let config = BufferConfig::new(100).with_eviction(Eviction::none().after_dropped(0));
    let layer = BackpressureLayer::new(config).memory_budget(budget.clone());
    let (producer, inner) = channel_body(16, None);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(one_response(inner, "text/event-stream"));
    let mut body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    for seq in 0..3 {
        producer.tx.try_send(sse_event(seq, 30)).unwrap();
    }
    drop(producer.tx);
    guard("the inner body to end", producer.inner_done)
        .await
        .unwrap();
    assert_eq!(budget.used(), 90);

    // Another client under the budget: its 50 bytes need 40 more than are
    // free, so the first client's two oldest frames are shed.
    let mut other = BufferedSink::builder(BufferConfig::new(10))
        .memory_budget(budget.clone())
        .spawn(Stalled);
    other.send(Bytes::from(vec![b'x'; 50])).await.unwrap();

    let claims_end = body.is_end_stream();
    let next = guard("the next frame", body.frame()).await;
    match &next {
        Some(Err(e)) => assert_eq!(evicted_reason(e), Some(EvictReason::DroppedTotal), "{e}"),
        other => panic!("the client must learn it was evicted, got {other:?}"),
    }
    assert!(
        !claims_end,
        "is_end_stream() was true while the next frame was the Evicted error"
    );
}
