//! Publishes the events of `sse_server` to a Redis stream, for servers that
//! scale out (`sse_server --hub --redis URL`): one publisher, any number of
//! servers, one stream of ids.
//!
//! Events have ids 0, 1, 2, … and a payload of `--size` bytes (`x`s, the
//! `data:` of `sse_server`'s own producer), at `--rate` events per second.
//! Each is one stream entry, `XADD KEY MAXLEN ~ N <id>-1 data <payload>`:
//! the event's id as the entry's id, so that Redis keeps the ids
//! increasing and a server reads any range of them with one `XRANGE` (see
//! `tower_backpressure::bus::redis`). The stream keeps about the newest
//! `--retain` events (never fewer): what a server started later warms its
//! hubs with, and how far back a client can resume.
//!
//! ```text
//! redis-server --port 6379 --save '' --appendonly no
//! cargo run --example redis_publisher --features redis -- --rate 100
//! ```
//!
//! A publisher that restarts continues after the newest id in the stream
//! (from 0 if the stream is empty or gone). While Redis is unreachable
//! (restarting, say) it retries, logging each failure, and then adds the
//! events due meanwhile, so that the ids have no hole; after a restart of
//! Redis that lost some of the stream it continues with its own ids (the
//! servers' clients see what was lost as one exact gap).
//!
//! Contract: once connected it prints exactly one line
//! `publishing to URL stream KEY` on stdout; SIGINT and SIGTERM make it
//! exit with status 0; it exits non-zero with a clear message if it cannot
//! connect at start, or if Redis refuses its entries (the key holds
//! something else than a stream, or another publisher added newer ids).
//! Logs go to stderr.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use redis::aio::MultiplexedConnection;
use tower_backpressure::bus::redis as bus_redis;

#[path = "common/publisher.rs"]
mod publisher;
use publisher::{Pace, Pacer};

/// How long connecting may take at start.
const CONNECT: Duration = Duration::from_secs(10);

/// The most entries added by one pipeline.
const CHUNK: u64 = 1_000;

/// The longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Publishes `sse_server`'s events to a Redis stream, ids as entry ids.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The Redis server.
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// The key of the stream to add to.
    #[arg(long, value_name = "KEY", default_value = "ticks")]
    stream: String,
    #[command(flatten)]
    pace: Pace,
    /// How many events the stream retains, about (`XADD … MAXLEN ~ N`:
    /// never fewer).
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    retain: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let cannot = |e: &dyn std::fmt::Display| {
        eprintln!("error: cannot connect to Redis at {}: {e}", args.redis);
        ExitCode::FAILURE
    };
    let client = match redis::Client::open(args.redis.as_str()) {
        Ok(client) => client,
        Err(e) => return cannot(&e),
    };
    let mut connection = match tokio::time::timeout(CONNECT, bus_redis::connect(&client)).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return cannot(&e),
        Err(_) => return cannot(&format!("timed out after {CONNECT:?}")),
    };
    let first = match bus_redis::last_id(&mut connection, &args.stream).await {
        Ok(last) => last.map_or(0, |last| last.saturating_add(1)),
        Err(e) => {
            eprintln!("error: cannot read the stream {:?}: {e}", args.stream);
            return ExitCode::FAILURE;
        }
    };
    println!("publishing to {} stream {}", args.redis, args.stream);
    let _ = std::io::stdout().flush();
    tracing::info!(
        rate = args.pace.rate,
        size = args.pace.size,
        retain = args.retain,
        first,
        "publishing"
    );

    let mut publisher = Publisher {
        client,
        connection: Some(connection),
        key: args.stream.clone(),
        retain: args.retain,
        payload: args.pace.payload(),
        next: first,
    };
    let mut pacer = Pacer::new(args.pace.rate);
    let publish = async {
        loop {
            let due = pacer.due().await;
            if let Err(e) = publisher.publish(due).await {
                return e;
            }
        }
    };
    tokio::select! {
        e = publish => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        () = shutdown_signal() => {}
    }
    tracing::info!(next = publisher.next, "stopped");
    ExitCode::SUCCESS
}

/// The publisher's connection and the next id it adds.
struct Publisher {
    client: redis::Client,
    /// `None` after an error, until it reconnects.
    connection: Option<MultiplexedConnection>,
    key: String,
    retain: usize,
    payload: Bytes,
    /// The id of the next event.
    next: u64,
}

impl Publisher {
    /// Adds the next `due` events, in pipelines of up to 1,000; after a
    /// connection error, reconnects (pausing up to 1 s between attempts)
    /// and goes on. Fails only if Redis refuses an entry.
    async fn publish(&mut self, mut due: u64) -> Result<(), String> {
        let mut backoff = Duration::ZERO;
        while due > 0 {
            if self.connection.is_none() {
                if let Err(e) = self.reconnect().await {
                    tracing::warn!("cannot reconnect to Redis: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).clamp(Duration::from_millis(50), MAX_BACKOFF);
                    continue;
                }
            }
            let n = due.min(CHUNK);
            let mut pipeline = redis::pipe();
            for id in self.next..self.next + n {
                let add = bus_redis::add_command(&self.key, id, &self.payload, Some(self.retain));
                pipeline.add_command(add).ignore();
            }
            let connection = self.connection.as_mut().expect("connected above");
            match pipeline.query_async::<()>(connection).await {
                Ok(()) => {
                    self.next += n;
                    due -= n;
                }
                // A reply from Redis that is not about the connection (and
                // not `LOADING`: Redis restarting reads its data back).
                Err(e) if e.code().is_some_and(|code| code != "LOADING") => {
                    return Err(format!("Redis refused the events from {}: {e}", self.next));
                }
                Err(e) => {
                    tracing::warn!(next = self.next, "lost the connection to Redis: {e}");
                    self.connection = None;
                }
            }
        }
        Ok(())
    }

    /// Connects again, and continues after the stream's newest id if it
    /// is ahead of this publisher's (a pipeline cut off half way).
    async fn reconnect(&mut self) -> redis::RedisResult<()> {
        let mut connection = bus_redis::connect(&self.client).await?;
        let last = bus_redis::last_id(&mut connection, &self.key).await?;
        match last {
            Some(last) if last >= self.next => self.next = last + 1,
            // The stream lost events (Redis restarted without them): the
            // ids go on, the servers' clients see one exact gap.
            Some(last) if last + 1 < self.next => {
                tracing::warn!(last, next = self.next, "the stream lost its newest events");
            }
            None if self.next > 0 => {
                tracing::warn!(next = self.next, "the stream is gone; its ids go on");
            }
            _ => {}
        }
        tracing::info!(next = self.next, "reconnected to Redis");
        self.connection = Some(connection);
        Ok(())
    }
}

#[path = "common/signal.rs"]
mod signal;
use signal::shutdown_signal;
