//! The lab's kubelet, for the containerd runtime: it turns a pod into the
//! CRI calls a kubelet makes (RunPodSandbox with the pod's cgroup parent
//! and DNS, CreateContainer and StartContainer per container), sets up the
//! pod's volumes in the node's filesystem, and restarts and deletes pods
//! and containers on request. It runs no sync loop: what it does happens
//! when the lab (or a test) asks.

mod config;
pub mod manifest;
pub mod qos;

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use config::{container_config, log_path, pod_name, sandbox_config, volume_path};

use crate::{
    LabError,
    containerd::Containerd,
    cri::api::{self, ContainerState},
    lab::io_error,
};
pub use qos::{Qos, Resources};

/// How long a stopped container gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A pod as the kubelet needs it, from a lab file or a manifest.
#[derive(Clone, Debug, Default)]
pub struct PodDef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// `hostPID: true`.
    pub host_pid: bool,
    /// The pod's resolv.conf (the cluster's DNS), if any.
    pub dns: Option<api::DnsConfig>,
    pub volumes: Vec<Volume>,
    pub containers: Vec<ContainerDef>,
}

#[derive(Clone, Debug, Default)]
pub struct ContainerDef {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<VolumeMount>,
    pub security: Security,
    pub resources: Resources,
}

/// A container's `securityContext`.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub run_as_user: Option<i64>,
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    pub seccomp: Option<api::ProfileType>,
    pub apparmor: Option<api::ProfileType>,
}

#[derive(Clone, Debug)]
pub struct Volume {
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Clone, Debug)]
pub enum VolumeSource {
    /// A directory of the pod's; in memory (tmpfs) if `memory`.
    EmptyDir {
        memory: bool,
        size_limit: Option<String>,
    },
    /// A path of the node's.
    HostPath(String),
    /// Files (a ConfigMap's data), by name.
    Files(BTreeMap<String, String>),
}

#[derive(Clone, Debug, Default)]
pub struct VolumeMount {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
    /// `mountPropagation: HostToContainer`.
    pub host_to_container: bool,
}

/// A pod the kubelet runs.
#[derive(Clone, Debug)]
pub struct RunningPod {
    pub def: PodDef,
    pub sandbox: String,
    /// The sandbox's process (the pause), which holds the namespaces.
    pub sandbox_pid: u32,
    pub ip: Option<Ipv4Addr>,
    /// The pod's cgroup, from the hierarchy's root.
    pub cgroup_parent: String,
    pub containers: Vec<RunningContainer>,
    config: api::PodSandboxConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningContainer {
    pub name: String,
    pub id: String,
    /// How many times it was restarted.
    pub restarts: u32,
}

/// The kubelet of one node.
pub struct Kubelet {
    node: String,
    containerd: Containerd,
    /// The lab's cgroup, from the hierarchy's root (`/obslab-<lab>`):
    /// `kubepods` goes below it.
    cgroup_root: String,
}

impl Kubelet {
    pub fn new(node: &str, containerd: Containerd, cgroup_root: String) -> Self {
        Self {
            node: node.into(),
            containerd,
            cgroup_root,
        }
    }

    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }

    /// Makes the pod's sandbox, at `ip` if given; no container yet.
    pub fn run_sandbox(&self, def: &PodDef, ip: Option<Ipv4Addr>) -> Result<RunningPod, LabError> {
        let qos = Qos::of(def.containers.iter().map(|c| &c.resources));
        let cgroup_parent = format!("{}/{}", self.cgroup_root, qos.pod_cgroup(&def.uid));
        let config = sandbox_config(def, &cgroup_parent);
        self.volumes(def)?;
        if let Some(ip) = ip {
            self.containerd.next_address(ip)?;
        }
        let cri = self.containerd.cri();
        let sandbox = cri
            .run_pod_sandbox(&config)
            .map_err(|e| self.error(def, e))?;
        let state = cri
            .pod_sandbox_status(&sandbox)
            .map_err(|e| self.error(def, e))?;
        let got = state.ip.as_deref().and_then(|ip| ip.parse().ok());
        if let Some(want) = ip
            && got != Some(want)
        {
            return Err(LabError::Kubelet {
                node: self.node.clone(),
                pod: pod_name(def),
                problem: format!("the sandbox got {:?}, not the planned {want}", state.ip),
            });
        }
        Ok(RunningPod {
            def: def.clone(),
            sandbox,
            sandbox_pid: state.pid,
            ip: got,
            cgroup_parent,
            containers: Vec::new(),
            config,
        })
    }

    /// Creates and starts the pod's containers, in order.
    pub fn start_containers(&self, pod: &mut RunningPod) -> Result<(), LabError> {
        for c in 0..pod.def.containers.len() {
            let id = self.start_container(pod, c, 0)?;
            pod.containers.push(RunningContainer {
                name: pod.def.containers[c].name.clone(),
                id,
                restarts: 0,
            });
        }
        Ok(())
    }

    /// Does what the kubelet does when a container has exited: a new
    /// container (new id, new cgroup) in the same sandbox. The old one is
    /// stopped first if it still runs.
    pub fn restart_container(&self, pod: &mut RunningPod, name: &str) -> Result<(), LabError> {
        let c = pod
            .containers
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| LabError::Kubelet {
                node: self.node.clone(),
                pod: pod_name(&pod.def),
                problem: format!("no container {name}"),
            })?;
        let cri = self.containerd.cri();
        let old = pod.containers[c].clone();
        cri.stop_container(&old.id, STOP_GRACE)
            .map_err(|e| self.error(&pod.def, e))?;
        cri.remove_container(&old.id)
            .map_err(|e| self.error(&pod.def, e))?;
        let index = pod
            .def
            .containers
            .iter()
            .position(|d| d.name == name)
            .expect("a running container has a definition");
        let id = self.start_container(pod, index, old.restarts + 1)?;
        pod.containers[c] = RunningContainer {
            name: old.name,
            id,
            restarts: old.restarts + 1,
        };
        Ok(())
    }

    /// Deletes the pod: its containers, then its sandbox and network.
    pub fn delete(&self, pod: &RunningPod) -> Result<(), LabError> {
        let cri = self.containerd.cri();
        for c in &pod.containers {
            cri.stop_container(&c.id, STOP_GRACE)
                .map_err(|e| self.error(&pod.def, e))?;
        }
        cri.stop_pod_sandbox(&pod.sandbox)
            .map_err(|e| self.error(&pod.def, e))?;
        cri.remove_pod_sandbox(&pod.sandbox)
            .map_err(|e| self.error(&pod.def, e))
    }

    /// The container's log, as the runtime wrote it (CRI format: time,
    /// stream, tag, then the line).
    pub fn log(&self, pod: &RunningPod, container: &str) -> String {
        let Some(c) = pod.containers.iter().find(|c| c.name == container) else {
            return String::new();
        };
        let path = self.containerd.fs().host_path(&format!(
            "{}/{}",
            pod.config.log_directory,
            log_path(container, c.restarts)
        ));
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| line.splitn(4, ' ').nth(3).unwrap_or(line))
            .fold(String::new(), |log, line| log + line + "\n")
    }

    fn start_container(
        &self,
        pod: &RunningPod,
        index: usize,
        attempt: u32,
    ) -> Result<String, LabError> {
        let def = &pod.def.containers[index];
        let config = container_config(&pod.def, def, attempt, &self.volume_dir(&pod.def));
        let cri = self.containerd.cri();
        let id = cri
            .create_container(&pod.sandbox, &config, &pod.config)
            .map_err(|e| self.error(&pod.def, e))?;
        cri.start_container(&id)
            .map_err(|e| self.error(&pod.def, e))?;
        // Running, or the reason it is not.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let (status, _) = cri
                .container_status(&id)
                .map_err(|e| self.error(&pod.def, e))?;
            match ContainerState::try_from(status.state) {
                Ok(ContainerState::Running) => return Ok(id),
                Ok(ContainerState::Exited) => {
                    let log = self.containerd.fs().host_path(&format!(
                        "{}/{}",
                        pod.config.log_directory,
                        log_path(&def.name, attempt)
                    ));
                    return Err(LabError::Kubelet {
                        node: self.node.clone(),
                        pod: pod_name(&pod.def),
                        problem: format!(
                            "container {} exited at once ({}, code {}); its log:\n{}",
                            def.name,
                            status.reason,
                            status.exit_code,
                            fs::read_to_string(log).unwrap_or_default()
                        ),
                    });
                }
                _ if Instant::now() > deadline => {
                    return Err(LabError::Kubelet {
                        node: self.node.clone(),
                        pod: pod_name(&pod.def),
                        problem: format!("container {} did not start", def.name),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `/var/lib/kubelet/pods/<uid>/volumes` of the node.
    fn volume_dir(&self, def: &PodDef) -> String {
        format!("/var/lib/kubelet/pods/{}/volumes", def.uid)
    }

    /// Makes the pod's volumes in the node's filesystem.
    fn volumes(&self, def: &PodDef) -> Result<(), LabError> {
        for volume in &def.volumes {
            let Some(path) = volume_path(&self.volume_dir(def), volume) else {
                continue;
            };
            let dir = self.containerd.fs().host_path(&path);
            fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
            match &volume.source {
                VolumeSource::EmptyDir {
                    memory: true,
                    size_limit,
                } => self.mount_tmpfs(&path, size_limit.as_deref())?,
                VolumeSource::Files(files) => {
                    for (name, text) in files {
                        fs::write(dir.join(name), text)
                            .map_err(io_error(format!("writing {name} of {}", volume.name)))?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A tmpfs in the node's mount namespace (where containerd sees it).
    fn mount_tmpfs(&self, path: &str, size: Option<&str>) -> Result<(), LabError> {
        let mount_ns = format!("/proc/{}/ns/mnt", self.containerd.pid());
        let mut command = Command::new("nsenter");
        command.arg(format!("--mount={mount_ns}"));
        command.args(["mount", "-t", "tmpfs"]);
        if let Some(size) = size {
            command.args(["-o", &format!("size={}", size.trim_end_matches('i'))]);
        }
        command.args(["tmpfs", path]);
        crate::netns::output(&mut command).map(drop)
    }

    fn error(&self, def: &PodDef, error: crate::cri::CriError) -> LabError {
        LabError::Kubelet {
            node: self.node.clone(),
            pod: pod_name(def),
            problem: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
