//! A running lab: up, down, status, and the inventory it writes.
//!
//! Everything a lab makes is found again by name, never only by memory: its
//! namespaces start with `obslab-<lab>-`, its cgroups live under
//! `<cgroup2>/obslab-<lab>`, its files under `/run/observer-lab/<lab>`. So
//! `down` also cleans a lab whose `up` was killed halfway.

mod pods;

pub use pods::ManifestPod;

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use observer_common::inventory::{
    Endpoint, ExternalHost, INVENTORY_VERSION, Inventory, Node, Pod, Protocol, Service, ServicePort,
};

use crate::{
    LabError,
    container::{self, Launch},
    kubelet::manifest::{ApiServer, Manifest},
    netns::{self, NETNS_DIR, Netns},
    network::{self, Names},
    runtime, socket_lb,
    spec::{Dataplane, Plan, PodSpec, Runtime},
    state::down,
};

/// Where labs keep their state: inventory, logs, volumes.
pub const STATE_DIR: &str = "/run/observer-lab";
/// How long `up` waits for declared TCP ports to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_TEST_LAB: AtomicU32 = AtomicU32::new(0);

/// A lab that is up. Dropping it takes it down, unless it was [`Lab::keep`]t.
pub struct Lab {
    name: String,
    plan: Plan,
    inventory: Inventory,
    /// The nodes' kubelets and containerds, with the containerd runtime.
    nodes: Option<runtime::cri::Nodes>,
    children: Vec<Child>,
    keep: bool,
}

impl Lab {
    /// Builds the lab. All or nothing: on error, what was made is removed.
    /// A lab of the same name that is already up is taken down first.
    pub fn up(plan: &Plan) -> Result<Self, LabError> {
        for tool in ["ip", "iptables"] {
            if which(tool).is_none() {
                return Err(LabError::MissingTool(tool));
            }
        }
        let name = plan.spec.name.clone();
        down(&name)?;
        let mut lab = Self {
            inventory: Inventory {
                version: INVENTORY_VERSION,
                cluster: name.clone(),
                pod_cidrs: Vec::new(),
                service_cidr: Some(plan.spec.network.service_cidr),
                nodes: Vec::new(),
                pods: Vec::new(),
                services: Vec::new(),
                external_hosts: Vec::new(),
            },
            name,
            plan: plan.clone(),
            nodes: None,
            children: Vec::new(),
            keep: false,
        };
        // On error `lab` drops here, which takes down what was made.
        lab.build(plan)?;
        Ok(lab)
    }

    /// Like [`Lab::up`], named after this process (`<pid>-<n>`), so that a
    /// test run that was killed is cleaned up by [`cleanup_stale`].
    pub fn up_for_test(plan: &Plan) -> Result<Self, LabError> {
        let mut plan = plan.clone();
        let n = NEXT_TEST_LAB.fetch_add(1, Ordering::Relaxed);
        plan.spec.name = format!("{}-{n}", std::process::id());
        Self::up(&plan)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// The inventory file the observer's local mode reads.
    pub fn inventory_path(&self) -> PathBuf {
        state_dir(&self.name).join("inventory.json")
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.inventory
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The pod's network namespace, to run things in.
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Netns {
        Netns::existing(&Names::new(&self.name).pod(namespace, name))
    }

    pub fn node_netns(&self, node: &str) -> Netns {
        Netns::existing(&Names::new(&self.name).node(node))
    }

    pub fn external_netns(&self, host: &str) -> Netns {
        Netns::existing(&Names::new(&self.name).external(host))
    }

    /// What a container printed so far.
    pub fn log(&self, namespace: &str, pod: &str, container: &str) -> String {
        if let Some(nodes) = &self.nodes {
            return match self.pod_spec(namespace, pod) {
                Some(spec) => nodes.log(spec, container),
                None => nodes.manifest_log(namespace, pod, container),
            };
        }
        fs::read_to_string(log_path(
            &self.name,
            &format!("{namespace}_{pod}_{container}"),
        ))
        .unwrap_or_default()
    }

    /// containerd runtime: the node's containerd process (its mount
    /// namespace is the node's filesystem).
    pub fn containerd_pid(&self, node: &str) -> Option<u32> {
        self.nodes.as_ref()?.containerd_pid(node)
    }

    /// How pods are made in this lab.
    pub fn runtime(&self) -> Runtime {
        self.plan.spec.runtime
    }

    /// What an external host's server printed so far.
    pub fn external_log(&self, host: &str) -> String {
        fs::read_to_string(log_path(&self.name, &format!("external_{host}"))).unwrap_or_default()
    }

    /// Leaves the lab running after this handle is gone (`cargo xtask lab up`).
    pub fn keep(mut self) {
        self.keep = true;
    }

    fn build(&mut self, plan: &Plan) -> Result<(), LabError> {
        let spec = &plan.spec;
        let names = Names::new(&self.name);
        let state = state_dir(&self.name);
        for dir in [state.join("logs"), state.join("volumes")] {
            fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        }
        fs::write(state.join("lab.yaml"), plan.source.as_bytes())
            .map_err(io_error("writing lab.yaml".into()))?;
        fs::write(state.join("runtime"), spec.runtime.name())
            .map_err(io_error("writing the runtime".into()))?;

        network::build(plan, &names)?;

        let cgroup_root = cgroup_root(&self.name)?;
        container::create_cgroup(&cgroup_root)?;
        if spec.network.dataplane == Dataplane::SocketLb {
            socket_lb::install(plan, &cgroup_root, &state)?;
        }
        let inv = &mut self.inventory;
        inv.pod_cidrs = spec.nodes.iter().map(|n| n.pod_cidr.trunc()).collect();
        inv.nodes = spec
            .nodes
            .iter()
            .zip(&plan.node_addresses)
            .map(|(node, address)| Node {
                name: node.name.clone(),
                address: *address,
                pod_cidr: Some(node.pod_cidr.trunc()),
                netns: Some(netns_path(&names.node(&node.name))),
            })
            .collect();
        inv.services = spec
            .services
            .iter()
            .zip(&plan.endpoints)
            .map(|(service, backends)| Service {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                cluster_ip: service.cluster_ip,
                ports: service
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        target_port: p.target_port.unwrap_or(p.port),
                        protocol: p.protocol,
                    })
                    .collect(),
                selector: service.selector.clone(),
                endpoints: backends
                    .iter()
                    .map(|&p| Endpoint {
                        namespace: spec.pods[p].namespace.clone(),
                        pod: spec.pods[p].name.clone(),
                        ip: plan.pod_ips[p],
                    })
                    .collect(),
            })
            .collect();

        for (host, spec_host) in spec.external_hosts.iter().enumerate() {
            let netns = netns_path(&names.external(&spec_host.name));
            if !spec_host.command.is_empty() {
                let cgroup = cgroup_root.join("external").join(&spec_host.name);
                container::create_cgroup(&cgroup)?;
                let log = log_path(&self.name, &format!("external_{}", spec_host.name));
                let env = vec![("HOST_IP".into(), spec_host.address.to_string())];
                self.children.push(container::spawn(&Launch {
                    command: &spec_host.command,
                    netns: &netns,
                    cgroup: &cgroup,
                    env,
                    log: &log,
                    user: None,
                    resolv_conf: None,
                })?);
            }
            self.inventory.external_hosts.push(ExternalHost {
                name: spec.external_hosts[host].name.clone(),
                address: spec_host.address,
                netns,
            });
        }

        if spec.runtime == Runtime::Containerd {
            self.nodes = Some(runtime::cri::Nodes::start(
                &self.name,
                plan,
                &cgroup_root,
                &state,
                &mut self.children,
            )?);
        }
        for p in 0..spec.pods.len() {
            let pod = match &mut self.nodes {
                Some(nodes) => nodes.start_pod(
                    &spec.pods[p],
                    plan.pod_ips[p],
                    &self.inventory.services,
                    false,
                )?,
                None => runtime::process::start_pod(
                    &runtime::process::PodStart {
                        lab: &self.name,
                        plan,
                        index: p,
                        names: &names,
                        cgroup_root: &cgroup_root,
                        services: &self.inventory.services,
                    },
                    &mut self.children,
                )?,
            };
            self.inventory.pods.push(pod);
        }

        let json = serde_json::to_string_pretty(&self.inventory).expect("serializable");
        fs::write(self.inventory_path(), json).map_err(io_error("writing the inventory".into()))?;
        self.wait_listening(&self.inventory.pods)
    }

    /// Waits until every declared TCP port of `pods` listens, reading the
    /// pod's socket table (so the check itself sends no traffic).
    fn wait_listening(&self, pods: &[Pod]) -> Result<(), LabError> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        for pod in pods {
            let netns = self.pod_netns(&pod.namespace, &pod.name);
            for c in &pod.containers {
                for port in c.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                    while !netns.run(|| listening(port.container_port))? {
                        if Instant::now() > deadline {
                            return Err(LabError::NotListening {
                                pod: format!("{}/{}", pod.namespace, pod.name),
                                container: c.name.clone(),
                                port: port.container_port,
                                log: self.log(&pod.namespace, &pod.name, &c.name),
                            });
                        }
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(err) = down(&self.name) {
            eprintln!("lab {}: down: {err}", self.name);
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

/// Whether something listens on TCP `port` in this thread's namespace.
fn listening(port: u16) -> bool {
    const LISTEN: &str = "0A";
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .any(|table| {
            table.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 3
                    && fields[3] == LISTEN
                    && fields[1]
                        .rsplit_once(':')
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
}

pub(crate) fn state_dir(lab: &str) -> PathBuf {
    Path::new(STATE_DIR).join(lab)
}

pub(crate) fn log_path(lab: &str, name: &str) -> PathBuf {
    state_dir(lab).join("logs").join(format!("{name}.log"))
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn cgroup_root(lab: &str) -> Result<PathBuf, LabError> {
    Ok(container::cgroup2_root()?.join(format!("{}-{lab}", netns::PREFIX)))
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

pub(crate) fn io_error(what: String) -> impl FnOnce(io::Error) -> LabError {
    move |source| LabError::Io { what, source }
}
