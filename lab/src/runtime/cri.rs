//! The containerd runtime: each lab pod a real pod, made by its node's
//! containerd at the request of the lab's kubelet, its containers running
//! the lab's image. The pod's network namespace (named by the CNI,
//! `cni-<uuid>` in the node's `/var/run/netns`) is also given the lab's
//! name for it on the machine (`ip netns attach`), so that the lab, its
//! tests and `ip netns exec` reach it as they reach a process-runtime pod.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Child,
};

use observer_common::inventory::{Container, ContainerPort, Pod, Service};

use super::{pod_env, ports};
use crate::{
    LabError,
    container::create_cgroup,
    containerd::{self, Containerd, LAB_IMAGE},
    cri::api,
    dns,
    kubelet::{
        ContainerDef, Kubelet, PodDef, RunningPod, Security, Volume, VolumeMount, VolumeSource,
        manifest::{self, Manifest},
    },
    lab::netns_path,
    netns::{self, Netns},
    network::{self, Names},
    spec::{Mesh, Plan, PodSpec},
};

/// Where a lab pod's volumes are mounted in its containers.
const VOLUMES: &str = "/volumes";

/// The kubelets of the lab's nodes, and the pods they run.
pub struct Nodes {
    lab: String,
    names: Names,
    /// The cgroup v2 mount, to tell containers' cgroup directories.
    cgroup2: PathBuf,
    kubelets: BTreeMap<String, Kubelet>,
    pods: BTreeMap<(String, String), RunningPod>,
    /// How many times each pod was made, for fresh UIDs.
    incarnations: BTreeMap<(String, String), u32>,
    cluster_dns: Ipv4Addr,
    /// Pods run from manifests (not the lab file's), with their node.
    manifests: BTreeMap<(String, String), (String, RunningPod)>,
}

impl Nodes {
    /// Starts every node's containerd (processes into `children`) and loads
    /// the lab's image.
    pub fn start(
        lab: &str,
        plan: &Plan,
        cgroup_root: &Path,
        state: &Path,
        children: &mut Vec<Child>,
    ) -> Result<Self, LabError> {
        let image = containerd::image_archive()?;
        let names = Names::new(lab);
        let cgroup2 = cgroup_root
            .parent()
            .expect("the lab's cgroup is below the mount")
            .to_path_buf();
        let relative = format!(
            "/{}",
            cgroup_root
                .strip_prefix(&cgroup2)
                .expect("below the mount")
                .display()
        );
        let mut kubelets = BTreeMap::new();
        for (n, node) in plan.spec.nodes.iter().enumerate() {
            let cgroup = cgroup_root.join("nodes").join(&node.name);
            create_cgroup(&cgroup)?;
            let dir = state.join("nodes").join(&node.name);
            let containerd = Containerd::start(
                &containerd::Start {
                    node: &node.name,
                    dir: &dir,
                    netns: &netns_path(&names.node(&node.name)),
                    cgroup: &cgroup,
                    pod_cidr: node.pod_cidr,
                    gateway: plan.gateway(n),
                    image: &image,
                },
                children,
            )?;
            kubelets.insert(
                node.name.clone(),
                Kubelet::new(&node.name, containerd, relative.clone()),
            );
        }
        Ok(Self {
            lab: lab.into(),
            names,
            cgroup2,
            kubelets,
            pods: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            cluster_dns: plan.cluster_dns(),
            manifests: BTreeMap::new(),
        })
    }

    /// Runs the pod: its sandbox, named on the machine, then its containers
    /// (unless `sandbox_only`). Returns it as the inventory describes it.
    pub fn start_pod(
        &mut self,
        pod: &PodSpec,
        ip: Ipv4Addr,
        services: &[Service],
        sandbox_only: bool,
    ) -> Result<Pod, LabError> {
        let key = (pod.namespace.clone(), pod.name.clone());
        let incarnation = *self
            .incarnations
            .entry(key.clone())
            .and_modify(|n| *n += 1)
            .or_insert(0);
        let mut def = pod_def(&self.lab, pod, ip, services, incarnation);
        def.dns = Some(api::DnsConfig {
            servers: vec![self.cluster_dns.to_string()],
            searches: dns::searches(&pod.namespace),
            options: dns::OPTIONS.iter().map(|o| o.to_string()).collect(),
        });
        let kubelet = &self.kubelets[&pod.node];
        let mut running = kubelet.run_sandbox(&def, Some(ip))?;
        let alias = self.names.pod(&pod.namespace, &pod.name);
        netns::delete(&alias)?;
        netns::ip(&["netns", "attach", &alias, &running.sandbox_pid.to_string()])?;
        let netns = Netns::existing(&alias);
        super::write_resolv_conf(&alias, pod, self.cluster_dns)?;
        // As the lab's own pod namespaces: no IPv6 chatter on eth0.
        netns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        if pod.mesh == Mesh::Sidecar {
            // What a mesh's init container does.
            network::redirect_to_proxy(&netns)?;
        }
        if !sandbox_only {
            kubelet.start_containers(&mut running)?;
        }
        let described = self.describe(pod, &running);
        self.pods.insert(key, running);
        Ok(described)
    }

    /// Starts the containers of a pod started `sandbox_only`.
    pub fn start_containers(&mut self, pod: &PodSpec) -> Result<Pod, LabError> {
        let running = self
            .pods
            .get_mut(&(pod.namespace.clone(), pod.name.clone()))
            .ok_or_else(|| not_running(pod))?;
        self.kubelets[&pod.node].start_containers(running)?;
        let running = self.running(pod)?;
        Ok(self.describe(pod, running))
    }

    /// Replaces a container as the kubelet does after it exited: a new id
    /// and cgroup, one more restart.
    pub fn restart_container(&mut self, pod: &PodSpec, container: &str) -> Result<Pod, LabError> {
        let running = self
            .pods
            .get_mut(&(pod.namespace.clone(), pod.name.clone()))
            .ok_or_else(|| not_running(pod))?;
        self.kubelets[&pod.node].restart_container(running, container)?;
        let running = self.running(pod)?;
        Ok(self.describe(pod, running))
    }

    /// Deletes the pod and its name on the machine.
    pub fn delete_pod(&mut self, pod: &PodSpec) -> Result<(), LabError> {
        let key = (pod.namespace.clone(), pod.name.clone());
        let Some(running) = self.pods.remove(&key) else {
            return Ok(());
        };
        self.kubelets[&pod.node].delete(&running)?;
        netns::delete(&self.names.pod(&pod.namespace, &pod.name))
    }

    /// How many times each container was restarted, by name.
    pub fn restarts(&self, pod: &PodSpec) -> BTreeMap<String, u32> {
        self.running(pod)
            .map(|r| {
                r.containers
                    .iter()
                    .map(|c| (c.name.clone(), c.restarts))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn log(&self, pod: &PodSpec, container: &str) -> String {
        match self.running(pod) {
            Ok(running) => self.kubelets[&pod.node].log(running, container),
            Err(_) => String::new(),
        }
    }

    /// Runs a pod from a manifest on `node`, at `ip`, as that node's
    /// kubelet would; named on the machine like the lab's pods.
    pub fn run_manifest(
        &mut self,
        node: &str,
        manifest: &Manifest,
        ip: Ipv4Addr,
    ) -> Result<Pod, LabError> {
        let kubelet = self
            .kubelets
            .get(node)
            .ok_or_else(|| LabError::NoSuchPod(format!("node {node}")))?;
        let error = |problem: String| LabError::Kubelet {
            node: node.into(),
            pod: format!("{}/{}", manifest.namespace, manifest.name),
            problem,
        };
        let mut def = manifest::pod_def(manifest).map_err(|e| error(e.to_string()))?;
        def.dns = Some(api::DnsConfig {
            servers: vec![self.cluster_dns.to_string()],
            searches: dns::searches(manifest.namespace),
            options: dns::OPTIONS.iter().map(|o| o.to_string()).collect(),
        });
        let mut running = kubelet.run_sandbox(&def, Some(ip))?;
        let alias = self.names.pod(manifest.namespace, manifest.name);
        netns::delete(&alias)?;
        netns::ip(&["netns", "attach", &alias, &running.sandbox_pid.to_string()])?;
        Netns::existing(&alias).sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        let started = kubelet.start_containers(&mut running);
        let described = self.describe_with(node, &running, |_| Vec::new());
        self.manifests.insert(
            (manifest.namespace.into(), manifest.name.into()),
            (node.into(), running),
        );
        started.map(|()| described)
    }

    /// Deletes a pod run from a manifest.
    pub fn delete_manifest(&mut self, namespace: &str, name: &str) -> Result<(), LabError> {
        let Some((node, running)) = self.manifests.remove(&(namespace.into(), name.into())) else {
            return Ok(());
        };
        self.kubelets[&node].delete(&running)?;
        netns::delete(&self.names.pod(namespace, name))
    }

    /// What a container of a pod run from a manifest printed.
    pub fn manifest_log(&self, namespace: &str, name: &str, container: &str) -> String {
        self.manifests
            .get(&(namespace.into(), name.into()))
            .map(|(node, running)| self.kubelets[node].log(running, container))
            .unwrap_or_default()
    }

    /// Loads an image archive into every node.
    pub fn load_image(&self, archive: &Path) -> Result<(), LabError> {
        self.kubelets
            .values()
            .try_for_each(|k| k.containerd().import(archive))
    }

    /// The node's containerd process, by node.
    pub fn containerd_pid(&self, node: &str) -> Option<u32> {
        self.kubelets.get(node).map(|k| k.containerd().pid())
    }

    fn running(&self, pod: &PodSpec) -> Result<&RunningPod, LabError> {
        self.pods
            .get(&(pod.namespace.clone(), pod.name.clone()))
            .ok_or_else(|| not_running(pod))
    }

    /// The pod as the inventory describes it.
    fn describe(&self, pod: &PodSpec, running: &RunningPod) -> Pod {
        self.describe_with(&pod.node, running, |name| {
            pod.containers
                .iter()
                .find(|s| s.name == name)
                .map(ports)
                .unwrap_or_default()
        })
    }

    fn describe_with(
        &self,
        node: &str,
        running: &RunningPod,
        ports: impl Fn(&str) -> Vec<ContainerPort>,
    ) -> Pod {
        let def = &running.def;
        let containers = running
            .containers
            .iter()
            .map(|c| Container {
                name: c.name.clone(),
                id: c.id.clone(),
                cgroup: self
                    .cgroup2
                    .join(running.cgroup_parent.trim_start_matches('/'))
                    .join(&c.id),
                ports: ports(&c.name),
            })
            .collect();
        Pod {
            namespace: def.namespace.clone(),
            name: def.name.clone(),
            uid: def.uid.clone(),
            node: node.into(),
            labels: def.labels.clone(),
            ip: running.ip.expect("a lab pod has its planned address"),
            netns: Some(netns_path(&self.names.pod(&def.namespace, &def.name))),
            containers,
        }
    }
}

fn not_running(pod: &PodSpec) -> LabError {
    LabError::Kubelet {
        node: pod.node.clone(),
        pod: format!("{}/{}", pod.namespace, pod.name),
        problem: "not running".into(),
    }
}

/// A lab pod as the kubelet runs it: every container on the lab's image,
/// the pod's volumes as emptyDirs under [`VOLUMES`].
fn pod_def(
    lab: &str,
    pod: &PodSpec,
    ip: Ipv4Addr,
    services: &[Service],
    incarnation: u32,
) -> PodDef {
    let mounts: Vec<VolumeMount> = pod
        .volumes
        .iter()
        .map(|volume| VolumeMount {
            volume: volume.clone(),
            path: format!("{VOLUMES}/{volume}"),
            read_only: false,
            host_to_container: false,
        })
        .collect();
    PodDef {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: super::uid(lab, &pod.namespace, &pod.name, incarnation),
        labels: pod.labels.clone(),
        host_pid: false,
        dns: None,
        volumes: pod
            .volumes
            .iter()
            .map(|name| Volume {
                name: name.clone(),
                source: VolumeSource::EmptyDir {
                    memory: false,
                    size_limit: None,
                },
            })
            .collect(),
        containers: pod
            .containers
            .iter()
            .map(|c| ContainerDef {
                name: c.name.clone(),
                image: LAB_IMAGE.into(),
                command: c.command.clone(),
                args: Vec::new(),
                env: pod_env(pod, ip, c, VOLUMES, services),
                mounts: mounts.clone(),
                security: Security {
                    run_as_user: c.run_as_user.map(i64::from),
                    ..Default::default()
                },
                resources: c.resources.clone(),
            })
            .collect(),
    }
}
