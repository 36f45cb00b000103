//! The process runtime: a pod's containers as processes the lab starts,
//! each in a cgroup laid out as the kubelet lays it out with the cgroupfs
//! driver (`kubepods/<qos>/pod<uid>/<container id>`), in the pod's network
//! namespace, with the pod's environment.

use std::{fs, path::Path, process::Child};

use observer_common::inventory::{Container, Pod, Service};

use super::{hash, pod_env, ports};
use crate::{
    LabError,
    container::{self, Launch},
    kubelet::Qos,
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
    let uid = super::uid(start.lab, &pod.namespace, &pod.name, 0);
    let qos = Qos::of(pod.containers.iter().map(|c| &c.resources));
    let pod_cgroup = start.cgroup_root.join(qos.pod_cgroup(&uid));
    let netns_name = start.names.pod(&pod.namespace, &pod.name);
    let netns = netns_path(&netns_name);
    let resolv_conf = super::write_resolv_conf(&netns_name, pod, start.plan.cluster_dns())?;
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
        let env = pod_env(pod, ip, c, &volumes.display().to_string(), start.services);
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
            resolv_conf: Some(&resolv_conf),
        })?);
        containers.push(Container {
            name: c.name.clone(),
            id,
            cgroup,
            ports: ports(c),
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

/// A container ID in a runtime's format: 64 hex digits.
fn container_id(pod_uid: &str, container: &str) -> String {
    (0..4)
        .map(|i| format!("{:016x}", hash(&(pod_uid, container, i))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_a_runtimes() {
        let id = container_id("uid", "app");
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, container_id("uid", "web"));
    }
}
