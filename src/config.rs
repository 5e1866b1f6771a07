//! Buffer limits, overflow, flush and eviction policies, and presets.

use std::fmt;
use std::time::Duration;

/// Limits of one client's ring buffer.
///
/// A `BufferConfig` is a plain, copyable value with consuming setters. It is
/// checked once, when a [`ClientBuffer`](crate::ClientBuffer) or a
/// [`BackpressureLayer`](crate::BackpressureLayer) is built from it: an invalid
/// value is refused there with a [`ConfigError`], never discovered
/// mid-stream.
///
/// | preset | capacity | threshold | flush | for |
/// |---|---|---|---|---|
/// | [`default`](Self::default) | 1000 | 0.8 | coalesce 100 frames / 64 KiB | general use |
/// | [`low_latency`](Self::low_latency) | 100 | 0.3 | immediate | real-time dashboards: small buffer, early warning |
/// | [`high_throughput`](Self::high_throughput) | 5000 | 0.8 | coalesce 100 frames / 64 KiB | analytics feeds: large buffer, late warning, fewer writes |
/// | [`mobile`](Self::mobile) | 2000 | 0.5 | every 200 ms | unstable networks: room to recover, fewer radio wake-ups |
///
/// Every preset drops the oldest frames ([`Overflow::DropOldest`]) and
/// evicts no client ([`Eviction::none`]).
///
/// The default flush joins the frames that already wait for a client into
/// one, up to 100 frames or 64 KiB ([`Flush::Coalesce`]): for a response
/// body of `Bytes` (SSE, NDJSON, gRPC) the client gets the same bytes in
/// fewer writes, and nothing waits for frames that have not come. Frames of
/// other data types go out one by one, and a
/// [`BufferedSink`](crate::BufferedSink) flushes after each message unless
/// a flush is set. One frame per write is one setting away:
/// [`with_flush(Flush::Immediate)`](Self::with_flush).
///
/// # Example
///
/// ```
/// use tower_backpressure::BufferConfig;
///
/// let config = BufferConfig::mobile().with_max_bytes(4 * 1024 * 1024);
/// assert_eq!(config.capacity(), 2000);
/// assert!(config.validate().is_ok());
///
/// let err = BufferConfig::default().with_threshold(1.5).validate().unwrap_err();
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
    overflow: Overflow,
    flush: Flush,
    eviction: Eviction,
    drop_report_interval: Duration,
    /// Whether `with_flush` chose the flush (a sink keeps flushing after
    /// each message unless it did).
    flush_set: bool,
}

impl Default for BufferConfig {
    /// 1000 frames, no byte limit, threshold 0.8, what waits joined up to
    /// 100 frames or 64 KiB ([`Flush::default`]).
    fn default() -> Self {
        Self {
            capacity: 1000,
            max_bytes: None,
            threshold: 0.8,
            overflow: Overflow::DropOldest,
            flush: Flush::DEFAULT,
            eviction: Eviction::none(),
            drop_report_interval: Duration::from_secs(1),
            flush_set: false,
        }
    }
}

impl BufferConfig {
    /// The default configuration with `capacity` frames.
    pub fn new(capacity: usize) -> Self {
        Self::default().with_capacity(capacity)
    }

    /// Small buffer, early warning: 100 frames, threshold 0.3, each frame
    /// written as soon as the connection takes it.
    ///
    /// For real-time dashboards where an old frame is worth little: the
    /// client skips ahead quickly and operators hear about it early.
    pub fn low_latency() -> Self {
        Self::new(100)
            .with_threshold(0.3)
            .with_flush(Flush::Immediate)
    }

    /// Large buffer, late warning: 5000 frames, threshold 0.8, waiting frames
    /// coalesced into writes of up to 100 frames or 64 KiB.
    ///
    /// For analytics feeds where completeness matters more than latency and
    /// short bursts should be absorbed without alerts; at high rates fewer,
    /// larger writes cost less.
    pub fn high_throughput() -> Self {
        Self::new(5000)
            .with_threshold(0.8)
            .with_flush(Flush::coalesce(100, 64 * 1024))
    }

    /// Medium buffer with room to recover: 2000 frames, threshold 0.5,
    /// released every 200 ms.
    ///
    /// For mobile and unstable networks, where a client stalls for seconds
    /// and then catches up; batching writes every 200 ms lets the radio
    /// sleep between them.
    pub fn mobile() -> Self {
        Self::new(2000)
            .with_threshold(0.5)
            .with_flush(Flush::interval(Duration::from_millis(200)))
    }

    /// Maximum number of frames kept; the oldest is dropped past it.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Maximum number of bytes kept; the oldest frames are dropped past it.
    ///
    /// Whichever of `capacity` and `max_bytes` is reached first evicts.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Removes the byte limit (the default).
    pub fn without_max_bytes(mut self) -> Self {
        self.max_bytes = None;
        self
    }

    /// Fraction of the limits at which a client counts as under pressure,
    /// in `(0, 1]`. Default 0.8.
    pub fn with_threshold(mut self, threshold: f64) -> Self {
        self.threshold = threshold;
        self
    }

    /// What happens when the buffer is full. Default
    /// [`Overflow::DropOldest`].
    pub fn with_overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// How waiting frames are handed to the connection. Default
    /// [`Flush::coalesce(100, 64 * 1024)`](Flush::coalesce): the frames that
    /// already wait go out joined.
    ///
    /// For one body frame per frame (the default until this release):
    ///
    /// ```
    /// use tower_backpressure::{BufferConfig, Flush};
    ///
    /// let config = BufferConfig::default().with_flush(Flush::Immediate);
    /// assert_eq!(config.flush(), Flush::Immediate);
    /// ```
    ///
    /// A [`BufferedSink`](crate::BufferedSink) never joins messages: with
    /// the default it flushes after each one; a flush set here (the
    /// default's value too) makes it flush once per batch instead. So a
    /// config with a flush set is not equal to one without, even with the
    /// same value.
    pub fn with_flush(mut self, flush: Flush) -> Self {
        self.flush = flush;
        self.flush_set = true;
        self
    }

    /// When to give up on a client. Default [`Eviction::none`].
    pub fn with_eviction(mut self, eviction: Eviction) -> Self {
        self.eviction = eviction;
        self
    }

    /// At most one [`Dropped`](crate::EventKind::Dropped) report per client
    /// per `interval`. Default 1 second.
    ///
    /// A client's first drop after a quiet interval is reported at once;
    /// drops within the interval after a report are summed and reported
    /// when it is over, or right before
    /// [`Recovered`](crate::EventKind::Recovered) or
    /// [`Closed`](crate::EventKind::Closed) if either comes first (and when
    /// the producer ends). The counts of all reports add up to the frames
    /// dropped. So a stalled client fed one frame per wake-up costs a log
    /// one line per interval, not one per frame. `Duration::ZERO` reports
    /// every batch of drops as soon as it happens.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// use tower_backpressure::BufferConfig;
    ///
    /// let config = BufferConfig::default().with_drop_report_interval(Duration::from_secs(10));
    /// assert_eq!(config.drop_report_interval(), Duration::from_secs(10));
    /// ```
    pub fn with_drop_report_interval(mut self, interval: Duration) -> Self {
        self.drop_report_interval = interval;
        self
    }

    /// The frame limit.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The byte limit, if any.
    pub fn max_bytes(&self) -> Option<usize> {
        self.max_bytes
    }

    /// The pressure threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The overflow policy.
    pub fn overflow(&self) -> Overflow {
        self.overflow
    }

    /// The flush strategy.
    pub fn flush(&self) -> Flush {
        self.flush
    }

    /// The flush a window over a hub's log applies: the config's if one was
    /// set ([`with_flush`](Self::with_flush)), else one frame at a time.
    /// The hub's frames are shared by every client; a join copies them, and
    /// a client that stops reading would keep such a private copy in hyper
    /// (up to hyper's write buffer) for as long as it is connected.
    pub(crate) fn window_flush(&self) -> Flush {
        self.sink_flush()
    }

    /// The flush a [`BufferedSink`](crate::BufferedSink) applies: the
    /// config's, or one flush per message if none was set.
    pub(crate) fn sink_flush(&self) -> Flush {
        if self.flush_set {
            self.flush
        } else {
            Flush::Immediate
        }
    }

    /// The eviction rules.
    pub fn eviction(&self) -> Eviction {
        self.eviction
    }

    /// The shortest time between two [`Dropped`](crate::EventKind::Dropped)
    /// reports of a client: see
    /// [`with_drop_report_interval`](Self::with_drop_report_interval).
    pub fn drop_report_interval(&self) -> Duration {
        self.drop_report_interval
    }

    /// The eviction rules, by reference (the hot path reads one or two).
    pub(crate) fn rules(&self) -> &Eviction {
        &self.eviction
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
                "max_bytes must be at least 1, got 0 (use without_max_bytes() for no limit)".into(),
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(ConfigError::new(format!(
                "threshold must be in (0, 1], got {}",
                self.threshold
            )));
        }
        if let Some((max_frames, max_bytes)) = self.flush.limits() {
            if max_frames == 0 || max_bytes == 0 {
                return Err(ConfigError::new(format!(
                    "flush limits must be at least 1, got {max_frames} frames and {max_bytes} bytes"
                )));
            }
        }
        if let Flush::Interval { period, .. } = self.flush {
            if period.is_zero() {
                return Err(ConfigError::new(
                    "flush interval must be longer than zero".into(),
                ));
            }
        }
        let e = self.eviction;
        for (name, d) in [
            ("after_stall", e.stall),
            ("after_pressure_for", e.pressure),
            ("after_dropped_within", e.dropped_within.map(|(_, w)| w)),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::new(format!(
                    "eviction {name} needs a duration longer than zero"
                )));
            }
        }
        Ok(())
    }

    /// Checks that the config can bound a client's window over a
    /// [`Hub`](crate::hub::Hub)'s log, as well as [`validate`](Self::validate):
    /// [`Overflow::Pause`] cannot (one log cannot wait for one client), nor
    /// [`Overflow::DropNewest`] (the log keeps the newest frames: a client
    /// that falls behind skips the oldest).
    ///
    /// ```
    /// use tower_backpressure::{BufferConfig, Overflow};
    ///
    /// let err = BufferConfig::new(100).with_overflow(Overflow::Pause).validate_for_hub().unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid buffer config: Overflow::Pause cannot bound a hub subscription (one log cannot wait for one client)"
    /// );
    /// ```
    pub fn validate_for_hub(&self) -> Result<(), ConfigError> {
        self.validate()?;
        match self.overflow {
            Overflow::Pause => Err(ConfigError::new(
                "Overflow::Pause cannot bound a hub subscription (one log cannot wait for one client)"
                    .into(),
            )),
            Overflow::DropNewest => Err(ConfigError::new(
                "Overflow::DropNewest cannot bound a hub subscription (the log keeps the newest frames)"
                    .into(),
            )),
            _ => Ok(()),
        }
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

/// What happens when a frame arrives and the buffer is full.
///
/// | policy | the producer | the slow client | peers that do the same |
/// |---|---|---|---|
/// | `DropOldest` | never waits | gets the newest frames, a gap before them | tokio `broadcast` (receiver lags) |
/// | `DropNewest` | never waits | gets the oldest frames, a gap after them | the NATS client (slow consumer) |
/// | `Pause` | waits for room: backpressure reaches it | gets every frame, late | a bounded channel |
/// | `Disconnect` | never waits | is cut off: reset connection / `RST_STREAM` | Centrifugo, Spring's decorator (terminate) |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Overflow {
    /// Drop the oldest droppable frame (the default).
    #[default]
    DropOldest,
    /// Drop the incoming frame.
    DropNewest,
    /// Stop pulling from the inner body until there is room, so backpressure
    /// reaches the producer: for producers that can wait. Nothing is dropped
    /// or replaced (frame classes do not apply). Under a
    /// [`MemoryBudget`](crate::MemoryBudget) with no room left, the frame is
    /// kept and the producer waits until its client takes one.
    Pause,
    /// End the response with an error ([`Evicted`](crate::Evicted) with
    /// [`EvictReason::Overflow`](crate::EvictReason::Overflow)), which hyper
    /// turns into a reset connection (HTTP/1) or `RST_STREAM` (HTTP/2).
    /// Nothing is dropped: any frame that needs room (a critical one too),
    /// or that a [`MemoryBudget`](crate::MemoryBudget) has no room for,
    /// evicts the client; a budget that needs room cuts such a client off
    /// instead of shedding its frames.
    Disconnect,
}

/// How waiting frames are handed to the connection.
///
/// Coalescing joins several data frames into one, which only bodies whose
/// data is `bytes::Bytes` can do (axum, tonic and hyper bodies are); frames of
/// other data types go out one by one, at the same moments. A frame is never
/// joined across a gap marker or trailers, and order is always kept.
///
/// The default ([`Flush::default`], and [`BufferConfig`]'s) is
/// [`Flush::coalesce(100, 64 * 1024)`](Flush::coalesce).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Flush {
    /// Each frame goes out as soon as the connection takes it, one body
    /// frame per frame.
    ///
    /// Use it when something after the layer gives each body frame a
    /// meaning (counts frames, or expects one event per frame), or when
    /// the frames are shared `Bytes` that should not be copied into a join.
    Immediate,
    /// When several data frames wait, hand them out as one frame of up to
    /// `max_frames` frames or `max_bytes` bytes: fewer writes at high rates.
    /// The default, with 100 frames and 64 KiB.
    ///
    /// Nothing waits for frames that have not come; a join copies the
    /// waiting frames into one buffer. For a stream of many small frames
    /// this costs less than the frames' own writes: with 512-byte SSE
    /// events, a client that keeps up costs 7 – 10 % less server CPU
    /// through the layer than without it (0.90 – 0.93×), against about 5 %
    /// more with [`Immediate`](Self::Immediate) (`BENCHMARKS.md`, issue
    /// 21). The joined buffer holds what waits, within `max_bytes`.
    Coalesce {
        /// Most frames joined into one.
        max_frames: usize,
        /// Most bytes joined into one (a single larger frame still goes out
        /// whole).
        max_bytes: usize,
    },
    /// Release waiting frames at most every `period`, coalescing what
    /// accumulated. The end of the stream is never held back past one
    /// period.
    Interval {
        /// Time between releases.
        period: Duration,
        /// Most frames joined into one.
        max_frames: usize,
        /// Most bytes joined into one.
        max_bytes: usize,
    },
}

impl Default for Flush {
    /// [`Flush::coalesce(100, 64 * 1024)`](Flush::coalesce).
    ///
    /// ```
    /// use tower_backpressure::{BufferConfig, Flush};
    ///
    /// assert_eq!(Flush::default(), Flush::coalesce(100, 64 * 1024));
    /// assert_eq!(BufferConfig::default().flush(), Flush::default());
    /// ```
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Flush {
    /// The default: what waits joined, up to 100 frames or 64 KiB.
    const DEFAULT: Flush = Flush::Coalesce {
        max_frames: 100,
        max_bytes: 64 * 1024,
    };

    /// The frames and bytes one batch may hold, unless frames go one by one.
    pub(crate) fn limits(&self) -> Option<(usize, usize)> {
        match *self {
            Flush::Immediate => None,
            Flush::Coalesce {
                max_frames,
                max_bytes,
            }
            | Flush::Interval {
                max_frames,
                max_bytes,
                ..
            } => Some((max_frames, max_bytes)),
        }
    }

    /// [`Flush::Coalesce`] with these limits.
    pub fn coalesce(max_frames: usize, max_bytes: usize) -> Self {
        Flush::Coalesce {
            max_frames,
            max_bytes,
        }
    }

    /// [`Flush::Interval`] every `period`, joining up to 1024 frames or
    /// 256 KiB into one.
    pub fn interval(period: Duration) -> Self {
        Flush::Interval {
            period,
            max_frames: 1024,
            max_bytes: 256 * 1024,
        }
    }
}

/// Rules that give up on a client that will not recover; any combination,
/// none by default.
///
/// An evicted client's response ends with an error ([`Evicted`](crate::Evicted)),
/// which hyper turns into a reset connection or `RST_STREAM`, and `Closed`
/// reports [`CloseReason::Evicted`](crate::CloseReason::Evicted) with the rule
/// that fired.
///
/// ```
/// use std::time::Duration;
/// use tower_backpressure::{BufferConfig, Eviction};
///
/// let config = BufferConfig::default().with_eviction(
///     Eviction::none()
///         .after_dropped(10_000)
///         .after_stall(Duration::from_secs(30)),
/// );
/// # config.validate().unwrap();
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Eviction {
    pub(crate) dropped: Option<u64>,
    pub(crate) dropped_within: Option<(u64, Duration)>,
    pub(crate) stall: Option<Duration>,
    pub(crate) pressure: Option<Duration>,
}

impl Eviction {
    /// No rule: never evict.
    pub const fn none() -> Self {
        Self {
            dropped: None,
            dropped_within: None,
            stall: None,
            pressure: None,
        }
    }

    /// Evict once more than `frames` frames were dropped in total.
    pub fn after_dropped(mut self, frames: u64) -> Self {
        self.dropped = Some(frames);
        self
    }

    /// Evict once more than `frames` frames were dropped within any `window`.
    ///
    /// Drops are counted in 64 buckets per window, so the cost per push is
    /// constant whatever the drop rate: a drop leaves the count up to a
    /// 64th of `window` early.
    pub fn after_dropped_within(mut self, frames: u64, window: Duration) -> Self {
        self.dropped_within = Some((frames, window));
        self
    }

    /// Evict when the client has taken no frame for `timeout` while frames
    /// wait (a write deadline, like NATS's or Spring's send time limit).
    /// Also after the inner body has ended, for as long as frames wait.
    /// `Duration::MAX` means never.
    pub fn after_stall(mut self, timeout: Duration) -> Self {
        self.stall = Some(timeout);
        self
    }

    /// Evict when the buffer has stayed over its threshold for `timeout`.
    pub fn after_pressure_for(mut self, timeout: Duration) -> Self {
        self.pressure = Some(timeout);
        self
    }

    /// Whether any rule is set.
    pub fn is_none(&self) -> bool {
        *self == Self::none()
    }
}

/// A [`BufferConfig`] (or [`HubConfig`](crate::hub::HubConfig)) value that
/// cannot work, refused at construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// What was configured: `buffer` or `hub`.
    subject: &'static str,
    message: String,
}

impl ConfigError {
    fn new(message: String) -> Self {
        Self {
            subject: "buffer",
            message,
        }
    }

    /// An error in a [`HubConfig`](crate::hub::HubConfig).
    pub(crate) fn hub(message: String) -> Self {
        Self {
            subject: "hub",
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} config: {}", self.subject, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_typescript_guide() {
        let c = BufferConfig::low_latency();
        assert_eq!((c.capacity(), c.threshold()), (100, 0.3));
        let c = BufferConfig::high_throughput();
        assert_eq!((c.capacity(), c.threshold()), (5000, 0.8));
        let c = BufferConfig::mobile();
        assert_eq!((c.capacity(), c.threshold()), (2000, 0.5));
        assert_eq!(
            BufferConfig::default().flush(),
            Flush::coalesce(100, 64 * 1024)
        );
        assert_eq!(
            BufferConfig::new(10).flush(),
            BufferConfig::default().flush()
        );
        assert_eq!(BufferConfig::low_latency().flush(), Flush::Immediate);
        assert_eq!(
            BufferConfig::high_throughput().flush(),
            Flush::coalesce(100, 64 * 1024)
        );
        assert_eq!(
            BufferConfig::mobile().flush(),
            Flush::interval(Duration::from_millis(200))
        );
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
        assert!(msg(BufferConfig::default().with_max_bytes(0)).contains("max_bytes"));
        assert!(msg(BufferConfig::default().with_threshold(0.0)).contains("threshold"));
        assert!(msg(BufferConfig::default().with_threshold(-0.1)).contains("threshold"));
        assert!(msg(BufferConfig::default().with_threshold(1.01)).contains("threshold"));
        assert!(msg(BufferConfig::default().with_threshold(f64::NAN)).contains("threshold"));
        BufferConfig::default()
            .with_threshold(1.0)
            .validate()
            .unwrap();
        assert!(msg(BufferConfig::default().with_flush(Flush::coalesce(0, 10))).contains("flush"));
        assert!(
            msg(BufferConfig::default().with_flush(Flush::interval(Duration::ZERO)))
                .contains("interval")
        );
        assert!(
            msg(BufferConfig::default().with_eviction(Eviction::none().after_stall(Duration::ZERO)))
                .contains("after_stall")
        );
    }

    #[test]
    fn pressure_levels_round_up_and_stay_in_range() {
        assert_eq!(
            BufferConfig::new(10).with_threshold(0.8).pressure_frames(),
            8
        );
        assert_eq!(
            BufferConfig::new(10).with_threshold(0.75).pressure_frames(),
            8
        );
        assert_eq!(
            BufferConfig::new(1).with_threshold(0.01).pressure_frames(),
            1
        );
        assert_eq!(
            BufferConfig::new(10).with_threshold(1.0).pressure_frames(),
            10
        );
        assert_eq!(
            BufferConfig::new(10)
                .with_max_bytes(1000)
                .with_threshold(0.5)
                .pressure_bytes(),
            Some(500)
        );
    }
}
