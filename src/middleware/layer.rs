use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::service::Backpressure;
use crate::budget::MemoryBudget;
use crate::config::{BufferConfig, ConfigError};
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
    config: BufferConfig,
    predicate: P,
    observer: Arc<O>,
    marker: M,
    classify: C,
    budget: Option<MemoryBudget>,
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
            config,
            predicate: DefaultPredicate::new(),
            observer: Arc::new(()),
            marker: (),
            classify: (),
            budget: None,
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
        }
    }

    /// Puts every client of this layer under a shared [`MemoryBudget`].
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = Some(budget);
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
            config: self.config,
            predicate: self.predicate.clone(),
            observer: self.observer.clone(),
            marker: self.marker.clone(),
            classify: self.classify.clone(),
            budget: self.budget.clone(),
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
