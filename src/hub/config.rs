//! How much of its log a hub keeps.

use crate::config::ConfigError;

/// How many of its newest frames a [`Hub`](super::Hub) retains.
///
/// A plain, copyable value with consuming setters, checked once when the hub
/// is built. The log drops its oldest frames as soon as either limit is
/// exceeded, but always keeps the newest frame (one frame heavier than
/// `retain_bytes` is kept alone). Retention is what a subscriber can fall
/// behind by, and what a reconnecting client can resume from.
///
/// The default retains 10,000 frames with no byte limit.
///
/// # Example
///
/// ```
/// use tower_backpressure::hub::HubConfig;
///
/// let config = HubConfig::default().with_retain_bytes(8 << 20);
/// assert_eq!(config.retain_frames(), 10_000);
/// assert_eq!(config.retain_bytes(), Some(8 << 20));
///
/// let err = HubConfig::default().with_retain_frames(0).validate().unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid hub config: retain_frames must be at least 1, got 0"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    retain_frames: usize,
    retain_bytes: Option<usize>,
}

impl Default for HubConfig {
    /// 10,000 frames, no byte limit.
    fn default() -> Self {
        Self {
            retain_frames: 10_000,
            retain_bytes: None,
        }
    }
}

impl HubConfig {
    /// The default configuration retaining `frames` frames.
    pub fn new(frames: usize) -> Self {
        Self::default().with_retain_frames(frames)
    }

    /// Maximum number of frames retained; the oldest is dropped past it.
    pub fn with_retain_frames(mut self, frames: usize) -> Self {
        self.retain_frames = frames;
        self
    }

    /// Maximum number of bytes retained (as weighed); the oldest frames are
    /// dropped past it.
    pub fn with_retain_bytes(mut self, bytes: usize) -> Self {
        self.retain_bytes = Some(bytes);
        self
    }

    /// Removes the byte limit (the default).
    pub fn without_retain_bytes(mut self) -> Self {
        self.retain_bytes = None;
        self
    }

    /// The frame limit.
    pub fn retain_frames(&self) -> usize {
        self.retain_frames
    }

    /// The byte limit, if any.
    pub fn retain_bytes(&self) -> Option<usize> {
        self.retain_bytes
    }

    /// Checks the values; every hub constructor calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.retain_frames == 0 {
            return Err(ConfigError::hub(
                "retain_frames must be at least 1, got 0".into(),
            ));
        }
        if self.retain_bytes == Some(0) {
            return Err(ConfigError::hub(
                "retain_bytes must be at least 1, got 0 (use without_retain_bytes() for no limit)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_setters() {
        let c = HubConfig::default();
        assert_eq!((c.retain_frames(), c.retain_bytes()), (10_000, None));
        let c = HubConfig::new(5).with_retain_bytes(100);
        assert_eq!((c.retain_frames(), c.retain_bytes()), (5, Some(100)));
        assert_eq!(c.without_retain_bytes().retain_bytes(), None);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn zero_limits_are_refused() {
        let e = HubConfig::new(0).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid hub config: retain_frames must be at least 1, got 0"
        );
        let e = HubConfig::default()
            .with_retain_bytes(0)
            .validate()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid hub config: retain_bytes must be at least 1, got 0"),
            "{e}"
        );
    }
}
