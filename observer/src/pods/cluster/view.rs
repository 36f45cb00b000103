//! What the observer keeps of the Kubernetes API's objects: only the fields
//! classification and naming need (a cluster-wide pod costs a few hundred
//! bytes here, not the tens of kilobytes of the API object), and how that
//! becomes an inventory.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    path::Path,
};

use ipnet::Ipv4Net;

use kube::{Resource, runtime::watcher};
use observer_common::inventory::{self, INVENTORY_VERSION, Inventory};

use crate::pods::discovery::{self, FoundPod};

/// A pod, trimmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The `kubernetes.io/config.mirror` annotation, if it is (says it is)
    /// the mirror pod of a static pod: the config hash the node runs that
    /// pod under. Any pod author can write it: see [`find_on_node`].
    pub mirror_of: Option<String>,
    /// Its owner is a Node, as a mirror pod's is.
    pub owned_by_node: bool,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// Being deleted (its processes may already be gone).
    pub terminating: bool,
    /// Its IPv4 address, once it has one.
    pub ip: Option<Ipv4Addr>,
    /// Shares the node's network namespace: nothing of its own to attach to.
    pub host_network: bool,
    /// Succeeded or Failed: its IP may already belong to another pod.
    pub finished: bool,
    /// Container names with the runtime ids from the status (init and
    /// ephemeral containers included); kept for this node's pods only.
    pub containers: Vec<(String, Option<String>)>,
}

/// A Service, trimmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<inventory::ServicePort>,
}

/// A node, trimmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Its InternalIP.
    pub address: Option<Ipv4Addr>,
    pub pod_cidrs: Vec<Ipv4Net>,
}

/// The objects of one kind as a watcher reports them, by UID.
#[derive(Clone, Debug)]
pub struct Mirror<T> {
    pub items: HashMap<String, T>,
    /// A (re)list in progress: replaces `items` when complete, so objects
    /// deleted while the watch was down disappear.
    relist: Option<HashMap<String, T>>,
    /// A complete list has been seen.
    pub synced: bool,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: PartialEq> Mirror<T> {
    /// Applies a watcher event; `trim` keeps what matters of an object (or
    /// nothing: the object is then treated as absent). Returns whether
    /// `items` changed.
    pub fn apply<K: Resource>(
        &mut self,
        event: watcher::Event<K>,
        trim: impl Fn(&K) -> Option<T>,
    ) -> bool {
        let uid = |object: &K| object.meta().uid.clone().unwrap_or_default();
        match event {
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let (Some(relist), Some(item)) = (self.relist.as_mut(), trim(&object)) {
                    relist.insert(uid(&object), item);
                }
                false
            }
            watcher::Event::InitDone => {
                let items = self.relist.take().unwrap_or_default();
                let changed = items != self.items || !self.synced;
                self.items = items;
                self.synced = true;
                changed
            }
            watcher::Event::Apply(object) => {
                let key = uid(&object);
                match trim(&object) {
                    Some(item) if self.items.get(&key) == Some(&item) => false,
                    Some(item) => {
                        self.items.insert(key, item);
                        true
                    }
                    None => self.items.remove(&key).is_some(),
                }
            }
            watcher::Event::Delete(object) => self.items.remove(&uid(&object)).is_some(),
        }
    }
}

/// The cluster as the observer of one node sees it.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// This node's pods, with their containers.
    pub local_pods: Mirror<PodInfo>,
    /// Counts changes to `local_pods`: only those call for looking at the
    /// node's processes again.
    pub local_changes: u64,
    /// Every pod of the cluster (peers), without containers.
    pub pods: Mirror<PodInfo>,
    pub services: Mirror<ServiceInfo>,
    pub nodes: Mirror<NodeInfo>,
}

impl ClusterView {
    /// Every kind has been listed once.
    pub fn synced(&self) -> bool {
        self.local_pods.synced && self.pods.synced && self.services.synced && self.nodes.synced
    }

    /// This node's pods to look for on the node: with a network namespace of
    /// their own, not finished.
    pub fn pods_to_attach(&self) -> impl Iterator<Item = &PodInfo> {
        self.local_pods
            .items
            .values()
            .filter(|p| !p.host_network && !p.finished)
    }

    /// The inventory for the kernel maps and the names: every pod with an IP
    /// (this node's with the network namespace and containers `found` on
    /// the node), every Service with a ClusterIP, every node.
    pub fn inventory(
        &self,
        node: &str,
        service_cidr: Option<Ipv4Net>,
        found: &HashMap<String, FoundPod>,
    ) -> Inventory {
        let mut nodes: Vec<inventory::Node> = self
            .nodes
            .items
            .values()
            .filter_map(|n| {
                Some(inventory::Node {
                    name: n.name.clone(),
                    address: n.address?,
                    pod_cidr: n.pod_cidrs.first().copied(),
                    netns: None,
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pod_cidrs: Vec<Ipv4Net> = self
            .nodes
            .items
            .values()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .collect();
        pod_cidrs.sort();
        pod_cidrs.dedup();

        // This node's pods from their own watch (fresher, with containers);
        // the others from the cluster-wide one.
        let local: HashSet<&str> = self.local_pods.items.keys().map(String::as_str).collect();
        let remote = self
            .pods
            .items
            .iter()
            .filter(|(uid, p)| !local.contains(uid.as_str()) && p.node != node)
            .map(|(_, p)| p);
        let mut pods: Vec<inventory::Pod> = self
            .local_pods
            .items
            .values()
            .chain(remote)
            // Host-network pods have the node's address: traffic to it is
            // node traffic. Finished pods' addresses are free for others.
            .filter(|p| !p.host_network && !p.finished)
            .filter_map(|p| {
                let ip = p.ip?;
                let on_node = found.get(&p.uid);
                Some(inventory::Pod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    uid: p.uid.clone(),
                    node: p.node.clone(),
                    labels: p.labels.clone(),
                    ip,
                    netns: on_node.map(|f| f.netns.clone()),
                    containers: on_node.map(|f| containers(p, f)).unwrap_or_default(),
                })
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let mut services: Vec<inventory::Service> = self
            .services
            .items
            .values()
            .map(|s| inventory::Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                cluster_ip: s.cluster_ip,
                ports: s.ports.clone(),
                selector: BTreeMap::new(),
                endpoints: Vec::new(),
            })
            .collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        Inventory {
            version: INVENTORY_VERSION,
            cluster: String::new(),
            pod_cidrs,
            service_cidr,
            nodes,
            pods,
            services,
            external_hosts: Vec::new(),
        }
    }
}

/// The containers of a pod found on the node, named by the pod's status,
/// and those it does not name yet by the runtime's bundles (a container
/// just started). The sandbox stays unnamed.
fn containers(pod: &PodInfo, found: &FoundPod) -> Vec<inventory::Container> {
    let container = |name: &str, id: &str| {
        Some(inventory::Container {
            name: name.to_owned(),
            id: id.to_owned(),
            cgroup: found.containers.get(id)?.clone(),
            ports: Vec::new(),
        })
    };
    let by_status = pod
        .containers
        .iter()
        .filter_map(|(name, id)| container(name, id.as_deref()?));
    let named: HashSet<&str> = pod
        .containers
        .iter()
        .filter_map(|(_, id)| id.as_deref())
        .collect();
    let mut by_bundle: Vec<_> = found
        .names
        .iter()
        .filter(|(id, _)| !named.contains(id.as_str()))
        .filter_map(|(id, name)| container(name, id))
        .collect();
    by_bundle.sort_by(|a, b| a.id.cmp(&b.id));
    by_status.chain(by_bundle).collect()
}

/// Looks for this node's pods on the node (see [`discovery::find_pods`]),
/// by the UIDs their cgroups are named after; returns them by their API
/// UID.
///
/// A static pod runs under its config hash, which its mirror pod names in
/// an annotation; but any pod author can write that annotation, naming
/// another pod's. So it is believed only for a pod that runs under no
/// cgroup of its own UID (every pod made through the API does), whose
/// owner is a Node (as the kubelet makes mirror pods), and whose hash no
/// other pod claims: a pod never takes another's namespace, containers or
/// policy by claiming it.
pub fn find_on_node(
    pods: &[&PodInfo],
    proc_root: &Path,
    cgroup_root: &Path,
) -> HashMap<String, FoundPod> {
    let uids: HashSet<&str> = pods
        .iter()
        .flat_map(|p| [Some(p.uid.as_str()), p.mirror_of.as_deref()])
        .flatten()
        .collect();
    let host = discovery::netns_id(&proc_root.join("1/ns/net"));
    let found = discovery::find_pods(proc_root, cgroup_root, &uids, host);
    by_api_uid(pods, found)
}

/// The pods found on the node (by the UID their cgroups name), by API UID:
/// a mirror pod's annotation is believed as [`find_on_node`] says.
fn by_api_uid(
    pods: &[&PodInfo],
    mut found: HashMap<String, FoundPod>,
) -> HashMap<String, FoundPod> {
    // A pod that runs under its own UID is no mirror pod: its claim is
    // void (and cannot take the static pod's away either).
    let mut claims: HashMap<&str, usize> = HashMap::new();
    let claimants = pods.iter().filter(|p| !found.contains_key(&p.uid));
    for hash in claimants.filter_map(|p| p.mirror_of.as_deref()) {
        *claims.entry(hash).or_default() += 1;
    }
    pods.iter()
        .filter_map(|p| {
            if let Some(own) = found.remove(&p.uid) {
                return Some((p.uid.clone(), own));
            }
            let hash = p.mirror_of.as_deref()?;
            let trusted = p.owned_by_node && claims.get(hash) == Some(&1);
            if !trusted {
                tracing::debug!(pod = %format!("{}/{}", p.namespace, p.name), "a mirror pod's annotation not believed");
                return None;
            }
            Some((p.uid.clone(), found.remove(hash)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Node;

    use super::*;

    fn pod(name: &str, uid: &str, node: &str, ip: Option<&str>) -> PodInfo {
        PodInfo {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
            mirror_of: None,
            owned_by_node: false,
            node: node.into(),
            terminating: false,
            labels: BTreeMap::new(),
            ip: ip.map(|ip| ip.parse().unwrap()),
            host_network: false,
            finished: false,
            containers: vec![
                ("app".into(), Some("a".repeat(64))),
                ("starting".into(), None),
            ],
        }
    }

    fn mirror(pods: Vec<PodInfo>) -> Mirror<PodInfo> {
        Mirror {
            items: pods.into_iter().map(|p| (p.uid.clone(), p)).collect(),
            relist: None,
            synced: true,
        }
    }

    #[test]
    fn the_inventory_has_peers_everywhere_and_containers_here() {
        let mut host = pod("kube-proxy", "u-host", "node-1", Some("172.18.0.2"));
        host.host_network = true;
        let mut done = pod("job", "u-done", "node-2", Some("10.244.2.9"));
        done.finished = true;
        let local = vec![
            pod("web", "u-web", "node-1", Some("10.244.1.10")),
            pod("new", "u-new", "node-1", None),
            host,
        ];
        let mut all = local.clone();
        all.push(pod("remote", "u-remote", "node-2", Some("10.244.2.10")));
        all.push(done);
        let view = ClusterView {
            local_pods: mirror(local),
            pods: mirror(all),
            ..ClusterView::default()
        };
        let attach: Vec<&str> = {
            let mut names: Vec<&str> = view.pods_to_attach().map(|p| p.name.as_str()).collect();
            names.sort();
            names
        };
        assert_eq!(attach, ["new", "web"], "not the host-network pod");

        let restarted = "c".repeat(64);
        let found = HashMap::from([(
            "u-web".to_owned(),
            FoundPod {
                node_uid: "u-web".into(),
                netns: "/proc/42/ns/net".into(),
                containers: HashMap::from([
                    ("a".repeat(64), "/sys/fs/cgroup/x".into()),
                    (restarted.clone(), "/sys/fs/cgroup/y".into()),
                    ("d".repeat(64), "/sys/fs/cgroup/sandbox".into()),
                ]),
                // The runtime's bundle names a container the status does
                // not name yet.
                names: HashMap::from([(restarted, "starting".to_owned())]),
            },
        )]);
        let inventory = view.inventory("node-1", None, &found);
        let names: Vec<&str> = inventory.pods.iter().map(|p| p.name.as_str()).collect();
        // No IP yet, host network, finished: not pods to classify by address.
        assert_eq!(names, ["remote", "web"]);
        let web = &inventory.pods[1];
        assert_eq!(web.netns.as_deref(), Some(Path::new("/proc/42/ns/net")));
        let containers: Vec<(&str, &Path)> = web
            .containers
            .iter()
            .map(|c| (c.name.as_str(), c.cgroup.as_path()))
            .collect();
        assert_eq!(
            containers,
            [
                ("app", Path::new("/sys/fs/cgroup/x")),
                ("starting", Path::new("/sys/fs/cgroup/y"))
            ],
            "containers found and named, by the status or the runtime; not the sandbox"
        );
        assert_eq!(
            inventory.pods[0].netns, None,
            "a peer has no namespace here"
        );
    }

    #[test]
    fn a_mirror_pods_annotation_is_believed_only_for_a_static_pod() {
        let hash = "6e9a1d2c3b4a5f60718293a4b5c6d7e8";
        let found = |uid: &str| FoundPod {
            node_uid: uid.into(),
            netns: format!("/proc/{}/ns/net", uid.len()).into(),
            ..FoundPod::default()
        };
        let mut real = pod("etcd", "u-etcd", "node-1", None);
        real.mirror_of = Some(hash.into());
        real.owned_by_node = true;
        // The kubelet runs the static pod under its hash: the mirror pod
        // gets its namespace.
        let on_node = HashMap::from([(hash.to_owned(), found(hash))]);
        let got = by_api_uid(&[&real], on_node.clone());
        assert_eq!(got["u-etcd"].node_uid, hash);
        // A pod that copies the annotation (and a Node owner) runs under its
        // own UID, which wins: it gets its own namespace, the static pod
        // keeps its.
        let mut forged = pod("thief", "u-thief", "node-1", None);
        forged.mirror_of = Some(hash.into());
        forged.owned_by_node = true;
        let mut both = on_node.clone();
        both.insert("u-thief".into(), found("u-thief"));
        let got = by_api_uid(&[&real, &forged], both);
        assert_eq!(got["u-thief"].node_uid, "u-thief", "its own namespace");
        assert_eq!(got["u-etcd"].node_uid, hash, "the static pod's, still");
        // Two claimants that run under no UID of their own: neither.
        let mut other = forged.clone();
        other.uid = "u-other".into();
        assert!(by_api_uid(&[&real, &other], on_node.clone()).is_empty());
        // Not owned by a Node: not a mirror pod's.
        let mut unowned = real.clone();
        unowned.owned_by_node = false;
        assert!(by_api_uid(&[&unowned], on_node).is_empty());
    }

    #[test]
    fn a_relist_replaces_and_an_unchanged_object_changes_nothing() {
        let mut mirror = Mirror::<String>::default();
        let trim = |n: &Node| n.metadata.name.clone();
        let node = |name: &str, uid: &str| {
            let mut node = Node::default();
            node.metadata.name = Some(name.into());
            node.metadata.uid = Some(uid.into());
            node
        };
        assert!(!mirror.apply(watcher::Event::Init, trim));
        assert!(!mirror.apply(watcher::Event::InitApply(node("a", "1")), trim));
        assert!(mirror.apply(watcher::Event::InitDone, trim));
        assert!(!mirror.apply(watcher::Event::Apply(node("a", "1")), trim));
        assert!(mirror.apply(watcher::Event::Apply(node("b", "2")), trim));
        // Relisted without a: a is gone.
        mirror.apply(watcher::Event::Init, trim);
        mirror.apply(watcher::Event::InitApply(node("b", "2")), trim);
        assert!(mirror.apply(watcher::Event::InitDone, trim));
        assert_eq!(mirror.items.values().collect::<Vec<_>>(), ["b"]);
    }
}
