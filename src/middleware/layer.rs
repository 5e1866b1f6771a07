use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::service::Backpressure;
use crate::config::{BufferConfig, ConfigError};
use crate::observer::BackpressureObserver;
use crate::predicate::{DefaultPredicate, Predicate};

/// Applies [`Backpressure`] to a service.
///
/// Place it *inside* any compression layer (compression must see the frames
/// that survive, not the other way round): with `ServiceBuilder`, list it
/// after `CompressionLayer`; with axum's `Router::layer`, call it before.
///
/// See the [crate docs](crate) for an example.
pub struct BackpressureLayer<P = DefaultPredicate, O = ()> {
    config: BufferConfig,
    predicate: P,
    observer: Arc<O>,
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
        })
    }
}

impl<P, O> BackpressureLayer<P, O> {
    /// Replaces the observer that hears backpressure events.
    pub fn observer<O2: BackpressureObserver>(self, observer: O2) -> BackpressureLayer<P, O2> {
        BackpressureLayer {
            config: self.config,
            predicate: self.predicate,
            observer: Arc::new(observer),
        }
    }

    /// Replaces the predicate that chooses which responses are buffered.
    ///
    /// Whatever it says, a response with a `Content-Encoding` or a body of
    /// exact size is never buffered.
    #[doc(alias = "predicate")]
    pub fn buffer_when<P2: Predicate>(self, predicate: P2) -> BackpressureLayer<P2, O> {
        BackpressureLayer {
            config: self.config,
            predicate,
            observer: self.observer,
        }
    }

    /// The buffer configuration.
    pub fn config(&self) -> &BufferConfig {
        &self.config
    }

    /// Wraps `inner`; the same as [`Layer::layer`].
    pub fn into_service<S>(self, inner: S) -> Backpressure<S, P, O> {
        Backpressure {
            inner,
            config: self.config,
            predicate: self.predicate,
            observer: self.observer,
        }
    }
}

impl<S, P: Clone, O> Layer<S> for BackpressureLayer<P, O> {
    type Service = Backpressure<S, P, O>;

    fn layer(&self, inner: S) -> Self::Service {
        self.clone().into_service(inner)
    }
}

impl<P: Clone, O> Clone for BackpressureLayer<P, O> {
    fn clone(&self) -> Self {
        Self {
            config: self.config,
            predicate: self.predicate.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<P: fmt::Debug, O> fmt::Debug for BackpressureLayer<P, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackpressureLayer")
            .field("config", &self.config)
            .field("predicate", &self.predicate)
            .finish_non_exhaustive()
    }
}
