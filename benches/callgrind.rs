//! Instructions per operation, counted by callgrind: repeatable on a busy
//! machine, where the criterion timings of `buffer` and `body` are not.
//!
//! ```text
//! cargo bench --bench callgrind
//! ```
//!
//! Each operation of the `buffer` and `body` benches runs `N` times in a
//! process of its own under `valgrind --tool=callgrind`, and once with
//! `N = 0`; the table shows `(Ir(N) - Ir(0)) / N`: the instructions one
//! iteration costs, setup excluded. The numbers include the loop itself (a
//! few instructions). Without valgrind on the `PATH` the bench says so and
//! does nothing.
//!
//! Instructions are not time (a cache miss or a store-forwarding stall costs
//! no instructions), but they do not move with the machine's load, so they
//! show what a change to the hot path does.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use futures::StreamExt as _;
use http::{Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::{broadcast, mpsc};
use tower::{ServiceExt, service_fn};
use tower_backpressure::{Backpressure, BufferConfig, ClientBuffer, FrameClass};

const CAPACITY: usize = 1024;
const FRAME: usize = 256;
/// Iterations per measured process.
const N: u64 = 50_000;

/// Every operation, as `(name, what it does)`.
const OPS: &[(&str, &str)] = &[
    ("push_pop/not_full/ClientBuffer", "push + pop, empty ring"),
    ("push_pop/not_full/VecDeque", "push_back + pop_front"),
    (
        "push_pop/not_full/tokio_broadcast",
        "send + try_recv, one receiver",
    ),
    ("push_pop/not_full/tokio_mpsc", "try_send + try_recv"),
    (
        "push_pop/not_full/Mutex_VecDeque",
        "lock, push_back; lock, pop_front",
    ),
    (
        "push_pop/not_full/crossbeam_ArrayQueue",
        "push + pop, lock-free",
    ),
    (
        "push_pop/full/ClientBuffer",
        "push into a full ring, oldest out",
    ),
    ("push_pop/full/VecDeque", "pop_front + push_back at 1024"),
    (
        "push_pop/full/tokio_broadcast",
        "send overwriting the oldest",
    ),
    ("push_pop/full/tokio_mpsc", "try_recv + try_send at 1024"),
    (
        "push_pop/full/crossbeam_ArrayQueue",
        "force_push at 1024, oldest out",
    ),
    ("body/unwrapped", "one frame of a StreamBody"),
    ("body/passthrough", "one frame, not selected"),
    ("body/buffered", "one frame through pump and ring"),
    ("body/stalled", "one frame pumped into a full ring"),
    (
        "body/paced/unwrapped",
        "one frame sent, then read, a StreamBody",
    ),
    (
        "body/paced/buffered",
        "one frame sent, then read, through the layer",
    ),
    (
        "body/paced/drained",
        "one frame sent, taken and dropped by a task (no layer)",
    ),
    (
        "body/paced/stalled",
        "one frame sent, pumped into a full ring (a stalled client)",
    ),
];

fn frame() -> Bytes {
    Bytes::from(vec![b'x'; FRAME])
}

fn run(op: &str, n: u64) {
    match op {
        "push_pop/not_full/ClientBuffer" => {
            let mut ring = ClientBuffer::new(BufferConfig::new(CAPACITY));
            let mut f = Some(frame());
            for _ in 0..n {
                ring.push(f.take().unwrap());
                f = black_box(ring.pop());
            }
        }
        "push_pop/not_full/VecDeque" => {
            let mut ring = VecDeque::with_capacity(CAPACITY);
            let mut f = Some(frame());
            for _ in 0..n {
                ring.push_back(f.take().unwrap());
                f = black_box(ring.pop_front());
            }
        }
        "push_pop/not_full/tokio_broadcast" => {
            let (tx, mut rx) = broadcast::channel(CAPACITY);
            let f = frame();
            for _ in 0..n {
                tx.send(f.clone()).unwrap();
                black_box(rx.try_recv().unwrap());
            }
        }
        "push_pop/not_full/tokio_mpsc" => {
            let (tx, mut rx) = mpsc::channel(CAPACITY);
            let mut f = Some(frame());
            for _ in 0..n {
                tx.try_send(f.take().unwrap()).unwrap();
                f = black_box(rx.try_recv().ok());
            }
        }
        "push_pop/not_full/Mutex_VecDeque" => {
            // What the client's state costs before any of its accounting:
            // a lock per push and per pop around a queue.
            let ring = std::sync::Mutex::new(VecDeque::with_capacity(CAPACITY));
            let mut f = Some(frame());
            for _ in 0..n {
                ring.lock().unwrap().push_back(f.take().unwrap());
                f = black_box(ring.lock().unwrap().pop_front());
            }
        }
        "push_pop/not_full/crossbeam_ArrayQueue" => {
            let ring = ArrayQueue::new(CAPACITY);
            let mut f = Some(frame());
            for _ in 0..n {
                ring.push(f.take().unwrap()).unwrap();
                f = black_box(ring.pop());
            }
        }
        "push_pop/full/crossbeam_ArrayQueue" => {
            let ring = ArrayQueue::new(CAPACITY);
            for _ in 0..CAPACITY {
                ring.push(frame()).unwrap();
            }
            let mut f = Some(frame());
            for _ in 0..n {
                f = black_box(ring.force_push(f.take().unwrap()));
            }
        }
        "push_pop/full/ClientBuffer" => {
            let mut ring = ClientBuffer::new(BufferConfig::new(CAPACITY));
            for _ in 0..CAPACITY {
                ring.push(frame());
            }
            let mut f = Some(frame());
            for _ in 0..n {
                ring.push_with(f.take().unwrap(), FrameClass::Droppable, |old| {
                    f = Some(old)
                });
                black_box(&f);
            }
        }
        "push_pop/full/VecDeque" => {
            let mut ring: VecDeque<Bytes> = (0..CAPACITY).map(|_| frame()).collect();
            let mut f = Some(frame());
            for _ in 0..n {
                let old = ring.pop_front();
                ring.push_back(f.take().unwrap());
                f = black_box(old);
            }
        }
        "push_pop/full/tokio_broadcast" => {
            let (tx, _rx) = broadcast::channel(CAPACITY);
            let f = frame();
            for _ in 0..CAPACITY + n as usize {
                tx.send(f.clone()).unwrap();
            }
        }
        "push_pop/full/tokio_mpsc" => {
            let (tx, mut rx) = mpsc::channel(CAPACITY);
            for _ in 0..CAPACITY {
                tx.try_send(frame()).unwrap();
            }
            let mut f = Some(frame());
            for _ in 0..n {
                let old = rx.try_recv().ok();
                tx.try_send(f.take().unwrap()).unwrap();
                f = black_box(old);
            }
        }
        "body/unwrapped" => body(n, None),
        "body/passthrough" => body(n, Some("text/plain")),
        "body/buffered" => body(n, Some("text/event-stream")),
        "body/stalled" => stalled(n),
        "body/paced/unwrapped" => paced(n, false),
        "body/paced/buffered" => paced(n, true),
        "body/paced/drained" => paced_unread(n, false),
        "body/paced/stalled" => paced_unread(n, true),
        _ => panic!("unknown operation {op:?}"),
    }
}

fn events(
    n: u64,
) -> impl http_body::Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static {
    StreamBody::new(
        futures::stream::repeat(frame())
            .take(n as usize)
            .map(|data| Ok(Frame::data(data))),
    )
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

/// `n` frames drained by a spawned task, through the layer if
/// `content_type` is given (as the `body` bench does).
fn body(n: u64, content_type: Option<&'static str>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async move {
        match content_type {
            None => tokio::spawn(drain(events(n))).await.unwrap(),
            Some(content_type) => {
                let svc = Backpressure::new(
                    service_fn(move |_req: Request<()>| async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header(header::CONTENT_TYPE, content_type)
                                .body(events(n))
                                .unwrap(),
                        )
                    }),
                    BufferConfig::default(),
                );
                let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
                tokio::spawn(drain(body)).await.unwrap()
            }
        }
    });
    assert_eq!(got, n);
}

/// `inner` through the layer (served as `text/event-stream`), with
/// `config`: the body a client of the layer reads.
async fn layered<B>(inner: B, config: BufferConfig) -> tower_backpressure::BackpressureBody<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower_backpressure::BoxError>,
{
    let inner = std::sync::Mutex::new(Some(inner));
    let svc = Backpressure::new(
        service_fn(move |_req: Request<()>| {
            let body = inner.lock().unwrap().take().unwrap();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(header::CONTENT_TYPE, "text/event-stream")
                        .body(body)
                        .unwrap(),
                )
            }
        }),
        config,
    );
    svc.oneshot(Request::new(())).await.unwrap().into_body()
}

/// A client that keeps up with a paced producer: each frame is sent when
/// the reader has taken the one before (one frame in flight at a time, the
/// wake-ups of a live stream), through the layer if `layer`.
fn paced(n: u64, layer: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async move {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let (ack_tx, mut ack) = mpsc::channel::<()>(1);
        let inner = StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(|b| Ok::<_, Infallible>(Frame::data(b))),
        );
        let body: std::pin::Pin<
            Box<dyn http_body::Body<Data = Bytes, Error = tower_backpressure::BoxError> + Send>,
        > = if layer {
            Box::pin(layered(inner, BufferConfig::default()).await)
        } else {
            Box::pin(inner.map_err(|e: Infallible| match e {}))
        };
        let reading = tokio::spawn(async move {
            let mut body = body;
            let mut frames = 0u64;
            while let Some(frame) = body.frame().await {
                if frame.unwrap().is_data() {
                    frames += 1;
                    let _ = ack_tx.send(()).await;
                }
            }
            frames
        });
        let f = frame();
        for _ in 0..n {
            tx.send(f.clone()).await.unwrap();
            ack.recv().await.unwrap();
        }
        drop(tx);
        reading.await.unwrap()
    });
    assert_eq!(got, n);
}

/// A stalled client of a live stream (`layer`): nothing reads the body, and
/// each of `n` frames is sent when the pump has taken the one before (a
/// channel of one), so every frame costs the pump's wake-up and its push
/// into a full ring, dropping the oldest: what one more stalled client costs
/// per event. Without `layer`, the floor under it: a task takes each frame
/// from the same body and drops it.
fn paced_unread(n: u64, layer: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let inner = StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(|b| Ok::<_, Infallible>(Frame::data(b))),
        );
        let (draining, unread) = if layer {
            (None, Some(layered(inner, BufferConfig::new(64)).await))
        } else {
            (Some(tokio::spawn(drain(inner))), None)
        };
        let f = frame();
        // The first 128 fill the ring (setup, the same for N = 0).
        for _ in 0..128 + n {
            tx.send(f.clone()).await.unwrap();
        }
        match draining {
            Some(draining) => {
                drop(tx);
                assert_eq!(draining.await.unwrap(), n + 128);
            }
            None => {
                // The last frame taken: a permit is back once the pump took it.
                let _ = tx.reserve().await.unwrap();
                drop(unread);
            }
        }
    });
}

/// A stalled client: nothing takes frames, the pump pushes `n` frames into a
/// full ring, dropping the oldest.
fn stalled(n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pumped = Arc::new(AtomicBool::new(false));
    let flag = pumped.clone();
    rt.block_on(async move {
        let svc = Backpressure::new(
            service_fn(move |_req: Request<()>| {
                let flag = flag.clone();
                async move {
                    // `n` frames, then pending forever (an open SSE stream).
                    let frames = futures::stream::repeat(frame())
                        .take(n as usize)
                        .map(|data| Ok::<_, Infallible>(Frame::data(data)))
                        .chain(futures::stream::poll_fn(move |_| {
                            flag.store(true, Ordering::SeqCst);
                            Poll::Pending
                        }));
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(header::CONTENT_TYPE, "text/event-stream")
                            .body(StreamBody::new(frames))
                            .unwrap(),
                    )
                }
            }),
            BufferConfig::default(),
        );
        let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        while !pumped.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        drop(body);
    });
}

/// Instructions of one run of `op` with `n` iterations, under callgrind.
fn instructions(exe: &std::path::Path, op: &str, n: u64) -> Option<u64> {
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            "--collect-atstart=yes",
        ])
        .arg(exe)
        .args(["--op", op, &n.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "{op}: failed under valgrind: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    // "==PID== Collected : 123456"
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.split("Collected : ").nth(1))
        .and_then(|v| v.trim().parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Child mode: `--op NAME N`.
    if let [flag, op, n] = args.as_slice() {
        if flag == "--op" {
            run(op, n.parse().expect("a count"));
            return;
        }
    }
    // `cargo bench` passes `--bench` and maybe a filter.
    let filter = args.iter().find(|a| !a.starts_with("--"));
    let valgrind = Command::new("valgrind").arg("--version").output();
    if !valgrind.is_ok_and(|o| o.status.success()) {
        println!("callgrind: valgrind is not on the PATH; skipped");
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    println!("callgrind: instructions per iteration ((Ir(N) - Ir(0)) / N, N = {N})");
    println!();
    println!("| operation | what | instructions |");
    println!("|---|---|--:|");
    for (op, what) in OPS {
        if filter.is_some_and(|f| !op.contains(f.as_str())) {
            continue;
        }
        let per_op = instructions(&exe, op, 0)
            .zip(instructions(&exe, op, N))
            .map(|(base, full)| (full.saturating_sub(base)) as f64 / N as f64);
        match per_op {
            Some(ir) => println!("| {op} | {what} | {ir:.0} |"),
            None => println!("| {op} | {what} | (failed) |"),
        }
    }
}
