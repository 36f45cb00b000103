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

/// Name of the flow map in the eBPF object.
pub const FLOWS_MAP: &str = "FLOWS";
/// Name of the per-CPU datapath statistics map in the eBPF object.
pub const STATS_MAP: &str = "STATS";
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

/// One flow as seen at one hook of one pod network namespace.
///
/// Addresses are 16 bytes: IPv4 as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`). Ports are in host byte order and zero where the
/// protocol has none (or the packet is a non-first fragment).
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
    /// Interface index inside the pod's namespace (1 is always `lo`).
    pub if_index: u32,
    /// IP protocol number (6 TCP, 17 UDP, ...).
    pub protocol: u8,
    /// One of [`direction`].
    pub direction: u8,
    /// One of [`family`].
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 56);

/// Counters of one flow, updated with atomic adds by every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub packets: u64,
    /// Bytes as seen at the hook, link-layer header included.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCounters>() == 16);

/// Per-CPU datapath statistics (index 0 of [`STATS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathStats {
    /// New flow entries inserted. Inserted minus live entries (minus entries
    /// the daemon removed) is what the LRU evicted.
    pub flows_created: u64,
    /// Packets not counted because the flow could not be inserted.
    pub flow_insert_failed: u64,
}
const _: () = assert!(core::mem::size_of::<DatapathStats>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowCounters {}
    unsafe impl aya::Pod for super::DatapathStats {}
}
