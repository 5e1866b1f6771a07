//! Property tests: random configurations and random interleavings of a
//! producer, a client and the clock, checked against what the crate
//! promises.
//!
//! Each case drives one buffered response in-process on a current-thread
//! runtime with paused time: the test is the producer (frames into a
//! channel the inner body reads), the client (polls the outer body once per
//! read) and the clock (`tokio::time::advance`). Between steps it yields a
//! bounded number of times so that the pump runs; nothing sleeps.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::{Body, Frame};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_backpressure::{
    BackpressureBody, BackpressureEvent, BackpressureLayer, BackpressureObserver, BufferConfig,
    BufferStats, ClientHandle, CloseReason, EventKind, EvictReason, Evicted, Eviction, Flush,
    FrameClass, GapMarker, Health, MemoryBudget, Overflow, PumpStopped, SseGapMarker,
};

// ----- the inner body -----

type Item = Result<Frame<Bytes>, io::Error>;

/// The inner body: frames from a channel the test feeds. Counts the data
/// frames the pump took, and says when it was dropped.
struct ChanBody {
    rx: mpsc::UnboundedReceiver<Item>,
    taken: Arc<AtomicU64>,
    dropped: Arc<AtomicBool>,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let item = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(Ok(frame)) = &item {
            if frame.is_data() {
                self.taken.fetch_add(1, Ordering::SeqCst);
            }
        }
        Poll::Ready(item)
    }
}

impl Drop for ChanBody {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// Counts the wake-ups of the client's task (hyper's connection task).
#[derive(Default)]
struct Wakes(AtomicU64);

impl futures::task::ArcWake for Wakes {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An SSE event carrying `seq` as its id, `pad` bytes of data.
fn event(seq: u64, pad: usize) -> Bytes {
    let mut s = format!("id: {seq}\ndata: ");
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\n\n");
    Bytes::from(s)
}

/// One item of what the client read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sse {
    Id(u64),
    Lagged(u64),
}

fn parse(data: &[u8]) -> Result<Vec<Sse>, String> {
    let text = std::str::from_utf8(data).map_err(|e| e.to_string())?;
    if !text.ends_with("\n\n") {
        return Err(format!("a frame that is not whole events: {text:?}"));
    }
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            if let Some(rest) = e.strip_prefix("event: lagged\ndata: {\"dropped\":") {
                rest.trim_end_matches('}')
                    .parse()
                    .map(Sse::Lagged)
                    .map_err(|_| format!("bad marker {e:?}"))
            } else {
                e.lines()
                    .next()
                    .and_then(|l| l.strip_prefix("id: "))
                    .and_then(|id| id.parse().ok())
                    .map(Sse::Id)
                    .ok_or_else(|| format!("not an event: {e:?}"))
            }
        })
        .collect()
}

// ----- the generated case -----

/// How the classify hook treats frames, by sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Classes {
    AllDroppable,
    /// Every `n`-th frame is critical.
    CriticalEvery(u64),
    /// Every `n`-th frame replaces the previous one of its key (`seq % 2`).
    ReplaceEvery(u64),
}

impl Classes {
    fn of(self, seq: u64) -> FrameClass {
        match self {
            Classes::AllDroppable => FrameClass::Droppable,
            Classes::CriticalEvery(n) if seq % n == 0 => FrameClass::Critical,
            Classes::ReplaceEvery(n) if seq % n == 0 => FrameClass::Replace(seq / n % 2),
            _ => FrameClass::Droppable,
        }
    }

    fn is_critical(self, seq: u64) -> bool {
        self.of(seq) == FrameClass::Critical
    }

    fn is_keyed(self, seq: u64) -> bool {
        matches!(self.of(seq), FrameClass::Replace(_))
    }
}

fn seq_of(frame: &Bytes) -> u64 {
    std::str::from_utf8(frame)
        .ok()
        .and_then(|s| s.strip_prefix("id: "))
        .and_then(|s| s.split('\n').next())
        .and_then(|s| s.parse().ok())
        .expect("the test's own frames")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndKind {
    Eof,
    Trailers,
    Error,
}

#[derive(Debug, Clone)]
enum Op {
    /// The producer sends `n` frames with `pad` bytes of data each.
    Push {
        n: usize,
        pad: usize,
    },
    /// The client polls the body `k` times.
    Read(usize),
    Advance(Duration),
    /// The inner body ends.
    End(EndKind),
    /// The client disconnects.
    DropBody,
}

#[derive(Debug, Clone)]
struct Case {
    capacity: usize,
    max_bytes: Option<usize>,
    threshold: f64,
    overflow: Overflow,
    flush: Flush,
    rules: Rules,
    marker: bool,
    budget: Option<usize>,
    classes: Classes,
    /// Each step, and how many turns the runtime gets after it.
    ops: Vec<(Op, usize)>,
}

impl Case {
    fn config(&self) -> BufferConfig {
        let mut c = BufferConfig::new(self.capacity)
            .with_threshold(self.threshold)
            .with_overflow(self.overflow)
            .with_flush(self.flush)
            .with_eviction(self.rules.eviction());
        if let Some(b) = self.max_bytes {
            c = c.with_max_bytes(b);
        }
        c
    }
}

const YEAR: Duration = Duration::from_secs(365 * 86_400);

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => (1u64..=50).prop_map(Duration::from_millis),
        2 => (1u64..=2_000_000).prop_map(Duration::from_nanos),
        2 => (1u64..=120).prop_map(Duration::from_secs),
        1 => Just(Duration::from_nanos(1)),
        1 => Just(Duration::MAX),
        1 => Just(Duration::ZERO),
    ]
}

fn flush() -> impl Strategy<Value = Flush> {
    let limit = prop_oneof![1usize..=8, Just(1024), Just(usize::MAX)];
    let bytes = prop_oneof![1usize..=400, Just(64 * 1024), Just(usize::MAX)];
    prop_oneof![
        2 => Just(Flush::Immediate),
        1 => (limit.clone(), bytes.clone()).prop_map(|(f, b)| Flush::coalesce(f, b)),
        1 => duration().prop_map(Flush::interval),
        1 => (duration(), limit, bytes).prop_map(|(period, max_frames, max_bytes)| {
            Flush::Interval { period, max_frames, max_bytes }
        }),
    ]
}

/// The eviction rules of a case (`Eviction`'s own fields are private).
#[derive(Debug, Clone, Copy, Default)]
struct Rules {
    dropped: Option<u64>,
    within: Option<(u64, Duration)>,
    stall: Option<Duration>,
    pressure: Option<Duration>,
}

impl Rules {
    fn eviction(&self) -> Eviction {
        let mut e = Eviction::none();
        if let Some(n) = self.dropped {
            e = e.after_dropped(n);
        }
        if let Some((n, w)) = self.within {
            e = e.after_dropped_within(n, w);
        }
        if let Some(d) = self.stall {
            e = e.after_stall(d);
        }
        if let Some(d) = self.pressure {
            e = e.after_pressure_for(d);
        }
        e
    }
}

fn rules() -> impl Strategy<Value = Rules> {
    (
        prop::option::weighted(0.2, 0u64..=30),
        prop::option::weighted(0.2, (0u64..=30, duration())),
        prop::option::weighted(0.25, duration()),
        prop::option::weighted(0.2, duration()),
    )
        .prop_map(|(dropped, within, stall, pressure)| Rules {
            dropped,
            within,
            stall,
            pressure,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..=12, prop_oneof![0usize..=60, 0usize..=600]).prop_map(|(n, pad)| Op::Push { n, pad }),
        5 => (1usize..=8).prop_map(Op::Read),
        3 => prop_oneof![
            4 => (0u64..=20).prop_map(Duration::from_millis),
            2 => (0u64..=3_000_000).prop_map(Duration::from_nanos),
            2 => (1u64..=100).prop_map(Duration::from_secs),
            1 => Just(YEAR),
        ].prop_map(Op::Advance),
        1 => prop_oneof![Just(EndKind::Eof), Just(EndKind::Trailers), Just(EndKind::Error)].prop_map(Op::End),
        1 => Just(Op::DropBody),
    ]
}

/// Turns after a step: usually enough for every task to settle, sometimes
/// fewer, so that the client reads while the pump is behind.
fn turns() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(SETTLE), 1 => Just(0usize), 1 => Just(1usize), 1 => Just(3usize)]
}

fn case() -> impl Strategy<Value = Case> {
    let threshold = prop_oneof![
        8 => (1u32..=100).prop_map(|p| f64::from(p) / 100.0),
        1 => Just(f64::MIN_POSITIVE),
        1 => Just(1.0),
        1 => prop_oneof![Just(0.0), Just(1.5), Just(f64::NAN), Just(-1.0)],
    ];
    let max_bytes = prop::option::weighted(
        0.5,
        prop_oneof![
            6 => 1usize..=2_000,
            1 => Just(usize::MAX / 2),
            1 => Just(usize::MAX),
            1 => Just(0),
        ],
    );
    let overflow = prop_oneof![
        Just(Overflow::DropOldest),
        Just(Overflow::DropNewest),
        Just(Overflow::Disconnect),
        Just(Overflow::Pause),
    ];
    let classes = prop_oneof![
        4 => Just(Classes::AllDroppable),
        1 => (1u64..=5).prop_map(Classes::CriticalEvery),
        1 => (1u64..=3).prop_map(Classes::ReplaceEvery),
    ];
    let budget = prop::option::weighted(0.25, prop_oneof![1usize..=3_000, Just(usize::MAX / 2)]);
    (
        (
            1usize..=50,
            max_bytes,
            threshold,
            overflow,
            flush(),
            rules(),
        ),
        (
            any::<bool>(),
            budget,
            classes,
            prop::collection::vec((op(), turns()), 1..60),
        ),
    )
        .prop_map(
            |(
                (capacity, max_bytes, threshold, overflow, flush, rules),
                (marker, budget, classes, ops),
            )| Case {
                capacity,
                max_bytes,
                threshold,
                overflow,
                flush,
                rules,
                marker,
                budget,
                classes,
                ops,
            },
        )
}

// ----- what the observer saw -----

#[derive(Debug, Clone)]
struct Rec {
    kind: EventKind,
    stats: BufferStats,
    at: Instant,
}

#[derive(Default)]
struct Log {
    events: Mutex<Vec<Rec>>,
    /// What the observer found wrong (it must not panic: that would stop
    /// the pump and hide the case).
    violations: Mutex<Vec<String>>,
    handle: OnceLock<ClientHandle>,
}

impl Log {
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
}

fn holds(s: &BufferStats) -> bool {
    s.pushed == s.sent + s.dropped + s.replaced + s.buffered as u64
}

impl BackpressureObserver for Log {
    fn on_event(&self, e: &BackpressureEvent<'_>) {
        if !holds(&e.stats) {
            self.violation(format!(
                "{:?}: counters do not add up: {:?}",
                e.kind, e.stats
            ));
        }
        match self.handle.get() {
            None => self.violation(format!("{:?} before the handle was known", e.kind)),
            Some(handle) => {
                // The handle may be read from an observer (no lock is held).
                match handle.stats() {
                    Some(s) if !holds(&s) => {
                        self.violation(format!("handle counters do not add up: {s:?}"))
                    }
                    None => self.violation("the handle of a buffered body has no stats".into()),
                    _ => {}
                }
                if let EventKind::Closed { reason } = e.kind {
                    if handle.health() != Health::Closed(reason) {
                        self.violation(format!(
                            "Closed({reason:?}) delivered while health is {:?}",
                            handle.health()
                        ));
                    }
                    if handle.stats() != Some(e.stats) {
                        self.violation(format!(
                            "final stats {:?} differ from Closed's {:?}",
                            handle.stats(),
                            e.stats
                        ));
                    }
                }
            }
        }
        match e.kind {
            EventKind::Pressure if e.stats.healthy => {
                self.violation(format!("Pressure with healthy stats {:?}", e.stats))
            }
            EventKind::Recovered if !e.stats.healthy => {
                self.violation(format!("Recovered with unhealthy stats {:?}", e.stats))
            }
            _ => {}
        }
        self.events.lock().unwrap().push(Rec {
            kind: e.kind,
            stats: e.stats,
            at: Instant::now(),
        });
    }
}

// ----- the run -----

/// Turns of the runtime after each step: enough for the pump to take what
/// it can (a burst is at most one poll's budget, plus one deferral).
const SETTLE: usize = 16;

async fn settle() {
    for _ in 0..SETTLE {
        tokio::task::yield_now().await;
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

fn trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("x-last", HeaderValue::from_static("yes"));
    t
}

/// The far end of a saturated duration: about 30 years.
const FAR: Duration = Duration::from_secs(31 * 365 * 86_400);

fn reachable(d: Duration) -> Option<Duration> {
    (d <= YEAR).then_some(d)
}

/// tokio's timers tick in milliseconds: a deadline fires within 1 ms after
/// it passed.
const TICK: Duration = Duration::from_millis(1);

fn check(case: Case) -> Result<(), TestCaseError> {
    let config = case.config();
    // The model is of events: a reader idle for the keep-alive interval
    // (paused time skips far ahead) would get comment lines, which
    // `tests/keep_alive.rs` covers.
    let layer = match BackpressureLayer::try_new(config) {
        Ok(layer) => layer.keep_alive(None),
        Err(e) => {
            prop_assert!(config.validate().is_err(), "try_new refused a valid config");
            prop_assert!(e.to_string().starts_with("invalid buffer config: "));
            return Ok(());
        }
    };
    prop_assert!(config.validate().is_ok());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let outcome = if case.marker {
        rt.block_on(drive(&case, layer.gap_marker(SseGapMarker::new())))
    } else {
        rt.block_on(drive(&case, layer))
    };
    drop(rt);
    outcome.map_err(TestCaseError::fail)
}

/// What the client has read so far, checked as it comes.
#[derive(Debug, Default)]
struct Reader {
    delivered: Vec<u64>,
    /// Frames announced lost by markers.
    announced: u64,
    /// A marker read, waiting for the frame after its gap.
    marker: Option<u64>,
    trailers: Option<HeaderMap>,
    error: Option<String>,
    evicted: Option<EvictReason>,
    /// The body said it is over (`None`), or failed.
    finished: bool,
    /// When a frame was last taken out of the buffer.
    last_taken: Option<Instant>,
    /// The last poll was pending; the wake-ups counted before it.
    pending: Option<u64>,
}

struct Run<'a> {
    case: &'a Case,
    log: Arc<Log>,
    tx: Option<mpsc::UnboundedSender<Item>>,
    sent: u64,
    taken: Arc<AtomicU64>,
    inner_dropped: Arc<AtomicBool>,
    ended: Option<EndKind>,
    body_dropped: bool,
    reader: Reader,
    budget: Option<MemoryBudget>,
    opened_at: Instant,
    /// When frames started to wait without the client taking one, as far
    /// as the test can tell (never earlier than the crate's own count).
    waiting_since: Option<Instant>,
    /// Drops by moment: (when, how many).
    drops: Vec<(Instant, u64)>,
    last_dropped: u64,
    largest_frame: usize,
    wakes: Arc<Wakes>,
}

impl Run<'_> {
    fn handle(&self) -> &ClientHandle {
        self.log.handle.get().expect("the service ran")
    }

    fn events(&self) -> Vec<Rec> {
        self.log.events.lock().unwrap().clone()
    }

    fn closed(&self) -> Option<(CloseReason, BufferStats)> {
        self.events().iter().find_map(|r| match r.kind {
            EventKind::Closed { reason } => Some((reason, r.stats)),
            _ => None,
        })
    }

    fn is_missing_ok(&self, from: u64, to: u64, announced: u64) -> Result<(), String> {
        // The ids in `from..to` never came; `announced` of them were
        // announced lost. Replaced frames leave no gap; nothing else may go
        // missing silently, and critical frames never go missing.
        let missing = to - from;
        let keyed = (from..to)
            .filter(|&s| self.case.classes.is_keyed(s))
            .count() as u64;
        if let Some(s) = (from..to).find(|&s| self.case.classes.is_critical(s)) {
            return Err(format!("critical frame {s} was lost"));
        }
        if !self.case.marker {
            return Ok(());
        }
        if announced > missing || missing - announced > keyed {
            return Err(format!(
                "ids {from}..{to} missing ({keyed} replaceable) but the marker announced {announced}"
            ));
        }
        Ok(())
    }

    fn on_items(&mut self, items: Vec<Sse>) -> Result<(), String> {
        let joined = items.len() > 1;
        for item in items {
            match item {
                Sse::Lagged(k) => {
                    if joined {
                        return Err("a marker joined with other frames".into());
                    }
                    if k == 0 {
                        return Err("a marker for nothing".into());
                    }
                    if !self.case.marker {
                        return Err("a marker without a gap marker".into());
                    }
                    if self.reader.marker.replace(k).is_some() {
                        return Err("two markers in a row".into());
                    }
                    self.reader.announced += k;
                }
                Sse::Id(id) => {
                    let next = self.reader.delivered.last().map_or(0, |l| l + 1);
                    if id < next {
                        return Err(format!(
                            "id {id} after {:?}: out of order or duplicated",
                            self.reader.delivered.last()
                        ));
                    }
                    if id >= self.sent {
                        return Err(format!("id {id} was never sent"));
                    }
                    let announced = self.reader.marker.take().unwrap_or(0);
                    self.is_missing_ok(next, id, announced)?;
                    self.reader.delivered.push(id);
                }
            }
        }
        Ok(())
    }

    /// The end of the stream reached the client: whatever was lost after the
    /// last delivered frame was announced before it.
    fn on_end(&mut self) -> Result<(), String> {
        let next = self.reader.delivered.last().map_or(0, |l| l + 1);
        let announced = self.reader.marker.take().unwrap_or(0);
        let pushed = self.taken.load(Ordering::SeqCst);
        self.is_missing_ok(next, pushed, announced)
    }

    /// Polls the body once; `false` if it was pending.
    fn read_one<M>(
        &mut self,
        body: &mut BackpressureBody<ChanBody, Arc<Log>, M>,
    ) -> Result<bool, String>
    where
        M: GapMarker<Bytes>,
    {
        if self.reader.finished {
            return Ok(false);
        }
        if body.size_hint().exact().is_some() {
            return Err("an exact size hint on a buffered body".into());
        }
        let wakes = self.wakes.0.load(Ordering::SeqCst);
        if self.reader.pending == Some(wakes) {
            // Pending, and nothing woke the client since: hyper would not
            // poll. (If nothing ever does, the end of the run finds the
            // client waiting forever.)
            return Ok(false);
        }
        let end_promised = body.is_end_stream();
        let waker = futures::task::waker(self.wakes.clone());
        let polled = match Pin::new(&mut *body).poll_frame(&mut Context::from_waker(&waker)) {
            Poll::Ready(next) => Some(next),
            Poll::Pending => None,
        };
        self.reader.pending = if polled.is_some() { None } else { Some(wakes) };
        if end_promised && !matches!(polled, Some(None)) {
            return Err(format!(
                "is_end_stream() was true, then the body yielded {:?} (hyper would have lost it)",
                polled.map(|f| f.map(|f| f.map(|f| f.is_data())))
            ));
        }
        let Some(next) = polled else {
            return Ok(false);
        };
        let now = Instant::now();
        match next {
            Some(Ok(frame)) => {
                if self.reader.trailers.is_some() {
                    return Err("a frame after the trailers".into());
                }
                match frame.into_data() {
                    Ok(data) => {
                        let items = parse(&data)?;
                        self.reader.last_taken = Some(now);
                        self.on_items(items)?;
                    }
                    Err(frame) => {
                        let t = frame.into_trailers().map_err(|_| "an unknown frame")?;
                        if self.ended != Some(EndKind::Trailers) {
                            return Err(format!("trailers {t:?} that were never sent"));
                        }
                        if t != trailers() {
                            return Err(format!("trailers changed: {t:?}"));
                        }
                        self.on_end()?;
                        self.reader.trailers = Some(t);
                    }
                }
            }
            Some(Err(e)) => {
                self.reader.finished = true;
                if let Some(ev) = e.downcast_ref::<Evicted>() {
                    self.reader.evicted = Some(ev.reason());
                    if self.reader.marker.is_some() {
                        return Err("a marker, then eviction: the marker promised a frame".into());
                    }
                } else if e.downcast_ref::<PumpStopped>().is_some() {
                    return Err("the pump stopped (it panicked)".into());
                } else if let Some(io) = e.downcast_ref::<io::Error>() {
                    if self.ended != Some(EndKind::Error) || io.to_string() != "inner failed" {
                        return Err(format!("an error that was never sent: {io}"));
                    }
                    self.on_end()?;
                    self.reader.error = Some(io.to_string());
                } else {
                    return Err(format!("an unknown error: {e}"));
                }
            }
            None => {
                self.reader.finished = true;
                if self.reader.trailers.is_none() {
                    match self.ended {
                        Some(EndKind::Eof) => self.on_end()?,
                        // Closed before the end, or the end was delivered.
                        _ => {
                            if self.closed().is_none() {
                                return Err("the body ended but the stream is open".into());
                            }
                        }
                    }
                }
                if !body.is_end_stream() {
                    return Err("is_end_stream() is false after the end".into());
                }
            }
        }
        Ok(true)
    }

    fn violations(&self) -> Result<(), String> {
        let v = self.log.violations.lock().unwrap();
        match v.first() {
            Some(first) => Err(format!("{first} (and {} more)", v.len() - 1)),
            None => Ok(()),
        }
    }

    /// Under `Pause` nothing is dropped; under `Disconnect` the client is
    /// cut off instead (only a shared budget may shed its frames).
    fn never_dropped(&self, stats: &BufferStats) -> Result<(), String> {
        let c = self.case;
        // Known bugs, left out here until they are fixed:
        // `pause_never_drops_a_replaceable_frame` and
        // `disconnect_never_drops_to_make_room_for_a_critical_frame`.
        let replace = matches!(c.classes, Classes::ReplaceEvery(_));
        let critical = matches!(c.classes, Classes::CriticalEvery(_));
        if ((c.overflow == Overflow::Pause && !replace)
            || (c.overflow == Overflow::Disconnect && c.budget.is_none() && !critical))
            && stats.dropped > 0
        {
            return Err(format!("{:?} dropped {} frames", c.overflow, stats.dropped));
        }
        Ok(())
    }

    /// Checks what holds between steps; `settled`: every task has had its
    /// turns since the last step (so due timers and wake-ups were handled).
    fn quiescent(&mut self, settled: bool) -> Result<(), String> {
        self.violations()?;
        let now = Instant::now();
        let handle = self.handle().clone();
        let stats = handle.stats().ok_or("no stats")?;
        if !holds(&stats) {
            return Err(format!("counters do not add up: {stats:?}"));
        }
        let health = handle.health();
        let events = self.events();
        check_order(&events)?;
        let closed = self.closed();
        let c = self.case;

        self.never_dropped(&stats)?;
        if let Some((reason, _)) = closed {
            if health != Health::Closed(reason) {
                return Err(format!("Closed({reason:?}) but health {health:?}"));
            }
            if !settled {
                return Ok(());
            }
            // The pump has ended and dropped the inner body.
            if !self.inner_dropped.load(Ordering::SeqCst) {
                return Err(format!(
                    "the inner body is alive {SETTLE} turns after Closed({reason:?})"
                ));
            }
            if alive_tasks() != 0 {
                return Err(format!(
                    "{} task(s) alive {SETTLE} turns after Closed({reason:?})",
                    alive_tasks()
                ));
            }
            if let Some(b) = &self.budget {
                if b.used() != 0 {
                    return Err(format!("the budget holds {} bytes after Closed", b.used()));
                }
            }
            return Ok(());
        }
        if matches!(health, Health::Closed(_)) {
            return Err(format!("health {health:?} but no Closed event"));
        }

        // Drops, by moment.
        if stats.dropped > self.last_dropped {
            self.drops.push((now, stats.dropped - self.last_dropped));
            self.last_dropped = stats.dropped;
        }
        // Waiting frames.
        if stats.buffered == 0 {
            self.waiting_since = None;
        } else {
            let taken = self.reader.last_taken.unwrap_or(self.opened_at);
            let since = self.waiting_since.get_or_insert(now);
            *since = (*since).max(taken);
        }

        if !stats.healthy && health != Health::Pressure {
            return Err(format!("over the threshold without Pressure: {stats:?}"));
        }
        if let Some(b) = &self.budget {
            if b.used() != stats.buffered_bytes {
                return Err(format!(
                    "the budget counts {} bytes, the buffer holds {}",
                    b.used(),
                    stats.buffered_bytes
                ));
            }
        }
        let criticals = c.classes != Classes::AllDroppable;
        if !criticals && stats.high_water > c.capacity {
            return Err(format!(
                "{} frames held at once, capacity {}",
                stats.high_water, c.capacity
            ));
        }
        if !criticals {
            if let Some(max) = c.max_bytes {
                let bound = max.max(self.largest_frame);
                let bound = if c.overflow == Overflow::Pause {
                    max.saturating_add(self.largest_frame)
                } else {
                    bound
                };
                if stats.high_water_bytes > bound {
                    return Err(format!(
                        "{} bytes held at once, max_bytes {max}, largest frame {}",
                        stats.high_water_bytes, self.largest_frame
                    ));
                }
            }
        }

        if !settled {
            return Ok(());
        }
        // The pump takes every frame at once, unless it must wait (`Pause`)
        // or the producer's end was taken.
        if c.overflow != Overflow::Pause && self.ended.is_none() {
            let taken = self.taken.load(Ordering::SeqCst);
            if taken != self.sent {
                return Err(format!("{} frames sent, the pump took {taken}", self.sent));
            }
        }
        // Rules that must have fired by now.
        let rules = c.rules;
        if let Some(max) = rules.dropped {
            if stats.dropped > max {
                return Err(format!(
                    "{} frames dropped, after_dropped({max}), still open",
                    stats.dropped
                ));
            }
        }
        if let (Some(d), Some(since)) = (rules.stall.and_then(reachable), self.waiting_since) {
            if now >= since + d + TICK {
                return Err(format!(
                    "frames waited {:?} untaken, after_stall({d:?}), still open",
                    now - since
                ));
            }
        }
        if let Some(d) = rules.pressure.and_then(reachable) {
            if let Some(since) = pressure_since(&events) {
                if now >= since + d + TICK {
                    return Err(format!(
                        "under pressure for {:?}, after_pressure_for({d:?}), still open",
                        now - since
                    ));
                }
            }
        }
        if let Some((max, window)) = rules.within {
            // Drops within a 64th of the window may share a bucket: only
            // spans shorter than that are sure to be counted together.
            let span = window - window / 64;
            if let Some(&(last, _)) = self.drops.last() {
                let sum: u64 = self
                    .drops
                    .iter()
                    .filter(|(at, _)| last.saturating_duration_since(*at) < span)
                    .map(|(_, n)| n)
                    .sum();
                if sum > max {
                    return Err(format!(
                        "{sum} frames dropped within {span:?}, after_dropped_within({max}, {window:?}), still open"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn pressure_since(events: &[Rec]) -> Option<Instant> {
    let last = events
        .iter()
        .rev()
        .find(|r| matches!(r.kind, EventKind::Pressure | EventKind::Recovered))?;
    (last.kind == EventKind::Pressure).then_some(last.at)
}

/// `Opened` first, `Pressure`/`Recovered` alternating from `Pressure`,
/// `Closed` at most once and last; drops reported add up.
fn check_order(events: &[Rec]) -> Result<(), String> {
    let kinds: Vec<EventKind> = events.iter().map(|r| r.kind).collect();
    if kinds.first() != Some(&EventKind::Opened) {
        return Err(format!("the first event is not Opened: {kinds:?}"));
    }
    if kinds.iter().filter(|k| **k == EventKind::Opened).count() != 1 {
        return Err(format!("Opened more than once: {kinds:?}"));
    }
    let mut pressure = false;
    for k in &kinds {
        match k {
            EventKind::Pressure if pressure => return Err(format!("Pressure twice: {kinds:?}")),
            EventKind::Recovered if !pressure => {
                return Err(format!("Recovered without Pressure: {kinds:?}"));
            }
            EventKind::Pressure | EventKind::Recovered => pressure = !pressure,
            _ => {}
        }
    }
    let closes = kinds
        .iter()
        .filter(|k| matches!(k, EventKind::Closed { .. }))
        .count();
    if closes > 1 || (closes == 1 && !matches!(kinds.last(), Some(EventKind::Closed { .. }))) {
        return Err(format!("Closed not once and last: {kinds:?}"));
    }
    if let Some(closed) = events
        .iter()
        .find(|r| matches!(r.kind, EventKind::Closed { .. }))
    {
        let (count, bytes) = events.iter().fold((0, 0), |(c, b), r| match r.kind {
            EventKind::Dropped { count, bytes } => (c + count, b + bytes),
            _ => (c, b),
        });
        if (count, bytes) != (closed.stats.dropped, closed.stats.dropped_bytes) {
            return Err(format!(
                "Dropped events report {count} frames / {bytes} bytes, Closed counts {} / {}",
                closed.stats.dropped, closed.stats.dropped_bytes
            ));
        }
    }
    for w in events.windows(2) {
        let (a, b) = (&w[0].stats, &w[1].stats);
        if b.pushed < a.pushed || b.sent < a.sent || b.dropped < a.dropped {
            return Err(format!("counters went down: {a:?} then {b:?}"));
        }
    }
    Ok(())
}

async fn drive<M>(
    case: &Case,
    layer: BackpressureLayer<tower_backpressure::DefaultPredicate, (), M>,
) -> Result<(), String>
where
    M: GapMarker<Bytes> + Unpin,
{
    let log = Arc::new(Log::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let taken = Arc::new(AtomicU64::new(0));
    let inner_dropped = Arc::new(AtomicBool::new(false));
    let inner = ChanBody {
        rx,
        taken: taken.clone(),
        dropped: inner_dropped.clone(),
    };
    let budget = case.budget.map(MemoryBudget::new);
    let classes = case.classes;
    let mut layer = layer
        .observer(log.clone())
        .classify(move |b: &Bytes| classes.of(seq_of(b)));
    if let Some(b) = &budget {
        layer = layer.memory_budget(b.clone());
    }
    let slot = log.clone();
    let inner = Arc::new(Mutex::new(Some(inner)));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |req: Request<()>| {
            let handle = req.extensions().get::<ClientHandle>().cloned();
            let _ = slot
                .handle
                .set(handle.expect("the layer inserts a ClientHandle"));
            let body = inner.lock().unwrap().take().expect("one request");
            std::future::ready(Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .unwrap(),
            ))
        }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    let mut body = Some(response.into_body());
    if !body.as_ref().unwrap().is_buffered() {
        return Err("a text/event-stream response was not buffered".into());
    }
    let mut run = Run {
        case,
        log,
        tx: Some(tx),
        sent: 0,
        taken,
        inner_dropped,
        ended: None,
        body_dropped: false,
        reader: Reader::default(),
        budget,
        opened_at: Instant::now(),
        waiting_since: None,
        drops: Vec::new(),
        last_dropped: 0,
        largest_frame: 0,
        wakes: Arc::new(Wakes::default()),
    };
    settle().await;
    run.quiescent(true)?;

    for (i, (op, turns)) in case.ops.iter().enumerate() {
        let step = async {
            match op {
                Op::Push { n, pad } => {
                    if let Some(tx) = &run.tx {
                        for j in 0..*n {
                            let frame = event(run.sent, pad + j % 3);
                            run.largest_frame = run.largest_frame.max(frame.len());
                            let _ = tx.send(Ok(Frame::data(frame)));
                            run.sent += 1;
                        }
                    }
                }
                Op::Read(k) => {
                    if let Some(b) = body.as_mut() {
                        for _ in 0..*k {
                            run.read_one(b)?;
                            tokio::task::yield_now().await;
                        }
                    }
                }
                Op::Advance(d) => tokio::time::advance(*d).await,
                Op::End(kind) => {
                    if let Some(tx) = run.tx.take() {
                        match kind {
                            EndKind::Eof => {}
                            EndKind::Trailers => {
                                let _ = tx.send(Ok(Frame::trailers(trailers())));
                            }
                            EndKind::Error => {
                                let _ = tx.send(Err(io::Error::other("inner failed")));
                            }
                        }
                        run.ended = Some(*kind);
                    }
                }
                Op::DropBody => {
                    if body.take().is_some() {
                        run.body_dropped = true;
                    }
                }
            }
            for _ in 0..*turns {
                tokio::task::yield_now().await;
            }
            run.quiescent(*turns >= SETTLE)
        };
        step.await
            .map_err(|e| format!("after step {i} {op:?} (+{turns} turns): {e}"))?;
    }

    // The end: the producer finishes, and the client reads what is left,
    // letting time pass when it must wait.
    if let Some(tx) = run.tx.take() {
        drop(tx);
        run.ended = Some(EndKind::Eof);
    }
    settle().await;
    if let Some(b) = body.as_mut() {
        let step = match case.flush {
            Flush::Interval { period, .. } if period > YEAR => FAR,
            Flush::Interval { period, .. } => period + TICK,
            _ => TICK,
        };
        // As hyper does: poll; when pending, wait for a wake-up (letting
        // time pass, which fires the body's timers); never poll a body that
        // says it has ended.
        let mut rounds = 0;
        while !run.reader.finished {
            rounds += 1;
            if rounds > 20_000 {
                return Err(format!("the body never ended: {:?}", run.reader));
            }
            if b.is_end_stream() {
                break;
            }
            if !run.read_one(b).map_err(|e| format!("finishing: {e}"))? {
                settle().await;
                let before = run.reader.pending;
                if before == Some(run.wakes.0.load(Ordering::SeqCst)) {
                    tokio::time::advance(step).await;
                    settle().await;
                    if before == Some(run.wakes.0.load(Ordering::SeqCst)) {
                        return Err(format!(
                            "finishing: the body is pending and nothing wakes it, even after {step:?}: {:?}",
                            run.reader
                        ));
                    }
                }
            }
            settle().await;
            run.quiescent(true).map_err(|e| format!("finishing: {e}"))?;
        }
    }
    drop(body);
    settle().await;
    run.quiescent(true)
        .map_err(|e| format!("at the end: {e}"))?;
    final_checks(&run)
}

fn final_checks(run: &Run<'_>) -> Result<(), String> {
    let (reason, stats) = run.closed().ok_or("no Closed event at the end")?;
    if !matches!(run.handle().health(), Health::Closed(r) if r == reason) {
        return Err(format!(
            "health {:?} after Closed({reason:?})",
            run.handle().health()
        ));
    }
    if stats.buffered != 0 && !matches!(reason, CloseReason::ClientGone | CloseReason::Evicted(_)) {
        return Err(format!("Closed({reason:?}) with frames left: {stats:?}"));
    }
    let taken = run.taken.load(Ordering::SeqCst);
    let r = &run.reader;
    match reason {
        CloseReason::Completed | CloseReason::InnerError => {
            // The end reached the client, after every kept frame.
            if stats.pushed != taken {
                return Err(format!(
                    "{taken} frames taken from the inner body, {} counted",
                    stats.pushed
                ));
            }
            if stats.sent != r.delivered.len() as u64 {
                return Err(format!(
                    "{} frames delivered, {} counted as sent",
                    r.delivered.len(),
                    stats.sent
                ));
            }
            let missing = taken - r.delivered.len() as u64;
            if missing != stats.dropped + stats.replaced {
                return Err(format!(
                    "{missing} frames never delivered, counted {} dropped + {} replaced",
                    stats.dropped, stats.replaced
                ));
            }
            if run.case.marker && r.announced != stats.dropped {
                return Err(format!(
                    "markers announced {} lost frames, {} were dropped",
                    r.announced, stats.dropped
                ));
            }
            let expected = match run.ended {
                Some(EndKind::Error) => CloseReason::InnerError,
                _ => CloseReason::Completed,
            };
            if reason != expected {
                return Err(format!("Closed({reason:?}) after the end {:?}", run.ended));
            }
            match run.ended {
                Some(EndKind::Trailers) if r.trailers.is_none() => {
                    return Err("the trailers were lost".into());
                }
                Some(EndKind::Error) if r.error.is_none() => {
                    return Err("the inner error was lost".into());
                }
                _ => {}
            }
        }
        CloseReason::ClientGone => {
            if !run.body_dropped {
                return Err("ClientGone, but the client never left".into());
            }
        }
        CloseReason::Evicted(rule) => {
            if run.body_dropped && r.evicted.is_none() {
                // Evicted while nobody read: fine, nothing to compare.
            } else if r.evicted != Some(rule) {
                return Err(format!(
                    "Closed(Evicted({rule:?})) but the body ended with {:?}",
                    r.evicted
                ));
            }
            let c = run.case;
            let allowed = match rule {
                EvictReason::Overflow => c.overflow == Overflow::Disconnect,
                EvictReason::DroppedTotal => c.rules.dropped.is_some(),
                EvictReason::DroppedWindow => c.rules.within.is_some(),
                EvictReason::Stalled => c.rules.stall.is_some(),
                EvictReason::Pressure => c.rules.pressure.is_some(),
                _ => false,
            };
            if !allowed {
                return Err(format!("evicted by {rule:?}, a rule that is not set"));
            }
            if stats.pushed > taken || stats.pushed + 1 < taken {
                return Err(format!("{taken} frames taken, {} counted", stats.pushed));
            }
        }
        _ => return Err(format!("unknown reason {reason:?}")),
    }
    if r.evicted.is_some() && !matches!(reason, CloseReason::Evicted(_)) {
        return Err(format!("the body says evicted, Closed says {reason:?}"));
    }
    Ok(())
}

/// The seed of the generated cases: fixed, or `PROPTEST_SEED` from the
/// environment.
fn seed() -> proptest::test_runner::RngSeed {
    let seed = std::env::var("PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_bac4);
    proptest::test_runner::RngSeed::Fixed(seed)
}

proptest! {
    // A fixed seed: CI explores the same 256 cases every run, so a failure
    // is a bug, never a flake. Explore further with `PROPTEST_SEED=<n>`.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        rng_seed: seed(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_config_and_any_interleaving_keeps_the_promises(case in case()) {
        check(case)?;
    }

    #[test]
    fn clients_sharing_a_budget_account_for_every_byte(case in shared_case()) {
        check_shared(case)?;
    }
}

// ----- several clients under one budget -----

#[derive(Debug, Clone)]
enum SharedOp {
    Push { client: usize, n: usize, pad: usize },
    Read { client: usize, k: usize },
    End { client: usize },
    Drop { client: usize },
}

#[derive(Debug, Clone)]
struct SharedCase {
    limit: usize,
    /// Per client: capacity, overflow.
    clients: Vec<(usize, Overflow)>,
    ops: Vec<SharedOp>,
}

fn shared_case() -> impl Strategy<Value = SharedCase> {
    let overflow = prop_oneof![
        3 => Just(Overflow::DropOldest),
        1 => Just(Overflow::DropNewest),
        1 => Just(Overflow::Disconnect),
        1 => Just(Overflow::Pause),
    ];
    (
        prop_oneof![1usize..=200, 200usize..=3_000],
        prop::collection::vec((1usize..=20, overflow), 2..=4),
    )
        .prop_flat_map(|(limit, clients)| {
            let n = clients.len();
            let op = prop_oneof![
                6 => (0..n, 1usize..=10, 0usize..=200).prop_map(|(client, n, pad)| SharedOp::Push { client, n, pad }),
                4 => (0..n, 1usize..=6).prop_map(|(client, k)| SharedOp::Read { client, k }),
                1 => (0..n).prop_map(|client| SharedOp::End { client }),
                1 => (0..n).prop_map(|client| SharedOp::Drop { client }),
            ];
            (Just(limit), Just(clients), prop::collection::vec(op, 1..50))
        })
        .prop_map(|(limit, clients, ops)| SharedCase { limit, clients, ops })
}

fn check_shared(case: SharedCase) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(drive_shared(&case))
        .map_err(TestCaseError::fail)
}

/// A client of `drive_shared`: its producer, its body, what its observer
/// saw, and how many frames were sent.
type SharedClient = (
    Option<mpsc::UnboundedSender<Item>>,
    Option<BackpressureBody<ChanBody, Arc<Log>, ()>>,
    Arc<Log>,
    u64,
);

async fn drive_shared(case: &SharedCase) -> Result<(), String> {
    let budget = MemoryBudget::new(case.limit);
    let mut clients = Vec::new();
    for &(capacity, overflow) in &case.clients {
        let layer = BackpressureLayer::new(BufferConfig::new(capacity).with_overflow(overflow))
            .memory_budget(budget.clone());
        let (tx, body, log) = one_body(layer).await;
        clients.push((Some(tx), Some(body), log, 0u64));
    }
    let waker = futures::task::noop_waker();
    let check = |clients: &[SharedClient], at: &str| -> Result<(), String> {
        let mut held = 0;
        let mut forced = false;
        for (i, (_, _, log, _)) in clients.iter().enumerate() {
            let handle = log.handle.get().unwrap();
            let s = handle.stats().unwrap();
            if !holds(&s) {
                return Err(format!("{at}: client {i}: counters do not add up: {s:?}"));
            }
            if let Some(v) = log.violations.lock().unwrap().first() {
                return Err(format!("{at}: client {i}: {v}"));
            }
            if !matches!(handle.health(), Health::Closed(_)) {
                held += s.buffered_bytes;
                forced |= case.clients[i].1 == Overflow::Pause;
            }
        }
        if budget.used() != held {
            return Err(format!(
                "{at}: the budget counts {} bytes, the clients hold {held}",
                budget.used()
            ));
        }
        // Known bug (`a_budget_shed_of_the_pushing_client_keeps_the_total_under_the_limit`):
        // the total may go over by what one frame adds; left out until fixed.
        let slack = 12 + 200 + 2 + 3;
        if !forced && held > case.limit + slack {
            return Err(format!("{at}: {held} bytes held, budget {}", case.limit));
        }
        Ok(())
    };
    settle().await;
    check(&clients, "at the start")?;
    for (i, op) in case.ops.iter().enumerate() {
        match *op {
            SharedOp::Push { client, n, pad } => {
                let (tx, _, _, sent) = &mut clients[client];
                if let Some(tx) = tx {
                    for _ in 0..n {
                        let _ = tx.send(Ok(Frame::data(event(*sent, pad))));
                        *sent += 1;
                    }
                }
            }
            SharedOp::Read { client, k } => {
                if let Some(body) = &mut clients[client].1 {
                    for _ in 0..k {
                        let _ = Pin::new(&mut *body).poll_frame(&mut Context::from_waker(&waker));
                        settle().await;
                    }
                }
            }
            SharedOp::End { client } => clients[client].0 = None,
            SharedOp::Drop { client } => clients[client].1 = None,
        }
        settle().await;
        check(&clients, &format!("after step {i} {op:?}"))?;
    }
    for c in &mut clients {
        c.0 = None;
        c.1 = None;
    }
    settle().await;
    check(&clients, "at the end")?;
    if budget.used() != 0 {
        return Err(format!(
            "the budget holds {} bytes after every client closed",
            budget.used()
        ));
    }
    Ok(())
}

// ----- regressions: minimal cases the properties found -----

/// A buffered body over a channel the test feeds, through `layer`.
async fn one_body<M, C>(
    layer: BackpressureLayer<tower_backpressure::DefaultPredicate, (), M, C>,
) -> (
    mpsc::UnboundedSender<Item>,
    BackpressureBody<ChanBody, Arc<Log>, M>,
    Arc<Log>,
)
where
    M: GapMarker<Bytes>,
    C: tower_backpressure::Classify<Bytes>,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Mutex::new(Some(ChanBody {
        rx,
        taken: Arc::default(),
        dropped: Arc::default(),
    })));
    let log = Arc::new(Log::default());
    let slot = log.clone();
    let svc = ServiceBuilder::new()
        .layer(layer.observer(log.clone()))
        .service(service_fn(move |req: Request<()>| {
            let _ = slot
                .handle
                .set(req.extensions().get::<ClientHandle>().cloned().unwrap());
            let body = inner.lock().unwrap().take().unwrap();
            std::future::ready(Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .unwrap(),
            ))
        }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    (tx, response.into_body(), log)
}

/// `Overflow::Pause` promises that nothing is dropped: the producer waits
/// for room. Regression (found by the property above): a frame the
/// classify hook marks `Replace` (the README's keep-alive) was still dropped
/// to make room by bytes, and the client was told it lagged.
#[tokio::test(start_paused = true)]
async fn pause_never_drops_a_replaceable_frame() {
    let layer = BackpressureLayer::new(
        BufferConfig::new(4)
            .with_max_bytes(150)
            .with_overflow(Overflow::Pause),
    )
    .gap_marker(SseGapMarker::new())
    .classify(|frame: &Bytes| {
        if frame.starts_with(b":") {
            FrameClass::Replace(0)
        } else {
            FrameClass::Droppable
        }
    });
    let (tx, mut body, log) = one_body(layer).await;
    // 14 + 144 bytes: over the byte limit together.
    tx.send(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))))
        .unwrap();
    tx.send(Ok(Frame::data(event(0, 130)))).unwrap();
    drop(tx);
    settle().await;

    let stats = log.handle.get().unwrap().stats().unwrap();
    let mut read = Vec::new();
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        read.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert_eq!(
        String::from_utf8(read).unwrap(),
        format!(
            ": keep-alive\n\n{}",
            std::str::from_utf8(&event(0, 130)).unwrap()
        ),
        "the client gets every frame, late"
    );
    assert_eq!(
        stats.dropped, 0,
        "nothing is dropped under Pause: {stats:?}"
    );
}

/// `Overflow::Disconnect` cuts a client off instead of dropping.
/// Regression: a `Critical` frame that arrived when the buffer was full
/// silently dropped the oldest droppable frame instead, and the client
/// stayed connected with a hole in its stream.
#[tokio::test(start_paused = true)]
async fn disconnect_never_drops_to_make_room_for_a_critical_frame() {
    let layer = BackpressureLayer::new(BufferConfig::new(2).with_overflow(Overflow::Disconnect))
        .classify(|frame: &Bytes| {
            if seq_of(frame) == 2 {
                FrameClass::Critical
            } else {
                FrameClass::Droppable
            }
        });
    let (tx, mut body, log) = one_body(layer).await;
    for seq in 0..3 {
        tx.send(Ok(Frame::data(event(seq, 10)))).unwrap();
    }
    drop(tx);
    settle().await;
    let handle = log.handle.get().unwrap().clone();
    let mut ids = Vec::new();
    let mut evicted = None;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        match frame {
            Ok(frame) => ids.extend(parse(&frame.into_data().unwrap()).unwrap()),
            Err(e) => evicted = e.downcast_ref::<Evicted>().map(Evicted::reason),
        }
    }
    let stats = handle.stats().unwrap();
    assert_eq!(stats.dropped, 0, "Disconnect drops nothing: {stats:?}");
    // Either every frame arrives (the critical one past the limit), or the
    // client is cut off.
    assert!(
        ids == [Sse::Id(0), Sse::Id(1), Sse::Id(2)] || evicted == Some(EvictReason::Overflow),
        "read {ids:?}, then {evicted:?}"
    );
}

/// A shared budget keeps the total under its limit. When a client's own
/// frame needs room, the budget sheds that client's oldest frame, which
/// leaves the ring with room. Regression: the frame was then appended
/// without the drop that the reservation counted on, and the budget was
/// forced over.
#[tokio::test(start_paused = true)]
async fn a_budget_shed_of_the_pushing_client_keeps_the_total_under_the_limit() {
    let budget = MemoryBudget::new(40);
    let layer = BackpressureLayer::new(BufferConfig::new(2)).memory_budget(budget.clone());
    let (tx, _body, log) = one_body(layer).await;
    // 14 + 14 bytes fill the ring; then 34 bytes.
    for (seq, pad) in [(0, 0), (1, 0), (2, 20)] {
        tx.send(Ok(Frame::data(event(seq, pad)))).unwrap();
        settle().await;
    }
    let stats = log.handle.get().unwrap().stats().unwrap();
    assert_eq!(budget.used(), stats.buffered_bytes);
    assert!(
        budget.used() <= budget.limit(),
        "{} bytes buffered under a budget of {}: {stats:?}",
        budget.used(),
        budget.limit()
    );
}
