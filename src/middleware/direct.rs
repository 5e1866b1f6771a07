//! The direct path: while the client keeps up, the body hyper polls takes
//! frames from the inner body itself, and the pump takes over only when the
//! client stops reading.
//!
//! The inner body lives here, shared by the pump and the consumer; whoever
//! polls it holds the lock, so frames leave it one at a time and in order.
//! The consumer polls it only when its ring is empty and nothing is owed
//! before the next frame ([`Next::Idle`](crate::client::Next::Idle)), and
//! the pump pushes into the ring only while it holds the lock: a frame taken
//! directly can never overtake one in the ring.
//!
//! Most bodies keep one waker, so both sides poll the inner body with the
//! same one, a [`Router`]: it wakes the consumer if the consumer's last poll
//! ended waiting on the inner body (hyper, having got `Pending`, polls again
//! when woken), and the pump otherwise: once the consumer has taken a frame
//! and not come back (its client stopped reading, the moment the backlog
//! starts), whatever the inner body yields next goes to the pump, and the
//! producer never waits for the client.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use http_body::Body;

use crate::BoxError;
use crate::buffer::FrameClass;
use crate::client::End;

/// The inner body of a buffered response, and the waker it is polled with.
pub(crate) struct Source<B: Body> {
    body: Mutex<Option<Pin<Box<B>>>>,
    /// The layer's [`Classify`](crate::Classify) hook, for a frame the
    /// consumer puts into the ring.
    classify: Box<dyn Fn(&B::Data) -> FrameClass + Send + Sync>,
    router: Arc<Router>,
    waker: Waker,
}

/// The one waker the inner body keeps: see the [module docs](self).
#[derive(Default)]
pub(crate) struct Router {
    /// The consumer's last poll ended waiting on the inner body.
    direct: AtomicBool,
    consumer: AtomicWaker,
    pump: AtomicWaker,
}

impl Wake for Router {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.direct.swap(false, Ordering::AcqRel) {
            self.consumer.wake();
        } else {
            self.pump.wake();
        }
    }
}

/// What the consumer's poll of the inner body gave.
pub(crate) enum Direct<D> {
    /// A data frame, for the client now.
    Data(D),
    /// The inner body ended (or its poll panicked): the end is with the
    /// client state; poll it.
    Ended,
    /// Nothing now: the consumer is woken when the inner body has more.
    Pending,
}

impl<B: Body> Source<B> {
    pub(crate) fn new(
        body: B,
        classify: Box<dyn Fn(&B::Data) -> FrameClass + Send + Sync>,
    ) -> Arc<Self> {
        let router = Arc::new(Router::default());
        Arc::new(Self {
            body: Mutex::new(Some(Box::pin(body))),
            classify,
            waker: Waker::from(router.clone()),
            router,
        })
    }

    /// The inner body, for the pump (which waits for the consumer's one
    /// poll to finish).
    pub(crate) fn lock(&self) -> Inner<'_, B> {
        Inner {
            guard: self.body.lock().unwrap_or_else(|e| e.into_inner()),
            source: self,
        }
    }

    /// The inner body, for the consumer, unless the pump holds it (then
    /// the pump puts what it takes into the ring and wakes the consumer).
    pub(crate) fn try_lock(&self) -> Option<Inner<'_, B>> {
        let guard = match self.body.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Inner {
            guard,
            source: self,
        })
    }

    /// The class of a frame the consumer puts into the ring.
    pub(crate) fn classify(&self, data: &B::Data) -> FrameClass {
        (self.classify)(data)
    }

    /// Wakes the pump: the consumer ended the inner body, or took nothing
    /// from it after a wake-up meant for it.
    pub(crate) fn wake_pump(&self) {
        self.router.pump.wake();
    }

    /// Drops the inner body, if it is still there.
    pub(crate) fn drop_body(&self) {
        let body = self.lock().guard.take();
        drop(body);
    }
}

/// The inner body, locked.
pub(crate) struct Inner<'a, B: Body> {
    guard: MutexGuard<'a, Option<Pin<Box<B>>>>,
    source: &'a Source<B>,
}

impl<B: Body> Inner<'_, B> {
    /// Whether the inner body is still there (it has not ended).
    pub(crate) fn is_open(&self) -> bool {
        self.guard.is_some()
    }

    /// The pump's poll: with the router's waker; the pump's own waker is
    /// what the router wakes when the consumer does not wait.
    pub(crate) fn poll_for_pump(
        &mut self,
        cx: &Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.source.router.pump.register(cx.waker());
        let Some(body) = self.guard.as_mut() else {
            return Poll::Ready(None);
        };
        body.as_mut()
            .poll_frame(&mut Context::from_waker(&self.source.waker))
    }

    /// Drops the inner body: it has ended.
    pub(crate) fn close(&mut self) {
        *self.guard = None;
    }

    /// One poll of the inner body with the router's waker; a panic is
    /// caught and reported as [`Step::Panicked`].
    fn step(&mut self) -> Step<B::Data>
    where
        B::Error: Into<BoxError>,
    {
        let Some(body) = self.guard.as_mut() else {
            return Step::Pending;
        };
        let mut cx = Context::from_waker(&self.source.waker);
        loop {
            match catch_unwind(AssertUnwindSafe(|| body.as_mut().poll_frame(&mut cx))) {
                Ok(Poll::Pending) => return Step::Pending,
                Ok(Poll::Ready(Some(Ok(frame)))) => match frame.into_data() {
                    Ok(data) => return Step::Data(data),
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => return Step::End(End::Trailers(trailers)),
                        // Neither data nor trailers: nothing to deliver.
                        Err(_) => continue,
                    },
                },
                Ok(Poll::Ready(Some(Err(error)))) => return Step::End(End::Error(error.into())),
                Ok(Poll::Ready(None)) => return Step::End(End::Eof),
                Err(_panic) => return Step::Panicked,
            }
        }
    }

    /// The consumer's poll, when its ring is empty and nothing is owed
    /// before the next frame, with what it does to the client's state:
    /// `took` for a frame handed out directly, `push` for one that goes to
    /// the ring (`false` once the ring takes no more), `finish` at the end
    /// (trailers, an error, the end of the body) and `stopped` if the inner
    /// body panicked (as the pump's task would have).
    ///
    /// After a frame it handed out, it polls the inner body once more, so
    /// that the inner body holds the router's waker again: if the client
    /// does not come back, what comes next goes to the pump. A frame that
    /// this poll finds goes to the ring, and the pump drains what follows.
    pub(crate) fn poll_for_consumer(
        &mut self,
        cx: &Context<'_>,
        took: impl FnOnce(),
        push: impl FnOnce(B::Data) -> bool,
        finish: impl FnOnce(End),
        stopped: impl FnOnce(),
    ) -> Direct<B::Data>
    where
        B::Error: Into<BoxError>,
    {
        if self.guard.is_none() {
            return Direct::Pending;
        }
        let router = self.source.router.clone();
        router.consumer.register(cx.waker());
        // Set before the poll: a wake-up while it runs is for the consumer.
        router.direct.store(true, Ordering::Release);
        let data = match self.step() {
            Step::Pending => return Direct::Pending,
            Step::Data(data) => data,
            Step::End(end) => {
                router.direct.store(false, Ordering::Release);
                self.end(Some(end), finish, stopped);
                return Direct::Ended;
            }
            Step::Panicked => {
                router.direct.store(false, Ordering::Release);
                self.end(None, finish, stopped);
                return Direct::Ended;
            }
        };
        // The consumer may not come back soon (its client may stop
        // reading): what comes next is the pump's.
        router.direct.store(false, Ordering::Release);
        took();
        match self.step() {
            Step::Pending => {}
            Step::Data(next) => {
                if push(next) {
                    // More may be ready: the pump drains it.
                    self.source.wake_pump();
                }
            }
            Step::End(end) => self.end(Some(end), finish, stopped),
            Step::Panicked => self.end(None, finish, stopped),
        }
        Direct::Data(data)
    }

    /// The inner body ended (`None`: its poll panicked): drops it, hands the
    /// end to the client state, and wakes the pump, which then finishes.
    fn end(&mut self, end: Option<End>, finish: impl FnOnce(End), stopped: impl FnOnce()) {
        *self.guard = None;
        match end {
            Some(end) => finish(end),
            None => stopped(),
        }
        self.source.wake_pump();
    }
}

/// One poll of the inner body.
enum Step<D> {
    Data(D),
    End(End),
    Panicked,
    Pending,
}
