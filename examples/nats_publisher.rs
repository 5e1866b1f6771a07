//! Publishes the events of `sse_server` to a NATS subject, for servers that
//! scale out (`sse_server --hub --nats URL`): one publisher, any number of
//! servers, one stream of ids.
//!
//! Events have ids 0, 1, 2, … and a payload of `--size` bytes (`x`s, the
//! `data:` of `sse_server`'s own producer), at `--rate` events per second.
//! Each is one NATS message: the payload as is, and the id in the
//! `Event-Id` header (see `tower_backpressure::bus::nats`). Every server
//! encodes it as its clients' formats (an SSE event with `id: <id>`, an
//! NDJSON line).
//!
//! ```text
//! nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats
//! cargo run --example nats_publisher --features nats -- --rate 100 --jetstream
//! ```
//!
//! `--jetstream` makes sure a JetStream stream holds the subject (creating
//! it if there is none, named after the subject, `ticks` → `TICKS`, keeping
//! the newest `--retain` messages), so that servers started later warm
//! their hubs from it and clients resume from it on any server. Messages
//! are still published with core NATS (the stream keeps them). A publisher
//! that restarts continues after the newest id in the stream; without
//! `--jetstream` it starts again at 0 (servers that saw the old ids skip
//! the new ones as duplicates until they pass them: restart the servers
//! too).
//!
//! Contract: once connected it prints exactly one line
//! `publishing to URL subject S` on stdout; SIGINT and SIGTERM make it
//! flush what it published and exit with status 0; it exits non-zero with a
//! clear message if it cannot connect. Logs go to stderr.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use tower_backpressure::bus::nats;

#[path = "common/publisher.rs"]
mod publisher;
use publisher::{Pace, Pacer};

/// How long connecting may take.
const CONNECT: Duration = Duration::from_secs(10);

/// Publishes `sse_server`'s events to a NATS subject, ids in an `Event-Id` header.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The NATS server.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The subject to publish to.
    #[arg(long, value_name = "S", default_value = "ticks")]
    subject: String,
    #[command(flatten)]
    pace: Pace,
    /// Make sure a JetStream stream retains the subject's newest events.
    #[arg(long)]
    jetstream: bool,
    /// With `--jetstream`: how many events a stream created here retains.
    #[arg(long, value_name = "EVENTS", default_value_t = 10_000, requires = "jetstream",
          value_parser = clap::value_parser!(i64).range(1..))]
    retain: i64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let connect = async_nats::ConnectOptions::new().connect(args.nats.as_str());
    let client = match tokio::time::timeout(CONNECT, connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            eprintln!("error: cannot connect to NATS at {}: {e}", args.nats);
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!(
                "error: cannot connect to NATS at {}: timed out after {CONNECT:?}",
                args.nats
            );
            return ExitCode::FAILURE;
        }
    };
    let mut first = 0;
    if args.jetstream {
        let context = async_nats::jetstream::new(client.clone());
        match nats::create_stream(&context, &args.subject, args.retain).await {
            Ok(stream) => {
                if let Some(last) = nats::last_id(&stream, &args.subject).await {
                    first = last + 1;
                }
            }
            Err(e) => {
                eprintln!(
                    "error: cannot create a JetStream stream for {:?} (is nats-server running with -js?): {e}",
                    args.subject
                );
                return ExitCode::FAILURE;
            }
        }
    }
    println!("publishing to {} subject {}", args.nats, args.subject);
    let _ = std::io::stdout().flush();
    tracing::info!(
        rate = args.pace.rate,
        size = args.pace.size,
        jetstream = args.jetstream,
        first,
        "publishing"
    );

    let payload = args.pace.payload();
    let publish = publish(&client, &args.subject, args.pace.rate, first, payload);
    tokio::select! {
        e = publish => {
            eprintln!("error: cannot publish: {e}");
            return ExitCode::FAILURE;
        }
        () = shutdown_signal() => {}
    }
    if let Err(e) = tokio::time::timeout(CONNECT, client.flush()).await {
        tracing::warn!("could not flush the last events: {e}");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Publishes `rate` events per second, ids `first`, `first + 1`, …, as
/// `sse_server`'s producer does; returns only on an error.
async fn publish(
    client: &async_nats::Client,
    subject: &str,
    rate: u64,
    first: u64,
    payload: Bytes,
) -> async_nats::Error {
    let mut pacer = Pacer::new(rate);
    let mut next = first;
    loop {
        let due = pacer.due().await;
        for id in next..next + due {
            if let Err(e) = client
                .publish_with_headers(subject.to_owned(), nats::headers(id), payload.clone())
                .await
            {
                return e.into();
            }
        }
        next += due;
    }
}

#[path = "common/signal.rs"]
mod signal;
use signal::shutdown_signal;
