//! Slow-client policies that plug into the layer: frame classes and gap
//! markers.
//!
//! - A [`Classify`] hook marks each data frame [`FrameClass::Droppable`],
//!   [`FrameClass::Critical`] (never dropped) or [`FrameClass::Replace`]
//!   (only the newest frame of a key waits).
//! - A [`GapMarker`] tells the client what it missed: at the point of each
//!   gap, before the next delivered frame, it inserts one frame built from the
//!   [`Gap`], or ends the stream with trailers ([`GrpcDataLoss`]). A marker
//!   is built when the frame after the gap is handed out, so it never counts
//!   against the limits and can never be dropped itself.
//!
//! ```
//! use tower_backpressure::{BackpressureLayer, BufferConfig, FrameClass, SseGapMarker};
//!
//! let layer = BackpressureLayer::new(BufferConfig::default())
//!     .gap_marker(SseGapMarker::new())
//!     // SSE comments (`: keep-alive`) replace each other.
//!     .classify(|frame: &bytes::Bytes| {
//!         if frame.starts_with(b":") { FrameClass::Replace(0) } else { FrameClass::Droppable }
//!     });
//! # let _ = layer;
//! ```

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

pub use crate::buffer::{FrameClass, Gap};

/// Decides the [`FrameClass`] of each data frame.
///
/// Implemented by `()` (every frame droppable, the default) and by closures
/// `Fn(&D) -> FrameClass`. Runs in the pump task for every frame: keep it
/// cheap.
pub trait Classify<D>: Clone + Send + Sync + 'static {
    /// The class of `frame`.
    fn classify(&self, frame: &D) -> FrameClass;
}

impl<D> Classify<D> for () {
    #[inline]
    fn classify(&self, _: &D) -> FrameClass {
        FrameClass::Droppable
    }
}

impl<D, F> Classify<D> for F
where
    F: Fn(&D) -> FrameClass + Clone + Send + Sync + 'static,
{
    fn classify(&self, frame: &D) -> FrameClass {
        self(frame)
    }
}

/// What a [`GapMarker`] does at a gap.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GapAction<D> {
    /// Nothing: the client sees the next frame.
    Skip,
    /// Insert this frame before the next delivered frame.
    Insert(D),
    /// End the stream here with these trailers instead of delivering a
    /// stream with holes. `Closed` reports
    /// [`EvictReason::DataLoss`](crate::EvictReason::DataLoss).
    End(HeaderMap),
}

/// Tells the client what it missed.
///
/// Implemented by `()` (no marker, the default), [`SseGapMarker`],
/// [`NdjsonGapMarker`], [`GrpcDataLoss`], closures `Fn(Gap) -> GapAction<D>`,
/// and `Option<M>` of any marker (`None`: no marker), for a marker chosen at
/// run time. It runs while hyper polls the body, once per gap.
pub trait GapMarker<D>: Clone + Send + Sync + 'static {
    /// The action for a gap of `gap.frames` frames.
    fn on_gap(&self, gap: Gap) -> GapAction<D>;
}

impl<D> GapMarker<D> for () {
    #[inline]
    fn on_gap(&self, _: Gap) -> GapAction<D> {
        GapAction::Skip
    }
}

impl<D, F> GapMarker<D> for F
where
    F: Fn(Gap) -> GapAction<D> + Clone + Send + Sync + 'static,
{
    fn on_gap(&self, gap: Gap) -> GapAction<D> {
        self(gap)
    }
}

/// `Some(marker)` marks gaps as `marker` does; `None` marks none
/// ([`GapAction::Skip`]), like `()`. The layer's type is the same either way,
/// so a flag can switch the marker off:
///
/// ```
/// use tower_backpressure::{BackpressureLayer, BufferConfig, Gap, GapAction, GapMarker, SseGapMarker};
///
/// let mark_gaps = true; // e.g. from a command-line flag
/// let marker = mark_gaps.then(SseGapMarker::new); // Option<SseGapMarker>
/// let layer = BackpressureLayer::new(BufferConfig::default()).gap_marker(marker);
/// # let _ = layer;
///
/// let gap = Gap { frames: 3, bytes: 120 };
/// let off: Option<SseGapMarker> = None;
/// assert_eq!(GapMarker::<bytes::Bytes>::on_gap(&off, gap), GapAction::Skip);
/// assert!(matches!(
///     GapMarker::<bytes::Bytes>::on_gap(&Some(SseGapMarker::new()), gap),
///     GapAction::Insert(_)
/// ));
/// ```
impl<D, M> GapMarker<D> for Option<M>
where
    M: GapMarker<D>,
{
    #[inline]
    fn on_gap(&self, gap: Gap) -> GapAction<D> {
        match self {
            Some(marker) => marker.on_gap(gap),
            None => GapAction::Skip,
        }
    }
}

/// An SSE event before the next delivered one:
///
/// ```text
/// event: lagged
/// data: {"dropped":42}
///
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SseGapMarker {
    _priv: (),
}

impl SseGapMarker {
    /// The marker.
    pub fn new() -> Self {
        Self::default()
    }
}

impl GapMarker<Bytes> for SseGapMarker {
    fn on_gap(&self, gap: Gap) -> GapAction<Bytes> {
        GapAction::Insert(Bytes::from(format!(
            "event: lagged\ndata: {{\"dropped\":{}}}\n\n",
            gap.frames
        )))
    }
}

/// An NDJSON line before the next delivered one:
/// `{"type":"lagged","dropped":42}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NdjsonGapMarker {
    _priv: (),
}

impl NdjsonGapMarker {
    /// The marker.
    pub fn new() -> Self {
        Self::default()
    }
}

impl GapMarker<Bytes> for NdjsonGapMarker {
    fn on_gap(&self, gap: Gap) -> GapAction<Bytes> {
        GapAction::Insert(Bytes::from(format!(
            "{{\"type\":\"lagged\",\"dropped\":{}}}\n",
            gap.frames
        )))
    }
}

/// For gRPC: end the call at the first gap with `grpc-status: 15`
/// (`DATA_LOSS`) and a message, rather than deliver a stream with holes.
///
/// The message counts dropped *frames*: tonic packs several messages into
/// one frame when they are ready together, so more messages than that may be
/// missing.
///
/// Every message kept before the gap is delivered first.
///
/// # How late the status comes
///
/// The layer ends the call when the frame after the gap is handed to the
/// connection, so the status goes out behind everything already sent:
/// what waits in h2's send buffer for the call (on a tonic server, hyper's
/// default of 400 KiB per stream; tonic's builder does not expose it) and
/// in the socket's send buffer, which the kernel grows to megabytes for a
/// connection that once went fast. Measured with a stalled call behind a
/// slow network: 0.8 to 3.3 MB reached the client after its first drop,
/// before `DATA_LOSS`. A send buffer of 64 KiB set on the listening socket
/// (accepted connections inherit it; see the `grpc_server` example's
/// `listen`) brought that to about 0.55 MB. tonic's
/// `initial_stream_window_size`, `initial_connection_window_size` and
/// `max_frame_size` do not bound it: they limit what the server receives.
/// The client's own HTTP/2 windows do.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcDataLoss {
    _priv: (),
}

impl GrpcDataLoss {
    /// The marker.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<D> GapMarker<D> for GrpcDataLoss {
    fn on_gap(&self, gap: Gap) -> GapAction<D> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("15"));
        let message = format!("client too slow: {} frames of messages dropped", gap.frames);
        trailers.insert(
            "grpc-message",
            HeaderValue::from_str(&message.replace(' ', "%20")).expect("percent-encoded ASCII"),
        );
        GapAction::End(trailers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_made_markers_render_the_count() {
        let gap = Gap {
            frames: 42,
            bytes: 1000,
        };
        assert_eq!(
            SseGapMarker::new().on_gap(gap),
            GapAction::Insert(Bytes::from_static(
                b"event: lagged\ndata: {\"dropped\":42}\n\n"
            ))
        );
        assert_eq!(
            NdjsonGapMarker::new().on_gap(gap),
            GapAction::Insert(Bytes::from_static(
                b"{\"type\":\"lagged\",\"dropped\":42}\n"
            ))
        );
        let GapAction::<Bytes>::End(t) = GrpcDataLoss::new().on_gap(gap) else {
            panic!("grpc ends the call");
        };
        assert_eq!(t["grpc-status"], "15");
        assert_eq!(
            t["grpc-message"],
            "client%20too%20slow:%2042%20frames%20of%20messages%20dropped"
        );
    }

    #[test]
    fn an_optional_marker_marks_only_when_some() {
        let gap = Gap {
            frames: 7,
            bytes: 70,
        };
        assert_eq!(
            Some(NdjsonGapMarker::new()).on_gap(gap),
            NdjsonGapMarker::new().on_gap(gap)
        );
        assert_eq!(None::<NdjsonGapMarker>.on_gap(gap), GapAction::Skip);
        let closure = |gap: Gap| GapAction::Insert(gap.frames);
        assert_eq!(Some(closure).on_gap(gap), GapAction::Insert(7));
        assert!(matches!(
            GapMarker::<Bytes>::on_gap(&Some(GrpcDataLoss::new()), gap),
            GapAction::End(_)
        ));
        assert_eq!(
            GapMarker::<Bytes>::on_gap(&None::<GrpcDataLoss>, gap),
            GapAction::Skip
        );
    }
}
