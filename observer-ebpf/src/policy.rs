//! Policy at the socket: `connect()` and unconnected UDP `sendmsg()` of a
//! pod's processes, decided before a packet exists. A denied connection
//! fails at once with EPERM instead of hanging on a dropped SYN, and the
//! destination is still the Service's ClusterIP (no DNAT has happened yet).
//!
//! Attached to each pod's cgroup. A pod without a compiled policy (or a
//! daemon that is gone, taking the links with it) is never affected.
//!
//! Inbound connections have no socket call of the pod's to hook: their
//! first packet is decided at `eth0` ingress by [`ingress`], called from
//! the flow classifier, and the flow's later packets follow that verdict.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::SockAddrContext,
};
use observer_common::{
    FlowKey, FlowValue, MAX_POD_RULES, MemberKey, POLICIES_CAPACITY, POLICY_CIDRS_CAPACITY,
    POLICY_MEMBERS_CAPACITY, PodPolicy, PolicyRule, ServiceKey, VERDICTS_CAPACITY, VerdictKey,
    class,
    direction::{EGRESS, INGRESS},
    ipv4_mapped, set_kind, verdict,
};

use crate::{CIDRS, SERVICES};

/// Pod network namespace cookie to the pod's rules.
#[map]
static POLICIES: HashMap<u64, PodPolicy> = HashMap::with_max_entries(POLICIES_CAPACITY, 0);

/// Rule set members: client container cgroups, peer pod ids.
#[map]
static POLICY_MEMBERS: HashMap<MemberKey, u8> =
    HashMap::with_max_entries(POLICY_MEMBERS_CAPACITY, 0);

/// Rule set CIDRs: set id (big-endian) and IPv4 address.
#[map]
static POLICY_CIDRS: LpmTrie<[u8; 8], u8> = LpmTrie::with_max_entries(POLICY_CIDRS_CAPACITY, 0);

/// Connections decided, per pod, rule, verdict and class.
#[map]
static VERDICTS: LruHashMap<VerdictKey, u64> = LruHashMap::with_max_entries(VERDICTS_CAPACITY, 0);

/// Linux's default `ip_local_port_range` starts here.
pub const FIRST_EPHEMERAL_PORT: u16 = 32768;

/// `connect()` on an IPv4 socket (TCP, and connected UDP).
#[cgroup_sock_addr(connect4)]
pub fn policy_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let address = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes();
    decide(&ctx, address, false)
}

/// `sendmsg()` with an address on an unconnected IPv4 UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn policy_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let address = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes();
    decide(&ctx, address, true)
}

/// `connect()` on an IPv6 socket: to an IPv4 address, it is v4-mapped
/// (dual-stack sockets, Java's default). Other IPv6 traffic is not subject
/// to policies.
#[cgroup_sock_addr(connect6)]
pub fn policy_connect6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        Some(address) => decide(&ctx, address, false),
        None => 1,
    }
}

/// `sendmsg()` with an address on an unconnected IPv6 UDP socket.
#[cgroup_sock_addr(sendmsg6)]
pub fn policy_sendmsg6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        Some(address) => decide(&ctx, address, true),
        None => 1,
    }
}

/// The IPv4 address in a v4-mapped IPv6 destination (`::ffff:a.b.c.d`).
#[inline(always)]
fn v4_mapped(ctx: &SockAddrContext) -> Option<[u8; 4]> {
    // SAFETY: the context the kernel passed; `user_ip6` is read a 4-byte
    // word at a time, as the verifier requires.
    let (a, b, c, d) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        )
    };
    (a == 0 && b == 0 && c.to_ne_bytes() == [0, 0, 0xff, 0xff]).then(|| d.to_ne_bytes())
}

/// 1 lets the call through; 0 fails it with EPERM.
#[inline(always)]
fn decide(ctx: &SockAddrContext, address: [u8; 4], datagram: bool) -> i32 {
    // SAFETY: helpers valid for cgroup sock_addr programs; `ctx` is the
    // program's context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the context the kernel passed.
    let (port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (u16::from_be(sa.user_port as u16), sa.protocol as u8)
    };
    // A UDP server answering a client: sent from the server's port to the
    // client's ephemeral one. Its inbound side was decided at ingress.
    if datagram && port >= FIRST_EPHEMERAL_PORT {
        // SAFETY: `sk`, the sending socket, is always set for these hooks.
        let local = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).src_port };
        if local != 0 && local < u32::from(FIRST_EPHEMERAL_PORT) {
            return 1;
        }
    }
    let (class, service, peer) = classify(address, port, protocol);
    // SAFETY: plain helper.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let connection = Connection {
        counted: true,
        direction: EGRESS,
        class,
        protocol,
        port,
        service,
        peer,
        cgroup,
        address,
    };
    i32::from(verdict(cookie, &connection) != verdict::DENY)
}

/// An inbound connection to a pod (its first packet at `eth0` ingress):
/// [`verdict::DENY`] if a policy denies it. `inbound` tells whether the
/// pod is the flow's server (asked only of pods with a policy). Counted in
/// VERDICTS if `counted` (a flow's first decision, not a decision again
/// after a change). Traffic from the node (the kubelet's probes) is never
/// subject to it.
#[inline(always)]
pub fn ingress(
    key: &FlowKey,
    value: &FlowValue,
    counted: bool,
    inbound: impl FnOnce() -> bool,
) -> u8 {
    let (cookie, class) = (key.netns_cookie, value.class);
    if class == class::NODE {
        return verdict::ALLOW;
    }
    // SAFETY: a plain lookup. First: most pods have no policy, and telling
    // an inbound flow may take a socket lookup.
    let Some(policy) = (unsafe { POLICIES.get(&cookie) }) else {
        return verdict::ALLOW;
    };
    if !inbound() {
        return verdict::ALLOW;
    }
    let a = key.src_addr;
    let connection = Connection {
        counted,
        direction: INGRESS,
        class,
        protocol: key.protocol,
        port: key.dst_port,
        service: 0,
        peer: value.peer_id,
        cgroup: 0,
        address: [a[12], a[13], a[14], a[15]],
    };
    decide_with(policy, cookie, &connection)
}

/// What a policy hook knows of a connection.
struct Connection {
    /// Count the decision in VERDICTS.
    counted: bool,
    direction: u8,
    class: u8,
    protocol: u8,
    /// The server's port.
    port: u16,
    service: u32,
    peer: u32,
    /// The client's cgroup (egress only).
    cgroup: u64,
    /// The remote address.
    address: [u8; 4],
}

/// The pod's rules for this direction, in order; the first that matches
/// decides, else the default. Counted in VERDICTS.
#[inline(always)]
fn verdict(cookie: u64, c: &Connection) -> u8 {
    // SAFETY: a plain lookup.
    match unsafe { POLICIES.get(&cookie) } {
        Some(policy) => decide_with(policy, cookie, c),
        None => verdict::ALLOW,
    }
}

/// [`verdict`] with the pod's policy in hand.
#[inline(always)]
fn decide_with(policy: &PodPolicy, cookie: u64, c: &Connection) -> u8 {
    let mut i = 0;
    while i < MAX_POD_RULES {
        if i as u32 >= policy.rules {
            break;
        }
        let rule = &policy.rule[i];
        if rule.direction == c.direction && matches(rule, c) {
            return count(cookie, rule.id, rule.action, rule.audit, c);
        }
        i += 1;
    }
    let (action, audit, id) = if c.direction == INGRESS {
        (
            policy.default_ingress_action,
            policy.default_ingress_audit,
            policy.default_ingress_id,
        )
    } else {
        (
            policy.default_action,
            policy.default_audit,
            policy.default_id,
        )
    };
    if action == verdict::DENY {
        return count(cookie, id, verdict::DENY, audit, c);
    }
    verdict::ALLOW
}

/// The destination's class, and its Service or peer id.
#[inline(always)]
fn classify(address: [u8; 4], port: u16, protocol: u8) -> (u8, u32, u32) {
    if address[0] == 127 {
        return (class::LOCALHOST, 0, 0);
    }
    let addr = ipv4_mapped(address);
    let key = ServiceKey {
        addr,
        port,
        protocol,
        _pad: [0; 5],
    };
    // SAFETY: a plain lookup.
    if let Some(id) = unsafe { SERVICES.get(&key) } {
        return (class::SERVICE, *id, 0);
    }
    match CIDRS.get(&Key::new(128, addr)) {
        Some(value) if value.class == class::POD => (class::POD, 0, value.id),
        Some(value) => (value.class, 0, 0),
        None => (class::EXTERNAL, 0, 0),
    }
}

#[inline(always)]
fn matches(rule: &PolicyRule, c: &Connection) -> bool {
    if rule.class != class::UNKNOWN && rule.class != c.class {
        return false;
    }
    if rule.protocol != 0 && rule.protocol != c.protocol {
        return false;
    }
    if c.port < rule.port_first || c.port > rule.port_last {
        return false;
    }
    if rule.service != 0 && rule.service != c.service {
        return false;
    }
    let member = |member: u64| {
        let key = MemberKey {
            set: rule.set,
            _pad: 0,
            member,
        };
        // SAFETY: a plain lookup.
        unsafe { POLICY_MEMBERS.get(&key) }.is_some()
    };
    match rule.set_kind {
        set_kind::CLIENTS => member(c.cgroup),
        set_kind::NOT_CLIENTS => !member(c.cgroup),
        set_kind::PEERS => c.peer != 0 && member(u64::from(c.peer)),
        set_kind::CIDRS => {
            let set = rule.set.to_be_bytes();
            let a = c.address;
            let data = [set[0], set[1], set[2], set[3], a[0], a[1], a[2], a[3]];
            POLICY_CIDRS.get(&Key::new(64, data)).is_some()
        }
        _ => true,
    }
}

/// Counts the decision and returns the verdict to act on: an `audit`
/// denial is counted as such and lets the connection through.
#[inline(always)]
fn count(cookie: u64, rule: u32, action: u8, audit: u8, c: &Connection) -> u8 {
    let decided = match (action, audit) {
        (verdict::DENY, 0) => verdict::DENY,
        (verdict::DENY, _) => verdict::AUDIT_DENY,
        _ => verdict::ALLOW,
    };
    let acted = if decided == verdict::DENY {
        verdict::DENY
    } else {
        verdict::ALLOW
    };
    if !c.counted {
        return acted;
    }
    let key = VerdictKey {
        netns_cookie: cookie,
        rule,
        verdict: decided,
        class: c.class,
        direction: c.direction,
        _pad: 0,
    };
    match VERDICTS.get_ptr_mut(&key) {
        // SAFETY: a live, aligned map value; other CPUs add too.
        Some(count) => unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(count, 1);
        },
        None => {
            if VERDICTS.insert(&key, &1, u64::from(BPF_NOEXIST)).is_err()
                && let Some(count) = VERDICTS.get_ptr_mut(&key)
            {
                // SAFETY: as above: another CPU inserted it first.
                unsafe { atomic_xadd::<u64, u64, { Relaxed }>(count, 1) };
            }
        }
    }
    acted
}
