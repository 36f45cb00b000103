//! The kernel side as the daemon sees it: loading the eBPF programs
//! ([`datapath`]), attaching them in pod network namespaces and on pod
//! cgroups ([`attach`], [`netns`], [`tc`]), the shared maps' pins ([`bpffs`]), and
//! what the daemon writes into the maps ([`class_maps`], [`policy_maps`]),
//! the per-CPU flow cache's flush before the collector reads ([`flow_cache`]),
//! and the unix-socket and named-pipe programs, with the kernel structure
//! offsets they read at ([`ipc`], [`btf`]), and the unix-socket policy
//! hooks, which aya cannot load ([`unix_hooks`]).

pub mod attach;
pub mod bpf;
pub mod bpffs;
pub mod btf;
pub mod class_maps;
pub mod datapath;
pub mod flow_cache;
pub mod ipc;
pub mod log;
pub mod netns;
pub mod policy_maps;
pub mod sockets;
pub mod tc;
pub mod unix_hooks;
