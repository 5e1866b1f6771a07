//! `GET /dashboard`: one self-contained HTML page (inline CSS and script, no
//! external asset) that shows every client live, and `GET /health/hub`, the
//! hubs' numbers it needs besides `/health/clients`.
//!
//! The page fetches `/health/clients` and `/health/hub` about once a second
//! and draws:
//! - a row per client (`/health/clients`): its buffer's fill against its
//!   limits in frames and in bytes, as bars; frames sent and dropped; its
//!   health; how long it has been idle (taken no frame) and open;
//! - with `--hub`, a row per hub (`/health/hub`): the frames and bytes its
//!   log retains against the retention's limits, the oldest and newest ids,
//!   frames published, frames the retention let go of, subscribers;
//! - the shared memory budget, when the server has one.

use axum::Json;
use axum::response::Html;
use axum::routing::{MethodRouter, get};
use tower_backpressure::Hub;

/// The page.
const PAGE: &str = include_str!("dashboard.html");

/// `GET /dashboard`.
pub(crate) fn page<S: Clone + Send + Sync + 'static>() -> MethodRouter<S> {
    get(|| async { Html(PAGE) })
}

/// `GET /health/hub`: `{"hubs":[{"route":…,"published":…,…}]}`, one entry
/// per hub (none without `--hub`). Each entry:
///
/// | field | meaning |
/// |---|---|
/// | `route` | the route the hub serves |
/// | `published` | frames ever published |
/// | `dropped` | frames the retention let go of |
/// | `subscribers` | live subscriptions and client windows |
/// | `retained`, `retained_bytes` | frames and bytes the log holds |
/// | `retain_frames`, `retain_bytes` | the retention's limits (`retain_bytes` `null`: none) |
/// | `oldest_id`, `newest_id` | ids of the oldest retained and newest published frame (`null`: none yet) |
pub(crate) fn hub_health<S: Clone + Send + Sync + 'static>(
    hubs: Vec<(&'static str, Hub)>,
) -> MethodRouter<S> {
    get(move || {
        let hubs: Vec<serde_json::Value> = hubs
            .iter()
            .map(|(route, hub)| {
                let config = hub.config();
                serde_json::json!({
                    "route": route,
                    "published": hub.published(),
                    "dropped": hub.dropped(),
                    "subscribers": hub.subscribers(),
                    "retained": hub.retained(),
                    "retained_bytes": hub.retained_bytes(),
                    "retain_frames": config.retain_frames(),
                    "retain_bytes": config.retain_bytes(),
                    "oldest_id": hub.oldest_id(),
                    "newest_id": hub.newest_id(),
                })
            })
            .collect();
        async move {
            (
                [(axum::http::header::CACHE_CONTROL, "no-store")],
                Json(serde_json::json!({ "hubs": hubs })),
            )
        }
    })
}
