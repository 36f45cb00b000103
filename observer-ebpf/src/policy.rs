//! Policy at the socket: `connect()` and unconnected UDP `sendmsg()` of a
//! pod's processes, decided before a packet exists. A denied connection
//! fails at once with EPERM instead of hanging on a dropped SYN, and the
//! destination is still the Service's ClusterIP (no DNAT has happened yet).
//!
//! Attached to each pod's cgroup. A pod without a compiled policy (or a
//! daemon that is gone, taking the links with it) is never affected.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::SockAddrContext,
};
use observer_common::{
    MAX_POD_RULES, MemberKey, POLICIES_CAPACITY, POLICY_CIDRS_CAPACITY, POLICY_MEMBERS_CAPACITY,
    PodPolicy, PolicyRule, ServiceKey, VERDICTS_CAPACITY, VerdictKey, class, ipv4_mapped, set_kind,
    verdict,
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

/// `connect()` on an IPv4 socket (TCP, and connected UDP).
#[cgroup_sock_addr(connect4)]
pub fn policy_connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx)
}

/// `sendmsg()` with an address on an unconnected UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn policy_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx)
}

/// 1 lets the call through; 0 fails it with EPERM.
#[inline(always)]
fn decide(ctx: &SockAddrContext) -> i32 {
    // SAFETY: helpers valid for cgroup sock_addr programs; `ctx` is the
    // program's context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let Some(policy) = (unsafe { POLICIES.get(&cookie) }) else {
        return 1;
    };
    // SAFETY: the context the kernel passed.
    let (address, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_ip4.to_ne_bytes(),
            u16::from_be(sa.user_port as u16),
            sa.protocol as u8,
        )
    };
    let (class, service, peer) = classify(address, port, protocol);
    // SAFETY: plain helper.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };

    let mut i = 0;
    while i < MAX_POD_RULES {
        if i as u32 >= policy.rules {
            break;
        }
        let rule = &policy.rule[i];
        if matches(rule, class, protocol, port, service, peer, cgroup, address) {
            return verdict_of(cookie, rule.id, rule.action, rule.audit, class);
        }
        i += 1;
    }
    if policy.default_action == verdict::DENY {
        return verdict_of(
            cookie,
            policy.default_id,
            verdict::DENY,
            policy.default_audit,
            class,
        );
    }
    1
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
#[allow(clippy::too_many_arguments)]
fn matches(
    rule: &PolicyRule,
    class: u8,
    protocol: u8,
    port: u16,
    service: u32,
    peer: u32,
    cgroup: u64,
    address: [u8; 4],
) -> bool {
    if rule.class != class::UNKNOWN && rule.class != class {
        return false;
    }
    if rule.protocol != 0 && rule.protocol != protocol {
        return false;
    }
    if port < rule.port_first || port > rule.port_last {
        return false;
    }
    if rule.service != 0 && rule.service != service {
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
        set_kind::CLIENTS => member(cgroup),
        set_kind::NOT_CLIENTS => !member(cgroup),
        set_kind::PEERS => peer != 0 && member(u64::from(peer)),
        set_kind::CIDRS => {
            let set = rule.set.to_be_bytes();
            let data = [
                set[0], set[1], set[2], set[3], address[0], address[1], address[2], address[3],
            ];
            POLICY_CIDRS.get(&Key::new(64, data)).is_some()
        }
        _ => true,
    }
}

/// Counts the decision and returns what the hook returns.
#[inline(always)]
fn verdict_of(cookie: u64, rule: u32, action: u8, audit: u8, class: u8) -> i32 {
    let decided = match (action, audit) {
        (verdict::DENY, 0) => verdict::DENY,
        (verdict::DENY, _) => verdict::AUDIT_DENY,
        _ => verdict::ALLOW,
    };
    let key = VerdictKey {
        netns_cookie: cookie,
        rule,
        verdict: decided,
        class,
        _pad: [0; 2],
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
    i32::from(decided != verdict::DENY)
}
