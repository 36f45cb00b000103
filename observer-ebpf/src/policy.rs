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
//!
//! What a policy decides is [`observer_common::policy::decide`]; this file
//! only gathers the connection and counts the decision. The same hooks
//! record each socket's container and original destination
//! ([`crate::sockets`]), for every pod, with a policy or not.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering::Relaxed, atomic_xadd},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_loop, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id, generated,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::{SockAddrContext, TcContext},
};
use aya_log_ebpf::debug;
use observer_common::{
    FlowKey, FlowValue, MAX_POD_RULES, MemberKey, NodeInfo, POLICIES_CAPACITY,
    POLICY_CIDRS_CAPACITY, POLICY_MEMBERS_CAPACITY, PodPolicy, UNIX_POLICY_CAPACITY, UnixPathName,
    UnixPolicyKey, UnixVerdict, VERDICTS_CAPACITY, VerdictKey, class, classify,
    direction::{EGRESS, INGRESS},
    family, interface,
    ipc::{UNIX_PATH_MAX, UnixPathKey, name_words, path_hash_end},
    ipv4_mapped,
    policy::{self, Connection, Decision, RuleSets},
    policy_cidr_key, ports, server, verdict,
};

use crate::{FLOWS, classify::KernelClassMaps, sockets};

/// Pod network namespace cookie to the pod's rules.
#[map]
static POLICIES: HashMap<u64, PodPolicy> =
    HashMap::with_max_entries(POLICIES_CAPACITY, BPF_F_NO_PREALLOC);

/// Rule set members: client container cgroups, peer pod ids.
#[map]
static POLICY_MEMBERS: HashMap<MemberKey, u8> =
    HashMap::with_max_entries(POLICY_MEMBERS_CAPACITY, 0);

/// Rule set CIDRs: [`policy_cidr_key`].
#[map]
static POLICY_CIDRS: LpmTrie<[u8; 20], u8> = LpmTrie::with_max_entries(POLICY_CIDRS_CAPACITY, 0);

/// How the node's own processes are told: [`NodeInfo`].
#[map]
static NODE: Array<NodeInfo> = Array::with_max_entries(1, 0);

/// Connections decided, per pod, rule, verdict and class. Not an LRU:
/// nothing is evicted before the daemon has counted it.
#[map]
static VERDICTS: HashMap<VerdictKey, u64> = HashMap::with_max_entries(VERDICTS_CAPACITY, 0);

/// The rule sets as the programs read them.
struct KernelRuleSets;

impl RuleSets for KernelRuleSets {
    #[inline(always)]
    fn member(&self, set: u32, member: u64) -> bool {
        // SAFETY: a plain lookup.
        unsafe { POLICY_MEMBERS.get(&MemberKey::new(set, member)) }.is_some()
    }

    #[inline(always)]
    fn cidr(&self, set: u32, addr: &[u8; 16]) -> bool {
        POLICY_CIDRS
            .get(Key::new(32 + 128, policy_cidr_key(set, *addr)))
            .is_some()
    }
}

/// [`policy::decide`], one rule a `bpf_loop` step: the verifier checks the
/// step once, where a loop over [`MAX_POD_RULES`] rules would be checked
/// rule by rule (past its limit of a million instructions at 64).
#[inline(always)]
fn decide_kernel(pod: &PodPolicy, connection: &Connection) -> Option<Decision> {
    if policy::exempt(connection) {
        return None;
    }
    let mut walk = Walk {
        policy: pod,
        connection: *connection,
        decision: Decision {
            rule: 0,
            verdict: 0,
        },
        matched: 0,
    };
    let rules = pod.rules.min(MAX_POD_RULES as u32);
    // SAFETY: the callback is a function of this program; the context is
    // this stack frame's, alive for the call.
    unsafe { bpf_loop(rules, rule_step as *mut c_void, (&raw mut walk).cast(), 0) };
    if walk.matched != 0 {
        Some(walk.decision)
    } else {
        policy::fallback(pod, connection)
    }
}

/// What [`rule_step`] works on.
#[repr(C)]
struct Walk {
    policy: *const PodPolicy,
    connection: Connection,
    decision: Decision,
    matched: u8,
}

/// One rule of [`decide_kernel`]: 1 (stop) once rule `index` decides.
#[inline(never)]
extern "C" fn rule_step(index: u64, walk: *mut c_void) -> i64 {
    // SAFETY: the context bpf_loop passes is decide_kernel's Walk.
    let walk = unsafe { &mut *walk.cast::<Walk>() };
    let Some(rule) = (unsafe { (*walk.policy).rule.get(index as usize) }) else {
        return 1;
    };
    match policy::decide_rule(rule, &walk.connection, &KernelRuleSets) {
        Some(decision) => {
            walk.decision = decision;
            walk.matched = 1;
            1
        }
        None => 0,
    }
}

/// `bind()` of an IPv4 socket: a server's container, for the classifier.
#[cgroup_sock_addr(bind4)]
pub fn socket_bind4(ctx: SockAddrContext) -> i32 {
    sockets::bound(&ctx);
    1
}

/// `bind()` of an IPv6 socket.
#[cgroup_sock_addr(bind6)]
pub fn socket_bind6(ctx: SockAddrContext) -> i32 {
    sockets::bound(&ctx);
    1
}

/// `connect()` on an IPv4 socket (TCP, and connected UDP).
#[cgroup_sock_addr(connect4)]
pub fn policy_connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, ipv4_mapped(user_ip4(&ctx)), false)
}

/// `sendmsg()` with an address on an unconnected IPv4 UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn policy_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, ipv4_mapped(user_ip4(&ctx)), true)
}

/// `connect()` on an IPv6 socket: to an IPv4 address, it is v4-mapped
/// (dual-stack sockets, Java's default). Other IPv6 traffic is not subject
/// to policies (its container is still recorded).
#[cgroup_sock_addr(connect6)]
pub fn policy_connect6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        Some(address) => decide(&ctx, ipv4_mapped(address), false),
        None => {
            sockets::seen(&ctx);
            1
        }
    }
}

/// `sendmsg()` with an address on an unconnected IPv6 UDP socket.
#[cgroup_sock_addr(sendmsg6)]
pub fn policy_sendmsg6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        Some(address) => decide(&ctx, ipv4_mapped(address), true),
        None => {
            sockets::seen(&ctx);
            1
        }
    }
}

#[inline(always)]
fn user_ip4(ctx: &SockAddrContext) -> [u8; 4] {
    // SAFETY: the context the kernel passed.
    unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes()
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

/// Records where the socket is going (the original destination, for the
/// classifier), then decides: 1 lets the call through; 0 fails it with
/// EPERM.
#[inline(always)]
fn decide(ctx: &SockAddrContext, addr: [u8; 16], datagram: bool) -> i32 {
    // SAFETY: the context the kernel passed.
    let (port, proto) = unsafe {
        let sa = &*ctx.sock_addr;
        (u16::from_be(sa.user_port as u16), sa.protocol as u8)
    };
    let peer = classify::destination(&KernelClassMaps, addr, port, proto);
    sockets::sent_to(ctx, addr, port, peer);
    let cookie = netns_of(ctx);
    // SAFETY: a plain lookup. Most pods have no policy.
    let Some(pod) = (unsafe { POLICIES.get(&cookie) }) else {
        return 1;
    };
    // A UDP server answering a client: its inbound side was decided at
    // ingress.
    if datagram && answers_inbound(ctx, cookie, pod, addr, port, proto) {
        return 1;
    }
    let connection = Connection {
        direction: EGRESS,
        class: peer.class,
        protocol: proto,
        port,
        peer: peer.id,
        // SAFETY: plain helper.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        addr,
        from_node_process: false,
    };
    let Some(decision) = decide_kernel(pod, &connection) else {
        return 1;
    };
    count(ctx, cookie, &decision, &connection);
    i32::from(decision.enforced() != verdict::DENY)
}

/// Whether a datagram to `addr:port` answers one that came in: the flow
/// from there to this socket's port is in the flow map, the pod was its
/// server (or, for a socket from before the observer whose flow could not
/// tell, its port is outside the ephemeral range), and it was let in.
/// Anything else the socket sends is judged as egress, whatever its ports.
#[inline(always)]
fn answers_inbound(
    ctx: &SockAddrContext,
    cookie: u64,
    pod: &PodPolicy,
    addr: [u8; 16],
    port: u16,
    proto: u8,
) -> bool {
    // SAFETY: `sk`, the sending socket, is always set for these hooks; its
    // local port is in host order, its address in network order.
    let (local_port, local_ip4) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        ((*sk).src_port, (*sk).src_ip4)
    };
    if local_port == 0 || local_port > u32::from(u16::MAX) {
        return false;
    }
    let local_port = local_port as u16;
    let asked = |interface, direction, local: [u8; 16]| {
        let key = FlowKey {
            netns_cookie: cookie,
            src_addr: addr,
            dst_addr: local,
            src_port: port,
            dst_port: local_port,
            protocol: proto,
            direction,
            family: family::IPV4,
            interface,
        };
        // SAFETY: a plain lookup; the value is read at once.
        unsafe { FLOWS.get(&key) }.is_some_and(|asked| {
            asked.verdict != verdict::DENY
                && (asked.server == server::DESTINATION
                    || (asked.server == server::UNKNOWN && local_port < ports::EPHEMERAL_FIRST))
        })
    };
    let bound = (local_ip4 != 0).then(|| ipv4_mapped(local_ip4.to_ne_bytes()));
    // The pod's own traffic passes `lo` (to 127/8 or to the pod's address),
    // counted at `lo` egress, to the address the asker sent to: the
    // socket's own, or (a socket bound to any address) the asker's or
    // 127.0.0.1 behind a redirect.
    if addr[12] == 127 || addr == pod.addr {
        return match bound {
            Some(local) => asked(interface::LOOPBACK, EGRESS, local),
            None => {
                asked(interface::LOOPBACK, EGRESS, addr)
                    || asked(interface::LOOPBACK, EGRESS, LOCALHOST)
            }
        };
    }
    asked(interface::POD, INGRESS, bound.unwrap_or(pod.addr))
}

/// 127.0.0.1, IPv4-mapped.
const LOCALHOST: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];

/// Whether the pod with this namespace has a policy.
#[inline(always)]
pub fn has_policy(cookie: u64) -> bool {
    // SAFETY: a plain lookup.
    unsafe { POLICIES.get(&cookie) }.is_some()
}

/// An inbound connection to a pod (at `eth0` ingress, the pod the flow's
/// server): [`verdict::DENY`] if a policy denies it. Counted in VERDICTS
/// if `counted` (the connection's first decision, not one again after a
/// change of the maps).
#[inline(always)]
pub fn ingress(ctx: &TcContext, key: &FlowKey, value: &FlowValue, counted: bool) -> u8 {
    let cookie = key.netns_cookie;
    // SAFETY: a plain lookup.
    let Some(pod) = (unsafe { POLICIES.get(&cookie) }) else {
        return verdict::ALLOW;
    };
    let connection = Connection {
        direction: INGRESS,
        class: value.class,
        protocol: key.protocol,
        port: key.dst_port,
        peer: value.peer_id,
        cgroup: 0,
        addr: key.src_addr,
        from_node_process: from_node_process(ctx),
    };
    let Some(decision) = decide_kernel(pod, &connection) else {
        return verdict::ALLOW;
    };
    if counted {
        count(ctx, cookie, &decision, &connection);
    }
    decision.enforced()
}

/// Whether an inbound packet was sent by a process of the node itself:
/// it has a socket (its reference survives the veth into the pod; a packet
/// forwarded through the node, NodePort or LoadBalancer traffic, has none),
/// and that socket is in no pod's cgroup (a host-network pod's is).
#[inline(always)]
fn from_node_process(ctx: &TcContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: the skb the kernel passed; 0 when it has no socket.
    if unsafe { bpf_skb_cgroup_id(skb.cast()) } == 0 {
        return false;
    }
    // Where pods' cgroups are not known, none is the node's: a host-network
    // pod could not be told from the kubelet.
    let Some(node) = NODE.get(0).filter(|n| n.pods_cgroup != 0) else {
        return false;
    };
    // SAFETY: as above; 0 when the hierarchy is not that deep there.
    let ancestor = unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), node.pods_level as i32) };
    ancestor != node.pods_cgroup
}

/// Counts a decision in VERDICTS.
#[inline(always)]
fn count<C: EbpfContext>(ctx: &C, cookie: u64, decision: &Decision, c: &Connection) {
    debug!(
        ctx,
        "policy: rule {} verdict {} class {} direction {} port {}",
        decision.rule,
        decision.verdict,
        c.class,
        c.direction,
        c.port
    );
    let key = VerdictKey {
        netns_cookie: cookie,
        rule: decision.rule,
        verdict: decision.verdict,
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
            if VERDICTS.insert(&key, &1, u64::from(BPF_NOEXIST)).is_err() {
                match VERDICTS.get_ptr_mut(&key) {
                    // SAFETY: as above: another CPU inserted it first.
                    Some(count) => unsafe {
                        atomic_xadd::<u64, u64, { Relaxed }>(count, 1);
                    },
                    None => crate::handoff::bump_stats(|s| s.verdicts_lost += 1),
                }
            }
        }
    }
}

/// What a pod's `class: unix` rules decide for a client container and a
/// path ([`UnixPolicyKey`]): the daemon decides every pair the rules can
/// tell apart, so that the hooks below only look the answer up.
#[map]
static UNIX_POLICY: HashMap<UnixPolicyKey, UnixVerdict> =
    HashMap::with_max_entries(UNIX_POLICY_CAPACITY, 0);

/// The paths those rules name, whole ([`UnixPathName`]).
#[map]
static UNIX_POLICY_PATHS: HashMap<UnixPathKey, UnixPathName> =
    HashMap::with_max_entries(UNIX_POLICY_CAPACITY, 0);

/// `connect()` of a unix socket: stream and seqpacket sockets, and
/// datagram sockets that connect to a peer (kernels 6.7 and later).
///
/// In a `cgroup/connect4` section only because aya 0.14 knows no unix
/// attach type: aya parses the program and never loads it; the daemon
/// loads it with the unix attach type (`observer::kernel::unix_hooks`).
#[cgroup_sock_addr(connect4)]
pub fn unix_connect(ctx: SockAddrContext) -> i32 {
    decide_unix(&ctx, netns_of(&ctx), || {
        unix_address(&ctx).and_then(unix_path)
    })
}

/// `sendmsg()` with an address on a unix datagram socket (`sendto()`),
/// loaded like [`unix_connect`]. A datagram it lets through is counted
/// after the send, where its bytes are known ([`crate::ipc`]).
#[cgroup_sock_addr(sendmsg4)]
pub fn unix_sendmsg(ctx: SockAddrContext) -> i32 {
    // Read once: for the decision and for the count.
    let netns = netns_of(&ctx);
    let address = unix_address(&ctx);
    let path = address.and_then(unix_path);
    let allowed = decide_unix(&ctx, netns, || path);
    if allowed == 1 {
        let o = crate::ipc::offsets();
        let context = ctx.sock_addr as u64;
        if let (Some(sk), Some((address, len)), Some((hash, _))) =
            (crate::ipc::read(context, o.sock_addr_sk), address, path)
        {
            let _ = crate::ipc::addressed(sk, netns, address, len, hash);
        }
    }
    allowed
}

/// Looks up what the pod's unix rules decide for the calling container and
/// the path it names (see [`UnixPolicyKey`] for the order), counts it, and
/// lets the call through (1) unless it is denied (0: EPERM).
#[inline(always)]
fn decide_unix(
    ctx: &SockAddrContext,
    netns: u64,
    path: impl FnOnce() -> Option<(u64, UnixPathName)>,
) -> i32 {
    // SAFETY: a plain lookup; the value is copied at once.
    let get = |key: &UnixPolicyKey| unsafe { UNIX_POLICY.get(key) }.copied();
    let client = || {
        // SAFETY: plain helper.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        // A path that cannot be read is one no rule names, and so is one
        // whose hash is a rule path's but whose name is not.
        let path = path()
            .filter(|(hash, name)| {
                let key = UnixPathKey { netns, hash: *hash };
                // SAFETY: a plain lookup.
                unsafe { UNIX_POLICY_PATHS.get(&key) }
                    .is_some_and(|named| named.words == name.words)
            })
            .map_or(0, |(hash, _)| hash);
        (cgroup, path)
    };
    let Some(found) = policy::unix_decision(netns, client, get) else {
        return 1;
    };
    if found.verdict == 0 {
        return 1;
    }
    let decision = Decision {
        rule: found.rule,
        verdict: found.verdict,
    };
    let connection = Connection {
        direction: EGRESS,
        class: class::UNIX,
        ..Connection::default()
    };
    count(ctx, netns, &decision, &connection);
    i32::from(decision.enforced() != verdict::DENY)
}

/// [`path_hash`] and name of the path a unix socket connects or sends to,
/// from its address ([`unix_address`]).
#[inline(always)]
fn unix_path((address, len): (u64, u32)) -> Option<(u64, UnixPathName)> {
    // `sun_path`, after the 2-byte family, read into the name's words (on
    // the stack: a per-CPU buffer could be another task's on this CPU once
    // this one is preempted).
    let mut name = UnixPathName { words: [0; 14] };
    // SAFETY: the helper checks the source; 108 of the words' 112 bytes.
    let failed = unsafe {
        generated::bpf_probe_read_kernel(
            name.words.as_mut_ptr().cast(),
            UNIX_PATH_MAX as u32,
            (address + 2) as *const _,
        )
    };
    if failed != 0 {
        return None;
    }
    // SAFETY: the words' first 108 bytes.
    let bytes = unsafe { &*name.words.as_ptr().cast::<[u8; UNIX_PATH_MAX]>() };
    let len = (len as usize).saturating_sub(2).min(UNIX_PATH_MAX);
    let (hash, end) = path_hash_end(bytes, len);
    name_words(&mut name.words, end);
    Some((hash, name))
}

/// The kernel's copy of the `sockaddr_un` the hook is about, and its
/// length: the hook's context is the kernel's `struct bpf_sock_addr_kern`,
/// whose address the program may read (its fields for unix sockets are not
/// in the context the verifier lets a program load from).
#[inline(always)]
fn unix_address(ctx: &SockAddrContext) -> Option<(u64, u32)> {
    let o = crate::ipc::offsets();
    let context = ctx.sock_addr as u64;
    let address: u64 = crate::ipc::read(context, o.sock_addr_uaddr)?;
    let len: u32 = crate::ipc::read(context, o.sock_addr_uaddrlen)?;
    Some((address, len))
}

/// The network namespace cookie of the hook's socket.
#[inline(always)]
fn netns_of(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper valid for cgroup sock_addr programs.
    unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }
}
