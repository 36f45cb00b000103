//! How the lab starts a pod's containers: as processes, each in a cgroup
//! laid out as the kubelet lays it out with the cgroupfs driver
//! (`kubepods/besteffort/pod<uid>/<container id>`), in the pod's network
//! namespace, with the pod's environment.

use std::{
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    path::Path,
    process::Child,
};

use observer_common::inventory::{Container, ContainerPort, Pod, Service};

use crate::{
    LabError,
    container::{self, Launch},
    lab::{io_error, log_path, netns_path, state_dir},
    network::Names,
    spec::Plan,
};

/// What starting a pod needs.
pub struct PodStart<'a> {
    pub lab: &'a str,
    pub plan: &'a Plan,
    /// The pod's index in the plan.
    pub index: usize,
    pub names: &'a Names,
    pub cgroup_root: &'a Path,
    /// The lab's Services, for the pod's environment.
    pub services: &'a [Service],
}

/// Starts the pod's containers (their processes go to `children`); returns
/// the pod as the inventory describes it.
pub fn start_pod(start: &PodStart, children: &mut Vec<Child>) -> Result<Pod, LabError> {
    let pod = &start.plan.spec.pods[start.index];
    let ip = start.plan.pod_ips[start.index];
    let uid = uid(start.lab, &pod.namespace, &pod.name);
    let pod_cgroup = start
        .cgroup_root
        .join(format!("kubepods/besteffort/pod{uid}"));
    let netns = netns_path(&start.names.pod(&pod.namespace, &pod.name));
    let volumes = state_dir(start.lab)
        .join("volumes")
        .join(format!("{}_{}", pod.namespace, pod.name));
    for volume in &pod.volumes {
        let dir = volumes.join(volume);
        fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    }
    let mut containers = Vec::new();
    for c in &pod.containers {
        let id = container_id(&uid, &c.name);
        let cgroup = pod_cgroup.join(&id);
        container::create_cgroup(&cgroup)?;
        let mut env = vec![
            ("POD_NAME".to_owned(), pod.name.clone()),
            ("POD_NAMESPACE".into(), pod.namespace.clone()),
            ("POD_IP".into(), ip.to_string()),
            ("POD_VOLUMES".into(), volumes.display().to_string()),
            ("CONTAINER_NAME".into(), c.name.clone()),
        ];
        env.extend(service_env(start.services, &pod.namespace));
        let log = log_path(
            start.lab,
            &format!("{}_{}_{}", pod.namespace, pod.name, c.name),
        );
        children.push(container::spawn(&Launch {
            command: &c.command,
            netns: &netns,
            cgroup: &cgroup,
            env,
            log: &log,
            user: c.run_as_user,
        })?);
        containers.push(Container {
            name: c.name.clone(),
            id,
            cgroup,
            ports: c
                .ports
                .iter()
                .map(|port| ContainerPort {
                    container_port: port.container_port,
                    protocol: port.protocol,
                })
                .collect(),
        });
    }
    Ok(Pod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid,
        node: pod.node.clone(),
        labels: pod.labels.clone(),
        ip,
        netns: Some(netns),
        containers,
    })
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

/// A pod UID in Kubernetes' format, stable for a lab and pod.
fn uid(lab: &str, namespace: &str, pod: &str) -> String {
    let a = hash(&(lab, namespace, pod, 1));
    let b = hash(&(lab, namespace, pod, 2));
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

/// A container ID in a runtime's format: 64 hex digits.
fn container_id(pod_uid: &str, container: &str) -> String {
    (0..4)
        .map(|i| format!("{:016x}", hash(&(pod_uid, container, i))))
        .collect()
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
    fn ids_look_like_kubernetes_ones() {
        let uid = uid("demo", "default", "web");
        assert_eq!(uid.len(), 36);
        assert_eq!(uid.matches('-').count(), 4);
        assert_eq!(uid, super::uid("demo", "default", "web"));
        assert_ne!(uid, super::uid("demo", "default", "api"));
        let id = container_id(&uid, "app");
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
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
