//! The kernel maps both sides use: names, capacities, keys and values.
//!
//! Every key and value is `#[repr(C)]` with fixed-width fields, explicit
//! padding (padding bytes in a hash key must be zero or lookups miss), no
//! `bool`, `Option` or enum, and a compile-time size check.

/// The version of what the shared maps mean. Maps pinned on a node
/// (`--pin-dir`) by an observer of another version are not taken over:
/// bump it when a key or value changes its meaning without changing its
/// size (a size change is noticed anyway).
pub const LAYOUT_VERSION: u32 = 1;

/// Name of the flow map ([`FlowKey`] to [`FlowValue`]).
pub const FLOWS_MAP: &str = "FLOWS";
/// Capacity the flow map is built with; the daemon may resize it before load.
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;
/// Name of the map of packets whose flow did not fit in the flow map
/// ([`OverflowKey`] to [`OverflowValue`]): counted per pod, interface and
/// direction, not classified; nothing is lost.
pub const OVERFLOW_MAP: &str = "OVERFLOW";
/// Capacity of the overflow map: a few hooks for each pod.
pub const OVERFLOW_CAPACITY: u32 = 16_384;

/// Key of [`OVERFLOW_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverflowKey {
    pub netns_cookie: u64,
    /// One of [`crate::interface`].
    pub interface: u8,
    /// One of [`crate::direction`].
    pub direction: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<OverflowKey>() == 16);

/// Value of [`OVERFLOW_MAP`]: what [`FlowValue`] counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverflowValue {
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}
const _: () = assert!(core::mem::size_of::<OverflowValue>() == 24);

/// Name of the per-CPU datapath statistics map ([`DatapathStats`]).
pub const STATS_MAP: &str = "STATS";
/// A per-CPU slot for a flow the flow map had no room for, while its
/// inbound connection is decided.
pub const UNSTORED_MAP: &str = "UNSTORED";
/// Name of the Service map: [`ServiceKey`] to a Service id (`u32`).
pub const SERVICES_MAP: &str = "SERVICES";
/// Capacity of the Service map (Service ports).
pub const SERVICES_CAPACITY: u32 = 16_384;
/// Name of the LPM trie of addresses: key `(prefix length, [u8; 16])`, value
/// [`CidrValue`].
pub const CIDRS_MAP: &str = "CIDRS";
/// Capacity of the address trie (pods, nodes and ranges).
pub const CIDRS_CAPACITY: u32 = 65_536;
/// Name of the one-element array holding the classification generation.
pub const GENERATION_MAP: &str = "GENERATION";
/// Name of the program array of the shared programs, by [`tail`] index.
pub const CLASSIFIER_MAP: &str = "CLASSIFIER";

/// The shared programs, loaded and verified once, tail-called by each
/// pod's per-packet programs and by each other: their names, in the order
/// of their index in [`CLASSIFIER_MAP`].
pub mod tail {
    /// Counts and classifies a new flow (or one of an older generation).
    pub const CLASSIFY: u32 = 0;
    /// Decides an inbound connection of a pod with a policy.
    pub const DECIDE: u32 = 1;
    /// Logs a classified flow (diagnostics on).
    pub const LOG: u32 = 2;
    pub const SLOTS: u32 = 3;
    pub const PROGRAMS: [&str; SLOTS as usize] = ["classify_flow", "decide_ingress", "log_flow"];
}

/// Name of the global that tells a program instance its namespace.
pub const NETNS_COOKIE_GLOBAL: &str = "NETNS_COOKIE";

/// Pod network namespace cookie to the pod's compiled policy
/// ([`PodPolicy`]), read by the cgroup socket hooks.
pub const POLICIES_MAP: &str = "POLICIES";
pub const POLICIES_CAPACITY: u32 = 4_096;
/// Members of rule sets ([`MemberKey`]): client containers, peer pods.
pub const POLICY_MEMBERS_MAP: &str = "POLICY_MEMBERS";
pub const POLICY_MEMBERS_CAPACITY: u32 = 65_536;
/// CIDRs of rule sets: an LPM trie over [`policy_cidr_key`].
pub const POLICY_CIDRS_MAP: &str = "POLICY_CIDRS";
pub const POLICY_CIDRS_CAPACITY: u32 = 16_384;
/// The node's own processes, whose connections to pods are not subject to
/// ingress rules (the kubelet's probes): one [`NodeInfo`].
pub const NODE_MAP: &str = "NODE";
/// Per (pod, rule, verdict, class), connections decided ([`VerdictKey`]).
/// A plain hash map: an entry stays until the daemon has counted it and
/// takes it out (its pod gone, or its rule retired).
pub const VERDICTS_MAP: &str = "VERDICTS";
pub const VERDICTS_CAPACITY: u32 = 65_536;
/// Unix-socket policy: what a pod's `class: unix` rules decide for a
/// client container and a path ([`UnixPolicyKey`] to [`UnixVerdict`]).
/// The daemon decides every pair the rules can tell apart; the kernel looks
/// the answer up at `connect()` and `sendmsg()` of a unix socket.
pub const UNIX_POLICY_MAP: &str = "UNIX_POLICY";
pub const UNIX_POLICY_CAPACITY: u32 = 16_384;
/// The paths pods' unix rules name, whole ([`crate::ipc::UnixPathKey`] to
/// [`UnixPathName`]): a client's path is the one a rule names only if its
/// bytes are, so that no other name with the same 64-bit hash passes for
/// it. A pod's named paths are fewer than its decisions: the decisions'
/// capacity bounds them.
pub const UNIX_POLICY_PATHS_MAP: &str = "UNIX_POLICY_PATHS";
/// Rules per pod the kernel tries (all policies selecting it, in order).
pub const MAX_POD_RULES: usize = 64;

/// Address bytes of an IPv4 address as flows carry it: `::ffff:a.b.c.d`.
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    let mut addr = [0; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12] = octets[0];
    addr[13] = octets[1];
    addr[14] = octets[2];
    addr[15] = octets[3];
    addr
}

/// One flow as seen at one hook of one pod network namespace (a key of
/// [`FLOWS_MAP`], a plain hash map: a flow stays until the daemon has
/// counted it to its last packet and removes it). 48 bytes: the
/// kernel hashes the whole key for every packet.
///
/// Addresses are 16 bytes: IPv4 as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), in network byte order. Ports are in host byte order
/// and zero where the protocol has none (or the packet is a non-first
/// fragment).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`), from the
    /// program instance attached there: tells pods apart although every `lo`
    /// is ifindex 1 and many `eth0` share an index.
    pub netns_cookie: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol number ([`crate::protocol`]).
    pub protocol: u8,
    /// One of [`crate::direction`].
    pub direction: u8,
    /// One of [`crate::family`].
    pub family: u8,
    /// One of [`crate::interface`].
    pub interface: u8,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);

/// Name of the per-CPU flow cache ([`CachedFlow`] by slot): the flows a
/// CPU saw last, counted with plain adds and no call, and moved into the
/// flow map by [`FLUSH_PROGRAM`] on each CPU before the daemon reads it.
pub const FLOW_CACHE_MAP: &str = "FLOW_CACHE";
/// Slots of the flow cache, per CPU: a flow's slot is the top
/// [`FLOW_CACHE_BITS`] bits of its key's hash.
pub const FLOW_CACHE_BITS: u32 = 11;
pub const FLOW_CACHE_SLOTS: u32 = 1 << FLOW_CACHE_BITS;
/// Name of the program that moves one CPU's cached counts into the flow
/// map (run by the daemon on each CPU, with `BPF_PROG_TEST_RUN`).
pub const FLUSH_PROGRAM: &str = "flush_flow_cache";

/// One slot of [`FLOW_CACHE_MAP`]: a flow of the flow map whose counters a
/// CPU keeps here for a while (each CPU has its own slots, so no atomic
/// add), and the flow's verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: FlowKey,
    /// Counted since the counts last moved into the flow map.
    pub packets: u64,
    pub bytes: u64,
    /// The generation ([`GENERATION_MAP`]) the flow was classified under:
    /// the slot is used only while it is current.
    pub generation: u32,
    /// 1 while the slot holds a flow.
    pub valid: u8,
    /// 1 while this CPU's tc program updates the slot: the flush, which
    /// may interrupt it, leaves the slot for the next time.
    pub busy: u8,
    /// The flow's verdict ([`FlowValue::verdict`]).
    pub verdict: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<CachedFlow>() == 72);

/// What the kernel knows of one flow: counters (updated with atomic adds by
/// every CPU) and the flow's classification (written when it is first seen,
/// and again when the daemon changes the classification maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub packets: u64,
    /// Bytes as seen at the hook, link-layer header included.
    pub bytes: u64,
    /// TCP connections opened: SYNs without ACK, sent by the client.
    pub connections: u32,
    /// The sequence number of the last SYN decided as an inbound
    /// connection: a SYN with another one is a new connection on the same
    /// addresses and ports (decided, and counted, again), one with the same
    /// is a retransmission.
    pub syn_seq: u32,
    /// cgroup v2 id of the sending socket's container, on egress (`lo` and
    /// `eth0`); 0 for packets without a socket, and on ingress.
    pub src_cgroup: u64,
    /// cgroup v2 id of the receiving socket's container (`lo`, and `eth0`
    /// ingress), from the socket's storage ([`SOCKETS_MAP`]), or on `lo`
    /// from the reverse flow; 0 where unknown.
    pub dst_cgroup: u64,
    /// The Service (class SERVICE), pod or node (POD, NODE) the peer is, as
    /// numbered by the daemon; 0 when unknown.
    pub peer_id: u32,
    /// [`GENERATION_MAP`] value the classification was made with (one
    /// less than the current one, so never current, for a flow that waits
    /// for a listener: [`flow_flags::AWAITS_LISTENER`]).
    pub generation: u32,
    /// Where a redirected connection was going (a sidecar's `REDIRECT` to
    /// a local proxy): the original destination's peer id, port and class,
    /// from the client socket's storage; class 0 otherwise.
    pub orig_peer_id: u32,
    pub orig_port: u16,
    /// The server's port as the server's socket has it (behind a NAT the
    /// packet's ports may say otherwise); 0: tell from the packet.
    pub server_port: u16,
    /// One of [`crate::class`].
    pub class: u8,
    /// One of [`crate::server`].
    pub server: u8,
    /// [`crate::verdict::DENY`]: an inbound connection a policy denies; its
    /// packets are dropped at `eth0` ingress. 0 otherwise.
    pub verdict: u8,
    /// One of [`crate::class`]: the original destination's (see
    /// [`FlowValue::orig_peer_id`]).
    pub orig_class: u8,
    /// [`flow_flags`].
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Bits of [`FlowValue::flags`].
pub mod flow_flags {
    /// The class and peer are the local socket's original destination (a
    /// translation may hide it from the packets): the reverse flow, whose
    /// packets come back translated, takes them too.
    pub const DECIDED_AT_SOCKET: u8 = 1;
    /// UDP to a pod with a policy where no socket had the port: classified
    /// and decided again at the next packet.
    pub const AWAITS_LISTENER: u8 = 2;
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 64);

/// Name of the socket storage map: a [`SocketInfo`] for each socket of a
/// pod's that bound, connected or sent to an address.
pub const SOCKETS_MAP: &str = "SOCKETS";

/// What the socket hooks on a pod's cgroup learned of one of its sockets,
/// kept in the socket's own storage (it goes with the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketInfo {
    /// The cgroup v2 id of the process that bound or connected it: its
    /// container.
    pub cgroup: u64,
    /// The destination the process gave `connect()` or `sendmsg()`, before
    /// any translation (a socket load balancer's, a DNAT's, a sidecar's
    /// redirect), IPv4-mapped; zero if none yet.
    pub orig_addr: [u8; 16],
    pub orig_port: u16,
    /// The original destination's class ([`crate::class`]); 0 if none.
    pub orig_class: u8,
    /// [`socket_flags`].
    pub flags: u8,
    /// The original destination's peer id ([`crate::classify::Peer::id`]).
    pub orig_peer: u32,
}
const _: () = assert!(core::mem::size_of::<SocketInfo>() == 32);

/// Bits of [`SocketInfo::flags`].
pub mod socket_flags {
    /// The process bound it to an address of its choosing (`bind()`): a
    /// server's socket. (A client's gets its port when it connects or
    /// sends.) For UDP, where both ends are bound sockets, this tells the
    /// server.
    pub const BOUND: u8 = 1;
    /// Seeded by the daemon for a socket made before the hooks were
    /// attached: whether its process bound it is not known.
    pub const SEEDED: u8 = 2;
}

/// Key of [`SERVICES_MAP`]: a ClusterIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4-mapped for IPv4, like flow addresses.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);

impl ServiceKey {
    pub const fn new(addr: [u8; 16], port: u16, protocol: u8) -> Self {
        Self {
            addr,
            port,
            protocol,
            _pad: [0; 5],
        }
    }
}

/// Value of [`CIDRS_MAP`], an LPM trie over 16-byte addresses: pod CIDRs and
/// the Service range (id 0), pod and node addresses (/128, with their id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrValue {
    /// One of [`crate::class`].
    pub class: u8,
    pub _pad: [u8; 3],
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<CidrValue>() == 8);

impl CidrValue {
    pub const fn new(class: u8, id: u32) -> Self {
        Self {
            class,
            _pad: [0; 3],
            id,
        }
    }
}

/// Per-CPU datapath statistics (index 0 of [`STATS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathStats {
    /// New flow entries inserted.
    pub flows_created: u64,
    /// Packets not counted because neither the flow map nor the overflow
    /// map had room.
    pub flow_insert_failed: u64,
    /// Packets not counted because the shared classifier could not be
    /// tail-called (it is not loaded).
    pub classify_failed: u64,
    /// Policy decisions not counted because the verdict map had no room.
    pub verdicts_lost: u64,
    /// Unix-socket messages and pipe reads or writes not counted because
    /// their map had no room.
    pub ipc_lost: u64,
}
const _: () = assert!(core::mem::size_of::<DatapathStats>() == 40);

/// One compiled rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// Names the rule in [`VERDICTS_MAP`] (the daemon maps it to names).
    pub id: u32,
    /// What [`PolicyRule::set_kind`] says: a set in [`POLICY_MEMBERS_MAP`] or
    /// [`POLICY_CIDRS_MAP`], or a Service id.
    pub set: u32,
    /// Server ports, inclusive, host byte order.
    pub port_first: u16,
    pub port_last: u16,
    /// One of [`crate::class`]; [`crate::class::UNKNOWN`] for any.
    pub class: u8,
    /// An IP protocol number; 0 for any.
    pub protocol: u8,
    /// [`crate::verdict::ALLOW`] or [`crate::verdict::DENY`].
    pub action: u8,
    /// 1 in an `audit` policy: a deny is counted, not enforced.
    pub audit: u8,
    /// One of [`crate::policy::set_kind`].
    pub set_kind: u8,
    /// [`crate::direction::EGRESS`] (decided at `connect()`; localhost too)
    /// or [`crate::direction::INGRESS`] (decided at `eth0` ingress).
    pub direction: u8,
    pub _pad: [u8; 2],
    /// A rule that names client containers: what names its decision when
    /// the client is a cgroup the observer has not named (yet), which it
    /// denies (see [`crate::policy::KNOWN_CONTAINERS`]).
    pub unknown_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyRule>() == 24);

impl PolicyRule {
    /// No rule (what [`Default`] gives, in a constant).
    pub const ZERO: Self = Self {
        id: 0,
        set: 0,
        port_first: 0,
        port_last: 0,
        class: 0,
        protocol: 0,
        action: 0,
        audit: 0,
        set_kind: 0,
        direction: 0,
        _pad: [0; 2],
        unknown_id: 0,
    };
}

/// A pod's compiled policy: its rules in the order they are tried, and what
/// happens when none matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub rules: u32,
    /// What no egress rule matches: [`crate::verdict::ALLOW`] (no policy
    /// has a say) or [`crate::verdict::DENY`].
    pub default_action: u8,
    pub default_audit: u8,
    /// The same for inbound connections.
    pub default_ingress_action: u8,
    pub default_ingress_audit: u8,
    /// Name the defaults in [`VERDICTS_MAP`].
    pub default_id: u32,
    pub default_ingress_id: u32,
    /// The pod's address (IPv4-mapped), where its inbound flows arrive: a
    /// UDP server's answer is told by the inbound flow it answers.
    pub addr: [u8; 16],
    pub rule: [PolicyRule; MAX_POD_RULES],
}
const _: () = assert!(core::mem::size_of::<PodPolicy>() == 32 + 24 * MAX_POD_RULES);

impl Default for PodPolicy {
    fn default() -> Self {
        Self {
            rules: 0,
            default_action: 0,
            default_audit: 0,
            default_ingress_action: 0,
            default_ingress_audit: 0,
            default_id: 0,
            default_ingress_id: 0,
            addr: [0; 16],
            rule: [PolicyRule::ZERO; MAX_POD_RULES],
        }
    }
}

/// The one value of [`NODE_MAP`]: how a packet from a process of the node
/// itself is told from one forwarded through the node (NodePort or
/// LoadBalancer traffic SNAT-ed to a node address), which has no socket,
/// and from one a host-network pod sends (also from the node's address),
/// whose socket is in a pod's cgroup. While the pods' cgroup is unknown
/// (0), no packet is taken for the node's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The cgroup every pod's cgroup is under (`kubepods`), and its level
    /// in the hierarchy (the root is 0); 0: unknown.
    pub pods_cgroup: u64,
    pub pods_level: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NodeInfo>() == 16);

/// Key of [`POLICY_MEMBERS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemberKey {
    pub set: u32,
    pub _pad: u32,
    /// A cgroup id, or a peer id.
    pub member: u64,
}
const _: () = assert!(core::mem::size_of::<MemberKey>() == 16);

impl MemberKey {
    pub const fn new(set: u32, member: u64) -> Self {
        Self {
            set,
            _pad: 0,
            member,
        }
    }
}

/// Data of a [`POLICY_CIDRS_MAP`] key: the set id (big-endian, so that the
/// trie's prefix covers it) and a 16-byte address (IPv4-mapped for IPv4).
/// A CIDR `a/n` of set `s` is stored with prefix length `32 + n` for IPv6,
/// `32 + 96 + n` for IPv4.
pub const fn policy_cidr_key(set: u32, a: [u8; 16]) -> [u8; 20] {
    // Spelled out: a loop here would be a loop in the kernel's rule loop.
    let s = set.to_be_bytes();
    [
        s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
        a[11], a[12], a[13], a[14], a[15],
    ]
}

/// Key of [`UNIX_POLICY_MAP`]. A pod with `class: unix` rules has an entry
/// for each of its containers (by cgroup) and each path a rule names
/// (by [`crate::ipc::path_hash`]), and for "any other": cgroup 0 (a client
/// the observer has not named), path 0 (a path no rule names). The kernel
/// tries the client's cgroup and path, then the client with any other
/// path, then an unnamed client with the path, then with any other path.
/// Without the last entry the pod has no unix rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnixPolicyKey {
    /// The pod's network namespace cookie.
    pub netns: u64,
    pub cgroup: u64,
    pub path: u64,
}
const _: () = assert!(core::mem::size_of::<UnixPolicyKey>() == 24);

/// Value of [`UNIX_POLICY_MAP`]: the rule that decides, and its verdict
/// (one of [`crate::verdict`]); verdict 0: no rule decides (allowed, not
/// counted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnixVerdict {
    pub rule: u32,
    pub verdict: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<UnixVerdict>() == 8);

/// Value of [`UNIX_POLICY_PATHS_MAP`]: a path's `sun_path` bytes as the
/// kernel compares them: the name (a file path up to its first NUL, an
/// abstract name all of its length), then zeros, in 14 words.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixPathName {
    pub words: [u64; 14],
}
const _: () = assert!(core::mem::size_of::<UnixPathName>() == 112);

impl UnixPathName {
    /// The `sun_path` of `len` bytes in `path` (at most 108): its
    /// [`crate::ipc::path_hash`] and its name, as the kernel makes them of
    /// a client's (`observer-ebpf`'s `unix_path`).
    pub fn of(path: &[u8], len: usize) -> (u64, Self) {
        let mut name = Self { words: [0; 14] };
        // SAFETY: 112 bytes, the words' own.
        let bytes = unsafe { &mut *name.words.as_mut_ptr().cast::<[u8; 112]>() };
        let len = len.min(crate::ipc::UNIX_PATH_MAX).min(path.len());
        bytes[..len].copy_from_slice(&path[..len]);
        let sun_path = bytes[..crate::ipc::UNIX_PATH_MAX]
            .try_into()
            .expect("108 of 112 bytes");
        let (hash, end) = crate::ipc::path_hash_end(sun_path, len);
        crate::ipc::name_words(&mut name.words, end);
        (hash, name)
    }
}

/// Key of [`VERDICTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub netns_cookie: u64,
    /// [`PolicyRule::id`] or [`PodPolicy::default_id`].
    pub rule: u32,
    /// One of [`crate::verdict`].
    pub verdict: u8,
    /// One of [`crate::class`].
    pub class: u8,
    /// One of [`crate::direction`].
    pub direction: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VerdictKey>() == 16);
