//! What a flow is: its class and peer ([`observer_common::classify`], on
//! the kernel's maps), which end is the server, and (on `lo`) which
//! container's socket sends it.
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
    CidrValue, FlowKey, FlowValue, ServiceKey, class,
    classify::{self, ClassMaps},
    direction::EGRESS,
    family::{IPV4, IPV6},
    interface, protocol, server,
};

use crate::{CIDRS, SERVICES};

/// The classification maps as the programs read them.
pub struct KernelClassMaps;

impl ClassMaps for KernelClassMaps {
    #[inline(always)]
    fn service(&self, key: &ServiceKey) -> Option<u32> {
        // SAFETY: a plain lookup; the value is copied out at once.
        unsafe { SERVICES.get(key) }.copied()
    }

    #[inline(always)]
    fn address(&self, addr: &[u8; 16]) -> Option<CidrValue> {
        CIDRS.get(Key::new(128, *addr)).copied()
    }
}

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
    let (remote, remote_port, local, local_port) = if egress {
        (key.dst_addr, key.dst_port, key.src_addr, key.src_port)
    } else {
        (key.src_addr, key.src_port, key.dst_addr, key.dst_port)
    };
    let peer = classify::remote(&KernelClassMaps, remote, remote_port, key.protocol);
    value.class = peer.class;
    value.peer_id = peer.id;
    // Whoever has the listening socket is the server: a ClusterIP's end,
    // else is it us?
    let local_is_server = if peer.class == class::SERVICE {
        false
    } else if key.protocol != protocol::TCP {
        value.server = server::UNKNOWN;
        return;
    } else {
        listening(ctx, key.family, protocol::TCP, local, local_port)
    };
    value.server = if local_is_server == egress {
        server::SOURCE
    } else {
        server::DESTINATION
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
    let proto = key.protocol;
    if proto != protocol::TCP && proto != protocol::UDP {
        value.server = server::UNKNOWN;
        return;
    }
    let dst_listens = listening(ctx, key.family, proto, key.dst_addr, key.dst_port);
    let src_listens = listening(ctx, key.family, proto, key.src_addr, key.src_port);
    value.server = match (dst_listens, src_listens) {
        (true, false) => server::DESTINATION,
        (false, true) => server::SOURCE,
        // UDP: both ends are bound sockets; TCP: neither listens (any more).
        _ => server::UNKNOWN,
    };
}

/// Whether a socket listens (TCP) or is bound without a peer (UDP) on
/// `addr:port`: a lookup with a zero source matches no connected socket.
#[inline(always)]
pub fn listening(ctx: &TcContext, family: u8, proto: u8, addr: [u8; 16], port: u16) -> bool {
    // SAFETY: an all-zero tuple is valid; both variants are plain integers.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match family {
        IPV4 => {
            // SAFETY: writing the IPv4 variant of the union.
            let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            v4.daddr = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
            v4.dport = port.to_be();
            size_of_val(v4)
        }
        IPV6 => {
            // SAFETY: writing the IPv6 variant of the union.
            let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            // SAFETY: [u8; 16] and [u32; 4] have the same size; network order
            // is kept byte for byte.
            v6.daddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(addr) };
            v6.dport = port.to_be();
            size_of_val(v6)
        }
        _ => return false,
    } as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let ctx_ptr = ctx.skb.skb.cast();
    // SAFETY: the tuple lives on the stack for the call; a found socket is
    // released below on every path.
    let sk: *mut bpf_sock = unsafe {
        if proto == protocol::TCP {
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
