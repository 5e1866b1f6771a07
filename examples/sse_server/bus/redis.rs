//! `--redis URL [--stream KEY]`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;
use tower_backpressure::BoxError;
use tower_backpressure::bus::{self, FeedStats, redis as bus_redis};

use super::{Feeding, HubState, ended};

/// How long connecting to Redis may take at start.
const CONNECT: Duration = Duration::from_secs(10);

/// The Redis stream, for resumes older than the hub: one multiplexed
/// connection shared by every resume (each takes a clone, so that resumes
/// do not wait for each other), made again after an error.
#[derive(Clone)]
pub(crate) struct History {
    client: redis::Client,
    key: String,
    connection: Arc<Mutex<Option<MultiplexedConnection>>>,
}

impl History {
    /// The events after `after` and before `before`, at most `max`: one
    /// `XRANGE`.
    pub(crate) async fn read(
        &self,
        after: u64,
        before: u64,
        max: usize,
    ) -> Result<Vec<(u64, Bytes)>, BoxError> {
        let mut connection = {
            let mut shared = self.connection.lock().await;
            match shared.as_ref() {
                Some(connection) => connection.clone(),
                None => shared
                    .insert(bus_redis::connect(&self.client).await?)
                    .clone(),
            }
        };
        let read = bus_redis::history(&mut connection, &self.key, after, before, max).await;
        if read.is_err() {
            // Made again at the next resume.
            *self.connection.lock().await = None;
        }
        Ok(read?)
    }
}

/// Connects (so that a wrong URL or a Redis that is not there is an error
/// before the server listens), and feeds `state`'s hubs from the stream
/// `key` in a task of its own: every event the stream retains (the hubs
/// start warm), then the new ones. Returns the history for resumes.
pub(crate) async fn start(state: &HubState, url: &str, key: &str) -> Result<Feeding, String> {
    let cannot = |e: &dyn std::fmt::Display| format!("cannot connect to Redis at {url}: {e}");
    let client = redis::Client::open(url).map_err(|e| cannot(&e))?;
    let mut connection = tokio::time::timeout(CONNECT, bus_redis::connect(&client))
        .await
        .map_err(|_| cannot(&format!("timed out after {CONNECT:?}")))?
        .map_err(|e| cannot(&e))?;
    // A key that holds something else than a stream is refused now.
    bus_redis::last_id(&mut connection, key)
        .await
        .map_err(|e| format!("cannot read the Redis stream {key:?}: {e}"))?;
    let stats = FeedStats::new();
    let scraped = stats.clone();
    let hubs = state.clone();
    let ended = ended("Redis", format!("stream {key}"), stats.clone());
    let events = bus_redis::follow(client.clone(), key, None, stats.clone());
    tokio::spawn(async move { ended(bus::feed(&hubs, &stats, events).await) });
    let history = History {
        client,
        key: key.to_owned(),
        connection: Arc::new(Mutex::new(Some(connection))),
    };
    Ok(Feeding {
        bus: "redis",
        history: Some(super::History::Redis(history)),
        stats: scraped,
    })
}
