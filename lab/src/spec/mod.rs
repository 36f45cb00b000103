//! The lab file (YAML) and its validation into a [`Plan`].
//!
//! Everything is checked before anything is created, so a bad file creates
//! nothing. Each problem names the field it is about, as a path such as
//! `pods[2].containers[0].ports[1]`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use observer_common::inventory::Protocol;
use serde::Deserialize;

mod check;
#[cfg(test)]
mod tests;

use check::{Check, Checker, first_host};

pub const API_VERSION: &str = "observer-lab/v1";
/// The default lab: the cases users ask about.
pub const DEFAULT_LAB: &str = include_str!("../../default-lab.yaml");

/// A lab file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabSpec {
    pub api_version: String,
    pub kind: String,
    /// Lowercase letters, digits and `-`; names the lab's namespaces.
    pub name: String,
    /// How pods are made.
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub network: NetworkSpec,
    pub nodes: Vec<NodeSpec>,
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub external_hosts: Vec<ExternalSpec>,
}

/// Address ranges of the lab.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// ClusterIPs come from here; traffic to it without a Service is dropped.
    #[serde(rename = "serviceCIDR", default = "default_service_cidr")]
    pub service_cidr: Ipv4Net,
    /// The network between nodes (node addresses: .2, .3, ...).
    #[serde(rename = "nodeCIDR", default = "default_node_cidr")]
    pub node_cidr: Ipv4Net,
    /// Where external hosts live: outside every cluster range.
    #[serde(rename = "externalCIDR", default = "default_external_cidr")]
    pub external_cidr: Ipv4Net,
    /// How Services are implemented.
    #[serde(default)]
    pub dataplane: Dataplane,
    /// The ClusterIP of the cluster's DNS Service, `kube-system/kube-dns`,
    /// which the lab adds with its DNS server pod.
    #[serde(rename = "clusterDNS", default = "default_cluster_dns")]
    pub cluster_dns: Ipv4Addr,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            service_cidr: default_service_cidr(),
            node_cidr: default_node_cidr(),
            external_cidr: default_external_cidr(),
            dataplane: Dataplane::default(),
            cluster_dns: default_cluster_dns(),
        }
    }
}

/// How the lab makes pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// Each container a process the lab starts, in a cgroup laid out as the
    /// kubelet lays it out, in a network namespace the lab made.
    #[default]
    Process,
    /// Real pods: a containerd per node, called through CRI by the lab as
    /// the kubelet, networked by the CNI bridge plugin; containers run the
    /// lab's image.
    Containerd,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Containerd => "containerd",
        }
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "process" => Ok(Self::Process),
            "containerd" => Ok(Self::Containerd),
            _ => Err(format!("`{text}`: the runtime is process or containerd")),
        }
    }
}

/// How the lab implements Services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataplane {
    /// kube-proxy in iptables mode: DNAT in each node's namespace, after
    /// the packet left the pod.
    #[default]
    KubeProxy,
    /// A socket load balancer (Cilium's kube-proxy replacement): the
    /// ClusterIP is translated at `connect()`, inside the pod, by cgroup
    /// programs on the lab's top cgroup; the nodes have no Service rules.
    SocketLb,
}

/// A pod's service mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mesh {
    #[default]
    None,
    /// A sidecar proxy (Istio's, Linkerd's sidecar mode): the lab adds a
    /// container `proxy` (uid 1337, port 15001) and redirects the pod's
    /// outbound TCP to it with iptables `REDIRECT` in the pod's namespace;
    /// the proxy forwards each connection to its original destination.
    Sidecar,
}

/// The sidecar proxy the lab adds to a meshed pod.
pub const PROXY_CONTAINER: &str = "proxy";
pub const PROXY_PORT: u16 = 15001;
pub const PROXY_UID: u32 = 1337;
const PROXY_SCRIPT: &str = include_str!("../../sidecar-proxy.py");

fn default_service_cidr() -> Ipv4Net {
    "10.96.0.0/16".parse().expect("valid")
}
fn default_cluster_dns() -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 53)
}
fn default_node_cidr() -> Ipv4Net {
    "172.18.0.0/24".parse().expect("valid")
}
fn default_external_cidr() -> Ipv4Net {
    "192.168.200.0/24".parse().expect("valid")
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A fixed address in the node's pod CIDR; by default the next free one.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Directories shared by the pod's containers (`$POD_VOLUMES/<name>`).
    #[serde(default)]
    pub volumes: Vec<String>,
    pub containers: Vec<ContainerSpec>,
    /// A service mesh's sidecar, if any.
    #[serde(default)]
    pub mesh: Mesh,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    /// The program and its arguments, as in a Kubernetes container.
    pub command: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// The user (and group) it runs as; root by default.
    #[serde(default)]
    pub run_as_user: Option<u32>,
    /// Requests and limits: they decide the pod's QoS class, hence its
    /// cgroup (nothing is enforced).
    #[serde(default)]
    pub resources: crate::kubelet::Resources,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalSpec {
    pub name: String,
    pub address: Ipv4Addr,
    /// A server to run on the host, if any.
    #[serde(default)]
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: {source}")]
    Yaml {
        file: String,
        source: serde_norway::Error,
    },
    #[error("{file}: {field}: {problem}")]
    Invalid {
        file: String,
        field: String,
        problem: String,
    },
}

/// A validated lab: every address decided.
#[derive(Clone, Debug)]
pub struct Plan {
    pub spec: LabSpec,
    /// The file as written, kept with the running lab.
    pub source: String,
    /// Node address, by node index.
    pub node_addresses: Vec<Ipv4Addr>,
    /// Pod address, by pod index.
    pub pod_ips: Vec<Ipv4Addr>,
    /// Backing pods (indices), by service index.
    pub endpoints: Vec<Vec<usize>>,
}

impl Plan {
    /// The lab that `cargo xtask lab up` builds without a file.
    pub fn default_lab() -> Self {
        Self::from_yaml(DEFAULT_LAB, "lab/default-lab.yaml").expect("the default lab is valid")
    }

    /// Parses and validates a lab file; `file` names it in errors.
    pub fn from_yaml(text: &str, file: &str) -> Result<Self, SpecError> {
        let spec: LabSpec = serde_norway::from_str(text).map_err(|source| SpecError::Yaml {
            file: file.into(),
            source,
        })?;
        Self::new(spec, text).map_err(|(field, problem)| SpecError::Invalid {
            file: file.into(),
            field,
            problem,
        })
    }

    fn new(mut spec: LabSpec, source: &str) -> Result<Self, (String, String)> {
        let mut check = Checker::default();
        check.header(&spec)?;
        add_sidecars(&mut spec)?;
        let cluster_dns = spec.network.cluster_dns;
        if !spec.network.service_cidr.contains(&cluster_dns) {
            return check::problem(
                "network.clusterDNS",
                format!(
                    "{cluster_dns} is not in network.serviceCIDR ({})",
                    spec.network.service_cidr
                ),
            );
        }
        crate::dns::add(&mut spec, cluster_dns)
            .or_else(|problem| check::problem("network.clusterDNS", problem))?;
        let node_addresses = check.network(&spec)?;
        let pod_ips = check.pods(&spec)?;
        let endpoints = check.services(&spec)?;
        check.external(&spec)?;
        crate::dns::command(&mut spec, &pod_ips);
        Ok(Self {
            spec,
            source: source.into(),
            node_addresses,
            pod_ips,
            endpoints,
        })
    }

    /// The same lab on another runtime.
    pub fn with_runtime(mut self, runtime: Runtime) -> Self {
        self.spec.runtime = runtime;
        self
    }

    /// The meshed pods, by index.
    pub fn meshed(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.spec.pods.len()).filter(|&p| self.spec.pods[p].mesh == Mesh::Sidecar)
    }

    /// The cluster DNS Service's address, for pods' resolv.conf.
    pub fn cluster_dns(&self) -> Ipv4Addr {
        self.spec.network.cluster_dns
    }

    /// The gateway of a node's pods: the first address of its pod CIDR.
    pub fn gateway(&self, node: usize) -> Ipv4Addr {
        first_host(self.spec.nodes[node].pod_cidr)
    }

    pub fn node_index(&self, name: &str) -> usize {
        self.spec
            .nodes
            .iter()
            .position(|n| n.name == name)
            .expect("validated")
    }
}

/// Gives each meshed pod its proxy container.
fn add_sidecars(spec: &mut LabSpec) -> Check<()> {
    for (p, pod) in spec.pods.iter_mut().enumerate() {
        if pod.mesh != Mesh::Sidecar {
            continue;
        }
        if pod.containers.iter().any(|c| c.name == PROXY_CONTAINER) {
            return check::problem(
                format!("pods[{p}].mesh"),
                format!("a meshed pod gets a container `{PROXY_CONTAINER}`: name yours otherwise"),
            );
        }
        pod.containers.push(ContainerSpec {
            name: PROXY_CONTAINER.into(),
            command: vec!["python3".into(), "-c".into(), PROXY_SCRIPT.into()],
            ports: vec![PortSpec {
                container_port: PROXY_PORT,
                protocol: Protocol::Tcp,
            }],
            run_as_user: Some(PROXY_UID),
            resources: Default::default(),
        });
    }
    Ok(())
}
