//! Validation of a lab file: every field checked, every address given out
//! once, before anything is created.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use observer_common::inventory::Protocol;

use super::*;

pub(super) type Check<T> = Result<T, (String, String)>;

pub(super) fn problem<T>(field: impl Into<String>, problem: impl Into<String>) -> Check<T> {
    Err((field.into(), problem.into()))
}

#[derive(Default)]
pub(super) struct Checker {
    /// Every address given out so far, and to whom.
    addresses: HashMap<Ipv4Addr, String>,
}

impl Checker {
    pub(super) fn header(&mut self, spec: &LabSpec) -> Check<()> {
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

    pub(super) fn network(&mut self, spec: &LabSpec) -> Check<Vec<Ipv4Addr>> {
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

    pub(super) fn pods(&mut self, spec: &LabSpec) -> Check<Vec<Ipv4Addr>> {
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

    pub(super) fn services(&mut self, spec: &LabSpec) -> Check<Vec<Vec<usize>>> {
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

    pub(super) fn external(&mut self, spec: &LabSpec) -> Check<()> {
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

pub(super) fn first_host(cidr: Ipv4Net) -> Ipv4Addr {
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
