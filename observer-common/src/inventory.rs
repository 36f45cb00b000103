//! The inventory: what a node looks like, for the observer's local mode.
//!
//! The node lab writes it (`/run/observer-lab/<lab>/inventory.json`); the
//! observer reads it instead of asking the Kubernetes API. JSON, field names
//! in camelCase like Kubernetes objects, versioned by [`Inventory::version`]:
//! a reader refuses a version it does not know. Version 1 is described field
//! by field below.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The format version this code reads and writes.
pub const INVENTORY_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    /// [`INVENTORY_VERSION`] of the writer.
    pub version: u32,
    /// Name of the lab (or cluster) this describes.
    pub cluster: String,
    /// Every node's pod CIDR: traffic to these is pod traffic.
    pub pod_cidrs: Vec<Ipv4Net>,
    /// The Service ClusterIP range, if known (the Kubernetes API does not
    /// always say): an unknown ClusterIP in it is still Service traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cidr: Option<Ipv4Net>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// Hosts outside the cluster (the lab's stand-in for the internet).
    #[serde(default)]
    pub external_hosts: Vec<ExternalHost>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    pub name: String,
    /// The node's own address (its InternalIP).
    pub address: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Ipv4Net>,
    /// The node's network namespace (in the lab, a namespace of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pod {
    /// Kubernetes namespace.
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    /// The pod's network namespace: a bind mount or `/proc/<pid>/ns/net`.
    /// Known for the pods of the observer's own node only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Container {
    pub name: String,
    /// 64 hex digits, as a container runtime reports it.
    pub id: String,
    /// The container's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Ports the container declares it listens on.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => crate::protocol::TCP,
            Self::Udp => crate::protocol::UDP,
            Self::Sctp => crate::protocol::SCTP,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The pods behind the Service, as kube-proxy programs them.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub namespace: String,
    pub pod: String,
    pub ip: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalHost {
    pub name: String,
    pub address: Ipv4Addr,
    pub netns: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_kubernetes_field_names() {
        let service = Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: 8080,
                protocol: Protocol::Tcp,
            }],
            selector: BTreeMap::from([("app".into(), "web".into())]),
            endpoints: vec![],
        };
        let json = serde_json::to_string(&service).unwrap();
        assert!(json.contains(r#""clusterIP":"10.96.0.10""#), "{json}");
        assert!(json.contains(r#""targetPort":8080"#), "{json}");
        assert!(json.contains(r#""protocol":"TCP""#), "{json}");
        let back: Service = serde_json::from_str(&json).unwrap();
        assert_eq!(back, service);
    }

    #[test]
    fn refuses_unknown_fields() {
        let err = serde_json::from_str::<Endpoint>(
            r#"{"namespace":"a","pod":"b","ip":"10.0.0.1","color":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("color"), "{err}");
    }
}
