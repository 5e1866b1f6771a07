//! The hub's sweep: brings the windows of the layer's clients that do not
//! read up to date, so that their events and rules fire without any work per
//! publish.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::time::Instant;

use crate::client::Storage;
use crate::client::clock::{after, now};

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
    /// Adds a client; starts the sweep task if it is not running.
    ///
    /// Only on a tokio runtime: without one no task could sweep the client,
    /// so nothing is queued (the client is brought up to date when it
    /// reads). A task that ended without finishing its work (its runtime
    /// shut down, or it unwound) clears `running` on its way out and hands
    /// its clients back, so the next attach starts a new one.
    pub(crate) fn attach(self: &Arc<Self>, client: Weak<dyn Sweep>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.lock().push(Entry { client, due: None });
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut task = Task {
            sweeper: self.clone(),
            list: Vec::new(),
            finished: false,
        };
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !task.sweeper.sweep(&mut task.list).await {
                    // `running` is cleared: a new task may run already.
                    task.finish();
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
                let client = &entry.client;
                // An observer's panic, resumed after its events went out,
                // must not end the sweep of every client: the client's
                // state is whole, and it is looked at again next period.
                entry.due = match catch_unwind(AssertUnwindSafe(|| {
                    client.upgrade().and_then(|c| c.sweep())
                })) {
                    Ok(due) => due,
                    Err(_) => Some(after(now(), SWEEP_PERIOD)),
                };
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

/// The sweep task's own list of clients. Dropped with the task, however it
/// ends: if it ends with clients left (its runtime shut down while they were
/// open), it hands the live ones back and clears `running`, so that the next
/// attach, on any runtime, starts a task that takes them.
struct Task {
    sweeper: Arc<Sweeper>,
    list: Vec<Entry>,
    /// Ended with no client left (`sweep` cleared `running` itself).
    finished: bool,
}

impl Task {
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut pending = self.sweeper.lock();
        pending.retain(|e| e.client.strong_count() > 0);
        pending.extend(self.list.drain(..).filter(|e| e.client.strong_count() > 0));
        for e in pending.iter_mut() {
            e.due = None;
        }
        // Under the list's lock, as in `sweep`.
        self.sweeper.running.store(false, Ordering::Release);
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

    /// A client whose look panics (an observer that panics, resumed after
    /// delivery), the first `panics` times.
    struct Panicky {
        looks: AtomicUsize,
        panics: usize,
    }

    impl Sweep for Panicky {
        fn sweep(&self) -> Option<Instant> {
            let n = self.looks.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= self.panics {
                panic!("an observer panicked");
            }
            Some(now() + SWEEP_PERIOD)
        }
    }

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// Issue 20, bug 3: a panic in one client's look unwound the sweep
    /// task, and no later attach started another.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_client_does_not_stop_the_sweep() {
        let sweeper = Arc::new(Sweeper::default());
        let panicky = Arc::new(Panicky {
            looks: AtomicUsize::new(0),
            panics: 2,
        });
        let other = counted(SWEEP_PERIOD, usize::MAX);
        sweeper.attach(Arc::downgrade(&panicky) as Weak<dyn Sweep>);
        sweeper.attach(Arc::downgrade(&other) as Weak<dyn Sweep>);
        for _ in 0..5 {
            tokio::time::sleep(SWEEP_PERIOD).await;
        }
        assert!(
            other.looks.load(Ordering::Relaxed) >= 5,
            "the other client is still swept"
        );
        assert!(
            panicky.looks.load(Ordering::Relaxed) >= 5,
            "the panicking one too, once its observer is quiet"
        );
        // A client attached later is swept by the same task.
        let late = counted(SWEEP_PERIOD, usize::MAX);
        sweeper.attach(Arc::downgrade(&late) as Weak<dyn Sweep>);
        for _ in 0..3 {
            tokio::time::sleep(SWEEP_PERIOD).await;
        }
        assert!(late.looks.load(Ordering::Relaxed) >= 3);
    }

    /// Issue 20, bug 3: the sweep task of a runtime that shut down left
    /// `running` set, so no later attach (on another runtime) started one;
    /// its clients stayed in the list.
    #[test]
    fn a_sweep_whose_runtime_shut_down_is_restarted_by_the_next_attach() {
        let sweeper = Arc::new(Sweeper::default());
        let first = paused_runtime();
        let gone = counted(SWEEP_PERIOD, usize::MAX);
        first.block_on(async {
            sweeper.attach(Arc::downgrade(&gone) as Weak<dyn Sweep>);
            tokio::time::sleep(SWEEP_PERIOD * 2).await;
        });
        assert!(gone.looks.load(Ordering::Relaxed) >= 2);
        drop(first);
        assert!(
            !sweeper.running.load(Ordering::Acquire),
            "the task is gone with its runtime"
        );
        drop(gone);
        let second = paused_runtime();
        let next = counted(SWEEP_PERIOD, usize::MAX);
        second.block_on(async {
            sweeper.attach(Arc::downgrade(&next) as Weak<dyn Sweep>);
            for _ in 0..3 {
                tokio::time::sleep(SWEEP_PERIOD).await;
            }
        });
        assert!(
            next.looks.load(Ordering::Relaxed) >= 3,
            "a new task on the second runtime sweeps it"
        );
        drop(next);
        second.block_on(async {
            for _ in 0..3 {
                tokio::time::sleep(SWEEP_PERIOD).await;
            }
        });
        assert!(sweeper.lock().is_empty(), "dropped clients are let go");
    }

    /// Issue 20, bug 3: without a runtime no task can take the client; it
    /// must not be queued (its entry, and the client's allocation behind
    /// the `Weak`, would stay for ever).
    #[test]
    fn nothing_is_queued_without_a_runtime() {
        let sweeper = Arc::new(Sweeper::default());
        for _ in 0..100 {
            let c = counted(SWEEP_PERIOD, usize::MAX);
            sweeper.attach(Arc::downgrade(&c) as Weak<dyn Sweep>);
        }
        assert_eq!(sweeper.lock().len(), 0);
        assert!(!sweeper.running.load(Ordering::Acquire));
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
