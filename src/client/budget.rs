//! The client's share of a memory budget.

use std::sync::atomic::Ordering;

use super::{Client, Reporter, State, Storage};
use crate::budget::BudgetMember;
use crate::buffer::Dropped;
use crate::config::Overflow;
use crate::observer::{BackpressureObserver, EvictReason};

impl<D, O: BackpressureObserver, S: Storage<D>> Client<D, O, S> {
    /// Brings the budget in line with the storage after a change; `reserved`
    /// bytes were taken from the budget for it beforehand.
    pub(super) fn settle(&self, st: &State<D, S>, reserved: usize) {
        if let Some(budget) = &self.budget {
            // Only changed under the client's lock. Bytes are returned to
            // the budget before the mirror goes down, so that a shed that
            // finds nothing here finds the budget already freed.
            let now = st.storage.bytes();
            let held = self
                .budget_bytes
                .load(Ordering::Acquire)
                .saturating_add(reserved);
            if held > now {
                budget.release(held - now);
                self.budget_bytes.store(now, Ordering::Release);
            } else {
                self.budget_bytes.store(now, Ordering::Release);
                if now > held {
                    // The storage grew more than was reserved (a weigher
                    // that is not deterministic): count what it holds.
                    budget.force(now - held);
                }
            }
        }
    }
}

impl<D: Send, O: BackpressureObserver, S: Storage<D> + Send> BudgetMember for Client<D, O, S> {
    fn budget_bytes(&self) -> usize {
        self.budget_bytes.load(Ordering::Acquire)
    }

    fn shed(&self, need: usize) -> usize {
        let mut st = self.lock();
        if st.closed {
            return 0;
        }
        if self.config.overflow() == Overflow::Disconnect {
            // It drops nothing: it is cut off, and all it holds is freed.
            let held = st.storage.bytes();
            if held > 0 {
                self.evict(&mut st, EvictReason::Overflow);
            }
            return held;
        }
        let mut freed = Dropped::default();
        while freed.bytes < need {
            match st.storage.evict_oldest() {
                Some(w) => {
                    freed.frames += 1;
                    freed.bytes += w;
                }
                None => break,
            }
        }
        if freed.frames == 0 {
            return 0;
        }
        if let Some(budget) = &self.budget {
            budget.count_dropped(freed.frames as u64);
        }
        let reason = self.after_push(&mut st, false, freed, None);
        self.settle(&st, 0);
        if let Some(reason) = reason {
            self.evict(&mut st, reason);
            st.wake_consumer = true;
        } else {
            // The reporting side reports the drops, batched, when it runs.
            match self.reporter {
                Reporter::Producer => st.wake_producer = true,
                Reporter::Consumer => st.wake_consumer = true,
            }
        }
        freed.bytes
    }
}
