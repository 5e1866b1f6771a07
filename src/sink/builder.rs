//! [`Builder`]: configures and spawns a [`BufferedSink`].

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_sink::Sink;
use http::{Method, Uri};

use super::drain::Drain;

use super::{BufferedSink, Core, HubSink};
use crate::BoxError;
use crate::budget::MemoryBudget;
use crate::buffer::{ByWeigh, ClientBuffer, Weigher};
use crate::client::{Client, Reporter};
use crate::config::{BufferConfig, ConfigError};
use crate::conn::Connection;
use crate::handle::HandleInner;
use crate::hub::{Hub, window_client};
use crate::info::ClientInfo;
use crate::observer::BackpressureObserver;
use crate::policy::{Classify, GapMarker};

/// Builds a [`BufferedSink`]; from [`BufferedSink::builder`].
///
/// Pluggable parts change the builder's type, as on
/// [`BackpressureLayer`](crate::BackpressureLayer). A builder is `Clone`
/// when its parts are: keep one per server and clone it for each client.
pub struct Builder<O = (), M = (), C = (), W = ByWeigh> {
    pub(super) config: BufferConfig,
    pub(super) observer: Arc<O>,
    pub(super) marker: M,
    pub(super) classify: C,
    pub(super) weigher: W,
    pub(super) budget: Option<MemoryBudget>,
    pub(super) info: Option<ClientInfo>,
    pub(super) close_timeout: Duration,
    pub(super) connection: Option<Connection>,
}

impl<O, M, C, W> Builder<O, M, C, W> {
    /// Replaces the observer that hears backpressure events, e.g.
    /// `(registry.clone(), TracingObserver::new())`.
    pub fn observer<O2: BackpressureObserver>(self, observer: O2) -> Builder<O2, M, C, W> {
        self.shared_observer(Arc::new(observer))
    }

    /// Like [`observer`](Self::observer), with an observer already shared
    /// (no allocation per client).
    pub fn shared_observer<O2: BackpressureObserver>(
        self,
        observer: Arc<O2>,
    ) -> Builder<O2, M, C, W> {
        Builder {
            config: self.config,
            observer,
            marker: self.marker,
            classify: self.classify,
            weigher: self.weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
            connection: self.connection,
        }
    }

    /// Sets the [`GapMarker`] whose message goes before the first message
    /// after a gap (e.g. `{"type":"lagged","dropped":N}`).
    ///
    /// [`GapAction::End`](crate::GapAction::End) closes the sink at the gap: `Closed` reports
    /// [`EvictReason::DataLoss`](crate::EvictReason::DataLoss) and the trailers are ignored (a sink has
    /// none).
    pub fn gap_marker<M2>(self, marker: M2) -> Builder<O, M2, C, W> {
        Builder {
            config: self.config,
            observer: self.observer,
            marker,
            classify: self.classify,
            weigher: self.weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
            connection: self.connection,
        }
    }

    /// Sets the [`Classify`] hook that marks messages droppable, critical or
    /// replaceable by key. It runs in the sending task, for every message.
    pub fn classify<C2>(self, classify: C2) -> Builder<O, M, C2, W> {
        Builder {
            config: self.config,
            observer: self.observer,
            marker: self.marker,
            classify,
            weigher: self.weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
            connection: self.connection,
        }
    }

    /// Sets how a message is weighed against
    /// [`BufferConfig::max_bytes`] and a [`MemoryBudget`]: any
    /// `Fn(&T) -> usize + Clone` (a closure that captures nothing is), or a
    /// [`Weigher`].
    pub fn weigh<W2>(self, weigher: W2) -> Builder<O, M, C, W2> {
        Builder {
            config: self.config,
            observer: self.observer,
            marker: self.marker,
            classify: self.classify,
            weigher,
            budget: self.budget,
            info: self.info,
            close_timeout: self.close_timeout,
            connection: self.connection,
        }
    }

    /// Puts this client under a shared [`MemoryBudget`], with the layer's
    /// clients and other sinks.
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Who the messages go to, as events and the registry show it; e.g.
    /// `ClientInfo::new(Method::GET, uri, Some(peer))` from the upgrade
    /// request. Default: `GET /` from an unknown peer, with a fresh id.
    pub fn client(mut self, info: ClientInfo) -> Self {
        self.info = Some(info);
        self
    }

    /// The client's connection (from its upgrade request, see the
    /// [`conn`](crate::conn) module): evicting the client closes it, so that
    /// a client that reads nothing more does not keep it open.
    pub fn connection(mut self, connection: Connection) -> Self {
        self.connection = Some(connection);
        self
    }

    /// How long closing may take: delivering what is buffered, then closing
    /// the real sink. Default [`DEFAULT_CLOSE_TIMEOUT`](super::DEFAULT_CLOSE_TIMEOUT) (5 s).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The buffer configuration.
    pub fn config(&self) -> &BufferConfig {
        &self.config
    }

    /// Spawns the drain task that feeds `sink` and returns the sending end.
    ///
    /// `Opened` fires now.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn<T, S>(self, sink: S) -> BufferedSink<T>
    where
        T: Send + 'static,
        S: Sink<T> + Send + 'static,
        S::Error: Into<BoxError>,
        O: BackpressureObserver,
        M: GapMarker<T>,
        C: Classify<T>,
        W: Weigher<T> + Clone + Send + Sync + 'static,
    {
        let info = self
            .info
            .unwrap_or_else(|| ClientInfo::new(Method::GET, Uri::from_static("/"), None));
        let buffer = ClientBuffer::with_weigher(self.config, self.weigher.clone());
        let config = buffer.shared_config().clone();
        let client = Client::new(
            buffer,
            config,
            HandleInner::with_connection(info, self.connection),
            self.observer,
            self.budget,
            Reporter::Consumer,
        );
        let core = Arc::new(Core {
            client,
            classify: self.classify,
            weigher: self.weigher,
            failure: OnceLock::new(),
            abandoned: AtomicBool::new(false),
            close_timeout: self.close_timeout,
            deadline: OnceLock::new(),
        });
        core.client.open();
        let drain = tokio::spawn(Drain::new(core.clone(), sink, self.marker));
        BufferedSink {
            core,
            drain: Some(drain),
        }
    }
}

impl<O, M, C, W> Builder<O, M, C, W> {
    /// Spawns a drain task that feeds `sink` from a window over `hub`'s
    /// log: every client of a hub shares its frames, and this client's
    /// backlog there is bounded by the builder's config (the oldest frames
    /// are skipped, with the gap marker's message before the next one).
    /// Nothing is buffered per client and nothing is sent into a
    /// `BufferedSink`: the hub's publishes are the messages. It starts after
    /// frame `after` (a client that resumes), or after the newest frame.
    ///
    /// `Opened` fires now. The returned [`HubSink`] watches the client and
    /// ends it when the client leaves.
    ///
    /// # Errors
    ///
    /// A config that cannot bound a window over a log
    /// ([`BufferConfig::validate_for_hub`]).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn_hub<T, HW, S>(
        self,
        hub: &Hub<T, HW>,
        after: Option<u64>,
        sink: S,
    ) -> Result<HubSink, ConfigError>
    where
        T: Clone + Send + Sync + 'static,
        HW: Send + Sync + 'static,
        S: Sink<T> + Send + 'static,
        S::Error: Into<BoxError>,
        O: BackpressureObserver,
        M: GapMarker<T>,
        C: Classify<T>,
        W: Weigher<T> + Clone + Send + Sync + 'static,
    {
        let info = self
            .info
            .unwrap_or_else(|| ClientInfo::new(Method::GET, Uri::from_static("/"), None));
        let client = window_client(
            &*hub.window_source(after, None),
            Arc::new(self.config),
            self.classify.clone(),
            HandleInner::with_connection(info, self.connection),
            self.observer,
        )?;
        let core = Arc::new(Core {
            client,
            classify: self.classify,
            weigher: self.weigher,
            failure: OnceLock::new(),
            abandoned: AtomicBool::new(false),
            close_timeout: self.close_timeout,
            deadline: OnceLock::new(),
        });
        let drain = tokio::spawn(Drain::new(core.clone(), sink, self.marker));
        Ok(HubSink::new(core, drain))
    }
}

impl<O, M: Clone, C: Clone, W: Clone> Clone for Builder<O, M, C, W> {
    fn clone(&self) -> Self {
        Self {
            config: self.config,
            observer: self.observer.clone(),
            marker: self.marker.clone(),
            classify: self.classify.clone(),
            weigher: self.weigher.clone(),
            budget: self.budget.clone(),
            info: self.info.clone(),
            close_timeout: self.close_timeout,
            connection: self.connection.clone(),
        }
    }
}

impl<O, M, C, W> fmt::Debug for Builder<O, M, C, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .field("client", &self.info)
            .field("close_timeout", &self.close_timeout)
            .finish_non_exhaustive()
    }
}
