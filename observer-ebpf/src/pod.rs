//! The programs of one pod's namespace, loaded for each (the daemon's
//! loader parses this small object again per pod, with the namespace's
//! cookie as a constant, and the kernel verifies the per-packet path):
//! tc at `lo` egress and at `eth0` both ways. Every map is the shared one
//! (pinned); a flow's first packet goes on to the `observer` object's
//! classifier, loaded once.
//!
//! The cookie cannot come from the packet: in tc,
//! `bpf_get_netns_cookie(skb)` reports the namespace of `skb->sk`, which on
//! ingress is the sending pod's socket (or none at all).
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; `atomic_xadd` lowers to BPF's
// atomic add. The build runs with RUSTC_BOOTSTRAP=1 (see observer/build.rs).
#![feature(core_intrinsics)]
// Unaligned 32-bit packet loads, which LLVM would split (parse.rs).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod cache;
mod count;
mod handoff;
mod parse;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use observer_common::direction::{EGRESS, INGRESS};

/// This namespace's cookie, set at load time.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

/// Attached to `eth0` egress and to `lo` egress (loopback packets then come
/// back through `lo` ingress, where nothing is attached: counted once).
#[classifier]
pub fn observe_egress(mut ctx: TcContext) -> i32 {
    count::observe(&mut ctx, cookie(), EGRESS)
}

/// Attached to `eth0` ingress.
#[classifier]
pub fn observe_ingress(mut ctx: TcContext) -> i32 {
    count::observe(&mut ctx, cookie(), INGRESS)
}

/// Does nothing: the baseline `cargo xtask bench` measures the others against.
#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn cookie() -> u64 {
    // SAFETY: a plain read; volatile so that the value set at load time is read.
    unsafe { core::ptr::read_volatile(&NETNS_COOKIE) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
