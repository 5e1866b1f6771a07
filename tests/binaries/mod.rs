//! Helpers shared by the tests that run the examples as built binaries
//! (`tests/examples.rs`, `tests/dashboard.rs`, `tests/prometheus.rs`, `tests/nats.rs`):
//! build them once, start one and wait for its `listening on` line, stop it
//! cleanly, and a few clients. Every wait is bounded, and every child is
//! killed on drop.
#![allow(dead_code)]

pub mod bus;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How long a server gets to print its `listening on` line.
pub const STARTUP: Duration = Duration::from_secs(20);
/// How long a client waits for one thing (headers, an event, a close).
pub const STEP: Duration = Duration::from_secs(10);
/// How long a server gets to exit after SIGTERM (the servers give open
/// streams 3 s).
pub const EXIT: Duration = Duration::from_secs(10);

/// Waits for `f`, at most `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

// --- The binaries -------------------------------------------------------------

/// The path of the built example `name`.
pub fn example(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(build_examples)
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// Builds the examples with the profile and into the target directory of
/// this test binary (`<target>/[<triple>/]<profile>/deps/examples-<hash>`);
/// returns `<target>/[<triple>/]<profile>/examples`.
pub fn build_examples() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from <target>/<profile>/deps");
    let examples = profile_dir.join("examples");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory in {}", exe.display()),
    };
    let above = profile_dir.parent().expect("a target directory");
    // `cargo test --target T` builds into <target>/<T>/<profile>. Cargo
    // marks the target directory itself (a directory it did not create, e.g.
    // one restored from a cache, may lack the tag but has the other).
    let is_target_dir =
        |dir: &Path| dir.join("CACHEDIR.TAG").exists() || dir.join(".rustc_info.json").exists();
    let (target_dir, triple) = if is_target_dir(above) {
        (above, None)
    } else {
        let triple = above
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned);
        (above.parent().expect("a target directory"), triple)
    };
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--quiet",
            "--examples",
            "--all-features",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(triple) = triple {
        cargo.args(["--target", &triple]);
    }
    // What cargo set for this test, not for a build: build scripts that
    // watch these (ring's watches `CARGO_PKG_NAME`) would otherwise rerun,
    // and rebuild every crate above them, at each test run.
    for (name, _) in std::env::vars_os() {
        let set_for_tests = name.to_str().is_some_and(|n| {
            [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| n.starts_with(p))
                || matches!(
                    n,
                    "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
                )
        });
        if set_for_tests {
            cargo.env_remove(name);
        }
    }
    let mut child = cargo.spawn().expect("cargo runs");
    // Read stderr as it comes: a full pipe would stall cargo.
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
        text
    });
    // A cold build of the examples takes minutes on a small machine; this
    // only bounds a cargo that hangs.
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = stderr.join().unwrap();
            assert!(status.success(), "cargo build --examples failed:\n{stderr}");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("cargo build --examples did not finish within 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    examples
}

// --- A running server ---------------------------------------------------------

/// A running example; killed on drop (a failed test leaves nothing behind).
pub struct Server {
    pub name: String,
    pub child: Child,
    pub addr: SocketAddr,
    /// The lines the server printed after `listening on`.
    pub stdout: JoinHandle<Vec<String>>,
    pub stderr: JoinHandle<String>,
}

/// How a server ended.
pub struct Stopped {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

/// A started example: its first line of stdout, the rest to read, and its
/// stderr, read to the end in a task of its own (a full pipe would stall
/// it).
pub struct Spawned {
    pub child: Child,
    pub first: String,
    pub rest: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    pub stderr: JoinHandle<String>,
}

/// Starts the example `name` with `args`; waits for its first line of
/// stdout (killing it and failing with its stderr if none comes).
pub async fn spawn(name: &str, args: &[&str]) -> Spawned {
    let mut child = piped(name, args);
    // Logs go to stderr: keep reading it, or a full pipe stalls the child.
    let mut err = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text).await;
        text
    });
    let mut rest = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = match tokio::time::timeout(STARTUP, rest.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let _ = child.kill().await;
            let stderr = stderr.await.unwrap_or_default();
            panic!("{name} {args:?} printed no line ({other:?}); stderr:\n{stderr}");
        }
    };
    Spawned {
        child,
        first,
        rest,
        stderr,
    }
}

/// Starts `name` with `--addr 127.0.0.1:0` and `args` (separated by
/// spaces); waits for its `listening on http://127.0.0.1:PORT` line.
pub async fn start(name: &str, args: &str) -> Server {
    let argv: Vec<&str> = ["--addr", "127.0.0.1:0"]
        .into_iter()
        .chain(args.split_whitespace())
        .collect();
    let Spawned {
        child,
        first: line,
        rest: mut out,
        stderr,
    } = spawn(name, &argv).await;
    let addr = line
        .strip_prefix("listening on http://")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("{name} {args:?}: not a listening line: {line:?}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{line}");
    let stdout = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = out.next_line().await {
            rest.push(line);
        }
        rest
    });
    Server {
        name: format!("{name} {args}"),
        child,
        addr,
        stdout,
        stderr,
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the server is running")
    }

    /// Sends SIGTERM (`kill -TERM`: no libc needed).
    pub async fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {}", self.pid());
    }

    /// Waits for the server to exit after [`terminate`](Self::terminate).
    pub async fn wait(mut self) -> Stopped {
        let name = self.name.clone();
        let status = within(EXIT, &format!("{name} to exit"), self.child.wait())
            .await
            .unwrap();
        let stdout = within(STEP, "stdout", &mut self.stdout).await.unwrap();
        let stderr = within(STEP, "stderr", &mut self.stderr).await.unwrap();
        Stopped {
            status,
            stdout,
            stderr,
        }
    }

    /// SIGTERM, then a clean exit: status 0 and no second line on stdout.
    pub async fn stop_cleanly(self) -> Stopped {
        let name = self.name.clone();
        self.terminate().await;
        let stopped = self.wait().await;
        assert!(
            stopped.status.success(),
            "{name}: exit {:?} after SIGTERM; stderr:\n{}",
            stopped.status,
            stopped.stderr
        );
        assert!(
            stopped.stdout.is_empty(),
            "{name}: exactly one line on stdout, then {:?}",
            stopped.stdout
        );
        stopped
    }

    /// The server's open sockets (Linux: its `/proc/PID/fd`).
    #[cfg(target_os = "linux")]
    pub fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }
}

/// Runs `name` with `args` that it must refuse: a non-zero exit, soon, with
/// an error on stderr that contains `says`, and no listening line.
pub async fn refused(name: &str, args: &str, says: &str) {
    // A test of `--addr` itself gives its own.
    let addr = if args.contains("--addr") {
        ""
    } else {
        "--addr 127.0.0.1:0"
    };
    let argv: Vec<&str> = addr
        .split_whitespace()
        .chain(args.split_whitespace())
        .collect();
    refused_with(name, &argv, says).await;
}

/// `name` run with exactly `argv` must exit non-zero at once, with an error
/// on stderr that contains `says`, and no listening line.
pub async fn refused_with(name: &str, argv: &[&str], says: &str) {
    let child = piped(name, argv);
    let what = format!("{name} {argv:?} to refuse its flags");
    let output = within(STEP, &what, child.wait_with_output()).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{name} {argv:?} must exit non-zero; stdout:\n{stdout}"
    );
    assert!(
        stderr.contains("error") && stderr.contains(says),
        "{name} {argv:?}: stderr should say {says:?}:\n{stderr}"
    );
    assert!(
        !stdout.contains("listening on"),
        "{name} {argv:?}: {stdout}"
    );
}

/// Starts the example `name` with `args`, stdin closed, stdout and stderr
/// piped; killed on drop.
pub fn piped<I, A>(name: &str, args: I) -> Child
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    Command::new(example(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// Runs a program that drives itself; it must exit with status 0 within
/// `limit`. Returns its stdout.
pub async fn runs_to_success(name: &str, args: &str, limit: Duration) -> String {
    let child = piped(name, args.split_whitespace());
    let output = within(
        limit,
        &format!("{name} {args:?} to finish"),
        child.wait_with_output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{name} {args:?}: exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

// --- Clients ------------------------------------------------------------------

/// `GET path` over HTTP/1.1 on a connection of its own.
pub async fn get_h1(addr: SocketAddr, path: &str) -> http::Response<Incoming> {
    send_h1(addr, Request::get(path)).await
}

/// `req` (with a `Host` header and an empty body) over HTTP/1.1 on a
/// connection of its own; its response's headers.
pub async fn send_h1(addr: SocketAddr, req: http::request::Builder) -> http::Response<Incoming> {
    let stream = within(STEP, "a connection", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = req
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    within(STEP, "response headers", sender.send_request(req))
        .await
        .unwrap()
}

/// `GET path` over HTTP/2 with prior knowledge, on a connection of its own.
pub async fn get_h2(addr: SocketAddr, path: &str) -> http::Response<Incoming> {
    let stream = within(STEP, "a connection", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    within(STEP, "response headers", sender.send_request(req))
        .await
        .unwrap()
}

/// `GET /health/clients`: the registry's JSON.
pub async fn health(addr: SocketAddr) -> serde_json::Value {
    let body = get_ok(addr, "/health/clients", "application/json").await;
    serde_json::from_slice(&body).unwrap()
}

/// `GET path` over HTTP/1.1: it must answer 200 with `content_type`; its
/// whole body.
pub async fn get_ok(addr: SocketAddr, path: &str, content_type: &str) -> Bytes {
    let response = get_h1(addr, path).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        content_type,
        "GET {path}"
    );
    within(
        STEP,
        &format!("the body of {path}"),
        response.into_body().collect(),
    )
    .await
    .unwrap()
    .to_bytes()
}

/// The paths of the clients `/health/clients` lists.
pub fn listed(health: &serde_json::Value) -> Vec<String> {
    health["clients"]
        .as_array()
        .expect("a clients array")
        .iter()
        .map(|c| c["path"].as_str().unwrap().to_owned())
        .collect()
}

// --- Streaming clients --------------------------------------------------------

/// A client that reads a stream as fast as it comes; aborted on drop.
pub struct Reader(JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET path` over HTTP/1.1, read to the end by a task of its own.
pub async fn reader(addr: SocketAddr, path: &str) -> Reader {
    let response = get_h1(addr, path).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    Reader(tokio::spawn(async move {
        while let Some(Ok(_)) = body.frame().await {}
    }))
}

/// `GET path` over HTTP/1.1 from a socket with a 4 KiB receive buffer
/// that reads the response headers, then nothing: a client the server
/// cannot send to once the buffers on the way are full.
pub async fn stalled(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = within(STEP, "a connection", socket.connect(addr))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 512];
    let n = within(STEP, "response headers", stream.read(&mut head))
        .await
        .unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
    stream
}

/// One item of an SSE stream.
#[derive(Debug, PartialEq)]
pub enum Sse {
    /// `id: N` and a `data:` of this many bytes.
    Event(u64, usize),
    /// `event: lagged` with `data: {"dropped":N}`.
    Lagged(u64),
}

/// The complete SSE events in `data`; comments (keep-alive lines, `:`)
/// are not events and are left out.
pub fn sse(data: &[u8]) -> Vec<Sse> {
    let text = std::str::from_utf8(data).unwrap();
    let complete = &text[..text.rfind("\n\n").map_or(0, |i| i + 2)];
    complete
        .split("\n\n")
        .filter(|e| !e.is_empty() && !e.lines().all(|l| l.starts_with(':')))
        .map(|e| {
            let lines: Vec<&str> = e.lines().collect();
            match lines.as_slice() {
                [id, data] if id.starts_with("id: ") => Sse::Event(
                    id["id: ".len()..].parse().expect("a numeric id"),
                    data.strip_prefix("data: ")
                        .or(data.strip_prefix("data:"))
                        .expect("data")
                        .len(),
                ),
                ["event: lagged", data] => {
                    let json: serde_json::Value =
                        serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                    Sse::Lagged(json["dropped"].as_u64().unwrap())
                }
                _ => panic!("not an SSE event of the example: {e:?}"),
            }
        })
        .collect()
}

/// The ids of the events among `items`.
pub fn ids(items: &[Sse]) -> Vec<u64> {
    items
        .iter()
        .filter_map(|e| match e {
            Sse::Event(id, _) => Some(*id),
            Sse::Lagged(_) => None,
        })
        .collect()
}

/// `GET /events` over HTTP/1.1, with `Last-Event-ID: last` if given.
pub async fn events_after(addr: SocketAddr, last: Option<u64>) -> Incoming {
    let mut req = Request::get("/events");
    if let Some(last) = last {
        req = req.header("last-event-id", last.to_string());
    }
    let response = send_h1(addr, req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    response.into_body()
}
