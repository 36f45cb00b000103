//! The per-packet path, and the maps it counts in: built into each pod's
//! own programs (pod.rs), where the namespace's cookie is a constant, and
//! into the shared object, whose classifier counts a flow's first packet.
//!
//! A packet of a flow this CPU counted lately is counted in the per-CPU
//! cache (cache.rs) and nothing else happens; one of a flow the flow map
//! knows is counted there with atomic adds; anything else goes to
//! `classify_flow` (a tail call), with the namespace and direction in the
//! skb's control buffer (handoff.rs).
// Both objects build this module; each uses its part.
#![allow(dead_code)]

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::map,
    maps::{Array, HashMap},
    programs::TcContext,
};
use observer_common::{
    DEFAULT_FLOW_CAPACITY, FlowKey, FlowValue, OVERFLOW_CAPACITY, OverflowKey, OverflowValue, tail,
    verdict,
};

use crate::{
    cache,
    handoff::{self, CLASSIFIER, bump_stats},
    parse,
};

/// Flows of every attached namespace. Shared (not per-CPU: per-CPU values
/// would multiply the map's memory by the number of CPUs), and not an LRU:
/// nothing is evicted before it is counted. The daemon removes a flow once
/// it has counted it to its last packet (idle, or to make room).
///
/// Its entries are allocated as flows come (`BPF_F_NO_PREALLOC`): its
/// kernel memory follows the flows there are, not the capacity, and an
/// insert is the only place that pays for it (once per flow).
#[map]
pub static FLOWS: HashMap<FlowKey, FlowValue> =
    HashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, BPF_F_NO_PREALLOC);

/// The packets of flows the flow map has no room for, per pod, interface
/// and direction: counted, not classified.
#[map]
static OVERFLOW: HashMap<OverflowKey, OverflowValue> =
    HashMap::with_max_entries(OVERFLOW_CAPACITY, 0);

/// Bumped by the daemon after it changes the classification maps: flows
/// classified under an older generation are classified again.
#[map]
pub static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Flows that have had this many packets are kept in the cache: a short
/// connection's few packets would only fill it and empty it again.
const CACHE_AFTER: u64 = 4;

/// The per-packet path of the namespace with this cookie.
#[inline(always)]
pub fn observe(ctx: &mut TcContext, cookie: u64, direction: u8) -> i32 {
    let flow = parse::flow(ctx, cookie, direction);
    let syn = flow.syn;
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    let bytes = u64::from(ctx.len());
    // The common case: a flow this CPU counted lately. SYNs go the long
    // way: they count connections, and an inbound one is decided anew.
    if !syn && let Some(cached) = cache::find(&flow.words, generation) {
        cache::count(cached, bytes);
        return action(cached.verdict);
    }
    let key = flow.key();
    if let Some(value) = FLOWS.get_ptr_mut(&key) {
        // A SYN opens a connection, and goes to `classify_flow` whatever
        // the flow holds: an inbound one is decided there as one, and an
        // outbound one may come from another container than the flow's
        // last (the pod's port used again). Once per connection; a new
        // flow's first SYN goes there anyway.
        // SAFETY: a live map value.
        if unsafe { (*value).generation } == generation && !syn {
            add(value, bytes, 0);
            // SAFETY: as above.
            let (verdict, packets) = unsafe { ((*value).verdict, (*value).packets) };
            if packets >= CACHE_AFTER
                && let Some(slot) = cache::room(&flow.words, generation)
            {
                cache::install(slot, &flow.words, generation, verdict);
            }
            return action(verdict);
        }
    }
    handoff::hand(ctx, cookie, direction, 0);
    // SAFETY: on success this does not return.
    unsafe { CLASSIFIER.tail_call(ctx, tail::CLASSIFY) };
    // Reached only if the tail call failed (no classifier loaded).
    bump_stats(|s| s.classify_failed += 1);
    TC_ACT_UNSPEC
}

/// What tc does with a packet of a flow with this verdict.
#[inline(always)]
pub fn action(verdict: u8) -> i32 {
    if verdict == verdict::DENY {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}

/// Adds one packet to a flow's counters.
#[inline(always)]
pub fn add(value: *mut FlowValue, bytes: u64, syn: u32) {
    // SAFETY: a live, 8-byte aligned map value. Other CPUs update it
    // concurrently, hence atomic adds.
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*value).packets, 1);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*value).bytes, bytes);
        if syn != 0 {
            atomic_xadd::<u32, u32, { Relaxed }>(&raw mut (*value).connections, 1);
        }
    }
}

/// Counts packets whose flow has no room in the flow map.
#[inline(always)]
pub fn overflow(key: &FlowKey, packets: u64, bytes: u64, syn: u32) {
    let key = OverflowKey {
        netns_cookie: key.netns_cookie,
        interface: key.interface,
        direction: key.direction,
        _pad: [0; 6],
    };
    let first = OverflowValue {
        packets,
        bytes,
        connections: u64::from(syn),
    };
    let counted = match OVERFLOW.get_ptr_mut(&key) {
        Some(value) => Some(value),
        None if OVERFLOW
            .insert(&key, &first, u64::from(BPF_NOEXIST))
            .is_ok() =>
        {
            None
        }
        // Another CPU inserted it first, or there is no room there either.
        None => match OVERFLOW.get_ptr_mut(&key) {
            Some(value) => Some(value),
            None => {
                bump_stats(|s| s.flow_insert_failed += 1);
                None
            }
        },
    };
    if let Some(value) = counted {
        // SAFETY: a live, 8-byte aligned map value; other CPUs add too.
        unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*value).packets, packets);
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*value).bytes, bytes);
            if syn != 0 {
                atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*value).connections, 1);
            }
        }
    }
}
