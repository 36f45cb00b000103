//! Cluster DNS, as every cluster has it: a `kube-system/kube-dns` Service
//! (UDP and TCP 53) in front of a DNS server pod, which answers the lab's
//! Service names (`<service>.<namespace>.svc.cluster.local`) and pod names
//! (`<a-b-c-d>.<namespace>.pod.cluster.local`) from static records. The
//! server is dnsmasq (Debian's; CoreDNS is not packaged). Every pod gets the
//! resolv.conf a kubelet writes (`ClusterFirst`).

use std::{collections::BTreeMap, net::Ipv4Addr};

use observer_common::inventory::Protocol;

use crate::spec::{ContainerSpec, LabSpec, PodSpec, PortSpec, ServicePortSpec, ServiceSpec};

/// The cluster's domain, as in every Kubernetes cluster by default.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "kube-system";
/// The Service's name, and the pod's.
pub const NAME: &str = "kube-dns";
const CONTAINER: &str = "dnsmasq";
const LABEL: (&str, &str) = ("k8s-app", "kube-dns");

/// The DNS pod and Service for a lab whose DNS Service has `cluster_ip`,
/// on its first node. The pod's command is written once the addresses are
/// known ([`command`]).
pub fn add(spec: &mut LabSpec, cluster_ip: Ipv4Addr) -> Result<(), String> {
    let taken = spec
        .pods
        .iter()
        .map(|p| (&p.namespace, &p.name))
        .chain(spec.services.iter().map(|s| (&s.namespace, &s.name)))
        .any(|(namespace, name)| namespace == NAMESPACE && name == NAME);
    if taken {
        return Err(format!(
            "the lab runs the cluster's DNS as {NAMESPACE}/{NAME}: name yours otherwise"
        ));
    }
    let labels: BTreeMap<String, String> = [(LABEL.0.to_owned(), LABEL.1.to_owned())].into();
    let node = spec
        .nodes
        .first()
        .map(|n| n.name.clone())
        .unwrap_or_default();
    spec.pods.push(PodSpec {
        name: NAME.into(),
        namespace: NAMESPACE.into(),
        node,
        labels: labels.clone(),
        ip: None,
        volumes: Vec::new(),
        containers: vec![ContainerSpec {
            name: CONTAINER.into(),
            // Its arguments, the records, once the addresses are known.
            command: vec!["dnsmasq".into()],
            ports: [Protocol::Udp, Protocol::Tcp]
                .map(|protocol| PortSpec {
                    container_port: 53,
                    protocol,
                })
                .into(),
            run_as_user: None,
            resources: Default::default(),
        }],
        mesh: Default::default(),
    });
    spec.services.push(ServiceSpec {
        name: NAME.into(),
        namespace: NAMESPACE.into(),
        cluster_ip,
        selector: labels,
        ports: [("dns", Protocol::Udp), ("dns-tcp", Protocol::Tcp)]
            .map(|(name, protocol)| ServicePortSpec {
                name: Some(name.into()),
                port: 53,
                target_port: None,
                protocol,
            })
            .into(),
    });
    Ok(())
}

/// The names the server answers, with their addresses.
pub fn records(spec: &LabSpec, pod_ips: &[Ipv4Addr]) -> Vec<(String, Ipv4Addr)> {
    let services = spec.services.iter().map(|s| {
        (
            format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.name, s.namespace),
            s.cluster_ip,
        )
    });
    let pods = spec.pods.iter().zip(pod_ips).map(|(p, ip)| {
        (
            format!(
                "{}.{}.pod.{CLUSTER_DOMAIN}",
                ip.to_string().replace('.', "-"),
                p.namespace
            ),
            *ip,
        )
    });
    services.chain(pods).collect()
}

/// Gives the DNS pod its command: dnsmasq in the foreground, answering
/// only its records (nothing is forwarded: nothing leaves the lab).
pub fn command(spec: &mut LabSpec, pod_ips: &[Ipv4Addr]) {
    let mut command: Vec<String> = [
        "dnsmasq",
        "--keep-in-foreground",
        "--log-facility=-",
        "--log-queries",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--user=root",
        "--group=root",
    ]
    .map(str::to_owned)
    .into();
    command.push(format!("--local=/{CLUSTER_DOMAIN}/"));
    for (name, ip) in records(spec, pod_ips) {
        command.push(format!("--host-record={name},{ip}"));
    }
    if let Some(pod) = spec
        .pods
        .iter_mut()
        .find(|p| p.namespace == NAMESPACE && p.name == NAME)
    {
        pod.containers[0].command = command;
    }
}

/// The resolv.conf search path the kubelet gives a pod of `namespace`.
pub fn searches(namespace: &str) -> Vec<String> {
    vec![
        format!("{namespace}.svc.{CLUSTER_DOMAIN}"),
        format!("svc.{CLUSTER_DOMAIN}"),
        CLUSTER_DOMAIN.into(),
    ]
}

/// The kubelet's resolver options.
pub const OPTIONS: &[&str] = &["ndots:5"];

/// The pod's resolv.conf, as the kubelet writes it.
pub fn resolv_conf(namespace: &str, server: Ipv4Addr) -> String {
    format!(
        "search {}\nnameserver {server}\noptions {}\n",
        searches(namespace).join(" "),
        OPTIONS.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_the_kubelets() {
        assert_eq!(
            resolv_conf("shop", "10.96.0.53".parse().unwrap()),
            "search shop.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.53\noptions ndots:5\n"
        );
    }
}
