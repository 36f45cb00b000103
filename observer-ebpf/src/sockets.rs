//! What a pod's sockets say: their container, and where they were going
//! before any translation. Decided at the socket, read at tc.
//!
//! The socket hooks on a pod's cgroup (`bind`, `connect`, `sendmsg`) run in
//! the calling process, before any packet exists and before any program on
//! an ancestor cgroup (a socket load balancer's, attached at the root of
//! the cgroup tree, runs after ours). They keep a [`SocketInfo`] in the
//! socket's own storage. The classifier reads it from the socket that sends
//! a packet (`skb->sk`) or from the one that will receive it (a socket
//! lookup), once per flow.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_cgroup_id, bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release, bpf_sk_storage_get,
    },
    macros::btf_map,
    programs::{SockAddrContext, TcContext},
};
use observer_common::{
    FlowKey, SocketInfo,
    classify::Peer,
    family::{IPV4, IPV6},
    protocol, socket_flags,
};

/// Each socket's [`SocketInfo`]: freed with the socket.
#[btf_map]
static SOCKETS: SkStorage<SocketInfo> = SkStorage::new();

/// The info of the socket a sock_addr hook runs for, created if missing
/// (with the calling process' container).
#[inline(always)]
fn info_of(ctx: &SockAddrContext) -> Option<&'static mut SocketInfo> {
    let mut fresh = SocketInfo {
        // SAFETY: a plain helper.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        ..SocketInfo::default()
    };
    // SAFETY: the hook's own socket; the storage lives as long as it.
    let info = unsafe { SOCKETS.get_or_insert_ptr_mut(ctx, Some(&mut fresh)) };
    // SAFETY: a live storage value, or null.
    unsafe { info.as_mut() }
}

/// `bind()`: the socket's container (a server's, before it listens).
#[inline(always)]
pub fn bound(ctx: &SockAddrContext) {
    if let Some(info) = info_of(ctx) {
        info.flags |= socket_flags::BOUND;
    }
}

/// A socket of a pod's that has no address to record (IPv6): its
/// container only.
#[inline(always)]
pub fn seen(ctx: &SockAddrContext) {
    let _ = info_of(ctx);
}

/// `connect()` or `sendmsg()` to `addr:port`, which is `peer`: the
/// original destination, before any translation.
#[inline(always)]
pub fn sent_to(ctx: &SockAddrContext, addr: [u8; 16], port: u16, peer: Peer) {
    let Some(info) = info_of(ctx) else {
        return;
    };
    // Unconnected UDP sends again and again to the same place: write only
    // what changed.
    if info.orig_port != port || info.orig_addr != addr {
        info.orig_addr = addr;
        info.orig_port = port;
    }
    info.orig_class = peer.class;
    info.orig_peer = peer.id;
}

/// A socket as the classifier sees one. Not an `Option`: every field is
/// always written (the verifier refuses reads of what an `Option`'s `None`
/// leaves undefined).
#[derive(Clone, Copy, Default)]
pub struct Socket {
    /// 1 if there is one; all else is zero otherwise.
    pub found: u8,
    /// What its hooks recorded; `cgroup` 0 if nothing.
    pub info: SocketInfo,
    /// Its local IPv4 address (also a dual-stack socket's for IPv4
    /// traffic), network order, and port (host order).
    pub local_ip4: u32,
    pub local_port: u16,
}

impl Socket {
    #[inline(always)]
    pub fn found(&self) -> bool {
        self.found != 0
    }

    /// Its hooks saw it from its start: whether it was bound is known.
    #[inline(always)]
    pub fn known(&self) -> bool {
        self.info.cgroup != 0 && self.info.flags & socket_flags::SEEDED == 0
    }

    /// Its process bound it (a server's).
    #[inline(always)]
    pub fn bound(&self) -> bool {
        self.info.flags & socket_flags::BOUND != 0
    }
}

/// The socket that sends the packet (egress), if any: its local end, and
/// (if it is a full socket, not a listener's request socket answering a
/// SYN) its storage.
#[inline(always)]
pub fn sender(ctx: &TcContext) -> Socket {
    // SAFETY: reads the context the kernel passed.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Socket::default();
    }
    // SAFETY: fields every socket has (a request socket too). Read here,
    // before `bpf_sk_fullsock`: the verifier refuses one load instruction
    // used with two kinds of socket pointer.
    let (port, ip4) = unsafe { ((*sk).src_port, (*sk).src_ip4) };
    // SAFETY: a socket of the skb's (the verifier checks what is read).
    let full = unsafe { bpf_sk_fullsock(sk) };
    Socket {
        found: 1,
        info: if full.is_null() {
            SocketInfo::default()
        } else {
            storage(full)
        },
        local_ip4: ip4,
        local_port: port as u16,
    }
}

/// The socket of this host that would receive a packet of the flow `key`:
/// a connected one, else a TCP listener or a bound UDP socket.
///
/// A SYN (`syn`) on a 4-tuple whose connection is still in TIME_WAIT here
/// finds the TIME_WAIT socket, which is no full socket (null), where the
/// kernel hands the SYN to the listener: the listener is its receiver.
/// (Of an `SO_REUSEPORT` group, the one a zero source selects, not
/// necessarily the one the kernel will pick by the SYN's source: the
/// group's containers may differ only there.)
#[inline(always)]
pub fn receiver(ctx: &TcContext, key: &FlowKey, syn: bool) -> Socket {
    let mut sk = lookup(
        ctx,
        key.family,
        key.protocol,
        (key.src_addr, key.src_port),
        (key.dst_addr, key.dst_port),
    );
    if sk.is_null() && syn && key.protocol == protocol::TCP {
        // A zero source matches no connection (see `listening`).
        sk = lookup(
            ctx,
            key.family,
            key.protocol,
            ([0; 16], 0),
            (key.dst_addr, key.dst_port),
        );
    }
    if sk.is_null() {
        return Socket::default();
    }
    let found = socket(sk);
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    found
}

/// Whether a socket listens (TCP) or is bound without a peer (UDP) on
/// `addr:port`: a lookup with a zero source matches no connected socket.
#[inline(always)]
pub fn listening(ctx: &TcContext, family: u8, proto: u8, addr: [u8; 16], port: u16) -> bool {
    let sk = lookup(ctx, family, proto, ([0; 16], 0), (addr, port));
    if sk.is_null() {
        return false;
    }
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// What a full socket's storage holds (read, never created, here).
#[inline(always)]
fn storage(sk: *mut bpf_sock) -> SocketInfo {
    let map = core::ptr::from_ref(&SOCKETS).cast_mut().cast();
    // SAFETY: a full socket and the storage map.
    let info = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }
        .cast::<SocketInfo>();
    // SAFETY: a live storage value, or null.
    unsafe { info.as_ref() }.copied().unwrap_or_default()
}

/// What a full socket a lookup found says: its storage and local end.
#[inline(always)]
fn socket(sk: *mut bpf_sock) -> Socket {
    let info = storage(sk);
    // SAFETY: fields of a socket the verifier lets us read. (Not its IPv6
    // address: the verifier refuses the pointer arithmetic LLVM makes of
    // reading an array field. IPv6 flows go by the packet's addresses.)
    let (port, ip4) = unsafe { ((*sk).src_port, (*sk).src_ip4) };
    Socket {
        found: 1,
        info,
        local_ip4: ip4,
        local_port: port as u16,
    }
}

/// A socket lookup in this namespace for a packet from `src` to `dst`
/// (host-order ports); null if none. A found socket must be released.
#[inline(always)]
fn lookup(
    ctx: &TcContext,
    family: u8,
    proto: u8,
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
) -> *mut bpf_sock {
    // SAFETY: an all-zero tuple is valid; both variants are plain integers.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match family {
        IPV4 => {
            // SAFETY: writing the IPv4 variant of the union.
            let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            let (s, d) = (src.0, dst.0);
            v4.saddr = u32::from_ne_bytes([s[12], s[13], s[14], s[15]]);
            v4.daddr = u32::from_ne_bytes([d[12], d[13], d[14], d[15]]);
            v4.sport = src.1.to_be();
            v4.dport = dst.1.to_be();
            size_of_val(v4)
        }
        IPV6 => {
            // SAFETY: writing the IPv6 variant of the union.
            let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            // SAFETY: [u8; 16] and [u32; 4] have the same size; network order
            // is kept byte for byte.
            v6.saddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(src.0) };
            v6.daddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(dst.0) };
            v6.sport = src.1.to_be();
            v6.dport = dst.1.to_be();
            size_of_val(v6)
        }
        _ => return core::ptr::null_mut(),
    } as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let ctx_ptr = ctx.skb.skb.cast();
    // SAFETY: the tuple lives on the stack for the call; the caller
    // releases what is found.
    unsafe {
        if proto == protocol::TCP {
            bpf_sk_lookup_tcp(ctx_ptr, &mut tuple, size, netns, 0)
        } else if proto == protocol::UDP {
            bpf_sk_lookup_udp(ctx_ptr, &mut tuple, size, netns, 0)
        } else {
            core::ptr::null_mut()
        }
    }
}
