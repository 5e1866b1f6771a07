//! Buffer limits and the seed's presets.

use std::fmt;

/// Limits of one client's ring buffer.
///
/// A `BufferConfig` is a plain, copyable value with consuming setters. It is
/// checked once, when a [`ClientBuffer`](crate::ClientBuffer) or a
/// [`BackpressureLayer`](crate::BackpressureLayer) is built from it: an invalid
/// value is refused there with a [`ConfigError`], never discovered
/// mid-stream.
///
/// | preset | capacity | threshold | for |
/// |---|---|---|---|
/// | [`default`](Self::default) | 1000 | 0.8 | general use |
/// | [`low_latency`](Self::low_latency) | 100 | 0.3 | real-time dashboards: small buffer, early warning |
/// | [`high_throughput`](Self::high_throughput) | 5000 | 0.8 | analytics feeds: large buffer, late warning |
/// | [`mobile`](Self::mobile) | 2000 | 0.5 | unstable networks: room to recover after a stall |
///
/// # Example
///
/// ```
/// use tower_backpressure::BufferConfig;
///
/// let config = BufferConfig::mobile().max_bytes(4 * 1024 * 1024);
/// assert_eq!(config.get_capacity(), 2000);
/// assert!(config.validate().is_ok());
///
/// let err = BufferConfig::default().threshold(1.5).validate().unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid buffer config: threshold must be in (0, 1], got 1.5"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferConfig {
    capacity: usize,
    max_bytes: Option<usize>,
    threshold: f64,
}

impl Default for BufferConfig {
    /// 1000 frames, no byte limit, threshold 0.8.
    fn default() -> Self {
        Self {
            capacity: 1000,
            max_bytes: None,
            threshold: 0.8,
        }
    }
}

impl BufferConfig {
    /// The default configuration with `capacity` frames.
    pub fn new(capacity: usize) -> Self {
        Self::default().capacity(capacity)
    }

    /// Small buffer, early warning: 100 frames, threshold 0.3.
    ///
    /// For real-time dashboards where an old frame is worth little: the
    /// client skips ahead quickly and operators hear about it early.
    pub fn low_latency() -> Self {
        Self::new(100).threshold(0.3)
    }

    /// Large buffer, late warning: 5000 frames, threshold 0.8.
    ///
    /// For analytics feeds where completeness matters more than latency and
    /// short bursts should be absorbed without alerts.
    pub fn high_throughput() -> Self {
        Self::new(5000).threshold(0.8)
    }

    /// Medium buffer with room to recover: 2000 frames, threshold 0.5.
    ///
    /// For mobile and unstable networks, where a client stalls for seconds
    /// and then catches up.
    pub fn mobile() -> Self {
        Self::new(2000).threshold(0.5)
    }

    /// Maximum number of frames kept; the oldest is dropped past it.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Maximum number of bytes kept; the oldest frames are dropped past it.
    ///
    /// Whichever of `capacity` and `max_bytes` is reached first evicts.
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Removes the byte limit (the default).
    pub fn no_max_bytes(mut self) -> Self {
        self.max_bytes = None;
        self
    }

    /// Fraction of the limits at which a client counts as under pressure,
    /// in `(0, 1]`. Default 0.8.
    pub fn threshold(mut self, threshold: f64) -> Self {
        self.threshold = threshold;
        self
    }

    /// The frame limit.
    pub fn get_capacity(&self) -> usize {
        self.capacity
    }

    /// The byte limit, if any.
    pub fn get_max_bytes(&self) -> Option<usize> {
        self.max_bytes
    }

    /// The pressure threshold.
    pub fn get_threshold(&self) -> f64 {
        self.threshold
    }

    /// Checks the values; every constructor that takes a config calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.capacity == 0 {
            return Err(ConfigError::new(
                "capacity must be at least 1, got 0".into(),
            ));
        }
        if self.max_bytes == Some(0) {
            return Err(ConfigError::new(
                "max_bytes must be at least 1, got 0 (use no_max_bytes() for no limit)".into(),
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(ConfigError::new(format!(
                "threshold must be in (0, 1], got {}",
                self.threshold
            )));
        }
        Ok(())
    }

    /// Frames at or above which the buffer is under pressure (at least 1).
    pub(crate) fn pressure_frames(&self) -> usize {
        ((self.capacity as f64 * self.threshold).ceil() as usize).clamp(1, self.capacity)
    }

    /// Bytes at or above which the buffer is under pressure.
    pub(crate) fn pressure_bytes(&self) -> Option<usize> {
        self.max_bytes
            .map(|m| ((m as f64 * self.threshold).ceil() as usize).clamp(1, m))
    }
}

/// A [`BufferConfig`] value that cannot work, refused at construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    fn new(message: String) -> Self {
        Self { message }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid buffer config: {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_seed() {
        let c = BufferConfig::low_latency();
        assert_eq!((c.get_capacity(), c.get_threshold()), (100, 0.3));
        let c = BufferConfig::high_throughput();
        assert_eq!((c.get_capacity(), c.get_threshold()), (5000, 0.8));
        let c = BufferConfig::mobile();
        assert_eq!((c.get_capacity(), c.get_threshold()), (2000, 0.5));
        for c in [
            BufferConfig::default(),
            BufferConfig::low_latency(),
            BufferConfig::high_throughput(),
            BufferConfig::mobile(),
        ] {
            c.validate().unwrap();
        }
    }

    #[test]
    fn invalid_values_are_refused_with_a_message() {
        let msg = |c: BufferConfig| c.validate().unwrap_err().to_string();
        assert!(msg(BufferConfig::new(0)).contains("capacity must be at least 1"));
        assert!(msg(BufferConfig::default().max_bytes(0)).contains("max_bytes"));
        assert!(msg(BufferConfig::default().threshold(0.0)).contains("threshold"));
        assert!(msg(BufferConfig::default().threshold(-0.1)).contains("threshold"));
        assert!(msg(BufferConfig::default().threshold(1.01)).contains("threshold"));
        assert!(msg(BufferConfig::default().threshold(f64::NAN)).contains("threshold"));
        BufferConfig::default().threshold(1.0).validate().unwrap();
    }

    #[test]
    fn pressure_levels_round_up_and_stay_in_range() {
        assert_eq!(BufferConfig::new(10).threshold(0.8).pressure_frames(), 8);
        assert_eq!(BufferConfig::new(10).threshold(0.75).pressure_frames(), 8);
        assert_eq!(BufferConfig::new(1).threshold(0.01).pressure_frames(), 1);
        assert_eq!(BufferConfig::new(10).threshold(1.0).pressure_frames(), 10);
        assert_eq!(
            BufferConfig::new(10)
                .max_bytes(1000)
                .threshold(0.5)
                .pressure_bytes(),
            Some(500)
        );
    }
}
