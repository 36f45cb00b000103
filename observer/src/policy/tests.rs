//! The README's examples, how rules combine, and bad files; and the shared
//! table of cases (`cases.yaml`), which the kernel's programs must decide
//! alike (integration-test/tests/kernel.rs).
//! (Longer than most files: one test per case of the policy language.)

use std::{collections::HashSet, net::SocketAddrV4};

use observer_common::{
    direction,
    inventory::{Container, INVENTORY_VERSION, Inventory, Node, Pod, Service, ServicePort},
    protocol,
    verdict::{ALLOW, AUDIT_DENY, DENY},
};
use proptest::prelude::*;

use super::{
    explain::{Connect, World},
    table::Table,
    *,
};

/// The README's examples (the README links to this file).
pub const EXAMPLES: &str = include_str!("../../../deploy/examples/policies.yaml");

fn pod(namespace: &str, name: &str, app: Option<&str>, ip: &str, containers: &[&str]) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("{namespace}-{name}"),
        node: "node-1".into(),
        labels: app.map(|a| ("app".into(), a.into())).into_iter().collect(),
        ip: ip.parse().unwrap(),
        netns: None,
        containers: containers
            .iter()
            .map(|c| Container {
                name: (*c).into(),
                id: String::new(),
                cgroup: format!("{namespace}/{name}/{c}").into(),
                ports: Vec::new(),
            })
            .collect(),
    }
}

fn service(namespace: &str, name: &str, ip: &str, port: u16) -> Service {
    Service {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ip: ip.parse().unwrap(),
        ports: vec![ServicePort {
            name: None,
            port,
            target_port: port,
            protocol: Default::default(),
        }],
        selector: Default::default(),
        endpoints: Vec::new(),
    }
}

/// The pods and Services the README's examples are about.
fn world() -> World {
    World::new(Inventory {
        version: INVENTORY_VERSION,
        cluster: "examples".into(),
        pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        service_cidr: Some("10.96.0.0/16".parse().unwrap()),
        nodes: vec![Node {
            name: "node-1".into(),
            address: "172.18.0.2".parse().unwrap(),
            pod_cidr: None,
            netns: None,
        }],
        pods: vec![
            pod(
                "shop",
                "shop",
                Some("shop"),
                "10.244.1.10",
                &["app", "sidecar"],
            ),
            pod("shop", "worker", None, "10.244.1.14", &["worker"]),
            pod(
                "default",
                "client",
                Some("client"),
                "10.244.1.11",
                &["client"],
            ),
            pod("default", "web", Some("web"), "10.244.1.12", &["web"]),
            pod("default", "other", Some("other"), "10.244.1.13", &["app"]),
            pod("default", "x", None, "10.244.1.15", &[]),
            pod(
                "default",
                "php",
                Some("php"),
                "10.244.1.16",
                &["nginx", "php-fpm"],
            ),
            pod("payments", "db", Some("db"), "10.244.2.5", &[]),
            pod("default", "db", Some("db"), "10.244.2.6", &[]),
        ],
        services: vec![
            service("shop", "shop", "10.96.0.20", 8080),
            service("default", "web", "10.96.0.10", 80),
        ],
        external_hosts: Vec::new(),
    })
}

/// A TCP connection of pod `ns/name` to `to` (from container `client`).
fn egress(to: &str, client: Option<&str>) -> Connect {
    let remote: SocketAddrV4 = to.parse().unwrap();
    Connect {
        direction: direction::EGRESS,
        protocol: protocol::TCP,
        remote,
        port: remote.port(),
        client: client.map(Into::into),
        from_node_process: false,
    }
}

/// The rule (or `default`) and the verdict that decide, if any.
fn decided(policies: &Policies, pod: &str, c: &Connect) -> Option<(String, u8)> {
    let world = world();
    let (namespace, name) = pod.split_once('/').unwrap();
    let pod = world.pod(namespace, name).expect("a pod of the world");
    world
        .decide(policies, pod, c)
        .decision
        .map(|(names, verdict)| (names.rule, verdict))
}

#[test]
fn only_nginx_may_reach_the_php_socket() {
    let policies = parse(EXAMPLES).unwrap();
    let world = world();
    let php = world.pod("default", "php").unwrap();
    let d = |client, path| {
        world
            .decide_unix(&policies, php, client, path)
            .unwrap()
            .map(|(names, verdict)| (names.rule, verdict))
    };
    let socket = "/run/php/php-fpm.sock";
    assert_eq!(
        d(Some("nginx"), socket),
        Some(("nginx-to-fpm".into(), ALLOW))
    );
    assert_eq!(
        d(Some("php-fpm"), socket),
        Some(("no-other-socket".into(), DENY))
    );
    assert_eq!(
        d(Some("nginx"), "@statsd"),
        Some(("no-other-socket".into(), DENY))
    );
    assert_eq!(
        d(None, socket),
        Some(("unknown-container".into(), DENY)),
        "a client no container name is known for"
    );
    // Network traffic is not about unix sockets, nor the other way round.
    assert_eq!(
        decided(
            &policies,
            "default/php",
            &egress("127.0.0.1:9000", Some("nginx"))
        ),
        None
    );
    let web = world.pod("default", "web").unwrap();
    assert_eq!(
        world
            .decide_unix(&policies, web, Some("web"), socket)
            .unwrap(),
        None
    );
    assert!(
        world
            .decide_unix(&policies, php, Some("nobody"), socket)
            .is_err()
    );
    assert!(
        world
            .decide_unix(&policies, php, None, "relative.sock")
            .is_err()
    );
}

#[test]
fn the_shared_table_decides_in_user_space() {
    let table = Table::load();
    let world = World::new(table.inventory.clone());
    let mut failures = Vec::new();
    for case in &table.cases {
        let (namespace, name) = case.pod();
        let pod = world.pod(namespace, name).expect("a pod of the table");
        let outcome = world.decide(&table.policies, pod, &case.connect());
        let decided = outcome
            .decision
            .as_ref()
            .map(|(n, v)| (n.policy.as_str(), n.rule.as_str(), *v));
        if let Err(failure) = case.check(decided) {
            failures.push(failure);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(table.cases.len() >= 20, "the table has its cases");
}

#[test]
fn only_the_sidecar_may_reach_the_admin_port() {
    let policies = parse(EXAMPLES).unwrap();
    let d = |client| decided(&policies, "shop/shop", &egress("127.0.0.1:9090", client));
    assert_eq!(d(Some("sidecar")), Some(("sidecar-to-admin".into(), ALLOW)));
    assert_eq!(d(Some("app")), Some(("no-one-else".into(), DENY)));
    assert_eq!(
        d(None),
        Some(("unknown-container".into(), DENY)),
        "a client no container name is known for"
    );
    // Other ports: no rule, default allow.
    assert_eq!(
        decided(
            &policies,
            "shop/shop",
            &egress("127.0.0.1:8080", Some("app"))
        ),
        None
    );
    // Other pods are not selected.
    assert_eq!(
        decided(
            &policies,
            "default/other",
            &egress("127.0.0.1:9090", Some("app"))
        ),
        None
    );
}

#[test]
fn a_pod_may_not_call_a_service() {
    let policies = parse(EXAMPLES).unwrap();
    let to = |addr| decided(&policies, "default/client", &egress(addr, Some("client")));
    assert_eq!(
        to("10.96.0.20:8080"),
        Some(("no-shop".into(), DENY)),
        "enforced"
    );
    assert_eq!(to("10.96.0.10:80"), None);
}

#[test]
fn a_namespace_may_not_talk_to_another_and_audit_counts_it() {
    let policies = parse(EXAMPLES).unwrap();
    let to = |addr| decided(&policies, "shop/worker", &egress(addr, None));
    assert_eq!(
        to("10.244.2.5:5432"),
        Some(("no-payments".into(), AUDIT_DENY))
    );
    assert_eq!(to("10.244.2.6:5432"), None, "a pod of namespace default");
}

#[test]
fn no_internet_except_one_range() {
    let policies = parse(EXAMPLES).unwrap();
    let d = |addr| decided(&policies, "default/web", &egress(addr, Some("web")));
    assert_eq!(d("192.168.200.10:443"), Some(("partner-api".into(), ALLOW)));
    assert_eq!(d("203.0.113.7:443"), Some(("default".into(), DENY)));
    // The default applies to what no rule matches, whatever the class: the
    // example allows the cluster's own traffic with a rule of its own.
    assert_eq!(
        d("10.244.1.11:443"),
        Some(("in-cluster-pods".into(), ALLOW))
    );
}

#[test]
fn policies_are_tried_by_name_and_the_first_match_decides() {
    let text = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: b-allow}
spec:
  podSelector: {}
  mode: enforce
  rules:
  - {class: localhost, ports: [80], action: allow}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: a-deny}
spec:
  podSelector: {}
  mode: enforce
  rules:
  - {class: localhost, ports: [80], action: deny}
";
    let policies = parse(text).unwrap();
    let world = world();
    let pod = world.pod("default", "x").unwrap();
    let (names, verdict) = world
        .decide(&policies, pod, &egress("127.0.0.1:80", None))
        .decision
        .unwrap();
    assert_eq!(
        (names.policy.as_str(), names.rule.as_str(), verdict),
        ("a-deny", "rule-1", DENY)
    );
}

/// Each bad file with the line and the words its error must have.
#[test]
fn bad_files_are_refused_with_the_line_and_the_problem() {
    let head = "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  mode: enforce\n  rules:\n";
    let cases: &[(&str, usize, &str)] = &[
        (
            "  - {class: localhost, ports: [70000], action: deny}\n",
            8,
            "not a port",
        ),
        (
            "  - {class: localhost, ports: [\"90-80\"], action: deny}\n",
            8,
            "empty",
        ),
        (
            "  - {class: pod, clientContainers: [a], action: deny}\n",
            8,
            "could never match",
        ),
        (
            "  - {class: external, cidrs: [\"10.0.0.0/33\"], action: deny}\n",
            8,
            "invalid",
        ),
        (
            "  - {class: localhost, color: red, action: deny}\n",
            8,
            "unknown field `color`",
        ),
        (
            "  - {class: service, direction: ingress, action: deny}\n",
            8,
            "could never match",
        ),
        (
            "  - {class: localhost, action: maybe}\n",
            8,
            "unknown variant `maybe`",
        ),
        (
            "  - {class: localhost, ports: [], action: deny}\n",
            8,
            "matches no port",
        ),
        ("  - {class: localhost, ports: [80\n", 9, ""),
        (
            "  - {class: unix, paths: [run/app.sock], action: deny}\n",
            8,
            "absolute path",
        ),
        (
            "  - {class: localhost, paths: [/run/app.sock], action: deny}\n",
            8,
            "`class: unix` rules only",
        ),
        (
            "  - {class: unix, paths: [], action: deny}\n",
            8,
            "matches no path",
        ),
        (
            "  - {class: unix, ports: [80], action: deny}\n",
            8,
            "does not apply to unix sockets",
        ),
        (
            "  - {class: unix, direction: ingress, action: deny}\n",
            8,
            "does not apply to unix sockets",
        ),
        ("  - {class: fifo, action: deny}\n", 8, "fifo"),
        (
            "  - {class: unix, cidrs: [10.0.0.0/8], action: deny}\n",
            8,
            "could never match",
        ),
    ];
    for (rules, line, words) in cases {
        let text = format!("{head}{rules}");
        let (at, message) = parse(&text).expect_err(rules);
        assert_eq!(at, *line, "{rules}: {message}");
        assert!(message.contains(words), "{rules}: {message}");
    }
    let selector = head.replace(
        "podSelector: {}",
        "podSelector: {matchLabels: {\"-bad\": x}}",
    );
    let (at, message) = parse(&selector).unwrap_err();
    assert_eq!(at, 5, "{message}");
    assert!(message.contains("not a valid label key"), "{message}");
    // In a rule written over several lines: the line of the bad value.
    let long = format!(
        "{head}  - name: wide\n    class: localhost\n    ports:\n      - 70000\n    action: deny\n"
    );
    let (at, message) = parse(&long).unwrap_err();
    assert_eq!(at, 11, "{message}");
    let version = head.replace("v1alpha1", "v9");
    assert!(parse(&version).unwrap_err().1.contains("apiVersion"));
    let long_path = format!(
        "{head}  - {{class: unix, paths: [/{}], action: deny}}\n",
        "a".repeat(107)
    );
    assert!(parse(&long_path).unwrap_err().1.contains("2 to 107 bytes"));
    let fine = format!(
        "{head}  - {{class: unix, clientContainers: [web], paths: [/{}, '@{}'], action: allow}}\n",
        "a".repeat(106),
        "b".repeat(107)
    );
    parse(&fine).expect("the longest paths fit");
    let twice = format!("{head}  - {{name: x, action: deny}}\n  - {{name: x, action: allow}}\n");
    let (at, message) = parse(&twice).unwrap_err();
    assert_eq!(at, 9, "{message}");
    assert!(message.contains("two rules named `x`"), "{message}");
}

#[test]
fn ingress_rules_never_see_localhost_and_a_node_address_is_judged_like_any() {
    let text = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: p}
spec:
  podSelector: {}
  mode: enforce
  defaultAction: deny
  rules:
  - {name: in, class: any, direction: ingress, action: allow}
";
    let policies = parse(text).unwrap();
    // Localhost goes to the egress default, not to the ingress rule.
    assert_eq!(
        decided(&policies, "default/x", &egress("127.0.0.1:80", None)),
        Some(("default".into(), DENY))
    );
    let probe = Connect {
        direction: direction::INGRESS,
        remote: "172.18.0.2:41000".parse().unwrap(),
        port: 8080,
        ..egress("127.0.0.1:8080", None)
    };
    // From a node's address: a rule decides, unless a process of the node
    // itself sent it (the kubelet's probes; the kernel tells by the socket).
    assert_eq!(
        decided(&policies, "default/x", &probe),
        Some(("in".into(), ALLOW))
    );
    let kubelet = Connect {
        from_node_process: true,
        ..probe.clone()
    };
    assert_eq!(decided(&policies, "default/x", &kubelet), None);
    let reserved = text.replace("name: in,", "name: default,");
    assert!(
        parse(&reserved)
            .unwrap_err()
            .1
            .contains("`default` names what no rule matches")
    );
}

#[test]
fn empty_files_and_documents_hold_no_policy() {
    assert_eq!(parse("").unwrap(), Policies::default());
    assert_eq!(parse("# none yet\n").unwrap(), Policies::default());
    let one = format!("---\n{EXAMPLES}\n---\n");
    assert_eq!(parse(&one).unwrap().policies.len(), 5);
}

#[test]
fn load_names_the_file() {
    let path = std::env::temp_dir().join(format!("observer-policy-{}.yaml", std::process::id()));
    std::fs::write(&path, "apiVersion: observer.dev/v1alpha1\nkind: Pod\n").unwrap();
    let err = load(&path, None).unwrap_err().to_string();
    // The line of the object with the problem.
    assert!(err.starts_with(&format!("{}:1: ", path.display())), "{err}");
    assert!(err.contains("kind `Pod` is not a policy"), "{err}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_service_that_does_not_exist_is_refused_with_its_line() {
    let policies = parse(EXAMPLES).unwrap();
    let known = HashSet::from([("default".to_owned(), "web".to_owned())]);
    let (line, message) = check_services(EXAMPLES, &policies, &known).unwrap_err();
    assert!(message.contains("no Service shop/shop"), "{message}");
    assert!(
        EXAMPLES.lines().nth(line - 1).unwrap().contains("service:"),
        "line {line}"
    );
    let known = HashSet::from([("shop".to_owned(), "shop".to_owned())]);
    assert!(check_services(EXAMPLES, &policies, &known).is_ok());
}

#[test]
fn check_reports_the_limits_a_file_would_hit_in_the_kernel() {
    let dir = std::env::temp_dir().join(format!("observer-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let limit = observer_common::MAX_POD_RULES;
    let ports: Vec<String> = (1..=limit + 1).map(|p| p.to_string()).collect();
    let many = format!(
        "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: many}}\nspec:\n  podSelector: {{}}\n  mode: enforce\n  rules:\n  - {{class: external, ports: [{}], action: deny}}\n",
        ports.join(", ")
    );
    let path = dir.join("many.yaml");
    std::fs::write(&path, &many).unwrap();
    let err = super::explain::check(&path, None).unwrap_err().to_string();
    assert!(
        err.contains(&format!("policy `many`: {} rules in the kernel", limit + 1))
            && err.contains(&format!("at most {limit}")),
        "{err}"
    );

    // Two policies of half the limit and one rule each are fine alone; on
    // a pod both select, only an inventory tells.
    let nine: Vec<String> = (1..=limit / 2 + 1).map(|p| p.to_string()).collect();
    let two = format!(
        "{}---\n{}",
        many.replace(&ports.join(", "), &nine.join(", ")),
        many.replace(&ports.join(", "), &nine.join(", "))
            .replace("name: many", "name: more")
    );
    std::fs::write(&path, &two).unwrap();
    assert!(super::explain::check(&path, None).is_ok());
    let inventory = dir.join("inventory.json");
    std::fs::write(
        &inventory,
        r#"{"version": 1, "cluster": "c", "podCidrs": [], "nodes": [], "pods": [{"namespace": "default", "name": "a", "uid": "1", "node": "n",
            "labels": {}, "ip": "10.244.1.5", "containers": []}], "services": []}"#,
    )
    .unwrap();
    let err = super::explain::check(&path, Some(&inventory))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("pod default/a: {} rules", limit + 2)),
        "{err}"
    );

    // CIDRs: every rule's set takes room in one trie, whatever the pods.
    let cidrs: Vec<String> = (0..=observer_common::POLICY_CIDRS_CAPACITY)
        .map(|n| format!("10.{}.{}.0/24", n / 256 % 256, n % 256))
        .collect();
    let wide = format!(
        "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: wide}}\nspec:\n  podSelector: {{}}\n  mode: enforce\n  rules:\n  - {{class: external, cidrs: [{}], action: deny}}\n",
        cidrs.join(", ")
    );
    std::fs::write(&path, &wide).unwrap();
    let err = super::explain::check(&path, None).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "{} CIDRs in rules, the kernel holds at most {}",
            cidrs.len(),
            observer_common::POLICY_CIDRS_CAPACITY
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

proptest! {
    /// No input makes the parser panic: arbitrary text, and valid files cut
    /// or with a byte changed anywhere.
    #[test]
    fn the_parser_never_panics(text in "\\PC{0,400}") {
        let _ = parse(&text);
    }

    #[test]
    fn damaged_files_never_panic(cut in 0..EXAMPLES.len(), at in 0..EXAMPLES.len(), byte in any::<u8>()) {
        let mut bytes = EXAMPLES.as_bytes()[..cut.max(1)].to_vec();
        let at = at % bytes.len();
        bytes[at] = byte;
        let _ = parse(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn the_reserved_rule_names_are_refused() {
    for word in ["default", "unknown-container"] {
        let text = format!(
            "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  podSelector: {{}}\n  mode: enforce\n  rules:\n  - {{name: {word}, class: localhost, action: deny}}\n"
        );
        let (_, message) = parse(&text).unwrap_err();
        assert!(message.contains(&format!("`{word}` names")), "{message}");
    }
}
