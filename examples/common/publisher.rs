//! Shared by the bus publishers (`nats_publisher`, `redis_publisher`):
//! their common flags, the events' payload and the paced loop, the same as
//! `sse_server`'s own producer.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, MissedTickBehavior};

/// The largest `--rate`.
const MAX_RATE: u64 = 1_000_000;

/// The largest `--size` (1 MiB, NATS' default largest payload).
const MAX_SIZE: u64 = 1 << 20;

/// The events' pace and size: `--rate`, `--size`.
#[derive(Debug, clap::Args)]
pub(crate) struct Pace {
    /// Events per second.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RATE))]
    pub(crate) rate: u64,
    /// Size of each event's payload.
    #[arg(long, value_name = "BYTES", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_SIZE))]
    pub(crate) size: usize,
}

impl Pace {
    /// Every event's payload: `--size` `x`s, the `data:` of `sse_server`'s
    /// own producer.
    pub(crate) fn payload(&self) -> Bytes {
        Bytes::from("x".repeat(self.size))
    }
}

/// The pace of `rate` events per second from its start, as `sse_server`'s
/// own producer keeps it.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: u64,
    start: Instant,
    ticker: tokio::time::Interval,
    /// Events handed out so far.
    sent: u64,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Self {
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        // A late tick is made up by the next one.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Self {
            rate,
            start: Instant::now(),
            ticker,
            sent: 0,
        }
    }

    /// Waits for the next millisecond at which events are due, and says
    /// how many (at least 1): all those due since the start and not handed
    /// out yet, so a slow publish (a reconnect) is followed by the events
    /// due meanwhile.
    pub(crate) async fn due(&mut self) -> u64 {
        loop {
            self.ticker.tick().await;
            let due =
                (self.start.elapsed().as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
            if due > self.sent {
                let n = due - self.sent;
                self.sent = due;
                return n;
            }
        }
    }
}
