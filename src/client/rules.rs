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
    ///
    /// `since`: the drops happened between then and now (a window's look
    /// finds, at once, what was skipped since the last look), not all now:
    /// the drop-window rule spreads them evenly over that time, so that it
    /// judges the rate the client had, however seldom it was looked at.
    pub(super) fn after_push(
        &self,
        st: &mut State<D, S>,
        was_empty: bool,
        dropped: Dropped,
        since: Option<Instant>,
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
            let bucket = window / 64;
            let drops = st.drop_window.get_or_insert_with(Box::default);
            for (at, frames) in spread(dropped.frames as u64, since, t, window) {
                match drops.buckets.back_mut() {
                    Some((last, n)) if at.saturating_duration_since(*last) <= bucket => {
                        *n += frames;
                    }
                    _ => drops.buckets.push_back((at, frames)),
                }
                drops.sum += frames;
            }
            while let Some(&(at, n)) = drops.buckets.front() {
                if t.saturating_duration_since(at) <= window {
                    break;
                }
                drops.buckets.pop_front();
                drops.sum -= n;
            }
            if drops.sum > max {
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

/// `frames` drops that happened evenly between `since` and `t`, as at most
/// 64 `(moment, count)` steps in time order for a drop window of `window`:
/// those older than the window are left out (they could never count), the
/// rest spread over what is left of the span. Without a span (a push: the
/// drops happened now), one step at `t`.
fn spread(
    frames: u64,
    since: Option<Instant>,
    t: Instant,
    window: std::time::Duration,
) -> impl Iterator<Item = (Instant, u64)> {
    const STEPS: u32 = 64;
    let span = since.map_or(std::time::Duration::ZERO, |s| {
        t.saturating_duration_since(s)
    });
    let (span, frames) = if span > window {
        // Only the newest `window` of the span can count.
        let share = u128::from(frames) * window.as_nanos() / span.as_nanos();
        (window, u64::try_from(share).unwrap_or(u64::MAX))
    } else {
        (span, frames)
    };
    let steps = if span.is_zero() || frames <= 1 {
        1
    } else {
        STEPS.min(u32::try_from(frames).unwrap_or(STEPS))
    };
    let start = t.checked_sub(span).unwrap_or(t);
    (1..=steps).filter_map(move |i| {
        // Step i ends at start + span * i / steps and holds the drops up
        // to there: the cumulative counts, differenced.
        let upto = |i: u32| {
            u64::try_from(u128::from(frames) * u128::from(i) / u128::from(steps))
                .unwrap_or(u64::MAX)
        };
        let n = upto(i) - upto(i - 1);
        (n > 0).then(|| (start + span * i / steps, n))
    })
}

pub(super) fn has_timed_rule(config: &BufferConfig) -> bool {
    let rules = config.rules();
    rules.stall.is_some() || rules.pressure.is_some()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn spread_keeps_the_window_share_in_time_order() {
        let t = Instant::now();
        let window = Duration::from_millis(500);
        // A push: all at once.
        assert_eq!(spread(7, None, t, window).collect::<Vec<_>>(), [(t, 7)]);
        // 1,000 drops over the last second: 500 of them within the window,
        // spread over it.
        let steps: Vec<_> = spread(1_000, Some(t - Duration::from_secs(1)), t, window).collect();
        assert_eq!(steps.iter().map(|s| s.1).sum::<u64>(), 500);
        assert_eq!(steps.len(), 64);
        assert!(steps.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(steps[0].0 > t - window && steps[63].0 == t);
        // Within the window: every drop counts.
        let steps: Vec<_> = spread(3, Some(t - Duration::from_millis(300)), t, window).collect();
        assert_eq!(steps.iter().map(|s| s.1).sum::<u64>(), 3);
        assert_eq!(steps.len(), 3);
    }
}
