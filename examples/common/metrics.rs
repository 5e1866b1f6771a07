//! `GET /metrics`: the Prometheus text exposition of an example server.
//!
//! `metrics-exporter-prometheus`'s recorder is installed without its own
//! HTTP listener; the server's route renders its [`PrometheusHandle`]. The
//! series come two ways:
//!
//! - as they happen: the layer's `backpressure_*` series, which
//!   [`MetricsObserver`](tower_backpressure::MetricsObserver) records on
//!   each backpressure event (labelled by `route`);
//! - at each scrape, from sources: every closure given to
//!   [`Metrics::on_scrape`] runs before the text is rendered and sets its
//!   gauges (and its counters, with `absolute`) from a stats getter. The
//!   hubs ([`hub_series`]) and the client registry ([`registry_series`])
//!   are such sources; another one (a bus's reconnects and gap ids, say) is
//!   one more function like these and one more `on_scrape`.
//!
//! Names follow Prometheus conventions: counters, and only they, end in
//! `_total`; units are base units (`_bytes`). No label names a client: a
//! route label at most, so that the series stay few whatever the number of
//! clients.

use std::sync::Arc;

use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get};
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_backpressure::{ClientRegistry, Hub, MetricsObserver};

/// The Prometheus text format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Sets gauges and counters from a source, at each scrape.
type Source = Arc<dyn Fn() + Send + Sync>;

/// The installed recorder's handle and the sources read at each scrape.
#[derive(Clone)]
pub(crate) struct Metrics {
    handle: PrometheusHandle,
    sources: Vec<Source>,
}

impl Metrics {
    /// Installs the Prometheus recorder as the global `metrics` recorder
    /// (without an HTTP listener), and describes the layer's series.
    ///
    /// Fails if a recorder is installed already.
    pub(crate) fn install() -> Result<Self, String> {
        let handle = PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
        MetricsObserver::describe();
        Ok(Self {
            handle,
            sources: Vec::new(),
        })
    }

    /// Runs `source` at each scrape, before rendering: it sets its series
    /// from its stats.
    pub(crate) fn on_scrape(mut self, source: impl Fn() + Send + Sync + 'static) -> Self {
        self.sources.push(Arc::new(source));
        self
    }

    /// Every series, in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        for source in &self.sources {
            source();
        }
        // The recorder's periodic maintenance (it drains histograms, which
        // none of these series is); at each scrape instead of on a timer.
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// `GET /metrics`.
    pub(crate) fn route<S: Clone + Send + Sync + 'static>(self) -> MethodRouter<S> {
        get(move || {
            let text = self.render();
            async move {
                let mut response = text.into_response();
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
                response
            }
        })
    }
}

/// The series of the hub that serves `route`, read at each scrape:
///
/// | metric | kind |
/// |---|---|
/// | `backpressure_hub_frames_published_total` | counter |
/// | `backpressure_hub_frames_dropped_total` | counter: frames the retention let go of |
/// | `backpressure_hub_subscribers` | gauge |
/// | `backpressure_hub_retained_frames` | gauge |
/// | `backpressure_hub_retained_bytes` | gauge |
///
/// each with the label `route`.
pub(crate) fn hub_series(route: &'static str, hub: Hub) -> impl Fn() + Send + Sync + 'static {
    describe_counter!(
        "backpressure_hub_frames_published_total",
        Unit::Count,
        "Frames published into the hub's shared log."
    );
    describe_counter!(
        "backpressure_hub_frames_dropped_total",
        Unit::Count,
        "Frames the hub's retention let go of (a gap for any subscriber that had not read them)."
    );
    describe_gauge!(
        "backpressure_hub_subscribers",
        Unit::Count,
        "Live subscriptions and client windows over the hub's log."
    );
    describe_gauge!(
        "backpressure_hub_retained_frames",
        Unit::Count,
        "Frames the hub's log holds (one copy each, whatever the number of subscribers)."
    );
    describe_gauge!(
        "backpressure_hub_retained_bytes",
        Unit::Bytes,
        "Bytes of the frames the hub's log holds."
    );
    move || {
        let labels = [("route", route)];
        counter!("backpressure_hub_frames_published_total", &labels).absolute(hub.published());
        counter!("backpressure_hub_frames_dropped_total", &labels).absolute(hub.dropped());
        gauge!("backpressure_hub_subscribers", &labels).set(hub.subscribers() as f64);
        gauge!("backpressure_hub_retained_frames", &labels).set(hub.retained() as f64);
        gauge!("backpressure_hub_retained_bytes", &labels).set(hub.retained_bytes() as f64);
    }
}

/// `backpressure_clients_open` (gauge): the responses the layer serves now,
/// as the registry behind `/health/clients` lists them; read at each scrape.
pub(crate) fn registry_series(registry: ClientRegistry) -> impl Fn() + Send + Sync + 'static {
    describe_gauge!(
        "backpressure_clients_open",
        Unit::Count,
        "Open responses served through the backpressure layer."
    );
    move || gauge!("backpressure_clients_open").set(registry.len() as f64)
}

/// The bus feed's series (`sse_server --hub --nats` or `--redis`), read at
/// each scrape from its [`FeedStats`](tower_backpressure::bus::FeedStats),
/// each labelled `bus` (`nats`, `redis`):
///
/// | metric | kind |
/// |---|---|
/// | `backpressure_bus_frames_fed_total` | counter: events published into the hubs |
/// | `backpressure_bus_frames_missed_total` | counter: ids that never arrived (the gaps subscribers see) |
/// | `backpressure_bus_duplicates_total` | counter: redeliveries skipped |
/// | `backpressure_bus_invalid_total` | counter: messages without a valid `Event-Id` |
/// | `backpressure_bus_outliers_total` | counter: messages whose id was too far from the newest |
/// | `backpressure_bus_epochs_total` | counter: new epochs (the publisher's ids moved for good) |
/// | `backpressure_bus_reconnects_total` | counter |
/// | `backpressure_bus_disconnects_total` | counter |
/// | `backpressure_bus_connected` | gauge: 1 while connected |
#[allow(dead_code)] // Used only when built with the `nats` or `redis` feature.
pub(crate) fn bus_series(
    bus: &'static str,
    stats: tower_backpressure::bus::FeedStats,
) -> impl Fn() + Send + Sync + 'static {
    let counters = [
        (
            "backpressure_bus_frames_fed_total",
            "Events from the bus published into the hubs.",
        ),
        (
            "backpressure_bus_frames_missed_total",
            "Event ids that never arrived from the bus: gaps that subscribers see with their exact count.",
        ),
        (
            "backpressure_bus_duplicates_total",
            "Redelivered events skipped.",
        ),
        (
            "backpressure_bus_invalid_total",
            "Bus messages without a valid event id (NATS: Event-Id header; Redis: entry id <id>-1 with a data field).",
        ),
        (
            "backpressure_bus_outliers_total",
            "Bus messages skipped because their event id was too far from the newest.",
        ),
        (
            "backpressure_bus_epochs_total",
            "Times the publisher's ids moved far for good (a restart): a new epoch.",
        ),
        (
            "backpressure_bus_reconnects_total",
            "Reconnections to the bus after an outage.",
        ),
        (
            "backpressure_bus_disconnects_total",
            "Outages: the connection to the bus lost.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, Unit::Count, help);
    }
    describe_gauge!(
        "backpressure_bus_connected",
        Unit::Count,
        "1 while the connection to the bus is up, else 0."
    );
    move || {
        let labels = [("bus", bus)];
        counter!("backpressure_bus_frames_fed_total", &labels).absolute(stats.fed());
        counter!("backpressure_bus_frames_missed_total", &labels).absolute(stats.missed());
        counter!("backpressure_bus_duplicates_total", &labels).absolute(stats.duplicates());
        counter!("backpressure_bus_invalid_total", &labels).absolute(stats.invalid());
        counter!("backpressure_bus_outliers_total", &labels).absolute(stats.outliers());
        counter!("backpressure_bus_epochs_total", &labels).absolute(stats.epochs());
        counter!("backpressure_bus_reconnects_total", &labels).absolute(stats.reconnects());
        counter!("backpressure_bus_disconnects_total", &labels).absolute(stats.disconnects());
        let connected = if stats.is_connected() { 1.0 } else { 0.0 };
        gauge!("backpressure_bus_connected", &labels).set(connected);
    }
}
