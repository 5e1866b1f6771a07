//! Scale-out over Redis Streams, with real processes: `redis-server`
//! (Debian's package `redis-server`; `scripts/test` installs it), the built
//! `redis_publisher` and `sse_server --hub --redis` binaries, and clients
//! over real HTTP on 127.0.0.1.
//!
//! - Two servers fed from one stream serve the same ids in the same order,
//!   and a client that moves between them with `Last-Event-ID` sees no gap
//!   and no duplicate.
//! - A server cut off from Redis (a TCP proxy in the test) reconnects and
//!   reads on after its last event: no gap while the stream still retains
//!   what it missed, ONE gap marker with the exact count when the stream
//!   was trimmed past it; `/metrics` counts the disconnect and reconnect.
//! - A server started later warms its hubs from the stream, and a client
//!   resumes on a server that started after it left, from ids older than
//!   that server's hub retains (served from the stream).
//! - Redis restarted under load, with its data (append-only file, fsync
//!   at every write) and without: with it, the client sees every id, in
//!   order; without it, the ids go on after the ones it saw (the publisher
//!   keeps its numbering), with at most one gap marker whose count is
//!   exactly the ids lost, and never a duplicate.
//! - Every flag of `redis_publisher` and the Redis flags of `sse_server`,
//!   refusals included; the library's `history`, `last_id` and `follow`
//!   against a real stream.
//!
//! Each test starts its own `redis-server` on a free loopback port and
//! kills it at the end (a guard with `Drop`). Every wait is bounded, on an
//! observable condition (a line, an event, a TCP connect), never a sleep
//! that hopes.
#![cfg(feature = "redis")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use bytes::Bytes;
use futures::StreamExt as _;
use redis::aio::MultiplexedConnection;
use tokio::process::{Child, Command};
use tower_backpressure::bus::{FeedStats, redis as bus_redis};

mod binaries;
use binaries::bus::{
    Client, Process, Proxy, accepting, consecutive, free_port, metric, scrape, spawn,
    two_servers_agree_and_a_client_moves,
};
use binaries::{STEP, Sse, ids, refused_with, within};

/// The publishers' rate: events per second.
const RATE: u64 = 200;
/// The bus series' label.
const BUS: &str = r#"bus="redis""#;

// --- redis-server ---------------------------------------------------------------

/// A running `redis-server` on 127.0.0.1; killed on drop, its directory
/// removed.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// Keeps its data across a restart (append-only file, fsync always).
    durable: bool,
}

impl Redis {
    /// Starts `redis-server` on a free loopback port, and waits until it
    /// answers. Its streams are kept in nodes of 10 entries, so that
    /// `MAXLEN ~ N` trims to within 10 of N.
    ///
    /// A port free when picked may be taken before `redis-server` binds it
    /// (tests run in parallel): it is ours only if the server there says
    /// its directory is ours; else another port, 5 tries at most.
    async fn start(durable: bool) -> Redis {
        for _ in 0..5 {
            let port = free_port().await;
            let dir = std::env::temp_dir().join(format!("tb-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let child = Self::spawn(port, &dir, durable);
            let mut redis = Redis {
                child,
                port,
                dir,
                durable,
            };
            if redis.answers().await {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Waits until this `redis-server` answers on its port: `true`, or
    /// `false` if it exited first, or another server answers there.
    async fn answers(&mut self) -> bool {
        accepting(self.addr(), "redis-server").await;
        let dir = std::fs::canonicalize(&self.dir).unwrap();
        let client = redis::Client::open(self.url()).unwrap();
        within(STEP, "redis-server to answer", async {
            for _ in 0..1_000 {
                if self.child.try_wait().unwrap().is_some() {
                    return false;
                }
                let answer: redis::RedisResult<(String, String)> = async {
                    let mut connection = bus_redis::connect(&client).await?;
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg("dir")
                        .query_async(&mut connection)
                        .await
                }
                .await;
                match answer {
                    Ok((_, there)) => return std::path::Path::new(&there) == dir,
                    // `LOADING`: reading its data back.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
            false
        })
        .await
    }

    fn spawn(port: u16, dir: &std::path::Path, durable: bool) -> Child {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--stream-node-max-entries", "10"])
            .arg("--dir")
            .arg(dir);
        if durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): these tests need it on PATH \
                     (Debian's package redis-server; scripts/test installs it)"
                )
            })
    }

    /// Kills it (SIGKILL: no shutdown save) and starts it again on the
    /// same port and directory; waits until it accepts connections.
    async fn restart(&mut self) {
        self.child.start_kill().unwrap();
        within(STEP, "redis-server to die", self.child.wait())
            .await
            .unwrap();
        self.child = Self::spawn(self.port, &self.dir, self.durable);
        assert!(
            self.answers().await,
            "redis-server did not start again on port {}",
            self.port
        );
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// A connection of the library's.
    async fn connect(&self) -> MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        within(STEP, "connecting to Redis", bus_redis::connect(&client))
            .await
            .expect("connected")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- The examples -----------------------------------------------------------------

/// `sse_server --hub --redis URL` and `extra`; returns it and its address.
async fn server(url: &str, extra: &[&str]) -> (Process, SocketAddr) {
    let mut args = vec!["--addr", "127.0.0.1:0", "--hub", "--redis", url];
    args.extend_from_slice(extra);
    let p = spawn("sse_server", &args).await;
    let addr = p
        .line
        .strip_prefix("listening on http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a listening line: {:?}", p.line));
    (p, addr)
}

/// `redis_publisher --redis URL` and `extra`, with `--rate RATE` and
/// `--size 16` unless `extra` sets them.
async fn publisher(url: &str, extra: &[&str]) -> Process {
    let rate = RATE.to_string();
    let mut args = vec!["--redis", url];
    for (flag, value) in [("--rate", rate.as_str()), ("--size", "16")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let stream = args
        .iter()
        .position(|a| *a == "--stream")
        .map_or("ticks", |i| args[i + 1]);
    let want = format!("publishing to {url} stream {stream}");
    let p = spawn("redis_publisher", &args).await;
    assert_eq!(p.line, want);
    p
}

/// The gap markers among `items`: `(id before, count, id after)` each.
fn gaps(items: &[Sse]) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for i in 0..items.len() {
        if let Sse::Lagged(n) = items[i] {
            let (Some(Sse::Event(before, _)), Some(Sse::Event(after, _))) =
                (i.checked_sub(1).map(|j| &items[j]), items.get(i + 1))
            else {
                panic!("a marker between two events: {items:?}");
            };
            out.push((*before, n, *after));
        }
    }
    out
}

/// Every id of `items` is greater than the one before it, and each jump
/// is announced by a marker of exactly the ids skipped.
fn exact(items: &[Sse], what: &str) {
    let got = ids(items);
    assert!(
        got.windows(2).all(|w| w[1] > w[0]),
        "{what}: ids not increasing (a duplicate or a step back): {got:?}"
    );
    let marked: Vec<(u64, u64, u64)> = gaps(items);
    for (before, n, after) in &marked {
        assert_eq!(*n, after - before - 1, "{what}: the marker counts the gap");
    }
    let jumps = got.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert_eq!(jumps, marked.len(), "{what}: every jump marked: {items:?}");
}

// --- The tests --------------------------------------------------------------------

/// Two servers fed from one stream: clients on both get the same ids in
/// the same order (0, 1, 2, …: both were following before the publisher
/// started), and a client that moves from one server to the other with
/// `Last-Event-ID` continues right after its last event, each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_serve_the_same_ids_and_a_client_moves_between_them() {
    let redis = Redis::start(false).await;
    let url = redis.url();
    let ((one, a), (two, b)) = tokio::join!(server(&url, &[]), server(&url, &[]));
    let publisher = two_servers_agree_and_a_client_moves(a, b, publisher(&url, &[])).await;

    publisher.stop_cleanly().await;
    tokio::join!(one.stop_cleanly(), two.stop_cleanly());
    drop(redis);
}

/// A server whose connection to Redis goes through a proxy that drops it
/// and refuses reconnects for a while (B, connected directly, gets 100
/// events meanwhile). The stream retains only about 20 events, so what A
/// missed is gone by the time it reconnects: its client gets ONE gap
/// marker with exactly the ids skipped, which B's client received; A's
/// `/metrics` counts the disconnect, the reconnect and the ids missed, and
/// its log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cut_off_from_redis_announces_one_exact_gap() {
    let redis = Redis::start(false).await;
    let proxy = Proxy::start(redis.addr()).await;
    let (via_proxy, direct) = (proxy.url("redis"), redis.url());
    let ((cut, a), (whole, b)) = tokio::join!(server(&via_proxy, &[]), server(&direct, &[]));
    let (mut on_a, mut on_b) = tokio::join!(Client::connect(a, None), Client::connect(b, None));
    let publisher = publisher(&redis.url(), &["--retain", "20"]).await;
    on_a.events(20).await;

    proxy.cut();
    let seen = ids(&on_a.events(20).await).len();
    on_b.events(seen + 100).await;
    proxy.restore();

    let items = on_a
        .until(|items| {
            let lagged = items.iter().position(|e| matches!(e, Sse::Lagged(_)));
            lagged.is_some_and(|i| items.len() > i + 20)
        })
        .await;
    exact(&items, "A");
    let marked = gaps(&items);
    assert_eq!(marked.len(), 1, "one gap marker: {items:?}");
    let (before, n, after) = marked[0];
    assert!(n > 0);
    // B got every one of the ids A missed.
    let got_b = ids(&on_b.until(|items| ids(items).last() >= Some(&after)).await);
    consecutive(&got_b, "B");
    assert!(got_b.contains(&(before + 1)) && got_b.contains(&(after - 1)));

    let metrics = scrape(a).await;
    let value = |name: &str| metric(&metrics, name, BUS);
    assert_eq!(
        value("backpressure_bus_frames_missed_total"),
        n,
        "{metrics}"
    );
    assert_eq!(value("backpressure_bus_disconnects_total"), 1, "{metrics}");
    assert_eq!(value("backpressure_bus_reconnects_total"), 1, "{metrics}");
    assert_eq!(value("backpressure_bus_connected"), 1, "{metrics}");
    assert!(value("backpressure_bus_frames_fed_total") > 40, "{metrics}");
    for name in [
        "backpressure_bus_duplicates_total",
        "backpressure_bus_invalid_total",
        "backpressure_bus_outliers_total",
        "backpressure_bus_epochs_total",
    ] {
        assert_eq!(value(name), 0, "{name}: {metrics}");
    }

    publisher.stop_cleanly().await;
    drop((on_a, on_b));
    let (log, _) = tokio::join!(cut.stop_cleanly(), whole.stop_cleanly());
    assert!(log.contains("disconnected from Redis"), "{log}");
    assert!(log.contains("connected to Redis reconnects=1"), "{log}");
}

/// The same cut, with a stream that still retains what the server
/// missed: it reads on after the last event it took, and its client sees
/// every id, without a gap marker; nothing counted as missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_resumes_after_the_last_event_without_a_gap() {
    let redis = Redis::start(false).await;
    let proxy = Proxy::start(redis.addr()).await;
    let (cut, a) = server(&proxy.url("redis"), &[]).await;
    let mut on_a = Client::connect(a, None).await;
    let publisher = publisher(&redis.url(), &["--retain", "10000"]).await;
    on_a.events(20).await;

    proxy.cut();
    // The outage is seen (the gauge falls), and lasts 100 events.
    let mut watch = redis.connect().await;
    within(STEP, "the server to see the outage", async {
        loop {
            let metrics = scrape(a).await;
            if metric(&metrics, "backpressure_bus_connected", BUS) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let outage_starts = bus_redis::last_id(&mut watch, "ticks")
        .await
        .unwrap()
        .unwrap();
    within(STEP, "100 more events in the stream", async {
        while bus_redis::last_id(&mut watch, "ticks").await.unwrap() < Some(outage_starts + 100) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    proxy.restore();

    let items = on_a
        .until(|items| ids(items).last() >= Some(&(outage_starts + 150)))
        .await;
    let got = ids(&items);
    assert_eq!(items.len(), got.len(), "no gap marker: {items:?}");
    assert_eq!(got[0], 0);
    consecutive(&got, "A");
    let metrics = scrape(a).await;
    let value = |name: &str| metric(&metrics, name, BUS);
    assert_eq!(
        value("backpressure_bus_frames_missed_total"),
        0,
        "{metrics}"
    );
    assert_eq!(value("backpressure_bus_disconnects_total"), 1, "{metrics}");
    assert_eq!(value("backpressure_bus_reconnects_total"), 1, "{metrics}");
    assert_eq!(value("backpressure_bus_duplicates_total"), 0, "{metrics}");

    publisher.stop_cleanly().await;
    drop(on_a);
    cut.stop_cleanly().await;
}

/// A client leaves server A; server B starts afterwards, retaining only
/// 20 events in its hub; once B's hub no longer holds the events after
/// the client's last, the client resumes on B with `Last-Event-ID` and
/// gets every event after it, in order, without a gap marker (the older
/// ones from the stream, then B's hub's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_a_server_started_after_it_left() {
    let redis = Redis::start(false).await;
    let url = redis.url();
    let publisher = publisher(&url, &["--retain", "5000"]).await;
    let (a_server, a) = server(&url, &[]).await;
    let mut on_a = Client::connect(a, None).await;
    let got = ids(&on_a.events(10).await);
    consecutive(&got, "A");
    let last = *got.last().unwrap();
    drop(on_a);

    let (b_server, b) = server(&url, &["--retain", "20"]).await;
    let mut watcher = Client::connect(b, None).await;
    watcher
        .until(|items| ids(items).last() >= Some(&(last + 40)))
        .await;
    drop(watcher);

    let mut resumed = Client::connect(b, Some(last)).await;
    let items = resumed.events(80).await;
    let got = ids(&items);
    assert_eq!(items.len(), got.len(), "no gap marker: {items:?}");
    assert_eq!(got[0], last + 1, "right after {last}");
    consecutive(&got, "resumed on B");
    drop(resumed);

    publisher.stop_cleanly().await;
    tokio::join!(a_server.stop_cleanly(), b_server.stop_cleanly());
}

/// A server started while the stream already holds events warms both
/// hubs from it: it publishes, under their ids and in order, the events
/// added before it started (its SSE hub's oldest is 0), with no
/// duplicate, gap or invalid entry counted; a client that resumes from 0
/// gets 1, 2, … from the hub alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_later_starts_warm() {
    let redis = Redis::start(false).await;
    let url = redis.url();
    let publisher = publisher(&url, &[]).await;
    let mut connection = redis.connect().await;
    within(STEP, "20 events in the stream", async {
        while bus_redis::last_id(&mut connection, "ticks").await.unwrap() < Some(20) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let (server, addr) = server(&url, &[]).await;
    let hubs = within(STEP, "the hubs to hold 20 events", async {
        loop {
            let body = binaries::get_ok(addr, "/health/hub", "application/json").await;
            let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let hubs = health["hubs"].as_array().unwrap().clone();
            if hubs.iter().all(|h| h["newest_id"].as_u64() >= Some(20)) {
                return hubs;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    for hub in &hubs {
        assert_eq!(hub["oldest_id"], 0, "{hub}");
        assert_eq!(
            hub["published"].as_u64(),
            hub["newest_id"].as_u64().map(|n| n + 1),
            "every id once: {hub}"
        );
    }
    let mut resumed = Client::connect(addr, Some(0)).await;
    let items = resumed.events(30).await;
    let got = ids(&items);
    assert_eq!(items.len(), got.len(), "no gap marker: {items:?}");
    assert_eq!(got[..30], (1..=30).collect::<Vec<_>>()[..]);
    let metrics = scrape(addr).await;
    for name in [
        "backpressure_bus_frames_missed_total",
        "backpressure_bus_duplicates_total",
        "backpressure_bus_invalid_total",
    ] {
        assert_eq!(metric(&metrics, name, BUS), 0, "{name}: {metrics}");
    }
    drop(resumed);
    publisher.stop_cleanly().await;
    server.stop_cleanly().await;
}

/// A server and a publisher on one Redis, a client reading; Redis killed
/// and restarted (`keep_data`: with its append-only file) after 50 events,
/// and what the client read until 200 ids past them.
struct Restarted {
    redis: Redis,
    server: Process,
    addr: SocketAddr,
    client: Client,
    publisher: Process,
    /// The last id read before the restart.
    before: u64,
    items: Vec<Sse>,
}

impl Restarted {
    async fn under_load(keep_data: bool) -> Restarted {
        let mut redis = Redis::start(keep_data).await;
        let url = redis.url();
        let (server, addr) = server(&url, &[]).await;
        let mut client = Client::connect(addr, None).await;
        let publisher = publisher(&url, &[]).await;
        let before = ids(&client.events(50).await).last().copied().unwrap();

        redis.restart().await;
        let items = client
            .until(|items| ids(items).last() >= Some(&(before + 200)))
            .await;
        Restarted {
            redis,
            server,
            addr,
            client,
            publisher,
            before,
            items,
        }
    }
}

/// Redis killed and restarted under load (the publisher and a server keep
/// running) with its data kept: the append-only file has every entry it
/// acknowledged, the publisher adds the events due during the outage once
/// it is back, and the server reads on after its last: the client sees
/// every id, in order, without a gap marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_loses_nothing() {
    let Restarted {
        redis: _redis,
        server,
        addr,
        client,
        publisher,
        before: _,
        items,
    } = Restarted::under_load(true).await;
    let got = ids(&items);
    assert_eq!(items.len(), got.len(), "no gap marker: {items:?}");
    assert_eq!(got[0], 0);
    consecutive(&got, "across the restart");
    let metrics = scrape(addr).await;
    assert!(
        metric(&metrics, "backpressure_bus_reconnects_total", BUS) >= 1,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "backpressure_bus_epochs_total", BUS),
        0,
        "{metrics}"
    );

    publisher.stop_cleanly().await;
    drop(client);
    server.stop_cleanly().await;
}

/// The same restart with its data lost (no snapshot, no append-only
/// file): the stream is gone. What "exact" means then: the publisher goes
/// on with its own ids (it does not start again at 0), the server reads
/// the new stream from its start, and the client sees ids that only
/// increase, never one twice, and at most one gap marker whose count is
/// exactly the ids lost (those added before the crash that the server had
/// not read yet; often none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_without_its_data_is_one_exact_gap_at_most() {
    let Restarted {
        redis,
        server,
        addr,
        client,
        publisher,
        before,
        items,
    } = Restarted::under_load(false).await;
    exact(&items, "across the restart");
    assert!(gaps(&items).len() <= 1, "at most one gap marker: {items:?}");
    assert_eq!(ids(&items)[0], 0);
    // The new stream holds the publisher's ids, after the old ones.
    let mut connection = redis.connect().await;
    let first = bus_redis::history(&mut connection, "ticks", 0, u64::MAX, 1)
        .await
        .unwrap();
    assert!(first[0].0 > before, "{first:?} after {before}");
    let metrics = scrape(addr).await;
    let value = |name: &str| metric(&metrics, name, BUS);
    assert!(value("backpressure_bus_reconnects_total") >= 1, "{metrics}");
    let missed: u64 = gaps(&items).iter().map(|(_, n, _)| n).sum();
    assert_eq!(
        value("backpressure_bus_frames_missed_total"),
        missed,
        "{metrics}"
    );
    assert_eq!(value("backpressure_bus_epochs_total"), 0, "{metrics}");

    publisher.stop_cleanly().await;
    drop(client);
    server.stop_cleanly().await;
}

/// `redis_publisher`'s flags: `--stream` (a server on the same key gets
/// its events), `--size` (the `data:` length), `--retain` (the stream
/// trimmed to about N), `--rate`; a publisher started again continues
/// after the stream's newest id; SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publisher_flags_do_what_they_say() {
    let redis = Redis::start(false).await;
    let url = redis.url();
    let (server, addr) = server(&url, &["--stream", "other"]).await;
    let mut client = Client::connect(addr, None).await;
    let first = publisher(
        &url,
        &[
            "--stream", "other", "--size", "7", "--retain", "50", "--rate", "1000",
        ],
    )
    .await;
    let items = client.events(300).await;
    consecutive(&ids(&items), "on stream other");
    assert!(
        items.iter().all(|e| matches!(e, Sse::Event(_, 7))),
        "7 bytes of data each: {items:?}"
    );
    first.stop_cleanly().await;

    let mut connection = redis.connect().await;
    let last = bus_redis::last_id(&mut connection, "other")
        .await
        .unwrap()
        .expect("events");
    assert!(last >= 299);
    // `MAXLEN ~ 50` with nodes of 10: at least 50, at most 60.
    let len: usize = redis::cmd("XLEN")
        .arg("other")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!((50..=60).contains(&len), "XLEN {len}");
    // Nothing on the default key.
    assert_eq!(
        bus_redis::last_id(&mut connection, "ticks").await.unwrap(),
        None
    );

    // Started again: the ids go on after the newest.
    let again = publisher(&url, &["--stream", "other"]).await;
    let items = client
        .until(|items| ids(items).last() >= Some(&(last + 20)))
        .await;
    let got = ids(&items);
    assert_eq!(items.len(), got.len(), "no gap marker: {items:?}");
    consecutive(&got, "across the publisher's restart");
    again.stop_cleanly().await;
    drop(client);
    server.stop_cleanly().await;
}

/// The Redis flags' contracts: `--redis` needs `--hub` and cannot be used
/// with `--nats`, `--stream` needs `--redis`, an unreachable Redis or a
/// key that is not a stream is a clear error and a non-zero exit (server
/// and publisher alike), and the publisher's numbers are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flags_are_refused_when_they_cannot_be_honoured() {
    let closed = format!("redis://127.0.0.1:{}", free_port().await);
    let redis = Redis::start(false).await;
    let url = redis.url();
    let mut connection = redis.connect().await;
    let _: () = redis::cmd("SET")
        .arg("text")
        .arg("not a stream")
        .query_async(&mut connection)
        .await
        .unwrap();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("sse_server", vec!["--redis", &url], "--hub"),
        (
            "sse_server",
            vec!["--hub", "--redis", &url, "--nats", "nats://127.0.0.1:1"],
            "cannot be used with",
        ),
        ("sse_server", vec!["--hub", "--stream", "x"], "--redis"),
        (
            "sse_server",
            vec!["--hub", "--redis", &closed],
            "cannot connect to Redis",
        ),
        (
            "sse_server",
            vec!["--hub", "--redis", "not-a-url"],
            "cannot connect to Redis",
        ),
        (
            "sse_server",
            vec!["--hub", "--redis", &url, "--stream", "text"],
            "cannot read the Redis stream",
        ),
        (
            "redis_publisher",
            vec!["--redis", &closed],
            "cannot connect to Redis",
        ),
        (
            "redis_publisher",
            vec!["--redis", &url, "--stream", "text"],
            "cannot read the stream",
        ),
        ("redis_publisher", vec!["--rate", "0"], "--rate"),
        ("redis_publisher", vec!["--size", "0"], "--size"),
        ("redis_publisher", vec!["--retain", "0"], "--retain"),
        ("redis_publisher", vec!["--retain", "x"], "--retain"),
    ];
    for (name, args, says) in cases {
        let addr = ["--addr", "127.0.0.1:0"];
        let argv: Vec<&str> = addr
            .iter()
            .filter(|_| name == "sse_server")
            .copied()
            .chain(args.iter().copied())
            .collect();
        refused_with(name, &argv, says).await;
    }
}

// --- The library against a real stream ----------------------------------------------

/// `(id, data)` for `ids`, each data the id in decimal.
fn expected(ids: impl IntoIterator<Item = u64>) -> Vec<(u64, Bytes)> {
    ids.into_iter()
        .map(|id| (id, Bytes::from(id.to_string())))
        .collect()
}

/// `history` is one `XRANGE` from the client's id up to the hub's oldest
/// (exclusive), at most `max`, without entries of another format; `follow`
/// reads what the stream retains, then the new entries, and counts the
/// other entries as invalid; `last_id` is the newest entry's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_follow_and_last_id_on_a_real_stream() {
    let redis = Redis::start(false).await;
    let mut c = redis.connect().await;
    assert_eq!(bus_redis::last_id(&mut c, "s").await.unwrap(), None);
    assert_eq!(
        bus_redis::history(&mut c, "s", 0, 10, 10).await.unwrap(),
        expected([])
    );
    for id in 0..=4 {
        bus_redis::add(&mut c, "s", id, id.to_string().as_bytes(), None)
            .await
            .unwrap();
    }
    // Not events of `add`: another sequence number; no `data` field.
    let _: String = redis::cmd("XADD")
        .arg("s")
        .arg("5-2")
        .arg("data")
        .arg("5")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("s")
        .arg("6-1")
        .arg("other")
        .arg("6")
        .query_async(&mut c)
        .await
        .unwrap();
    for id in 7..=9 {
        bus_redis::add(&mut c, "s", id, id.to_string().as_bytes(), Some(1_000))
            .await
            .unwrap();
    }
    // An id not after the newest is refused by Redis.
    assert!(
        bus_redis::add(&mut c, "s", 9, b"again", None)
            .await
            .is_err()
    );
    assert_eq!(bus_redis::last_id(&mut c, "s").await.unwrap(), Some(9));

    let history = |after, before, max| {
        let mut c = c.clone();
        async move {
            bus_redis::history(&mut c, "s", after, before, max)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        history(1, u64::MAX, 100).await,
        expected([2, 3, 4, 7, 8, 9])
    );
    assert_eq!(history(1, 8, 100).await, expected([2, 3, 4, 7]));
    assert_eq!(history(0, u64::MAX, 2).await, expected([1, 2]));
    assert_eq!(history(9, u64::MAX, 100).await, expected([]));
    assert_eq!(history(3, 4, 100).await, expected([]));

    let stats = FeedStats::new();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut all = Box::pin(bus_redis::follow(client.clone(), "s", None, stats.clone()));
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(within(STEP, "an event", all.next()).await.unwrap());
    }
    assert_eq!(got, expected([0, 1, 2, 3, 4, 7, 8, 9]));
    assert_eq!(
        (stats.invalid(), stats.reconnects(), stats.is_connected()),
        (2, 0, true)
    );
    // Then the live ones, from the same cursor.
    bus_redis::add(&mut c, "s", 10, b"10", None).await.unwrap();
    let live = within(STEP, "a live event", all.next()).await.unwrap();
    assert_eq!(live, (10, Bytes::from("10")));
    // After an id: only what follows it.
    let mut after = Box::pin(bus_redis::follow(client, "s", Some(8), FeedStats::new()));
    let next = within(STEP, "an event", after.next()).await.unwrap();
    assert_eq!(next, (9, Bytes::from("9")));
}
