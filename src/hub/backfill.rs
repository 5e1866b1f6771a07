//! Frames fetched from elsewhere (a bus's history) that start a client's
//! stream before the hub's own: see [`HubResponse::backfill`](super::HubResponse::backfill)
//! and [`Hub::subscribe_with_backfill`](super::Hub::subscribe_with_backfill).

use super::log::{Cursor, Log, MAX_ID};

/// The frames a client gets before the hub's, and the cursor in the hub's
/// log right after them.
#[derive(Debug)]
pub(crate) struct Backfill<T> {
    /// One run of consecutive ids, oldest first, each with its weight.
    pub(crate) frames: Vec<(u64, T, usize)>,
    /// Ids skipped between the client's resume id and the first frame.
    pub(crate) gap: u64,
}

impl<T> Backfill<T> {
    /// The first run of consecutive ids after `after` among `frames`:
    /// frames at or before `after` are left out, and so is everything from
    /// the first hole or id out of order on (the hub's log then reports the
    /// ids from there to its own frames as one gap, exactly counted).
    pub(crate) fn new(
        after: Option<u64>,
        frames: impl IntoIterator<Item = (u64, T, usize)>,
    ) -> Self {
        let mut run: Vec<(u64, T, usize)> = Vec::new();
        let mut gap = 0;
        for (id, item, weight) in frames {
            if after.is_some_and(|a| id <= a) || id > MAX_ID {
                continue;
            }
            match run.last() {
                None => gap = after.map_or(0, |a| id - a - 1),
                Some(&(last, _, _)) if id == last + 1 => {}
                Some(_) => break,
            }
            run.push((id, item, weight));
        }
        Self { frames: run, gap }
    }

    /// The cursor in `log` after the backfill, if it has frames: the id
    /// after its last frame, always. The backfill's ids are the log's (one
    /// bus, one numbering), so a log that has not reached them yet will:
    /// its frames up to the backfill's last are the client's already, and
    /// it must skip them when they arrive. (`Log::after` would take such an
    /// id for one from the future and start at the log's tail, and the
    /// client would get them twice.)
    pub(crate) fn cursor(&self, log: &Log<T>) -> Option<Cursor> {
        let &(last, _, _) = self.frames.last()?;
        let next = last + 1;
        Some(match log.newest_id() {
            Some(newest) if last < newest => log.after(last),
            // At or past the newest: what the log publishes next starts
            // with ids the client has; their bytes are not a gap.
            Some(_) => Cursor { next, pos: None },
            // Not `Cursor::START` (the first frame whatever its id): the ids
            // between the backfill and the hub's first frame are a gap.
            None => Cursor { next, pos: Some(0) },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(b: &Backfill<&str>) -> Vec<u64> {
        b.frames.iter().map(|f| f.0).collect()
    }

    fn weighed<const N: usize>(
        frames: [(u64, &'static str); N],
    ) -> impl Iterator<Item = (u64, &'static str, usize)> {
        frames.into_iter().map(|(id, s)| (id, s, s.len()))
    }

    #[test]
    fn keeps_the_first_run_after_the_resume_id() {
        let frames = [(3, "c"), (5, "e"), (6, "f"), (7, "g"), (9, "i"), (10, "j")];
        let b = Backfill::new(Some(3), weighed(frames));
        assert_eq!((ids(&b), b.gap), (vec![5, 6, 7], 1));
        let b = Backfill::new(None, weighed(frames));
        assert_eq!((ids(&b), b.gap), (vec![3], 0));
        // At or before the resume id: left out; out of order: the end.
        let b = Backfill::new(Some(4), weighed([(5, "e"), (4, "d"), (6, "f")]));
        assert_eq!((ids(&b), b.gap), (vec![5, 6], 0));
        let b = Backfill::new(Some(4), weighed([(5, "e"), (5, "e"), (6, "f")]));
        assert_eq!((ids(&b), b.gap), (vec![5], 0));
        let b = Backfill::new(Some(10), weighed(frames));
        assert!(b.frames.is_empty());
    }

    #[test]
    fn the_cursor_after_a_backfill_past_the_logs_newest_skips_what_it_had() {
        let mut log: Log<&str> = Log::new(crate::hub::HubConfig::new(10));
        log.push(10, "10", 2).finish();
        let b = Backfill::new(
            Some(9),
            weighed([(10, "a"), (11, "b"), (12, "c"), (13, "d")]),
        );
        let mut cursor = b.cursor(&log).expect("frames");
        assert_eq!(cursor.next, 14);
        for id in 11..=14 {
            log.push(id, "x", 1).finish();
        }
        let mut read = Vec::new();
        log.read(&mut cursor, usize::MAX, |gap, e| {
            read.push((gap.frames, e.id))
        });
        assert_eq!(read, [(0, 14)], "11..=13 were in the backfill");
        // Within the log: the frame after the backfill's last.
        let b = Backfill::new(Some(9), weighed([(10, "a")]));
        assert_eq!(b.cursor(&log).map(|c| c.next), Some(11));
    }
}
