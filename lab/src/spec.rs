//! The lab file (YAML) and its validation into a [`Plan`].
//!
//! Everything is checked before anything is created, so a bad file creates
//! nothing. Each problem names the field it is about, as a path such as
//! `pods[2].containers[0].ports[1]`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use observer_common::inventory::Protocol;
use serde::Deserialize;

pub const API_VERSION: &str = "observer-lab/v1";
/// The default lab: the cases users ask about.
pub const DEFAULT_LAB: &str = include_str!("../default-lab.yaml");

/// A lab file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabSpec {
    pub api_version: String,
    pub kind: String,
    /// Lowercase letters, digits and `-`; names the lab's namespaces.
    pub name: String,
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
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            service_cidr: default_service_cidr(),
            node_cidr: default_node_cidr(),
            external_cidr: default_external_cidr(),
        }
    }
}

fn default_service_cidr() -> Ipv4Net {
    "10.96.0.0/16".parse().expect("valid")
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

    fn new(spec: LabSpec, source: &str) -> Result<Self, (String, String)> {
        let mut check = Checker::default();
        check.header(&spec)?;
        let node_addresses = check.network(&spec)?;
        let pod_ips = check.pods(&spec)?;
        let endpoints = check.services(&spec)?;
        check.external(&spec)?;
        Ok(Self {
            spec,
            source: source.into(),
            node_addresses,
            pod_ips,
            endpoints,
        })
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

type Check<T> = Result<T, (String, String)>;

fn problem<T>(field: impl Into<String>, problem: impl Into<String>) -> Check<T> {
    Err((field.into(), problem.into()))
}

#[derive(Default)]
struct Checker {
    /// Every address given out so far, and to whom.
    addresses: HashMap<Ipv4Addr, String>,
}

impl Checker {
    fn header(&mut self, spec: &LabSpec) -> Check<()> {
        if spec.api_version != API_VERSION {
            return problem(
                "apiVersion",
                format!(
                    "`{}` is not supported: use `{API_VERSION}`",
                    spec.api_version
                ),
            );
        }
        if spec.kind != "Lab" {
            return problem("kind", format!("`{}`: must be `Lab`", spec.kind));
        }
        dns_label("name", &spec.name, 20)
    }

    fn network(&mut self, spec: &LabSpec) -> Check<Vec<Ipv4Addr>> {
        let net = &spec.network;
        let mut ranges: Vec<(String, Ipv4Net)> = vec![
            ("network.serviceCIDR".into(), net.service_cidr),
            ("network.nodeCIDR".into(), net.node_cidr),
            ("network.externalCIDR".into(), net.external_cidr),
        ];
        if spec.nodes.is_empty() {
            return problem("nodes", "a lab needs at least one node");
        }
        let mut names = HashSet::new();
        for (i, node) in spec.nodes.iter().enumerate() {
            let field = format!("nodes[{i}]");
            dns_label(&format!("{field}.name"), &node.name, 20)?;
            if !names.insert(&node.name) {
                return problem(
                    format!("{field}.name"),
                    format!("duplicate node name `{}`", node.name),
                );
            }
            if node.pod_cidr.prefix_len() > 29 {
                return problem(
                    format!("{field}.podCIDR"),
                    format!("{} is too small for pods", node.pod_cidr),
                );
            }
            ranges.push((format!("{field}.podCIDR"), node.pod_cidr.trunc()));
        }
        for (i, (field, range)) in ranges.iter().enumerate() {
            for (other_field, other) in &ranges[..i] {
                if range.contains(other) || other.contains(range) {
                    return problem(
                        field.clone(),
                        format!("{range} overlaps {other_field} ({other})"),
                    );
                }
            }
        }
        let hosts: Vec<Ipv4Addr> = net
            .node_cidr
            .hosts()
            .skip(1)
            .take(spec.nodes.len())
            .collect();
        if hosts.len() < spec.nodes.len() {
            return problem("network.nodeCIDR", "too small for every node");
        }
        for (node, address) in spec.nodes.iter().zip(&hosts) {
            self.addresses
                .insert(*address, format!("node {}", node.name));
        }
        Ok(hosts)
    }

    fn pods(&mut self, spec: &LabSpec) -> Check<Vec<Ipv4Addr>> {
        let mut names = HashSet::new();
        // Fixed addresses first, so that automatic ones go around them.
        for (i, pod) in spec.pods.iter().enumerate() {
            let field = format!("pods[{i}]");
            dns_label(&format!("{field}.name"), &pod.name, 40)?;
            dns_label(&format!("{field}.namespace"), &pod.namespace, 40)?;
            if !names.insert((&pod.namespace, &pod.name)) {
                return problem(
                    format!("{field}.name"),
                    format!("duplicate pod `{}/{}`", pod.namespace, pod.name),
                );
            }
            let Some(node) = spec.nodes.iter().find(|n| n.name == pod.node) else {
                return problem(
                    format!("{field}.node"),
                    format!("no node is named `{}`", pod.node),
                );
            };
            if let Some(ip) = pod.ip {
                let cidr = node.pod_cidr.trunc();
                if !cidr.contains(&ip)
                    || ip == cidr.network()
                    || ip == cidr.broadcast()
                    || ip == first_host(cidr)
                {
                    return problem(
                        format!("{field}.ip"),
                        format!("{ip} is not a pod address of node {} ({cidr})", node.name),
                    );
                }
                self.claim(ip, &format!("{field}.ip"), &format!("pod {}", pod.name))?;
            }
            self.containers(&field, pod)?;
        }
        let mut ips = Vec::with_capacity(spec.pods.len());
        for (i, pod) in spec.pods.iter().enumerate() {
            let ip = match pod.ip {
                Some(ip) => ip,
                None => {
                    let node = spec
                        .nodes
                        .iter()
                        .find(|n| n.name == pod.node)
                        .expect("checked");
                    let cidr = node.pod_cidr.trunc();
                    let Some(ip) = cidr
                        .hosts()
                        .skip(1)
                        .find(|ip| !self.addresses.contains_key(ip))
                    else {
                        return problem(
                            format!("pods[{i}]"),
                            format!("node {} has no pod address left in {cidr}", node.name),
                        );
                    };
                    self.addresses.insert(ip, format!("pod {}", pod.name));
                    ip
                }
            };
            ips.push(ip);
        }
        Ok(ips)
    }

    fn containers(&mut self, field: &str, pod: &PodSpec) -> Check<()> {
        if pod.containers.is_empty() {
            return problem(
                format!("{field}.containers"),
                "a pod needs at least one container",
            );
        }
        let mut names = HashSet::new();
        for (v, volume) in pod.volumes.iter().enumerate() {
            dns_label(&format!("{field}.volumes[{v}]"), volume, 40)?;
            if !names.insert(volume) {
                return problem(
                    format!("{field}.volumes[{v}]"),
                    format!("duplicate volume `{volume}`"),
                );
            }
        }
        names.clear();
        // Containers of a pod share one port space.
        let mut ports: HashMap<(u16, Protocol), &str> = HashMap::new();
        for (c, container) in pod.containers.iter().enumerate() {
            let field = format!("{field}.containers[{c}]");
            dns_label(&format!("{field}.name"), &container.name, 40)?;
            if !names.insert(&container.name) {
                return problem(
                    format!("{field}.name"),
                    format!("duplicate container name `{}`", container.name),
                );
            }
            if container.command.is_empty() {
                return problem(format!("{field}.command"), "must name a program");
            }
            for (p, port) in container.ports.iter().enumerate() {
                let field = format!("{field}.ports[{p}].containerPort");
                if port.container_port == 0 {
                    return problem(field, "port 0 is not a port");
                }
                let key = (port.container_port, port.protocol);
                if let Some(other) = ports.insert(key, &container.name) {
                    return problem(
                        field,
                        format!(
                            "{}/{} is already used by container `{other}` of this pod: \
                             containers of a pod share one port space",
                            port.container_port,
                            port.protocol.name()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn services(&mut self, spec: &LabSpec) -> Check<Vec<Vec<usize>>> {
        let mut names = HashSet::new();
        let mut all = Vec::new();
        for (i, service) in spec.services.iter().enumerate() {
            let field = format!("services[{i}]");
            dns_label(&format!("{field}.name"), &service.name, 40)?;
            if !names.insert((&service.namespace, &service.name)) {
                return problem(
                    format!("{field}.name"),
                    format!("duplicate service `{}/{}`", service.namespace, service.name),
                );
            }
            let range = spec.network.service_cidr;
            if !range.contains(&service.cluster_ip)
                || service.cluster_ip == range.network()
                || service.cluster_ip == range.broadcast()
            {
                return problem(
                    format!("{field}.clusterIP"),
                    format!(
                        "{} is not in network.serviceCIDR ({range})",
                        service.cluster_ip
                    ),
                );
            }
            self.claim(
                service.cluster_ip,
                &format!("{field}.clusterIP"),
                &format!("service {}", service.name),
            )?;
            if service.selector.is_empty() {
                return problem(format!("{field}.selector"), "must select pods by label");
            }
            let backends: Vec<usize> = spec
                .pods
                .iter()
                .enumerate()
                .filter(|(_, pod)| {
                    pod.namespace == service.namespace
                        && service
                            .selector
                            .iter()
                            .all(|(k, v)| pod.labels.get(k) == Some(v))
                })
                .map(|(p, _)| p)
                .collect();
            if backends.is_empty() {
                return problem(
                    format!("{field}.selector"),
                    format!(
                        "selects no pod in namespace `{}`: {}",
                        service.namespace,
                        selector_text(&service.selector)
                    ),
                );
            }
            if service.ports.is_empty() {
                return problem(
                    format!("{field}.ports"),
                    "a service needs at least one port",
                );
            }
            let mut ports = HashSet::new();
            for (p, port) in service.ports.iter().enumerate() {
                let field = format!("{field}.ports[{p}]");
                if port.port == 0 || port.target_port == Some(0) {
                    return problem(field, "port 0 is not a port");
                }
                if !ports.insert((port.port, port.protocol)) {
                    return problem(
                        format!("{field}.port"),
                        format!("duplicate port {}/{}", port.port, port.protocol.name()),
                    );
                }
            }
            all.push(backends);
        }
        Ok(all)
    }

    fn external(&mut self, spec: &LabSpec) -> Check<()> {
        let mut names = HashSet::new();
        for (i, host) in spec.external_hosts.iter().enumerate() {
            let field = format!("externalHosts[{i}]");
            dns_label(&format!("{field}.name"), &host.name, 20)?;
            if !names.insert(&host.name) {
                return problem(
                    format!("{field}.name"),
                    format!("duplicate external host `{}`", host.name),
                );
            }
            let range = spec.network.external_cidr;
            if !range.contains(&host.address)
                || host.address == range.network()
                || host.address == range.broadcast()
            {
                return problem(
                    format!("{field}.address"),
                    format!("{} is not in network.externalCIDR ({range})", host.address),
                );
            }
            self.claim(
                host.address,
                &format!("{field}.address"),
                &format!("external host {}", host.name),
            )?;
        }
        Ok(())
    }

    fn claim(&mut self, address: Ipv4Addr, field: &str, owner: &str) -> Check<()> {
        if let Some(other) = self.addresses.insert(address, owner.into()) {
            return problem(
                field,
                format!("{address} is already the address of {other}"),
            );
        }
        Ok(())
    }
}

fn first_host(cidr: Ipv4Net) -> Ipv4Addr {
    cidr.trunc().hosts().next().expect("prefix checked")
}

/// Kubernetes-style names: lowercase letters, digits and `-`, not at the ends.
fn dns_label(field: &str, value: &str, max: usize) -> Check<()> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        problem(
            field,
            format!(
                "`{value}` must be 1 to {max} lowercase letters, digits or `-`, \
                 starting and ending with a letter or digit"
            ),
        )
    }
}

fn selector_text(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: observer-lab/v1
kind: Lab
name: t
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
  - name: node-2
    podCIDR: 10.244.2.0/24
pods:
  - name: web
    labels: {app: web}
    node: node-1
    containers:
      - name: web
        command: [python3, -m, http.server, "80"]
        ports: [{containerPort: 80}]
  - name: fixed
    node: node-2
    ip: 10.244.2.50
    containers:
      - name: c
        command: [sleep, "60"]
services:
  - name: web
    clusterIP: 10.96.0.10
    selector: {app: web}
    ports: [{port: 80}]
externalHosts:
  - name: internet
    address: 192.168.200.10
"#;

    fn invalid(yaml: &str) -> String {
        Plan::from_yaml(yaml, "lab.yaml").unwrap_err().to_string()
    }

    /// The good file with `from` replaced by `to`.
    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn the_default_lab_is_valid() {
        let plan = Plan::default_lab();
        assert_eq!(plan.spec.name, "demo");
    }

    #[test]
    fn plans_addresses() {
        let plan = Plan::from_yaml(GOOD, "lab.yaml").unwrap();
        assert_eq!(
            plan.node_addresses,
            [
                "172.18.0.2".parse::<Ipv4Addr>().unwrap(),
                "172.18.0.3".parse().unwrap()
            ]
        );
        assert_eq!(plan.pod_ips[0], "10.244.1.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(plan.pod_ips[1], "10.244.2.50".parse::<Ipv4Addr>().unwrap());
        assert_eq!(plan.gateway(0), "10.244.1.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(plan.endpoints, [vec![0]]);
    }

    #[test]
    fn names_duplicate_names() {
        let yaml = with(
            "  - name: fixed\n    node: node-2",
            "  - name: web\n    node: node-2",
        );
        assert_eq!(
            invalid(&yaml),
            "lab.yaml: pods[1].name: duplicate pod `default/web`"
        );
        let yaml = with(
            "      - name: c\n",
            "      - name: c\n        command: [x]\n      - name: c\n",
        );
        assert!(invalid(&yaml).contains("duplicate"), "{}", invalid(&yaml));
    }

    #[test]
    fn names_a_selector_that_selects_nothing() {
        let yaml = with("selector: {app: web}", "selector: {app: nope}");
        assert_eq!(
            invalid(&yaml),
            "lab.yaml: services[0].selector: selects no pod in namespace `default`: app=nope"
        );
    }

    #[test]
    fn names_overlapping_addresses() {
        let yaml = with("podCIDR: 10.244.2.0/24", "podCIDR: 10.244.0.0/16");
        assert_eq!(
            invalid(&yaml),
            "lab.yaml: nodes[1].podCIDR: 10.244.0.0/16 overlaps nodes[0].podCIDR (10.244.1.0/24)"
        );
        let yaml = with(
            "    node: node-1\n",
            "    node: node-2\n    ip: 10.244.2.50\n",
        );
        assert_eq!(
            invalid(&yaml),
            "lab.yaml: pods[1].ip: 10.244.2.50 is already the address of pod web"
        );
        let yaml = with("clusterIP: 10.96.0.10", "clusterIP: 10.244.1.9");
        assert_eq!(
            invalid(&yaml),
            "lab.yaml: services[0].clusterIP: 10.244.1.9 is not in network.serviceCIDR (10.96.0.0/16)"
        );
    }

    #[test]
    fn names_a_port_used_twice_in_one_pod() {
        let yaml = with(
            "      - name: c\n        command: [sleep, \"60\"]",
            "      - name: c\n        command: [sleep, \"60\"]\n        ports: [{containerPort: 9}]\n      - name: d\n        command: [sleep, \"60\"]\n        ports: [{containerPort: 9}]",
        );
        assert!(
            invalid(&yaml).starts_with("lab.yaml: pods[1].containers[1].ports[0].containerPort: 9/TCP is already used by container `c`"),
            "{}",
            invalid(&yaml)
        );
    }

    #[test]
    fn yaml_errors_carry_the_line() {
        let yaml = with("    node: node-1\n", "    node: node-1\n    colour: red\n");
        let err = invalid(&yaml);
        assert!(
            err.contains("unknown field `colour`") && err.contains("line"),
            "{err}"
        );
        let err = invalid(&with("containerPort: 80", "containerPort: 70000"));
        assert!(err.contains("line") && err.contains("70000"), "{err}");
    }

    #[test]
    fn names_unknown_nodes_and_bad_names() {
        assert_eq!(
            invalid(&with("    node: node-2\n", "    node: node-9\n")),
            "lab.yaml: pods[1].node: no node is named `node-9`"
        );
        assert!(invalid(&with("name: t\n", "name: Bad_Name\n")).starts_with("lab.yaml: name:"));
        assert!(
            invalid(&with("apiVersion: observer-lab/v1", "apiVersion: v2")).contains("apiVersion")
        );
    }
}
