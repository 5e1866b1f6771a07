//! Feeding a [`Hub`](crate::Hub) from NATS with [`async-nats`](async_nats):
//! one subscription per server, ids from the publisher.
//!
//! # Message format
//!
//! Each message's payload is the event's data, as is; its id travels in
//! the [`EVENT_ID`] header (`Event-Id`), in decimal: `Event-Id: 42`. A
//! message without a valid id is dropped and counted
//! ([`FeedStats::invalid`]). Publishers set the header with
//! [`headers`] (or by hand, from any NATS client), e.g. with the `nats` CLI:
//! `nats pub ticks --header Event-Id:0 hello`.
//!
//! # Core NATS
//!
//! [`connect_options`] reports the connection's ups and downs into a
//! [`FeedStats`] (async-nats reconnects by itself, and resubscribes), and
//! [`messages`] turns a subscription into the `(id, payload)` stream that
//! [`feed`](super::feed) takes. Messages published while a server was
//! disconnected never reach it: they are a hole in its hub's ids, which its
//! clients see as one exactly counted gap. Its clients are served what the
//! hub holds all along.
//!
//! # JetStream
//!
//! A stream that retains the newest events of the subject
//! ([`create_stream`]) lets a server that starts later warm its hub
//! ([`follow`]: the retained messages in order, then live ones, through one
//! ordered consumer, so without gap or duplicate at the seam) and serve a
//! client whose `Last-Event-ID` is older than its hub's oldest frame from
//! the stream ([`history`], for [`HubResponse::backfill`](crate::hub::HubResponse::backfill)).
//! Ids still come from the `Event-Id` header, not from the stream's
//! sequence numbers.
//!
//! # Example
//!
//! ```no_run
//! use bytes::Bytes;
//! use tower_backpressure::Hub;
//! use tower_backpressure::bus::{FeedStats, feed, nats};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_backpressure::BoxError> {
//! let hub: Hub = Hub::default();
//! let stats = FeedStats::new();
//! let client = nats::connect_options(&stats)
//!     .connect("nats://127.0.0.1:4222")
//!     .await?;
//! let subscriber = client.subscribe("ticks").await?;
//! // Serve clients from `hub` meanwhile; `stats` says how the feed goes.
//! tokio::spawn(async move { feed(&hub, &stats, nats::messages(subscriber, stats.clone())).await });
//!
//! // A publisher:
//! client.publish_with_headers("ticks", nats::headers(0), Bytes::from("hello")).await?;
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, Event, HeaderMap, Subscriber};
use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt as _;

use super::FeedStats;
use crate::BoxError;

/// The header that carries each message's id, in decimal.
pub const EVENT_ID: &str = "Event-Id";

/// How long [`history`] waits for the next message of the stream.
const HISTORY_STEP: Duration = Duration::from_secs(5);

/// The headers of the message with id `id`: `Event-Id: <id>`.
///
/// ```
/// use tower_backpressure::bus::nats;
///
/// let headers = nats::headers(42);
/// assert_eq!(nats::event_id(Some(&headers)), Some(42));
/// ```
pub fn headers(id: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(EVENT_ID, id.to_string().as_str());
    headers
}

/// The id in a message's headers, if it has a valid one.
pub fn event_id(headers: Option<&HeaderMap>) -> Option<u64> {
    headers?.get(EVENT_ID)?.as_str().trim().parse().ok()
}

/// Connect options that record the connection's state into `stats`: each
/// (re)connect and disconnect, through async-nats' event callback (see
/// [`FeedStats::reconnects`]). Add any other option to them.
pub fn connect_options(stats: &FeedStats) -> ConnectOptions {
    let stats = stats.clone();
    ConnectOptions::new().event_callback(move |event| {
        let stats = stats.clone();
        async move {
            match event {
                Event::Connected => {
                    stats.record_connected();
                    #[cfg(feature = "tracing")]
                    tracing::info!(reconnects = stats.reconnects(), "connected to NATS");
                }
                Event::Disconnected => {
                    stats.record_disconnected();
                    #[cfg(feature = "tracing")]
                    tracing::warn!("disconnected from NATS: clients are served what the hub holds");
                }
                #[cfg(feature = "tracing")]
                other => tracing::info!("NATS: {other}"),
                #[cfg(not(feature = "tracing"))]
                _ => {}
            }
        }
    })
}

/// The `(id, payload)` of each message of `subscriber` that has a valid
/// [`EVENT_ID`]; the others are counted in `stats` and dropped.
pub fn messages(
    subscriber: Subscriber,
    stats: FeedStats,
) -> impl Stream<Item = (u64, Bytes)> + Send + 'static {
    subscriber.filter_map(move |message| {
        let item = match event_id(message.headers.as_ref()) {
            Some(id) => Some((id, message.payload)),
            None => {
                stats.record_invalid();
                None
            }
        };
        std::future::ready(item)
    })
}

/// The name [`create_stream`] gives the stream of `subject`: its
/// characters other than ASCII letters, digits, `-` and `_` as `_`, in
/// upper case (`ticks` → `TICKS`).
pub fn stream_name(subject: &str) -> String {
    subject
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The JetStream stream that holds `subject`, created if there is none
/// (named by [`stream_name`]) to retain its newest `max_messages`
/// messages. Messages published to the subject, even with core NATS, are
/// then kept by the stream.
pub async fn create_stream(
    context: &jetstream::Context,
    subject: &str,
    max_messages: i64,
) -> Result<stream::Stream, BoxError> {
    if let Ok(name) = context.stream_by_subject(subject).await {
        return Ok(context.get_stream(name).await?);
    }
    Ok(context
        .get_or_create_stream(stream::Config {
            name: stream_name(subject),
            subjects: vec![subject.to_owned()],
            max_messages,
            ..Default::default()
        })
        .await?)
}

/// The JetStream stream that holds `subject`.
pub async fn stream_of(
    context: &jetstream::Context,
    subject: &str,
) -> Result<stream::Stream, BoxError> {
    let name = context
        .stream_by_subject(subject)
        .await
        .map_err(|e| format!("no JetStream stream holds subject {subject:?}: {e}"))?;
    Ok(context.get_stream(name).await?)
}

/// The id of the newest message of `subject` in `stream`, if any: where a
/// publisher that restarts continues.
pub async fn last_id(stream: &stream::Stream, subject: &str) -> Option<u64> {
    let message = stream.get_last_raw_message_by_subject(subject).await.ok()?;
    event_id(Some(&message.headers))
}

/// Every message of `subject` that `stream` retains, oldest first, then
/// every new one as it comes, as `(id, payload)`: through one ordered
/// consumer, which JetStream redelivers from where it was after a
/// reconnect, so the ids have no hole the stream did not have, and a hub
/// fed from it starts warm.
///
/// Messages without a valid id are counted in `stats` and dropped; a
/// consumer error is logged and the stream goes on (the ordered consumer
/// recreates itself).
///
/// Calling it again for a hub that already holds frames replays the whole
/// stream: those frames are skipped as duplicates only if they are within
/// [`FeedStats::max_rewind`] of the hub's newest, so set it to at least the
/// stream's retention (else the replay looks like a publisher that
/// restarted, and starts a new epoch).
pub async fn follow(
    stream: &stream::Stream,
    subject: &str,
    stats: FeedStats,
) -> Result<impl Stream<Item = (u64, Bytes)> + Send + 'static, BoxError> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let messages = consumer.messages().await?;
    Ok(messages.filter_map(move |message| {
        let item = match message {
            Ok(message) => match event_id(message.headers.as_ref()) {
                Some(id) => Some((id, message.payload.clone())),
                None => {
                    stats.record_invalid();
                    None
                }
            },
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::warn!("JetStream consumer: {_e}");
                None
            }
        };
        std::future::ready(item)
    }))
}

/// The messages of `subject` that `stream` retains with ids after `after`
/// and before `before`, oldest first, at most `max`: what a client that
/// saw `after` missed, for a hub whose oldest frame is `before` (see
/// [`HubResponse::backfill`](crate::hub::HubResponse::backfill)).
///
/// Finds the first by a binary search on the stream's sequence numbers
/// (the ids increase with them: one publisher), then reads on with an
/// ordered consumer up to the subject's newest message (the stream may
/// hold other subjects after it). Messages without a valid id (no
/// [`EVENT_ID`] header, deleted, or another subject's) never steer the
/// search: a probe that lands on one looks on to the next message of
/// `subject` with a valid id; after 64 such messages in one
/// call the search stops and the read starts from where it got, which is
/// slower but as exact. Fewer, or none, if the stream no longer retains
/// them.
///
/// # Errors
///
/// If JetStream does not answer, or a message of the subject does not
/// come within 5 s of the one before.
pub async fn history(
    stream: &stream::Stream,
    subject: &str,
    after: u64,
    before: u64,
    max: usize,
) -> Result<Vec<(u64, Bytes)>, BoxError> {
    let mut out = Vec::new();
    if before <= after.saturating_add(1) || max == 0 {
        return Ok(out);
    }
    // The read ends at the subject's newest message, not the stream's.
    let last = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => message.sequence,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    let first = stream.get_info().await?.state.first_sequence;
    // The first sequence whose id is after `after`: every message with a
    // valid id before `lo` has one at or before `after`, and the first
    // with a valid id at or after `hi` has one after it (or there is none).
    let (mut lo, mut hi) = (first, last.saturating_add(1));
    let mut scans = HISTORY_SCAN;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match next_with_id(stream, subject, mid, hi, &mut scans).await? {
            Probe::Found { sequence, id } if id <= after => lo = sequence + 1,
            Probe::Found { .. } | Probe::NoneBefore => hi = mid,
            // Read on from `lo`: the ids at or before `after` are skipped.
            Probe::GaveUp => break,
        }
    }
    if lo > last {
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: lo },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    while out.len() < max {
        let next = tokio::time::timeout(HISTORY_STEP, messages.next())
            .await
            .map_err(|_| "timed out reading the JetStream stream's history")?;
        let Some(message) = next else { break };
        let message = message?;
        // No message of the subject after this one (`pending`), or none
        // when the read started: the end.
        let (sequence, pending) = message
            .info()
            .map_or((0, 1), |i| (i.stream_sequence, i.pending));
        match event_id(message.headers.as_ref()) {
            Some(id) if id >= before => break,
            Some(id) if id > after => out.push((id, message.payload.clone())),
            _ => {}
        }
        if sequence >= last || pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// How many messages without a valid id one [`history`] call steps over
/// in its search before it reads on instead.
const HISTORY_SCAN: u32 = 64;

/// What [`next_with_id`] found.
enum Probe {
    /// The first message of the subject with a valid id at or after the
    /// probe, before the bound.
    Found { sequence: u64, id: u64 },
    /// None before the bound.
    NoneBefore,
    /// Too many messages without a valid id.
    GaveUp,
}

/// The first message of `subject` at or after `from`, and before `bound`,
/// that has a valid id; each message stepped over (no valid id) uses one
/// of `scans`.
async fn next_with_id(
    stream: &stream::Stream,
    subject: &str,
    mut from: u64,
    bound: u64,
    scans: &mut u32,
) -> Result<Probe, BoxError> {
    loop {
        // The server skips other subjects and deleted messages.
        let message = match stream.get_first_raw_message_by_subject(subject, from).await {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Probe::NoneBefore);
            }
            Err(e) => return Err(e.into()),
        };
        if message.sequence >= bound {
            return Ok(Probe::NoneBefore);
        }
        if let Some(id) = event_id(Some(&message.headers)) {
            return Ok(Probe::Found {
                sequence: message.sequence,
                id,
            });
        }
        if *scans == 0 {
            return Ok(Probe::GaveUp);
        }
        *scans -= 1;
        from = message.sequence + 1;
    }
}
