//! The programs of one pod's namespace, loaded for each: they hand the
//! packet to the shared per-packet programs with the namespace's cookie
//! (see handoff.rs). A few instructions each, so that loading (and
//! verifying) them costs next to nothing; the work is in the `observer`
//! object's programs, loaded once.
#![no_std]
#![no_main]

#[path = "handoff.rs"]
mod handoff;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use observer_common::{
    direction::{EGRESS, INGRESS},
    tail,
};

/// This namespace's cookie, set at load time.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

/// Attached to `eth0` egress and to `lo` egress (loopback packets then come
/// back through `lo` ingress, where nothing is attached: counted once).
#[classifier]
pub fn observe_egress(mut ctx: TcContext) -> i32 {
    enter(&mut ctx, EGRESS, tail::COUNT_EGRESS)
}

/// Attached to `eth0` ingress.
#[classifier]
pub fn observe_ingress(mut ctx: TcContext) -> i32 {
    enter(&mut ctx, INGRESS, tail::COUNT_INGRESS)
}

/// Does nothing: the baseline `cargo xtask bench` measures the others against.
#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn enter(ctx: &mut TcContext, direction: u8, index: u32) -> i32 {
    // SAFETY: a plain read; volatile so that the value set at load time is read.
    let cookie = unsafe { core::ptr::read_volatile(&NETNS_COOKIE) };
    handoff::hand(ctx, cookie, direction, 0);
    // SAFETY: on success this does not return.
    unsafe { handoff::CLASSIFIER.tail_call(ctx, index) };
    // The shared programs are not loaded: nothing is counted, nothing
    // changes.
    handoff::bump_stats(|s| s.classify_failed += 1);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
