//! What the observer keeps of the API's objects: a pod, a Service, a node,
//! trimmed to the fields classification and naming need.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::core::v1::{Node, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use observer_common::inventory::{self, Protocol};

use super::view::{NodeInfo, PodInfo, ServiceInfo};
use crate::pods::discovery;

/// Keeps what matters of another node's pod: a peer to classify traffic by
/// its address, and to match policies' peer selectors by the label keys
/// they use (`keys`; the rest of its labels is not kept). A pod without an
/// address yet (Pending) is not kept at all, nor one of this `node` (its
/// own watch keeps those).
pub fn trim_peer(
    pod: &Pod,
    node: &str,
    keys: &std::collections::BTreeSet<String>,
) -> Option<PodInfo> {
    let mut info = trim_pod(pod, false)?;
    if info.ip.is_none() || info.node == node {
        return None;
    }
    info.labels.retain(|k, _| keys.contains(k));
    Some(info)
}

/// Keeps what matters of a pod; `with_containers` for this node's pods.
pub fn trim_pod(pod: &Pod, with_containers: bool) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let ip = status.and_then(|s| {
        let ips = s.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
        s.pod_ip
            .as_deref()
            .into_iter()
            .chain(ips)
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
    });
    let containers = if with_containers {
        status
            .into_iter()
            .flat_map(|s| {
                let init = s.init_container_statuses.iter().flatten();
                let ephemeral = s.ephemeral_container_statuses.iter().flatten();
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(init)
                    .chain(ephemeral)
            })
            .map(|c| {
                let id = c.container_id.as_deref().and_then(discovery::status_id);
                (c.name.clone(), id.map(str::to_owned))
            })
            .collect()
    } else {
        Vec::new()
    };
    let uid = meta.uid.clone()?;
    let mirror_of = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/config.mirror"))
        .cloned();
    let owned_by_node = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Node" && o.api_version == "v1");
    Some(PodInfo {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        mirror_of: mirror_of.filter(|_| with_containers),
        owned_by_node,
        uid,
        terminating: meta.deletion_timestamp.is_some(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        ip,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
        containers,
    })
}

/// Keeps what matters of a Service: those without an IPv4 ClusterIP
/// (headless, ExternalName) are not kept.
pub fn trim_service(service: &Service) -> Option<ServiceInfo> {
    let spec = service.spec.as_ref()?;
    let cluster_ip = spec
        .cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
        .find_map(|ip| ip.parse::<Ipv4Addr>().ok())?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let protocol = match p.protocol.as_deref() {
                None | Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                Some(_) => return None,
            };
            let target_port = match &p.target_port {
                None => port,
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok()?,
                // A named port: each pod may map it differently.
                Some(IntOrString::String(_)) => 0,
            };
            Some(inventory::ServicePort {
                name: p.name.clone(),
                port,
                target_port,
                protocol,
            })
        })
        .collect();
    Some(ServiceInfo {
        namespace: service.metadata.namespace.clone()?,
        name: service.metadata.name.clone()?,
        cluster_ip,
        ports,
    })
}

/// Keeps what matters of a node.
pub fn trim_node(node: &Node) -> Option<NodeInfo> {
    let address = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
    let spec = node.spec.as_ref();
    let pod_cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.clone()))
        .filter_map(|c| c.parse::<Ipv4Net>().ok())
        .map(|c| c.trunc());
    let mut cidrs: Vec<Ipv4Net> = pod_cidrs.collect();
    cidrs.sort();
    cidrs.dedup();
    Some(NodeInfo {
        name: node.metadata.name.clone()?,
        address,
        pod_cidrs: cidrs,
    })
}
