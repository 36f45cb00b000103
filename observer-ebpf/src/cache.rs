//! A per-CPU cache in front of the flow map, for the packets of flows it
//! already knows: one array slot per flow, found by a hash of the key,
//! counted with plain adds. No helper or function is called on that path:
//! on kernels built with return-thunk mitigations (AMD's Safe RET) each
//! call costs more than the rest of the path (measured: BENCHMARKS.md).
//!
//! A slot is filled from the flow map (`install`, on a packet of a known
//! flow that missed it, if one of its two slots is free) and emptied into
//! it by [`flush_flow_cache`], which
//! the daemon runs on each CPU before it reads the flow map: the flow map
//! is then complete. Both may interrupt each other on one CPU (the flush
//! runs in an interrupt when the daemon asks from another CPU; a packet
//! may interrupt the flush when it runs on its own CPU):
//! - the tc program marks a slot `busy` while it writes it, and the flush
//!   leaves a busy slot for the next time;
//! - the flush takes counts out with atomic subtractions, so that a packet
//!   counted meanwhile stays in the slot.
//!
//! A slot that counted nothing since the last flush is emptied: a flow the
//! daemon takes out of the flow map (it was quiet) is classified anew when
//! it talks again, as without the cache.

// Both objects build this module; each uses its part.
#![allow(dead_code)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering::Relaxed, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{macros::map, maps::PerCpuArray};
use observer_common::{CachedFlow, FLOW_CACHE_BITS, FLOW_CACHE_SLOTS, FlowKey};

use crate::count::{FLOWS, overflow};

#[map]
pub static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// The index of the first of the two slots the flow key `w` (its words:
/// [`words`]) may have on this CPU.
#[inline(always)]
fn set_of(w: &[u64; 6]) -> u32 {
    // Every word counts, each turned differently, so that a flow and its
    // reverse (addresses and ports swapped) land apart; the multiply
    // carries every bit into the top ones, which pick the set.
    let mixed = w[0]
        ^ w[1].rotate_left(8)
        ^ w[2].rotate_left(16)
        ^ w[3].rotate_left(24)
        ^ w[4].rotate_left(40)
        ^ w[5].rotate_left(52);
    let set = (mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - (FLOW_CACHE_BITS - 1))) as u32;
    set * 2
}

/// The slot at `index` on this CPU.
#[inline(always)]
fn at(index: u32) -> Option<&'static mut CachedFlow> {
    // SAFETY: this CPU's value; the tc program does not migrate mid-run.
    FLOW_CACHE
        .get_ptr_mut(index)
        .map(|slot| unsafe { &mut *slot })
}

/// This CPU's slot holding the flow key `w`, classified under
/// `generation`: one of two (a set of two ways, so that two busy flows
/// whose hashes meet do not take turns evicting each other).
#[inline(always)]
pub fn find(w: &[u64; 6], generation: u32) -> Option<&'static mut CachedFlow> {
    let first = set_of(w);
    match at(first) {
        Some(slot) if holds(slot, w, generation) => Some(slot),
        _ => at(first + 1).filter(|slot| holds(slot, w, generation)),
    }
}

/// A slot of this CPU where the flow key `w` may go: one that holds
/// nothing, or a flow of an older generation. None when both hold flows
/// of this one: a flow is never pushed out of the cache by another (the
/// flush empties the slots of quiet flows), so that more busy flows than
/// slots cost what they cost without the cache, not more.
#[inline(always)]
pub fn room(w: &[u64; 6], generation: u32) -> Option<&'static mut CachedFlow> {
    let first = set_of(w);
    let free = |slot: &&mut CachedFlow| slot.valid == 0 || slot.generation != generation;
    match at(first) {
        Some(slot) if free(&slot) => Some(slot),
        _ => at(first + 1).filter(free),
    }
}

/// Whether the slot holds the flow key `b` (its words), classified under
/// `generation`.
#[inline(always)]
fn holds(slot: &CachedFlow, b: &[u64; 6], generation: u32) -> bool {
    let a = words(&slot.key);
    // Word by word: comparing the arrays would call `memcmp`.
    slot.valid != 0
        && slot.generation == generation
        && a[0] == b[0]
        && a[1] == b[1]
        && a[2] == b[2]
        && a[3] == b[3]
        && a[4] == b[4]
        && a[5] == b[5]
}

/// Counts a packet in the slot.
#[inline(always)]
pub fn count(slot: &mut CachedFlow, bytes: u64) {
    // SAFETY: this CPU's slot; volatile so that `busy` is set around the
    // adds, in this order, as the flush (an interrupt) sees them.
    unsafe {
        write_volatile(&mut slot.busy, 1);
        write_volatile(&mut slot.packets, read_volatile(&slot.packets) + 1);
        write_volatile(&mut slot.bytes, read_volatile(&slot.bytes) + bytes);
        write_volatile(&mut slot.busy, 0);
    }
}

/// Puts the flow key `key` (its words; known to the flow map, classified
/// under `generation`) in the slot, after moving what the slot counted for
/// its flow before.
#[inline(always)]
pub fn install(slot: &mut CachedFlow, key: &[u64; 6], generation: u32, verdict: u8) {
    // SAFETY: as in `count`.
    unsafe { write_volatile(&mut slot.busy, 1) };
    if slot.packets != 0 {
        let (packets, bytes) = (slot.packets, slot.bytes);
        move_counts(&slot.key, packets, bytes);
        slot.packets = 0;
        slot.bytes = 0;
    }
    // SAFETY: the words of a FlowKey (see `words`).
    slot.key = unsafe { core::mem::transmute::<[u64; 6], FlowKey>(*key) };
    slot.generation = generation;
    slot.verdict = verdict;
    slot.valid = 1;
    // SAFETY: as in `count`.
    unsafe { write_volatile(&mut slot.busy, 0) };
}

/// Adds counts to the flow's entry in the flow map; to its pod's overflow
/// counts if the daemon took the entry out meanwhile (counted all the
/// same, not classified).
#[inline(always)]
pub fn move_counts(key: &FlowKey, packets: u64, bytes: u64) {
    match FLOWS.get_ptr_mut(key) {
        // SAFETY: a live, 8-byte aligned map value; other CPUs add too.
        Some(value) => unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*value).packets, packets);
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*value).bytes, bytes);
        },
        None => overflow(key, packets, bytes, 0),
    }
}

/// Moves what slot `index` of this CPU counted into the flow map: a
/// `bpf_loop` step of the flush program (main.rs), which the daemon runs
/// on each CPU before it reads the flow map. Always goes on (0).
#[inline(never)]
pub extern "C" fn flush_slot(index: u64, _context: *mut c_void) -> i64 {
    let Some(slot) = FLOW_CACHE.get_ptr_mut(index as u32) else {
        return 0;
    };
    // SAFETY: this CPU's slot. Read volatile: a packet may interrupt the
    // flush and count in it.
    let slot = unsafe { &mut *slot };
    // SAFETY: as above.
    let (busy, packets, bytes) = unsafe {
        (
            read_volatile(&slot.busy),
            read_volatile(&slot.packets),
            read_volatile(&slot.bytes),
        )
    };
    if busy != 0 {
        // This CPU was writing it when the flush interrupted: next time.
        return 0;
    }
    if packets == 0 {
        // Quiet since the last flush: forgotten (see the module).
        // SAFETY: as above.
        unsafe { write_volatile(&mut slot.valid, 0) };
        return 0;
    }
    move_counts(&slot.key, packets, bytes);
    // SAFETY: as above; what a packet added meanwhile stays.
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut slot.packets, packets.wrapping_neg());
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut slot.bytes, bytes.wrapping_neg());
    }
    0
}

/// The key as the six words it is made of.
#[inline(always)]
fn words(key: &FlowKey) -> [u64; 6] {
    // SAFETY: FlowKey is 48 bytes of plain integers, 8-aligned, no padding.
    unsafe { core::mem::transmute::<FlowKey, [u64; 6]>(*key) }
}
