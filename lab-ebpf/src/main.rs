//! A socket load balancer for the node lab, as Cilium's kube-proxy
//! replacement does it: at `connect()` and `sendmsg()` a ClusterIP is
//! rewritten to a backend, and `getpeername()` and `recvmsg()` show the
//! ClusterIP again, so the application never sees the backend. Attached to
//! the lab's own top cgroup, an ancestor of every pod's: the observer's
//! hooks on a pod's cgroup run first and see the ClusterIP.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use lab_ebpf::{Backends, MAX_BACKENDS, ServiceKey, Translation};

#[map]
static LB_SERVICES: HashMap<ServiceKey, Backends> = HashMap::with_max_entries(1024, 0);

#[map]
static LB_SOCKETS: LruHashMap<u64, Translation> = LruHashMap::with_max_entries(65_536, 0);

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    untranslate(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    untranslate(&ctx);
    1
}

/// A ClusterIP becomes one of its backends, picked at random.
#[inline(always)]
fn translate(ctx: &SockAddrContext) {
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = ServiceKey {
        addr: sa.user_ip4,
        port: u16::from_be(sa.user_port as u16),
        protocol: sa.protocol as u8,
        _pad: 0,
    };
    // SAFETY: a plain lookup.
    let Some(backends) = (unsafe { LB_SERVICES.get(&key) }) else {
        return;
    };
    if backends.count == 0 {
        return;
    }
    // SAFETY: a plain helper.
    let pick = (unsafe { bpf_get_prandom_u32() } % backends.count) as usize;
    if pick >= MAX_BACKENDS {
        return;
    }
    let translation = Translation {
        service_addr: key.addr,
        backend_addr: backends.addrs[pick],
        service_port: key.port,
        backend_port: backends.ports[pick],
    };
    sa.user_ip4 = translation.backend_addr;
    sa.user_port = u32::from(translation.backend_port.to_be());
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let _ = LB_SOCKETS.insert(&cookie, &translation, 0);
}

/// A backend the socket was sent to shows as the ClusterIP it stands for.
#[inline(always)]
fn untranslate(ctx: &SockAddrContext) {
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: a plain lookup.
    let Some(t) = (unsafe { LB_SOCKETS.get(&cookie) }) else {
        return;
    };
    // SAFETY: the context the kernel passed.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip4 == t.backend_addr && u16::from_be(sa.user_port as u16) == t.backend_port {
        sa.user_ip4 = t.service_addr;
        sa.user_port = u32::from(t.service_port.to_be());
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
