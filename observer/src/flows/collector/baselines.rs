//! What each flow had at the last collection, by the 64-bit hash of its
//! key: a table of its own rather than a `HashMap`, so that the walk can ask
//! for a flow's slot before it needs it ([`Baselines::prefetch`]).
//!
//! A million flows' baselines (24 MB and more) do not fit in the CPU's
//! caches: every lookup misses them. One after the other, those misses were
//! most of a collection's user time (0.4 s of 0.5 s for a million flows);
//! asked for a batch ahead, they overlap.
//!
//! Open addressing with linear probing over a power-of-two number of slots,
//! at most 7/8 full (it doubles beyond); a removal shifts the entries after
//! it back, so no tombstones pile up. Hash 0 marks an empty slot: a key
//! hashing to 0 is stored as 1 (the flow's two keys would then share a
//! baseline, as any two keys with one 64-bit hash already do).

/// One slot: a flow's hash, and its baseline.
#[derive(Clone, Copy, Default)]
struct Slot<V> {
    hash: u64,
    value: V,
}

pub struct Baselines<V> {
    slots: Vec<Slot<V>>,
    len: usize,
}

const EMPTY: u64 = 0;

impl<V: Copy + Default> Baselines<V> {
    /// Room for `entries` without growing.
    pub fn with_capacity(entries: usize) -> Self {
        Self {
            slots: vec![Slot::default(); slots_for(entries)],
            len: 0,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Asks the CPU to bring the slot `hash` would be looked up in into its
    /// caches. A hint only: nothing changes, and nothing waits for it.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            let slot = &self.slots[self.home(stored(hash))];
            let at = std::ptr::from_ref(slot).cast::<i8>();
            // A 24-byte slot may straddle two cache lines: ask for both.
            let last = at.wrapping_add(size_of::<Slot<V>>() - 1);
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            // SAFETY: a prefetch reads nothing and faults on no address.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(at);
                _mm_prefetch::<_MM_HINT_T0>(last);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hash;
    }

    pub fn get(&self, hash: u64) -> Option<V> {
        self.find(stored(hash)).map(|i| self.slots[i].value)
    }

    /// Sets `hash`'s baseline; returns the one it replaces.
    pub fn insert(&mut self, hash: u64, value: V) -> Option<V> {
        let hash = stored(hash);
        if let Some(i) = self.find(hash) {
            return Some(std::mem::replace(&mut self.slots[i].value, value));
        }
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.grow();
        }
        let mut i = self.home(hash);
        while self.slots[i].hash != EMPTY {
            i = self.next(i);
        }
        self.slots[i] = Slot { hash, value };
        self.len += 1;
        None
    }

    pub fn remove(&mut self, hash: u64) -> Option<V> {
        let i = self.find(stored(hash))?;
        let value = self.slots[i].value;
        self.remove_at(i);
        Some(value)
    }

    /// Keeps only the entries `keep` says to.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let mut i = 0;
        while i < self.slots.len() {
            let slot = &self.slots[i];
            if slot.hash != EMPTY && !keep(&slot.value) {
                // An entry from further on may shift into this slot: look
                // at it again. (One from the table's start, seen already,
                // may shift into its end: asked twice, answered the same.)
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
    }

    fn find(&self, hash: u64) -> Option<usize> {
        let mut i = self.home(hash);
        loop {
            match self.slots[i].hash {
                EMPTY => return None,
                h if h == hash => return Some(i),
                _ => i = self.next(i),
            }
        }
    }

    /// Empties slot `i`, shifting back the entries after it that would
    /// otherwise no longer be found from their home slot.
    fn remove_at(&mut self, mut i: usize) {
        let mut j = i;
        loop {
            j = self.next(j);
            let hash = self.slots[j].hash;
            if hash == EMPTY {
                break;
            }
            // The entry at j stays if its home lies cyclically in (i, j].
            let home = self.home(hash);
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.slots[i] = self.slots[j];
                i = j;
            }
        }
        self.slots[i] = Slot::default();
        self.len -= 1;
    }

    fn grow(&mut self) {
        let doubled = vec![Slot::default(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        self.len = 0;
        for slot in old.into_iter().filter(|s| s.hash != EMPTY) {
            self.insert(slot.hash, slot.value);
        }
    }

    fn home(&self, hash: u64) -> usize {
        // The low bits: the hash is a good one (foldhash's quality hasher).
        (hash as usize) & (self.slots.len() - 1)
    }

    fn next(&self, i: usize) -> usize {
        (i + 1) & (self.slots.len() - 1)
    }
}

/// The hash as stored: never the empty marker.
fn stored(hash: u64) -> u64 {
    if hash == EMPTY { 1 } else { hash }
}

/// Slots for `entries` at most 7/8 full: a power of two.
fn slots_for(entries: usize) -> usize {
    (entries.max(1) * 8 / 7 + 1).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A small deterministic generator (xorshift), for hashes that collide
    /// in few slots and in many.
    fn hashes(seed: u64, n: usize, mask: u64) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x & mask
            })
            .collect()
    }

    /// Every operation, checked against a `HashMap` doing the same.
    fn against_hashmap(keys: &[u64], capacity: usize) {
        let mut table = Baselines::<u32>::with_capacity(capacity);
        let mut model: HashMap<u64, u32> = HashMap::new();
        for (n, &key) in keys.iter().enumerate() {
            let value = n as u32;
            match n % 5 {
                0..=2 => assert_eq!(
                    table.insert(key, value),
                    model.insert(stored(key), value),
                    "insert {key}"
                ),
                3 => assert_eq!(
                    table.remove(key),
                    model.remove(&stored(key)),
                    "remove {key}"
                ),
                _ => {
                    table.prefetch(key);
                    assert_eq!(
                        table.get(key),
                        model.get(&stored(key)).copied(),
                        "get {key}"
                    );
                }
            }
            assert_eq!(table.len(), model.len());
        }
        for &key in keys {
            assert_eq!(table.get(key), model.get(&stored(key)).copied());
        }
        table.retain(|v| v % 3 != 0);
        model.retain(|_, v| *v % 3 != 0);
        assert_eq!(table.len(), model.len());
        for &key in keys {
            assert_eq!(
                table.get(key),
                model.get(&stored(key)).copied(),
                "after retain: {key}"
            );
        }
    }

    #[test]
    fn behaves_as_a_map_with_few_and_many_collisions() {
        // Distinct hashes; hashes crowded into few slots (long runs that
        // wrap around the table's end); and a table that must grow.
        against_hashmap(&hashes(1, 20_000, u64::MAX), 20_000);
        against_hashmap(&hashes(2, 5_000, 0x3f), 64);
        against_hashmap(&hashes(3, 5_000, 0xffff_0000_0000_00ff), 100);
        against_hashmap(&hashes(4, 50_000, u64::MAX), 1);
    }

    #[test]
    fn hash_zero_is_a_key_like_any_other() {
        let mut table = Baselines::<u32>::with_capacity(4);
        assert_eq!(table.get(0), None);
        table.insert(0, 7);
        assert_eq!(table.get(0), Some(7));
        assert_eq!(table.len(), 1);
        assert_eq!(table.remove(0), Some(7));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn retain_removes_everything_it_is_told_to_even_across_the_end() {
        // Every key homes in the last slot: the run wraps to the start.
        let mut table = Baselines::<u32>::with_capacity(6);
        let slots = table.slots.len() as u64;
        let keys: Vec<u64> = (1..=6).map(|n| n * slots + slots - 1).collect();
        for (n, &key) in keys.iter().enumerate() {
            table.insert(key, n as u32);
        }
        table.retain(|v| v % 2 == 1);
        assert_eq!(table.len(), 3);
        for (n, &key) in keys.iter().enumerate() {
            let expected = (n % 2 == 1).then_some(n as u32);
            assert_eq!(table.get(key), expected);
        }
    }
}
