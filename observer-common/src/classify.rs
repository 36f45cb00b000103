//! How the other end of a pod's connection is classified. One description,
//! run by the tc classifier (for flows on `eth0`), by the socket hooks (for
//! a connection's destination, before any translation) and by `observer
//! policy explain`; each reads the same maps through [`ClassMaps`].

use crate::{CidrValue, ServiceKey, class};

/// The classification maps, as each side reads them: the kernel's maps in
/// the programs, their contents in memory in the daemon.
pub trait ClassMaps {
    /// The Service id of a ClusterIP, port and protocol ([`crate::SERVICES_MAP`]).
    fn service(&self, key: &ServiceKey) -> Option<u32>;
    /// The longest prefix of the address trie ([`crate::CIDRS_MAP`]) that
    /// holds `addr`.
    fn address(&self, addr: &[u8; 16]) -> Option<CidrValue>;
}

/// What the other end of a connection is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// One of [`crate::class`].
    pub class: u8,
    /// The Service (class SERVICE), pod or node (POD, NODE) as the daemon
    /// numbers them; 0 when not known (an address in a pod CIDR or the
    /// Service range that no pod or Service has).
    pub id: u32,
}

/// Classifies the destination of a connection a pod opens: `addr:port`
/// over `protocol`, where `addr` is 16 bytes (IPv4-mapped for IPv4). A
/// loopback address is `localhost`; any other is the [`remote`] end.
#[inline(always)]
pub fn destination(maps: &impl ClassMaps, addr: [u8; 16], port: u16, protocol: u8) -> Peer {
    if is_loopback(&addr) {
        return Peer {
            class: class::LOCALHOST,
            id: 0,
        };
    }
    remote(maps, addr, port, protocol)
}

/// Classifies the other end of a pod's traffic on `eth0` (where loopback
/// addresses never appear): the first step that matches decides.
///
/// 1. a Service's ClusterIP, port and protocol: `service`, that Service;
/// 2. an address in the trie: the trie's class and id (a pod or node
///    address, or a pod CIDR or the Service range without an id);
/// 3. anything else: `external`.
#[inline(always)]
pub fn remote(maps: &impl ClassMaps, addr: [u8; 16], port: u16, protocol: u8) -> Peer {
    if let Some(id) = maps.service(&ServiceKey::new(addr, port, protocol)) {
        return Peer {
            class: class::SERVICE,
            id,
        };
    }
    match maps.address(&addr) {
        Some(value) => Peer {
            class: value.class,
            id: value.id,
        },
        None => Peer {
            class: class::EXTERNAL,
            id: 0,
        },
    }
}

/// `127.0.0.0/8` (IPv4-mapped) or `::1`. Word by word: in the kernel each
/// comparison is a branch the verifier follows.
#[inline(always)]
pub fn is_loopback(addr: &[u8; 16]) -> bool {
    let word = |i: usize| u32::from_be_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let (a, b, c, d) = (word(0), word(4), word(8), word(12));
    a == 0 && b == 0 && ((c == 0xffff && d >> 24 == 127) || (c == 0 && d == 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4_mapped;

    struct Maps;
    impl ClassMaps for Maps {
        fn service(&self, key: &ServiceKey) -> Option<u32> {
            (key.addr == ipv4_mapped([10, 96, 0, 10]) && key.port == 80 && key.protocol == 6)
                .then_some(7)
        }
        fn address(&self, addr: &[u8; 16]) -> Option<CidrValue> {
            (addr[12] == 10).then_some(CidrValue::new(class::POD, 0))
        }
    }

    #[test]
    fn the_first_step_that_matches_decides() {
        let remote = |a, port, protocol| destination(&Maps, ipv4_mapped(a), port, protocol);
        assert_eq!(remote([127, 0, 0, 1], 80, 6).class, class::LOCALHOST);
        assert_eq!(
            remote([10, 96, 0, 10], 80, 6),
            Peer {
                class: class::SERVICE,
                id: 7
            }
        );
        // Another port or protocol of the ClusterIP is not the Service.
        assert_eq!(remote([10, 96, 0, 10], 80, 17).class, class::POD);
        assert_eq!(remote([10, 96, 0, 10], 81, 6).class, class::POD);
        assert_eq!(remote([192, 0, 2, 1], 80, 6).class, class::EXTERNAL);
        let mut v6_loopback = [0; 16];
        v6_loopback[15] = 1;
        assert!(is_loopback(&v6_loopback));
    }
}
