//! The README's examples, how rules combine, and bad files.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::*;

/// The README's examples (the README links to this file).
pub const EXAMPLES: &str = include_str!("../../../deploy/examples/policies.yaml");

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn localhost(port: u16, client: Option<&str>) -> Connection<'_> {
    Connection {
        class: Class::Localhost,
        direction: Direction::Egress,
        protocol: Protocol::Tcp,
        port,
        client,
        peer: None,
        service: None,
        address: None,
    }
}

fn decided(
    policies: &Policies,
    ns: &str,
    l: &BTreeMap<String, String>,
    c: &Connection,
) -> Option<(String, Action)> {
    policies.decide(ns, l, c).map(|d| (d.rule, d.action))
}

#[test]
fn only_the_sidecar_may_reach_the_admin_port() {
    let policies = parse(EXAMPLES).unwrap();
    let shop = labels(&[("app", "shop")]);
    let d = |client| decided(&policies, "shop", &shop, &localhost(9090, client));
    assert_eq!(
        d(Some("sidecar")),
        Some(("sidecar-to-admin".into(), Action::Allow))
    );
    assert_eq!(d(Some("app")), Some(("no-one-else".into(), Action::Deny)));
    assert_eq!(
        d(None),
        Some(("no-one-else".into(), Action::Deny)),
        "unknown client"
    );
    // Other ports: no rule, default allow.
    assert_eq!(
        decided(&policies, "shop", &shop, &localhost(8080, Some("app"))),
        None
    );
    // Other pods are not selected.
    assert_eq!(
        decided(
            &policies,
            "default",
            &labels(&[("app", "other")]),
            &localhost(9090, Some("app"))
        ),
        None
    );
}

#[test]
fn a_pod_may_not_call_a_service() {
    let policies = parse(EXAMPLES).unwrap();
    let client = labels(&[("app", "client")]);
    let call = |namespace, name| Connection {
        class: Class::Service,
        direction: Direction::Egress,
        protocol: Protocol::Tcp,
        port: 8080,
        client: None,
        peer: None,
        service: Some((namespace, name)),
        address: None,
    };
    let decision = policies
        .decide("default", &client, &call("shop", "shop"))
        .unwrap();
    assert_eq!(
        (decision.rule.as_str(), decision.action, decision.mode),
        ("no-shop", Action::Deny, Mode::Enforce)
    );
    assert_eq!(
        policies.decide("default", &client, &call("default", "web")),
        None
    );
}

#[test]
fn a_namespace_may_not_talk_to_another_and_audit_counts_it() {
    let policies = parse(EXAMPLES).unwrap();
    let peer_labels = labels(&[("app", "db")]);
    let to = |peer_ns| Connection {
        class: Class::Pod,
        direction: Direction::Egress,
        protocol: Protocol::Tcp,
        port: 5432,
        client: None,
        peer: Some((peer_ns, &peer_labels)),
        service: None,
        address: None,
    };
    let decision = policies
        .decide("shop", &BTreeMap::new(), &to("payments"))
        .unwrap();
    assert_eq!(
        (decision.action, decision.mode),
        (Action::Deny, Mode::Audit)
    );
    assert_eq!(
        policies.decide("shop", &BTreeMap::new(), &to("default")),
        None
    );
}

#[test]
fn no_internet_except_one_range() {
    let policies = parse(EXAMPLES).unwrap();
    let to = |address: &str| Connection {
        class: Class::External,
        direction: Direction::Egress,
        protocol: Protocol::Tcp,
        port: 443,
        client: None,
        peer: None,
        service: None,
        address: Some(address.parse().unwrap()),
    };
    let web = labels(&[("app", "web")]);
    let d = |a| decided(&policies, "default", &web, &to(a));
    assert_eq!(
        d("192.168.200.10"),
        Some(("partner-api".into(), Action::Allow))
    );
    assert_eq!(d("203.0.113.7"), Some(("default".into(), Action::Deny)));
    // The default applies to what no rule matches, whatever the class: the
    // example allows the cluster's own traffic with a rule of its own.
    let pod = Connection {
        class: Class::Pod,
        ..to("10.244.1.5")
    };
    assert_eq!(
        decided(&policies, "default", &web, &pod),
        Some(("in-cluster-pods".into(), Action::Allow))
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
    let d = policies
        .decide("x", &BTreeMap::new(), &localhost(80, None))
        .unwrap();
    assert_eq!(
        (d.policy.as_str(), d.rule.as_str(), d.action),
        ("a-deny", "rule-1", Action::Deny)
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
    let twice = format!("{head}  - {{name: x, action: deny}}\n  - {{name: x, action: allow}}\n");
    let (at, message) = parse(&twice).unwrap_err();
    assert_eq!(at, 9, "{message}");
    assert!(message.contains("two rules named `x`"), "{message}");
}

#[test]
fn ingress_rules_never_see_localhost_and_the_node_is_never_denied_inbound() {
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
    let none = BTreeMap::new();
    // Localhost goes to the egress default, not to the ingress rule.
    let d = policies.decide("x", &none, &localhost(80, None)).unwrap();
    assert_eq!((d.rule.as_str(), d.action), ("default", Action::Deny));
    let probe = Connection {
        class: Class::Node,
        direction: Direction::Ingress,
        ..localhost(8080, None)
    };
    assert_eq!(
        policies.decide("x", &none, &probe),
        None,
        "the kubelet's probes"
    );
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
    assert_eq!(parse(&one).unwrap().policies.len(), 4);
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
