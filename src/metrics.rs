//! An observer that records through the `metrics` crate facade (feature
//! `metrics`).

use std::collections::HashMap;
use std::sync::Mutex;

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};

use crate::info::ClientId;
use crate::observer::{BackpressureEvent, BackpressureObserver, EventKind};

/// Records backpressure through the [`metrics`] facade (feature `metrics`).
///
/// | metric | kind | labels |
/// |---|---|---|
/// | `backpressure_streams_opened_total` | counter | `route` |
/// | `backpressure_streams_closed_total` | counter | `route`, `reason` (`completed`, `client_gone`, `inner_error`, `evicted`) |
/// | `backpressure_frames_dropped_total` | counter | `route` |
/// | `backpressure_clients_under_pressure` | gauge | `route` |
/// | `backpressure_buffered_frames` | gauge | `route` |
/// | `backpressure_buffered_bytes` | gauge | `route` |
///
/// `route` is the route template when known (axum's `MatchedPath`, with the
/// crate's `axum` feature), else the request path. Paths with ids in them
/// make many label values: serve such streams from axum routes, or use
/// [`MetricsObserver::route_label`] to name them.
///
/// The buffered gauges move with each event (a drop batch, a pressure
/// crossing, a close), so between events they show the last reported level.
///
/// To export to Prometheus, install a recorder such as
/// `metrics-exporter-prometheus`'s at startup, and
/// [`describe`](MetricsObserver::describe) the series for its `# HELP`
/// lines (the `sse_server` example serves them at `GET /metrics`):
///
/// ```text
/// let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
///     .install_recorder()
///     .unwrap();
/// MetricsObserver::describe();
/// // ... serve `handle.render()` at GET /metrics
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
#[derive(Debug, Default)]
pub struct MetricsObserver {
    route: Option<String>,
    levels: Mutex<HashMap<ClientId, Level>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Level {
    frames: usize,
    bytes: usize,
    pressure: bool,
}

impl MetricsObserver {
    /// An observer that labels by route (or path).
    pub fn new() -> Self {
        Self::default()
    }

    /// Labels every metric with this `route` instead.
    pub fn route_label(mut self, route: impl Into<String>) -> Self {
        self.route = Some(route.into());
        self
    }

    /// Describes every series this observer records (help text and unit)
    /// to the installed recorder: call it once, after installing one.
    /// Exporters show it (Prometheus's `# HELP` lines); recording works
    /// without it.
    pub fn describe() {
        describe_counter!(
            "backpressure_streams_opened_total",
            Unit::Count,
            "Responses wrapped by the backpressure layer."
        );
        describe_counter!(
            "backpressure_streams_closed_total",
            Unit::Count,
            "Wrapped responses that ended, by reason."
        );
        describe_counter!(
            "backpressure_frames_dropped_total",
            Unit::Count,
            "Frames dropped for slow clients."
        );
        describe_gauge!(
            "backpressure_clients_under_pressure",
            Unit::Count,
            "Open clients whose buffer is past the pressure threshold."
        );
        describe_gauge!(
            "backpressure_buffered_frames",
            Unit::Count,
            "Frames waiting in the open clients' buffers, as last reported."
        );
        describe_gauge!(
            "backpressure_buffered_bytes",
            Unit::Bytes,
            "Bytes waiting in the open clients' buffers, as last reported."
        );
    }
}

impl BackpressureObserver for MetricsObserver {
    fn on_event(&self, event: &BackpressureEvent<'_>) {
        let route = match &self.route {
            Some(r) => r.clone(),
            None => event
                .client
                .route()
                .unwrap_or_else(|| event.client.path())
                .to_owned(),
        };
        let id = event.client.id();
        let mut levels = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        let before = levels.get(&id).copied().unwrap_or_default();
        let mut after = Level {
            frames: event.stats.buffered,
            bytes: event.stats.buffered_bytes,
            pressure: before.pressure,
        };
        match event.kind {
            EventKind::Opened => {
                counter!("backpressure_streams_opened_total", "route" => route.clone()).increment(1)
            }
            EventKind::Pressure => after.pressure = true,
            EventKind::Recovered => after.pressure = false,
            EventKind::Dropped { count, .. } => {
                counter!("backpressure_frames_dropped_total", "route" => route.clone())
                    .increment(count)
            }
            EventKind::Closed { reason } => {
                counter!(
                    "backpressure_streams_closed_total",
                    "route" => route.clone(),
                    "reason" => reason.as_str()
                )
                .increment(1);
                after = Level::default();
            }
        }
        if after.pressure != before.pressure {
            let g = gauge!("backpressure_clients_under_pressure", "route" => route.clone());
            if after.pressure {
                g.increment(1.0)
            } else {
                g.decrement(1.0)
            }
        }
        if after.frames != before.frames {
            gauge!("backpressure_buffered_frames", "route" => route.clone())
                .increment(after.frames as f64 - before.frames as f64);
        }
        if after.bytes != before.bytes {
            gauge!("backpressure_buffered_bytes", "route" => route)
                .increment(after.bytes as f64 - before.bytes as f64);
        }
        if matches!(event.kind, EventKind::Closed { .. }) {
            levels.remove(&id);
        } else {
            levels.insert(id, after);
        }
    }
}
