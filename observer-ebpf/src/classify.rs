//! What a flow is: its class and peer, which end is the server, and which
//! containers send and receive it. Decided, where a local socket knows, by
//! what its hooks recorded ([`crate::sockets`]): the original destination
//! before any translation, and the container. Otherwise from the packet,
//! with [`observer_common::classify`] on the kernel's maps.
//!
//! Runs when a flow is first seen, again when the daemon has changed the
//! classification maps (new generation), at each SYN into a pod with a
//! policy, at a SYN out of another container than the flow's (a port used
//! again), and at each datagram of a UDP flow into a pod with a policy that
//! no socket receives yet; never for the other packets of a known flow.

use aya_ebpf::{helpers::bpf_skb_cgroup_id, maps::lpm_trie::Key, programs::TcContext};
use observer_common::{
    CidrValue, FlowKey, FlowValue, ServiceKey, class,
    classify::{self, ClassMaps, Peer},
    direction::EGRESS,
    family::IPV4,
    flow_flags, interface, ipv4_mapped, protocol, server,
};

use crate::{
    CIDRS, SERVICES,
    sockets::{self, Socket},
};

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
/// Returns whether a socket of the pod receives the flow (looked up on
/// `lo` and at `eth0` ingress: a listener, a bound or a connected socket).
///
/// `value` holds what the flow was classified as before (zero if new).
/// Unless `renew` (the packet opens a connection: a SYN), what sockets
/// told then stays where this packet's sockets tell nothing: a
/// connection's later packets find an accepted socket (no storage of the
/// hooks'), and after its socket closed, none or the kernel's own (a
/// TIME_WAIT answer). The containers, a decision at the socket, the server.
#[inline(always)]
pub fn classify(ctx: &TcContext, key: &FlowKey, value: &mut FlowValue, renew: bool) -> bool {
    let egress = key.direction == EGRESS;
    // The sending socket is the skb's on egress; the receiving one is looked
    // up on `lo` (both ends are the pod's) and on `eth0` ingress.
    let sender = if egress {
        sockets::sender(ctx)
    } else {
        Socket::default()
    };
    let receiver = if !egress || key.interface == interface::LOOPBACK {
        sockets::receiver(ctx, key, renew)
    } else {
        Socket::default()
    };
    // A socket with the hooks' storage is one of the pod's processes' own,
    // and tells (a UDP port another container used before has no SYN).
    if egress && (renew || value.src_cgroup == 0 || sender.info.cgroup != 0) {
        // SAFETY: reads the socket the kernel attached to the skb.
        value.src_cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    }
    if renew || receiver.info.cgroup != 0 {
        value.dst_cgroup = receiver.info.cgroup;
    }
    if key.interface == interface::LOOPBACK {
        localhost(ctx, key, value, sender, receiver, renew);
        return receiver.found();
    }
    // The pod's own socket, if it connected somewhere: its destination as
    // the process gave it, before any translation. Not a UDP socket its
    // process bound: a server's, what it sends are answers, and where the
    // last one went says nothing of this flow.
    let local = if egress { sender } else { receiver };
    let bound_udp = key.protocol == protocol::UDP && local.bound();
    let decided = local.info.orig_class != class::UNKNOWN && !bound_udp;
    if !renew && local.info.cgroup == 0 && value.flags & flow_flags::DECIDED_AT_SOCKET != 0 {
        // Decided by a socket that this packet no longer reaches.
        return receiver.found();
    }
    let (remote, remote_port, local_addr, local_port) = if egress {
        (key.dst_addr, key.dst_port, key.src_addr, key.src_port)
    } else {
        (key.src_addr, key.src_port, key.dst_addr, key.dst_port)
    };
    value.flags &= !flow_flags::DECIDED_AT_SOCKET;
    let peer = if decided {
        value.flags |= flow_flags::DECIDED_AT_SOCKET;
        Peer {
            class: local.info.orig_class,
            id: local.info.orig_peer,
        }
    } else {
        classify::remote(&KernelClassMaps, remote, remote_port, key.protocol)
    };
    value.class = peer.class;
    value.peer_id = peer.id;
    value.server_port = 0;
    // Whoever has the listening socket is the server: the other end of a
    // socket that connected, or of a ClusterIP; else is it us?
    let local_is_server = if decided {
        // The port the process asked for, whatever a translation made of it.
        value.server_port = local.info.orig_port;
        false
    } else if peer.class == class::SERVICE {
        false
    } else if key.protocol == protocol::UDP && (local.known() || bound_udp) {
        // Both ends of UDP are bound sockets: the one its process bound
        // itself is the server's (a seeded socket may be known bound).
        bound_udp
    } else if key.protocol != protocol::TCP {
        value.server = server::UNKNOWN;
        return receiver.found();
    } else {
        let listens = sockets::listening(ctx, key.family, protocol::TCP, local_addr, local_port);
        if !listens && !renew && value.server != server::UNKNOWN {
            // Told before, by a listener that may be gone now.
            return receiver.found();
        }
        listens
    };
    value.server = if local_is_server == egress {
        server::SOURCE
    } else {
        server::DESTINATION
    };
    receiver.found()
}

/// Whether an outbound packet's socket is in another cgroup than the one
/// its flow was classified for (a packet without a socket, 0, is in none).
#[inline(always)]
pub fn sent_by_another(ctx: &TcContext, value: &FlowValue) -> bool {
    // SAFETY: reads the socket the kernel attached to the skb.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    cgroup != 0 && cgroup != value.src_cgroup
}

/// Both ends are in this namespace: the server is the end whose socket's
/// own address listens (behind a redirect the packet's ports are the
/// translated ones: the sockets' are what the containers use), and a
/// redirected client socket says where it was going.
#[inline(always)]
fn localhost(
    ctx: &TcContext,
    key: &FlowKey,
    value: &mut FlowValue,
    sender: Socket,
    receiver: Socket,
    renew: bool,
) {
    value.class = class::LOCALHOST;
    value.peer_id = 0;
    let redirected =
        |s: &Socket| s.info.orig_class != class::UNKNOWN && s.info.orig_class != class::LOCALHOST;
    let origin = if redirected(&sender) {
        Some(sender.info)
    } else if redirected(&receiver) {
        Some(receiver.info)
    } else if renew || sender.info.cgroup != 0 || receiver.info.cgroup != 0 {
        // Not redirected, as a socket of the pod's says.
        Some(observer_common::SocketInfo::default())
    } else {
        // Neither socket tells (any more): as told before.
        None
    };
    if let Some(origin) = origin {
        value.orig_class = origin.orig_class;
        value.orig_peer_id = origin.orig_peer;
        value.orig_port = origin.orig_port;
    }
    let proto = key.protocol;
    if proto != protocol::TCP && proto != protocol::UDP {
        value.server = server::UNKNOWN;
        return;
    }
    // Each end as its socket has it, else as the packet says. (The kernel's
    // own socket, which answers for a closed one, has no address.)
    let ipv4 = key.family == IPV4;
    let (src_addr, src_port) = if sender.found() && sender.local_port != 0 && ipv4 {
        (
            ipv4_mapped(sender.local_ip4.to_ne_bytes()),
            sender.local_port,
        )
    } else {
        (key.src_addr, key.src_port)
    };
    let (dst_addr, dst_port) = if receiver.found() && ipv4 {
        (
            ipv4_mapped(receiver.local_ip4.to_ne_bytes()),
            receiver.local_port,
        )
    } else {
        (key.dst_addr, key.dst_port)
    };
    let dst_listens = sockets::listening(ctx, key.family, proto, dst_addr, dst_port);
    let src_listens = sockets::listening(ctx, key.family, proto, src_addr, src_port);
    (value.server, value.server_port) = match (dst_listens, src_listens) {
        (true, false) => (server::DESTINATION, dst_port),
        (false, true) => (server::SOURCE, src_port),
        // UDP: both ends are bound sockets; the one its process bound
        // itself is the server's.
        (true, true) if receiver.bound() && !sender.bound() => (server::DESTINATION, dst_port),
        (true, true) if sender.bound() && !receiver.bound() => (server::SOURCE, src_port),
        // TCP: neither listens (any more); the server told before stays.
        _ if renew => (server::UNKNOWN, 0),
        _ => (value.server, value.server_port),
    };
}
