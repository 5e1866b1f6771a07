//! One byte budget shared by many clients.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::sync::{AtomicU64, AtomicUsize, Mutex, MutexGuard};

/// A client that holds bytes under a [`MemoryBudget`].
pub(crate) trait BudgetMember: Send + Sync {
    /// Bytes buffered now (read without the client's lock).
    fn budget_bytes(&self) -> usize;
    /// Drops the client's oldest droppable frames until at least `need`
    /// bytes are freed or none is left; returns the bytes freed (already
    /// released from the budget).
    fn shed(&self, need: usize) -> usize;
}

struct Inner {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    dropped: AtomicU64,
    members: Mutex<Vec<Weak<dyn BudgetMember>>>,
}

/// One byte budget shared by every client of one or many layers.
///
/// When a frame would take the total buffered across clients over the
/// budget, frames are dropped from the client holding the most buffered
/// bytes first, then the next (oldest first, as its own overflow would),
/// so one process with many slow clients stays under the budget while a
/// client that keeps up loses nothing. A frame is charged only for what it
/// adds to its client's buffer, after what the client's own limits drop for
/// it. Only when no client has a droppable frame left is the incoming frame
/// refused, as its client's policy says: dropped (`DropOldest`,
/// `DropNewest`), kept while the producer waits for its client
/// (`Pause`), or the client evicted (`Disconnect`). The total goes past the
/// limit only by frames that are never dropped: critical frames, and the
/// one frame a `Pause` client keeps before its producer waits.
///
/// ```
/// use tower_backpressure::{BackpressureLayer, BufferConfig, MemoryBudget};
///
/// let budget = MemoryBudget::new(64 * 1024 * 1024);
/// let sse = BackpressureLayer::new(BufferConfig::default()).memory_budget(budget.clone());
/// let grpc = BackpressureLayer::new(BufferConfig::high_throughput()).memory_budget(budget.clone());
/// assert_eq!(budget.used(), 0);
/// # let _ = (sse, grpc);
/// ```
#[derive(Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

/// A snapshot of a [`MemoryBudget`].
///
/// `Serialize` with the `serde` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BudgetStats {
    /// The budget in bytes.
    pub limit: usize,
    /// Bytes buffered now across clients.
    pub used: usize,
    /// The most bytes ever buffered at once across clients.
    pub peak: usize,
    /// Frames dropped to stay under the budget.
    pub dropped: u64,
    /// Clients under the budget now.
    pub clients: usize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    ///
    /// # Panics
    ///
    /// If `limit` is 0.
    pub fn new(limit: usize) -> Self {
        assert!(
            limit > 0,
            "invalid memory budget: limit must be at least 1 byte"
        );
        Self {
            inner: Arc::new(Inner {
                limit,
                used: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                dropped: AtomicU64::new(0),
                members: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes buffered now across clients.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    /// A snapshot.
    pub fn stats(&self) -> BudgetStats {
        let clients = self
            .members()
            .iter()
            .filter(|m| m.strong_count() > 0)
            .count();
        BudgetStats {
            limit: self.inner.limit,
            used: self.used(),
            peak: self.inner.peak.load(Ordering::Acquire),
            dropped: self.inner.dropped.load(Ordering::Acquire),
            clients,
        }
    }

    fn members(&self) -> MutexGuard<'_, Vec<Weak<dyn BudgetMember>>> {
        self.inner.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn join(&self, member: Weak<dyn BudgetMember>) {
        let mut members = self.members();
        members.retain(|m| m.strong_count() > 0);
        members.push(member);
    }

    /// Reserves `bytes`, shedding other clients' (or this one's) oldest
    /// frames while the total would exceed the limit. `false`: nothing could
    /// be shed; the caller drops its frame. Called with no client lock held.
    pub(crate) fn reserve(&self, bytes: usize) -> bool {
        let inner = &*self.inner;
        loop {
            let used = inner.used.load(Ordering::Acquire);
            if used + bytes <= inner.limit {
                if inner
                    .used
                    .compare_exchange(used, used + bytes, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    inner.peak.fetch_max(used + bytes, Ordering::AcqRel);
                    return true;
                }
                continue;
            }
            if bytes > inner.limit {
                return false;
            }
            let need = used + bytes - inner.limit;
            if self.shed(need) == 0 && inner.used.load(Ordering::Acquire) >= used {
                // Nothing droppable anywhere, and nobody returned bytes
                // meanwhile (a client that took frames may have).
                return false;
            }
        }
    }

    /// Sheds at least `need` bytes if it can: from the member holding the
    /// most bytes first, then the next, until enough is freed or no member
    /// has a droppable frame left. Returns the bytes freed.
    fn shed(&self, need: usize) -> usize {
        let mut members: Vec<_> = self
            .members()
            .iter()
            .filter_map(Weak::upgrade)
            .map(|m| (m.budget_bytes(), m))
            .filter(|(bytes, _)| *bytes > 0)
            .collect();
        members.sort_unstable_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
        let mut freed = 0;
        for (_, member) in members {
            freed += member.shed(need - freed);
            if freed >= need {
                break;
            }
        }
        freed
    }

    /// Takes `bytes` whatever the total: for critical frames, which are never
    /// dropped.
    pub(crate) fn force(&self, bytes: usize) {
        let used = self.inner.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.inner.peak.fetch_max(used, Ordering::AcqRel);
    }

    /// Returns `bytes` to the budget.
    pub(crate) fn release(&self, bytes: usize) {
        if bytes > 0 {
            // Saturating: a member never returns more than it took, but a
            // wrapped total would refuse every frame from then on.
            let _ = self
                .inner
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    Some(used.saturating_sub(bytes))
                });
        }
    }

    pub(crate) fn count_dropped(&self, frames: u64) {
        self.inner.dropped.fetch_add(frames, Ordering::Relaxed);
    }
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.inner.limit)
            .field("used", &self.used())
            .finish()
    }
}
