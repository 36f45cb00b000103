//! A running lab: up, down, status, and the inventory it writes.
//!
//! Everything a lab makes is found again by name, never only by memory: its
//! namespaces start with `obslab-<lab>-`, its cgroups live under
//! `<cgroup2>/obslab-<lab>`, its files under `/run/observer-lab/<lab>`. So
//! `down` also cleans a lab whose `up` was killed halfway.

use std::{
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    io,
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use observer_common::inventory::{
    Container, ContainerPort, Endpoint, ExternalHost, INVENTORY_VERSION, Inventory, Node, Pod,
    Protocol, Service, ServicePort,
};

use crate::{
    LabError,
    container::{self, Launch},
    netns::{self, NETNS_DIR, Netns},
    network::{self, Names},
    spec::Plan,
};

/// Where labs keep their state: inventory, logs, volumes.
pub const STATE_DIR: &str = "/run/observer-lab";
/// How long `up` waits for declared TCP ports to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_TEST_LAB: AtomicU32 = AtomicU32::new(0);

/// A lab that is up. Dropping it takes it down, unless it was [`Lab::keep`]t.
pub struct Lab {
    name: String,
    inventory: Inventory,
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
        fs::read_to_string(log_path(
            &self.name,
            &format!("{namespace}_{pod}_{container}"),
        ))
        .unwrap_or_default()
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

        network::build(plan, &names)?;

        let cgroup_root = cgroup_root(&self.name)?;
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
                })?);
            }
            self.inventory.external_hosts.push(ExternalHost {
                name: spec.external_hosts[host].name.clone(),
                address: spec_host.address,
                netns,
            });
        }

        for (p, pod) in spec.pods.iter().enumerate() {
            let uid = uid(&self.name, &pod.namespace, &pod.name);
            let pod_cgroup = cgroup_root.join(format!("kubepods/besteffort/pod{uid}"));
            let netns = netns_path(&names.pod(&pod.namespace, &pod.name));
            let volumes = state
                .join("volumes")
                .join(format!("{}_{}", pod.namespace, pod.name));
            for volume in &pod.volumes {
                let dir = volumes.join(volume);
                fs::create_dir_all(&dir)
                    .map_err(io_error(format!("creating {}", dir.display())))?;
            }
            let mut containers = Vec::new();
            for c in &pod.containers {
                let id = container_id(&uid, &c.name);
                let cgroup = pod_cgroup.join(&id);
                container::create_cgroup(&cgroup)?;
                let mut env = vec![
                    ("POD_NAME".to_owned(), pod.name.clone()),
                    ("POD_NAMESPACE".into(), pod.namespace.clone()),
                    ("POD_IP".into(), plan.pod_ips[p].to_string()),
                    ("POD_VOLUMES".into(), volumes.display().to_string()),
                    ("CONTAINER_NAME".into(), c.name.clone()),
                ];
                env.extend(service_env(&self.inventory.services, &pod.namespace));
                let log = log_path(
                    &self.name,
                    &format!("{}_{}_{}", pod.namespace, pod.name, c.name),
                );
                self.children.push(container::spawn(&Launch {
                    command: &c.command,
                    netns: &netns,
                    cgroup: &cgroup,
                    env,
                    log: &log,
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
            self.inventory.pods.push(Pod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid,
                node: pod.node.clone(),
                labels: pod.labels.clone(),
                ip: plan.pod_ips[p],
                netns: Some(netns),
                containers,
            });
        }

        let json = serde_json::to_string_pretty(&self.inventory).expect("serializable");
        fs::write(self.inventory_path(), json).map_err(io_error("writing the inventory".into()))?;
        self.wait_listening()
    }

    /// Waits until every declared TCP port listens in its pod, reading the
    /// pod's socket table (so the check itself sends no traffic).
    fn wait_listening(&self) -> Result<(), LabError> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        for pod in &self.inventory.pods {
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

/// Takes down the lab called `name`: its processes, cgroups, namespaces
/// (with their interfaces, routes and iptables rules) and files. Idempotent.
pub fn down(name: &str) -> Result<(), LabError> {
    if let Ok(root) = container::cgroup2_root() {
        container::remove_cgroup_tree(&root.join(format!("{}-{name}", netns::PREFIX)))?;
    }
    for netns in netns::named_with_prefix(Names::new(name).prefix()) {
        netns::delete(&netns)?;
    }
    match fs::remove_dir_all(state_dir(name)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(LabError::Io {
            what: format!("removing {}", state_dir(name).display()),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// Labs with anything left on this machine: state, namespaces or cgroups.
pub fn list() -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    if let Ok(entries) = fs::read_dir(STATE_DIR) {
        names.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    if let Ok(root) = container::cgroup2_root()
        && let Ok(entries) = fs::read_dir(root)
    {
        let prefix = format!("{}-", netns::PREFIX);
        names.extend(entries.flatten().filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix(&prefix)
                .map(str::to_owned)
        }));
    }
    names.into_iter().collect()
}

/// Takes down test labs (named `<pid>-<n>`) whose process is gone, and
/// deletes test namespaces likewise. Returns what it removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in list() {
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && down(&name).is_ok() {
            removed.push(format!("lab {name}"));
        }
    }
    removed.extend(
        netns::cleanup_stale()
            .into_iter()
            .map(|n| format!("namespace {n}")),
    );
    removed
}

/// Whether the lab is fully up: every namespace there, every container
/// running.
pub fn is_healthy(name: &str) -> bool {
    let Ok(text) = fs::read_to_string(state_dir(name).join("inventory.json")) else {
        return false;
    };
    let Ok(inv) = serde_json::from_str::<Inventory>(&text) else {
        return false;
    };
    inv.pods.iter().all(|pod| {
        pod.netns.as_ref().is_some_and(|n| n.exists())
            && pod
                .containers
                .iter()
                .all(|c| container::has_processes(&c.cgroup))
    }) && inv
        .nodes
        .iter()
        .all(|n| n.netns.as_ref().is_some_and(|n| n.exists()))
}

/// What `cargo xtask lab status` shows about a lab.
pub fn status(name: &str) -> Result<String, LabError> {
    let path = state_dir(name).join("inventory.json");
    let Ok(text) = fs::read_to_string(&path) else {
        let leftovers = netns::named_with_prefix(Names::new(name).prefix());
        return Ok(format!(
            "lab {name}: no inventory (a partial lab: {} namespaces); `cargo xtask lab down` removes it\n",
            leftovers.len()
        ));
    };
    let inv: Inventory = serde_json::from_str(&text).map_err(|e| LabError::Io {
        what: format!("reading {}", path.display()),
        source: e.into(),
    })?;
    let mut out = format!("lab {name} (inventory: {})\n", path.display());
    for node in &inv.nodes {
        out += &format!(
            "  node {:<12} {:<15} pods {}\n",
            node.name,
            node.address,
            node.pod_cidr.map(|c| c.to_string()).unwrap_or_default()
        );
    }
    for pod in &inv.pods {
        let alive = pod.netns.as_ref().is_some_and(|n| n.exists());
        out += &format!(
            "  pod  {:<24} {:<15} on {:<8} {}\n",
            format!("{}/{}", pod.namespace, pod.name),
            pod.ip,
            pod.node,
            if alive { "" } else { "(namespace gone)" }
        );
        for c in &pod.containers {
            let state = if container::has_processes(&c.cgroup) {
                "running"
            } else {
                "stopped"
            };
            let ports: Vec<String> = c
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.container_port, p.protocol.name()))
                .collect();
            out += &format!(
                "       container {:<12} {:<8} {}\n",
                c.name,
                state,
                ports.join(" ")
            );
        }
    }
    for s in &inv.services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}->{}", p.port, p.target_port))
            .collect();
        let endpoints: Vec<String> = s.endpoints.iter().map(|e| e.ip.to_string()).collect();
        out += &format!(
            "  svc  {:<24} {:<15} {} -> {}\n",
            format!("{}/{}", s.namespace, s.name),
            s.cluster_ip,
            ports.join(","),
            endpoints.join(",")
        );
    }
    for host in &inv.external_hosts {
        out += &format!("  ext  {:<24} {}\n", host.name, host.address);
    }
    Ok(out)
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

fn state_dir(lab: &str) -> PathBuf {
    Path::new(STATE_DIR).join(lab)
}

fn log_path(lab: &str, name: &str) -> PathBuf {
    state_dir(lab).join("logs").join(format!("{name}.log"))
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn cgroup_root(lab: &str) -> Result<PathBuf, LabError> {
    Ok(container::cgroup2_root()?.join(format!("{}-{lab}", netns::PREFIX)))
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

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> LabError {
    move |source| LabError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
