//! What the programs hand each other, shared by both objects: the program
//! array of tail calls ([`CLASSIFIER`]), the statistics, and the skb's
//! control buffer as they use it (the namespace's cookie, the direction,
//! a flag).
//!
//! A pod's own programs (pod.rs) know its namespace's cookie as a
//! constant; they hand it here with the packet when they tail-call the
//! shared classifier.
// Both objects build this module; each uses its part.
#![allow(dead_code)]

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    programs::TcContext,
};
use observer_common::{DatapathStats, tail};

/// The shared programs, by [`tail`] index.
#[map]
pub static CLASSIFIER: ProgramArray = ProgramArray::with_max_entries(tail::SLOTS, 0);

#[map]
pub static STATS: PerCpuArray<DatapathStats> = PerCpuArray::with_max_entries(1, 0);

/// What the control buffer says of a packet.
pub struct Handed {
    pub cookie: u64,
    pub direction: u8,
    pub flag: u32,
}

/// Writes what a tail-called program needs to know of the packet.
#[inline(always)]
pub fn hand(ctx: &mut TcContext, cookie: u64, direction: u8, flag: u32) {
    if let [low, high, dir, flags, ..] = ctx.cb_mut() {
        *low = cookie as u32;
        *high = (cookie >> 32) as u32;
        *dir = u32::from(direction);
        *flags = flag;
    }
}

/// Sets the flag only (the rest stays as handed).
#[inline(always)]
pub fn set_flag(ctx: &mut TcContext, flag: u32) {
    if let [_, _, _, flags, ..] = ctx.cb_mut() {
        *flags = flag;
    }
}

/// What the caller handed.
#[inline(always)]
pub fn handed(ctx: &TcContext) -> Handed {
    let [low, high, direction, flag, ..] = *ctx.cb() else {
        return Handed {
            cookie: 0,
            direction: 0,
            flag: 0,
        };
    };
    Handed {
        cookie: u64::from(low) | (u64::from(high) << 32),
        direction: direction as u8,
        flag,
    }
}

#[inline(always)]
pub fn bump_stats(f: impl FnOnce(&mut DatapathStats)) {
    if let Some(stats) = STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; programs do not migrate between CPUs mid-run.
        f(unsafe { &mut *stats });
    }
}
