//! The examples as built binaries, driven from outside as a user would: each
//! server starts with `--addr 127.0.0.1:0`, prints its one `listening on`
//! line, serves a real client (HTTP/1.1, HTTP/2 with prior knowledge,
//! WebSocket, gRPC) with every documented value of every flag, and exits
//! with status 0 on SIGTERM, ending the streams still open; a value or a
//! combination it cannot honour makes it exit non-zero with a clear message.
//! `demo` (and `demo --hub`), `adaptive` and `loadgen` drive themselves:
//! they run briefly and must exit with status 0.
//!
//! An evicted client that never reads again must lose its connection: 20
//! such clients of `sse_server`, and of `ws_server` (a stall rule, and
//! `--policy disconnect`), are dropped from `/health/clients` and the server
//! closes all 20 connections (on Linux: it holds none of their sockets).
//!
//! The binaries are `cargo build --examples --all-features` next to this
//! test's own (`target/<profile>/examples/`); the test runs that build once,
//! which does nothing when `cargo test --all-features` has built them
//! already, and rebuilds them when only this test was built
//! (`cargo test --test examples`). Every wait is bounded, and every child is
//! killed if the test fails. Only loopback is used.

mod binaries;
mod common;
#[path = "../examples/grpc_server.rs"]
#[allow(dead_code, unreachable_pub)]
mod grpc_server;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use binaries::*;
use futures::StreamExt as _;
use http::{StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Reads a streaming body until `enough` says so, at most `limit` bytes.
/// Returns what was read.
async fn read_until(
    body: &mut Incoming,
    limit: usize,
    mut enough: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let mut data = Vec::new();
    while !enough(&data) {
        assert!(
            data.len() < limit,
            "read {limit} bytes without what was expected"
        );
        let frame = within(STEP, "the next frame", body.frame())
            .await
            .expect("the stream goes on")
            .expect("a frame");
        if let Ok(bytes) = frame.into_data() {
            data.extend_from_slice(&bytes);
        }
    }
    data
}

/// Reads a body to its end; an error (a reset stream) ends it too.
async fn read_to_end(body: &mut Incoming) {
    within(EXIT, "the stream to end", async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// Checks a stream of SSE items: ids strictly increase, payloads are `size`
/// bytes, a marker counts a gap exactly. Returns the number of events.
fn check_sse(items: &[Sse], size: usize) -> usize {
    let (mut last, mut announced, mut events) = (None::<u64>, 0, 0);
    for item in items {
        match *item {
            Sse::Lagged(n) => {
                assert!(n > 0);
                announced += n;
            }
            Sse::Event(id, len) => {
                assert_eq!(len, size, "every data: is --size bytes");
                if let Some(last) = last {
                    assert!(id > last, "ids strictly increase: {items:?}");
                    assert!(
                        announced == 0 || announced == id - last - 1,
                        "a marker counts its gap exactly: {items:?}"
                    );
                }
                last = Some(id);
                announced = 0;
                events += 1;
            }
        }
    }
    events
}

/// The JSON lines of an NDJSON stream: `{"seq":N,"payload":…}` or a marker.
fn ndjson(data: &[u8], size: usize) -> Vec<u64> {
    let text = std::str::from_utf8(data).unwrap();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut seqs = Vec::new();
    for line in complete.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        if json["type"] == "lagged" {
            assert!(json["dropped"].as_u64().unwrap() > 0);
            continue;
        }
        assert_eq!(json["payload"].as_str().unwrap().len(), size);
        seqs.push(json["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    seqs
}

/// The value of `--size` in `args` (default 256).
fn size_in(args: &str) -> usize {
    let args: Vec<&str> = args.split_whitespace().collect();
    args.iter()
        .position(|a| *a == "--size")
        .map_or(256, |i| args[i + 1].parse().unwrap())
}

// --- sse_server ---------------------------------------------------------------

/// Every documented value of every `sse_server` flag, a few per run.
const SSE_RUNS: &[&str] = &[
    "",
    "--rate 5000 --size 1 --capacity 1 --threshold 1",
    "--size 1024 --max-bytes 4096 --threshold 0.5 --gap-marker off",
    "--gap-marker on --policy drop-oldest --rate 20",
    "--policy drop-newest --capacity 10",
    "--policy pause",
    "--policy disconnect",
    "--evict-after-dropped 0 --evict-after-stall-ms 5000",
    "--evict-after-dropped 100000 --budget-bytes 65536",
    "--passthrough --rate 2000 --size 16",
    "--flush immediate --rate 5000",
    "--flush coalesce --rate 20000 --size 16",
    "--hub",
    "--hub --retain 100 --rate 5000 --size 1 --capacity 1 --threshold 1",
    "--hub --retain 20000 --size 1024 --max-bytes 4096 --threshold 0.5 --gap-marker off",
    "--hub --gap-marker on --policy drop-oldest --rate 20",
    "--hub --policy disconnect --evict-after-dropped 0 --evict-after-stall-ms 5000",
    "--hub --evict-after-dropped 100000 --budget-bytes 65536",
    "--hub --passthrough --rate 2000 --size 16",
    "--hub --flush immediate --rate 20000 --size 16",
    "--keep-alive-ms 0",
    "--hub --keep-alive-ms 250 --rate 20",
    "--passthrough --keep-alive-ms 15000",
];

/// SSE on HTTP/1.1, NDJSON on HTTP/2, `/health/clients`; SIGTERM ends both
/// streams and the server exits with status 0.
async fn drive_sse_server(args: &'static str) {
    let size = size_in(args);
    let server = start("sse_server", args).await;
    let addr = server.addr;

    let events = get_h1(addr, "/events").await;
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()[header::CONTENT_TYPE], "text/event-stream");
    assert!(events.headers().get(header::CONTENT_LENGTH).is_none());
    let mut events = events.into_body();
    let data = read_until(&mut events, 1 << 20, |d| {
        sse(d)
            .iter()
            .filter(|e| matches!(e, Sse::Event(..)))
            .count()
            >= 3
    })
    .await;
    assert!(check_sse(&sse(&data), size) >= 3);

    let lines = get_h2(addr, "/stream.ndjson").await;
    assert_eq!(lines.status(), StatusCode::OK);
    assert_eq!(lines.version(), http::Version::HTTP_2);
    assert_eq!(
        lines.headers()[header::CONTENT_TYPE],
        "application/x-ndjson"
    );
    let mut lines = lines.into_body();
    let data = read_until(&mut lines, 1 << 20, |d| ndjson(d, size).len() >= 3).await;
    assert!(ndjson(&data, size).len() >= 3);

    // Both streams are open: the registry lists them (the layer's clients;
    // there are none without it).
    let mut paths = listed(&health(addr).await);
    paths.sort();
    if args.contains("--passthrough") {
        assert_eq!(paths, Vec::<String>::new());
    } else {
        assert_eq!(paths, ["/events", "/stream.ndjson"], "{args:?}");
    }

    // SIGTERM ends the open streams, then the process.
    server.terminate().await;
    tokio::join!(read_to_end(&mut events), read_to_end(&mut lines));
    let name = format!("sse_server {args:?}");
    let stopped = server.wait().await;
    assert!(
        stopped.status.success(),
        "{name}: {:?}\n{}",
        stopped.status,
        stopped.stderr
    );
    assert!(stopped.stdout.is_empty(), "{name}: {:?}", stopped.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_serves_every_documented_flag_value() {
    futures::future::join_all(SSE_RUNS.iter().map(|args| drive_sse_server(args))).await;
}

/// A client that stalls with `--capacity 1` loses events: with
/// `--gap-marker on` (the default) it is told, with `off` it only sees a
/// jump in the ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_gap_marker_on_and_off() {
    async fn stall_then_read(marker: &'static str) -> Vec<Sse> {
        let args = format!("--rate 5000 --size 200 --capacity 1 --gap-marker {marker}");
        let server = start("sse_server", &args).await;
        let mut client = common::connect(server.addr, Some(4096)).await;
        let response = common::get(&mut client, "/events").await;
        let mut body = response.into_body();
        // Stall until the server says it dropped events for this client
        // (hyper's buffer and the sockets' are full).
        within(STEP, "the server to drop events", async {
            loop {
                let health = health(server.addr).await;
                let dropped = health["clients"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["dropped"].as_u64())
                    .sum::<u64>();
                if dropped > 0 {
                    return;
                }
            }
        })
        .await;
        let data = read_until(&mut body, 16 << 20, |d| {
            let items = sse(d);
            let ids: Vec<u64> = items
                .iter()
                .filter_map(|e| match e {
                    Sse::Event(id, _) => Some(*id),
                    Sse::Lagged(_) => None,
                })
                .collect();
            ids.windows(2).any(|w| w[1] > w[0] + 1)
        })
        .await;
        drop((body, client));
        server.stop_cleanly().await;
        sse(&data)
    }
    let (on, off) = tokio::join!(stall_then_read("on"), stall_then_read("off"));
    check_sse(&on, 200);
    check_sse(&off, 200);
    assert!(on.iter().any(|e| matches!(e, Sse::Lagged(_))), "{on:?}");
    assert!(!off.iter().any(|e| matches!(e, Sse::Lagged(_))), "{off:?}");
}

/// The SSE items of `body` until `enough` holds for them.
async fn read_sse_until(body: &mut Incoming, enough: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
    let data = read_until(body, 16 << 20, |d| enough(&sse(d))).await;
    sse(&data)
}

/// Waits until the server has published event `id`: a new client reads
/// until it sees it.
async fn published(addr: SocketAddr, id: u64) {
    let mut body = events_after(addr, None).await;
    read_sse_until(&mut body, |items| ids(items).last() >= Some(&id)).await;
}

/// Waits until `/health/clients` lists no client.
async fn no_clients(addr: SocketAddr) {
    within(STEP, "the clients to leave", async {
        while !listed(&health(addr).await).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// `--hub`: both routes carry the producer's sequence numbers (the same
/// event has the same id on both), and a client that reconnects with
/// `Last-Event-ID` gets every event after it that the hub retains (no gap,
/// no duplicate), or an exact gap marker, then the rest, when it asks for
/// more than the hub retains.
///
/// Deterministic whatever the machine's load: the first server retains
/// 100 s of events, far more than the test waits; the second retains 50 ms
/// of them, and once it has published 50 events after the one a client
/// resumes from, that event is gone for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_hub_resumes_after_last_event_id() {
    async fn within_retention() {
        let server = start("sse_server", "--hub --rate 1000 --size 16 --retain 100000").await;
        let addr = server.addr;
        // NDJSON, then SSE resumed from the second line's id: the same
        // events under the same ids.
        let lines = get_h2(addr, "/stream.ndjson").await;
        let mut lines = lines.into_body();
        let data = read_until(&mut lines, 16 << 20, |d| ndjson(d, 16).len() >= 300).await;
        let seqs = ndjson(&data, 16);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let mut events = events_after(addr, Some(seqs[0])).await;
        let items = read_sse_until(&mut events, |items| items.len() >= 299).await;
        assert_eq!(check_sse(&items, 16), items.len(), "no gap: {items:?}");
        assert_eq!(
            ids(&items)[..299],
            seqs[1..300],
            "the same ids on both routes"
        );
        drop((events, lines));

        // The client is gone, and the hub has published 20 more events:
        // every event after the last it saw, in order.
        let last = seqs[299];
        no_clients(addr).await;
        published(addr, last + 20).await;
        let mut resumed = events_after(addr, Some(last)).await;
        let items = read_sse_until(&mut resumed, |items| items.len() >= 20).await;
        let want: Vec<Sse> = (last + 1..)
            .take(items.len())
            .map(|id| Sse::Event(id, 16))
            .collect();
        assert_eq!(items, want, "resumed after {last}");
        drop(resumed);
        server.stop_cleanly().await;
    }

    async fn beyond_retention() {
        const RETAIN: u64 = 50;
        let server = start(
            "sse_server",
            &format!("--hub --rate 1000 --size 16 --retain {RETAIN}"),
        )
        .await;
        let addr = server.addr;
        let mut events = events_after(addr, None).await;
        let items = read_sse_until(&mut events, |items| items.len() >= 5).await;
        let last = *ids(&items).last().unwrap();
        drop(events);
        no_clients(addr).await;
        // The hub no longer holds `last + 1`: an exact gap marker, then
        // every event it still holds, in order.
        published(addr, last + RETAIN + 20).await;
        let mut resumed = events_after(addr, Some(last)).await;
        let items = read_sse_until(&mut resumed, |items| items.len() >= 20).await;
        let (Sse::Lagged(missed), Sse::Event(first, _)) = (&items[0], &items[1]) else {
            panic!("a gap marker, then an event: {items:?}");
        };
        // The hub retains the newest 50: `last + 21` at the oldest.
        assert!(*first > last + 20, "{items:?}");
        assert_eq!(
            *missed,
            first - last - 1,
            "the marker counts the gap: {items:?}"
        );
        let want: Vec<Sse> = (*first..)
            .take(items.len() - 1)
            .map(|id| Sse::Event(id, 16))
            .collect();
        assert_eq!(items[1..], want[..]);
        drop(resumed);
        server.stop_cleanly().await;
    }

    tokio::join!(within_retention(), beyond_retention());
}

/// Every `/events` response, in every mode, tells caches and proxies to
/// pass it on as it comes: `Cache-Control: no-cache` and
/// `X-Accel-Buffering: no` (nginx buffers a response otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_events_say_no_cache_and_no_proxy_buffering() {
    async fn headers(args: &'static str) {
        let server = start("sse_server", args).await;
        for events in [
            get_h1(server.addr, "/events").await,
            get_h2(server.addr, "/events").await,
        ] {
            assert_eq!(events.status(), StatusCode::OK, "{args:?}");
            let headers = events.headers();
            assert_eq!(
                headers[header::CONTENT_TYPE],
                "text/event-stream",
                "{args:?}"
            );
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{args:?}");
            assert_eq!(headers["x-accel-buffering"], "no", "{args:?}");
            assert_eq!(headers.get_all("x-accel-buffering").iter().count(), 1);
        }
        server.stop_cleanly().await;
    }
    tokio::join!(
        headers(""),
        headers("--hub"),
        headers("--passthrough"),
        headers("--hub --passthrough"),
    );
}

/// Reads `/events` until `n` events came; the comment lines among them.
async fn comments_among(addr: SocketAddr, n: usize) -> (Vec<u64>, usize) {
    let mut body = events_after(addr, None).await;
    let data = read_until(&mut body, 1 << 20, |d| ids(&sse(d)).len() >= n).await;
    let text = String::from_utf8(data.clone()).unwrap();
    let comments = text
        .split("\n\n")
        .filter(|block| !block.is_empty() && block.lines().all(|l| l.starts_with(':')))
        .count();
    (ids(&sse(&data)), comments)
}

/// `--keep-alive-ms MS`: at one event a second, a stream is quiet for
/// most of each second; with 200 ms it gets comment lines between the
/// events (which stay whole and in order), in every mode; with 0 it gets
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_keep_alive_comments_idle_streams() {
    async fn keep_alive(args: &'static str) {
        let server = start("sse_server", args).await;
        let (ids, comments) = comments_among(server.addr, 3).await;
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "{args:?}: {ids:?}"
        );
        if args.contains("--keep-alive-ms 0") {
            assert_eq!(comments, 0, "{args:?}");
        } else {
            // At least one in each of the two quiet seconds between the
            // three events.
            assert!(comments >= 2, "{args:?}: {comments} comments");
        }
        server.stop_cleanly().await;
    }
    tokio::join!(
        keep_alive("--rate 1 --keep-alive-ms 200"),
        keep_alive("--hub --rate 1 --keep-alive-ms 200"),
        keep_alive("--passthrough --rate 1 --keep-alive-ms 200"),
        keep_alive("--hub --passthrough --rate 1 --keep-alive-ms 200"),
        keep_alive("--rate 1 --keep-alive-ms 0"),
        keep_alive("--hub --rate 1 --keep-alive-ms 0"),
        keep_alive("--passthrough --rate 1 --keep-alive-ms 0"),
        keep_alive("--hub --passthrough --rate 1 --keep-alive-ms 0"),
    );
}

/// `--hub`: whatever a client sends as its `Last-Event-ID`, however
/// malformed, it gets a working stream (events in order) or a 400, and the
/// server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_hub_serves_any_last_event_id() {
    let server = start("sse_server", "--hub --rate 1000 --size 16 --retain 100").await;
    let addr = server.addr;
    let values: &[&[u8]] = &[
        b"",
        b" ",
        b"abc",
        b"-1",
        b"+1",
        b"0",
        b"0x10",
        b"1e3",
        b"1 2",
        b" 5 ",
        b"\t7",
        b"18446744073709551614",
        b"18446744073709551615",
        b"18446744073709551616",
        b"99999999999999999999999999999999999999",
        b"\xff\xfe",
        b"1\x80",
    ];
    for value in values {
        let value = http::HeaderValue::from_bytes(value).unwrap();
        let req = http::Request::get("/events").header("last-event-id", value.clone());
        let response = send_h1(addr, req).await;
        match response.status() {
            StatusCode::OK => {
                let mut body = response.into_body();
                let items = read_sse_until(&mut body, |items| ids(items).len() >= 3).await;
                let got = ids(&items);
                assert!(got.windows(2).all(|w| w[1] > w[0]), "{value:?}: {items:?}");
            }
            StatusCode::BAD_REQUEST => {}
            status => panic!("{value:?}: {status}"),
        }
    }
    // Still serving.
    let mut body = events_after(addr, None).await;
    read_sse_until(&mut body, |items| ids(items).len() >= 3).await;
    drop(body);
    server.stop_cleanly().await;
}

/// `--close-after 5`: every `/events` response ends after exactly 5 events,
/// with and without `--hub`; with `--hub`, a client that reconnects with
/// the last id it saw (as an `EventSource` does) continues right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_close_after_ends_each_response_after_n_events() {
    async fn five_and_done(args: &'static str) {
        let server = start("sse_server", args).await;
        let addr = server.addr;
        let mut last = None;
        for _ in 0..3 {
            let resume = if args.contains("--hub") { last } else { None };
            let body = events_after(addr, resume).await;
            let data = within(EXIT, "the response to end", body.collect())
                .await
                .expect("a clean end")
                .to_bytes();
            let items = sse(&data);
            let got = ids(&items);
            assert_eq!(items.len(), 5, "{args:?}: exactly 5 events: {items:?}");
            assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
            if let Some(last) = resume {
                assert_eq!(got[0], last + 1, "{args:?}: resumed right after {last}");
            }
            last = got.last().copied();
        }
        // The other route is not limited.
        let lines = get_h2(addr, "/stream.ndjson").await;
        let mut lines = lines.into_body();
        let data = read_until(&mut lines, 1 << 20, |d| ndjson(d, 256).len() >= 8).await;
        assert!(ndjson(&data, 256).len() >= 8);
        drop(lines);
        server.stop_cleanly().await;
    }
    tokio::join!(
        five_and_done("--close-after 5"),
        five_and_done("--hub --close-after 5"),
        five_and_done("--passthrough --close-after 5"),
        five_and_done("--hub --passthrough --close-after 5"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_refuses_what_it_cannot_honour() {
    let cases: &[(&str, &str)] = &[
        ("--gap-marker maybe", "--gap-marker"),
        ("--gap-marker", "--gap-marker"),
        ("--policy nope", "--policy"),
        ("--flush later", "--flush"),
        ("--capacity 0", "capacity"),
        ("--max-bytes 0", "max_bytes"),
        ("--threshold 0", "threshold"),
        ("--threshold 1.5", "threshold"),
        ("--rate 0", "--rate"),
        ("--rate 18446744073709551615", "--rate"),
        ("--size 0", "--size"),
        ("--size=-1", "--size"),
        ("--evict-after-stall-ms 0", "--evict-after-stall-ms"),
        ("--budget-bytes 0", "--budget-bytes"),
        ("--addr 127.0.0.1:99999", "cannot listen"),
        (
            "--hub --policy pause",
            "--policy pause cannot be used with --hub: invalid buffer config: \
             Overflow::Pause cannot bound a hub subscription",
        ),
        (
            "--hub --policy drop-newest",
            "--policy drop-newest cannot be used with --hub: invalid buffer config: \
             Overflow::DropNewest cannot bound a hub subscription",
        ),
        ("--retain 100", "--hub"),
        ("--hub --capacity 0", "invalid buffer config: capacity"),
        ("--hub --threshold 2", "threshold"),
        (
            "--hub --retain 0",
            "--retain: invalid hub config: retain_frames",
        ),
        ("--hub --retain nope", "--retain"),
        ("--hub --budget-bytes 0", "--budget-bytes"),
        ("--close-after 0", "--close-after"),
        ("--hub --close-after 0", "--close-after"),
    ];
    futures::future::join_all(
        cases
            .iter()
            .map(|(args, says)| refused("sse_server", args, says)),
    )
    .await;
}

/// `GET /events`, as a raw HTTP/1.1 request.
const SSE_REQUEST: &[u8] = b"GET /events HTTP/1.1\r\nhost: localhost\r\n\r\n";
/// `GET /ws` with a WebSocket upgrade, as a raw HTTP/1.1 request.
const WS_REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n\
connection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";

/// 20 clients of `example` that send `request` and never read again (after
/// the response's status line, `status`): once they are evicted they are
/// gone from `/health/clients`, and the server has closed all 20
/// connections (it holds none of their sockets; each client reads the rest,
/// then the end).
async fn evicted_clients_lose_their_connections(
    example: &str,
    args: &'static str,
    request: &[u8],
    status: &[u8],
) {
    const CLIENTS: usize = 20;
    let server = start(example, args).await;
    let addr = server.addr;
    #[cfg(target_os = "linux")]
    let before = server.sockets();

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = within(STEP, "a connection", socket.connect(addr))
            .await
            .unwrap();
        stream.write_all(request).await.unwrap();
        // The response headers (and whatever came with them), then never
        // another read until the end of the test.
        let mut head = vec![0u8; 1024];
        let n = within(STEP, "response headers", stream.read(&mut head))
            .await
            .unwrap();
        assert!(
            head[..n].starts_with(status),
            "{:?}",
            String::from_utf8_lossy(&head[..n])
        );
        clients.push(stream);
    }

    // Evicted: (Linux) the server holds none of their sockets any more...
    #[cfg(target_os = "linux")]
    {
        assert!(
            server.sockets() > before,
            "the server holds the clients' sockets"
        );
        within(
            Duration::from_secs(20),
            "the server to close the connections",
            async {
                while server.sockets() > before {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await;
    }
    // ... and the registry lists none of them.
    within(
        Duration::from_secs(20),
        "the registry to forget the clients",
        async {
            while !listed(&health(addr).await).is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;

    // Each client reads what the kernel still had for it, then the end of
    // the connection (or a reset).
    futures::future::join_all(clients.iter_mut().map(|stream| async move {
        within(STEP, "a closed connection to end", async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }))
    .await;
    server.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_closes_the_connections_of_evicted_clients() {
    tokio::join!(
        evicted_clients_lose_their_connections(
            "sse_server",
            "--rate 2000 --size 1024 --evict-after-stall-ms 300",
            SSE_REQUEST,
            b"HTTP/1.1 200 OK\r\n",
        ),
        evicted_clients_lose_their_connections(
            "sse_server",
            "--rate 2000 --size 1024 --capacity 100 --policy disconnect",
            SSE_REQUEST,
            b"HTTP/1.1 200 OK\r\n",
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_closes_the_connections_of_evicted_hub_clients() {
    tokio::join!(
        evicted_clients_lose_their_connections(
            "sse_server",
            "--hub --rate 2000 --size 1024 --evict-after-stall-ms 300",
            SSE_REQUEST,
            b"HTTP/1.1 200 OK\r\n",
        ),
        evicted_clients_lose_their_connections(
            "sse_server",
            "--hub --rate 2000 --size 1024 --capacity 100 --policy disconnect",
            SSE_REQUEST,
            b"HTTP/1.1 200 OK\r\n",
        ),
    );
}

// --- ws_server ----------------------------------------------------------------

const WS_RUNS: &[&str] = &[
    "",
    "--rate 2000 --size 16 --capacity 10 --max-bytes 4096 --threshold 0.5",
    "--size 0 --policy drop-newest --gap-marker off",
    "--policy pause --gap-marker on --evict-after-dropped 0",
    "--policy disconnect --evict-after-stall-ms 5000 --budget-bytes 65536",
    "--policy drop-oldest --evict-after-dropped 100000",
    "--hub",
    "--hub --retain 100 --capacity 16 --policy disconnect --gap-marker off",
];

/// A WebSocket client gets `{"seq":N,"payload":…}` messages; the registry
/// lists it; SIGTERM closes it with "going away" and the server exits 0.
async fn drive_ws_server(args: &'static str) {
    let size = size_in(args);
    let server = start("ws_server", args).await;
    let (mut ws, response) = within(
        STEP,
        "the WebSocket handshake",
        tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let message = within(STEP, "a message", ws.next())
            .await
            .expect("open")
            .unwrap();
        let Message::Text(text) = message else {
            panic!("a text message, got {message:?}");
        };
        let json: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        if json["type"] == "lagged" {
            continue;
        }
        assert_eq!(json["payload"].as_str().unwrap().len(), size);
        seqs.push(json["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(listed(&health(server.addr).await), ["/ws"]);

    server.terminate().await;
    // What is buffered, then a Close frame "going away".
    let close = within(EXIT, "the Close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("a Close frame, got {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    let _ = ws.close(None).await;
    let name = format!("ws_server {args:?}");
    let stopped = server.wait().await;
    assert!(
        stopped.status.success(),
        "{name}: {:?}\n{}",
        stopped.status,
        stopped.stderr
    );
    assert!(stopped.stdout.is_empty(), "{name}: {:?}", stopped.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_server_serves_every_documented_flag_value() {
    futures::future::join_all(WS_RUNS.iter().map(|args| drive_ws_server(args))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_server_refuses_what_it_cannot_honour() {
    let cases: &[(&str, &str)] = &[
        ("--capacity 0", "capacity"),
        ("--max-bytes 0", "max_bytes"),
        ("--threshold 2", "threshold"),
        ("--rate 0", "--rate"),
        ("--size 2000000", "--size"),
        ("--gap-marker maybe", "--gap-marker"),
        ("--gap-marker", "--gap-marker"),
        ("--policy nope", "--policy"),
        ("--evict-after-stall-ms 0", "--evict-after-stall-ms"),
        ("--budget-bytes 0", "--budget-bytes"),
        (
            "--hub --policy pause",
            "Overflow::Pause cannot bound a hub subscription",
        ),
        (
            "--hub --policy drop-newest",
            "Overflow::DropNewest cannot bound a hub",
        ),
        ("--hub --retain 0", "--retain"),
    ];
    futures::future::join_all(
        cases
            .iter()
            .map(|(args, says)| refused("ws_server", args, says)),
    )
    .await;
}

// --- grpc_server --------------------------------------------------------------

const GRPC_RUNS: &[&str] = &[
    "",
    "--data-loss",
    "--rate 2000 --size 16 --capacity 10 --max-bytes 4096 --threshold 0.5",
    "--hub",
    "--hub --retain 100 --data-loss --capacity 16",
];

/// A tonic client: a call for 3 ticks gets them in order and ends `OK`; an
/// endless call ends with `UNAVAILABLE` on SIGTERM and the server exits 0.
async fn drive_grpc_server(args: &'static str) {
    use grpc_server::{SUBSCRIBE_PATH, SubscribeRequest, Tick};
    use tonic::codegen::http::uri::PathAndQuery;

    let size = size_in(args);
    let server = start("grpc_server", args).await;
    let channel = within(
        STEP,
        "a gRPC connection",
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let subscribe = |count: u64| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            within(STEP, "the channel", grpc.ready()).await.unwrap();
            let codec = tonic_prost::ProstCodec::<SubscribeRequest, Tick>::default();
            let call = grpc.server_streaming(
                tonic::Request::new(SubscribeRequest { count }),
                PathAndQuery::from_static(SUBSCRIBE_PATH),
                codec,
            );
            within(STEP, "the call's headers", call)
                .await
                .unwrap()
                .into_inner()
        }
    };

    let mut three = subscribe(3).await;
    let mut seqs = Vec::new();
    while let Some(tick) = within(STEP, "a tick", three.message()).await.unwrap() {
        assert_eq!(tick.payload.len(), size);
        seqs.push(tick.seq);
    }
    assert_eq!(seqs.len(), 3, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    let mut endless = subscribe(0).await;
    within(STEP, "a tick", endless.message())
        .await
        .unwrap()
        .expect("a tick");
    server.terminate().await;
    let status = within(EXIT, "the call to end", async {
        loop {
            match endless.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await;
    if args.contains("--hub") {
        // A call served from the shared log ends with the server (the log
        // has no end of its own): any end will do.
        let _ = status;
    } else {
        assert_eq!(status, Some(tonic::Code::Unavailable), "{args:?}");
    }
    let name = format!("grpc_server {args:?}");
    let stopped = server.wait().await;
    assert!(
        stopped.status.success(),
        "{name}: {:?}\n{}",
        stopped.status,
        stopped.stderr
    );
    assert!(stopped.stdout.is_empty(), "{name}: {:?}", stopped.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_serves_every_documented_flag_value() {
    futures::future::join_all(GRPC_RUNS.iter().map(|args| drive_grpc_server(args))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_refuses_what_it_cannot_honour() {
    let cases: &[(&str, &str)] = &[
        ("--capacity 0", "capacity"),
        ("--max-bytes 0", "max_bytes"),
        ("--threshold 0", "threshold"),
        ("--rate 0", "--rate"),
        ("--data-loss yes", "yes"),
        ("--hub --retain 0", "--retain"),
    ];
    futures::future::join_all(
        cases
            .iter()
            .map(|(args, says)| refused("grpc_server", args, says)),
    )
    .await;
}

// --- The programs that drive themselves ---------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_adaptive_and_loadgen_run_briefly_and_succeed() {
    let limit = Duration::from_secs(30);
    // One at a time: the demos check that their fast client lost nothing,
    // which a debug build sharing two cores with four other busy programs
    // cannot promise. The flags' values leave the fast client a second of
    // slack.
    let demo = runs_to_success("demo", "--seconds 1", limit).await;
    let demo_flags =
        runs_to_success("demo", "--seconds 1 --rate 1000 --capacity 1000", limit).await;
    let adaptive = runs_to_success("adaptive", "--seconds 1 --rate 1000", limit).await;
    let loadgen = runs_to_success(
        "loadgen",
        "--fast 1 --slow 0,1 --seconds 1 --warmup 0 --runs 1 --variant layer --variant hub --variant drained --skip layer@0 --rate 2000 --capacity 100000 --json",
        limit,
    )
    .await;
    // Two runs: the p99 target is also shown run by run. `--pin` splits
    // the CPUs between the server and the load generator.
    let loadgen_runs = runs_to_success(
        "loadgen",
        "--fast 1 --slow 1 --seconds 1 --warmup 0 --runs 2 --variant layer --variant layer-no-slow --rate 2000 --pin",
        limit,
    )
    .await;
    assert!(
        demo.contains("fast") && demo_flags.contains("slow"),
        "{demo}"
    );
    // The first half of the CPUs for the server, the rest for the load
    // generator.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let list = |first: usize, last: usize| {
        if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        }
    };
    let split = format!(
        "server on CPUs {}, load generator on CPUs {} (--pin)",
        list(0, cpus / 2 - 1),
        list(cpus / 2, cpus - 1)
    );
    assert!(loadgen_runs.contains(&split), "{split:?} in {loadgen_runs}");
    let by_run = loadgen_runs
        .lines()
        .find(|l| l.trim_start().starts_with("run by run:"))
        .unwrap_or_else(|| panic!("a run-by-run line in {loadgen_runs}"));
    let (ratios, count) = by_run
        .trim_start()
        .trim_start_matches("run by run:")
        .split_once(" (")
        .expect("ratios, then the count");
    let ratios: Vec<f64> = ratios
        .split(", ")
        .map(|r| r.trim().parse().expect("a ratio"))
        .collect();
    assert_eq!(ratios.len(), 2, "{by_run}");
    assert!(ratios.iter().all(|r| *r > 0.0), "{by_run}");
    let within = ratios.iter().filter(|r| **r <= 1.2).count();
    assert_eq!(count, format!("{within} of 2 within 1.2)"), "{by_run}");
    // After the others: its per-client act is meant to load the machine,
    // and the fast clients above must keep up.
    let demo_hub = runs_to_success(
        "demo",
        "--hub --seconds 1 --stalled 50 --rate 1000 --capacity 512",
        limit,
    )
    .await;
    // Both acts, side by side, and the verdict.
    for what in [
        "act 1 of 2: the hub",
        "act 2 of 2: the per-client path",
        "50 stalled",
    ] {
        assert!(demo_hub.contains(what), "{what:?} in {demo_hub}");
    }
    assert!(demo_hub.contains("CPU of this process"), "{demo_hub}");
    assert!(demo_hub.contains("\nPASS"), "{demo_hub}");
    assert!(adaptive.contains("received"), "{adaptive}");
    let json: serde_json::Value =
        serde_json::from_str(loadgen.lines().last().expect("a JSON line")).unwrap();
    let variants = json["variants"].as_array().unwrap();
    // hub and drained at 0 and 1 slow clients, layer at 1 (skipped at 0).
    let runs: Vec<(&str, u64)> = variants
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["slow"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        runs,
        [
            ("hub", 0),
            ("drained", 0),
            ("layer", 1),
            ("hub", 1),
            ("drained", 1)
        ],
        "{json}"
    );
    // `drained` takes every event of its slow client and queues none (the
    // broadcast channel holds 100,000: a busy machine cannot make it lag).
    let drained = &variants[4];
    assert_eq!(drained["slow_dropped"].as_u64(), Some(0), "{json}");
    assert!(drained["peak_rss_bytes"].as_u64().unwrap() > 0, "{json}");
    for variant in variants {
        for key in "fast_events_per_sec fast_p50_ms fast_p99_ms producer_events_per_sec peak_rss_bytes cpu_s_per_million slow_dropped fast_dropped".split(' ')
        {
            assert!(variant[key].is_number(), "{key} in {json}");
        }
        assert!(
            variant["fast_events_per_sec"].as_f64().unwrap() > 0.0,
            "{json}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_adaptive_and_loadgen_refuse_bad_values() {
    async fn refused_at_once(name: &str, args: &str, says: &str) {
        // These programs take no `--addr`.
        let argv: Vec<&str> = args.split_whitespace().collect();
        refused_with(name, &argv, says).await;
    }
    tokio::join!(
        refused_at_once("demo", "--seconds 0", "--seconds"),
        refused_at_once("demo", "--capacity 0", "capacity"),
        refused_at_once("demo", "--stalled 10", "--hub"),
        refused_at_once("demo", "--hub --stalled 0", "--stalled"),
        refused_at_once("demo", "--hub --seconds 0", "--seconds"),
        refused_at_once("adaptive", "--seconds 0", "--seconds"),
        refused_at_once("adaptive", "--rate 5000000000", "--rate"),
        refused_at_once("loadgen", "--runs 0", "--runs"),
        refused_at_once("loadgen", "--variant nope", "--variant"),
        pin_needs_two_cpus(),
    );
}

/// `loadgen --pin` with one CPU has none to give the load generator: it
/// says so and runs nothing.
async fn pin_needs_two_cpus() {
    let output = Command::new("taskset")
        .args(["-c", "0"])
        .arg(example("loadgen"))
        .args(["--pin", "--seconds", "1", "--warmup", "0"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = within(STEP, "loadgen --pin on one CPU to refuse", output)
        .await
        .expect("taskset (util-linux) runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: --pin: needs at least 2 CPUs"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_server_closes_the_connections_of_evicted_clients() {
    tokio::join!(
        evicted_clients_lose_their_connections(
            "ws_server",
            "--rate 2000 --size 1024 --evict-after-stall-ms 300",
            WS_REQUEST,
            b"HTTP/1.1 101 Switching Protocols\r\n",
        ),
        evicted_clients_lose_their_connections(
            "ws_server",
            "--rate 2000 --size 1024 --capacity 100 --policy disconnect",
            WS_REQUEST,
            b"HTTP/1.1 101 Switching Protocols\r\n",
        ),
    );
}

/// SIGTERM with hundreds of open streams, half of them never reading, in
/// both modes: the server exits 0 (within the test's exit guard: the layer's
/// `Shutdown` ends every stream at the signal and cuts the stalled ones
/// after its grace), and every reading client sees a clean end after whole
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_server_ends_hundreds_of_open_streams_on_sigterm() {
    async fn run(args: &'static str) {
        const READERS: usize = 100;
        const STALLED: usize = 100;
        let server = start("sse_server", args).await;
        let addr = server.addr;
        let mut stalled = Vec::new();
        for _ in 0..STALLED {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut stream = within(STEP, "a connection", socket.connect(addr))
                .await
                .unwrap();
            stream.write_all(SSE_REQUEST).await.unwrap();
            stalled.push(stream);
        }
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let mut client = common::connect(addr, None).await;
            let response = common::get(&mut client, "/events").await;
            assert_eq!(response.status(), StatusCode::OK);
            let mut body = response.into_body();
            readers.push(tokio::spawn(async move {
                let _client = client;
                let mut data = Vec::new();
                loop {
                    match body.frame().await {
                        None => return Ok(data),
                        Some(Ok(frame)) => {
                            if let Ok(d) = frame.into_data() {
                                data.extend_from_slice(&d);
                            }
                        }
                        Some(Err(e)) => return Err(e.to_string()),
                    }
                }
            }));
        }
        // The stalled clients' buffers overflow: the server drops for them.
        // Bounded as a server's start is: a loaded machine may take a while
        // to fill a hundred sockets.
        within(
            STARTUP,
            "the server to drop events for the stalled clients",
            async {
                loop {
                    let health = health(addr).await;
                    let dropping = health["clients"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c["dropped"].as_u64().unwrap_or(0) > 0)
                        .count();
                    if dropping >= STALLED {
                        return;
                    }
                }
            },
        )
        .await;
        let signalled = std::time::Instant::now();
        server.stop_cleanly().await;
        eprintln!(
            "sse_server {args:?}: exit {:?} after SIGTERM with {READERS} reading and {STALLED} stalled streams",
            signalled.elapsed()
        );
        // Each reader's stream ends cleanly after whole events (a reader
        // that connected just before the signal may have had none yet).
        let mut events = 0;
        for reader in readers {
            let data = within(EXIT, "a reader's end", reader)
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{args:?}: a reader's stream failed: {e}"));
            assert!(
                data.is_empty() || data.ends_with(b"\n\n"),
                "{args:?}: whole events, then the end: {} bytes, ending {:?}",
                data.len(),
                String::from_utf8_lossy(&data[data.len().saturating_sub(60)..])
            );
            events += check_sse(&sse(&data), 8000);
        }
        assert!(events > 0, "{args:?}: the readers read events");
        drop(stalled);
    }
    // Few, large events and a small buffer: the stalled clients' sockets
    // and buffers fill within a second or so, at little CPU.
    tokio::join!(
        run("--rate 200 --size 8000 --capacity 8"),
        run("--hub --rate 200 --size 8000 --capacity 8")
    );
}
