//! How the lab makes a pod, on either runtime:
//!
//! - `process`: each container a process the lab starts, in a cgroup laid
//!   out as the kubelet lays it out with the cgroupfs driver, in a network
//!   namespace the lab made;
//! - `cri`: a real pod, made by the node's containerd at the lab-kubelet's
//!   request, networked by the CNI bridge plugin.
//!
//! Both give the pod the same environment (`POD_*`, Kubernetes' Service
//! variables), the same volumes under `$POD_VOLUMES`, the same cluster DNS,
//! and describe it alike in the inventory.

pub mod cri;
pub mod process;

use std::{
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use observer_common::inventory::{ContainerPort, Service};

use crate::{
    LabError, dns,
    lab::io_error,
    spec::{ContainerSpec, PodSpec},
};

/// Where `ip netns exec <name>` finds files to put over `/etc` (iproute2).
pub const ETC_NETNS: &str = "/etc/netns";

/// Writes the pod's resolv.conf where `ip netns exec` (and the process
/// runtime's containers) take it from: `/etc/netns/<namespace name>/`.
/// Returns its path.
pub fn write_resolv_conf(
    netns_name: &str,
    pod: &PodSpec,
    server: Ipv4Addr,
) -> Result<PathBuf, LabError> {
    let dir = Path::new(ETC_NETNS).join(netns_name);
    fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let path = dir.join("resolv.conf");
    fs::write(&path, dns::resolv_conf(&pod.namespace, server))
        .map_err(io_error(format!("writing {}", path.display())))?;
    Ok(path)
}

/// The variables every container of the pod gets.
pub fn pod_env(
    pod: &PodSpec,
    ip: Ipv4Addr,
    container: &ContainerSpec,
    volumes: &str,
    services: &[Service],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("POD_NAME".to_owned(), pod.name.clone()),
        ("POD_NAMESPACE".into(), pod.namespace.clone()),
        ("POD_IP".into(), ip.to_string()),
        ("POD_VOLUMES".into(), volumes.into()),
        ("CONTAINER_NAME".into(), container.name.clone()),
    ];
    env.extend(service_env(services, &pod.namespace));
    env
}

/// Kubernetes' Service environment variables (`WEB_SERVICE_HOST`, ...) for
/// the Services of `namespace`.
fn service_env(services: &[Service], namespace: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for s in services.iter().filter(|s| s.namespace == namespace) {
        let prefix = s.name.to_uppercase().replace('-', "_");
        env.push((format!("{prefix}_SERVICE_HOST"), s.cluster_ip.to_string()));
        if let Some(port) = s.ports.first() {
            env.push((format!("{prefix}_SERVICE_PORT"), port.port.to_string()));
        }
    }
    env
}

pub fn ports(container: &ContainerSpec) -> Vec<ContainerPort> {
    container
        .ports
        .iter()
        .map(|port| ContainerPort {
            container_port: port.container_port,
            protocol: port.protocol,
        })
        .collect()
}

/// A pod UID in Kubernetes' format, stable for a lab, pod and incarnation.
pub fn uid(lab: &str, namespace: &str, pod: &str, incarnation: u32) -> String {
    let a = hash(&(lab, namespace, pod, incarnation, 1));
    let b = hash(&(lab, namespace, pod, incarnation, 2));
    let hex = format!("{a:016x}{b:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn hash(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use observer_common::inventory::{Protocol, ServicePort};

    use super::*;

    #[test]
    fn uids_look_like_kubernetes_ones() {
        let uid = uid("demo", "default", "web", 0);
        assert_eq!(uid.len(), 36);
        assert_eq!(uid.matches('-').count(), 4);
        assert_eq!(uid, super::uid("demo", "default", "web", 0));
        assert_ne!(uid, super::uid("demo", "default", "api", 0));
        assert_ne!(uid, super::uid("demo", "default", "web", 1));
    }

    #[test]
    fn service_environment_follows_kubernetes() {
        let services = vec![Service {
            namespace: "shop".into(),
            name: "cart-api".into(),
            cluster_ip: "10.96.0.20".parse().unwrap(),
            ports: vec![ServicePort {
                name: None,
                port: 8080,
                target_port: 8080,
                protocol: Protocol::Tcp,
            }],
            selector: BTreeMap::new(),
            endpoints: vec![],
        }];
        assert_eq!(
            service_env(&services, "shop"),
            [
                ("CART_API_SERVICE_HOST".to_owned(), "10.96.0.20".to_owned()),
                ("CART_API_SERVICE_PORT".to_owned(), "8080".to_owned()),
            ]
        );
        assert!(service_env(&services, "default").is_empty());
    }
}
