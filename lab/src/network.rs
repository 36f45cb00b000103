//! The lab's network, built from namespaces the lab creates and nothing else:
//!
//! ```text
//!  pod ns (eth0) ─veth─ cni0 bridge ┐                  ┌ cni0 ─veth─ pod ns
//!                         node-1 ns ├─ eth0 ─ br0 ─ eth0 ┤ node-2 ns
//!                                   │   (underlay ns)    │
//!                     external host ns ─ eth0 ─┘
//! ```
//!
//! - A node is a namespace with a `cni0` bridge holding the gateway of its pod
//!   CIDR, as the CNI bridge plugin makes it, and an `eth0` on the underlay
//!   with the node's address. Nodes route each other's pod CIDRs.
//! - A pod has `lo` and an `eth0` (the pod end of a veth on `cni0`) with an
//!   address from its node's pod CIDR. With the process runtime the lab
//!   makes both, and the address has no prefix route, so all the pod's
//!   traffic, to pods of the same node too, goes through the node's
//!   gateway, where Service NAT happens both ways. With containerd the CNI
//!   bridge plugin makes the bridge and the pods' interfaces (with a prefix
//!   route: pods of a node talk over the bridge, and the node's
//!   `bridge-nf-call-iptables`, on by default in a new namespace, gives
//!   kube-proxy's NAT the bridged answers).
//! - Services are iptables DNAT rules in every node, as kube-proxy writes
//!   them in iptables mode. Traffic to the Service range that no rule
//!   translates hits a blackhole route: dropped inside the lab.
//! - Traffic to external hosts is masqueraded to the node's address, as
//!   CNI plugins do for traffic that leaves the cluster.
//! - Nothing has a default route out of the lab.

use std::net::Ipv4Addr;

use crate::{
    LabError,
    netns::Netns,
    spec::{Dataplane, Mesh, PROXY_PORT, PROXY_UID, Plan, Runtime},
};

/// Namespace names of one lab: `obslab-<lab>-...`.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(lab: &str) -> Self {
        Self {
            prefix: format!("{}-{lab}-", crate::netns::PREFIX),
        }
    }

    /// Every namespace of the lab starts with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn underlay(&self) -> String {
        format!("{}net", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}n-{node}", self.prefix)
    }

    /// `_` cannot appear in Kubernetes names: `ns_pod` is unambiguous.
    pub fn pod(&self, namespace: &str, pod: &str) -> String {
        format!("{}p-{namespace}_{pod}", self.prefix)
    }

    pub fn external(&self, host: &str) -> String {
        format!("{}x-{host}", self.prefix)
    }
}

/// The mark kube-proxy uses for "masquerade this" (hairpin Service traffic).
const MASQ_MARK: &str = "0x4000/0x4000";

pub fn build(plan: &Plan, names: &Names) -> Result<(), LabError> {
    let spec = &plan.spec;
    let underlay = Netns::create_named(&names.underlay())?;
    underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
    underlay.ip(&["link", "set", "br0", "up"])?;
    let node_prefix = spec.network.node_cidr.prefix_len();

    let nodes: Vec<Netns> = spec
        .nodes
        .iter()
        .map(|node| Netns::create_named(&names.node(&node.name)))
        .collect::<Result<_, _>>()?;
    for (i, (node, netns)) in spec.nodes.iter().zip(&nodes).enumerate() {
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            // Pods of one node talk through its gateway: no "go direct" hints.
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            netns.sysctl(key, value)?;
        }
        // With containerd, the CNI bridge plugin makes the bridge.
        if spec.runtime == Runtime::Process {
            let gateway = format!("{}/{}", plan.gateway(i), node.pod_cidr.prefix_len());
            netns.ip(&["link", "add", "cni0", "type", "bridge"])?;
            netns.ip(&["addr", "add", &gateway, "dev", "cni0"])?;
            netns.ip(&["link", "set", "cni0", "up"])?;
        }
        let address = format!("{}/{node_prefix}", plan.node_addresses[i]);
        uplink(netns, &underlay, &format!("n{i}"), &address)?;
        for (j, other) in spec.nodes.iter().enumerate() {
            if i != j {
                let via = plan.node_addresses[j].to_string();
                netns.ip(&[
                    "route",
                    "add",
                    &other.pod_cidr.trunc().to_string(),
                    "via",
                    &via,
                ])?;
            }
        }
        let external = spec.network.external_cidr.to_string();
        netns.ip(&["route", "add", &external, "dev", "eth0", "scope", "link"])?;
        let service_cidr = spec.network.service_cidr.to_string();
        netns.ip(&["route", "add", "blackhole", &service_cidr])?;
        netns.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "eth0",
                "-d",
                &external,
                "-j",
                "MASQUERADE",
            ],
        )?;
        // With a socket load balancer the node has no Service rules: the
        // pods' sockets are translated before a packet leaves them.
        if spec.network.dataplane == Dataplane::KubeProxy {
            services(plan, netns)?;
        }
    }

    for (i, host) in spec.external_hosts.iter().enumerate() {
        let netns = Netns::create_named(&names.external(&host.name))?;
        let address = format!(
            "{}/{}",
            host.address,
            spec.network.external_cidr.prefix_len()
        );
        uplink(&netns, &underlay, &format!("x{i}"), &address)?;
        let node_cidr = spec.network.node_cidr.to_string();
        netns.ip(&["route", "add", &node_cidr, "dev", "eth0", "scope", "link"])?;
    }

    if spec.runtime == Runtime::Containerd {
        // Pods are the CNI's to network.
        return Ok(());
    }
    for (p, pod) in spec.pods.iter().enumerate() {
        let n = plan.node_index(&pod.node);
        let node = &nodes[n];
        let netns = Netns::create_named(&names.pod(&pod.namespace, &pod.name))?;
        let host_end = format!("veth{p}");
        node.ip(&[
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        node.ip(&["link", "set", &host_end, "master", "cni0", "up"])?;
        let address = format!(
            "{}/{}",
            plan.pod_ips[p],
            spec.nodes[n].pod_cidr.prefix_len()
        );
        netns.ip(&["addr", "add", &address, "dev", "eth0", "noprefixroute"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        let gateway = plan.gateway(n).to_string();
        netns.ip(&[
            "route", "add", "default", "via", &gateway, "dev", "eth0", "onlink",
        ])?;
        if pod.mesh == Mesh::Sidecar {
            redirect_to_proxy(&netns)?;
        }
    }
    Ok(())
}

/// A sidecar mesh's capture, in the pod's namespace: its outbound TCP goes
/// to the proxy, but for the proxy's own (uid 1337) and loopback's.
pub(crate) fn redirect_to_proxy(pod: &Netns) -> Result<(), LabError> {
    let uid = PROXY_UID.to_string();
    let port = PROXY_PORT.to_string();
    let rules: [&[&str]; 5] = [
        &["-t", "nat", "-N", "LAB-MESH"],
        &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "LAB-MESH"],
        &[
            "-t",
            "nat",
            "-A",
            "LAB-MESH",
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "LAB-MESH",
            "-d",
            "127.0.0.0/8",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "LAB-MESH",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ],
    ];
    for rule in rules {
        pod.exec("iptables", rule)?;
    }
    Ok(())
}

/// Connects `netns` to the underlay bridge with `eth0` holding `address`.
fn uplink(netns: &Netns, underlay: &Netns, port: &str, address: &str) -> Result<(), LabError> {
    netns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        underlay.name(),
    ])?;
    underlay.ip(&["link", "set", port, "master", "br0", "up"])?;
    netns.ip(&["addr", "add", address, "dev", "eth0"])?;
    netns.ip(&["link", "set", "eth0", "up"]).map(drop)
}

/// kube-proxy's iptables mode, in miniature: a chain per Service port that
/// picks an endpoint at random and DNATs to it.
fn services(plan: &Plan, node: &Netns) -> Result<(), LabError> {
    let ipt = |args: &[&str]| node.exec("iptables", args).map(drop);
    ipt(&["-t", "nat", "-N", "LAB-SERVICES"])?;
    ipt(&["-t", "nat", "-A", "PREROUTING", "-j", "LAB-SERVICES"])?;
    ipt(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-m",
        "mark",
        "--mark",
        MASQ_MARK,
        "-j",
        "MASQUERADE",
    ])?;
    for (s, service) in plan.spec.services.iter().enumerate() {
        let backends: Vec<Ipv4Addr> = plan.endpoints[s].iter().map(|&p| plan.pod_ips[p]).collect();
        for (p, port) in service.ports.iter().enumerate() {
            let chain = format!("LAB-SVC-{s}-{p}");
            let protocol = port.protocol.name().to_lowercase();
            let target_port = port.target_port.unwrap_or(port.port);
            ipt(&["-t", "nat", "-N", &chain])?;
            ipt(&[
                "-t",
                "nat",
                "-A",
                "LAB-SERVICES",
                "-d",
                &format!("{}/32", service.cluster_ip),
                "-p",
                &protocol,
                "--dport",
                &port.port.to_string(),
                "-j",
                &chain,
            ])?;
            for (k, backend) in backends.iter().enumerate() {
                // A pod that reaches itself through its Service (hairpin)
                // must see the node as the source, or it would answer itself.
                ipt(&[
                    "-t",
                    "nat",
                    "-A",
                    &chain,
                    "-s",
                    &format!("{backend}/32"),
                    "-j",
                    "MARK",
                    "--set-xmark",
                    MASQ_MARK,
                ])?;
                let destination = format!("{backend}:{target_port}");
                let remaining = backends.len() - k;
                let mut rule = vec!["-t", "nat", "-A", &chain, "-p", &protocol];
                let probability = format!("{:.5}", 1.0 / remaining as f64);
                if remaining > 1 {
                    rule.extend([
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &probability,
                    ]);
                }
                rule.extend(["-j", "DNAT", "--to-destination", &destination]);
                ipt(&rule)?;
            }
        }
    }
    Ok(())
}
