//! Keeps the kernel's classification maps in step with the inventory: the
//! Service map, the address trie, and the generation that tells the programs
//! to classify live flows again. Programs are never reloaded for this.

use std::collections::HashMap;

use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use observer_common::{CidrValue, ServiceKey, class, inventory::Inventory, ipv4_mapped};

use crate::identities::{Identities, Ids, ObjectRef};

#[derive(Debug, thiserror::Error)]
pub enum KernelMapsError {
    #[error("updating the kernel's {map} map: {source}")]
    Update {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// The classification maps, shared by every program instance.
pub struct ClassMaps {
    pub services: BpfHashMap<MapData, ServiceKey, u32>,
    pub cidrs: LpmTrie<MapData, [u8; 16], CidrValue>,
    pub generation: Array<MapData, u32>,
}

/// Address trie entries: (prefix length, address) to value.
type CidrEntries = HashMap<(u32, [u8; 16]), CidrValue>;

pub struct KernelMaps {
    maps: ClassMaps,
    ids: Ids,
    services: HashMap<ServiceKey, u32>,
    cidrs: CidrEntries,
    generation: u32,
}

impl KernelMaps {
    pub fn new(maps: ClassMaps) -> Self {
        Self {
            maps,
            ids: Ids::default(),
            services: HashMap::new(),
            cidrs: HashMap::new(),
            generation: 0,
        }
    }

    /// Bumps the generation: every live flow is classified again at its
    /// next packet (after a policy change, for its ingress verdict).
    pub fn reclassify(&mut self) -> Result<(), KernelMapsError> {
        self.generation = self.generation.wrapping_add(1);
        self.maps
            .generation
            .set(0, self.generation, 0)
            .map_err(|e| update_error("GENERATION", e))
    }

    /// The ids the maps use, for compiling policies.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// Writes what changed since the last sync, then bumps the generation so
    /// live flows are classified again. Returns the names for the new ids.
    pub fn sync(&mut self, inventory: &Inventory) -> Result<Identities, KernelMapsError> {
        let identities = self.ids.identities(inventory);
        let (services, cidrs) = self.entries(inventory);

        for key in self.services.keys().filter(|k| !services.contains_key(k)) {
            let _ = self.maps.services.remove(key);
        }
        for (key, id) in &services {
            if self.services.get(key) != Some(id) {
                self.maps
                    .services
                    .insert(key, id, 0)
                    .map_err(|e| update_error("SERVICES", e))?;
            }
        }
        for (prefix, addr) in self.cidrs.keys().filter(|k| !cidrs.contains_key(k)) {
            let _ = self.maps.cidrs.remove(&Key::new(*prefix, *addr));
        }
        for ((prefix, addr), value) in &cidrs {
            if self.cidrs.get(&(*prefix, *addr)) != Some(value) {
                self.maps
                    .cidrs
                    .insert(&Key::new(*prefix, *addr), value, 0)
                    .map_err(|e| update_error("CIDRS", e))?;
            }
        }
        // Only a change of class or peer calls for classifying live flows
        // again (a pod's new label, say, does not).
        if self.services == services && self.cidrs == cidrs && self.generation != 0 {
            return Ok(identities);
        }
        self.services = services;
        self.cidrs = cidrs;
        self.generation = self.generation.wrapping_add(1);
        self.maps
            .generation
            .set(0, self.generation, 0)
            .map_err(|e| update_error("GENERATION", e))?;
        Ok(identities)
    }

    /// The entries the inventory calls for.
    #[allow(clippy::type_complexity)]
    fn entries(
        &mut self,
        inventory: &Inventory,
    ) -> (
        HashMap<ServiceKey, u32>,
        HashMap<(u32, [u8; 16]), CidrValue>,
    ) {
        let mut services = HashMap::new();
        for service in &inventory.services {
            let id = self
                .ids
                .services
                .id(&ObjectRef::new(&service.namespace, &service.name));
            for port in &service.ports {
                let key = ServiceKey {
                    addr: ipv4_mapped(service.cluster_ip.octets()),
                    port: port.port,
                    protocol: port.protocol.number(),
                    _pad: [0; 5],
                };
                services.insert(key, id);
            }
        }
        let mut cidrs = HashMap::new();
        let mut add = |net: ipnet::Ipv4Net, class: u8, id: u32| {
            let key = (
                96 + u32::from(net.prefix_len()),
                ipv4_mapped(net.network().octets()),
            );
            cidrs.insert(
                key,
                CidrValue {
                    class,
                    _pad: [0; 3],
                    id,
                },
            );
        };
        if let Some(range) = inventory.service_cidr {
            add(range, class::SERVICE, 0);
        }
        for cidr in &inventory.pod_cidrs {
            add(*cidr, class::POD, 0);
        }
        for pod in &inventory.pods {
            let id = self.ids.pods.id(&ObjectRef::new(&pod.namespace, &pod.name));
            add(pod.ip.into(), class::POD, id);
        }
        for node in &inventory.nodes {
            let id = self.ids.nodes.id(&node.name);
            add(node.address.into(), class::NODE, id);
        }
        (services, cidrs)
    }
}

fn update_error(map: &'static str, source: MapError) -> KernelMapsError {
    KernelMapsError::Update {
        map,
        source: Box::new(source),
    }
}
