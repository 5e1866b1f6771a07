//! `ClientBuffer` against a plain model: the straightforward ring it was
//! first written as (every slot carrying its own gap, class and key), driven
//! through the same random operations. The real ring keeps its slots small
//! and its rare data beside them for speed; what a user sees must not change.

use std::collections::{HashMap, VecDeque};

use tower_backpressure::{BufferConfig, ClientBuffer, Dropped, FrameClass, Gap, Overflow};

/// The model: one slot per frame, tombstones in place.
struct Model {
    slots: VecDeque<Slot>,
    keys: HashMap<u64, u64>,
    capacity: usize,
    max_bytes: usize,
    drop_newest: bool,
    live: usize,
    bytes: usize,
    next_seq: u64,
    trailing_gap: Gap,
    dropped: u64,
    replaced: u64,
}

struct Slot {
    item: Option<u32>,
    weight: usize,
    seq: u64,
    critical: bool,
    key: Option<u64>,
    gap: Gap,
}

fn add(gap: &mut Gap, other: Gap) {
    gap.frames += other.frames;
    gap.bytes += other.bytes;
}

impl Model {
    fn new(capacity: usize, max_bytes: usize, drop_newest: bool) -> Self {
        Self {
            slots: VecDeque::new(),
            keys: HashMap::new(),
            capacity,
            max_bytes,
            drop_newest,
            live: 0,
            bytes: 0,
            next_seq: 0,
            trailing_gap: Gap::default(),
            dropped: 0,
            replaced: 0,
        }
    }

    fn pop_with_gap(&mut self) -> Option<(u32, Gap)> {
        loop {
            let slot = self.slots.pop_front()?;
            if let Some(item) = slot.item {
                self.live -= 1;
                self.bytes -= slot.weight;
                self.forget_key(slot.key, slot.seq);
                return Some((item, slot.gap));
            }
        }
    }

    fn evict_oldest(&mut self) -> Option<(u32, usize)> {
        let index = self
            .slots
            .iter()
            .position(|s| s.item.is_some() && !s.critical)?;
        let slot = &mut self.slots[index];
        let item = slot.item.take().unwrap();
        let (weight, key, seq) = (slot.weight, slot.key, slot.seq);
        let mut carried = std::mem::take(&mut slot.gap);
        self.live -= 1;
        self.bytes -= weight;
        self.forget_key(key, seq);
        add(
            &mut carried,
            Gap {
                frames: 1,
                bytes: weight as u64,
            },
        );
        self.carry_gap(index, carried);
        self.compact();
        self.dropped += 1;
        Some((item, weight))
    }

    fn carry_gap(&mut self, index: usize, gap: Gap) {
        match self
            .slots
            .iter_mut()
            .skip(index + 1)
            .find(|s| s.item.is_some())
        {
            Some(next) => add(&mut next.gap, gap),
            None => add(&mut self.trailing_gap, gap),
        }
    }

    fn forget_key(&mut self, key: Option<u64>, seq: u64) {
        if let Some(k) = key {
            if self.keys.get(&k) == Some(&seq) {
                self.keys.remove(&k);
            }
        }
    }

    fn compact(&mut self) {
        while self.slots.front().is_some_and(|s| s.item.is_none()) {
            self.slots.pop_front();
        }
    }

    fn push_with(&mut self, item: u32, weight: usize, class: FrameClass) -> (Dropped, Vec<u32>) {
        let mut gone = Vec::new();
        let key = match class {
            FrameClass::Replace(key) => {
                let found = self
                    .keys
                    .get(&key)
                    .and_then(|&seq| self.slots.iter().position(|s| s.seq == seq));
                if let Some(index) = found {
                    let slot = &mut self.slots[index];
                    slot.item.take().unwrap();
                    let gap = std::mem::take(&mut slot.gap);
                    self.live -= 1;
                    self.bytes -= slot.weight;
                    self.replaced += 1;
                    self.keys.remove(&key);
                    if !gap.is_empty() {
                        self.carry_gap(index, gap);
                    }
                    self.compact();
                }
                Some(key)
            }
            _ => None,
        };
        let critical = class == FrameClass::Critical;
        let mut evicted = Dropped::default();
        while self.live >= self.capacity
            || (self.live > 0 && self.bytes.saturating_add(weight) > self.max_bytes)
        {
            let drop_new = !critical
                && (self.drop_newest
                    || !self.slots.iter().any(|s| s.item.is_some() && !s.critical));
            if drop_new {
                self.dropped += 1;
                add(
                    &mut self.trailing_gap,
                    Gap {
                        frames: 1,
                        bytes: weight as u64,
                    },
                );
                evicted.frames += 1;
                evicted.bytes += weight;
                gone.push(item);
                return (evicted, gone);
            }
            match self.evict_oldest() {
                Some((old, w)) => {
                    evicted.frames += 1;
                    evicted.bytes += w;
                    gone.push(old);
                }
                None => break,
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(k) = key {
            self.keys.insert(k, seq);
        }
        self.slots.push_back(Slot {
            item: Some(item),
            weight,
            seq,
            critical,
            key,
            gap: std::mem::take(&mut self.trailing_gap),
        });
        self.live += 1;
        self.bytes += weight;
        (evicted, gone)
    }

    fn clear(&mut self) -> Dropped {
        let mut evicted = Dropped::default();
        while let Some(slot) = self.slots.pop_front() {
            if slot.item.is_some() {
                evicted.frames += 1;
                evicted.bytes += slot.weight;
            }
            add(&mut self.trailing_gap, slot.gap);
        }
        add(
            &mut self.trailing_gap,
            Gap {
                frames: evicted.frames as u64,
                bytes: evicted.bytes as u64,
            },
        );
        self.keys.clear();
        self.live = 0;
        self.bytes = 0;
        self.dropped += evicted.frames as u64;
        evicted
    }

    fn peek(&self) -> Option<(u32, usize, Gap)> {
        self.slots
            .iter()
            .find_map(|s| s.item.map(|i| (i, s.weight, s.gap)))
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn run(seed: u64, capacity: usize, max_bytes: usize, drop_newest: bool, steps: usize) {
    run_with(seed, capacity, max_bytes, drop_newest, steps, 20);
}

/// One frame in `critical_one_in` is critical.
fn run_with(
    seed: u64,
    capacity: usize,
    max_bytes: usize,
    drop_newest: bool,
    steps: usize,
    critical_one_in: u64,
) {
    let mut rng = Rng(seed);
    let overflow = if drop_newest {
        Overflow::DropNewest
    } else {
        Overflow::DropOldest
    };
    let config = BufferConfig::new(capacity)
        .with_max_bytes(max_bytes)
        .with_overflow(overflow);
    // Items are (id, weight) pairs; the weigher reads the weight.
    let mut real = ClientBuffer::with_weigher(config, |item: &(u32, usize)| item.1);
    let mut model = Model::new(capacity, max_bytes, drop_newest);
    // Phases: mostly pushes (a slow client), mostly pops (a fast one).
    let mut push_bias = 50;
    for step in 0..steps {
        if step % 500 == 0 {
            push_bias = [20, 50, 80, 95][rng.below(4) as usize];
        }
        let id = step as u32;
        let roll = rng.below(100);
        if roll < push_bias {
            let weight = 1 + rng.below(40) as usize;
            let class = if rng.below(critical_one_in) == 0 {
                FrameClass::Critical
            } else {
                match rng.below(20) {
                    0..=2 => FrameClass::Replace(rng.below(4)),
                    _ => FrameClass::Droppable,
                }
            };
            let mut gone = Vec::new();
            let dropped = real.push_with((id, weight), class, |(old, _)| gone.push(old));
            let (want, want_gone) = model.push_with(id, weight, class);
            assert_eq!(dropped, want, "step {step}: push {class:?}");
            assert_eq!(gone, want_gone, "step {step}: dropped items");
        } else if roll < 97 {
            let got = real.pop_with_gap().map(|((id, _), gap)| (id, gap));
            assert_eq!(got, model.pop_with_gap(), "step {step}: pop");
        } else if roll < 99 {
            let got = real.evict_oldest().map(|((id, _), w)| (id, w));
            assert_eq!(got, model.evict_oldest(), "step {step}: evict_oldest");
        } else {
            assert_eq!(real.clear(), model.clear(), "step {step}: clear");
        }
        assert_eq!(real.len(), model.live, "step {step}: len");
        assert_eq!(real.bytes(), model.bytes, "step {step}: bytes");
        assert_eq!(
            real.trailing_gap(),
            model.trailing_gap,
            "step {step}: trailing gap"
        );
        assert_eq!(
            real.peek().map(|(&(id, _), w, gap)| (id, w, gap)),
            model.peek(),
            "step {step}: peek"
        );
        let stats = real.stats();
        assert_eq!(stats.dropped, model.dropped, "step {step}: dropped");
        assert_eq!(stats.replaced, model.replaced, "step {step}: replaced");
    }
    // Everything left comes out in the same order with the same gaps.
    loop {
        let got = real.pop_with_gap().map(|((id, _), gap)| (id, gap));
        let want = model.pop_with_gap();
        assert_eq!(got, want, "final drain");
        if want.is_none() {
            break;
        }
    }
}

#[test]
fn drop_oldest_matches_the_model() {
    for seed in 1..=8 {
        run(seed, 16, 300, false, 20_000);
    }
}

#[test]
fn drop_newest_matches_the_model() {
    for seed in 11..=14 {
        run(seed, 16, 300, true, 20_000);
    }
}

#[test]
fn small_rings_and_byte_limits_match_the_model() {
    for seed in 21..=28 {
        run(
            seed,
            1 + (seed as usize % 4),
            20 + (seed as usize % 3) * 40,
            false,
            20_000,
        );
    }
}

#[test]
fn many_critical_frames_match_the_model() {
    for seed in 31..=36 {
        run_with(seed, 4, 200, false, 20_000, 3);
        run_with(seed, 4, 200, true, 20_000, 3);
    }
}
