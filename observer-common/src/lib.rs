//! Shared by the eBPF programs and the daemon:
//!
//! - the vocabulary: class, direction, protocol and verdict numbers and the
//!   words users see for them ([`vocabulary`]);
//! - the kernel maps' names, keys and values ([`maps`]), and those of
//!   unix-socket and named-pipe traffic ([`ipc`]);
//! - the two decisions both sides must make alike: how the other end of a
//!   connection is classified ([`classify`]) and how a pod's rules decide a
//!   connection ([`policy`]). The kernel runs them on its maps, the daemon
//!   (`observer policy explain`) on their contents in memory.
//!
//! With the `inventory` feature, [`inventory`] adds the local-mode inventory
//! format (std and serde; never in the eBPF build).
#![cfg_attr(not(feature = "inventory"), no_std)]

pub mod classify;
#[cfg(feature = "inventory")]
pub mod inventory;
pub mod ipc;
pub mod maps;
pub mod policy;
pub mod vocabulary;

pub use maps::*;
pub use policy::set_kind;
pub use vocabulary::*;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::CachedFlow {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::CidrValue {}
    unsafe impl aya::Pod for super::DatapathStats {}
    unsafe impl aya::Pod for super::PodPolicy {}
    unsafe impl aya::Pod for super::MemberKey {}
    unsafe impl aya::Pod for super::VerdictKey {}
    unsafe impl aya::Pod for super::UnixPolicyKey {}
    unsafe impl aya::Pod for super::UnixVerdict {}
    unsafe impl aya::Pod for super::UnixPathName {}
    unsafe impl aya::Pod for super::SocketInfo {}
    unsafe impl aya::Pod for super::NodeInfo {}
    unsafe impl aya::Pod for super::OverflowKey {}
    unsafe impl aya::Pod for super::OverflowValue {}
    unsafe impl aya::Pod for super::ipc::UnixConnKey {}
    unsafe impl aya::Pod for super::ipc::Addressed {}
    unsafe impl aya::Pod for super::ipc::RetiredKey {}
    unsafe impl aya::Pod for super::ipc::UnixConn {}
    unsafe impl aya::Pod for super::ipc::UnixPath {}
    unsafe impl aya::Pod for super::ipc::UnixPathKey {}
    unsafe impl aya::Pod for super::ipc::FifoId {}
    unsafe impl aya::Pod for super::ipc::FifoKey {}
    unsafe impl aya::Pod for super::ipc::FifoName {}
    unsafe impl aya::Pod for super::ipc::IpcCounts {}
    unsafe impl aya::Pod for super::ipc::KernelOffsets {}
}
