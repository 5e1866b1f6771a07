//! Helpers shared by the tests of the scale-out buses (`tests/nats.rs`,
//! `tests/redis.rs`): a free port, a TCP proxy that can cut its
//! connections, the examples as processes, an SSE client that reads as
//! events come, and `/metrics`. Every wait is bounded.

use std::net::SocketAddr;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{EXIT, STEP, Sse, events_after, ids, sse, within};

/// A port free on 127.0.0.1 right now.
pub async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

// --- A TCP proxy that can cut its connections -------------------------------------

/// Forwards connections on 127.0.0.1 to `upstream`. [`cut`](Self::cut)
/// drops every connection and refuses new ones (closing them at once) until
/// [`restore`](Self::restore).
pub struct Proxy {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, watching) = watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*watching.borrow() {
                    continue; // dropped: closed at once
                }
                let mut open = watching.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = open.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Proxy { addr, open, task }
    }

    /// `scheme://ADDR`, e.g. `nats://127.0.0.1:PORT`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running example; killed on drop.
pub struct Process {
    pub name: String,
    pub child: Child,
    /// The first line it printed.
    pub line: String,
    pub stderr: JoinHandle<String>,
}

/// Starts the example `name` with `args`; waits for its first stdout line.
pub async fn spawn(name: &str, args: &[&str]) -> Process {
    let super::Spawned {
        child,
        first: line,
        mut rest,
        stderr,
    } = super::spawn(name, args).await;
    // Keep reading stdout: a full pipe would stall it.
    tokio::spawn(async move { while let Ok(Some(_)) = rest.next_line().await {} });
    Process {
        name: format!("{name} {}", args.join(" ")),
        child,
        line,
        stderr,
    }
}

impl Process {
    /// SIGTERM; it must exit with status 0. Returns its stderr.
    pub async fn stop_cleanly(mut self) -> String {
        let pid = self.child.id().expect("running").to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let status = within(EXIT, &format!("{} to exit", self.name), self.child.wait())
            .await
            .unwrap();
        let stderr = within(STEP, "stderr", &mut self.stderr).await.unwrap();
        assert!(
            status.success(),
            "{}: exit {status:?} after SIGTERM; stderr:\n{stderr}",
            self.name
        );
        stderr
    }
}

/// One client's SSE stream, read as it comes.
pub struct Client {
    body: Incoming,
    data: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, last: Option<u64>) -> Client {
        Client {
            body: events_after(addr, last).await,
            data: Vec::new(),
        }
    }

    /// Reads until `enough` holds for the items read so far; returns them.
    pub async fn until(&mut self, enough: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
        loop {
            let items = sse(&self.data);
            if enough(&items) {
                return items;
            }
            assert!(
                self.data.len() < 16 << 20,
                "16 MiB without what was expected"
            );
            let frame = within(STEP, "the next event", self.body.frame())
                .await
                .unwrap_or_else(|| {
                    let tail = items.len().saturating_sub(3);
                    panic!(
                        "the stream ended (did the server stop?) after {} events: … {:?}",
                        items.len(),
                        &items[tail..]
                    )
                })
                .expect("a frame");
            if let Ok(bytes) = frame.into_data() {
                self.data.extend_from_slice(&bytes);
            }
        }
    }

    /// Reads until `n` events have come.
    pub async fn events(&mut self, n: usize) -> Vec<Sse> {
        self.until(|items| ids(items).len() >= n).await
    }
}

/// Asserts that `ids` are consecutive.
pub fn consecutive(ids: &[u64], what: &str) {
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: ids with a gap or a duplicate: {ids:?}"
    );
}

/// `GET /metrics` from a server, as text.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = within(STEP, "connecting for /metrics", TcpStream::connect(addr))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    within(STEP, "/metrics", stream.read_to_string(&mut text))
        .await
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of the series `name` in the Prometheus text `metrics`, with
/// or without labels (`name 3`, `name{bus="redis"} 3`); `labels`, if not
/// empty, must be the series' labels exactly (`bus="redis"`).
pub fn metric(metrics: &str, name: &str, labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = if labels.is_empty() {
                rest.strip_prefix(' ')
                    .or_else(|| rest.strip_prefix('{')?.split_once("} ").map(|(_, v)| v))?
            } else {
                rest.strip_prefix('{')?
                    .strip_prefix(labels)?
                    .strip_prefix("} ")?
            };
            value.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("{name}{{{labels}}} in /metrics: {metrics}"))
}

/// Waits until `addr` accepts TCP connections (a server just started),
/// polling every 10 ms, for at most [`STARTUP`](super::STARTUP).
pub async fn accepting(addr: SocketAddr, what: &str) {
    within(
        super::STARTUP,
        &format!("{what} to accept connections"),
        async {
            for _ in 0..2_000 {
                if TcpStream::connect(addr).await.is_ok() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("{what} never accepted a connection on {addr}");
        },
    )
    .await;
}

/// Two servers `a` and `b` fed from one bus, each with a client that
/// connected before `publisher` starts (the future that starts it): both
/// clients get ids 0, 1, 2, … with no gap marker, the same on both, and a
/// client that moves A → B → A → B with `Last-Event-ID` continues right
/// after its last event each time. Returns the publisher.
pub async fn two_servers_agree_and_a_client_moves<P>(
    a: SocketAddr,
    b: SocketAddr,
    publisher: impl std::future::Future<Output = P>,
) -> P {
    let (mut on_a, mut on_b) = tokio::join!(Client::connect(a, None), Client::connect(b, None));
    let publisher = publisher.await;

    let (items_a, items_b) = tokio::join!(on_a.events(100), on_b.events(100));
    let (ids_a, ids_b) = (ids(&items_a), ids(&items_b));
    assert_eq!(
        ids_a[..100],
        (0..100).collect::<Vec<_>>()[..],
        "{items_a:?}"
    );
    assert_eq!(ids_a[..100], ids_b[..100], "the same ids on both servers");
    assert_eq!(items_a.len(), ids_a.len(), "no gap marker: {items_a:?}");

    // A → B, then B → A, each after reading a while.
    let mut last = *ids_a.last().unwrap();
    drop((on_a, on_b));
    for (to, name) in [(b, "B"), (a, "A"), (b, "B")] {
        let mut moved = Client::connect(to, Some(last)).await;
        let items = moved.events(40).await;
        let got = ids(&items);
        assert_eq!(
            items.len(),
            got.len(),
            "on {name}: no gap marker: {items:?}"
        );
        assert_eq!(got[0], last + 1, "on {name}: right after {last}");
        consecutive(&got, name);
        last = *got.last().unwrap();
    }
    publisher
}
