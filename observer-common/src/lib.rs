//! Types shared by the eBPF programs and the daemon.
//!
//! Every type at the top level is a map key or value: `#[repr(C)]`,
//! fixed-width fields, explicit padding (padding bytes in a hash key must be
//! zero or lookups miss), no `bool`, `Option` or enum, and a compile-time size
//! check. With the `inventory` feature, [`inventory`] adds the local-mode
//! inventory format (std and serde; never in the eBPF build).
#![cfg_attr(not(feature = "inventory"), no_std)]

#[cfg(feature = "inventory")]
pub mod inventory;

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

/// Name of the flow map in the eBPF object.
pub const FLOWS_MAP: &str = "FLOWS";
/// Name of the per-CPU datapath statistics map in the eBPF object.
pub const STATS_MAP: &str = "STATS";
/// Name of the Service map: [`ServiceKey`] to a Service id (`u32`).
pub const SERVICES_MAP: &str = "SERVICES";
/// Name of the LPM trie of addresses: key `(prefix length, [u8; 16])`, value
/// [`CidrValue`].
pub const CIDRS_MAP: &str = "CIDRS";
/// Name of the program array holding the shared classifier.
pub const CLASSIFIER_MAP: &str = "CLASSIFIER";
/// Name of the shared classifier program.
pub const CLASSIFIER_PROGRAM: &str = "classify_flow";
/// Name of the one-element array holding the classification generation.
pub const GENERATION_MAP: &str = "GENERATION";
/// Capacity of the Service map (Service ports).
pub const SERVICES_CAPACITY: u32 = 16_384;
/// Capacity of the address trie (pods, nodes and ranges).
pub const CIDRS_CAPACITY: u32 = 65_536;
/// Name of the global that tells a program instance its namespace.
pub const NETNS_COOKIE_GLOBAL: &str = "NETNS_COOKIE";
/// Capacity the flow map is built with; the daemon may resize it before load.
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;

/// The hook a packet was counted at, seen from the pod.
pub mod direction {
    /// Sent by the pod: `eth0` egress, and all loopback traffic (counted at
    /// `lo` egress only, so each loopback packet is counted once).
    pub const EGRESS: u8 = 0;
    /// Received by the pod on `eth0`.
    pub const INGRESS: u8 = 1;
}

/// Network-layer family of a flow.
pub mod family {
    /// Not IP (ARP, ...): addresses, ports and protocol are zero.
    pub const OTHER: u8 = 0;
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// The interface a flow was seen on.
pub mod interface {
    /// The pod's `lo` (ifindex 1 in every namespace).
    pub const LOOPBACK: u8 = 0;
    /// The pod's `eth0`.
    pub const POD: u8 = 1;
}

/// One flow as seen at one hook of one pod network namespace. 48 bytes: the
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
    /// IP protocol number (6 TCP, 17 UDP, ...).
    pub protocol: u8,
    /// One of [`direction`].
    pub direction: u8,
    /// One of [`family`].
    pub family: u8,
    /// One of [`interface`].
    pub interface: u8,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);

/// Traffic classes, decided in the kernel when a flow is first seen.
pub mod class {
    pub const UNKNOWN: u8 = 0;
    /// On the pod's `lo`: container to container inside the pod.
    pub const LOCALHOST: u8 = 1;
    /// To or from another pod's IP (any node).
    pub const POD: u8 = 2;
    /// To a Service ClusterIP (seen before kube-proxy's DNAT), and its replies.
    pub const SERVICE: u8 = 3;
    /// To or from a node's own address.
    pub const NODE: u8 = 4;
    /// Everything else.
    pub const EXTERNAL: u8 = 5;
}

/// Which end of a flow is the server (owns the listening socket).
pub mod server {
    /// Not decidable in the kernel (both ends have bound UDP sockets, say).
    pub const UNKNOWN: u8 = 0;
    /// The packet's source is the server: a response.
    pub const SOURCE: u8 = 1;
    /// The packet's destination is the server: a request.
    pub const DESTINATION: u8 = 2;
}

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
    pub connections: u64,
    /// On `lo`: cgroup v2 id of the sending socket (the sending container);
    /// 0 for packets without a socket, and on `eth0`.
    pub src_cgroup: u64,
    /// On `lo`: the sending cgroup of the reverse flow, which is this flow's
    /// receiver; 0 until the reverse flow exists.
    pub peer_cgroup: u64,
    /// The Service (class SERVICE), pod or node (POD, NODE) the peer is, as
    /// numbered by the daemon; 0 when unknown.
    pub peer_id: u32,
    /// [`GENERATION_MAP`] value the classification was made with.
    pub generation: u32,
    /// One of [`class`].
    pub class: u8,
    /// One of [`server`].
    pub server: u8,
    /// [`verdict::DENY`]: an inbound connection a policy denies; its packets
    /// are dropped at `eth0` ingress. 0 otherwise.
    pub verdict: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 56);

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

/// Value of [`CIDRS_MAP`], an LPM trie over 16-byte addresses: pod CIDRs and
/// the Service range (id 0), pod and node addresses (/128, with their id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrValue {
    /// One of [`class`].
    pub class: u8,
    pub _pad: [u8; 3],
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<CidrValue>() == 8);

/// Per-CPU datapath statistics (index 0 of [`STATS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathStats {
    /// New flow entries inserted. Inserted minus live entries (minus entries
    /// the daemon removed) is what the LRU evicted.
    pub flows_created: u64,
    /// Packets not counted because the flow could not be inserted.
    pub flow_insert_failed: u64,
    /// Packets not counted because the shared classifier could not be
    /// tail-called (it is not loaded).
    pub classify_failed: u64,
}
const _: () = assert!(core::mem::size_of::<DatapathStats>() == 24);

/// Pod network namespace cookie to the pod's compiled policy
/// ([`PodPolicy`]), read by the cgroup socket hooks.
pub const POLICIES_MAP: &str = "POLICIES";
/// Members of rule sets ([`MemberKey`]): client containers, peer pods.
pub const POLICY_MEMBERS_MAP: &str = "POLICY_MEMBERS";
/// CIDRs of rule sets: an LPM trie over the set id (big-endian) followed by
/// the IPv4 address, 8 bytes.
pub const POLICY_CIDRS_MAP: &str = "POLICY_CIDRS";
pub const POLICY_CIDRS_CAPACITY: u32 = 16_384;
/// Per (pod, rule, verdict, class), connections decided ([`VerdictKey`]).
pub const VERDICTS_MAP: &str = "VERDICTS";
pub const POLICIES_CAPACITY: u32 = 4_096;
pub const POLICY_MEMBERS_CAPACITY: u32 = 65_536;
pub const VERDICTS_CAPACITY: u32 = 65_536;
/// Rules per pod the kernel tries (all policies selecting it, in order).
pub const MAX_POD_RULES: usize = 16;

/// A verdict.
pub mod verdict {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// Denied by an `audit` policy: counted, let through.
    pub const AUDIT_DENY: u8 = 3;
}

/// What a rule's set holds, and how it matches.
pub mod set_kind {
    pub const NONE: u8 = 0;
    /// The client container's cgroup is in the set.
    pub const CLIENTS: u8 = 1;
    /// The client container's cgroup is not in the set.
    pub const NOT_CLIENTS: u8 = 2;
    /// The peer pod's id is in the set.
    pub const PEERS: u8 = 3;
    /// The destination address is in one of the set's CIDRs.
    pub const CIDRS: u8 = 4;
}

/// One compiled rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// One of [`class`]; [`class::UNKNOWN`] for any.
    pub class: u8,
    /// An IP protocol number; 0 for any.
    pub protocol: u8,
    /// [`verdict::ALLOW`] or [`verdict::DENY`].
    pub action: u8,
    /// 1 in an `audit` policy: a deny is counted, not enforced.
    pub audit: u8,
    /// Server ports, inclusive, host byte order.
    pub port_first: u16,
    pub port_last: u16,
    /// The Service's id for Service rules; 0 for any.
    pub service: u32,
    /// The rule's set in [`POLICY_MEMBERS_MAP`], if `set_kind` says so.
    pub set: u32,
    /// One of [`set_kind`].
    pub set_kind: u8,
    /// [`direction::EGRESS`] (decided at `connect()`; localhost too) or
    /// [`direction::INGRESS`] (decided at `eth0` ingress).
    pub direction: u8,
    pub _pad: [u8; 2],
    /// Names the rule in [`VERDICTS_MAP`] (the daemon maps it to names).
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyRule>() == 24);

/// A pod's compiled policy: its rules in the order they are tried, and what
/// happens when none matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    pub rules: u32,
    /// What no egress rule matches: [`verdict::ALLOW`] (no policy has a
    /// say) or [`verdict::DENY`].
    pub default_action: u8,
    pub default_audit: u8,
    /// The same for inbound connections.
    pub default_ingress_action: u8,
    pub default_ingress_audit: u8,
    /// Name the defaults in [`VERDICTS_MAP`].
    pub default_id: u32,
    pub default_ingress_id: u32,
    pub rule: [PolicyRule; MAX_POD_RULES],
}
const _: () = assert!(core::mem::size_of::<PodPolicy>() == 16 + 24 * MAX_POD_RULES);

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

/// Key of [`VERDICTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub netns_cookie: u64,
    /// [`PolicyRule::id`] or [`PodPolicy::default_id`].
    pub rule: u32,
    /// One of [`verdict`].
    pub verdict: u8,
    /// One of [`class`].
    pub class: u8,
    /// One of [`direction`].
    pub direction: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VerdictKey>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::CidrValue {}
    unsafe impl aya::Pod for super::DatapathStats {}
    unsafe impl aya::Pod for super::PodPolicy {}
    unsafe impl aya::Pod for super::MemberKey {}
    unsafe impl aya::Pod for super::VerdictKey {}
}
