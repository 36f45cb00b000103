//! Names for what the kernel carries as numbers: peer ids (pods, Services,
//! nodes) and cgroup ids (containers).
//!
//! Ids are handed out once per identity and never reused, so a flow
//! classified before a change still names the right peer after it. Nothing
//! here reads the file system: cgroup ids come in as [`CgroupIds`], found
//! by whoever produced the inventory.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    path::PathBuf,
    sync::Arc,
};

use observer_common::inventory::Inventory;

/// A Kubernetes object's namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A container, known by its cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub pod: ObjectRef,
    pub name: String,
}

/// The cgroup v2 id (the inode of the directory) of each container cgroup
/// directory that exists: what the kernel reports for a container's sockets.
pub type CgroupIds = HashMap<PathBuf, u64>;

/// What the collector resolves names with. Cheap to share: swapped whole
/// when the inventory changes.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    pub pods: HashMap<u32, ObjectRef>,
    pub services: HashMap<u32, ObjectRef>,
    pub nodes: HashMap<u32, String>,
    /// By cgroup id.
    pub containers: HashMap<u64, ContainerRef>,
    /// The cgroup ids of the directories the named containers are in (pod
    /// cgroups): a new cgroup in one is a container not named yet.
    pub pod_cgroups: HashSet<u64>,
}

pub type SharedIdentities = Arc<Identities>;

/// Stable ids for identities of one kind.
#[derive(Debug)]
pub struct IdTable<K> {
    ids: HashMap<K, u32>,
    next: u32,
}

impl<K> Default for IdTable<K> {
    fn default() -> Self {
        Self {
            ids: HashMap::new(),
            // 0 means "unknown" in the kernel's maps.
            next: 1,
        }
    }
}

impl<K: Eq + Hash + Clone> IdTable<K> {
    /// The id of `key`, if it has one.
    pub fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn id(&mut self, key: &K) -> u32 {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(key.clone(), id);
        id
    }

    /// Gives `key` the id an earlier observer gave it (still in the
    /// kernel's maps), if it has none.
    pub fn adopt(&mut self, key: &K, id: u32) {
        if id == 0 || self.ids.contains_key(key) {
            return;
        }
        self.ids.insert(key.clone(), id);
        self.next = self.next.max(id.saturating_add(1));
    }

    /// No id at or below `highest` is handed out.
    pub fn reserve(&mut self, highest: u32) {
        self.next = self.next.max(highest.saturating_add(1));
    }

    /// Forgets identities that are gone (their ids are not reused).
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        self.ids.retain(|k, _| keep(k));
    }
}

/// The id tables of one observer.
#[derive(Debug, Default)]
pub struct Ids {
    pub pods: IdTable<ObjectRef>,
    pub services: IdTable<ObjectRef>,
    pub nodes: IdTable<String>,
}

impl Ids {
    /// Gives everything in the inventory an id (forgetting what is gone),
    /// and returns the names for them.
    pub fn update(&mut self, inventory: &Inventory, cgroups: &CgroupIds) -> Identities {
        let mut identities = Identities::default();
        for pod in &inventory.pods {
            let pod_ref = ObjectRef::new(&pod.namespace, &pod.name);
            identities
                .pods
                .insert(self.pods.id(&pod_ref), pod_ref.clone());
            for container in &pod.containers {
                if let Some(&id) = container.cgroup.parent().and_then(|p| cgroups.get(p)) {
                    identities.pod_cgroups.insert(id);
                }
                // A container whose cgroup is gone has no traffic to name.
                if let Some(&id) = cgroups.get(&container.cgroup) {
                    identities.containers.insert(
                        id,
                        ContainerRef {
                            pod: pod_ref.clone(),
                            name: container.name.clone(),
                        },
                    );
                }
            }
        }
        for service in &inventory.services {
            let service_ref = ObjectRef::new(&service.namespace, &service.name);
            identities
                .services
                .insert(self.services.id(&service_ref), service_ref);
        }
        for node in &inventory.nodes {
            identities
                .nodes
                .insert(self.nodes.id(&node.name), node.name.clone());
        }
        // Forget what is gone (a set: inventories hold every pod of a cluster).
        let pods: HashSet<&ObjectRef> = identities.pods.values().collect();
        self.pods.retain(|p| pods.contains(p));
        let services: HashSet<&ObjectRef> = identities.services.values().collect();
        self.services.retain(|s| services.contains(s));
        let nodes: HashSet<&String> = identities.nodes.values().collect();
        self.nodes.retain(|n| nodes.contains(n));
        identities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_never_reused() {
        let mut table = IdTable::default();
        let a = ObjectRef::new("default", "a");
        let b = ObjectRef::new("default", "b");
        assert_eq!(table.id(&a), 1);
        assert_eq!(table.id(&b), 2);
        assert_eq!(table.id(&a), 1);
        table.retain(|k| k != &a);
        assert_eq!(table.id(&a), 3, "a new id, not a reused one");
        assert_eq!(table.id(&b), 2);
    }
}
