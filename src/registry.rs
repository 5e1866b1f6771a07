//! A live table of every buffered response, and a `/health/clients` service.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use tower_service::Service;

use crate::budget::{BudgetStats, MemoryBudget};
use crate::handle::{ClientHandle, Health};
use crate::info::ClientId;
use crate::observer::{BackpressureEvent, BackpressureObserver, EventKind};

/// An observer that keeps a live table of every buffered response.
///
/// An entry appears when a response is wrapped (`Opened`) and leaves when it
/// closes, including when the client disconnects, so the table never grows
/// past the streams that are open. A [`snapshot`](Self::snapshot) copies a
/// few numbers per client, locking each client's buffer briefly and one at a
/// time: it never blocks the streams for long.
///
/// Serve it with [`service`](Self::service), e.g. as axum's
/// `route_service("/health/clients", registry.service())`.
///
/// ```
/// use tower_backpressure::{BackpressureLayer, BufferConfig, ClientRegistry, TracingObserver};
///
/// let registry = ClientRegistry::new();
/// let layer = BackpressureLayer::new(BufferConfig::default())
///     .observer((registry.clone(), TracingObserver::new()));
/// let health = registry.service(); // GET -> {"clients":[...],"totals":{...}}
/// assert!(registry.is_empty());
/// # let _ = (layer, health);
/// ```
#[derive(Clone, Default)]
pub struct ClientRegistry {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    clients: Mutex<BTreeMap<ClientId, ClientHandle>>,
    budget: Mutex<Option<MemoryBudget>>,
}

impl ClientRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also reports this budget's totals in snapshots.
    pub fn with_budget(self, budget: MemoryBudget) -> Self {
        *self.inner.budget.lock().unwrap_or_else(|e| e.into_inner()) = Some(budget);
        self
    }

    fn clients(&self) -> MutexGuard<'_, BTreeMap<ClientId, ClientHandle>> {
        self.inner.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open buffered responses.
    pub fn len(&self) -> usize {
        self.clients().len()
    }

    /// No open buffered response.
    pub fn is_empty(&self) -> bool {
        self.clients().is_empty()
    }

    /// The handle of one open client.
    pub fn get(&self, id: ClientId) -> Option<ClientHandle> {
        self.clients().get(&id).cloned()
    }

    /// Handles of every open client, by id.
    pub fn handles(&self) -> Vec<ClientHandle> {
        self.clients().values().cloned().collect()
    }

    /// A copy of the table now.
    pub fn snapshot(&self) -> RegistrySnapshot {
        // Copy the handles, then read each client without the table's lock.
        let handles = self.handles();
        let now = SystemTime::now();
        let clients: Vec<ClientSnapshot> = handles
            .iter()
            .filter_map(|h| {
                let stats = h.stats()?;
                let info = h.info();
                Some(ClientSnapshot {
                    id: info.id().as_u64(),
                    peer: info.peer_addr(),
                    method: info.method().to_string(),
                    path: info.path().to_owned(),
                    route: info.route().map(str::to_owned),
                    opened_at_ms: millis(
                        h.opened_at().duration_since(UNIX_EPOCH).unwrap_or_default(),
                    ),
                    age_ms: millis(now.duration_since(h.opened_at()).unwrap_or_default()),
                    healthy: h.health() != Health::Pressure && stats.healthy,
                    buffered: stats.buffered,
                    buffered_bytes: stats.buffered_bytes,
                    capacity: stats.capacity,
                    max_bytes: stats.max_bytes,
                    dropped: stats.dropped,
                    sent: stats.sent,
                    high_water: stats.high_water,
                    idle_ms: millis(h.idle().unwrap_or_default()),
                })
            })
            .collect();
        let totals = Totals {
            clients: clients.len(),
            unhealthy: clients.iter().filter(|c| !c.healthy).count(),
            buffered: clients.iter().map(|c| c.buffered).sum(),
            buffered_bytes: clients.iter().map(|c| c.buffered_bytes).sum(),
            dropped: clients.iter().map(|c| c.dropped).sum(),
            sent: clients.iter().map(|c| c.sent).sum(),
        };
        let budget = self
            .inner
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(MemoryBudget::stats);
        RegistrySnapshot {
            clients,
            totals,
            budget,
        }
    }

    /// A tower service that answers `GET` with the snapshot as JSON and
    /// anything else with `405 Method Not Allowed`.
    pub fn service(&self) -> HealthService {
        HealthService {
            registry: self.clone(),
        }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

impl BackpressureObserver for ClientRegistry {
    fn on_event(&self, event: &BackpressureEvent<'_>) {
        match event.kind {
            EventKind::Opened => {
                self.clients().insert(event.client.id(), event.handle());
            }
            EventKind::Closed { .. } => {
                self.clients().remove(&event.client.id());
            }
            _ => {}
        }
    }
}

impl fmt::Debug for ClientRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRegistry")
            .field("clients", &self.len())
            .finish()
    }
}

/// One client in a [`RegistrySnapshot`].
///
/// `Serialize` with the `serde` feature.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ClientSnapshot {
    /// The process-unique id.
    pub id: u64,
    /// The peer address, when known.
    pub peer: Option<SocketAddr>,
    /// The request method.
    pub method: String,
    /// The request path.
    pub path: String,
    /// The route template, when known.
    pub route: Option<String>,
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub opened_at_ms: u64,
    /// How long it has been open.
    pub age_ms: u64,
    /// Below the pressure threshold.
    pub healthy: bool,
    /// Frames waiting.
    pub buffered: usize,
    /// Bytes waiting.
    pub buffered_bytes: usize,
    /// The frame limit.
    pub capacity: usize,
    /// The byte limit.
    pub max_bytes: Option<usize>,
    /// Frames dropped.
    pub dropped: u64,
    /// Frames handed to the connection.
    pub sent: u64,
    /// The most frames waiting at once.
    pub high_water: usize,
    /// Time since the client last took a frame.
    pub idle_ms: u64,
}

/// Sums over the clients of a [`RegistrySnapshot`].
///
/// `Serialize` with the `serde` feature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Totals {
    /// Open buffered responses.
    pub clients: usize,
    /// Of them, under pressure.
    pub unhealthy: usize,
    /// Frames waiting.
    pub buffered: usize,
    /// Bytes waiting.
    pub buffered_bytes: usize,
    /// Frames dropped by the open clients.
    pub dropped: u64,
    /// Frames sent to the open clients.
    pub sent: u64,
}

/// A copy of a [`ClientRegistry`]'s table.
///
/// `Serialize` with the `serde` feature.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct RegistrySnapshot {
    /// Every open client, by id.
    pub clients: Vec<ClientSnapshot>,
    /// Sums over them.
    pub totals: Totals,
    /// The shared memory budget, if the registry was given one.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub budget: Option<BudgetStats>,
}

impl RegistrySnapshot {
    /// The snapshot as JSON: `{"clients":[…],"totals":{…}}` (and
    /// `"budget":{…}` when there is one). No serde needed.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64 + 320 * self.clients.len());
        out.push_str("{\"clients\":[");
        for (i, c) in self.clients.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{{\"id\":{},\"peer\":", c.id);
            match c.peer {
                Some(p) => json_str(&mut out, &p.to_string()),
                None => out.push_str("null"),
            }
            out.push_str(",\"method\":");
            json_str(&mut out, &c.method);
            out.push_str(",\"path\":");
            json_str(&mut out, &c.path);
            out.push_str(",\"route\":");
            match &c.route {
                Some(r) => json_str(&mut out, r),
                None => out.push_str("null"),
            }
            let _ = write!(
                out,
                ",\"opened_at_ms\":{},\"age_ms\":{},\"healthy\":{},\"buffered\":{},\"buffered_bytes\":{},\"capacity\":{},\"max_bytes\":{},\"dropped\":{},\"sent\":{},\"high_water\":{},\"idle_ms\":{}}}",
                c.opened_at_ms,
                c.age_ms,
                c.healthy,
                c.buffered,
                c.buffered_bytes,
                c.capacity,
                c.max_bytes.map_or("null".to_owned(), |m| m.to_string()),
                c.dropped,
                c.sent,
                c.high_water,
                c.idle_ms,
            );
        }
        let t = &self.totals;
        let _ = write!(
            out,
            "],\"totals\":{{\"clients\":{},\"unhealthy\":{},\"buffered\":{},\"buffered_bytes\":{},\"dropped\":{},\"sent\":{}}}",
            t.clients, t.unhealthy, t.buffered, t.buffered_bytes, t.dropped, t.sent
        );
        if let Some(b) = &self.budget {
            let _ = write!(
                out,
                ",\"budget\":{{\"limit\":{},\"used\":{},\"peak\":{},\"dropped\":{},\"clients\":{}}}",
                b.limit, b.used, b.peak, b.dropped, b.clients
            );
        }
        out.push('}');
        out
    }
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Serves a [`ClientRegistry`] as JSON; see [`ClientRegistry::service`].
#[derive(Clone, Debug)]
pub struct HealthService {
    registry: ClientRegistry,
}

impl<B> Service<Request<B>> for HealthService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let response = if req.method() == Method::GET || req.method() == Method::HEAD {
            let mut res = Response::new(Full::new(Bytes::from(self.registry.snapshot().to_json())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        } else {
            let mut res = Response::new(Full::new(Bytes::from_static(b"method not allowed\n")));
            *res.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            res
        };
        ready(Ok(response))
    }
}
