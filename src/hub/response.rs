//! [`Hub::response`]: the streaming response of one client of a hub, which
//! `BackpressureLayer` serves from a window over the hub's log.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Response};
use http_body::{Body, Frame};

use super::window::{MakeWindow, Source, Tap};
use super::{Hub, Subscription};
use crate::buffer::ByWeigh;

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

    /// The response.
    pub fn build(self) -> Response<HubBody<T, W>> {
        let subscription = match self.after {
            Some(id) => self.hub.subscribe_after(id),
            None => self.hub.subscribe(),
        };
        let source: Arc<dyn MakeWindow<T>> = Arc::new(Source {
            shared: self.hub.shared().clone(),
            cursor: subscription.cursor(),
            limit: self.limit,
            resumed: self.after.is_some(),
            trailers: self.trailers.clone(),
        });
        let mut response = Response::new(HubBody {
            subscription,
            left: self.limit,
            trailers: self.trailers,
        });
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, self.content_type);
        response.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        response.extensions_mut().insert(Tap::new(source));
        response
    }
}

/// The body of a [`Hub::response`]: the client's subscription, up to its
/// limit. Gaps are silent here (a gap marker is the layer's).
#[derive(Debug)]
pub struct HubBody<T = Bytes, W = ByWeigh> {
    subscription: Subscription<T, W>,
    left: Option<u64>,
    trailers: Option<HeaderMap>,
}

impl<T: Buf + Clone, W> Body for HubBody<T, W> {
    type Data = T;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<T>, Infallible>>> {
        if self.left == Some(0) {
            return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        let frame = ready!(Pin::new(&mut self.subscription).poll_frame(cx));
        if let (Some(Ok(f)), Some(left)) = (&frame, &mut self.left) {
            if f.is_data() {
                *left -= 1;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        (self.left == Some(0) && self.trailers.is_none()) || self.subscription.is_end_stream()
    }
}
