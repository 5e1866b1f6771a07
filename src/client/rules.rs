//! The eviction rules: drop counts, drop windows, stalls and pressure that
//! lasts.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{Client, State, Storage, after, now};
use crate::buffer::Dropped;
use crate::config::BufferConfig;
use crate::handle::Health;
use crate::observer::{BackpressureObserver, EventKind, EvictReason};

impl<D, O: BackpressureObserver, S: Storage<D>> Client<D, O, S> {
    /// After a push: records drops, fires `Pressure` on the way up, and
    /// applies the drop-count rules; returns a rule that fired.
    pub(super) fn after_push(
        &self,
        st: &mut State<D, S>,
        was_empty: bool,
        dropped: Dropped,
    ) -> Option<EvictReason> {
        let rules = self.config.rules();
        if was_empty && !st.storage.is_empty() && rules.stall.is_some() {
            st.waiting_since = Some(now().max(st.last_taken));
        }
        if st.pressure.is_none() && !st.storage.is_healthy() {
            st.pressure = Some(if rules.pressure.is_some() {
                now()
            } else {
                st.last_taken
            });
            self.handle.set_health(Health::Pressure);
            st.event(EventKind::Pressure);
        }
        if dropped.frames == 0 {
            return None;
        }
        st.unreported.frames += dropped.frames;
        st.unreported.bytes += dropped.bytes;
        self.drops_pending.store(true, Ordering::Release);
        if let Some(max) = rules.dropped {
            if st.storage.stats().dropped > max {
                return Some(EvictReason::DroppedTotal);
            }
        }
        if let Some((max, window)) = rules.dropped_within {
            let t = now();
            let frames = dropped.frames as u64;
            let bucket = window / 64;
            match st.drop_window.back_mut() {
                Some((at, n)) if t.saturating_duration_since(*at) <= bucket => *n += frames,
                _ => st.drop_window.push_back((t, frames)),
            }
            st.drop_window_sum += frames;
            while let Some(&(at, n)) = st.drop_window.front() {
                if t.saturating_duration_since(at) <= window {
                    break;
                }
                st.drop_window.pop_front();
                st.drop_window_sum -= n;
            }
            if st.drop_window_sum > max {
                return Some(EvictReason::DroppedWindow);
            }
        }
        None
    }

    /// The next moment a timed rule could fire.
    pub(super) fn next_deadline(&self, st: &State<D, S>) -> Option<Instant> {
        let rules = self.config.rules();
        let stall = rules
            .stall
            .zip(st.waiting_since)
            .filter(|_| !st.storage.is_empty())
            .map(|(d, since)| after(since, d));
        let pressure = rules
            .pressure
            .zip(st.pressure)
            .map(|(d, since)| after(since, d));
        match (stall, pressure) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A timed rule that has fired by `t`.
    pub(super) fn timed_out(&self, st: &State<D, S>, t: Instant) -> Option<EvictReason> {
        let rules = self.config.rules();
        if let (Some(d), Some(since)) = (rules.stall, st.waiting_since) {
            if !st.storage.is_empty() && t >= after(since, d) {
                return Some(EvictReason::Stalled);
            }
        }
        if let (Some(d), Some(since)) = (rules.pressure, st.pressure) {
            if t >= after(since, d) {
                return Some(EvictReason::Pressure);
            }
        }
        None
    }
}

pub(super) fn has_timed_rule(config: &BufferConfig) -> bool {
    let rules = config.rules();
    rules.stall.is_some() || rules.pressure.is_some()
}
