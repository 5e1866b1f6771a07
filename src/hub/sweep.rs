//! The hub's sweep: brings the windows of the layer's clients that do not
//! read up to date, so that their events and rules fire without any work per
//! publish.

use std::sync::Arc;

use crate::client::Storage;

/// How often the hub's sweep looks at the clients it serves through the
/// layer: the latency of their events (pressure, drops, evictions) while
/// they do not read.
pub(crate) const SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// A client the sweep looks at: see `Client::sweep`.
pub(crate) trait Sweep: Send + Sync {
    /// `false` once the client has closed.
    fn sweep(&self) -> bool;
}

/// The longest a stalled client under pressure goes without a look (its
/// drops are reported in larger batches; a timed rule's deadline is kept).
pub(crate) const SWEEP_SLOWEST: std::time::Duration = std::time::Duration::from_secs(1);

/// The clients of one hub served through the layer, and whether the task
/// that sweeps them runs.
#[derive(Default)]
pub(crate) struct Sweeper {
    clients: std::sync::Mutex<Vec<std::sync::Weak<dyn Sweep>>>,
    running: std::sync::atomic::AtomicBool,
}

impl Sweeper {
    /// Adds a client; starts the sweep task if it is not running (only on
    /// a tokio runtime; without one, clients are brought up to date when
    /// they read).
    pub(crate) fn attach(self: &Arc<Self>, client: std::sync::Weak<dyn Sweep>) {
        self.lock().push(client);
        if self.running.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.running
                .store(false, std::sync::atomic::Ordering::Release);
            return;
        };
        let sweeper = self.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !sweeper.sweep().await {
                    return;
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Weak<dyn Sweep>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One sweep; `false` (and the task stops) once no client is left.
    ///
    /// Clients are looked at in chunks, with a yield to the runtime between
    /// two chunks: a sweep over many clients must not hold a worker (and
    /// the fast clients it serves) for its whole length.
    async fn sweep(&self) -> bool {
        let clients: Vec<_> = self.lock().clone();
        for chunk in clients.chunks(SWEEP_CHUNK) {
            for client in chunk.iter().filter_map(std::sync::Weak::upgrade) {
                client.sweep();
            }
            tokio::task::yield_now().await;
        }
        let mut list = self.lock();
        list.retain(|c| c.strong_count() > 0);
        let alive = !list.is_empty();
        if !alive {
            // Under the list's lock: a client attached from now on starts
            // a new task.
            self.running
                .store(false, std::sync::atomic::Ordering::Release);
        }
        alive
    }
}

/// Clients looked at between two yields of the sweep task.
const SWEEP_CHUNK: usize = 256;

impl<D, O, S> Sweep for crate::client::Client<D, O, S>
where
    D: Send + 'static,
    O: crate::observer::BackpressureObserver,
    S: Storage<D> + Send + 'static,
{
    fn sweep(&self) -> bool {
        crate::client::Client::sweep(self, SWEEP_PERIOD, SWEEP_SLOWEST)
    }
}
