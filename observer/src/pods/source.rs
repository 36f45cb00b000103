//! The three sources of pods, each a producer of [`Snapshot`]s: it reads
//! (a directory, a file, the API's view and the node's processes) and
//! writes nothing.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use observer_common::inventory::Inventory;
use tokio::sync::watch;

use super::{
    ProcCheck, Snapshot, Target,
    bundles::Bundles,
    cluster::{ClusterView, view},
    discovery::{self, FoundPod},
};
use crate::{
    kernel::netns,
    metrics::Metrics,
    names::{CgroupIds, ObjectRef},
};

/// Where pods come from.
pub enum Source {
    /// Every network namespace in this directory (named after itself).
    Dir(PathBuf),
    /// The pods of this inventory (only those of `node`, if given).
    Inventory { path: PathBuf, node: Option<String> },
    /// The Kubernetes API: this node's pods, found on the node.
    Cluster(Box<ClusterSource>),
}

/// Kubernetes mode's source.
pub struct ClusterSource {
    pub view: watch::Receiver<ClusterView>,
    pub node: String,
    pub service_cidr: Option<Ipv4Net>,
    /// Where the node's processes and its cgroup v2 hierarchy are.
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// The pods found on the node at the last look, and the view's
    /// `local_changes` then.
    found: HashMap<String, FoundPod>,
    found_at: Option<u64>,
    /// The runtime's record of each container, to name those that have
    /// just started.
    pub bundles: Bundles,
}

impl ClusterSource {
    pub fn new(
        view: watch::Receiver<ClusterView>,
        node: String,
        service_cidr: Option<Ipv4Net>,
        proc_root: PathBuf,
        cgroup_root: PathBuf,
    ) -> Self {
        Self {
            view,
            node,
            service_cidr,
            proc_root,
            cgroup_root,
            found: HashMap::new(),
            found_at: None,
            bundles: Bundles::default(),
        }
    }

    /// The containers of the pods found, again, from their pods' cgroup
    /// directories (a container is there from the moment the runtime makes
    /// it, before any of its processes runs), named by the runtime's bundle
    /// where it has one of the pod's.
    fn refresh_containers(&mut self) {
        for pod in self.found.values_mut() {
            let uid = &pod.node_uid;
            let Some(pod_cgroup) = pod.containers.values().next().and_then(|c| c.parent()) else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(pod_cgroup) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(discovery::id_in_cgroup) else {
                    continue;
                };
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pod.containers.entry(id.to_owned()).or_insert(entry.path());
                }
            }
            pod.names.clear();
            for id in pod.containers.keys() {
                if let Some(bundle) = self.bundles.get(id).filter(|b| &b.pod_uid == uid) {
                    pod.names.insert(id.clone(), bundle.container.clone());
                }
            }
        }
        let found = &self.found;
        self.bundles
            .retain(|id| found.values().any(|p| p.containers.contains_key(id)));
    }
}

/// Why a snapshot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Something about this node's pods: look at the node's processes again.
    Local,
    /// A container cgroup appeared in an attached pod's: a container is
    /// starting (looked at in the pods' cgroups, quickly).
    Containers,
    /// Only the rest of the cluster changed.
    Peers,
}

impl Source {
    /// The directory whose changes matter (for the Kubernetes API: where the
    /// runtime makes pod namespaces, a hint that a pod is coming up).
    pub fn watched_dir(&self, netns_dir: &Path) -> PathBuf {
        match self {
            Self::Dir(dir) => dir.clone(),
            Self::Inventory { path, .. } => path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            Self::Cluster(_) => netns_dir.to_path_buf(),
        }
    }

    /// What there should be; `None` if the source cannot be read now (the
    /// error is logged and counted).
    pub fn snapshot(&mut self, trigger: Trigger, metrics: &Metrics) -> Option<Snapshot> {
        match self {
            Self::Dir(dir) => dir_snapshot(dir, metrics),
            Self::Inventory { path, node } => inventory_snapshot(path, node.as_deref(), metrics),
            Self::Cluster(cluster) => cluster.snapshot(trigger),
        }
    }
}

fn dir_snapshot(dir: &Path, metrics: &Metrics) -> Option<Snapshot> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!(%err, dir = %dir.display(), "listing namespaces");
            metrics.error("list_netns");
            return None;
        }
    };
    let targets = entries
        .flatten()
        .map(|e| e.path())
        .map(|path| {
            let target = Target {
                pod: ObjectRef::new("", &netns::display_name(&path)),
                path: Some(path.clone()),
                cgroup: None,
                has_ip: false,
                check: None,
            };
            (path.display().to_string(), target)
        })
        .collect();
    Some(Snapshot {
        targets,
        complete: true,
        ..Snapshot::default()
    })
}

fn inventory_snapshot(path: &Path, node: Option<&str>, metrics: &Metrics) -> Option<Snapshot> {
    let inventory = match super::inventory::load_for_node(path, node) {
        Ok(inventory) => inventory,
        Err(err) => {
            // A half-written file, say: keep what we have.
            tracing::warn!(%err, "reading the inventory");
            metrics.error("inventory");
            return None;
        }
    };
    let targets = inventory
        .pods
        .iter()
        .filter(|p| node.is_none_or(|n| p.node == n))
        .filter_map(|p| {
            let target = Target {
                path: Some(p.netns.clone()?),
                pod: ObjectRef::new(&p.namespace, &p.name),
                cgroup: pod_cgroup(p.containers.iter().map(|c| c.cgroup.as_path())),
                has_ip: true,
                check: None,
            };
            Some((p.uid.clone(), target))
        })
        .collect();
    Some(Snapshot {
        targets,
        complete: true,
        cgroups: cgroup_ids(&inventory),
        inventory: Some(inventory),
        ..Snapshot::default()
    })
}

impl ClusterSource {
    fn snapshot(&mut self, trigger: Trigger) -> Option<Snapshot> {
        // This node's pods, copied (a few); the cluster's stay where they are
        // (the view is read in place, never copied whole).
        let (synced, local_changes, local) = {
            let view = self.view.borrow();
            let local: Vec<view::PodInfo> = view.pods_to_attach().cloned().collect();
            (view.local_pods.synced, view.local_changes, local)
        };
        // This node's pods are enough to attach; the rest of the cluster
        // only names peers.
        if !synced {
            return None;
        }
        if trigger == Trigger::Local || self.found_at != Some(local_changes) {
            // Reading every process' cgroup is blocking work.
            let pods: Vec<&view::PodInfo> = local.iter().collect();
            self.found = tokio::task::block_in_place(|| {
                view::find_on_node(&pods, &self.proc_root, &self.cgroup_root)
            });
            self.found_at = Some(local_changes);
        }
        // A container that has just started: in its pod's cgroup, named by
        // its bundle (no need to read every process again).
        self.refresh_containers();
        let view = self.view.borrow();
        let inventory = view.inventory(&self.node, self.service_cidr, &self.found);
        let host_netns = discovery::netns_id(&self.proc_root.join("1/ns/net"));
        // Found is enough: a pod is attached before it has an IP.
        // Terminating pods stay attached while their processes run.
        let targets = local
            .iter()
            .filter_map(|p| {
                let found = self.found.get(&p.uid);
                let path = found.map(|f| f.netns.clone());
                if path.is_none() && p.terminating {
                    return None;
                }
                let target = Target {
                    path,
                    pod: ObjectRef::new(&p.namespace, &p.name),
                    cgroup: found
                        .and_then(|f| pod_cgroup(f.containers.values().map(PathBuf::as_path))),
                    has_ip: p.ip.is_some(),
                    check: Some(ProcCheck {
                        pod_uid: found.map_or_else(|| p.uid.clone(), |f| f.node_uid.clone()),
                        host_netns,
                    }),
                };
                Some((p.uid.clone(), target))
            })
            .collect();
        let host_network = view
            .local_pods
            .items
            .values()
            .filter(|p| p.host_network && !p.finished)
            .count();
        Some(Snapshot {
            targets,
            host_network,
            complete: view.synced(),
            cgroups: cgroup_ids(&inventory),
            inventory: Some(inventory),
        })
    }
}

/// A pod's cgroup: the directory its containers' cgroups are in.
fn pod_cgroup<'a>(mut containers: impl Iterator<Item = &'a Path>) -> Option<PathBuf> {
    containers
        .next()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

/// The cgroup ids of the inventory's containers, and of the pod cgroups
/// they are in, whose cgroup exists.
fn cgroup_ids(inventory: &Inventory) -> CgroupIds {
    inventory
        .pods
        .iter()
        .flat_map(|p| &p.containers)
        .flat_map(|c| [Some(c.cgroup.as_path()), c.cgroup.parent()])
        .flatten()
        .filter_map(|path| {
            let id = std::fs::metadata(path).ok()?.ino();
            Some((path.to_path_buf(), id))
        })
        .collect()
}
