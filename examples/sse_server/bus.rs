//! `--nats` and `--redis`: the hubs fed from a bus instead of the
//! producer, under the publisher's ids; with a bus that keeps a history
//! (`--jetstream`, Redis), resumes older than the SSE hub served from it.

use bytes::Bytes;
use tower_backpressure::Hub;
use tower_backpressure::bus::{FeedReport, FeedStats, Publish};
use tower_backpressure::hub::sse;

use super::{HubState, ndjson_line};

#[cfg(feature = "nats")]
pub(super) mod nats;
#[cfg(feature = "redis")]
pub(super) mod redis;

/// How far past the SSE hub's oldest frame a resume reads the history.
const OVERLAP: u64 = 1_000;

/// Both hubs take each event: the bus's id as the id, its data as the
/// `data:` of the SSE event and the `payload` of the NDJSON line.
impl Publish<Bytes> for HubState {
    fn newest_id(&self) -> Option<u64> {
        self.sse.newest_id()
    }

    fn publish_with_id(&self, id: u64, payload: Bytes) -> Result<(), Bytes> {
        let data = String::from_utf8_lossy(&payload);
        if self
            .sse
            .publish_with_id(id, sse::frame(id, None, &data))
            .is_err()
        {
            return Err(payload);
        }
        // The two hubs are fed together: if the SSE hub took the id, so
        // does this one.
        let _ = self
            .ndjson
            .publish_with_id(id, ndjson_line(id, &json_text(&data)));
        Ok(())
    }
}

/// `data` as the inside of a JSON string.
fn json_text(data: &str) -> String {
    let quoted = serde_json::to_string(data).expect("a string serializes");
    quoted[1..quoted.len() - 1].to_owned()
}

/// A bus feeding the hubs: its name (the `bus` label of its series), its
/// history for resumes if it keeps one, and its counters.
pub(super) struct Feeding {
    pub(super) bus: &'static str,
    pub(super) history: Option<History>,
    pub(super) stats: FeedStats,
}

/// Logs the end of a feed (a bus stream that ended: the hubs go on).
fn ended(bus: &'static str, source: String, stats: FeedStats) -> impl FnOnce(FeedReport) {
    move |report| tracing::warn!(%source, ?report, ?stats, "the {bus} feed ended")
}

/// Where resumes older than the SSE hub are served from.
#[derive(Clone)]
pub(super) enum History {
    /// `--jetstream`: the subject's JetStream stream.
    #[cfg(feature = "nats")]
    Nats(Box<nats::History>),
    /// `--redis`: the Redis stream.
    #[cfg(feature = "redis")]
    Redis(redis::History),
}

impl History {
    /// The SSE frames after `last` that `hub` no longer holds (or never
    /// had), from the history; empty if the hub holds them all, or on an
    /// error (the client then gets an exact gap marker).
    pub(super) async fn missed(&self, hub: &Hub, last: u64) -> Vec<(u64, Bytes)> {
        let (Some(oldest), Some(newest)) = (hub.oldest_id(), hub.newest_id()) else {
            return Vec::new();
        };
        if last.saturating_add(1) >= oldest {
            return Vec::new();
        }
        // A little past the hub's oldest: the hub lets frames go while
        // this reads, and the client would see those as a gap.
        let before = oldest.saturating_add(OVERLAP).min(newest + 1);
        let max = hub
            .config()
            .retain_frames()
            .saturating_add(OVERLAP as usize);
        let events = match self {
            #[cfg(feature = "nats")]
            History::Nats(history) => history.read(last, before, max).await,
            #[cfg(feature = "redis")]
            History::Redis(history) => history.read(last, before, max).await,
        };
        match events {
            Ok(events) => events
                .into_iter()
                .map(|(id, payload)| (id, sse::frame(id, None, &String::from_utf8_lossy(&payload))))
                .collect(),
            Err(e) => {
                tracing::warn!(last, "cannot read the bus's history: {e}");
                Vec::new()
            }
        }
    }
}
