//! The map types of the lab's socket load balancer, shared by its programs
//! (`main.rs`) and the lab that fills the maps.
#![no_std]

/// Name of the Service map: [`ServiceKey`] to [`Backends`].
pub const SERVICES_MAP: &str = "LB_SERVICES";
/// Name of the per-socket translation map: socket cookie to [`Translation`].
pub const SOCKETS_MAP: &str = "LB_SOCKETS";
/// Backends a Service may have here.
pub const MAX_BACKENDS: usize = 8;
/// The programs, and where each attaches.
pub const PROGRAMS: [&str; 4] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
];

/// A ClusterIP (network order), port (host order) and IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// A Service's backends: addresses (network order) and ports (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    pub count: u32,
    pub addrs: [u32; MAX_BACKENDS],
    pub ports: [u16; MAX_BACKENDS],
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Backends>() == 56);

/// What `connect()` or `sendmsg()` of a socket was translated from and to,
/// for the reverse translation of `getpeername()` and `recvmsg()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub service_addr: u32,
    pub backend_addr: u32,
    pub service_port: u16,
    pub backend_port: u16,
}
const _: () = assert!(core::mem::size_of::<Translation>() == 12);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Backends {}
    unsafe impl aya::Pod for super::Translation {}
}
