//! The lab file's validation: good files, and every kind of bad one.

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
    // The lab's cluster DNS: a pod on the first node, behind its Service.
    assert_eq!(plan.spec.pods[2].name, "kube-dns");
    assert_eq!(plan.pod_ips[2], "10.244.1.3".parse::<Ipv4Addr>().unwrap());
    assert_eq!(plan.endpoints, [vec![0], vec![2]]);
    let dnsmasq = &plan.spec.pods[2].containers[0].command;
    assert!(
        dnsmasq.contains(&"--host-record=web.default.svc.cluster.local,10.96.0.10".to_owned()),
        "{dnsmasq:?}"
    );
    assert!(
        dnsmasq.contains(
            &"--host-record=10-244-2-50.default.pod.cluster.local,10.244.2.50".to_owned()
        )
    );
}

#[test]
fn names_the_cluster_dns_outside_the_service_range() {
    let yaml = with("nodes:", "network:\n  clusterDNS: 10.97.0.53\nnodes:");
    assert!(
        Plan::from_yaml(&yaml, "lab.yaml")
            .unwrap_err()
            .to_string()
            .contains("network.clusterDNS: 10.97.0.53 is not in network.serviceCIDR"),
    );
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
    assert!(invalid(&with("apiVersion: observer-lab/v1", "apiVersion: v2")).contains("apiVersion"));
}
