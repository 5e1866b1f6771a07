//! A producer that adapts to its client: it pauses while the client is
//! under pressure and resumes once it has caught up, watching the
//! [`ClientHandle`] that `BackpressureLayer` puts into every request.
//!
//! Each client gets its own producer. While the client is under pressure
//! (its buffer is over the threshold), the producer pauses; once the client
//! has caught up, it resumes. A slow client then loses nothing and costs no
//! more memory than its buffer, while a fast one streams at the full rate.
//!
//! ```text
//! cargo run --release --example adaptive -- --seconds 5
//! ```
//!
//! The program serves SSE on 127.0.0.1 (a free port), runs a fast and a slow
//! client against it for `--seconds`, prints what each producer did, and
//! exits.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use clap::Parser;
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tower_backpressure::{BackpressureLayer, BufferConfig, ClientHandle, Health};

/// A producer that pauses while its client is under pressure.
#[derive(Debug, Parser)]
struct Args {
    /// How long the clients run, in seconds.
    // At least 1: with 0 a client may end before its request reaches the
    // server, which then has no producer to report.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Events per second each producer aims for.
    // At most 10^6: the producer's tick period (1 s / rate) must not round
    // to zero.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
}

/// What one producer did, and its client's handle.
struct Counts {
    produced: AtomicU64,
    pauses: AtomicU64,
    client: ClientHandle,
}

type Producers = Arc<Mutex<HashMap<String, Arc<Counts>>>>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let producers = Producers::default();
    let app = Router::new()
        .route("/events/{name}", get(events))
        .with_state((producers.clone(), args.rate))
        .layer(BackpressureLayer::new(
            BufferConfig::new(200).with_threshold(0.5),
        ));

    // A small send buffer, inherited by accepted sockets, so that a slow
    // client's backlog reaches the layer instead of hiding in the kernel.
    let socket = TcpSocket::new_v4()?;
    socket.set_send_buffer_size(16 * 1024)?;
    socket.bind("127.0.0.1:0".parse().unwrap())?;
    let listener = socket.listen(64)?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "serving on http://{addr}: a fast and a slow client for {}s\n",
        args.seconds
    );

    let run = Duration::from_secs(args.seconds);
    let fast = tokio::spawn(client(addr, "fast", Duration::ZERO, run));
    let slow = tokio::spawn(client(addr, "slow", Duration::from_millis(20), run));
    let (fast, slow) = (fast.await??, slow.await??);

    println!("client  received  produced  pauses  dropped by the layer");
    for (name, received) in [("fast", fast), ("slow", slow)] {
        let counts = producers.lock().unwrap()[name].clone();
        let dropped = counts.client.stats().map_or(0, |s| s.dropped);
        println!(
            "{name:>6}  {received:>8}  {:>8}  {:>6}  {dropped:>7}",
            counts.produced.load(Ordering::Relaxed),
            counts.pauses.load(Ordering::Relaxed),
        );
    }
    println!(
        "\nThe slow client's producer paused whenever its buffer was over half full, so\n\
         the layer dropped nothing (what it produced but the client did not read was\n\
         still in flight when the client stopped); the fast client's producer never paused."
    );
    Ok(())
}

/// `GET /events/{name}`: a producer for this client alone, that watches the
/// client's health through its handle.
async fn events(
    Path(name): Path<String>,
    State((producers, rate)): State<(Producers, u64)>,
    Extension(client): Extension<ClientHandle>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let counts = Arc::new(Counts {
        produced: AtomicU64::new(0),
        pauses: AtomicU64::new(0),
        client: client.clone(),
    });
    producers.lock().unwrap().insert(name, counts.clone());
    let every = Duration::from_secs(1) / rate as u32;
    let stream = futures::stream::unfold(
        (0u64, client, counts, tokio::time::interval(every)),
        |(seq, mut client, counts, mut tick)| async move {
            // pauseSubscription() while under pressure, resumeSubscription()
            // once healthy again.
            if client.health() == Health::Pressure {
                counts.pauses.fetch_add(1, Ordering::Relaxed);
                while client.health() == Health::Pressure {
                    client.changed().await;
                }
            }
            if matches!(client.health(), Health::Closed(_)) {
                return None;
            }
            tick.tick().await;
            counts.produced.fetch_add(1, Ordering::Relaxed);
            let event = Event::default().id(seq.to_string()).data("tick");
            Some((Ok(event), (seq + 1, client, counts, tick)))
        },
    );
    Sse::new(stream)
}

/// Reads `/events/{name}` for `run`, pausing `pace` between reads; returns
/// how many events it received.
async fn client(
    addr: std::net::SocketAddr,
    name: &str,
    pace: Duration,
    run: Duration,
) -> std::io::Result<u64> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    let request = format!("GET /events/{name} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let deadline = tokio::time::Instant::now() + run;
    let mut buf = vec![0u8; 1024];
    let mut events = 0u64;
    let mut tail = Vec::new();
    // A read that is always ready never times out: check the clock too.
    while tokio::time::Instant::now() < deadline {
        let Ok(read) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await else {
            break;
        };
        let n = read?;
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        // Count complete `id:` lines; keep a partial line for the next read.
        let cut = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        events += tail[..cut]
            .split(|&b| b == b'\n')
            .filter(|line| line.starts_with(b"id: "))
            .count() as u64;
        tail.drain(..cut);
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    Ok(events)
}
