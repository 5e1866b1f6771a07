//! [`Hub::response`]: the streaming response of one client of a hub, which
//! `BackpressureLayer` serves from a window over the hub's log.

use std::any::{Any, TypeId};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Response};
use http_body::{Body, Frame};

use super::backfill::Backfill;
use super::window::{MakeWindow, Source, Tap};
use super::{Hub, Subscription};
use crate::buffer::{ByWeigh, Weigher};
use crate::keep_alive::{Idle, KeepAlive, no_proxy_buffering};

/// Builds the streaming response of one client of a hub; from
/// [`Hub::response`].
///
/// The response's body reads the hub from the client's cursor. Through
/// [`BackpressureLayer`](crate::BackpressureLayer), the layer finds the
/// subscription in the response's extensions and serves the client from a
/// window over the hub's log instead: the layer's config bounds the client's
/// backlog there, and the client gets every event, gap marker, rule and
/// handle of the layer, with no pump task and no copy of its own.
#[derive(Debug)]
pub struct HubResponse<'a, T, W> {
    hub: &'a Hub<T, W>,
    after: Option<u64>,
    limit: Option<u64>,
    content_type: HeaderValue,
    trailers: Option<HeaderMap>,
    /// Frames fetched from elsewhere, weighed, to start with.
    backfill: Vec<(u64, T, usize)>,
    keep_alive: Option<KeepAlive>,
}

impl<T, W> Hub<T, W>
where
    T: Clone + Send + Sync + 'static,
    W: Send + Sync + 'static,
{
    /// The response of one client: SSE (`text/event-stream`) unless
    /// [`content_type`](HubResponse::content_type) says otherwise, starting
    /// after the newest frame unless [resumed](HubResponse::resume_after).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_backpressure::hub::{Hub, HubConfig, sse::last_event_id};
    ///
    /// let hub: Hub = Hub::new(HubConfig::default());
    /// # let request = http::Request::new(());
    /// // In a handler: resume where the client's last connection left off.
    /// let response = hub.response().resume_after(last_event_id(&request)).build();
    /// assert_eq!(response.headers()["content-type"], "text/event-stream");
    /// ```
    pub fn response(&self) -> HubResponse<'_, T, W> {
        HubResponse {
            hub: self,
            after: None,
            limit: None,
            content_type: HeaderValue::from_static("text/event-stream"),
            trailers: None,
            backfill: Vec::new(),
            keep_alive: Some(KeepAlive::new()),
        }
    }
}

impl<T, W> Hub<T, W>
where
    T: Clone + Send + Sync + 'static,
    W: Send + Sync + 'static,
{
    /// How to make a client's window: after frame `after` (a resume), or
    /// after the newest frame.
    pub(crate) fn window_source(
        &self,
        after: Option<u64>,
        limit: Option<u64>,
    ) -> Arc<dyn MakeWindow<T>> {
        let cursor = {
            let log = self.shared().lock();
            match after {
                Some(id) => log.after(id),
                None => log.tail(),
            }
        };
        Arc::new(Source {
            shared: self.shared().clone(),
            cursor,
            limit,
            resumed: after.is_some(),
            trailers: None,
            backfill: None,
        })
    }
}

impl<T, W> HubResponse<'_, T, W>
where
    T: Clone + Send + Sync + 'static,
    W: Send + Sync + 'static,
{
    /// Resumes right after frame `id` (the SSE `Last-Event-ID`), as
    /// [`Hub::subscribe_after`] does; `None` starts after the newest frame.
    ///
    /// Through the layer, a resumed client replays what it missed whatever
    /// its window's limits; the window bounds it again once its backlog is
    /// back below the pressure threshold, so that a client that reads on
    /// loses nothing when its replay ends.
    pub fn resume_after(mut self, id: Option<u64>) -> Self {
        self.after = id;
        self
    }

    /// Ends the response after `frames` frames (`None`: never), so that the
    /// client reconnects (an `EventSource` does, with `Last-Event-ID`).
    pub fn limit(mut self, frames: Option<u64>) -> Self {
        self.limit = frames;
        self
    }

    /// Trailers to end a [limited](Self::limit) response with, after its
    /// last frame (gRPC's `grpc-status: 0`).
    pub fn trailers(mut self, trailers: HeaderMap) -> Self {
        self.trailers = Some(trailers);
        self
    }

    /// The `Content-Type` (e.g. `application/x-ndjson`).
    pub fn content_type(mut self, content_type: HeaderValue) -> Self {
        self.content_type = content_type;
        self
    }

    /// The keep-alive of an SSE response served without
    /// [`BackpressureLayer`](crate::BackpressureLayer): a comment line after
    /// a quiet interval (see [`KeepAlive`]); `None` turns it off. On by
    /// default, every 15 seconds. Through the layer, the layer's
    /// [`keep_alive`](crate::BackpressureLayer::keep_alive) applies instead.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_backpressure::{Hub, KeepAlive};
    ///
    /// let hub: Hub = Hub::default();
    /// let response = hub
    ///     .response()
    ///     .keep_alive(Some(KeepAlive::new().interval(Duration::from_secs(30))))
    ///     .build();
    /// assert_eq!(response.headers()["cache-control"], "no-cache");
    /// assert_eq!(response.headers()["x-accel-buffering"], "no");
    /// ```
    pub fn keep_alive(mut self, keep_alive: Option<KeepAlive>) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// The response.
    pub fn build(self) -> Response<HubBody<T, W>> {
        let backfill = Backfill::new(self.after, self.backfill);
        let resumed = self.after.is_some() || !backfill.frames.is_empty();
        let window_backfill = (!backfill.frames.is_empty()).then(|| {
            let kept = backfill
                .frames
                .iter()
                .map(|(_, item, weight)| (item.clone(), *weight))
                .collect();
            (kept, backfill.gap)
        });
        let subscription = self.hub.subscribe_backfilled(self.after, backfill);
        let source: Arc<dyn MakeWindow<T>> = Arc::new(Source {
            shared: self.hub.shared().clone(),
            cursor: subscription.cursor(),
            limit: self.limit,
            resumed,
            trailers: self.trailers.clone(),
            backfill: window_backfill,
        });
        let claim = Arc::new(Claim::new::<HubBody<T, W>>());
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, self.content_type);
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        // Proxies that buffer (nginx) stream an SSE response that says so.
        no_proxy_buffering(&mut headers);
        let idle = Idle::for_response::<T>(self.keep_alive.as_ref(), &headers);
        let mut response = Response::new(HubBody {
            serving: Some(Box::new(Serving {
                subscription,
                left: self.limit,
                trailers: self.trailers,
                idle,
            })),
            claim: claim.clone(),
        });
        *response.headers_mut() = headers;
        response.extensions_mut().insert(Tap::new(source));
        response.extensions_mut().insert(Claimed(claim));
        response
    }
}

impl<T, W> HubResponse<'_, T, W>
where
    T: Clone + Send + Sync + 'static,
    W: Weigher<T> + Send + Sync + 'static,
{
    /// Starts the response with `frames` fetched from elsewhere (a bus's
    /// history), then the hub's frames after the last of them: for a
    /// client whose [`resume_after`](Self::resume_after) id is older than
    /// the hub's oldest frame, e.g. on a server that started after the
    /// client left.
    ///
    /// `frames` are `(id, item)`, oldest first, as the hub would have held
    /// them (an SSE frame with its `id:` line, say). As for
    /// [`Hub::subscribe_with_backfill`]: frames at or before the resume id
    /// are left out, and so is everything from the first hole in their ids
    /// on; every id skipped (before the first frame, between the frames and
    /// the hub's) is reported as one exactly counted gap, as any other (the
    /// layer's gap marker shows it). Through the layer, the frames are
    /// delivered before the hub's whatever the client's limits, as a
    /// resumed client's replay is.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_backpressure::hub::{Hub, HubConfig, sse};
    ///
    /// let hub: Hub = Hub::new(HubConfig::new(100));
    /// hub.publish_with_id(50, sse::frame(50, None, "x")).unwrap();
    /// // The client saw 47; the hub starts at 50; the bus still has 48 and 49.
    /// let history = (48..50).map(|id| (id, sse::frame(id, None, "x")));
    /// let response = hub.response().resume_after(Some(47)).backfill(history).build();
    /// # let _ = response;
    /// ```
    pub fn backfill(mut self, frames: impl IntoIterator<Item = (u64, T)>) -> Self {
        let weigher = &self.hub.shared().weigher;
        self.backfill = frames
            .into_iter()
            .map(|(id, item)| {
                let weight = weigher.weigh(&item);
                (id, item, weight)
            })
            .collect();
        self
    }
}

/// The body of a [`Hub::response`]: the client's subscription, up to its
/// limit. Gaps are silent here (a gap marker is the layer's).
///
/// Through [`BackpressureLayer`](crate::BackpressureLayer), a body that is
/// still the hub's own (boxed, or passed through wrappers that change no
/// frame, such as one that ends it on a signal) reads nothing more: the
/// layer serves its client from a window over the hub's log, and still
/// ends the response when the wrappers end the body. A body whose frames
/// were changed (mapped, encoded) is served as it was made, through the
/// layer's buffer, as any other body.
///
/// The check is that a token frame comes out of the wrappers as it went
/// in, so a wrapper that passes frames on unchanged but acts on them (one
/// that counts them, or takes the first N) is taken for a box: it sees no
/// frame of the hub's, only its end counts. Limit a response with
/// [`HubResponse::limit`], watch its frames through the layer's observer,
/// or put such a wrapper outside the layer.
#[derive(Debug)]
pub struct HubBody<T = Bytes, W = ByWeigh> {
    /// What serves the client without the layer; `None` once the layer
    /// serves it from a window. Boxed: such a body stays in the response's
    /// wrappers (polled only for their end) for as long as the client is
    /// connected, and then holds nothing but its claim.
    serving: Option<Box<Serving<T, W>>>,
    claim: Arc<Claim>,
}

/// A [`HubBody`] serving its subscription itself.
#[derive(Debug)]
struct Serving<T, W> {
    subscription: Subscription<T, W>,
    left: Option<u64>,
    trailers: Option<HeaderMap>,
    /// SSE keep-alive, served without the layer.
    idle: Option<Idle>,
}

impl<T: Buf + Clone + 'static, W> Body for HubBody<T, W> {
    type Data = T;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<T>, Infallible>>> {
        let mut keep_alive = false;
        match self.claim.state.load(Ordering::Acquire) {
            SERVING => keep_alive = true,
            LAYERED => {}
            PROBE => {
                // The layer asks whether the frames still come out as they
                // go in: the token, once.
                self.claim.state.store(PROBED, Ordering::Release);
                if let Some(token) = probe::<T>() {
                    return Poll::Ready(Some(Ok(Frame::data(token))));
                }
                return Poll::Pending;
            }
            // Nothing comes from here: the window serves the client (the
            // body is polled only so that its wrappers can end it).
            SHADOW => {
                self.serving = None;
                return Poll::Pending;
            }
            _ => return Poll::Pending,
        }
        let Some(serving) = self.serving.as_deref_mut() else {
            return Poll::Pending;
        };
        if serving.left == Some(0) {
            return Poll::Ready(serving.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        let frame = match (
            Pin::new(&mut serving.subscription).poll_frame(cx),
            &mut serving.idle,
        ) {
            (Poll::Ready(frame), idle) => {
                if let Some(idle) = idle {
                    idle.busy();
                }
                frame
            }
            // A comment is not a frame of the subscription: not counted
            // against the limit.
            (Poll::Pending, Some(idle)) if keep_alive => {
                return idle
                    .poll_quiet(cx)
                    .map(|comment| Some(Ok(Frame::data(comment))));
            }
            (Poll::Pending, _) => return Poll::Pending,
        };
        if let (Some(Ok(f)), Some(left)) = (&frame, &mut serving.left) {
            if f.is_data() {
                *left -= 1;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.serving.as_deref().is_some_and(|serving| {
            (serving.left == Some(0) && serving.trailers.is_none())
                || serving.subscription.is_end_stream()
        })
    }
}

/// The body serves its subscription.
const SERVING: u8 = 0;
/// Its next poll yields the probe token.
const PROBE: u8 = 1;
/// It yielded the token; it yields nothing until the layer decides.
const PROBED: u8 = 2;
/// The layer serves the client from a window: the body reads nothing.
const SHADOW: u8 = 3;
/// The body serves its subscription into the layer's buffer: no
/// keep-alive of its own (the layer's goes to the client).
const LAYERED: u8 = 4;

/// What a [`HubBody`] shares with the layer: whether the layer serves its
/// client from a window, and the body's type, so that the layer can tell
/// whether the response still carries the hub's own body (see
/// `middleware/future.rs`).
#[derive(Debug)]
pub(crate) struct Claim {
    state: AtomicU8,
    body: TypeId,
}

/// The response extension that carries a [`Claim`].
#[derive(Debug, Clone)]
pub(crate) struct Claimed(pub(crate) Arc<Claim>);

impl Claim {
    fn new<B: 'static>() -> Self {
        Self {
            state: AtomicU8::new(SERVING),
            body: TypeId::of::<B>(),
        }
    }

    /// `B` is the hub's body type itself (no wrapper at all).
    pub(crate) fn is_body<B: 'static>(&self) -> bool {
        self.body == TypeId::of::<B>()
    }

    /// The body's next poll yields the probe token.
    pub(crate) fn arm(&self) {
        self.state.store(PROBE, Ordering::Release);
    }

    /// The body yielded the token (whatever its wrappers made of it).
    pub(crate) fn probed(&self) -> bool {
        self.state.load(Ordering::Acquire) == PROBED
    }

    /// The window serves the client: the body reads nothing more.
    pub(crate) fn shadow(&self) {
        self.state.store(SHADOW, Ordering::Release);
    }

    /// The body serves its subscription through the layer's buffer (the
    /// keep-alive is the layer's).
    pub(crate) fn layered(&self) {
        self.state.store(LAYERED, Ordering::Release);
    }
}

/// The probe token's address: a frame that comes out of the response's
/// body as this very (empty) slice went through wrappers that change no
/// frame.
static PROBE_TOKEN: [u8; 1] = [0];

/// The probe token, for `Bytes` frames (`None` for other types).
pub(crate) fn probe<T: 'static>() -> Option<T> {
    let token: Box<dyn Any> = Box::new(Bytes::from_static(&PROBE_TOKEN[..0]));
    token.downcast::<T>().ok().map(|t| *t)
}

/// `data` is the probe token, unchanged.
pub(crate) fn is_probe<T: 'static>(data: &T) -> bool {
    (data as &dyn Any)
        .downcast_ref::<Bytes>()
        .is_some_and(|b| b.is_empty() && std::ptr::eq(b.as_ptr(), PROBE_TOKEN.as_ptr()))
}
