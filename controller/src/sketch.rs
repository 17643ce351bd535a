//! Bounded-memory sketches for the stats API: who sends the most ([`SpaceSaving`]) and how
//! many distinct clients there are ([`DistinctCount`]).
//!
//! Both are fed on the check path (one `add` per decision) and are mergeable, so each
//! controller keeps its own and the stats API combines the controllers' sketches, or
//! consecutive minutes of one controller, shipped through Redis as JSON. Client names are
//! untrusted: no input can make either sketch hold more than its fixed number of entries,
//! and a flood of distinct names cannot push a real heavy hitter out of [`SpaceSaving`].
//!
//! Neither type locks: `add` takes `&mut self`, so a sketch shared between tasks sits
//! behind a mutex, or each task keeps its own and they are merged when read.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One item of a [`SpaceSaving`] summary.
///
/// The item's true count lies in `count - error ..= count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeavyHitter {
    pub item: String,
    /// An overestimate of the item's true count.
    pub count: u64,
    /// How much of `count` may belong to other items: `count - error` is an underestimate.
    pub error: u64,
}

/// Top-k heavy hitters over a weighted stream of strings in bounded memory: the
/// Space-Saving algorithm (Metwally, Agrawal, El Abbadi, "Efficient computation of frequent
/// and top-k elements in data streams", 2005), with weights.
///
/// The summary monitors at most `capacity` (m) items. A new item, when the summary is full,
/// takes the place of the item with the smallest count `min`, inheriting `min` as its
/// error and starting at `min + weight`.
///
/// # Guarantees
/// With total weight N (see [`total`](Self::total)):
/// - every reported count overestimates: `count - error <= true count <= count`;
/// - every `error <= min count <= N / m`;
/// - every item with a true count above N / m is in the summary (an item that is not has a
///   true count of at most [`max_unmonitored_count`](Self::max_unmonitored_count), which
///   is at most N / m);
/// - while at most m distinct items have been seen, every count is exact (error 0).
///
/// The same guarantees hold for the result of [`merge`](Self::merge), with N the sum of
/// both totals.
///
/// # Cost
/// `add` is O(log m): a hash index finds a monitored item in expected O(1), and a binary
/// min-heap of slots ordered by (count, item) finds the one to evict. Memory is at most about
/// `m × (88 + item length)` bytes whatever the stream (see
/// [`memory_bytes`](Self::memory_bytes)), allocated as items arrive.
#[derive(Clone)]
pub struct SpaceSaving {
    capacity: usize,
    total: u64,
    /// The monitored items; a slot keeps its place while its item is monitored.
    slots: Vec<Slot>,
    /// Slot numbers as a binary min-heap by (count, item): `heap[0]` is the slot to evict.
    heap: Vec<usize>,
    /// Item -> slot number.
    index: ItemIndex,
}

#[derive(Debug, Clone)]
struct Slot {
    item: Box<str>,
    /// `item`'s hash under this summary's `ItemIndex`, kept so that neither probing nor
    /// deleting has to rehash strings.
    hash: u64,
    count: u64,
    error: u64,
    /// Where this slot's number sits in `heap`.
    heap_position: usize,
}

impl SpaceSaving {
    /// The capacity [`Default`] uses: enough for a reliable top 10 on skewed traffic.
    pub const DEFAULT_CAPACITY: usize = 100;

    /// An empty summary monitoring up to `capacity` items (a capacity of 0 is taken as 1).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            total: 0,
            slots: Vec::new(),
            heap: Vec::new(),
            index: ItemIndex::new(),
        }
    }

    /// Counts `weight` more for `item`. A weight of 0 changes nothing.
    pub fn add(&mut self, item: &str, weight: u64) {
        if weight == 0 {
            // Evicting an item for a zero weight would only lose information.
            return;
        }
        self.total = self.total.saturating_add(weight);

        let hash = self.index.hash(item);
        if let Some(slot) = self.index.find(&self.slots, item, hash) {
            let entry = &mut self.slots[slot];
            entry.count = entry.count.saturating_add(weight);
            let position = entry.heap_position;
            self.sift_down(position);
            return;
        }

        if self.slots.len() < self.capacity {
            let slot = self.slots.len();
            let position = self.heap.len();
            grow_toward(&mut self.slots, self.capacity);
            grow_toward(&mut self.heap, self.capacity);
            self.index.make_room_for(slot + 1, &self.slots);
            self.slots.push(Slot {
                item: Box::from(item),
                hash,
                count: weight,
                error: 0,
                heap_position: position,
            });
            self.heap.push(slot);
            self.index.insert(&self.slots, slot);
            self.sift_up(position);
            return;
        }

        // Full: the new item replaces the one with the smallest count (the smallest item
        // among equal counts). Its true count before this weight is at most that minimum
        // (it was not monitored), so starting from the minimum keeps the count an
        // overestimate, and the minimum is its error.
        let Some(&slot) = self.heap.first() else {
            return;
        };
        self.index.remove(&self.slots, slot);
        let evicted = &mut self.slots[slot];
        let minimum = evicted.count;
        evicted.item = Box::from(item);
        evicted.hash = hash;
        evicted.count = minimum.saturating_add(weight);
        evicted.error = minimum;
        self.index.insert(&self.slots, slot);
        self.sift_down(0);
    }

    /// The `k` items with the largest counts, largest first; equal counts are ordered by
    /// item so that the output does not depend on arrival order.
    #[must_use]
    pub fn top(&self, k: usize) -> Vec<HeavyHitter> {
        let mut slots: Vec<&Slot> = self.slots.iter().collect();
        if k < slots.len() {
            // Only the first k need sorting: O(m + k log k), not O(m log m).
            slots.select_nth_unstable_by(k, |a, b| by_count_descending(a, b));
            slots.truncate(k);
        }
        slots.sort_unstable_by(|a, b| by_count_descending(a, b));
        slots
            .into_iter()
            .map(|slot| HeavyHitter {
                item: slot.item.to_string(),
                count: slot.count,
                error: slot.error,
            })
            .collect()
    }

    /// The sum of all weights added (including those of merged summaries).
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many items the summary can monitor.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many items it monitors now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The largest true count an item that is not in the summary can have: the smallest
    /// count once the summary is full (at most `total / capacity`), 0 before (no item was
    /// ever evicted).
    #[must_use]
    pub fn max_unmonitored_count(&self) -> u64 {
        if self.slots.len() < self.capacity {
            return 0;
        }
        self.heap.first().map_or(0, |&slot| self.slots[slot].count)
    }

    /// Combines `other` into this summary, as if this one had seen both streams
    /// (Agarwal et al., "Mergeable summaries", 2012, for Space-Saving).
    ///
    /// An item in both keeps the sum of the counts and of the errors. An item missing from
    /// one side may have had up to that side's
    /// [`max_unmonitored_count`](Self::max_unmonitored_count) there (its minimum count if
    /// that side is full, else 0), which is added to both its count and its error. The
    /// `capacity` largest counts are kept (ties by item). Cost: O((m1 + m2) log(m1 + m2)).
    ///
    /// # Error bound
    /// With N = both totals and m the capacity, the result has all the guarantees of a
    /// single summary of N (see [`SpaceSaving`]): every error is at most
    /// `min1 + min2 <= N1/m + N2/m = N/m`, and every item left out has a true count of at
    /// most the result's minimum count, itself at most N/m (the kept counts sum to at most
    /// N, because each fill is no larger than a count the other side monitored but the
    /// result left out). Merging again, or adding more, keeps these guarantees.
    ///
    /// If `other` has a smaller capacity, the result takes that capacity: a summary of m
    /// items cannot vouch for the m-th item of another that only monitored fewer.
    pub fn merge(&mut self, other: &SpaceSaving) {
        let capacity = self.capacity.min(other.capacity);
        let fill_for_missing_here = self.max_unmonitored_count();
        let fill_for_missing_there = other.max_unmonitored_count();

        let mut combined: Vec<(Box<str>, u64, u64)> =
            Vec::with_capacity(self.slots.len() + other.slots.len());
        for slot in &other.slots {
            if self.find(&slot.item).is_none() {
                combined.push((
                    slot.item.clone(),
                    slot.count.saturating_add(fill_for_missing_here),
                    slot.error.saturating_add(fill_for_missing_here),
                ));
            }
        }
        for slot in std::mem::take(&mut self.slots) {
            let (count, error) = match other.find(&slot.item) {
                Some(there) => (other.slots[there].count, other.slots[there].error),
                None => (fill_for_missing_there, fill_for_missing_there),
            };
            combined.push((
                slot.item,
                slot.count.saturating_add(count),
                slot.error.saturating_add(error),
            ));
        }
        combined.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        combined.truncate(capacity);

        *self = Self::from_entries(capacity, self.total.saturating_add(other.total), combined);
    }

    /// The heap bytes this summary holds: its vectors' capacities and its items' bytes
    /// (not the allocator's own rounding and bookkeeping).
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        let slots = self.slots.capacity() * std::mem::size_of::<Slot>();
        let heap = self.heap.capacity() * std::mem::size_of::<usize>();
        let items: usize = self.slots.iter().map(|slot| slot.item.len()).sum();
        slots + heap + self.index.memory_bytes() + items
    }

    fn find(&self, item: &str) -> Option<usize> {
        self.index.find(&self.slots, item, self.index.hash(item))
    }

    /// Builds a summary from entries already checked to satisfy its invariants.
    fn from_entries(capacity: usize, total: u64, entries: Vec<(Box<str>, u64, u64)>) -> Self {
        let index = ItemIndex::new();
        let slots: Vec<Slot> = entries
            .into_iter()
            .enumerate()
            .map(|(slot, (item, count, error))| Slot {
                hash: index.hash(&item),
                item,
                count,
                error,
                heap_position: slot,
            })
            .collect();
        let mut summary = Self {
            capacity,
            total,
            heap: (0..slots.len()).collect(),
            slots,
            index,
        };
        summary
            .index
            .make_room_for(summary.slots.len(), &summary.slots);
        for position in (0..summary.heap.len() / 2).rev() {
            summary.sift_down(position);
        }
        summary
    }

    /// Whether the slot at heap `position` comes before the one at `other`: smaller count
    /// first, then smaller item, so which item is evicted depends only on the summary's
    /// content (a summary read back from JSON goes on exactly like the original).
    fn precedes(&self, position: usize, other: usize) -> bool {
        let (a, b) = (
            &self.slots[self.heap[position]],
            &self.slots[self.heap[other]],
        );
        (a.count, &a.item) < (b.count, &b.item)
    }

    fn swap_positions(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        let (slot_a, slot_b) = (self.heap[a], self.heap[b]);
        self.slots[slot_a].heap_position = a;
        self.slots[slot_b].heap_position = b;
    }

    fn sift_up(&mut self, mut position: usize) {
        while position > 0 {
            let parent = (position - 1) / 2;
            if !self.precedes(position, parent) {
                break;
            }
            self.swap_positions(parent, position);
            position = parent;
        }
    }

    /// Keys only grow (a count increases, or an evicted slot gets a larger count), so
    /// after a change a slot can only move down.
    fn sift_down(&mut self, mut position: usize) {
        let len = self.heap.len();
        loop {
            let left = 2 * position + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let smaller = if right < len && self.precedes(right, left) {
                right
            } else {
                left
            };
            if !self.precedes(smaller, position) {
                break;
            }
            self.swap_positions(position, smaller);
            position = smaller;
        }
    }
}

impl Default for SpaceSaving {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl fmt::Debug for SpaceSaving {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SpaceSaving")
            .field("capacity", &self.capacity)
            .field("total", &self.total)
            .field("items", &self.top(self.slots.len()))
            .finish()
    }
}

fn by_count_descending(a: &Slot, b: &Slot) -> Ordering {
    b.count.cmp(&a.count).then_with(|| a.item.cmp(&b.item))
}

/// Grows `vector` by doubling like `push` would, but never past `limit` elements, so that
/// a full summary holds no spare room.
fn grow_toward<T>(vector: &mut Vec<T>, limit: usize) {
    if vector.len() == vector.capacity() {
        let wanted = (vector.capacity() * 2).max(4).min(limit);
        vector.reserve_exact(wanted.saturating_sub(vector.len()).max(1));
    }
}

/// An open-addressing hash index from item to slot number, with linear probing and
/// backward-shift deletion.
///
/// Written out rather than a std `HashMap<Box<str>, usize>` for two reasons: the item
/// strings live once, in the slots, and the memory is exactly `buckets.len()` words
/// (evictions delete as often as they insert, and std's table can neither report nor
/// bound the room its deleted entries take). Items are hashed with std's randomly keyed
/// SipHash: the names come from clients, who must not be able to force collisions, and
/// the index never leaves the process.
#[derive(Debug, Clone)]
struct ItemIndex {
    /// A slot number per bucket, or `EMPTY_BUCKET`. The length is 0 or a power of two, at
    /// least twice the number of items, so a probe always meets an empty bucket.
    buckets: Vec<usize>,
    hasher: RandomState,
}

const EMPTY_BUCKET: usize = usize::MAX;

impl ItemIndex {
    fn new() -> Self {
        Self {
            buckets: Vec::new(),
            hasher: RandomState::new(),
        }
    }

    fn hash(&self, item: &str) -> u64 {
        self.hasher.hash_one(item)
    }

    fn home(&self, hash: u64) -> usize {
        // Truncating the hash is the point: its low bits pick the bucket.
        (hash as usize) & (self.buckets.len() - 1)
    }

    fn next(&self, bucket: usize) -> usize {
        (bucket + 1) & (self.buckets.len() - 1)
    }

    fn find(&self, slots: &[Slot], item: &str, hash: u64) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let mut bucket = self.home(hash);
        // At most one lap: the load of one half guarantees an empty bucket long before,
        // and the bound keeps a broken invariant from turning into an endless loop.
        for _ in 0..self.buckets.len() {
            let slot = self.buckets[bucket];
            if slot == EMPTY_BUCKET {
                return None;
            }
            if slots[slot].hash == hash && *slots[slot].item == *item {
                return Some(slot);
            }
            bucket = self.next(bucket);
        }
        None
    }

    /// Adds `slots[slot]`, which must not be indexed yet, into a table with room.
    fn insert(&mut self, slots: &[Slot], slot: usize) {
        if self.buckets.is_empty() {
            return;
        }
        let mut bucket = self.home(slots[slot].hash);
        for _ in 0..self.buckets.len() {
            if self.buckets[bucket] == EMPTY_BUCKET {
                self.buckets[bucket] = slot;
                return;
            }
            bucket = self.next(bucket);
        }
    }

    /// Takes out `slots[slot]`, then moves later entries of its probe run back into the
    /// hole, so that no tombstone is left and every lookup still ends at an empty bucket.
    fn remove(&mut self, slots: &[Slot], slot: usize) {
        if self.buckets.is_empty() {
            return;
        }
        let mut hole = self.home(slots[slot].hash);
        let mut probes = 0;
        while self.buckets[hole] != slot {
            if self.buckets[hole] == EMPTY_BUCKET || probes == self.buckets.len() {
                return;
            }
            hole = self.next(hole);
            probes += 1;
        }
        let mask = self.buckets.len() - 1;
        let mut candidate = self.next(hole);
        for _ in 0..self.buckets.len() {
            let moving = self.buckets[candidate];
            if moving == EMPTY_BUCKET {
                break;
            }
            // The entry may fill the hole unless its home lies after the hole in its run,
            // where a lookup starting at home would no longer pass through the hole.
            let home = self.home(slots[moving].hash);
            let run_from_home = candidate.wrapping_sub(home) & mask;
            let run_from_hole = candidate.wrapping_sub(hole) & mask;
            if run_from_home >= run_from_hole {
                self.buckets[hole] = moving;
                hole = candidate;
            }
            candidate = self.next(candidate);
        }
        self.buckets[hole] = EMPTY_BUCKET;
    }

    /// Makes the table large enough for `items` entries at a load of at most one half,
    /// re-indexing `slots` (all of them indexed, or none yet) when it grows.
    fn make_room_for(&mut self, items: usize, slots: &[Slot]) {
        if items <= self.buckets.len() / 2 {
            return;
        }
        let buckets = items.saturating_mul(2).next_power_of_two().max(8);
        self.buckets = vec![EMPTY_BUCKET; buckets];
        for slot in 0..slots.len() {
            self.insert(slots, slot);
        }
    }

    fn memory_bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<usize>()
    }
}

/// The wire form: `{"capacity":m,"total":N,"items":[["name",count,error],...]}`, items in
/// [`top`](SpaceSaving::top) order, so equal summaries serialize to equal bytes.
#[derive(Serialize)]
struct SpaceSavingWireRef<'a> {
    capacity: usize,
    total: u64,
    items: Vec<(&'a str, u64, u64)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpaceSavingWire {
    capacity: usize,
    total: u64,
    items: Vec<(String, u64, u64)>,
}

impl Serialize for SpaceSaving {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut slots: Vec<&Slot> = self.slots.iter().collect();
        slots.sort_unstable_by(|a, b| by_count_descending(a, b));
        SpaceSavingWireRef {
            capacity: self.capacity,
            total: self.total,
            items: slots
                .into_iter()
                .map(|slot| (&*slot.item, slot.count, slot.error))
                .collect(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SpaceSaving {
    /// Refuses a summary that breaks the invariants the guarantees rest on, since the
    /// stats API would otherwise report bounds that do not hold.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = SpaceSavingWire::deserialize(deserializer)?;
        if wire.capacity == 0 {
            return Err(D::Error::custom("capacity: must be at least 1"));
        }
        if wire.items.len() > wire.capacity {
            return Err(D::Error::custom(format!(
                "items: {} items exceed the capacity of {}",
                wire.items.len(),
                wire.capacity
            )));
        }
        // Errors come from evictions, which only happen once full, and never exceed the
        // smallest count.
        let error_limit = if wire.items.len() == wire.capacity {
            wire.items
                .iter()
                .map(|(_, count, _)| *count)
                .min()
                .unwrap_or(0)
        } else {
            0
        };
        let mut seen: HashSet<&str> = HashSet::with_capacity(wire.items.len());
        for (item, count, error) in &wire.items {
            if !seen.insert(item) {
                return Err(D::Error::custom(format!("items: {item:?} appears twice")));
            }
            if *count == 0 {
                return Err(D::Error::custom(format!(
                    "items: {item:?} has a count of 0"
                )));
            }
            if *error > error_limit {
                return Err(D::Error::custom(format!(
                    "items: the error of {item:?} ({error}) exceeds {error_limit}"
                )));
            }
        }
        let sum: u128 = wire
            .items
            .iter()
            .map(|(_, count, _)| u128::from(*count))
            .sum();
        // The counts never add up to more than the weight added (unless the total
        // saturated, when it no longer says anything).
        if wire.total < u64::MAX && sum > u128::from(wire.total) {
            return Err(D::Error::custom(format!(
                "total: the counts add up to {sum}, more than the total of {}",
                wire.total
            )));
        }
        let entries = wire
            .items
            .into_iter()
            .map(|(item, count, error)| (item.into_boxed_str(), count, error))
            .collect();
        Ok(Self::from_entries(wire.capacity, wire.total, entries))
    }
}

/// log2 of the number of [`DistinctCount`] registers.
const PRECISION: u32 = 10;
const REGISTERS: usize = 1 << PRECISION;
/// The largest rank a register can hold: the leading zeros of the 54 bits left after the
/// register index, plus one.
const MAX_RANK: u8 = (64 - PRECISION + 1) as u8;
/// One character per register on the wire; ranks only reach `MAX_RANK` (55).
const REGISTER_ALPHABET: &[u8; 64] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_";

/// The number of distinct strings in a stream, estimated with HyperLogLog (Flajolet,
/// Fusy, Gandouet, Meunier, 2007) in 1 KiB.
///
/// 2^10 = 1024 registers give a standard error of 1.04 / √1024 ≈ 3.25%
/// ([`STANDARD_ERROR`](Self::STANDARD_ERROR)): about 95% of estimates fall within 6.5% of
/// the true count and nearly all within 9.75%. Below 2.5 × 1024 the estimate switches to
/// linear counting over the empty registers, which is much closer for small sets (an empty
/// counter estimates exactly 0).
///
/// Items are hashed with a fixed function (FNV-1a, then a final mix), never std's randomly
/// keyed one: controllers merge each other's counters, which only means something if every
/// process, of every version, puts an item in the same register. The hash is not keyed,
/// so a client who knows it could choose names that share registers and be undercounted;
/// that only skews this statistic, never a limit.
#[derive(Clone, PartialEq, Eq)]
pub struct DistinctCount {
    /// For each register, the highest rank (position of the first 1 bit) seen.
    registers: Box<[u8; REGISTERS]>,
}

impl DistinctCount {
    /// The relative standard error of [`estimate`](Self::estimate): 1.04 / √1024.
    pub const STANDARD_ERROR: f64 = 1.04 / 32.0;

    #[must_use]
    pub fn new() -> Self {
        Self {
            registers: Box::new([0; REGISTERS]),
        }
    }

    /// Counts `item` (once, however often it is added).
    pub fn add(&mut self, item: &str) {
        let hash = stable_hash(item);
        let register = (hash >> (64 - PRECISION)) as usize;
        let rest = hash << PRECISION;
        let rank =
            u8::try_from(rest.leading_zeros() + 1).map_or(MAX_RANK, |rank| rank.min(MAX_RANK));
        if let Some(value) = self.registers.get_mut(register) {
            *value = (*value).max(rank);
        }
    }

    /// The estimated number of distinct items added.
    #[must_use]
    pub fn estimate(&self) -> u64 {
        let registers = REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / registers);
        let mut inverse_sum = 0.0;
        let mut empty = 0usize;
        for &rank in self.registers.iter() {
            inverse_sum += (-f64::from(rank)).exp2();
            if rank == 0 {
                empty += 1;
            }
        }
        let raw = alpha * registers * registers / inverse_sum;
        // The raw estimate is biased upwards for small sets; while registers are still
        // empty, linear counting is far better there. With 64-bit hashes no large-range
        // correction is needed.
        let estimate = if raw <= 2.5 * registers && empty > 0 {
            registers * (registers / empty as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    /// Combines `other` into this counter: the result estimates the size of the union of
    /// both streams, exactly as one counter fed both would (register-wise maximum).
    pub fn merge(&mut self, other: &DistinctCount) {
        for (mine, theirs) in self.registers.iter_mut().zip(other.registers.iter()) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// Heap bytes held: the registers.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        REGISTERS
    }
}

impl Default for DistinctCount {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for DistinctCount {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("DistinctCount")
            .field("estimate", &self.estimate())
            .finish_non_exhaustive()
    }
}

/// The wire form: `{"precision":10,"registers":"<1024 characters>"}`, one character per
/// register for its rank (`0-9`, then `a-z`, then `A-T` for 36 to 55), so an empty
/// counter reads as 1024 zeros.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DistinctCountWire {
    precision: u32,
    registers: String,
}

impl Serialize for DistinctCount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let registers = self
            .registers
            .iter()
            .map(|&rank| char::from(REGISTER_ALPHABET[usize::from(rank & 63)]))
            .collect();
        DistinctCountWire {
            precision: PRECISION,
            registers,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DistinctCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = DistinctCountWire::deserialize(deserializer)?;
        if wire.precision != PRECISION {
            return Err(D::Error::custom(format!(
                "precision: {} is not supported, only {PRECISION}",
                wire.precision
            )));
        }
        if wire.registers.len() != REGISTERS {
            return Err(D::Error::custom(format!(
                "registers: {} characters, expected {REGISTERS}",
                wire.registers.len()
            )));
        }
        let mut counter = Self::new();
        for (register, character) in counter.registers.iter_mut().zip(wire.registers.bytes()) {
            *register = REGISTER_ALPHABET
                .iter()
                .position(|&known| known == character)
                .and_then(|rank| u8::try_from(rank).ok())
                .filter(|&rank| rank <= MAX_RANK)
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "registers: {:?} is not a rank",
                        char::from(character)
                    ))
                })?;
        }
        Ok(counter)
    }
}

/// A 64-bit hash of `item` that every process and every version computes alike: FNV-1a
/// over the UTF-8 bytes, then splitmix64's finalizer, because FNV-1a alone leaves similar
/// names (`client-1`, `client-2`) with similar high bits, and those pick the register.
///
/// Changing this function changes every serialized [`DistinctCount`]'s meaning: the
/// `the_hash_never_changes` test pins it.
fn stable_hash(item: &str) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in item.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fmt::Write as _;
    use std::sync::OnceLock;

    /// xorshift64*: a few lines of deterministic randomness, so the tests need no crate.
    struct XorShift(u64);

    impl XorShift {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next_u64() % bound
        }
    }

    /// Ranks 0..n drawn with probability proportional to 1 / (rank + 1)^s, by inverting
    /// the cumulative distribution.
    struct Zipf {
        cumulative: Vec<f64>,
    }

    impl Zipf {
        fn new(n: usize, s: f64) -> Self {
            let mut sum = 0.0;
            let mut cumulative: Vec<f64> = (1..=n)
                .map(|rank| {
                    sum += (rank as f64).powf(-s);
                    sum
                })
                .collect();
            for value in &mut cumulative {
                *value /= sum;
            }
            Self { cumulative }
        }

        fn sample(&self, random: &mut XorShift) -> usize {
            let u = random.unit();
            self.cumulative
                .partition_point(|&c| c <= u)
                .min(self.cumulative.len() - 1)
        }
    }

    const DISTINCT: usize = 100_000;
    const EVENTS: usize = 1_000_000;

    /// A skewed stream of weighted events over `DISTINCT` client names, and its truth.
    struct Stream {
        names: Vec<String>,
        /// (name index, weight), weights 1 to 3.
        events: Vec<(usize, u64)>,
    }

    impl Stream {
        fn true_counts(&self, events: &[(usize, u64)]) -> Vec<u64> {
            let mut counts = vec![0u64; self.names.len()];
            for &(name, weight) in events {
                counts[name] += weight;
            }
            counts
        }

        fn summarize(&self, capacity: usize, events: &[(usize, u64)]) -> SpaceSaving {
            let mut summary = SpaceSaving::new(capacity);
            for &(name, weight) in events {
                summary.add(&self.names[name], weight);
            }
            summary
        }
    }

    /// Zipf with s = 1.1 over 100k names, 1M events. In the second half the popularity
    /// moves: rank r is the name r + 7, so the halves' heavy hitters only partly overlap.
    fn zipf_stream() -> &'static Stream {
        static STREAM: OnceLock<Stream> = OnceLock::new();
        STREAM.get_or_init(|| {
            let zipf = Zipf::new(DISTINCT, 1.1);
            let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
            let events = (0..EVENTS)
                .map(|event| {
                    let rank = zipf.sample(&mut random);
                    let name = if event < EVENTS / 2 {
                        rank
                    } else {
                        (rank + 7) % DISTINCT
                    };
                    (name, 1 + random.below(3))
                })
                .collect();
            Stream {
                names: (0..DISTINCT).map(|i| format!("client-{i:06}")).collect(),
                events,
            }
        })
    }

    /// Checks every Space-Saving guarantee of `summary` against the true counts.
    fn assert_guarantees(summary: &SpaceSaving, stream: &Stream, truth: &[u64]) {
        let total: u64 = truth.iter().sum();
        let capacity = summary.capacity() as u64;
        assert_eq!(summary.total(), total);
        assert!(summary.len() <= summary.capacity());
        assert!(
            summary.max_unmonitored_count() * capacity <= total,
            "the minimum {} exceeds N/m = {total}/{capacity}",
            summary.max_unmonitored_count()
        );
        let reported = summary.top(summary.capacity());
        let index_of = |item: &str| item.strip_prefix("client-")?.parse::<usize>().ok();
        let mut monitored = vec![false; truth.len()];
        for hitter in &reported {
            let name = index_of(&hitter.item).unwrap();
            monitored[name] = true;
            let true_count = truth[name];
            assert!(
                hitter.count - hitter.error <= true_count && true_count <= hitter.count,
                "{}: true {true_count} outside {} - {}",
                hitter.item,
                hitter.count,
                hitter.error
            );
            assert!(
                hitter.error * capacity <= total,
                "{}: error {} exceeds N/m = {total}/{capacity}",
                hitter.item,
                hitter.error
            );
        }
        for (name, &true_count) in truth.iter().enumerate() {
            if !monitored[name] {
                assert!(
                    true_count * capacity <= total,
                    "{} (true {true_count}) is above N/m but not in the summary",
                    stream.names[name]
                );
                assert!(true_count <= summary.max_unmonitored_count());
            }
        }
    }

    /// The true top `k` names, largest first, ties by name.
    fn true_top(stream: &Stream, truth: &[u64], k: usize) -> Vec<(String, u64)> {
        let mut ranked: Vec<usize> = (0..truth.len()).collect();
        ranked.sort_by(|&a, &b| truth[b].cmp(&truth[a]).then(a.cmp(&b)));
        ranked
            .into_iter()
            .take(k)
            .map(|name| (stream.names[name].clone(), truth[name]))
            .collect()
    }

    fn assert_finds_true_top(summary: &SpaceSaving, stream: &Stream, truth: &[u64], k: usize) {
        let expected = true_top(stream, truth, k);
        let reported = summary.top(k);
        for (rank, ((name, true_count), hitter)) in expected.iter().zip(&reported).enumerate() {
            eprintln!(
                "{:>2}. true {name} {true_count:>7} | reported {} {:>7} (error {})",
                rank + 1,
                hitter.item,
                hitter.count,
                hitter.error
            );
        }
        let mut expected_names: Vec<&str> = expected.iter().map(|(name, _)| &**name).collect();
        let mut reported_names: Vec<&str> = reported.iter().map(|h| &*h.item).collect();
        expected_names.sort_unstable();
        reported_names.sort_unstable();
        assert_eq!(reported_names, expected_names);
    }

    fn hitter(item: &str, count: u64, error: u64) -> HeavyHitter {
        HeavyHitter {
            item: item.to_owned(),
            count,
            error,
        }
    }

    #[test]
    fn counts_are_exact_while_the_distinct_items_fit_in_the_capacity() {
        let weights = [("a", 5), ("b", 1), ("c", 9), ("d", 3), ("e", 7), ("f", 2)];
        for capacity in [6, 64] {
            let mut summary = SpaceSaving::new(capacity);
            let mut random = XorShift(7);
            let mut truth: HashMap<&str, u64> = HashMap::new();
            for _ in 0..1_000 {
                let (item, weight) = weights[random.below(weights.len() as u64) as usize];
                summary.add(item, weight);
                *truth.entry(item).or_default() += weight;
            }
            let mut expected: Vec<HeavyHitter> = truth
                .iter()
                .map(|(item, &count)| hitter(item, count, 0))
                .collect();
            expected.sort_by(|a, b| b.count.cmp(&a.count).then(a.item.cmp(&b.item)));
            assert_eq!(summary.top(capacity), expected);
            assert_eq!(summary.top(2), expected[..2]);
            assert_eq!(summary.total(), truth.values().sum::<u64>());
            let smallest = expected.last().map_or(0, |h| h.count);
            let expected_floor = if capacity == weights.len() {
                smallest
            } else {
                0
            };
            assert_eq!(summary.max_unmonitored_count(), expected_floor);
        }
    }

    /// Space-Saving written the obvious way: a linear scan for the item and for the
    /// smallest (count, item). The real one must behave exactly like it.
    #[derive(Default)]
    struct NaiveSpaceSaving {
        entries: Vec<HeavyHitter>,
    }

    impl NaiveSpaceSaving {
        fn add(&mut self, capacity: usize, item: &str, weight: u64) {
            if let Some(entry) = self.entries.iter_mut().find(|e| e.item == item) {
                entry.count += weight;
            } else if self.entries.len() < capacity {
                self.entries.push(hitter(item, weight, 0));
            } else {
                let smallest = self
                    .entries
                    .iter_mut()
                    .min_by(|a, b| (a.count, &a.item).cmp(&(b.count, &b.item)))
                    .unwrap();
                *smallest = hitter(item, smallest.count + weight, smallest.count);
            }
        }

        fn top(&self) -> Vec<HeavyHitter> {
            let mut entries = self.entries.clone();
            entries.sort_by(|a, b| b.count.cmp(&a.count).then(a.item.cmp(&b.item)));
            entries
        }
    }

    #[test]
    fn behaves_exactly_like_a_linear_scan_through_heavy_churn() {
        // Few enough items that they come back after eviction, many enough to churn; the
        // index deletes and re-inserts on every eviction.
        for capacity in [1, 2, 7, 64] {
            let mut summary = SpaceSaving::new(capacity);
            let mut naive = NaiveSpaceSaving::default();
            let mut random = XorShift(capacity as u64 + 1);
            for step in 0..20_000 {
                let item = format!("item-{}", random.below(3 * capacity as u64 + 5));
                let weight = 1 + random.below(4);
                summary.add(&item, weight);
                naive.add(capacity, &item, weight);
                if step % 97 == 0 {
                    assert_eq!(summary.top(capacity), naive.top(), "step {step}");
                }
            }
            assert_eq!(summary.top(capacity), naive.top());
        }
    }

    #[test]
    fn top_orders_by_count_then_item() {
        let mut summary = SpaceSaving::new(8);
        for (item, weight) in [("b", 5), ("a", 5), ("c", 7), ("d", 1)] {
            summary.add(item, weight);
        }
        assert_eq!(
            summary.top(3),
            vec![hitter("c", 7, 0), hitter("a", 5, 0), hitter("b", 5, 0)]
        );
        assert_eq!(summary.top(0), vec![]);
        assert_eq!(summary.top(100).len(), 4);
    }

    #[test]
    fn zero_weights_and_zero_capacity_are_harmless() {
        let mut summary = SpaceSaving::new(0);
        assert_eq!(summary.capacity(), 1);
        summary.add("a", 3);
        summary.add("b", 0);
        assert_eq!(summary.top(5), vec![hitter("a", 3, 0)]);
        summary.add("b", 2);
        assert_eq!(summary.top(5), vec![hitter("b", 5, 3)]);
        assert_eq!(summary.total(), 5);
    }

    #[test]
    fn a_heavy_hitter_hidden_in_a_flood_of_distinct_clients_is_kept() {
        let mut summary = SpaceSaving::new(10);
        let mut name = String::new();
        for i in 0..10_000 {
            name.clear();
            write!(name, "flood-{i}").unwrap();
            summary.add(&name, 1);
            if i % 5 == 0 {
                summary.add("heavy", 1);
            }
        }
        // N = 12,000 and N/m = 1,200 < 2,000: the guarantee says it must be there.
        let heavy = summary.top(10).into_iter().find(|h| h.item == "heavy");
        let heavy = heavy.expect("the heavy hitter was evicted");
        assert!(heavy.count >= 2_000 && heavy.count - heavy.error <= 2_000);
        assert!(heavy.error * 10 <= summary.total());
        assert_eq!(summary.top(1)[0].item, "heavy");
    }

    #[test]
    fn zipf_stream_reports_the_true_top_10_within_their_stated_errors() {
        let stream = zipf_stream();
        let truth = stream.true_counts(&stream.events);
        let summary = stream.summarize(200, &stream.events);
        assert_guarantees(&summary, stream, &truth);
        assert_finds_true_top(&summary, stream, &truth, 10);
    }

    #[test]
    fn memory_stays_bounded_on_a_million_distinct_clients() {
        let capacity = 100;
        let mut summary = SpaceSaving::new(capacity);
        let mut name = String::new();
        let mut measured = Vec::new();
        for i in 1..=1_000_000 {
            name.clear();
            write!(name, "client-{i:07}").unwrap();
            summary.add(&name, 1 + i % 3);
            if [10_000, 100_000, 1_000_000].contains(&i) {
                measured.push(summary.memory_bytes());
            }
        }
        eprintln!("memory_bytes after 10k, 100k, 1M distinct: {measured:?}");
        // A generous per-item allowance; keeping every item would need 10k strings alone
        // (140 KB) at the first measure, far above it.
        let bound = capacity * (128 + name.len());
        for bytes in &measured {
            assert!(*bytes <= bound, "{bytes} bytes held, bound {bound}");
        }
        assert!(measured[1] <= measured[0] && measured[2] <= measured[0]);
        assert_eq!(summary.len(), capacity);
        // Every item is held once: nothing is left of the ones evicted.
        let item_bytes: usize = summary.top(capacity).iter().map(|h| h.item.len()).sum();
        assert_eq!(item_bytes, capacity * name.len());
    }

    #[test]
    fn merging_two_halves_keeps_the_guarantees_of_one_summary() {
        let stream = zipf_stream();
        let (first, second) = stream.events.split_at(EVENTS / 2);
        let truth = stream.true_counts(&stream.events);
        let first_half = stream.summarize(200, first);
        let second_half = stream.summarize(200, second);
        let mut merged = first_half.clone();
        merged.merge(&second_half);
        assert_guarantees(&merged, stream, &truth);
        assert_finds_true_top(&merged, stream, &truth, 10);

        // The other way round gives the same summary.
        let mut swapped = second_half;
        swapped.merge(&first_half);
        assert_eq!(swapped.top(200), merged.top(200));
        assert_eq!(swapped.total(), merged.total());
    }

    #[test]
    fn merging_ten_consecutive_minutes_keeps_the_guarantees() {
        let stream = zipf_stream();
        let truth = stream.true_counts(&stream.events);
        let mut merged = SpaceSaving::new(200);
        for minute in stream.events.chunks(EVENTS / 10) {
            merged.merge(&stream.summarize(200, minute));
        }
        assert_guarantees(&merged, stream, &truth);
        assert_finds_true_top(&merged, stream, &truth, 10);
    }

    #[test]
    fn merge_charges_missing_items_with_the_other_sides_minimum() {
        let mut here = SpaceSaving::new(2);
        here.add("x", 10);
        here.add("y", 4);
        let mut there = SpaceSaving::new(2);
        there.add("x", 3);
        there.add("z", 6);
        here.merge(&there);
        // x: 10 + 3; z: 6 + up to 4 unseen here; y: 4 + up to 3 unseen there (dropped).
        assert_eq!(here.top(2), vec![hitter("x", 13, 0), hitter("z", 10, 4)]);
        assert_eq!(here.total(), 23);
        assert_eq!(here.max_unmonitored_count(), 10);
        // The merged summary goes on as usual: a newcomer replaces z.
        here.add("w", 1);
        assert_eq!(here.top(2), vec![hitter("x", 13, 0), hitter("w", 11, 10)]);
    }

    #[test]
    fn merge_breaks_ties_at_the_cut_by_item_whatever_the_order() {
        let mut here = SpaceSaving::new(2);
        here.add("c", 4);
        here.add("b", 4);
        let mut there = SpaceSaving::new(2);
        there.add("d", 4);
        there.add("a", 4);
        // All four reach 8 (4 seen, up to 4 unseen on the other side): the smallest items
        // stay, so every controller merging the same summaries reports the same.
        let expected = vec![hitter("a", 8, 4), hitter("b", 8, 4)];
        let mut swapped = there.clone();
        swapped.merge(&here);
        here.merge(&there);
        assert_eq!(here.top(2), expected);
        assert_eq!(swapped.top(2), expected);
    }

    #[test]
    fn merging_summaries_that_are_not_full_is_exact() {
        let mut here = SpaceSaving::new(10);
        let mut there = SpaceSaving::new(10);
        for (item, weight) in [("a", 4), ("b", 2), ("c", 1)] {
            here.add(item, weight);
        }
        for (item, weight) in [("b", 5), ("d", 3), ("a", 1), ("e", 1)] {
            there.add(item, weight);
        }
        here.merge(&there);
        assert_eq!(
            here.top(10),
            vec![
                hitter("b", 7, 0),
                hitter("a", 5, 0),
                hitter("d", 3, 0),
                hitter("c", 1, 0),
                hitter("e", 1, 0),
            ]
        );
        assert_eq!(here.max_unmonitored_count(), 0);
        assert_eq!(here.total(), 17);
    }

    #[test]
    fn merging_a_smaller_summary_takes_its_capacity() {
        let stream = zipf_stream();
        let events = &stream.events[..100_000];
        let truth = stream.true_counts(events);
        let mut merged = stream.summarize(200, &events[..50_000]);
        merged.merge(&stream.summarize(50, &events[50_000..]));
        assert_eq!(merged.capacity(), 50);
        assert_eq!(merged.len(), 50);
        assert_guarantees(&merged, stream, &truth);
    }

    #[test]
    fn space_saving_round_trips_through_json() {
        let stream = zipf_stream();
        let (before, after) = stream.events[..20_000].split_at(10_000);
        let mut original = stream.summarize(20, before);
        let json = serde_json::to_string(&original).unwrap();
        assert!(json.starts_with(r#"{"capacity":20,"total":"#), "{json}");
        let top = &original.top(1)[0];
        assert!(json.contains(&format!(
            r#"[["{}",{},{}],"#,
            top.item, top.count, top.error
        )));

        let mut decoded: SpaceSaving = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded.capacity(), 20);
        assert_eq!(decoded.total(), original.total());
        assert_eq!(decoded.top(20), original.top(20));
        assert_eq!(serde_json::to_string(&decoded).unwrap(), json);

        // The decoded summary's index and heap work: it goes on exactly like the original.
        for &(name, weight) in after {
            original.add(&stream.names[name], weight);
            decoded.add(&stream.names[name], weight);
        }
        assert_eq!(decoded.top(20), original.top(20));
        assert_guarantees(
            &decoded,
            stream,
            &stream.true_counts(&stream.events[..20_000]),
        );
    }

    #[test]
    fn space_saving_refuses_json_that_breaks_its_invariants() {
        let cases = [
            (r#"{"capacity":0,"total":0,"items":[]}"#, "capacity"),
            (
                r#"{"capacity":1,"total":2,"items":[["a",1,0],["b",1,0]]}"#,
                "exceed",
            ),
            (
                r#"{"capacity":2,"total":2,"items":[["a",1,0],["a",1,0]]}"#,
                "twice",
            ),
            (
                r#"{"capacity":2,"total":2,"items":[["a",2,0],["b",0,0]]}"#,
                "count of 0",
            ),
            (
                r#"{"capacity":3,"total":9,"items":[["a",5,1],["b",4,0]]}"#,
                "error",
            ),
            (
                r#"{"capacity":2,"total":9,"items":[["a",5,5],["b",4,0]]}"#,
                "error",
            ),
            (
                r#"{"capacity":2,"total":5,"items":[["a",5,0],["b",4,0]]}"#,
                "total",
            ),
            (
                r#"{"capacity":2,"total":5,"items":[],"extra":1}"#,
                "unknown field",
            ),
        ];
        for (json, message) in cases {
            let error = serde_json::from_str::<SpaceSaving>(json).unwrap_err();
            assert!(error.to_string().contains(message), "{json}: {error}");
        }
        let valid = r#"{"capacity":2,"total":9,"items":[["a",5,4],["b",4,3]]}"#;
        assert!(serde_json::from_str::<SpaceSaving>(valid).is_ok());
    }

    fn assert_within_three_standard_errors(counter: &DistinctCount, distinct: u64) {
        let estimate = counter.estimate();
        let tolerance = 3.0 * DistinctCount::STANDARD_ERROR * distinct as f64;
        eprintln!("{distinct} distinct: estimate {estimate}");
        assert!(
            (estimate as f64 - distinct as f64).abs() <= tolerance,
            "estimate {estimate} for {distinct} distinct (tolerance {tolerance})"
        );
    }

    #[test]
    fn an_empty_counter_estimates_zero() {
        assert_eq!(DistinctCount::new().estimate(), 0);
        assert_eq!(DistinctCount::default().estimate(), 0);
    }

    #[test]
    fn adding_an_item_again_does_not_count_it_again() {
        let mut counter = DistinctCount::new();
        counter.add("client-1");
        counter.add("client-1");
        assert_eq!(counter.estimate(), 1);
        for round in 0..100 {
            for i in 0..10 {
                counter.add(&format!("item-{}", (i + round) % 10));
            }
        }
        assert_eq!(counter.estimate(), 11);
    }

    #[test]
    fn estimates_are_within_three_standard_errors() {
        let mut counter = DistinctCount::new();
        let mut name = String::new();
        for i in 1..=1_000_000u64 {
            name.clear();
            write!(name, "client-{i}").unwrap();
            counter.add(&name);
            if [1_000, 100_000, 1_000_000].contains(&i) {
                assert_within_three_standard_errors(&counter, i);
            }
        }
    }

    #[test]
    fn merging_disjoint_sets_estimates_their_union() {
        let (mut here, mut there, mut both) = (
            DistinctCount::new(),
            DistinctCount::new(),
            DistinctCount::new(),
        );
        for i in 0..120_000 {
            let name = format!("user-{i}");
            if i < 50_000 {
                here.add(&name);
            } else {
                there.add(&name);
            }
            both.add(&name);
        }
        assert_within_three_standard_errors(&here, 50_000);
        here.merge(&there);
        assert_within_three_standard_errors(&here, 120_000);
        // Merging loses nothing: it is the counter that saw both, and merging is idempotent.
        assert_eq!(here, both);
        here.merge(&there);
        assert_eq!(here, both);
    }

    #[test]
    fn the_hash_never_changes() {
        // Serialized counters from other processes and versions mean the same only while
        // these hold. FNV-1a of "" is its offset basis; the rest is the splitmix64 mix.
        // (checked against an independent implementation of the same two steps).
        assert_eq!(stable_hash(""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(stable_hash("a"), 0x02c0_bdbf_4814_20f8);
        assert_eq!(stable_hash("client-42"), 0x08fa_643e_5dba_671d);
    }

    #[test]
    fn distinct_count_round_trips_through_json() {
        let mut counter = DistinctCount::new();
        for i in 0..5_000 {
            counter.add(&format!("client-{i}"));
        }
        let json = serde_json::to_string(&counter).unwrap();
        assert!(
            json.starts_with(r#"{"precision":10,"registers":""#),
            "{json}"
        );
        assert_eq!(
            json.len(),
            1024 + r#"{"precision":10,"registers":""}"#.len()
        );
        let decoded: DistinctCount = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, counter);
        assert_eq!(decoded.estimate(), counter.estimate());

        let empty = serde_json::to_string(&DistinctCount::new()).unwrap();
        assert_eq!(
            empty,
            format!(r#"{{"precision":10,"registers":"{}"}}"#, "0".repeat(1024))
        );
    }

    #[test]
    fn distinct_count_refuses_malformed_json() {
        let registers = |last: &str| format!("{}{last}", "0".repeat(1023));
        let cases = [
            (
                format!(r#"{{"precision":12,"registers":"{}"}}"#, registers("0")),
                "precision",
            ),
            (r#"{"precision":10,"registers":"000"}"#.to_owned(), "1024"),
            (
                format!(r#"{{"precision":10,"registers":"{}"}}"#, registers("!")),
                "rank",
            ),
            (
                format!(r#"{{"precision":10,"registers":"{}"}}"#, registers("U")),
                "rank",
            ),
        ];
        for (json, message) in cases {
            let error = serde_json::from_str::<DistinctCount>(&json).unwrap_err();
            assert!(error.to_string().contains(message), "{json}: {error}");
        }
        let highest = format!(r#"{{"precision":10,"registers":"{}"}}"#, registers("T"));
        assert!(serde_json::from_str::<DistinctCount>(&highest).is_ok());
    }
}
