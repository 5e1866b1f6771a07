//! The hub's sweep: brings the windows of the layer's clients that do not
//! read up to date, so that their events and rules fire without any work per
//! publish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::time::Instant;

use crate::client::Storage;
use crate::client::clock::now;

/// How often the hub's sweep looks at the clients it serves through the
/// layer: the latency of their events (pressure, drops, evictions) while
/// they do not read.
pub(crate) const SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// A client the sweep looks at: see `Client::sweep`.
pub(crate) trait Sweep: Send + Sync {
    /// When the client wants its next look; `None` once it has closed.
    fn sweep(&self) -> Option<Instant>;
}

/// The longest a stalled client under pressure goes without a look (its
/// drops are reported in larger batches; a timed rule's deadline is kept).
pub(crate) const SWEEP_SLOWEST: std::time::Duration = std::time::Duration::from_secs(1);

/// One client in the sweep's list, with when it wants its next look: the
/// sweep passes over a client that is not due without touching it (no lock,
/// no reference count), so that a stalled client the sweep has backed off
/// from costs one comparison per tick.
struct Entry {
    client: Weak<dyn Sweep>,
    due: Option<Instant>,
}

/// The clients of one hub served through the layer, and whether the task
/// that sweeps them runs.
#[derive(Default)]
pub(crate) struct Sweeper {
    /// Clients attached since the sweep task last took the list.
    clients: Mutex<Vec<Entry>>,
    running: AtomicBool,
}

impl Sweeper {
    /// Adds a client; starts the sweep task if it is not running (only on
    /// a tokio runtime; without one, clients are brought up to date when
    /// they read).
    pub(crate) fn attach(self: &Arc<Self>, client: Weak<dyn Sweep>) {
        self.lock().push(Entry { client, due: None });
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.running.store(false, Ordering::Release);
            return;
        };
        let sweeper = self.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut list = Vec::new();
            loop {
                tick.tick().await;
                if !sweeper.sweep(&mut list).await {
                    return;
                }
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One sweep over `list` (the task's own, with the clients attached
    /// since the last one added); `false` (and the task stops) once no
    /// client is left.
    ///
    /// Clients are looked at in chunks, with a yield to the runtime between
    /// two chunks: a sweep over many clients must not hold a worker (and
    /// the fast clients it serves) for its whole length.
    async fn sweep(&self, list: &mut Vec<Entry>) -> bool {
        list.append(&mut self.lock());
        let mut t = now();
        let (mut looked, mut passed) = (0, 0);
        for entry in list.iter_mut() {
            if entry.due.is_some_and(|due| t < due) {
                passed += 1;
            } else {
                entry.due = entry.client.upgrade().and_then(|c| c.sweep());
                // A closed client is gone from the list below.
                if entry.due.is_none() {
                    entry.client = Weak::<Closed>::new();
                }
                looked += 1;
            }
            if looked >= SWEEP_CHUNK || passed >= SWEEP_CHUNK * 16 {
                (looked, passed) = (0, 0);
                tokio::task::yield_now().await;
                t = now();
            }
        }
        list.retain(|e| e.client.strong_count() > 0);
        let pending = self.lock();
        let alive = !list.is_empty() || !pending.is_empty();
        if !alive {
            // Under the list's lock: a client attached from now on starts
            // a new task.
            self.running.store(false, Ordering::Release);
        }
        alive
    }
}

/// Stands in for a closed client in the sweep's list (a `Weak` that never
/// upgrades).
struct Closed;

impl Sweep for Closed {
    fn sweep(&self) -> Option<Instant> {
        None
    }
}

/// Clients looked at between two yields of the sweep task (or sixteen
/// times as many passed over).
const SWEEP_CHUNK: usize = 16;

impl<D, O, S> Sweep for crate::client::Client<D, O, S>
where
    D: Send + 'static,
    O: crate::observer::BackpressureObserver,
    S: Storage<D> + Send + 'static,
{
    fn sweep(&self) -> Option<Instant> {
        crate::client::Client::sweep(self, SWEEP_PERIOD, SWEEP_SLOWEST)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// A client that wants a look every `every`, counts its looks, and
    /// closes after `looks` of them.
    struct Counted {
        looks: AtomicUsize,
        every: Duration,
        close_after: usize,
    }

    impl Sweep for Counted {
        fn sweep(&self) -> Option<Instant> {
            let n = self.looks.fetch_add(1, Ordering::Relaxed) + 1;
            (n < self.close_after).then(|| now() + self.every)
        }
    }

    fn counted(every: Duration, close_after: usize) -> Arc<Counted> {
        Arc::new(Counted {
            looks: AtomicUsize::new(0),
            every,
            close_after,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_is_not_due_is_not_looked_at() {
        let sweeper = Arc::new(Sweeper::default());
        let slow = counted(Duration::from_secs(1), usize::MAX);
        let fast = counted(SWEEP_PERIOD, usize::MAX);
        sweeper.attach(Arc::downgrade(&slow) as Weak<dyn Sweep>);
        sweeper.attach(Arc::downgrade(&fast) as Weak<dyn Sweep>);
        // Twelve periods: the one that wants a look every period gets one
        // per tick; the one that wants one a second, one at once and one a
        // second later.
        for _ in 0..12 {
            tokio::time::sleep(SWEEP_PERIOD).await;
        }
        let (slow, fast) = (
            slow.looks.load(Ordering::Relaxed),
            fast.looks.load(Ordering::Relaxed),
        );
        assert!((12..=13).contains(&fast), "{fast} looks every period");
        assert_eq!(slow, 2, "once at once, once a second later");
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_stops_once_every_client_has_closed_and_a_new_one_restarts_it() {
        let sweeper = Arc::new(Sweeper::default());
        let a = counted(SWEEP_PERIOD, 3);
        sweeper.attach(Arc::downgrade(&a) as Weak<dyn Sweep>);
        for _ in 0..10 {
            tokio::time::sleep(SWEEP_PERIOD).await;
        }
        assert_eq!(
            a.looks.load(Ordering::Relaxed),
            3,
            "not looked at once closed"
        );
        assert!(!sweeper.running.load(Ordering::Acquire), "the task stopped");
        let b = counted(SWEEP_PERIOD, usize::MAX);
        sweeper.attach(Arc::downgrade(&b) as Weak<dyn Sweep>);
        for _ in 0..3 {
            tokio::time::sleep(SWEEP_PERIOD).await;
        }
        assert!(b.looks.load(Ordering::Relaxed) >= 3, "a new task sweeps it");
        drop(b);
        for _ in 0..3 {
            tokio::time::sleep(SWEEP_PERIOD).await;
        }
        assert!(
            !sweeper.running.load(Ordering::Acquire),
            "a dropped client is let go"
        );
    }
}
