//! Who a wrapped response is streaming to.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Extensions, Method, Uri};

use crate::conn::Connection;

/// A process-unique identifier of one wrapped response.
///
/// Ids start at 1 and increase; they are never reused within a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(u64);

impl ClientId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The id as a number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The peer address of a connection, as a request extension.
///
/// [`BackpressureLayer`](crate::BackpressureLayer) reads the client's address
/// from this extension, or (with the `axum` feature) from axum's
/// `ConnectInfo<SocketAddr>`. A hand-written hyper server inserts it before
/// calling the service:
///
/// ```
/// use tower_backpressure::PeerAddr;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(PeerAddr("127.0.0.1:50000".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// The identity of one streaming response: who it goes to and what it
/// answers.
///
/// Every [`BackpressureEvent`](crate::BackpressureEvent) carries one.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    id: ClientId,
    peer: Option<SocketAddr>,
    method: Method,
    uri: Uri,
    route: Option<Arc<str>>,
}

impl ClientInfo {
    /// Identity for a request that is being answered now, with a fresh id.
    pub fn new(method: Method, uri: Uri, peer: Option<SocketAddr>) -> Self {
        Self {
            id: ClientId::next(),
            peer,
            method,
            uri,
            route: None,
        }
    }

    /// Sets the route template (e.g. `/rooms/{id}/events`), a low-cardinality
    /// name for metrics.
    pub fn with_route(mut self, route: impl Into<Arc<str>>) -> Self {
        self.route = Some(route.into());
        self
    }

    /// The route template, when known: with the `axum` feature, from axum's
    /// `MatchedPath`.
    pub fn route(&self) -> Option<&str> {
        self.route.as_deref()
    }

    /// The process-unique id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The peer's address, when the request carried one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request's URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The request's path.
    pub fn path(&self) -> &str {
        self.uri.path()
    }
}

/// Reads the route template from a request's extensions.
pub(crate) fn route(_extensions: &Extensions) -> Option<Arc<str>> {
    #[cfg(feature = "axum")]
    if let Some(m) = _extensions.get::<axum::extract::MatchedPath>() {
        return Some(interned(m.as_str()));
    }
    None
}

/// The one `Arc<str>` of `route`: every client of a route names the same,
/// so it is allocated once per route, not once per client. Up to
/// [`INTERNED`] routes are kept; past that each client gets its own.
#[cfg(feature = "axum")]
fn interned(route: &str) -> Arc<str> {
    static ROUTES: std::sync::Mutex<Vec<Arc<str>>> = std::sync::Mutex::new(Vec::new());
    let mut routes = ROUTES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = routes.iter().find(|known| ***known == *route) {
        return known.clone();
    }
    let new: Arc<str> = Arc::from(route);
    if routes.len() < INTERNED {
        routes.push(new.clone());
    }
    new
}

/// How many routes [`interned`] keeps.
#[cfg(feature = "axum")]
const INTERNED: usize = 256;

/// Reads the handle that closes the request's connection.
pub(crate) fn connection(extensions: &Extensions) -> Option<Connection> {
    if let Some(connection) = extensions.get::<Connection>() {
        return Some(connection.clone());
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(info)) =
        extensions.get::<axum::extract::ConnectInfo<crate::conn::ConnectionInfo>>()
    {
        return Some(info.connection.clone());
    }
    None
}

/// Reads the peer address from a request's extensions.
pub(crate) fn peer_addr(extensions: &Extensions) -> Option<SocketAddr> {
    if let Some(PeerAddr(addr)) = extensions.get::<PeerAddr>() {
        return Some(*addr);
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(info)) =
        extensions.get::<axum::extract::ConnectInfo<crate::conn::ConnectionInfo>>()
    {
        return Some(info.peer);
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(*addr);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_increasing() {
        let a = ClientInfo::new(Method::GET, Uri::from_static("/a"), None);
        let b = ClientInfo::new(Method::GET, Uri::from_static("/b"), None);
        assert!(b.id() > a.id());
        assert_eq!(b.path(), "/b");
    }

    #[test]
    fn peer_addr_comes_from_the_extension() {
        let mut ext = Extensions::new();
        assert_eq!(peer_addr(&ext), None);
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        ext.insert(PeerAddr(addr));
        assert_eq!(peer_addr(&ext), Some(addr));
    }

    #[cfg(feature = "axum")]
    #[test]
    fn peer_addr_comes_from_axum_connect_info() {
        let mut ext = Extensions::new();
        let addr: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        ext.insert(axum::extract::ConnectInfo(addr));
        assert_eq!(peer_addr(&ext), Some(addr));
    }
}
