//! `sse_server`'s `GET /dashboard` in a real browser: the built server (the
//! per-client path, and `--hub`) with three real SSE clients, two that read
//! and one stalled, and headless Chromium, which loads the page, lets its
//! script fetch `/health/clients` and `/health/hub` and draw, and dumps the
//! DOM. The DOM must have a row for every client `/health/clients` lists
//! (by id), and with `--hub` a row for each hub.
//!
//! The test needs Chromium (`/usr/bin/chromium`, or the path in
//! `$CHROMIUM`); without it the test fails and says how to install it
//! (Debian: `apt-get install -y --no-install-recommends chromium`).
//!
//! `cargo test --all-features --test dashboard -- --ignored` also takes the
//! README's screenshot, `docs/dashboard.png`, of a server with a handful of
//! clients, some slow.
//!
//! Every wait is bounded; the server and the browser are killed if the test
//! fails. Only loopback is used.

mod binaries;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use binaries::*;
use tokio::io::AsyncReadExt as _;
use tokio::process::Command;
use tokio::task::JoinHandle;

/// How long Chromium gets to load the page, run it and exit.
const BROWSER: Duration = Duration::from_secs(60);
/// How long the clients get to show up in `/health/clients`, or to drop.
const SETTLE: Duration = Duration::from_secs(30);

/// Chromium: `$CHROMIUM`, else `/usr/bin/chromium`. Fails, saying how to
/// install it, if it is not there.
fn chromium() -> PathBuf {
    let path =
        std::env::var_os("CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from);
    assert!(
        path.is_file(),
        "this test runs the dashboard in headless Chromium, which is not at {}: \
         install it (Debian: `apt-get update && apt-get install -y --no-install-recommends chromium`) \
         or set CHROMIUM to its path",
        path.display()
    );
    path
}

/// A fresh Chromium profile directory, removed on drop.
struct Profile(PathBuf);

impl Profile {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-backpressure-dashboard-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs headless Chromium on `http://addr/dashboard` with `args` (e.g.
/// `--dump-dom`), after the page's script ran for 5 s of virtual time
/// (timers run without waiting; network fetches pause the clock until they
/// are answered). Returns its stdout and how long it took.
async fn browse(addr: SocketAddr, name: &str, args: &[&str]) -> (String, Duration) {
    let profile = Profile::new(name);
    let started = Instant::now();
    let child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(args)
        .arg(format!("http://{addr}/dashboard"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts");
    let output = within(
        BROWSER,
        "chromium to render the dashboard",
        child.wait_with_output(),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "chromium {args:?}: exit {:?}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (stdout, took)
}

/// The ids `/health/clients` lists once it lists `n` clients.
async fn client_ids(addr: SocketAddr, n: usize) -> Vec<u64> {
    within(SETTLE, &format!("{n} clients in /health/clients"), async {
        loop {
            let health = health(addr).await;
            let clients = health["clients"].as_array().unwrap();
            if clients.len() == n {
                return clients.iter().map(|c| c["id"].as_u64().unwrap()).collect();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// `GET /dashboard`: one page, nothing outside it.
async fn page(addr: SocketAddr) -> String {
    let body = get_ok(addr, "/dashboard", "text/html; charset=utf-8").await;
    let page = String::from_utf8(body.to_vec()).unwrap();
    // Self-contained: no external script, style sheet, font or image.
    assert!(!page.contains("://"), "the page refers to another site");
    for tag in ["<script src", "<link", "<img", "@import", "url("] {
        assert!(!page.contains(tag), "the page loads an asset: {tag}");
    }
    page
}

/// The server with two reading clients (`/events` and `/stream.ndjson`)
/// and a stalled one; the DOM Chromium renders lists all three by id, and
/// each of `hubs` (none without `--hub`).
async fn renders_every_client(args: &str, hubs: &[&str]) -> Duration {
    let server = start("sse_server", args).await;
    let addr = server.addr;
    page(addr).await;
    let _readers = (
        reader(addr, "/events").await,
        reader(addr, "/stream.ndjson").await,
    );
    let _stalled = stalled(addr, "/events").await;
    let ids = client_ids(addr, 3).await;

    let (dom, took) = browse(
        addr,
        if hubs.is_empty() { "path" } else { "hub" },
        &["--dump-dom"],
    )
    .await;
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page never drew the server's numbers:\n{dom}"
    );
    for id in &ids {
        assert!(
            dom.contains(&format!(r#"data-client-id="{id}""#)),
            "no row for client {id}:\n{dom}"
        );
    }
    assert_eq!(
        dom.matches("data-client-id=").count(),
        ids.len(),
        "one row per client:\n{dom}"
    );
    for hub in hubs {
        assert!(
            dom.contains(&format!(r#"data-hub="{hub}""#)),
            "no row for the hub of {hub}:\n{dom}"
        );
    }
    assert_eq!(dom.matches("data-hub=").count(), hubs.len(), "{dom}");
    // (The script's text is in the DOM too: look for what it draws.)
    assert!(!dom.contains(r#"class="status stale""#), "{dom}");
    server.stop_cleanly().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_every_client_in_a_browser() {
    // Fail first, and clearly, without Chromium.
    chromium();
    let path = renders_every_client("--rate 1000 --size 1024 --capacity 50", &[]).await;
    let hub = renders_every_client(
        "--hub --retain 1000 --rate 1000 --size 1024 --capacity 50",
        &["/events", "/stream.ndjson"],
    )
    .await;
    eprintln!("chromium took {path:?} (per-client path) and {hub:?} (--hub)");
}

/// A client that reads `chunk` bytes every `every` from a socket with a
/// small receive buffer: slower than the stream. Aborted on drop.
struct Slow(JoinHandle<()>);

impl Drop for Slow {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn slow(addr: SocketAddr, path: &str, chunk: usize, every: Duration) -> Slow {
    let mut stream = stalled(addr, path).await;
    Slow(tokio::spawn(async move {
        let mut buf = vec![0u8; chunk];
        let mut ticks = tokio::time::interval(every);
        loop {
            // Pacing, not synchronization: this client is slow on purpose.
            ticks.tick().await;
            if matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {
                return;
            }
        }
    }))
}

/// Takes `docs/dashboard.png` (1200×800) for the README: `--hub`, three
/// reading clients, two slow ones and two stalled, once some have dropped
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/dashboard.png; run with --ignored to refresh it"]
async fn screenshot_for_the_readme() {
    chromium();
    let server = start(
        "sse_server",
        "--hub --retain 5000 --rate 2000 --size 512 --capacity 400 --max-bytes 262144",
    )
    .await;
    let addr = server.addr;
    let _readers = (
        reader(addr, "/events").await,
        reader(addr, "/events").await,
        reader(addr, "/stream.ndjson").await,
    );
    let _slow = (
        slow(addr, "/events", 2048, Duration::from_millis(10)).await,
        slow(addr, "/stream.ndjson", 4096, Duration::from_millis(10)).await,
    );
    let _stalled = (
        stalled(addr, "/events").await,
        stalled(addr, "/events").await,
    );
    client_ids(addr, 7).await;
    within(SETTLE, "a slow client to drop events", async {
        loop {
            let health = health(addr).await;
            let dropping = health["clients"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["dropped"].as_u64().unwrap() > 0)
                .count();
            if dropping >= 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let png = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
    std::fs::create_dir_all(png.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&png);
    browse(
        addr,
        "screenshot",
        &[
            "--window-size=1200,800",
            &format!("--screenshot={}", png.display()),
        ],
    )
    .await;
    assert!(png.is_file(), "chromium wrote no {}", png.display());
    server.stop_cleanly().await;
}
