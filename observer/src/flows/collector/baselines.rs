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
//! it back, so no tombstones pile up. A slot is three words, all zero when
//! empty: the table is allocated zeroed, and its memory is the kernel's
//! zero page until a flow lands there (sized for the flow map's capacity,
//! it costs only what the flows present use). Hash 0 marks an empty slot: a
//! key hashing to 0 is stored as 1 (the flow's two keys would then share a
//! baseline, as any two keys with one 64-bit hash already do).

/// A flow's counters at the last collection. Small on purpose: one per flow.
/// Packets and connections are kept modulo 2^32 (no flow sends 4 G packets
/// between two collections); bytes in full, which also tells a flow that was
/// evicted and came back (its bytes went down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub bytes: u64,
    pub packets: u32,
    pub connections: u16,
    /// Collection pass that last saw the flow (only "this one or not" matters).
    pub pass: u8,
    /// Ticks (`--collect-interval` collections) in a row without a packet.
    pub quiet: u8,
}

impl Seen {
    fn pack(self) -> [u64; 2] {
        [
            self.bytes,
            u64::from(self.packets)
                | u64::from(self.connections) << 32
                | u64::from(self.pass) << 48
                | u64::from(self.quiet) << 56,
        ]
    }

    fn unpack([bytes, rest]: [u64; 2]) -> Self {
        Self {
            bytes,
            packets: rest as u32,
            connections: (rest >> 32) as u16,
            pass: (rest >> 48) as u8,
            quiet: (rest >> 56) as u8,
        }
    }
}

/// A slot: the flow's hash, then its [`Seen`] packed.
type Slot = [u64; 3];

pub struct Baselines {
    slots: Vec<Slot>,
    len: usize,
}

const EMPTY: u64 = 0;

impl Baselines {
    /// Room for `entries` without growing.
    pub fn with_capacity(entries: usize) -> Self {
        Self {
            slots: zeroed(slots_for(entries)),
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
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let slot = &self.slots[self.home(stored(hash))];
            let at = slot.as_ptr().cast::<i8>();
            // A 24-byte slot may straddle two cache lines: ask for both.
            let last = at.wrapping_add(size_of::<Slot>() - 1);
            // SAFETY: a prefetch reads nothing and faults on no address.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(at);
                _mm_prefetch::<_MM_HINT_T0>(last);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hash;
    }

    pub fn get(&self, hash: u64) -> Option<Seen> {
        self.find(stored(hash)).map(|i| self.value(i))
    }

    /// Sets `hash`'s baseline; returns the one it replaces.
    pub fn insert(&mut self, hash: u64, seen: Seen) -> Option<Seen> {
        let hash = stored(hash);
        let [a, b] = seen.pack();
        if let Some(i) = self.find(hash) {
            let before = self.value(i);
            self.slots[i] = [hash, a, b];
            return Some(before);
        }
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.grow();
        }
        let mut i = self.home(hash);
        while self.slots[i][0] != EMPTY {
            i = self.next(i);
        }
        self.slots[i] = [hash, a, b];
        self.len += 1;
        None
    }

    pub fn remove(&mut self, hash: u64) -> Option<Seen> {
        let i = self.find(stored(hash))?;
        let seen = self.value(i);
        self.remove_at(i);
        Some(seen)
    }

    /// Keeps only the entries `keep` says to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Seen) -> bool) {
        let mut i = 0;
        while i < self.slots.len() {
            if self.slots[i][0] != EMPTY && !keep(&self.value(i)) {
                // An entry from further on may shift into this slot: look
                // at it again. (One from the table's start, seen already,
                // may shift into its end: asked twice, answered the same.)
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
    }

    fn value(&self, i: usize) -> Seen {
        let [_, a, b] = self.slots[i];
        Seen::unpack([a, b])
    }

    fn find(&self, hash: u64) -> Option<usize> {
        let mut i = self.home(hash);
        loop {
            match self.slots[i][0] {
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
            let hash = self.slots[j][0];
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
        self.slots[i] = [EMPTY; 3];
        self.len -= 1;
    }

    fn grow(&mut self) {
        let doubled = zeroed(self.slots.len() * 2);
        let old = std::mem::replace(&mut self.slots, doubled);
        self.len = 0;
        for [hash, a, b] in old.into_iter().filter(|s| s[0] != EMPTY) {
            self.insert(hash, Seen::unpack([a, b]));
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

/// `slots` empty slots, from zeroed memory (the standard library asks the
/// allocator for zeroed pages for a vector of zeros: nothing is written).
fn zeroed(slots: usize) -> Vec<Slot> {
    vec![[EMPTY; 3]; slots]
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

    /// A baseline that differs in every field from its neighbours'.
    fn seen(n: usize) -> Seen {
        Seen {
            bytes: n as u64 * 1_000_003,
            packets: n as u32 * 7,
            connections: n as u16,
            pass: (n % 251) as u8,
            quiet: (n % 7) as u8,
        }
    }

    #[test]
    fn a_baseline_comes_back_as_it_went_in() {
        for value in [
            Seen::default(),
            seen(12_345),
            Seen {
                bytes: u64::MAX,
                packets: u32::MAX,
                connections: u16::MAX,
                pass: u8::MAX,
                quiet: u8::MAX,
            },
        ] {
            assert_eq!(Seen::unpack(value.pack()), value);
        }
    }

    /// Every operation, checked against a `HashMap` doing the same.
    fn against_hashmap(keys: &[u64], capacity: usize) {
        let mut table = Baselines::with_capacity(capacity);
        let mut model: HashMap<u64, Seen> = HashMap::new();
        for (n, &key) in keys.iter().enumerate() {
            match n % 5 {
                0..=2 => assert_eq!(
                    table.insert(key, seen(n)),
                    model.insert(stored(key), seen(n)),
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
        table.retain(|v| v.connections % 3 != 0);
        model.retain(|_, v| v.connections % 3 != 0);
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
        let mut table = Baselines::with_capacity(4);
        assert_eq!(table.get(0), None);
        table.insert(0, seen(7));
        assert_eq!(table.get(0), Some(seen(7)));
        assert_eq!(table.len(), 1);
        assert_eq!(table.remove(0), Some(seen(7)));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn retain_removes_everything_it_is_told_to_even_across_the_end() {
        // Every key homes in the last slot: the run wraps to the start.
        let mut table = Baselines::with_capacity(6);
        let slots = table.slots.len() as u64;
        let keys: Vec<u64> = (1..=6).map(|n| n * slots + slots - 1).collect();
        for (n, &key) in keys.iter().enumerate() {
            table.insert(key, seen(n));
        }
        table.retain(|v| v.connections % 2 == 1);
        assert_eq!(table.len(), 3);
        for (n, &key) in keys.iter().enumerate() {
            let expected = (n % 2 == 1).then(|| seen(n));
            assert_eq!(table.get(key), expected);
        }
    }
}
