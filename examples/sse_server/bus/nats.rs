//! `--nats URL [--subject S] [--jetstream]`.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tower_backpressure::BoxError;
use tower_backpressure::bus::{self, FeedStats, nats};

use super::{Feeding, HubState, ended};

/// The retention of a JetStream stream made here: `nats_publisher`'s
/// default.
const STREAM_RETAIN: i64 = 10_000;

/// How long connecting to NATS may take at start.
const CONNECT: Duration = Duration::from_secs(10);

/// `--jetstream`: the subject's stream, for resumes older than the hub.
#[derive(Clone)]
pub(crate) struct History {
    stream: jetstream::stream::Stream,
    subject: String,
}

impl History {
    /// The events after `after` and before `before`, at most `max`.
    pub(crate) async fn read(
        &self,
        after: u64,
        before: u64,
        max: usize,
    ) -> Result<Vec<(u64, Bytes)>, BoxError> {
        nats::history(&self.stream, &self.subject, after, before, max).await
    }
}

/// Connects, subscribes, and feeds `state`'s hubs from `subject` in a
/// task of its own. Returns the history with `jetstream`.
pub(crate) async fn start(
    state: &HubState,
    url: &str,
    subject: &str,
    jetstream: bool,
) -> Result<Feeding, String> {
    let stats = FeedStats::new();
    let mut feeding = Feeding {
        bus: "nats",
        history: None,
        stats: stats.clone(),
    };
    let cannot = |e: &dyn std::fmt::Display| format!("cannot connect to NATS at {url}: {e}");
    let client = tokio::time::timeout(CONNECT, nats::connect_options(&stats).connect(url))
        .await
        .map_err(|_| cannot(&format!("timed out after {CONNECT:?}")))?
        .map_err(|e| cannot(&e))?;
    let hubs = state.clone();
    let ended = ended("NATS", format!("subject {subject}"), stats.clone());
    if jetstream {
        let context = jetstream::new(client);
        // Made here too if the publisher has not made it yet, as it would.
        let stream = nats::create_stream(&context, subject, STREAM_RETAIN)
            .await
            .map_err(|e| format!("--jetstream (is nats-server running with -js?): {e}"))?;
        let events = nats::follow(&stream, subject, stats.clone())
            .await
            .map_err(|e| format!("--jetstream: cannot follow the stream: {e}"))?;
        tokio::spawn(async move { ended(bus::feed(&hubs, &stats, events).await) });
        let history = History {
            stream,
            subject: subject.to_owned(),
        };
        feeding.history = Some(super::History::Nats(Box::new(history)));
    } else {
        let subscriber = client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| format!("cannot subscribe to {subject:?}: {e}"))?;
        // The server has the subscription before this one listens.
        client
            .flush()
            .await
            .map_err(|e| format!("cannot subscribe to {subject:?}: {e}"))?;
        let events = nats::messages(subscriber, stats.clone());
        tokio::spawn(async move {
            // The client must live as long as its subscription.
            let _client = client;
            ended(bus::feed(&hubs, &stats, events).await)
        });
    }
    Ok(feeding)
}
