//! Feeding a [`Hub`](crate::Hub) from a Redis stream with the
//! [`redis`] crate: the publisher's ids as the entries' ids, a
//! retention of the newest entries, one `XREAD` per batch.
//!
//! # Entry format
//!
//! Each event is one stream entry whose **entry id is `<id>-1`**, the
//! event's id followed by sequence 1, and whose field [`DATA`] (`data`)
//! holds the event's data, as is: `XADD ticks 42-1 data hello` is the
//! event 42. [`add`] writes it, with an optional `MAXLEN ~ N` retention.
//!
//! Why the entry id and not a field: Redis keeps a stream ordered by entry
//! id and refuses an `XADD` whose id is not greater than the stream's
//! newest, so the stream itself guarantees what [`feed`](super::feed) needs
//! (increasing ids, no second publisher writing behind the first); the
//! history of a client is one `XRANGE` from its id ([`history`]), with no
//! search; and a reader resumes with `XREAD` right after the last id it
//! fed ([`follow`]). The sequence part is 1, not 0, because Redis refuses
//! the entry id `0-0`: the event 0 is `0-1`. An entry with another
//! sequence number (e.g. one added with an auto id, `XADD ticks * …`) or
//! without a `data` field is dropped and counted ([`FeedStats::invalid`]).
//!
//! # Follow, reconnect, retention
//!
//! [`follow`] reads the entries after an id (or all that the stream
//! retains, to warm a new server's hub) and then waits for new ones
//! (`XREAD BLOCK`), through the same cursor, so the history and the live
//! entries meet without a seam. It connects by itself, and reconnects
//! after any error (with a backoff of up to 1 s), resuming after the last
//! entry it read: nothing is lost or read twice while Redis still retains
//! it. What Redis no longer retains (the stream was trimmed past it with
//! `MAXLEN` while this server was cut off, or Redis restarted without its
//! data) is a hole in the ids, which [`feed`](super::feed) turns into one
//! gap of exactly that many ids for the hub's clients. Its connection's
//! ups and downs are counted in the [`FeedStats`] (`reconnects`,
//! `disconnects`, `connected`), as the NATS adapter does.
//!
//! If the stream's newest entry is older than the cursor when it
//! (re)connects (Redis restarted without its data, or with less of it),
//! it reads on from the stream's newest instead (or from the start of an
//! empty stream): a publisher that kept running continues with its own
//! ids (one exact gap for what was lost), and one that restarted its ids
//! is seen by [`feed`](super::feed) (duplicates, then a new epoch), instead
//! of being skipped until its ids pass the old ones.
//!
//! The stream's retention (`MAXLEN ~ N`, set by the publisher) bounds
//! what a server started later can warm its hub with and how old a
//! `Last-Event-ID` [`history`] can serve: size it to at least the hubs'
//! retention plus what a client may miss while it moves between servers.
//!
//! # Connections
//!
//! Every function takes a [`Client`] (`redis://HOST:PORT[/DB]`, with a
//! user and password if set: `redis://user:secret@host:6379`) or a
//! connection from [`connect`]. This crate enables only the `redis`
//! crate's tokio connection and streams commands: for TLS (`rediss://`),
//! depend on `redis` 1.2 with one of its TLS features as well (Cargo
//! unifies them). A Redis Cluster holds a stream on one node; point the
//! client at that node.
//!
//! # Example
//!
//! ```no_run
//! use bytes::Bytes;
//! use tower_backpressure::Hub;
//! use tower_backpressure::bus::{FeedStats, feed, redis};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_backpressure::BoxError> {
//! let hub: Hub = Hub::default();
//! let stats = FeedStats::new();
//! let client = ::redis::Client::open("redis://127.0.0.1:6379")?;
//! // Every entry the stream retains, then the new ones.
//! let entries = redis::follow(client.clone(), "ticks", None, stats.clone());
//! tokio::spawn(async move { feed(&hub, &stats, entries).await });
//!
//! // A publisher: the event 0, the stream trimmed to about 10,000 entries.
//! let mut connection = redis::connect(&client).await?;
//! redis::add(&mut connection, "ticks", 0, b"hello", Some(10_000)).await?;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::{AsyncConnectionConfig, Client, RedisResult};
use bytes::Bytes;
use futures_core::Stream;

use super::FeedStats;

/// The field that holds each entry's data.
pub const DATA: &str = "data";

/// How long one `XREAD` waits for a new entry before it asks again.
const BLOCK: Duration = Duration::from_secs(1);

/// How many entries one `XREAD` returns at most.
const BATCH: usize = 1_000;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a command may wait for its answer (an `XREAD` waits up to
/// [`BLOCK`] by design).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The entry id of the event `id`: `<id>-1` (see the [module docs](self)).
///
/// ```
/// use tower_backpressure::bus::redis;
///
/// assert_eq!(redis::entry_id(42), "42-1");
/// assert_eq!(redis::event_id("42-1"), Some(42));
/// assert_eq!(redis::event_id("1700000000000-0"), None); // an auto id
/// ```
pub fn entry_id(id: u64) -> String {
    format!("{id}-1")
}

/// The event id of an entry id, if it is one of [`entry_id`]'s.
pub fn event_id(entry_id: &str) -> Option<u64> {
    match parse_entry_id(entry_id)? {
        (id, 1) => Some(id),
        _ => None,
    }
}

/// An entry id as `(milliseconds, sequence)`.
fn parse_entry_id(entry_id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = entry_id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// A connection for the commands of this module: it times a connection
/// attempt out after 2 s and a command after 5 s (longer than the 1 s an
/// `XREAD` of [`follow`] blocks).
///
/// # Errors
///
/// If Redis cannot be reached, or refuses the connection.
pub async fn connect(client: &Client) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Adds the event `id` with `data` to the stream `key`: `XADD key [MAXLEN
/// ~ retain] <id>-1 data <data>`. With `retain`, Redis trims the stream to
/// about its newest `retain` entries (never fewer).
///
/// # Errors
///
/// If Redis does not answer, or refuses the entry: its id must be greater
/// than the stream's newest (Redis says `ERR The ID specified in XADD is
/// equal or smaller than the target stream top item`).
pub async fn add(
    connection: &mut impl ConnectionLike,
    key: &str,
    id: u64,
    data: &[u8],
    retain: Option<usize>,
) -> RedisResult<()> {
    add_command(key, id, data, retain)
        .query_async::<()>(connection)
        .await
}

/// The `XADD` of [`add`], for a pipeline of many.
///
/// ```
/// use tower_backpressure::bus::redis;
///
/// let mut pipeline = ::redis::pipe();
/// for id in 0..3 {
///     pipeline.add_command(redis::add_command("ticks", id, b"x", Some(1_000))).ignore();
/// }
/// ```
pub fn add_command(key: &str, id: u64, data: &[u8], retain: Option<usize>) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd("XADD");
    cmd.arg(key);
    if let Some(retain) = retain {
        cmd.arg("MAXLEN").arg("~").arg(retain);
    }
    cmd.arg(entry_id(id)).arg(DATA).arg(data);
    cmd
}

/// The id of the newest entry of the stream `key` (its first part: the
/// event's id for an entry of [`add`]), or `None` if there is no entry:
/// where a publisher that restarts continues.
///
/// # Errors
///
/// If Redis does not answer, or `key` is not a stream.
pub async fn last_id(connection: &mut impl ConnectionLike, key: &str) -> RedisResult<Option<u64>> {
    Ok(newest_entry(connection, key).await?.map(|(ms, _)| ms))
}

/// The newest entry id of `key`, as `(milliseconds, sequence)`.
async fn newest_entry(
    connection: &mut impl ConnectionLike,
    key: &str,
) -> RedisResult<Option<(u64, u64)>> {
    let entries: Vec<Entry> = ::redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(connection)
        .await?;
    Ok(entries.first().and_then(|(id, _)| parse_entry_id(id)))
}

/// One entry as Redis answers it: its id and its fields and values.
type Entry = (String, Vec<Vec<u8>>);

/// `XREAD`'s answer: per stream, its key and entries; `None` if nothing
/// came within the block.
type ReadReply = Option<Vec<(Vec<u8>, Vec<Entry>)>>;

/// The [`DATA`] field of an entry's fields and values.
fn data_of(fields: Vec<Vec<u8>>) -> Option<Bytes> {
    let mut fields = fields.into_iter();
    while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
        if field == DATA.as_bytes() {
            return Some(Bytes::from(value));
        }
    }
    None
}

/// The events of the stream `key` with ids after `after` and before
/// `before`, oldest first, at most `max`: what a client that saw `after`
/// missed, for a hub whose oldest frame is `before` (see
/// [`HubResponse::backfill`](crate::hub::HubResponse::backfill)). One
/// `XRANGE key <after + 1> <before - 1> COUNT max`; entries of another
/// format are left out. Fewer, or none, if the stream no longer retains
/// them.
///
/// # Errors
///
/// If Redis does not answer, or `key` is not a stream.
pub async fn history(
    connection: &mut impl ConnectionLike,
    key: &str,
    after: u64,
    before: u64,
    max: usize,
) -> RedisResult<Vec<(u64, Bytes)>> {
    if before <= after.saturating_add(1) || max == 0 {
        return Ok(Vec::new());
    }
    // An entry id without its sequence: from `<after + 1>-0` up to and
    // with `<before - 1>-<the largest sequence>`.
    let entries: Vec<Entry> = ::redis::cmd("XRANGE")
        .arg(key)
        .arg(after + 1)
        .arg(before - 1)
        .arg("COUNT")
        .arg(max)
        .query_async(connection)
        .await?;
    Ok(entries
        .into_iter()
        .filter_map(|(id, fields)| Some((event_id(&id)?, data_of(fields)?)))
        .collect())
}

/// Every event of the stream `key` after `after` (after its start with
/// `None`: every entry it retains), then every new one as it comes, as
/// `(id, data)`: see the [module docs](self#follow-reconnect-retention).
///
/// The stream never ends: it connects (recorded in `stats` as a connect,
/// [`FeedStats::record_connected`]), reads batches of up to 1,000 entries
/// with `XREAD BLOCK`, and after any error records a disconnect, waits
/// (50 ms, doubling up to 1 s) and connects again, to read on after the
/// last entry it read. Errors are logged with the `tracing` feature.
/// Entries that are not events of [`add`] are counted in `stats` and
/// dropped.
///
/// Feeding a hub that already holds frames: pass its newest id as
/// `after`.
pub fn follow(
    client: Client,
    key: impl Into<String>,
    after: Option<u64>,
    stats: FeedStats,
) -> impl Stream<Item = (u64, Bytes)> + Send + 'static {
    let follower = Follower {
        client,
        key: key.into(),
        cursor: after.map_or((0, 0), |id| (id, 1)),
        connection: None,
        pending: VecDeque::new(),
        stats,
        backoff: Duration::ZERO,
    };
    futures_util::stream::unfold(follower, |mut follower| async move {
        let next = follower.next().await;
        Some((next, follower))
    })
}

/// The state of [`follow`].
struct Follower {
    client: Client,
    key: String,
    /// The entry id read last (`(0, 0)`: none).
    cursor: (u64, u64),
    connection: Option<MultiplexedConnection>,
    /// Events read, not handed out yet.
    pending: VecDeque<(u64, Bytes)>,
    stats: FeedStats,
    /// The pause before the next connection attempt.
    backoff: Duration,
}

impl Follower {
    /// The next event: from what was read, else from Redis, reconnecting
    /// as long as it takes.
    async fn next(&mut self) -> (u64, Bytes) {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            if let Err(_e) = self.read().await {
                #[cfg(feature = "tracing")]
                tracing::warn!(key = %self.key, "Redis: {_e}");
                if self.connection.take().is_some() {
                    self.stats.record_disconnected();
                    #[cfg(feature = "tracing")]
                    tracing::warn!(
                        "disconnected from Redis: clients are served what the hub holds"
                    );
                }
                tokio::time::sleep(self.backoff).await;
                self.backoff = (self.backoff * 2).clamp(Duration::from_millis(50), MAX_BACKOFF);
            }
        }
    }

    /// Connects if needed, then reads one batch (or nothing, if no entry
    /// came within the block) into `pending`.
    async fn read(&mut self) -> RedisResult<()> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => {
                let mut connection = connect(&self.client).await?;
                // The stream may have gone back (Redis restarted without
                // its data): read on from its newest, or its start.
                let newest = newest_entry(&mut connection, &self.key)
                    .await?
                    .unwrap_or((0, 0));
                self.cursor = self.cursor.min(newest);
                self.stats.record_connected();
                #[cfg(feature = "tracing")]
                tracing::info!(
                    reconnects = self.stats.reconnects(),
                    key = %self.key,
                    "connected to Redis"
                );
                self.backoff = Duration::ZERO;
                self.connection.insert(connection)
            }
        };
        let (ms, seq) = self.cursor;
        let reply: ReadReply = ::redis::cmd("XREAD")
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(format!("{ms}-{seq}"))
            .query_async(connection)
            .await?;
        for (_key, entries) in reply.into_iter().flatten() {
            for (id, fields) in entries {
                if let Some(read) = parse_entry_id(&id) {
                    self.cursor = self.cursor.max(read);
                }
                match event_id(&id).zip(data_of(fields)) {
                    Some(event) => self.pending.push_back(event),
                    None => self.stats.record_invalid(),
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("key", &self.key)
            .field("cursor", &self.cursor)
            .field("connected", &self.connection.is_some())
            .field("pending", &self.pending.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_carry_the_event_id() {
        assert_eq!(entry_id(0), "0-1");
        assert_eq!(event_id("0-1"), Some(0));
        assert_eq!(event_id(&entry_id(u64::MAX)), Some(u64::MAX));
        for other in ["0-0", "5-2", "5", "x-1", "-1", "5-"] {
            assert_eq!(event_id(other), None, "{other}");
        }
    }

    #[test]
    fn data_is_the_data_field_whatever_else_the_entry_holds() {
        let fields = |f: &[&str]| f.iter().map(|s| s.as_bytes().to_vec()).collect();
        assert_eq!(
            data_of(fields(&["other", "1", "data", "hello"])),
            Some(Bytes::from("hello"))
        );
        assert_eq!(data_of(fields(&["other", "1"])), None);
        assert_eq!(data_of(fields(&["data"])), None);
    }

    #[test]
    fn xadd_with_and_without_a_retention() {
        let packed =
            |cmd: ::redis::Cmd| String::from_utf8_lossy(&cmd.get_packed_command()).into_owned();
        let with = packed(add_command("ticks", 7, b"x", Some(100)));
        assert!(with.contains("XADD\r\n$5\r\nticks\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$3\r\n100\r\n$3\r\n7-1\r\n$4\r\ndata\r\n$1\r\nx"), "{with:?}");
        let without = packed(add_command("ticks", 7, b"x", None));
        assert!(
            !without.contains("MAXLEN") && without.contains("7-1"),
            "{without:?}"
        );
    }
}
