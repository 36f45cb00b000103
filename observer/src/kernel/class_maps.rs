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
    /// (if anything did) so that live flows are classified again. All or
    /// nothing: on a failure the maps hold what they held before, and the
    /// next call (the reconciler retries on a timer) starts from there.
    pub fn sync(&mut self, entries: ClassEntries) -> Result<(), ClassMapsError> {
        sync(&mut self.maps, &self.written, &entries)?;
        // Only a change of class or peer calls for classifying live flows
        // again (a pod's new label, say, does not).
        if self.written == entries && self.synced {
            return Ok(());
        }
        self.written = entries;
        self.synced = true;
        self.reclassify()
    }
}

/// One write to the classification maps: an entry set to a value, or
/// (`None`) removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Service(ServiceKey, Option<u32>),
    Cidr((u32, [u8; 16]), Option<CidrValue>),
}

/// Where [`sync`] writes: the kernel's maps, or a test's.
pub trait ClassMapsTarget {
    fn write(&mut self, write: Write) -> Result<(), ClassMapsError>;
}

impl ClassMapsTarget for KernelClassMaps {
    fn write(&mut self, write: Write) -> Result<(), ClassMapsError> {
        match write {
            Write::Service(key, Some(id)) => self
                .services
                .insert(key, id, 0)
                .map_err(|e| update_error("SERVICES", e)),
            Write::Service(key, None) => {
                let _ = self.services.remove(&key);
                Ok(())
            }
            Write::Cidr((prefix, addr), Some(value)) => self
                .cidrs
                .insert(&Key::new(prefix, addr), value, 0)
                .map_err(|e| update_error("CIDRS", e)),
            Write::Cidr((prefix, addr), None) => {
                let _ = self.cidrs.remove(&Key::new(prefix, addr));
                Ok(())
            }
        }
    }
}

/// Brings the maps from `before` to `after`, changes only. Removals go
/// first (they make room); if a write fails, what this call wrote is
/// undone in reverse order and the maps hold `before`.
pub fn sync(
    maps: &mut impl ClassMapsTarget,
    before: &ClassEntries,
    after: &ClassEntries,
) -> Result<(), ClassMapsError> {
    let mut writes = Vec::new();
    for key in before
        .services
        .keys()
        .filter(|k| !after.services.contains_key(k))
    {
        writes.push(Write::Service(*key, None));
    }
    for key in before.cidrs.keys().filter(|k| !after.cidrs.contains_key(k)) {
        writes.push(Write::Cidr(*key, None));
    }
    for (key, id) in &after.services {
        if before.services.get(key) != Some(id) {
            writes.push(Write::Service(*key, Some(*id)));
        }
    }
    for (key, value) in &after.cidrs {
        if before.cidrs.get(key) != Some(value) {
            writes.push(Write::Cidr(*key, Some(*value)));
        }
    }
    let undo = |write: &Write| match *write {
        Write::Service(key, _) => Write::Service(key, before.services.get(&key).copied()),
        Write::Cidr(key, _) => Write::Cidr(key, before.cidrs.get(&key).copied()),
    };
    for (done, write) in writes.iter().enumerate() {
        if let Err(err) = maps.write(*write) {
            for written in writes[..done].iter().rev() {
                // Restores what was there, in room this call freed or
                // took: it does not fail for want of room.
                let _ = maps.write(undo(written));
            }
            return Err(err);
        }
    }
    Ok(())
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

    /// Maps in memory that refuse the `fail_at`-th insert.
    #[derive(Default)]
    struct Fake {
        entries: ClassEntries,
        inserts: usize,
        fail_at: usize,
    }

    impl ClassMapsTarget for Fake {
        fn write(&mut self, write: Write) -> Result<(), ClassMapsError> {
            if matches!(write, Write::Service(_, Some(_)) | Write::Cidr(_, Some(_))) {
                self.inserts += 1;
                if self.inserts == self.fail_at {
                    return Err(update_error("TEST", MapError::KeyNotFound));
                }
            }
            match write {
                Write::Service(key, Some(id)) => drop(self.entries.services.insert(key, id)),
                Write::Service(key, None) => drop(self.entries.services.remove(&key)),
                Write::Cidr(key, Some(v)) => drop(self.entries.cidrs.insert(key, v)),
                Write::Cidr(key, None) => drop(self.entries.cidrs.remove(&key)),
            }
            Ok(())
        }
    }

    fn entries(services: &[(u8, u32)], cidrs: &[(u8, u32)]) -> ClassEntries {
        let addr = |last| ipv4_mapped([10, 96, 0, last]);
        ClassEntries {
            services: services
                .iter()
                .map(|&(last, id)| (ServiceKey::new(addr(last), 80, 6), id))
                .collect(),
            cidrs: cidrs
                .iter()
                .map(|&(last, id)| ((128, addr(last)), CidrValue::new(class::POD, id)))
                .collect(),
        }
    }

    #[test]
    fn a_failed_write_leaves_the_maps_as_they_were() {
        let before = entries(&[(1, 1), (2, 2)], &[(1, 1), (2, 2)]);
        // Changed, added and removed entries of both maps.
        let after = entries(&[(2, 3), (3, 4)], &[(2, 5), (3, 6), (4, 7)]);
        for fail_at in 1..=5 {
            let mut maps = Fake {
                entries: before.clone(),
                fail_at,
                ..Fake::default()
            };
            assert!(
                sync(&mut maps, &before, &after).is_err(),
                "insert {fail_at}"
            );
            assert_eq!(maps.entries, before, "insert {fail_at} failed");
        }
        let mut maps = Fake {
            entries: before.clone(),
            ..Fake::default()
        };
        sync(&mut maps, &before, &after).unwrap();
        assert_eq!(maps.entries, after);
    }

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
