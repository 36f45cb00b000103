//! What a flow is: its class, its peer, which end is the server, and (on
//! `lo`) which container's socket sends it.
//!
//! Runs when a flow is first seen, and again when the daemon has changed the
//! classification maps (new generation); never for every packet.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_skb_cgroup_id},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use observer_common::{
    FlowKey, FlowValue, ServiceKey, class,
    direction::EGRESS,
    family::{IPV4, IPV6},
    interface, server,
};

use crate::{CIDRS, SERVICES};

const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Fills the classification fields of `value` (not the counters).
#[inline(always)]
pub fn classify(ctx: &TcContext, key: &FlowKey, value: &mut FlowValue) {
    if key.interface == interface::LOOPBACK {
        value.class = class::LOCALHOST;
        value.peer_id = 0;
        localhost(ctx, key, value);
        return;
    }
    let egress = key.direction == EGRESS;
    let (peer, peer_port, local, local_port) = if egress {
        (key.dst_addr, key.dst_port, key.src_addr, key.src_port)
    } else {
        (key.src_addr, key.src_port, key.dst_addr, key.dst_port)
    };
    let service = ServiceKey {
        addr: peer,
        port: peer_port,
        protocol: key.protocol,
        _pad: [0; 5],
    };
    // SAFETY: a plain read of a map value.
    if let Some(id) = unsafe { SERVICES.get(&service) } {
        value.class = class::SERVICE;
        value.peer_id = *id;
        // The ClusterIP end is the server.
        value.server = if egress {
            server::DESTINATION
        } else {
            server::SOURCE
        };
        return;
    }
    match CIDRS.get(Key::new(128, peer)) {
        Some(cidr) => {
            value.class = cidr.class;
            value.peer_id = cidr.id;
        }
        None => {
            value.class = class::EXTERNAL;
            value.peer_id = 0;
        }
    }
    // Whoever has the listening socket is the server: is it us?
    value.server = if key.protocol != IPPROTO_TCP {
        server::UNKNOWN
    } else if listening(ctx, key.family, IPPROTO_TCP, local, local_port) {
        if egress {
            server::SOURCE
        } else {
            server::DESTINATION
        }
    } else if egress {
        server::DESTINATION
    } else {
        server::SOURCE
    };
}

/// Both ends are in this namespace. The sending socket is the skb's (tc
/// programs may not ask a looked-up socket for its cgroup, so the receiving
/// container is known from the reverse flow, which the daemon pairs).
#[inline(always)]
fn localhost(ctx: &TcContext, key: &FlowKey, value: &mut FlowValue) {
    if value.src_cgroup == 0 {
        // SAFETY: reads the socket the kernel attached to the skb.
        value.src_cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    }
    let protocol = key.protocol;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        value.server = server::UNKNOWN;
        return;
    }
    let dst_listens = listening(ctx, key.family, protocol, key.dst_addr, key.dst_port);
    let src_listens = listening(ctx, key.family, protocol, key.src_addr, key.src_port);
    value.server = match (dst_listens, src_listens) {
        (true, false) => server::DESTINATION,
        (false, true) => server::SOURCE,
        // UDP: both ends are bound sockets; TCP: neither listens (any more).
        _ => server::UNKNOWN,
    };
}

struct Ends {
    src: [u8; 16],
    src_port: u16,
    dst: [u8; 16],
    dst_port: u16,
}

/// Whether a socket listens (TCP) or is bound without a peer (UDP) on
/// `addr:port`: a lookup with a zero source matches no connected socket.
#[inline(always)]
pub fn listening(ctx: &TcContext, family: u8, protocol: u8, addr: [u8; 16], port: u16) -> bool {
    socket_exists(
        ctx,
        family,
        protocol,
        Ends {
            src: [0; 16],
            src_port: 0,
            dst: addr,
            dst_port: port,
        },
    )
}

/// Whether the kernel has a socket that a packet between `ends` would be
/// delivered to.
#[inline(always)]
fn socket_exists(ctx: &TcContext, family: u8, protocol: u8, ends: Ends) -> bool {
    // SAFETY: an all-zero tuple is valid; both variants are plain integers.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match family {
        IPV4 => {
            // SAFETY: writing the IPv4 variant of the union.
            let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            v4.saddr = u32::from_ne_bytes([ends.src[12], ends.src[13], ends.src[14], ends.src[15]]);
            v4.daddr = u32::from_ne_bytes([ends.dst[12], ends.dst[13], ends.dst[14], ends.dst[15]]);
            v4.sport = ends.src_port.to_be();
            v4.dport = ends.dst_port.to_be();
            size_of_val(v4)
        }
        IPV6 => {
            // SAFETY: writing the IPv6 variant of the union.
            let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            // SAFETY: [u8; 16] and [u32; 4] have the same size; network order
            // is kept byte for byte.
            v6.saddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ends.src) };
            v6.daddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ends.dst) };
            v6.sport = ends.src_port.to_be();
            v6.dport = ends.dst_port.to_be();
            size_of_val(v6)
        }
        _ => return false,
    } as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let ctx_ptr = ctx.skb.skb.cast();
    // SAFETY: the tuple lives on the stack for the call; a found socket is
    // released below on every path.
    let sk: *mut bpf_sock = unsafe {
        if protocol == IPPROTO_TCP {
            bpf_sk_lookup_tcp(ctx_ptr, &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx_ptr, &mut tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
