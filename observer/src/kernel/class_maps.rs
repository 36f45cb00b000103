//! The classification maps: what they hold for an inventory
//! ([`ClassEntries`], a pure function of it), and keeping the kernel's maps
//! in step with that ([`ClassMapsWriter`]): the Service map, the address
//! trie, and the generation that tells the programs to classify live flows
//! again. Programs are never reloaded for this.

use std::collections::HashMap;

use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::Ipv4Net;
use observer_common::{
    CidrValue, ServiceKey, class, classify::ClassMaps, inventory::Inventory, ipv4_mapped,
};

use crate::names::{Ids, ObjectRef};

#[derive(Debug, thiserror::Error)]
pub enum ClassMapsError {
    #[error("updating the kernel's {map} map: {source}")]
    Update {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// The kernel's classification maps, shared by every program instance.
pub struct KernelClassMaps {
    pub services: BpfHashMap<MapData, ServiceKey, u32>,
    pub cidrs: LpmTrie<MapData, [u8; 16], CidrValue>,
    pub generation: Array<MapData, u32>,
}

/// What the classification maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassEntries {
    /// ClusterIP, port and protocol to the Service's id.
    pub services: HashMap<ServiceKey, u32>,
    /// (prefix length, address) of the trie to its class and id.
    pub cidrs: HashMap<(u32, [u8; 16]), CidrValue>,
}

impl ClassEntries {
    /// The entries for an inventory, with the ids [`Ids::update`] gave it.
    pub fn new(inventory: &Inventory, ids: &Ids) -> Self {
        let mut entries = Self::default();
        for service in &inventory.services {
            let Some(id) = ids
                .services
                .get(&ObjectRef::new(&service.namespace, &service.name))
            else {
                continue;
            };
            for port in &service.ports {
                let addr = ipv4_mapped(service.cluster_ip.octets());
                let key = ServiceKey::new(addr, port.port, port.protocol.number());
                entries.services.insert(key, id);
            }
        }
        if let Some(range) = inventory.service_cidr {
            entries.add(range, class::SERVICE, 0);
        }
        for cidr in &inventory.pod_cidrs {
            entries.add(*cidr, class::POD, 0);
        }
        for pod in &inventory.pods {
            let id = ids.pods.get(&ObjectRef::new(&pod.namespace, &pod.name));
            entries.add(pod.ip.into(), class::POD, id.unwrap_or(0));
        }
        for node in &inventory.nodes {
            let id = ids.nodes.get(&node.name).unwrap_or(0);
            entries.add(node.address.into(), class::NODE, id);
        }
        entries
    }

    /// Takes over the ids an earlier observer wrote into these entries (the
    /// kernel's maps, read back), for the pods, Services and nodes of
    /// `inventory` at the same addresses: flows and sockets that carry
    /// those ids keep naming the same peers. No other id already in the
    /// maps is handed out again.
    pub fn adopt_ids(&self, ids: &mut Ids, inventory: &Inventory) {
        let written = self;
        let at = |addr: std::net::Ipv4Addr, class: u8| {
            written
                .cidrs
                .get(&(128, ipv4_mapped(addr.octets())))
                .filter(|v| v.class == class)
                .map(|v| v.id)
        };
        for pod in &inventory.pods {
            if let Some(id) = at(pod.ip, class::POD) {
                ids.pods
                    .adopt(&ObjectRef::new(&pod.namespace, &pod.name), id);
            }
        }
        for node in &inventory.nodes {
            if let Some(id) = at(node.address, class::NODE) {
                ids.nodes.adopt(&node.name, id);
            }
        }
        for service in &inventory.services {
            let addr = ipv4_mapped(service.cluster_ip.octets());
            let id = service.ports.iter().find_map(|p| {
                let key = ServiceKey::new(addr, p.port, p.protocol.number());
                written.services.get(&key).copied()
            });
            if let Some(id) = id {
                let service = ObjectRef::new(&service.namespace, &service.name);
                ids.services.adopt(&service, id);
            }
        }
        let highest = |class: u8| {
            written
                .cidrs
                .values()
                .filter(|v| v.class == class)
                .map(|v| v.id)
                .max()
                .unwrap_or(0)
        };
        ids.pods.reserve(highest(class::POD));
        ids.nodes.reserve(highest(class::NODE));
        ids.services
            .reserve(written.services.values().copied().max().unwrap_or(0));
    }

    fn add(&mut self, net: Ipv4Net, class: u8, id: u32) {
        let key = (
            96 + u32::from(net.prefix_len()),
            ipv4_mapped(net.network().octets()),
        );
        self.cidrs.insert(key, CidrValue::new(class, id));
    }
}

/// The same lookups the kernel makes, on the entries in memory (for
/// `observer policy explain`, and tests that hold both sides to one table).
impl ClassMaps for ClassEntries {
    fn service(&self, key: &ServiceKey) -> Option<u32> {
        self.services.get(key).copied()
    }

    fn address(&self, addr: &[u8; 16]) -> Option<CidrValue> {
        (0..=128u32).rev().find_map(|len| {
            let masked = mask(addr, len);
            self.cidrs.get(&(len, masked)).copied()
        })
    }
}

/// The first `len` bits of `addr`.
pub fn mask<const N: usize>(addr: &[u8; N], len: u32) -> [u8; N] {
    let mut out = [0; N];
    for (i, byte) in addr.iter().enumerate() {
        let bits = len.saturating_sub(8 * i as u32).min(8);
        out[i] = if bits == 0 {
            0
        } else {
            byte & (0xff << (8 - bits))
        };
    }
    out
}

/// Writes [`ClassEntries`] into the kernel's maps, changes only.
pub struct ClassMapsWriter {
    maps: KernelClassMaps,
    written: ClassEntries,
    generation: u32,
    /// A sync has bumped the generation once (the first always does).
    synced: bool,
}

impl ClassMapsWriter {
    /// A writer for maps that hold nothing yet, or (`inherited`) an earlier
    /// observer's entries: those are read back, so that the first sync
    /// writes only what differs and removes what is gone.
    pub fn new(maps: KernelClassMaps, inherited: bool) -> Self {
        let written = if inherited {
            ClassEntries {
                services: maps.services.iter().flatten().collect(),
                cidrs: maps
                    .cidrs
                    .iter()
                    .flatten()
                    .map(|(key, value)| ((key.prefix_len(), key.data()), value))
                    .collect(),
            }
        } else {
            ClassEntries::default()
        };
        let generation = if inherited {
            maps.generation.get(&0, 0).unwrap_or(0)
        } else {
            0
        };
        Self {
            maps,
            written,
            generation,
            synced: false,
        }
    }

    /// What the maps hold (as last written, or read back).
    pub fn written(&self) -> &ClassEntries {
        &self.written
    }

    /// Bumps the generation: every live flow is classified again at its
    /// next packet (after a policy change, for its ingress verdict).
    pub fn reclassify(&mut self) -> Result<(), ClassMapsError> {
        self.generation = self.generation.wrapping_add(1);
        self.maps
            .generation
            .set(0, self.generation, 0)
            .map_err(|e| update_error("GENERATION", e))
    }

    /// Writes what changed since the last sync, then bumps the generation
    /// (if anything did) so that live flows are classified again.
    pub fn sync(&mut self, entries: ClassEntries) -> Result<(), ClassMapsError> {
        let before = &self.written;
        for key in before
            .services
            .keys()
            .filter(|k| !entries.services.contains_key(k))
        {
            let _ = self.maps.services.remove(key);
        }
        for (key, id) in &entries.services {
            if before.services.get(key) != Some(id) {
                self.maps
                    .services
                    .insert(key, id, 0)
                    .map_err(|e| update_error("SERVICES", e))?;
            }
        }
        for (prefix, addr) in before
            .cidrs
            .keys()
            .filter(|k| !entries.cidrs.contains_key(k))
        {
            let _ = self.maps.cidrs.remove(&Key::new(*prefix, *addr));
        }
        for ((prefix, addr), value) in &entries.cidrs {
            if before.cidrs.get(&(*prefix, *addr)) != Some(value) {
                self.maps
                    .cidrs
                    .insert(&Key::new(*prefix, *addr), value, 0)
                    .map_err(|e| update_error("CIDRS", e))?;
            }
        }
        // Only a change of class or peer calls for classifying live flows
        // again (a pod's new label, say, does not).
        if *before == entries && self.synced {
            return Ok(());
        }
        self.written = entries;
        self.synced = true;
        self.reclassify()
    }
}

fn update_error(map: &'static str, source: MapError) -> ClassMapsError {
    ClassMapsError::Update {
        map,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_prefixes() {
        let addr = [10, 244, 1, 7];
        assert_eq!(mask(&addr, 24), [10, 244, 1, 0]);
        assert_eq!(mask(&addr, 12), [10, 240, 0, 0]);
        assert_eq!(mask(&addr, 0), [0; 4]);
        assert_eq!(mask(&addr, 32), addr);
    }

    #[test]
    fn the_longest_prefix_wins_as_in_the_kernel() {
        let mut entries = ClassEntries::default();
        entries.add("10.244.0.0/16".parse().unwrap(), class::POD, 0);
        entries.add("10.244.1.5/32".parse().unwrap(), class::POD, 9);
        let pod = entries.address(&ipv4_mapped([10, 244, 1, 5])).unwrap();
        assert_eq!((pod.class, pod.id), (class::POD, 9));
        let unknown = entries.address(&ipv4_mapped([10, 244, 2, 5])).unwrap();
        assert_eq!((unknown.class, unknown.id), (class::POD, 0));
        assert!(entries.address(&ipv4_mapped([192, 0, 2, 1])).is_none());
    }
}
