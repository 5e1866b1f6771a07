use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::service::Backpressure;
use crate::budget::MemoryBudget;
use crate::config::{BufferConfig, ConfigError};
use crate::keep_alive::{KeepAlive, StreamOptions};
use crate::observer::BackpressureObserver;
use crate::predicate::{DefaultPredicate, Predicate};

/// Applies [`Backpressure`] to a service.
///
/// Place it *inside* any compression layer (compression must see the frames
/// that survive, not the other way round): with `ServiceBuilder`, list it
/// after `CompressionLayer`; with axum's `Router::layer`, call it before.
///
/// Pluggable parts change the layer's type, as in tower-http:
/// [`observer`](Self::observer), [`buffer_when`](Self::buffer_when),
/// [`gap_marker`](Self::gap_marker) and [`classify`](Self::classify).
///
/// See the [crate docs](crate) for an example.
pub struct BackpressureLayer<P = DefaultPredicate, O = (), M = (), C = ()> {
    /// Shared by every client the layer serves (the layer's clones and its
    /// services' too): no copy per connection.
    config: Arc<BufferConfig>,
    predicate: P,
    observer: Arc<O>,
    marker: M,
    classify: C,
    budget: Option<MemoryBudget>,
    stream: StreamOptions,
}

impl BackpressureLayer {
    /// A layer with `config`, the [`DefaultPredicate`] and no observer.
    ///
    /// # Panics
    ///
    /// If `config` is invalid, with the [`ConfigError`]'s message. Use
    /// [`try_new`](Self::try_new) for configuration read at run time.
    pub fn new(config: BufferConfig) -> Self {
        match Self::try_new(config) {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`new`](Self::new), but returns the error.
    ///
    /// ```
    /// use tower_backpressure::{BackpressureLayer, BufferConfig};
    ///
    /// let err = BackpressureLayer::try_new(BufferConfig::new(0)).unwrap_err();
    /// assert_eq!(err.to_string(), "invalid buffer config: capacity must be at least 1, got 0");
    /// ```
    pub fn try_new(config: BufferConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config: Arc::new(config),
            predicate: DefaultPredicate::new(),
            observer: Arc::new(()),
            marker: (),
            classify: (),
            budget: None,
            stream: StreamOptions::default(),
        })
    }
}

impl<P, O, M, C> BackpressureLayer<P, O, M, C> {
    /// Replaces the observer that hears backpressure events.
    pub fn observer<O2: BackpressureObserver>(
        self,
        observer: O2,
    ) -> BackpressureLayer<P, O2, M, C> {
        BackpressureLayer {
            config: self.config,
            predicate: self.predicate,
            observer: Arc::new(observer),
            marker: self.marker,
            classify: self.classify,
            budget: self.budget,
            stream: self.stream,
        }
    }

    /// Replaces the predicate that chooses which responses are buffered;
    /// to extend the default one, pass `DefaultPredicate::new().or(..)` (see
    /// [`Predicate`]).
    ///
    /// Whatever it says, a response with a `Content-Encoding` or a body of
    /// exact size is never buffered.
    #[doc(alias = "predicate")]
    pub fn buffer_when<P2: Predicate>(self, predicate: P2) -> BackpressureLayer<P2, O, M, C> {
        BackpressureLayer {
            config: self.config,
            predicate,
            observer: self.observer,
            marker: self.marker,
            classify: self.classify,
            budget: self.budget,
            stream: self.stream,
        }
    }

    /// Sets the [`GapMarker`](crate::GapMarker) that tells a client what it
    /// missed, e.g. [`SseGapMarker`](crate::SseGapMarker).
    pub fn gap_marker<M2>(self, marker: M2) -> BackpressureLayer<P, O, M2, C> {
        BackpressureLayer {
            config: self.config,
            predicate: self.predicate,
            observer: self.observer,
            marker,
            classify: self.classify,
            budget: self.budget,
            stream: self.stream,
        }
    }

    /// Sets the [`Classify`](crate::Classify) hook that marks frames
    /// droppable, critical or replaceable by key.
    pub fn classify<C2>(self, classify: C2) -> BackpressureLayer<P, O, M, C2> {
        BackpressureLayer {
            config: self.config,
            predicate: self.predicate,
            observer: self.observer,
            marker: self.marker,
            classify,
            budget: self.budget,
            stream: self.stream,
        }
    }

    /// Puts every client of this layer under a shared [`MemoryBudget`].
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Sets the keep-alive of the SSE responses this layer buffers (per
    /// client, or a window over a hub's log): a comment line after a quiet
    /// interval, so that proxies do not cut the connection; `None` turns
    /// it off. On by default: [`KeepAlive::new`], an empty comment after 15
    /// seconds. See [`KeepAlive`] for what a comment is not (an event).
    ///
    /// Only `text/event-stream` responses with `Bytes` data get comments;
    /// a response the layer passes through (not selected by the predicate,
    /// or with a `Content-Encoding`) is left as it is.
    pub fn keep_alive(mut self, keep_alive: Option<KeepAlive>) -> Self {
        self.stream.keep_alive = keep_alive;
        self
    }

    /// The keep-alive of SSE responses, if on.
    pub fn get_keep_alive(&self) -> Option<&KeepAlive> {
        self.stream.keep_alive.as_ref()
    }

    /// Ends every stream this layer serves (per client, or a window over a
    /// hub's log) when `shutdown` is triggered: each gets what waits for it,
    /// then a clean end, and one that does not end within the grace period
    /// is cut, with its connection. See the [`shutdown`](crate::shutdown)
    /// module. A response the layer passes through is left alone.
    ///
    /// ```
    /// use tower_backpressure::shutdown::Shutdown;
    /// use tower_backpressure::{BackpressureLayer, BufferConfig};
    ///
    /// let shutdown = Shutdown::new();
    /// let layer = BackpressureLayer::new(BufferConfig::default()).shutdown(shutdown.clone());
    /// // On SIGTERM:
    /// shutdown.trigger();
    /// # let _ = layer;
    /// ```
    pub fn shutdown(mut self, shutdown: crate::shutdown::Shutdown) -> Self {
        self.stream.shutdown = Some(shutdown);
        self
    }

    /// Whether the layer adds `X-Accel-Buffering: no` to every
    /// `text/event-stream` response that has no such header, so that nginx
    /// (and the proxies that follow it) stream the response instead of
    /// buffering it. On by default; a value the application set is never
    /// replaced.
    ///
    /// ```
    /// use tower_backpressure::{BackpressureLayer, BufferConfig};
    ///
    /// let layer = BackpressureLayer::new(BufferConfig::default()).proxy_buffering_header(false);
    /// # let _ = layer;
    /// ```
    pub fn proxy_buffering_header(mut self, on: bool) -> Self {
        self.stream.no_proxy_buffering = on;
        self
    }

    /// The buffer configuration.
    pub fn config(&self) -> &BufferConfig {
        &self.config
    }

    /// Wraps `inner`; the same as [`Layer::layer`].
    pub fn into_service<S>(self, inner: S) -> Backpressure<S, P, O, M, C> {
        Backpressure {
            inner,
            config: self.config,
            predicate: self.predicate,
            observer: self.observer,
            marker: self.marker,
            classify: self.classify,
            budget: self.budget,
            stream: self.stream,
        }
    }
}

impl<S, P: Clone, O, M: Clone, C: Clone> Layer<S> for BackpressureLayer<P, O, M, C> {
    type Service = Backpressure<S, P, O, M, C>;

    fn layer(&self, inner: S) -> Self::Service {
        self.clone().into_service(inner)
    }
}

impl<P: Clone, O, M: Clone, C: Clone> Clone for BackpressureLayer<P, O, M, C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            predicate: self.predicate.clone(),
            observer: self.observer.clone(),
            marker: self.marker.clone(),
            classify: self.classify.clone(),
            budget: self.budget.clone(),
            stream: self.stream.clone(),
        }
    }
}

impl<P: fmt::Debug, O, M, C> fmt::Debug for BackpressureLayer<P, O, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackpressureLayer")
            .field("config", &self.config)
            .field("predicate", &self.predicate)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}
